"""Direct relaunch of a compiled kernel: a launch of a problem seen before skips Triton's own launch path.

``Autotuner.run`` and ``JITFunction.run`` spend tens of microseconds per launch binding arguments, building
specialization keys and looking up caches (benchmarks/NOTES.md, item 4). After the first launch of a problem,
``LaunchCache`` keeps the ``CompiledKernel`` that served it (with the autotuner's config) under a key that holds
everything Triton specializes on — each int argument's value (Triton's ``== 1`` and ``% 16`` specializations
and the i32/i64 choice are functions of it), each tensor's dtype and 16-byte alignment, the types of floats,
bools and ``None``, every keyword (constexprs, warps, stages) by value, and the CUDA device — and launches it
with ``CompiledKernel.run`` (one call, the same positional protocol in triton 3.6 and 3.8: grid, stream,
function, metadata, hooks, then every parameter in declaration order; constexpr slots are ignored).

Until a GPU round validates "fast_launch" (``guard.VALIDATED_ON_GPU``), the first direct launch of each key is
compared with Triton's own launch of it on the same inputs (every tensor argument afterwards); a disagreement
drops the key to Triton's path with a ``RuntimeWarning``. Profiler launch hooks, a config ``pre_hook``, a
runtime value passed by keyword, or ``VIT_KERNELS_FAST_LAUNCH=0`` keep Triton's path.
"""
from __future__ import annotations

import inspect
import os
import threading
import warnings

import torch
import triton
from triton import knobs

from . import guard
from .dispatch import INTERPRET

NAME = "fast_launch"
# off in Triton's interpreter (nothing compiled to relaunch) and with VIT_KERNELS_FAST_LAUNCH=0
ENABLED = os.environ.get("VIT_KERNELS_FAST_LAUNCH", "1") != "0" and not INTERPRET
MAX_ENTRIES = 4096  # per kernel: problems of ever-changing sizes stop being cached rather than grow without end
OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl"})  # launch options, not params
_REFUSED = object()  # a key that disagreed once: Triton's path from then on
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter


def _raw_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _current_device() -> int:
    return torch.cuda.current_device()


_recording = threading.local()


def recorder():
    """The launch plan being recorded on this thread (``plans.py``), or None."""
    return getattr(_recording, "active", None)


def descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for device-side TMA descriptors (triton.set_allocator)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


try:  # Triton keeps its allocator in a ContextVar (per thread); resolved once here, read on every TMA launch
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator as _current_allocator
except ImportError:  # another layout of Triton's internals: always install ours
    _NullAllocator = _current_allocator = None


def use_descriptor_scratch() -> None:
    """Install descriptor_scratch as Triton's allocator in this thread unless one is set there (the TMA engine's
    launches need it; a direct launch of a kernel with global scratch calls it too: it may run on another
    thread than the launch that compiled it)."""
    if _current_allocator is None or isinstance(_current_allocator.get(), _NullAllocator):
        triton.set_allocator(descriptor_scratch)


