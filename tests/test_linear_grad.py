"""The fused gradient epilogue of ops.linear's backward (``_linear_grad_kernel``): one pass from the output
gradient to the pre-activation's, the bias and layer-scale gradients, against the PyTorch composition it
replaces (``grad_epilogue_torch``), on random inputs of odd shapes, for every activation, dropout, stochastic
depth, layer scale and the tutorial's de-interleaved qkv; and its choice in linear_backward."""
import importlib

import pytest
import torch

from vit_kernels import ops
from vit_kernels.ops import guard

from helpers import DTYPES, assert_matches

L = importlib.import_module("vit_kernels.ops.linear")
ACTIVATIONS = [None, "gelu", "gelu_tanh", "quick_gelu", "silu"]


def inputs(M, N, dtype, device, samples=None, scale=True):
    g = torch.Generator().manual_seed(M * 1000 + N)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    branch = None
    if samples:  # stochastic depth: a factor per sample, 0 or 1 / keep
        branch = (torch.rand(samples, generator=g) > 0.3).float().to(device) / 0.7
    return r(M, N), 3 * r(M, N), r(N) if scale else None, branch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M, N, dropout, samples, deinterleave", [
    (37, 20, 0.0, None, 1), (65, 36, 0.3, 5, 1), (9, 12, 0.5, 3, 3), (1, 4, 0.0, None, 1)])
def test_fused_gradient_epilogue_equals_pytorch(device, dtype, activation, M, N, dropout, samples, deinterleave):
    dy, pre, scale, branch = inputs(M, N, dtype, device, samples)
    seed = torch.tensor([1234])
    for needs_dscale, needs_dbias in ((True, True), (False, True), (True, False), (False, False)):
        args = (dy, pre, scale, branch, seed, activation, deinterleave, needs_dscale, needs_dbias, dtype, dropout)
        got, expected = L.grad_epilogue_launch(*args), L.grad_epilogue_torch(*args)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        assert got[0].dtype == dtype and got[0].shape == (M, N)
        torch.testing.assert_close(got[0], expected[0], **tol)
        for g, e in zip(got[1:], expected[1:]):
            assert (g is None) == (e is None)
            if e is not None:  # fp32 sums of fp32 terms: tight
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * M)


def test_without_scale_or_pre_activation(device):
    dy, _, _, _ = inputs(19, 8, torch.float32, device, scale=False)
    g, dbias, dscale = L.grad_epilogue_launch(dy, None, None, None, None, None, 1, False, True, torch.float16, 0.0)
    torch.testing.assert_close(g, dy.half(), rtol=0, atol=0)
    torch.testing.assert_close(dbias, dy.sum(0), rtol=1e-5, atol=1e-5)
    assert dscale is None


def test_empty_rows(device):
    dy, pre, scale, _ = inputs(0, 8, torch.float32, device)
    g, dbias, dscale = L.grad_epilogue_launch(dy, pre, scale, None, None, "gelu", 1, True, True, torch.float32, 0.0)
    assert g.shape == (0, 8) and not dbias.any() and not dscale.any() and dbias.shape == dscale.shape == (8,)


def test_backward_uses_the_fused_epilogue_and_matches_pytorch(device, monkeypatch):
    """Gradients of ops.linear with every epilogue equal PyTorch's; the fused pass ran (its launches counted)."""
    torch.manual_seed(0)
    x = torch.randn(2, 13, 12, device=device, requires_grad=True)
    w, b, scale = (torch.randn(*s, device=device, requires_grad=True) for s in ((20, 12), (20,), (20,)))
    residual = torch.randn(2, 13, 20, device=device, requires_grad=True)
    ops.reset_launch_counts()
    y = ops.linear(x, w, b, activation="gelu_tanh", scale=scale, residual=residual)
    (y * torch.linspace(-1, 1, 20, device=device)).sum().backward()
    assert ops.launch_counts().get("linear_grad") == 1
    got = [t.grad.clone() for t in (x, w, b, scale, residual)]
    for t in (x, w, b, scale, residual):
        t.grad = None
    ref = torch.nn.functional.gelu(x @ w.t() + b, approximate="tanh") * scale + residual
    (ref * torch.linspace(-1, 1, 20, device=device)).sum().backward()
    for g, t in zip(got, (x, w, b, scale, residual)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


def layer_scale_model(x, weights, biases, scale, residual, deinterleave, keep=None):
    """y = residual + scale * (keep * (x W^T + b)) in x's dtype, PyTorch ops only (keep: the dropout and
    stochastic-depth factors, applied as a tensor)."""
    h = x @ torch.cat(weights).t()
    if biases is not None:
        h = h + torch.cat(biases)
    if deinterleave > 1:
        h = h.unflatten(-1, (-1, deinterleave)).transpose(-1, -2).flatten(-2)
    return residual + scale * (h if keep is None else h * keep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, bias, deinterleave, tiny", [
    ((21,), True, 1, True), ((21,), True, 3, False), ((21,), False, 3, False), ((7, 5, 9), True, 1, False),
    ((9, 9), False, 1, False)])
