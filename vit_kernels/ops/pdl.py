"""Programmatic dependent launch (PDL, sm_90+) for the GEMMs inside the graph runner's captures (issue 24).

A kernel launched with PDL (``launch_pdl=True``) may be scheduled while the kernel before it on the stream is
still running; its programs block in ``griddepcontrol.wait`` until that kernel has finished and its writes are
visible. ``_linear_kernel`` with ``PDL=1`` waits before it reads or writes anything, so it is correct after
any kernel, ours or not (the caching allocator may hand it memory the previous kernel still reads: nothing
is written before the wait either). ``PDL=2`` first asks L2 for the weight rows of its first tile: a
prefetch returns nothing to registers, so it cannot see a stale value. The pointer engine also signals
``griddepcontrol.launch_dependents`` after its K loop, so the next GEMM's programs can start on free SMs
during its epilogue. What it saves: the launch gap and prologue of each GEMM inside a CUDA graph, and some of
its weight fetch — worth most where a forward is a chain of short kernels (small batches).

PDL is on only inside ``launches()``, which the graph runner (``models/graphs.py``) uses to capture a second
graph of the same forward: until "pdl" is in ``guard.VALIDATED_ON_GPU`` the PDL graph's outputs must equal the
plain graph's bit for bit (PDL changes no arithmetic), and it is kept only where its replay is faster by more
than timing noise (``graphs.PDL_MARGIN``). ``VIT_KERNELS_PDL=0`` turns it off.
sm_80 has no ``griddepcontrol``: PDL is never used below sm_90, nor in the interpreter.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton.language as tl

from .dispatch import INTERPRET
from .launch import PDL_MIN_ARCH

ENABLED = os.environ.get("VIT_KERNELS_PDL", "1") != "0"
NAME = "pdl"  # its name in guard.VALIDATED_ON_GPU
_state = threading.local()  # a capture runs on one thread: PDL on for its launches only


def available(device: torch.device) -> bool:
    """Whether GEMMs on ``device`` can be launched with PDL: a CUDA device of sm_90 or newer, a triton with
    ``gdc_wait`` (3.6 and 3.8 both have it), not the interpreter, not turned off."""
    if not ENABLED or INTERPRET or device.type != "cuda" or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor >= PDL_MIN_ARCH


def enabled() -> bool:
    """True inside ``launches()`` on this thread."""
    return getattr(_state, "on", False)


@contextlib.contextmanager
def launches(on: bool = True):
    """GEMMs launched in this block (on this thread) use PDL where ``available`` (``on=False``: they do not,
    whatever an enclosing block says)."""
    previous = enabled()
    _state.on = on
    try:
        yield
    finally:
        _state.on = previous


def gemm_options(x: torch.Tensor, prefetch: bool) -> dict:
    """The extra launch arguments of a GEMM on x's device: none, or ``PDL`` (2 with the weight prefetch, which
    serves one weight block: ``prefetch``) and Triton's ``launch_pdl``."""
    if not enabled() or not available(x.device):
        return {}
    return {"PDL": 2 if prefetch else 1, "launch_pdl": True}
