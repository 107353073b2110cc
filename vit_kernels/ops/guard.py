"""Run-time selection of new kernel paths: timed against the proven path, and checked until a GPU validates them.

Two granularities, one rule (a new path can make the library neither slower nor wrong):

- ``choose``: a new path that replaces a composition of ops (LayerNorm folded into the GEMM instead of
  LayerNorm + GEMM). On a GPU the first call per problem key runs both without dropout and autograd; the new
  path is kept for that key only if it agrees with the proven one (until validated, below) and the timer says
  it is faster. Off the GPU the new path runs (the interpreter tests are its check).
- ``screen``: new *configs* of one kernel (``launch.Tuned``'s ``pending`` configs, e.g. attention's tilings for
  ViT lengths). Before the autotuner first tunes a key on a GPU, each pending config runs once and is compared
  with a proven config's output; the ones that disagree are dropped with a warning, the others join the
  autotuner, which keeps the fastest config by timing.

Once the GPU suite has passed on a real card, the path's name goes into ``VALIDATED_ON_GPU`` (with the card and
date in benchmarks/NOTES.md): the comparison stops, the timing stays. Inside torch.compile tracing or a
CUDA-graph capture nothing is compared or timed: a key not decided yet takes the proven path.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable, Sequence

import torch

from ..tolerance import agreement_limit
from .dispatch import uncounted

# paths whose GPU tests have passed on a real card (benchmarks/NOTES.md names the round)
VALIDATED_ON_GPU: frozenset = frozenset()

_verdicts: dict = {}  # (name, key) -> True (the new path serves the key) / False (the proven one)
_screened: dict = {}  # (name, key) -> frozenset of the labels of the pending configs that agreed
_lock = threading.Lock()


def on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def undecidable() -> bool:
    """True while tracing for torch.compile or capturing a CUDA graph: no comparison or timing may run."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def time_ms(fn: Callable[[], object]) -> float:
    """The selector's timer: median milliseconds of ``fn()`` (tests replace it with a fake)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def choose(name: str, key: Callable[[], Hashable], x: torch.Tensor, new: Callable[[float], torch.Tensor],
           proven: Callable[[float], torch.Tensor], dropout: float = 0.0) -> torch.Tensor:
    """``new(dropout)`` or ``proven(dropout)`` for the problem ``key()`` (built only on a GPU; x: the input whose
    device decides), decided once per key as the module docstring says."""
    if not on_gpu(x):
        return new(dropout)
    key = key()
    verdict = _verdicts.get((name, key))
    if verdict is None:
        if undecidable():
            return proven(dropout)
        verdict = _select(name, key, new, proven, x.dtype)
    return new(dropout) if verdict else proven(dropout)


def _listed(outputs) -> list:
    """A path's outputs as a list: one tensor, or the tensors of a tuple (e.g. a GEMM's output and its
    statistics; None entries, outputs not asked for, left out)."""
    return [o for o in outputs if o is not None] if isinstance(outputs, tuple) else [outputs]


def _select(name, key, new, proven, dtype) -> bool:
    with torch.no_grad(), uncounted():
        wins = name in VALIDATED_ON_GPU or _agrees(name, key, _listed(new(0.0)), _listed(proven(0.0)), dtype, "path")
        wins = wins and time_ms(lambda: new(0.0)) < time_ms(lambda: proven(0.0))
    with _lock:
        _verdicts[(name, key)] = wins
    return wins


def max_error_and_limit(got: torch.Tensor, expected: torch.Tensor, dtype) -> tuple[float, float]:
    """The largest difference and the agreement limit; equal non-finite values (an empty attention row's -inf
    log-sum-exp, NaN on both sides) agree, a NaN where ``expected`` has none does not (its error is NaN)."""
    g, e = got.double(), expected.double()
    same = (g == e) | (g.isnan() & e.isnan())
    error = torch.where(same, 0.0, (g - e).abs()).max().item() if g.numel() else 0.0
    return error, agreement_limit(torch.where(e.isfinite(), e, 0.0), dtype)


def agrees(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """``got`` within the agreement limit of ``expected`` for their dtype (integers: equal)."""
    if torch.equal(got, expected):
        return True
    if not expected.dtype.is_floating_point:
        return False
    error, limit = max_error_and_limit(got, expected, expected.dtype)
    return error <= limit


def _agrees(name, key, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], dtype, what: str) -> bool:
    """Every output within the agreement limit of the proven one (``max_error_and_limit``); warns otherwise."""
    for g, e in zip(got, expected):
        error, limit = max_error_and_limit(g, e, dtype)
        if not error <= limit:  # NaN disagrees
            warnings.warn(f"vit_kernels: {name} {what} disagreed with the proven one on its first run for {key} "
                          f"(max error {error:.3g} > {limit:.3g}); using the proven one for it", RuntimeWarning,
                          stacklevel=5)
            return False
    return True


def needs_screening(name: str, key: Hashable) -> bool:
    return name not in VALIDATED_ON_GPU and (name, key) not in _screened and not undecidable()


def screen(name: str, key: Hashable, run: Callable[[object], None], outputs: Sequence[torch.Tensor], proven,
           candidates: Sequence, label: Callable[[object], str]) -> frozenset:
    """``run(config)`` launches the kernel with ``config``, writing ``outputs``. Runs ``proven`` once, then each
    candidate config, and records (and returns) the labels of the candidates whose outputs agree (no candidates:
    records that, running nothing)."""
    if not candidates:
        with _lock:
            _screened[(name, key)] = frozenset()
        return _screened[(name, key)]
    with torch.no_grad(), uncounted():
        run(proven)
        expected = [o.clone() for o in outputs]
        agreed = set()
        for config in candidates:
            run(config)
            if _agrees(name, key, outputs, expected, outputs[0].dtype, f"config {label(config)}"):
                agreed.add(label(config))
    with _lock:
        _screened[(name, key)] = frozenset(agreed)
    return _screened[(name, key)]


def screened(name: str, key: Hashable) -> frozenset:
    """The labels of the pending configs that agreed for ``key`` (empty before screening)."""
    return _screened.get((name, key), frozenset())


def verdicts() -> dict:
    """{(name, key): the new path won} of the choices made so far in this process."""
    return dict(_verdicts)


def reset() -> None:
    _verdicts.clear()
    _screened.clear()
