"""How close is close enough: the one error measure and bound the tests, ``verify`` and the benchmarks use.

The FlashAttention rule: in fp16/bf16 our result may be off the high-precision reference by at most twice
PyTorch's own low-precision error, plus a small floor; in fp32 (or fp64) by a relative ``fp32_rtol``.
"""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| computed in double precision; 0.0 for empty tensors (NaN if either holds a NaN)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def agreement_limit(baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """How far a benchmark candidate may be from its baseline before its timing is refused: 1e-3 (fp32) or
    5e-2 (16-bit) of max(1, |baseline|.max). A sanity check on what is timed, not an accuracy bound."""
    return (1e-3 if dtype == torch.float32 else 5e-2) * max(1.0, baseline.float().abs().max().item())


def error_bound(ours_dtype: torch.dtype, torch_lowp: torch.Tensor | None, reference: torch.Tensor,
                fp32_rtol: float = 1e-4, floor: float = 1e-5) -> float:
    """The largest acceptable ``max_error(ours, reference)`` for a result computed in ``ours_dtype``.

    fp16/bf16: ``2 * max_error(torch_lowp, reference) + floor``, where ``torch_lowp`` is PyTorch's result at
    that precision and ``reference`` is computed in fp32/fp64. Otherwise ``fp32_rtol * max(1, |reference|.max)``
    (``torch_lowp`` is not used and may be None).
    """
    if ours_dtype in LOW_PRECISION:
        return 2 * max_error(torch_lowp, reference) + floor
    return fp32_rtol * max(1.0, reference.abs().max().item() if reference.numel() else 0.0)
