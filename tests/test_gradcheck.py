"""Finite-difference checks of every op's analytic backward, needing no reference implementation.

The kernels accumulate in fp32 whatever the input dtype, so ``torch.autograd.gradcheck`` in float64 cannot
pass (its finite differences resolve far below fp32 rounding), and its fp32 ``fast_mode`` normalizes the
probe vectors until a wrong gradient hides under the absolute tolerance (tried: a backward that skipped the
dropout mask passed), while the full Jacobian takes many minutes in the interpreter. So: for each input
separately, a few random directions u, compare the analytic directional derivative <dL/dx, u> of
L = sum(g * f(x)) with the central difference (L(x + eps u) - L(x - eps u)) / (2 eps), L summed in float64.
With eps = 1e-3 the truncation error is ~1e-6 and fp32 rounding ~1e-3 of |L|'s scale: rtol 1e-2.
The exact comparison against the fp64 reference's gradients is in tests/test_backward.py.
"""
import pytest
import torch

from vit_kernels.ops.attention import attention_op, contiguous_key_mask
from vit_kernels.ops.dropout import dropout_op, new_seed
from vit_kernels.ops.head import pool_norm_op
from vit_kernels.ops.layer_norm import layer_norm_op
from vit_kernels.ops.linear import linear_op
from vit_kernels.ops.patch_embed import patch_embed_op

from helpers import randn

EPS, RTOL, DIRECTIONS = 1e-3, 1e-2, 3


def gradcheck(fn, *inputs):
    """fn(*inputs) -> a tensor; every input requires grad."""
    out = fn(*inputs)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), inputs)

    def loss(args):
        with torch.no_grad():
            return (fn(*args).double() * g.double()).sum().item()

    for i, (x, grad) in enumerate(zip(inputs, grads)):
        for _ in range(DIRECTIONS):
            u = torch.randn_like(x)
            plus = [t.detach() + EPS * u if j == i else t.detach() for j, t in enumerate(inputs)]
            minus = [t.detach() - EPS * u if j == i else t.detach() for j, t in enumerate(inputs)]
            numeric = (loss(plus) - loss(minus)) / (2 * EPS)
            analytic = (grad.double() * u.double()).sum().item()
            scale = grad.double().norm().item() * u.double().norm().item()  # |<a, u>| can be small by chance
            assert abs(numeric - analytic) <= RTOL * scale + 1e-4, \
                f"input {i}: analytic {analytic:.6g} vs finite difference {numeric:.6g} (scale {scale:.3g})"


def r(*shape, device, scale=1.0):
    return randn(*shape, device=device, scale=scale).requires_grad_()


@pytest.mark.parametrize("layout,scaling,masked,dropout", [
    ("qkv h d", "paper", False, 0.0), ("h d qkv", "seed", True, 0.0), ("qkv h d", "paper", True, 0.3)])
def test_attention(layout, scaling, masked, dropout, device):
    N, H = 7, 2
    mask = contiguous_key_mask(torch.rand(2, 1, N, N, device=device) > 0.3, N) if masked else None
    seed = new_seed()  # fixed: the function must be deterministic for finite differences
    gradcheck(lambda qkv: attention_op(qkv, mask, H, layout, scaling, dropout, seed)[0],
              r(2, N, 3 * H * 16, device=device, scale=0.5))


def test_layer_norm(device):
    gradcheck(lambda x, w, b: layer_norm_op(x, w, b, 1e-5)[0], r(5, 37, device=device), r(37, device=device),
              r(37, device=device))


@pytest.mark.parametrize("activation,deinterleave,dropout", [(None, 3, 0.0), ("gelu", 1, 0.2),
                                                             ("gelu_tanh", 1, 0.0)])
def test_linear(activation, deinterleave, dropout, device):
    seed = new_seed()
    gradcheck(lambda x, w, b, s, res: linear_op(x, w, b, activation, s, res, deinterleave, dropout, seed),
              r(5, 16, device=device), r(24, 16, device=device, scale=0.3), r(24, device=device),
              r(24, device=device), r(5, 24, device=device))


def test_linear_with_stochastic_depth(device):
    factors = torch.tensor([0.0, 1.6, 1.6], device=device)
    gradcheck(lambda x, w, s, res: linear_op(x, w, None, "gelu", s, res, 1, 0.0, None, factors),
              r(6, 16, device=device), r(24, 16, device=device, scale=0.3), r(24, device=device),
              r(6, 24, device=device))


def test_patch_embed(device):
    gradcheck(lambda img, w, b, prefix, pos: patch_embed_op(img, w, b, prefix, pos, True),
              r(1, 2, 8, 16, device=device), r(4, 2, 8, 8, device=device, scale=0.2), r(4, device=device),
              r(1, 4, device=device), r(3, 4, device=device))


@pytest.mark.parametrize("pool,start", [("mean", 1), ("token", 0)])
def test_pool_norm(pool, start, device):
    gradcheck(lambda x, w, b: pool_norm_op(x, pool, start, w, b, 1e-5, True), r(2, 5, 24, device=device),
              r(24, device=device), r(24, device=device))


def test_dropout(device):
    seed = new_seed()
    gradcheck(lambda x: dropout_op(x, seed, 0.4), r(5, 24, device=device))
