"""The one dispatch path of every op: backend choice, then a direct launch or the torch.library op.

Backend rule: a CUDA tensor, or a CPU tensor when ``TRITON_INTERPRET=1`` was set before this package was
imported, runs the Triton kernels; otherwise the op computes the same function with PyTorch (its own
``<op>_torch`` fallback). ``use_backend`` pins the choice and ``launch_counts`` tells which kernels ran, so
tests can prove it.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable

import torch

# @triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when vit_kernels.ops is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
_launches: collections.Counter = collections.Counter()


@contextlib.contextmanager
def use_backend(name: str):
    """Pin the backend inside a ``with`` block: ``"triton"``, ``"torch"`` or ``"auto"`` (the default)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


class Flag:
    """A process-wide on/off setting (``.on``) that ``flag.set(bool)`` changes inside a ``with`` block."""

    def __init__(self, name: str, on: bool):
        self.name, self.on = name, on

    @contextlib.contextmanager
    def set(self, on: bool):
        if not isinstance(on, bool):
            raise TypeError(f"{self.name} takes a bool, got {type(on).__name__}")
        previous, self.on = self.on, on
        try:
            yield
        finally:
            self.on = previous


def kernels_available(t: torch.Tensor) -> bool:
    """CUDA tensors; CPU tensors in the interpreter. Never meta tensors: their PyTorch path propagates shapes."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def use_kernels(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels should run on these tensors under the current backend setting."""
    present = [t for t in tensors if t is not None]
    available = all(kernels_available(t) for t in present)
    if _backend == "torch":
        return False
    if _backend == "triton" and not available:
        raise RuntimeError("backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 set before importing "
                           "vit_kernels; got tensors on " + ", ".join(sorted({str(t.device) for t in present})))
    return available


def backend_for(t: torch.Tensor) -> str:
    """Which backend an op would use for ``t`` right now: ``"triton"`` or ``"torch"``."""
    return "triton" if use_kernels(t) else "torch"


def dispatcher_free(*tensors) -> bool:
    """True when an op may call its launcher directly: no autograd graph to record and not inside
    torch.compile. Inference then skips the torch.library dispatch, a few microseconds of host time per call
    that matter because small batches are launch-bound (benchmarks/NOTES.md, item 4)."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def dispatch(on: tuple, fallback: Callable[[], torch.Tensor], custom_op, launch, kernel_args: Callable[[], tuple],
             finish: Callable | None = None):
    """Run one op call.

    on: the tensors whose devices choose the backend; fallback(): the PyTorch math; kernel_args(): the
    custom op's arguments (built only when the kernels run: masks are prepared, seeds drawn there). With
    nothing for autograd to record and outside torch.compile, ``launch`` runs directly; otherwise
    ``custom_op`` (the torch.library op: autograd, fake tensors, no graph break). finish(output) shapes the
    kernel path's output like the fallback's (e.g. drops saved statistics, restores leading dims)."""
    if not use_kernels(*on):
        return fallback()
    args = kernel_args()
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out = (launch if dispatcher_free(*tensors) else custom_op)(*args)
    return out if finish is None else finish(out)


_uncounted = threading.local()


def record_launch(name: str) -> None:
    if not getattr(_uncounted, "on", False):
        _launches[name] += 1


@contextlib.contextmanager
def uncounted():
    """Launches made to choose a path (guard.py's comparisons and timings) are not the op's: not counted."""
    before = getattr(_uncounted, "on", False)
    _uncounted.on = True
    try:
        yield
    finally:
        _uncounted.on = before


def launch_counts() -> dict:
    """Kernel launches per kernel since the last ``reset_launch_counts()``."""
    return dict(_launches)


def reset_launch_counts() -> None:
    _launches.clear()
