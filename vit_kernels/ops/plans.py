"""Launch plans: a repeated inference call of an op replayed as the kernel launches it made (issue 24).

An op call's host time is mostly its own Python — checks, argument lists, grids — not the GPU's work
(benchmarks/NOTES.md, items 4 and 16). ``@planned`` on a public op keys each call on what decides every one of
those steps: each tensor argument's shape, strides, dtype, device, 16-byte alignment and which earlier argument it
aliases, every other argument by value, the backend setting, autocast and PDL (``pdl.launches``). A call of a key
seen before, with nothing for autograd to record and outside torch.compile, is replayed: its outputs allocated as
recorded, its compiled kernels launched directly (``fast_launch``) with the new tensors' addresses, its result
built as the same views of them. The checks ran — and passed — for the recorded call of that key, and each depends
only on what the key holds, so they hold again.

A plan is recorded from a normal call of the op whose only work was direct launches of checked kernels: a
``TorchDispatchMode`` watches it, and any other tensor operation (a copy, a fill, a cast, a comparison by
``guard``), a launch through Triton's own path or a kernel address outside the arguments and the call's own
allocations leaves the key unplanned (tried again on the next calls, given up after ``ATTEMPTS``). So a plan
never drops work the op does. ``VIT_KERNELS_LAUNCH_PLANS=0`` turns plans off.
"""
from __future__ import annotations

import functools
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import dispatch, fast_launch, pdl

ENABLED = os.environ.get("VIT_KERNELS_LAUNCH_PLANS", "1") != "0"
ATTEMPTS = 5  # recordings per key (the first calls tune, check and choose) before it is left to the normal path
MAX_PLANS = 4096  # per op: calls of ever-changing sizes stop being planned rather than grow without end
_UNPLANNED = object()
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter

aten = torch.ops.aten
# what a plan may contain besides kernel launches: views (no GPU work) and allocations (replayed as recorded)
VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.as_strided.default, aten.t.default,
                   aten.transpose.int, aten.permute.default, aten.slice.Tensor, aten.select.int,
                   aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                   aten.expand.default, aten.alias.default, aten.detach.default, aten.split.Tensor,
                   aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default, aten.unflatten.int,
                   aten.flatten.using_ints, aten.reshape.default})
ALLOCATIONS = {aten.empty.memory_format: "empty", aten.empty_strided.default: "empty", aten.new_empty.default: "empty",
               aten.new_empty_strided.default: "empty", aten.empty_like.default: "empty",
               aten.full.default: "full", aten.zeros.default: "zeros", aten.new_zeros.default: "zeros",
               aten.zeros_like.default: "zeros"}


class UnplannableError(Exception):
    """An argument a plan cannot key (a tensor subclass: DTensor, a fake or functional tensor, ...)."""


def describe(value, tensors: list, pointers: dict):
    """The hashable description of one argument; its tensors appended to ``tensors``."""
    kind = type(value)
    if isinstance(value, torch.Tensor):
        if kind is not _Tensor and kind is not _Parameter:
            raise UnplannableError(kind.__name__)
        pointer = value.data_ptr()
        alias = pointers.setdefault(pointer, len(tensors))
        tensors.append(value)
        return (value.shape, value.stride(), value.dtype, value.device, pointer & 15, alias, value.requires_grad)
    if kind is tuple or kind is list:
        return kind, tuple([describe(v, tensors, pointers) for v in value])
    return kind, value  # by type too: True == 1 == 1.0 hash alike, but the op's checks tell them apart


def call_key(args: tuple, kwargs: dict, tensors: list) -> tuple:
    """Everything a call's checks, arguments and launches depend on (the module docstring); its tensors in
    ``tensors``. One alias map for all arguments: aliasing between any two of them is in the key."""
    pointers: dict = {}
    key = [describe(a, tensors, pointers) for a in args]
    for name, value in kwargs.items():
        key.append(name)
        key.append(describe(value, tensors, pointers))
    key += (dispatch._backend, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            fast_launch._current_device(), pdl.enabled())
    return tuple(key)


def planned(fn):
    """Replay repeated inference calls of the public op ``fn`` from their launch plans (module docstring)."""
    plans: dict = {}

    @functools.wraps(fn)
    def op(*args, **kwargs):
        if not (ENABLED and fast_launch.ENABLED) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        tensors: list = []
        try:
            key = call_key(args, kwargs, tensors)
        except UnplannableError:
            return fn(*args, **kwargs)
        if not tensors or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return fn(*args, **kwargs)
        if fast_launch.recorder() is not None:  # inside an op being recorded: its launches belong to that plan
            return fn(*args, **kwargs)
        try:
            plan = plans.get(key)
        except TypeError:  # an unhashable argument
            return fn(*args, **kwargs)
        if plan is not None and plan is not _UNPLANNED and not isinstance(plan, int):
            if fast_launch._hooks_active():  # a profiler's launch hooks see Triton's launches only
                return fn(*args, **kwargs)
            return plan.replay(tensors)
        if plan is _UNPLANNED or len(plans) >= MAX_PLANS:
            return fn(*args, **kwargs)
        result, recorded = _record(fn, args, kwargs, tensors)
        tries = (plan or 0) + 1
        plans[key] = recorded or (tries if tries < ATTEMPTS else _UNPLANNED)
        return result

    op.plans = plans
    return op


