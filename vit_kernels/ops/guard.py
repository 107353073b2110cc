"""First-use agreement checks for kernel paths that no real GPU has run yet.

A new path (a fused variant replacing a proven composition of kernels) runs on a GPU only after its first
output there, for each problem key, agreed with the proven path's; if it disagrees, a warning names it and the
proven path serves that key from then on. Once the GPU suite has passed on a real card, the path's name goes
into ``VALIDATED_ON_GPU`` (with the card and date in benchmarks/NOTES.md) and the check stops. In the
interpreter the tests are the check, so nothing is compared there.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable

import torch

from ..tolerance import agreement_limit, max_error

# paths whose GPU tests have passed on a real card (benchmarks/NOTES.md names the round)
VALIDATED_ON_GPU: frozenset = frozenset()

_verdicts: dict = {}  # (name, key) -> True (agreed: use the new path) / False (disagreed: the proven one)
_lock = threading.Lock()


def needs_check(name: str, x: torch.Tensor) -> bool:
    return x.is_cuda and name not in VALIDATED_ON_GPU


def choose(name: str, key: Callable[[], Hashable], x: torch.Tensor, new: Callable[[float], torch.Tensor],
           proven: Callable[[float], torch.Tensor], dropout: float = 0.0) -> torch.Tensor:
    """``new(dropout)`` when it may run for the problem ``key()`` (built only when needed; x: the input whose
    device decides), else ``proven(dropout)``. On a GPU, before ``name`` is validated, the first call per key
    also runs both without dropout and without autograd and compares them. Inside torch.compile or a
    CUDA-graph capture an unchecked key takes the proven path (a comparison there would be traced or captured)."""
    if not needs_check(name, x):
        return new(dropout)
    key = key()
    verdict = _verdicts.get((name, key))
    if verdict is None:
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return proven(dropout)
        verdict = _compare(name, key, new, proven, x.dtype)
    return new(dropout) if verdict else proven(dropout)


def _compare(name, key, new, proven, dtype) -> bool:
    with torch.no_grad():
        expected = proven(0.0)
        got = new(0.0)
    error, limit = max_error(got, expected), agreement_limit(expected, dtype)
    agrees = bool(error <= limit)  # NaN disagrees
    if not agrees:
        warnings.warn(f"vit_kernels: {name} disagreed with its proven path on its first run for {key} (max error "
                      f"{error:.3g} > {limit:.3g}); using the proven path for it", RuntimeWarning, stacklevel=4)
    with _lock:
        _verdicts[(name, key)] = agrees
    return agrees


def verdicts() -> dict:
    """{(name, key): agreed} of the checks made so far in this process."""
    return dict(_verdicts)


def reset() -> None:
    _verdicts.clear()