def _hooks_active() -> bool:
    """A profiler's launch hooks (triton.knobs.runtime, HookChains in 3.6 and 3.8) need Triton's path."""
    runtime = knobs.runtime
    return bool(getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


def _int_type(value: int) -> str:
    return "i32" if -2**31 <= value < 2**31 else "u64" if value >= 2**63 else "i64"


class LaunchCache:
    """The compiled kernels of one ``@triton.jit`` function, by problem key."""

    def __init__(self, name: str, fn, jit=None):
        self.name = name
        parameters = list(inspect.signature(fn).parameters.values())
        self.param_names = [p.name for p in parameters]
        self.constexpr = frozenset(p.name for p in parameters if "constexpr" in str(p.annotation))
        # ints Triton does not specialize on their value (do_not_specialize, e.g. a dropout seed): keyed by the
        # integer type Triton picks for them (i32 / i64 / u64), not by value, so a new seed is not a new problem
        unspecialized = {p.name for p in getattr(jit, "params", ()) if getattr(p, "do_not_specialize", False)}
        self.unspecialized = frozenset(i for i, name in enumerate(self.param_names) if name in unspecialized)
        self.entries: dict = {}
        self.lock = threading.RLock()  # held around a Triton launch and the read of its config (re-entered: screening)

    def prepare(self, args: tuple, kwargs: dict):
        """(key, the launcher's arguments for ``args``: tensors as their addresses) or None when this launch
        has an argument Triton specializes in a way the key does not hold (or the path is off)."""
        if not ENABLED:
            return None
        device = _current_device()
        key = [device]
        for name, value in kwargs.items():  # by type and value: Triton compiles True, 1 and 1.0 apart
            key += (name, type(value), value)
        values = []
        add_key, add_value = key.append, values.append
        for position, a in enumerate(args):  # the hot loop of every cached launch: exact type checks first
            kind = type(a)
            if kind is int:
                add_key(a if position not in self.unspecialized else _int_type(a))
                add_value(a)
            elif kind is _Tensor or kind is _Parameter or isinstance(a, torch.Tensor):
                pointer = a.data_ptr()
                add_key(a.dtype)
                add_key(not pointer & 15)
                add_value(pointer)
            elif a is None or kind is float or kind is bool:
                add_key(kind)
                add_value(a)
            else:
                return None
        return tuple(key), values, device

    def launch(self, prepared, grid, args: tuple, triton_launch) -> bool:
        """Launch ``prepared``'s problem directly if its kernel is cached; False: not cached (or refused), the
        caller launches through Triton. ``triton_launch()`` is Triton's own launch of the same call ``args``
        (for the check until validated)."""
        if not ENABLED or prepared is None:
            return False
        key, values, device = prepared
        try:
            entry = self.entries.get(key)
        except TypeError:  # an unhashable keyword value
            return False
        if entry is None or entry is _REFUSED or _hooks_active():
            return False
        if not entry[-1]:  # not yet compared with Triton's own launch
            if guard.undecidable():
                return False
            self._checked_launch(key, entry, grid, values, device, args, triton_launch)
            return True
        grid3 = self._run(entry, grid, values, device)
        plan = recorder()
        if plan is not None:
            _kernel, run, function, packed, tail, _meta, scratch, _checked = entry
            pointers = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            plan.launches.append((self.name, run, function, packed, grid3, tuple(values), tail, pointers, device,
                                  scratch, len(plan.allocations)))
        return True

    def _run(self, entry, grid, values, device) -> tuple:
        _kernel, run, function, packed, tail, meta, scratch, _checked = entry
        if scratch:
            use_descriptor_scratch()
        g = grid(meta)
        grid3 = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
        run(*grid3, _raw_stream(device), function, packed, None, None, None, *values, *tail)
        return grid3

    def remember(self, prepared, kernel, args: tuple, kwargs: dict, meta: dict, pre_hook=None) -> None:
        """After Triton launched ``prepared``'s problem with ``kernel`` (its CompiledKernel) and config ``meta``:
        keep it, if a direct launch can reproduce that launch."""
        if not ENABLED or prepared is None or pre_hook is not None or len(self.entries) >= MAX_ENTRIES:
            return
        key = prepared[0]
        try:
            if key in self.entries:
                return
        except TypeError:
            return
        if not all(hasattr(kernel, a) for a in ("run", "packed_metadata", "function")):
            return
        if any(name not in self.constexpr and name not in OPTIONS for name in kwargs):
            return  # a runtime value by keyword: its slot would need filling per call
        if any(name in self.constexpr for name in self.param_names[:len(args)]):
            return  # a constexpr by position: keyed only by type
        tail = [None] * (len(self.param_names) - len(args))
        if any(name not in self.constexpr for name in self.param_names[len(args):]):
            return  # a runtime parameter left to its default
        run = kernel.run  # first access loads the module: kernel.function is set after it
        checked = NAME in guard.VALIDATED_ON_GPU
        # the CompiledKernel itself is kept: on triton 3.8 its __del__ unloads the module
        scratch = getattr(getattr(kernel, "metadata", None), "global_scratch_size", 0) > 0
        self.entries[key] = (kernel, run, kernel.function, kernel.packed_metadata, tuple(tail), dict(meta), scratch,
                             checked)

    def _checked_launch(self, key, entry, grid, values, device, args, triton_launch) -> None:
        """The direct launch on private copies of every tensor argument's memory, then Triton's on the arguments
        themselves: the two results compared. The caller's tensors are written once, by Triton's launch (never
        restored in place: they may be expanded, inference tensors, or saved for backward)."""
        tensors = [(position, a) for position, a in enumerate(args) if isinstance(a, torch.Tensor)]
        with torch.no_grad():
            twins, moved = _twin_memory([t for _, t in tensors])
            direct_values = list(values)
            for (position, _), address in zip(tensors, moved):
                direct_values[position] = address
            self._run(entry, grid, direct_values, device)
            triton_launch()
            agreed = all(guard.agrees(twin, t) for twin, (_, t) in zip(twins, tensors))
        self.entries[key] = (*entry[:-1], True) if agreed else _REFUSED
        if not agreed:
            warnings.warn(f"vit_kernels: {self.name}'s direct launch disagreed with Triton's launch of the same "
                          f"kernel for {key}; Triton's launch path serves that problem", RuntimeWarning, stacklevel=4)


def extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last (0 for an empty tensor)."""
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else 0


def _twin_memory(tensors: list) -> tuple[list, list]:
    """Copies of the memory of ``tensors`` — one copy per storage, of the bytes its tensors span, so tensors that
    share memory still share it — and, per tensor, a view of its twin and the twin's address."""
    spans: dict = {}
    for t in tensors:
        storage = t.untyped_storage()
        start, end = t.data_ptr(), t.data_ptr() + extent(t)
        low, high = spans.get(storage.data_ptr(), (start, end))
        spans[storage.data_ptr()] = (min(low, start), max(high, end))
    copies = {}
    for t in tensors:
        storage = t.untyped_storage()
        low, high = spans[storage.data_ptr()]
        if storage.data_ptr() not in copies:
            data = torch.empty(0, dtype=torch.uint8, device=t.device)
            data.set_(storage, low - storage.data_ptr(), (high - low,), (1,))
            copies[storage.data_ptr()] = (low, data.clone())
    twins, addresses = [], []
    for t in tensors:
        low, copy = copies[t.untyped_storage().data_ptr()]
        address = copy.data_ptr() + (t.data_ptr() - low)
        twin = torch.empty(0, dtype=t.dtype, device=t.device)
        twin.set_(copy.untyped_storage(), (t.data_ptr() - low) // t.element_size(), t.shape, t.stride())
        twins.append(twin)
        addresses.append(address)
    return twins, addresses
