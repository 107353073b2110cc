"""The fused gradient epilogue of ops.linear's backward (``_linear_grad_kernel``): one pass from the output
gradient to the pre-activation's, the bias and layer-scale gradients, against the PyTorch composition it
replaces (``grad_epilogue_torch``), on random inputs of odd shapes, for every activation, dropout, stochastic
depth, layer scale and the tutorial's de-interleaved qkv; and its choice in linear_backward."""
import importlib

import pytest
import torch

from vit_kernels import ops
from vit_kernels.ops import guard

from helpers import DTYPES

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
