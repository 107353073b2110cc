"""Gradients through the fused kernels against PyTorch fp64, op by op and through whole models."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.configs import timm_kwargs, tutorial_kwargs
from vit_kernels.ops.attention import attention_torch
from vit_kernels.ops.linear import linear_torch
from vit_kernels.ops.patch_embed import patch_embed_torch

from helpers import DTYPES, assert_matches, randn


def grads(fn, inputs, grad_out):
    """Gradients of sum(fn(*inputs) * grad_out) for the tensors in inputs that are not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad_out)
    return [None if t is None else t.grad for t in leaves]


def check_grads(ours_fn, torch_fn, inputs, dtype):
    out = ours_fn(*inputs)
    g = randn(*out.shape, dtype=dtype, device=out.device)
    ours = grads(ours_fn, inputs, g)
    expected = grads(torch_fn, [None if t is None else t.double() for t in inputs], g.double())
    lowp = grads(torch_fn, inputs, g)
    for i, (o, e, lp) in enumerate(zip(ours, expected, lowp)):
        if o is not None:
            assert o.dtype == inputs[i].dtype
            assert_matches(o, lp, e, fp32_tol=2e-4, name=f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 48, 50, 1000])
def test_layer_norm(width, dtype, device):
    x = randn(37, width, dtype=dtype, device=device, scale=2.0) + 1
    w, b = randn(width, dtype=dtype, device=device), randn(width, dtype=dtype, device=device)
    check_grads(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5),
                lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), [x, w, b], dtype)