def test_layer_scale_gradient_needs_no_recomputed_gemm(device, dtype, rows, bias, deinterleave, tiny):
    """proj / fc2 with a trainable layer scale: every gradient against fp64 (fp16/bf16: within 2x PyTorch's own
    error), and backward launches no GEMM of ours (the scale's gradient comes from dW's GEMM, not a recompute).
    tiny: a layer scale as DINOv2 / CaiT initialize it (1e-5), ViT-sized weights and a loss-scaled dy (x 1024),
    where scale * W would underflow fp16."""
    blocks = len(rows)
    torch.manual_seed(blocks * 10 + deinterleave)
    x = torch.randn(2, 13, 12, device=device, dtype=dtype, requires_grad=True)
    w_std = 0.02 if tiny else 0.3
    ws = [(w_std * torch.randn(n, 12, device=device, dtype=dtype)).requires_grad_() for n in rows]
    bs = [torch.randn(n, device=device, dtype=dtype, requires_grad=True) for n in rows] if bias else None
    n = sum(rows)
    scale = ((1e-5 if tiny else 1.0) * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
    residual = torch.randn(2, 13, n, device=device, dtype=dtype, requires_grad=True)
    dy = (1024.0 if tiny else 1.0) * torch.randn(2, 13, n, device=device, dtype=dtype)
    leaves = [x, *ws, *(bs or []), scale, residual]
    y = ops.linear(x, ws if blocks > 1 else ws[0], (bs if blocks > 1 else bs[0]) if bias else None, scale=scale,
                   residual=residual, deinterleave=deinterleave)
    ops.reset_launch_counts()
    ours = torch.autograd.grad(y, leaves, dy)
    # the epilogue pass where there is something to apply (de-interleave); the GEMMs are cuBLAS
    assert ops.launch_counts() == ({"linear_grad": 1} if deinterleave > 1 else {})

    def grads(cast):
        ts = [t.detach().to(cast).requires_grad_() for t in leaves]
        wb = ts[1:1 + blocks], (ts[1 + blocks:1 + 2 * blocks] if bias else None)
        out = layer_scale_model(ts[0], *wb, ts[-2], ts[-1], deinterleave)
        return torch.autograd.grad(out, ts, dy.to(cast))

    reference, lowp = grads(torch.float64), grads(dtype)
    for name, o, r, lo in zip(["x", *(f"w{i}" for i in range(blocks)), *(f"b{i}" for i in range(len(bs or []))),
                               "scale", "residual"], ours, reference, lowp):
        assert o.dtype == dtype
        assert_matches(o, lo, r, name=name)


def test_layer_scale_gradient_with_dropout_and_stochastic_depth(device):
    """The same, with the mask regenerated from the seed and each sample's stochastic-depth factor: the reference
    reads both off the forward's output (fp32: a dropped element is exactly the residual)."""
    torch.manual_seed(3)
    x = torch.randn(3, 7, 16, device=device, requires_grad=True)
    w = (0.3 * torch.randn(20, 16, device=device)).requires_grad_()
    b, scale = (torch.randn(20, device=device, requires_grad=True) for _ in range(2))
    residual = torch.randn(3, 7, 20, device=device, requires_grad=True)
    branch = torch.tensor([1 / 0.7, 0.0, 1 / 0.7], device=device)
    y = ops.linear(x, w, b, scale=scale, residual=residual, dropout=0.25, branch_scale=branch)
    keep = (y != residual).float() / 0.75 * branch[:, None, None]
    assert 0 < (keep == 0).float().mean() < 1
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w, b, scale, residual), dy)
    expected = torch.autograd.grad(layer_scale_model(x, [w], [b], scale, residual, 1, keep.detach()),
                                   (x, w, b, scale, residual), dy)
    for o, e in zip(ours, expected):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)


