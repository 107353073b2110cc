"""Dropout inside the kernels: keep rate, scaling, masks regenerated identically in backward, determinism.

The kernels draw masks from Philox, not from torch's RNG, so their values are compared with the PyTorch
formula evaluated under the kernel's own mask, recovered from the output (a zero where the value was not).
"""
import math

import pytest
import torch

from vit_kernels import ops
from vit_kernels.ops.attention import LOG2E, attention_op, scales, split_qkv
from vit_kernels.ops.dropout import dropout_op, new_seed
from vit_kernels.ops.linear import linear_torch
from vit_kernels.reference import attention_probabilities

from helpers import assert_matches, randn


def assert_keep_rate(keep: torch.Tensor, p: float) -> None:
    """The kept fraction within 5 standard deviations of 1 - p (binomial)."""
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma + 1e-9, (keep.float().mean().item(), 1 - p)


@pytest.mark.parametrize("shape", [(300, 97), (2, 5, 33)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_op_keep_rate_scale_and_gradient_mask(shape, p, device):
    x = (randn(*shape, device=device) + 5.0).requires_grad_()  # never zero: a zero output means dropped
    torch.manual_seed(3)
    y = ops.dropout(x, p)
    keep = y != 0
    assert_keep_rate(keep, p)
    torch.testing.assert_close(y[keep], x[keep] / (1 - p))
    g = randn(*shape, device=device)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(keep, g / (1 - p), 0.0))


def test_dropout_op_is_deterministic_per_seed(device):
    x = randn(64, 40, device=device) + 5.0
    torch.manual_seed(0)
    a = ops.dropout(x, 0.3)
    torch.manual_seed(0)
    b = ops.dropout(x, 0.3)
    c = ops.dropout(x, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_op_edge_rates_and_eval(device):
    x = randn(8, 16, device=device)
    assert ops.dropout(x, 0.0) is x
    assert ops.dropout(x, 0.7, training=False) is x
    assert torch.equal(dropout_op(x, new_seed(), 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("p,error,match", [(-0.1, ValueError, "probability"), (1.5, ValueError, "probability"),
                                           (True, ValueError, "probability")])
def test_dropout_op_bad_rate(p, error, match):
    with pytest.raises(error, match=match):
        ops.dropout(torch.randn(3, 4), p)


def test_dropout_op_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        ops.dropout(torch.ones(3, 4, dtype=torch.int32), 0.5)


def linear_case(device, activation, deinterleave, with_scale):
    M, K, N = 37, 40, 51
    x = randn(M, K, device=device).requires_grad_()
    w = randn(N, K, device=device, scale=0.2).requires_grad_()
    b = randn(N, device=device).requires_grad_()
    s = (randn(N, device=device) + 3.0).requires_grad_() if with_scale else None
    r = randn(M, N, device=device).requires_grad_()
    return x, w, b, s, r


@pytest.mark.parametrize("activation,deinterleave,with_scale", [(None, 1, True), ("gelu", 1, False),
                                                                ("gelu_tanh", 3, True)])
def test_linear_dropout_matches_formula_under_its_mask(activation, deinterleave, with_scale, device):
    x, w, b, s, r = linear_case(device, activation, deinterleave, with_scale)
    p = 0.3
    torch.manual_seed(11)
    y = ops.linear(x, w, b, activation, s, r, deinterleave, dropout=p)
    base = linear_torch(x, w, b, activation, None, None, deinterleave)
    scaled = (y - r) if s is None else (y - r) / s
    keep = scaled.detach().abs() > 1e-6
    assert_keep_rate(keep, p)
    expected = torch.where(keep, base / (1 - p), 0.0)
    expected = r + (expected if s is None else s * expected)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    g = randn(*y.shape, device=device)
    inputs = [t for t in (x, w, b, s, r) if t is not None]
    for name, got, want in zip("xwbsr", torch.autograd.grad((y * g).sum(), inputs),
                               torch.autograd.grad((expected * g).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"d{name}")


def test_linear_dropout_zero_rate_is_the_plain_kernel(device):
    x, w, b, _, _ = linear_case(device, "gelu", 1, False)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, w, b, "gelu", dropout=0.0), linear_torch(x, w, b, "gelu"),
                                   rtol=1e-4, atol=1e-4)


def attention_keep_mask(B, H, N, D, p, seed, layout, device):
    """The kernel's keep mask [B, H, N, N]: with one-hot value rows (N <= D), output row i of a head is
    out_scale * dropout(P)[i, :N], zero exactly where a key was dropped (P itself is never 0 here)."""
    qkv = randn(B, N, 3 * H * D, device=device)
    v = split_qkv(qkv, H, layout)[2]
    v.zero_()
    v[..., torch.arange(N), torch.arange(N)] = 1.0
    torch.manual_seed(seed)
    with torch.no_grad():
        out = ops.attention(qkv, H, layout, "paper", dropout=p)
    return out.view(B, N, H, D).transpose(1, 2)[..., :N] != 0


def attention_under_mask(qkv, H, layout, scaling, mask, keep, p):
    q, k, v = split_qkv(qkv, H, layout)
    E = qkv.shape[-1] // 3
    qk_scale, out_scale = scales(scaling, E, E // H)
    att = attention_probabilities(q @ k.transpose(-1, -2) * (qk_scale / LOG2E), mask) * out_scale
    att = torch.where(keep, att / (1 - p), 0.0)
    return (att @ v).transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], E)


@pytest.mark.parametrize("layout", ["h d qkv", "qkv h d"])
@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
@pytest.mark.parametrize("N,D,masked", [(13, 16, False), (19, 24, True)])
def test_attention_dropout_matches_formula_under_its_mask(layout, scaling, N, D, masked, device):
    B, H, p = 2, 3, 0.25
    keep = attention_keep_mask(B, H, N, D, p, 5, layout, device)
    assert_keep_rate(keep, p)
    qkv = randn(B, N, 3 * H * D, device=device).requires_grad_()
    mask = torch.rand(B, 1, N, N, device=device) > 0.3 if masked else None
    torch.manual_seed(5)  # the same seed: the same mask, whatever the values
    out = ops.attention(qkv, H, layout, scaling, mask, dropout=p)
    expected = attention_under_mask(qkv, H, layout, scaling, mask, keep, p)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    g = randn(*out.shape, device=device)
    got, = torch.autograd.grad((out * g).sum(), qkv)
    want, = torch.autograd.grad((expected * g).sum(), qkv)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_dropout_masks_differ_across_heads_and_batch(device):
    keep = attention_keep_mask(2, 3, 13, 16, 0.5, 1, "qkv h d", device)
    flat = keep.reshape(6, -1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i))


def test_attention_dropout_backward_is_deterministic(device):
    qkv = randn(2, 21, 3 * 2 * 16, device=device).requires_grad_()
    seed = new_seed()
    grads = []
    for _ in range(2):
        out, _lse = attention_op(qkv, None, 2, "qkv h d", "paper", 0.2, seed)
        grads.append(torch.autograd.grad(out.square().sum(), qkv)[0])
    assert torch.equal(*grads)


def test_dropout_ops_reject_bad_rates():
    qkv = torch.randn(1, 5, 48)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        ops.attention(qkv, 2, dropout=1.2)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        ops.linear(torch.randn(3, 4), torch.randn(5, 4), dropout=-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_low_precision_dropout_within_twice_pytorch_error(dtype, device):
    """Masks do not depend on the dtype: recover them in fp32, then hold the 16-bit kernels to the 2x rule
    against the formula under the same masks (fp64 reference, PyTorch's own 16-bit result as the yardstick)."""
    B, H, N, D, p = 2, 2, 13, 16, 0.2
    keep = attention_keep_mask(B, H, N, D, p, 9, "qkv h d", device)
    qkv = randn(B, N, 3 * H * D, device=device, dtype=dtype)
    torch.manual_seed(9)
    got = ops.attention(qkv, H, "qkv h d", "paper", dropout=p)
    assert_matches(got, attention_under_mask(qkv, H, "qkv h d", "paper", None, keep, p),
                   attention_under_mask(qkv.double(), H, "qkv h d", "paper", None, keep, p))

    x, w, b = randn(37, 40, device=device, dtype=dtype), randn(51, 40, device=device, dtype=dtype, scale=0.2), \
        randn(51, device=device, dtype=dtype)
    torch.manual_seed(4)
    kept = ops.linear(x.float(), w.float(), b.float(), "gelu", dropout=p) != 0
    torch.manual_seed(4)
    got = ops.linear(x, w, b, "gelu", dropout=p)

    def formula(*t):
        return torch.where(kept, linear_torch(*t, "gelu") / (1 - p), 0.0).to(t[0].dtype)

    assert_matches(got, formula(x, w, b), formula(x.double(), w.double(), b.double()))


@pytest.mark.parametrize("with_scale", [False, True])
def test_linear_branch_scale_is_per_sample_stochastic_depth(with_scale, device):
    B, T, K, N = 3, 7, 24, 20
    x = randn(B, T, K, device=device).requires_grad_()
    w, b = randn(N, K, device=device, scale=0.2).requires_grad_(), randn(N, device=device).requires_grad_()
    s = (randn(N, device=device) + 2.0).requires_grad_() if with_scale else None
    r = randn(B, T, N, device=device).requires_grad_()
    factors = torch.tensor([2.0, 0.0, 2.0], device=device)  # drop_prob 0.5: sample 1 dropped
    got = ops.linear(x, w, b, None, s, r, branch_scale=factors)
    expected = r + factors[:, None, None] * linear_torch(x, w, b, None, s)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], r[1])  # a dropped sample is the residual alone
    g = randn(B, T, N, device=device)
    inputs = [t for t in (x, w, b, s, r) if t is not None]
    for got_grad, want in zip(torch.autograd.grad((got * g).sum(), inputs),
                              torch.autograd.grad((expected * g).sum(), inputs)):
        torch.testing.assert_close(got_grad, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factors,error,match", [
    (torch.ones(3, dtype=torch.float16), TypeError, "float32"),
    (torch.ones(4), ValueError, "one per sample"),
    ([1.0, 1.0, 1.0], TypeError, "float32"),
])
def test_linear_branch_scale_bad_input(factors, error, match):
    with pytest.raises(error, match=match):
        ops.linear(torch.randn(3, 5, 8), torch.randn(6, 8), branch_scale=factors)


def test_masks_do_not_depend_on_the_tiling(device):
    """An element's fate depends on (seed, row, column) only: two GEMM tilings give the same output."""
    import triton

    from vit_kernels.ops.linear import linear_launch

    x, w = randn(70, 40, device=device), randn(100, 40, device=device, scale=0.2)
    seed = new_seed()
    outs = [linear_launch(x, w, None, "gelu", dropout=0.4, seed=seed, config=triton.Config(meta, num_warps=4))
            for meta in (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=True),
                         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=1, SPLIT_EPILOGUE=False))]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_neighbouring_columns_are_independent(device):
    """Four columns share one Philox call (one word each): their keep decisions must be independent."""
    torch.manual_seed(2)
    keep = ops.dropout(randn(512, 256, device=device) + 5.0, 0.5) != 0
    for k in (1, 2, 3):
        agree = (keep[:, 0::4] == keep[:, k::4]).float().mean().item()
        assert abs(agree - 0.5) < 5 * (0.25 / keep[:, 0::4].numel()) ** 0.5, (k, agree)