def test_layer_norm_weight_gradients_are_deterministic(device):
    x, w = randn(300, 72, device=device), randn(72, device=device)
    g = randn(300, 72, device=device)
    first = grads(lambda x, w: ops.layer_norm(x, w, None), [x, w], g)
    second = grads(lambda x, w: ops.layer_norm(x, w, None), [x, w], g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("deinterleave", [1, 3])
def test_linear(activation, deinterleave, dtype, device):
    m, n, k = 37, 72, 50
    x, w = randn(m, k, dtype=dtype, device=device), randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    b, s, r = randn(n, dtype=dtype, device=device), randn(n, dtype=dtype, device=device), randn(m, n, dtype=dtype,
                                                                                               device=device)
    check_grads(lambda *t: ops.linear(*t[:3], activation, t[3], t[4], deinterleave),
                lambda *t: linear_torch(*t[:3], activation, t[3], t[4], deinterleave), [x, w, b, s, r], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["h d qkv", "qkv h d"])
@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
@pytest.mark.parametrize("shape", [(2, 26, 2, 16), (2, 65, 3, 24), (1, 37, 1, 80), (2, 197, 2, 64)])
def test_attention(shape, scaling, layout, dtype, device):
    B, N, H, D = shape
    qkv = randn(B, N, 3 * H * D, dtype=dtype, device=device)
    check_grads(lambda q: ops.attention(q, H, layout, scaling), lambda q: attention_torch(q, H, layout, scaling),
                [qkv], dtype)


@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
def test_attention_with_mask_and_empty_rows(scaling, device):
    qkv = randn(2, 26, 3 * 2 * 24, device=device)
    mask = torch.rand(2, 1, 26, 26, device=device) > 0.4
    mask[0, 0, 5] = False  # nothing to attend to: zero output, zero gradient, no NaN
    check_grads(lambda q: ops.attention(q, 2, "qkv h d", scaling, mask),
                lambda q: attention_torch(q, 2, "qkv h d", scaling, mask), [qkv], torch.float32)


def test_attention_gradients_are_deterministic(device):
    qkv, g = randn(2, 65, 3 * 48, device=device), randn(2, 65, 48, device=device)
    first = grads(lambda q: ops.attention(q, 2, "qkv h d", "paper"), [qkv], g)[0]
    second = grads(lambda q: ops.attention(q, 2, "qkv h d", "paper"), [qkv], g)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("prefix,on_prefix", [(1, True), (3, False), (0, True)])
def test_patch_embed(prefix, on_prefix, device):
    img, w = randn(2, 3, 36, 24, device=device), randn(20, 3, 8, 8, device=device, scale=0.1)
    bias, pre = randn(20, device=device), randn(prefix, 20, device=device)
    pos = randn(12 + (prefix if on_prefix else 0), 20, device=device)
    check_grads(lambda *t: ops.patch_embed(*t, on_prefix), lambda *t: patch_embed_torch(*t, on_prefix),
                [img, w, bias, pre, pos], torch.float32)


@pytest.mark.parametrize("pool,start,norm", [("mean", 0, True), ("mean", 1, False), ("token", 0, True)])
def test_pool_norm(pool, start, norm, device):
    def torch_pool(x, w, b):
        pooled = x[:, start:].mean(1) if pool == "mean" else x[:, start]
        return F.layer_norm(pooled, pooled.shape[-1:], w, b, 1e-5) if norm else pooled

    x, w, b = randn(3, 26, 40, device=device), randn(40, device=device), randn(40, device=device)
    check_grads(lambda x, w, b: ops.pool_tokens(x, pool, start, w, b, 1e-5, norm), torch_pool, [x, w, b],
                torch.float32)


# --- whole models ------------------------------------------------------------------------------------------
ODD = tutorial_kwargs("tiny")  # 37 tokens, head_dim 24


def assert_model_grads_match(fast, ref, x, *args):
    """``fast`` (fused) and ``ref`` (fp64, the framework's own forward) are two models with the same weights."""
    assert fast is not ref
    g = None
    for model in (fast, ref):
        model.zero_grad()
        ops.reset_launch_counts()
        out = model(x if model is fast else x.double(), *args)
        g = randn(*out.shape, device=out.device) if g is None else g
        out.backward(g.to(out.dtype))
        if model is fast:
            launched = ops.launch_counts()
    if ops.backend_for(x) == "triton":  # forward and backward kernels ran
        assert {"patch_embed", "layer_norm_linear", "linear", "attention"} <= set(launched), launched
    else:
        assert not launched
    ours, theirs = dict(fast.named_parameters()), dict(ref.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        scale = max(1.0, theirs[name].grad.abs().max().item())
        err = (p.grad.double() - theirs[name].grad).abs().max().item()
        assert err <= 2e-4 * scale, f"grad of {name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.slow  # tests/test_convergence.py trains the tutorial ViT against the reference in the fast tier
@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
@pytest.mark.parametrize("masked", [False, True])
def test_tutorial_vit_gradients(scaling, masked, device):
    ref = R.ViT(**ODD, scaling=scaling).to(device).double()
    fast = vit_kernels.ViT(**ODD, scaling=scaling).to(device)
    fast.load_state_dict(ref.state_dict())
    mask = torch.rand(2, 1, 37, 37, device=device) > 0.3 if masked else None
    assert_model_grads_match(fast, ref, randn(2, 3, 48, 48, device=device), *(() if mask is None else (mask,)))


@pytest.mark.parametrize("kw", [dict(global_pool="token"), dict(global_pool="avg", reg_tokens=1, init_values=0.1)])
def test_timm_gradients(kw, device):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_kwargs("tiny_timm"), **kw).to(device)
    ref = copy.deepcopy(model).double()  # timm's own forward: from_timm patches `model` in place
    assert_model_grads_match(vit_kernels.from_timm(model), ref, randn(2, 3, 32, 32, device=device))


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_model_gradients_are_bitwise_reproducible(device):
    """Two backward passes with the same inputs give identical parameter gradients (no atomics anywhere)."""
    model = vit_kernels.ViT(**ODD).to(device)
    x = randn(2, 3, 48, 48, device=device)
    runs = []
    for _ in range(2):
        model.zero_grad()
        model(x).square().mean().backward()
        runs.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
