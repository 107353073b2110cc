"""Shared assertions and case grids for the op and model tests."""
import pytest
import torch

from vit_kernels.ops.registry import randn  # noqa: F401  (re-exported: the tests' random inputs)
from vit_kernels.tolerance import error_bound
from vit_kernels.tolerance import max_error as max_err

# bf16 is only meaningful on a GPU: the interpreter's bf16 arithmetic is wrong
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def assert_matches(ours: torch.Tensor, torch_lowp, ref: torch.Tensor, *, fp32_tol: float = 1e-4,
                   floor: float = 1e-5, name: str = "output") -> None:
    """The FlashAttention rule: in fp16/bf16, |ours - ref| <= 2 |torch_lowp - ref| + floor, where ref is
    computed in fp32/fp64 and torch_lowp is PyTorch's own low-precision result. fp32: relative fp32_tol."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, ref)
    bound = error_bound(ours.dtype, torch_lowp, ref, fp32_rtol=fp32_tol, floor=floor)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"