def test_swiglu_keeps_the_pytorch_epilogue(device):
    x = torch.randn(7, 8, device=device, requires_grad=True)
    gate, up = (torch.randn(6, 8, device=device, requires_grad=True) for _ in range(2))
    ops.reset_launch_counts()
    ops.linear(x, (gate, up), activation="swiglu").sum().backward()
    assert "linear_grad" not in ops.launch_counts()
    expected = torch.autograd.grad((torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())).sum(), (x, gate, up))
    for t, e in zip((x, gate, up), expected):
        torch.testing.assert_close(t.grad, e, rtol=1e-4, atol=1e-5)


def test_guard_compares_tuples_with_missing_outputs():
    """guard.choose's comparison of the two epilogues skips the gradients not asked for (None)."""
    listed = guard._listed((torch.ones(2), None, torch.zeros(1)))
    assert len(listed) == 2 and listed[0].shape == (2,) and listed[1].shape == (1,)


def saved_shapes(fn):
    """Shapes of the tensors autograd saves while ``fn()`` runs (through save_for_backward's hooks: what
    activation checkpointing and offloading see)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, dropout, deinterleave", [
    ("gelu", 0.0, 1), ("gelu_tanh", 0.3, 1), ("quick_gelu", 0.0, 3), ("silu", 0.2, 1)])
def test_fc1_saves_its_pre_activation(device, dtype, activation, dropout, deinterleave):
    """With an activation, forward stores the pre-activation for backward (one more saved [M, N] tensor) and
    backward launches no GEMM of ours; ``save_pre_activations(False)`` recomputes it. Gradients agree with each
    other and with fp64 (fp16/bf16: within 2x PyTorch's own error)."""
    torch.manual_seed(7)
    x = torch.randn(3, 11, 16, device=device, dtype=dtype, requires_grad=True)
    w = (0.25 * torch.randn(24, 16, device=device, dtype=dtype)).requires_grad_()
    b = torch.randn(24, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 11, 24, device=device, dtype=dtype)
    grads, saved, backward_launches = {}, {}, {}
    for save in (True, False):
        with L.save_pre_activations(save):
            torch.manual_seed(1)  # the same dropout seed both times
            y, saved[save] = saved_shapes(lambda: ops.linear(x, w, b, activation=activation, dropout=dropout,
                                                             deinterleave=deinterleave))
        ops.reset_launch_counts()
        grads[save] = torch.autograd.grad(y, (x, w, b), dy)
        backward_launches[save] = ops.launch_counts()
    assert backward_launches[True] == {"linear_grad": 1}
    assert backward_launches[False] == {"linear": 1, "linear_grad": 1}
    assert sorted(saved[True]) == sorted([*saved[False], (3, 11, 24)])  # shaped like the output
    for a, r in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5) if dtype == torch.float32 else \
            torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
    if dropout == 0.0:
        def ref(cast):
            ts = [t.detach().to(cast).requires_grad_() for t in (x, w, b)]
            h = ts[0] @ ts[1].t() + ts[2]
            if deinterleave > 1:
                h = h.unflatten(-1, (-1, deinterleave)).transpose(-1, -2).flatten(-2)
            return torch.autograd.grad(L.activate(h, activation), ts, dy.to(cast))
        for name, o, r, lo in zip("xwb", grads[True], ref(torch.float64), ref(dtype)):
            assert_matches(o, lo, r, name=name)


