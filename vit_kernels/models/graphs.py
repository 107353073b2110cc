"""CUDA-graph serving: ``accelerate(model, cuda_graphs=True)`` replays one captured forward per batch bucket.

A small-batch forward is launch-bound (benchmarks/NOTES.md, item 4: ~87 launches of 60-130 us of host time
each at batch 1, for 0.6 ms of GPU work); a CUDA graph replays every launch of the forward with one call. The
runner patches the model's ``forward`` in place (``vit_kernels.restore`` removes it) and, per key (batch
bucket, the inputs' shapes past the batch axis, dtypes and device, the non-tensor arguments, autocast), on
first use: runs the eager forward three times on a side stream (the autotuner and ``ops.guard`` make their
choices there, never inside a capture), captures it into a graph, then replays. A batch is padded up to its
bucket (rows of a ViT never mix, so the padding rows change nothing in the real ones), copied into the graph's
static inputs, and the outputs whose first axis is the bucket are cut back to the batch and cloned: the
caller owns them. A batch above the largest bucket runs as several replays of that bucket.

On sm_90 and newer a second graph of each key is captured with programmatic dependent launch on the GEMMs
(``ops/pdl.py``). Until "pdl" is in ``guard.VALIDATED_ON_GPU`` its outputs must equal the plain graph's bit for
bit — checked after a replay on other inputs, so a kernel that read its input before the previous kernel had
written it would see stale values and differ. Then both are timed, and the PDL graph is kept only where it is
faster by more than ``PDL_MARGIN``. A disagreement or any error in the PDL capture keeps the plain graph, with a
warning; ``GraphRunner.pdl_verdicts`` records each choice and its times.
"""
from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..ops import dispatch, guard, pdl
from . import _fused
from .patching import patch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RUNNER = "vit_kernels_graphs"  # instance attribute of the patched model (restore() drops vit_kernels_* keys)
EAGER = "vit_kernels_eager_forward"  # what served model.forward before the runner: None means the class's
WARMUP_RUNS = 3  # PyTorch's advice before a capture: cuBLAS workspaces, lazy inits, our autotuner and guard
PDL_MARGIN = 0.98  # the PDL graph must replay in under 98% of the plain one's time (timing noise is ~1%)