class _Watch(TorchDispatchMode):
    """Every tensor operation of a recorded call: allocations kept, views allowed, anything else spoils it."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = ALLOCATIONS.get(func)
        if kind is not None:
            fill = args[1] if kind == "full" else None
            self.recorder.allocations.append((kind, out, fill))
        elif func not in VIEWS:
            self.recorder.spoil(f"tensor operation {func}")
        return out


class Recorder:
    def __init__(self):
        self.allocations: list = []
        self.launches: list = []
        self.spoiled: str | None = None

    def spoil(self, why: str) -> None:
        self.spoiled = self.spoiled or why


def _record(fn, args, kwargs, tensors):
    recorder = Recorder()
    fast_launch._recording.active = recorder
    try:
        with _Watch(recorder):
            result = fn(*args, **kwargs)
    finally:
        fast_launch._recording.active = None
    if recorder.spoiled or not recorder.launches:
        return result, None
    return result, Plan.build(recorder, tensors, result)


class Plan:
    """Allocations, launches (with the positions of their address arguments) and the result's structure."""

    def __init__(self, allocations, launches, result):
        self.allocations, self.launches, self.result = allocations, launches, result

    @classmethod
    def build(cls, recorder: Recorder, tensors: list, result):
        inputs = list(enumerate(tensors))
        allocations = [t for _, t, _ in recorder.allocations]
        launches = []
        for name, run, function, packed, grid, values, tail, pointer_slots, device, scratch, allocated in \
                recorder.launches:
            template, slots = list(values), []
            for position in pointer_slots:
                source = _source_of(values[position], inputs, allocations[:allocated])
                if source is None:
                    return None
                slots.append((position, *source))
            launches.append((name, run, function, packed, grid, template, tuple(slots), tail, device, scratch))
        shape = _result_spec(result, tensors, allocations)
        if shape is None:
            return None
        return cls([(kind, tuple(t.shape), tuple(t.stride()), t.dtype, t.device, fill)
                    for kind, t, fill in recorder.allocations], launches, shape)

    def replay(self, tensors: list):
        allocated = [_allocate(*spec) for spec in self.allocations]
        addresses = ([t.data_ptr() for t in tensors], [t.data_ptr() for t in allocated])
        for name, run, function, packed, grid, template, slots, tail, device, scratch in self.launches:
            if scratch:
                fast_launch.use_descriptor_scratch()
            values = list(template)
            for position, source, index, offset in slots:
                values[position] = addresses[source][index] + offset
            dispatch.record_launch(name)
            run(*grid, fast_launch._raw_stream(device), function, packed, None, None, None, *values, *tail)
        return _rebuild(self.result, tensors, allocated)


def _span(t: torch.Tensor) -> int:
    """``fast_launch.extent``, at least 1 byte: an empty tensor still owns the address it points at."""
    return max(fast_launch.extent(t), 1)


def _source_of(address: int, inputs: list, allocations: list):
    """(0: an input / 1: an allocation, its index, byte offset from its data_ptr) of the tensor whose elements
    span ``address``. Inputs: None if two different ones do (overlapping inputs: ambiguous). Allocations made
    before the launch: the latest that does (an earlier one at that address was freed and its memory reused)."""
    found = None
    for index, t in inputs:
        start = t.data_ptr()
        if start <= address < start + _span(t):
            if found is not None and found[2] != start:
                return None
            found = found or (0, index, start)
    if found is None:
        for index in reversed(range(len(allocations))):
            t = allocations[index]
            if t.data_ptr() <= address < t.data_ptr() + _span(t):
                found = (1, index, t.data_ptr())
                break
    return None if found is None else (found[0], found[1], address - found[2])


def _result_spec(result, tensors: list, allocations: list):
    """How to rebuild ``result`` (None, a tensor or a tuple of them) as views of the inputs or allocations."""
    if result is None:
        return ("none",)
    if isinstance(result, tuple):
        parts = [_result_spec(r, tensors, allocations) for r in result]
        return None if any(p is None for p in parts) else ("tuple", tuple(parts))
    if not isinstance(result, torch.Tensor):
        return None
    storage = result.untyped_storage().data_ptr()
    for source, candidates in ((1, list(enumerate(allocations))[::-1]), (0, list(enumerate(tensors)))):
        for index, t in candidates:
            if t.untyped_storage().data_ptr() == storage and t.dtype == result.dtype:
                return ("view", source, index, tuple(result.shape), tuple(result.stride()),
                        result.storage_offset() - t.storage_offset())
    return None


def _rebuild(spec, tensors, allocated):
    if spec[0] == "none":
        return None
    if spec[0] == "tuple":
        return tuple(_rebuild(s, tensors, allocated) for s in spec[1])
    _, source, index, shape, stride, offset = spec
    base = (tensors, allocated)[source][index]
    if offset == 0 and base.shape == shape and base.stride() == stride:
        return base
    return base.as_strided(shape, stride, base.storage_offset() + offset)


def _allocate(kind, shape, stride, dtype, device, fill):
    if kind == "full":
        return torch.full(shape, fill, dtype=dtype, device=device)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)