def test_folded_layer_norm_fc1_saves_its_pre_activation(device):
    """ops.layer_norm_linear (timm's norm2 + fc1): the same, its backward recomputing only the LayerNorm."""
    torch.manual_seed(2)
    x = (2 * torch.randn(2, 9, 20, device=device) + 1).requires_grad_()
    nw, nb, b = (torch.randn(n, device=device, requires_grad=True) for n in (20, 20, 36))
    w = (0.2 * torch.randn(36, 20, device=device)).requires_grad_()
    dy = torch.randn(2, 9, 36, device=device)
    leaves = (x, nw, nb, w, b)
    results = {}
    for save in (True, False):
        with L.save_pre_activations(save):
            torch.manual_seed(1)  # the same dropout seed both times
            y, shapes = saved_shapes(lambda: ops.layer_norm_linear(x, nw, nb, w, b, activation="gelu", dropout=0.1))
        ops.reset_launch_counts()
        results[save] = torch.autograd.grad(y, leaves, dy), ops.launch_counts(), shapes
    assert "linear" not in results[True][1] and "layer_norm_linear" not in results[True][1]
    assert results[False][1].get("linear") == 1
    assert sorted(results[True][2]) == sorted([*results[False][2], (2, 9, 36)])
    for a, r in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_saved_pre_activation_under_activation_checkpointing(device):
    """Non-reentrant checkpointing discards what forward saved (the pre-activation included) and reruns it."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(4)
    x = torch.randn(2, 7, 12, device=device, requires_grad=True)
    nw, nb = torch.randn(12, device=device), torch.randn(12, device=device)
    w, b = (0.3 * torch.randn(30, 12, device=device)).requires_grad_(), torch.randn(30, device=device)

    def block(x):
        return ops.layer_norm_linear(x, nw, nb, w, b, activation="gelu_tanh")

    dy = torch.randn(2, 7, 30, device=device)
    plain = torch.autograd.grad(block(x), (x, w), dy)
    assert (2, 7, 30) in saved_shapes(lambda: block(x))[1]  # the pre-activation, without checkpointing
    _, shapes = saved_shapes(lambda: checkpoint(block, x, use_reentrant=False))
    assert (2, 7, 30) not in shapes  # only the checkpoint's inputs are kept
    checkpointed = torch.autograd.grad(checkpoint(block, x, use_reentrant=False), (x, w), dy)
    for a, r in zip(checkpointed, plain):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_pre_activation_not_saved_for_swiglu_or_without_gradients(device):
    x = torch.randn(5, 8, device=device, requires_grad=True)
    gate, up = torch.randn(6, 8, device=device), torch.randn(6, 8, device=device)
    _, shapes = saved_shapes(lambda: ops.linear(x, (gate, up), activation="swiglu"))
    assert (5, 6) not in shapes and (5, 12) not in shapes
    with torch.no_grad():
        assert not L.saves_pre("gelu", (x,))
    assert L.saves_pre("gelu", (x,)) and not L.saves_pre(None, (x,)) and not L.saves_pre("swiglu", (x,))
    assert not L.saves_pre("gelu", (x.detach(),))


def test_save_pre_activations_checks_its_argument():
    with pytest.raises(TypeError, match="bool"), L.save_pre_activations("no"):
        pass
    with pytest.raises(ValueError, match="pre_out"):
        L.gemm_launch(L.LINEAR_GLU, torch.randn(4, 8), [torch.randn(6, 8)] * 2, None, "swiglu", None, None, 1, 0.0,
                      None, None, pre_out=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_mm_fp32_returns_an_unrounded_fp32_product(device, dtype):
    """The layer-scale gradient's P = u^T x: fp32 out of 16-bit inputs (cuBLAS's out_dtype on a GPU), equal to
    the fp32 product of the same values, beyond fp16's range too."""
    a = (300 * torch.randn(40, 64)).to(device, dtype)
    b = (300 * torch.randn(64, 24)).to(device, dtype)
    got = L.mm_fp32(a, b)
    assert got.dtype == torch.float32 and got.shape == (40, 24)
    assert got.abs().max() > 65504 or dtype != torch.float16  # would overflow an fp16 result
    torch.testing.assert_close(got, a.double().mm(b.double()).float(), rtol=1e-4, atol=1e-2)