def check_buckets(buckets) -> tuple:
    """Sorted, distinct, positive batch sizes."""
    if isinstance(buckets, (int, str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(f"cuda_graphs buckets must be an iterable of ints, e.g. (1, 8, 64); got {buckets!r}")
    values = tuple(buckets)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in values):
        raise TypeError(f"cuda_graphs buckets must be ints, got {values!r}")
    if not values or min(values) < 1:
        raise ValueError(f"cuda_graphs buckets must be one or more positive batch sizes, got {values!r}")
    return tuple(sorted(set(values)))


def bucket_for(batch: int, buckets: tuple) -> int:
    """The smallest bucket holding ``batch`` (above the largest: the largest, replayed in chunks)."""
    return next((b for b in buckets if b >= batch), buckets[-1])


class _Graph:
    """One captured forward: static inputs, the graph, static outputs."""

    def __init__(self, forward, inputs: list, spec, pool):
        self.inputs = inputs
        self.spec = spec
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                forward(*self.call_args())
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = forward(*self.call_args())

    @staticmethod
    def new_pool():
        return torch.cuda.graph_pool_handle()

    def call_args(self):
        args, kwargs = pytree.tree_unflatten(self.inputs, self.spec)
        return args, kwargs

    def replay(self):
        self.graph.replay()
        return self.outputs


def _after(event) -> None:
    """Order this call's GPU work after ``event`` (a previous call's, maybe from another thread's stream)."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def _done():
    """An event recorded on the current stream (None without CUDA: the CPU tests' fake graphs)."""
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _run(forward):
    return lambda args, kwargs: forward(*args, **kwargs)


class GraphRunner:
    """The per-model state: its buckets, its graphs, one lock (replays of one model are serialized: callers from
    several threads queue, each gets its own outputs). Copies of the model (deepcopy, pickle) get a new
    runner with the same buckets and no graphs."""

    def __init__(self, buckets=DEFAULT_BUCKETS):
        self.buckets = check_buckets(buckets)
        self.graphs: dict = {}
        self.tensors_seen: tuple | None = None
        self.lock = threading.Lock()
        self.last_call = None  # a CUDA event after the last call's clones: static buffers free again
        self.pool = None
        self.pdl_verdicts: dict = {}  # graph key -> (PDL kept, ms without, ms with); module docstring

    def __deepcopy__(self, memo):
        return GraphRunner(self.buckets)

    def __reduce__(self):
        return GraphRunner, (self.buckets,)

    def __repr__(self) -> str:
        return f"GraphRunner(buckets={self.buckets}, graphs={len(self.graphs)})"

    def reset(self) -> None:
        """Drop every captured graph (their memory returns to PyTorch's caching allocator)."""
        self.graphs.clear()
        self.pdl_verdicts.clear()
        self.pool = None

    def __call__(self, model: nn.Module, eager, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        batch = check_call(model, tensors)
        with self.lock:
            self._check_parameters(model)
            _after(self.last_call)  # the previous call's replay and clone, on whichever stream it ran
            outputs = [self._replay(eager, leaves, spec, start, min(batch - start, self.buckets[-1]))
                       for start in range(0, batch, self.buckets[-1])]
            self.last_call = _done()
        return outputs[0] if len(outputs) == 1 else pytree.tree_map(_cat_batches(batch), *outputs)

    def _check_parameters(self, model: nn.Module) -> None:
        """Graphs read parameters and buffers by address: in-place writes (an optimizer step, load_state_dict,
        ``.data.copy_``) are seen by the next replay; a replaced or moved tensor (``model.half()``,
        ``.to(device)``, a new ``nn.Parameter``) is not, so then every graph is captured again."""
        tensors = (*model.parameters(), *model.buffers())
        seen = tuple((t.data_ptr(), t.dtype, t.device) for t in tensors)
        if seen != self.tensors_seen:
            if not all(_on_cuda(t) for t in tensors):
                raise RuntimeError("cuda_graphs=True needs the model on a CUDA device; its parameters are on "
                                   f"{sorted({str(t.device) for t in tensors})}")
            self.reset()
            self.tensors_seen = seen
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise RuntimeError("cuda_graphs=True cannot record autograd: run the model under torch.no_grad() or "
                               "torch.inference_mode()")

    def _replay(self, eager, leaves: list, spec, start: int, size: int):
        bucket = bucket_for(size, self.buckets)
        key = graph_key(leaves, spec, bucket)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(eager, leaves, spec, start, size, bucket, key)
        else:
            _fill(graph.inputs, leaves, start, size)
        return pytree.tree_map(lambda t: _owned(t, bucket, size), graph.replay())

    def _capture(self, eager, leaves: list, spec, start: int, size: int, bucket: int, key: tuple) -> _Graph:
        """The graph for ``key``, warmed up and captured on this batch's values (guard.py compares on real data):
        the plain one, or where PDL is available the faster of it and the PDL one (module docstring)."""
        if self.pool is None:
            self.pool = _Graph.new_pool()  # shared by the buckets and candidates: only one replays at a time

        def capture():
            return _Graph(_run(eager), _fill(_static_inputs(leaves, bucket), leaves, start, size), spec, self.pool)

        with pdl.launches(False):  # plain whatever the caller's setting
            plain = capture()
        device = next(leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor))
        if not pdl.available(device):
            return plain
        try:
            with pdl.launches():
                with_pdl = capture()
            wins = self._pdl_wins(key, plain, with_pdl)
        except Exception as error:  # the plain graph serves; the failure is reported, not raised
            warnings.warn(f"vit_kernels: capturing or checking the graph with programmatic dependent launch failed "
                          f"for {key[:2]} ({type(error).__name__}: {error}); replaying the plain one", RuntimeWarning,
                          stacklevel=4)
            self.pdl_verdicts[key] = (False, None, None)
            return plain
        return with_pdl if wins else plain

    def _pdl_wins(self, key: tuple, plain: _Graph, with_pdl: _Graph) -> bool:
        """Equal outputs (until validated; module docstring) and a replay faster by PDL_MARGIN (the better of two
        alternating timings of each)."""
        if pdl.NAME not in guard.VALIDATED_ON_GPU and not _same_outputs(plain, with_pdl):
            warnings.warn(f"vit_kernels: the graph with programmatic dependent launch disagreed with the plain one "
                          f"for {key[:2]}; replaying the plain one", RuntimeWarning, stacklevel=4)
            self.pdl_verdicts[key] = (False, None, None)
            return False
        times = [guard.time_ms(graph.replay) for _ in range(2) for graph in (plain, with_pdl)]
        without, with_ = min(times[0::2]), min(times[1::2])
        wins = with_ < PDL_MARGIN * without
        self.pdl_verdicts[key] = (wins, without, with_)
        return wins


def _same_outputs(plain: _Graph, candidate: _Graph) -> bool:
    """The candidate's outputs equal the plain graph's bit for bit on the captured inputs, after a replay of the
    candidate on other inputs (negated floating-point ones) has left other values in every intermediate."""
    expected = [t.clone() if isinstance(t, torch.Tensor) else t for t in pytree.tree_leaves(plain.replay())]
    kept = [t.clone() if isinstance(t, torch.Tensor) else t for t in candidate.inputs]
    for t in candidate.inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.neg_()
    candidate.replay()
    for t, original in zip(candidate.inputs, kept):
        if isinstance(t, torch.Tensor):
            t.copy_(original)
    got = pytree.tree_leaves(candidate.replay())
    return all(torch.equal(g, e) if isinstance(e, torch.Tensor) else g == e for g, e in zip(got, expected))


def graph_key(leaves: list, spec, bucket: int) -> tuple:
    """What a graph depends on besides the parameters: the bucket, each tensor's shape past the batch axis,
    dtype and device, every other argument (by type and value), the argument structure, autocast and settings."""
    described = tuple((tuple(v.shape[1:]), v.dtype, v.device) if isinstance(v, torch.Tensor) else (type(v), v)
                      for v in leaves)
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    # the global settings a forward reads: inference mode (its tensors cannot be written outside it), the
    # kernels' backend pin, LayerNorm folding
    settings = (torch.is_inference_mode_enabled(), dispatch._backend, _fused.FOLD_LAYER_NORM.on)
    try:
        hash(described)
    except TypeError as e:
        raise TypeError("cuda_graphs: every argument besides the batched tensors must be hashable (it selects "
                        f"the graph); got {[type(v).__name__ for v in leaves]}") from e
    return bucket, described, str(spec), autocast, settings


def _static_inputs(leaves: list, bucket: int) -> list:
    """Zero-filled static buffers of the bucket's batch for the tensors; other arguments as they are."""
    return [torch.zeros((bucket, *v.shape[1:]), dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor)
            else v for v in leaves]


def _fill(static: list, leaves: list, start: int, size: int) -> list:
    """Copy rows ``start:start + size`` of the batched arguments into the first rows of the static ones."""
    for buffer, leaf in zip(static, leaves):
        if isinstance(leaf, torch.Tensor):
            buffer[:size].copy_(leaf[start:start + size])
    return static


def _owned(t, bucket: int, size: int):
    """A static output handed to the caller: its real rows, in memory the next replay does not overwrite."""
    if not isinstance(t, torch.Tensor):
        return t
    return (t[:size] if t.dim() > 0 and t.shape[0] == bucket else t).clone()


def _cat_batches(batch: int):
    def cat(*parts):
        if isinstance(parts[0], torch.Tensor) and parts[0].dim() > 0 and sum(p.shape[0] for p in parts) == batch:
            return torch.cat(parts)
        return parts[0]
    return cat


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def check_call(model: nn.Module, tensors: list) -> int:
    """The refusals, each naming what to change; returns the batch size."""
    if model.training:
        raise RuntimeError("cuda_graphs=True serves inference only: call model.eval() first, or "
                           "vit_kernels.accelerate(model, cuda_graphs=False) to train")
    if not tensors:
        raise ValueError("cuda_graphs: the forward needs at least one tensor argument (the batch)")
    if not all(_on_cuda(t) for t in tensors):
        raise RuntimeError("cuda_graphs=True needs the model and its inputs on a CUDA device; got inputs on "
                           f"{sorted({str(t.device) for t in tensors})}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("cuda_graphs=True cannot record autograd: run the model under torch.no_grad() or "
                           "torch.inference_mode()")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("cuda_graphs=True cannot run inside another CUDA-graph capture")
    batch = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
    if batch == 0 or any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
        raise ValueError("cuda_graphs: every tensor argument must share a non-empty leading batch axis; got "
                         f"shapes {[tuple(t.shape) for t in tensors]}")
    return batch


def graphed_forward(model: nn.Module, *args, **kwargs):
    """The patched ``model.forward``: the graph runner around the forward that served before (eager while
    ``attention_maps`` records: the maps are collected by the forward's Python, which a replay skips)."""
    eager = model.__dict__.get(EAGER) or type(model).forward.__get__(model)
    if _fused._attention_maps is not None:
        return eager(*args, **kwargs)
    return model.__dict__[RUNNER](model, eager, args, kwargs)


def use_cuda_graphs(model: nn.Module, enabled: bool = True, buckets=DEFAULT_BUCKETS) -> nn.Module:
    """Turn the graph runner on (``enabled``) or off for an accelerated ``model``; returns the model. Turning it
    on again replaces the buckets and drops the captured graphs."""
    if not isinstance(enabled, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {enabled!r}")
    runner = model.__dict__.get(RUNNER)
    if runner is not None:  # off first: forward back to what served before
        eager = model.__dict__.pop(EAGER)
        del model.__dict__[RUNNER]
        if eager is None:
            model.__dict__.pop("forward", None)
        else:
            object.__setattr__(model, "forward", eager)
    if enabled:
        model.__dict__[RUNNER] = GraphRunner(buckets)
        model.__dict__[EAGER] = model.__dict__.get("forward")
        patch(model, "forward", graphed_forward)
    return model


def graph_runner(model: nn.Module) -> GraphRunner | None:
    """The model's graph runner (its buckets, captured graphs), or None when cuda_graphs is off."""
    return model.__dict__.get(RUNNER)


