"""Host-side launch helpers: kernel launchers (autotuned or sized by the problem), outputs, grids.

A launcher couples a ``@triton.jit`` kernel with the name its launches are counted under and the way its
meta-parameters (tile sizes, warps, stages) are chosen: ``Tuned`` autotunes over a bounded config list,
``Sized`` derives one config from the problem size. Both list the exact configs that the sm_80/sm_90
compile check walks (``compile_cases``), and the kernel's argument types that check needs.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import triton

from . import fast_launch, guard
from .dispatch import INTERPRET, record_launch
from .fast_launch import LaunchCache

# Tests set VIT_KERNELS_POISON=1: outputs start as NaN, so any element a kernel fails to write shows up.
POISON = os.environ.get("VIT_KERNELS_POISON", "0") == "1"

MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0; axes 1 and 2 stop at 65,535
MAX_GRID_YZ = 65535
PDL_MIN_ARCH = 90


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def meta_of(cfg: triton.Config) -> dict:
    """What ``keep``/``arch_keep`` rules see of a config: its meta-parameters, num_warps and num_stages."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def config_label(cfg: triton.Config) -> str:
    """A config's meta-parameters, warps and stages as text (how screening results name configs)."""
    return f"{sorted(cfg.kwargs.items())} warps={cfg.num_warps} stages={cfg.num_stages}"


def new_output(shape, device, dtype) -> torch.Tensor:
    """Allocate a kernel's output: uninitialized, or NaN-filled under VIT_KERNELS_POISON=1."""
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code: ``triton.cdiv`` is a constexpr function in triton 3.8, ~5 us a host call."""
    return -(-a // b)


def launch_grid(*dims: int) -> tuple:
    """A launch grid, checked against CUDA's limits (every kernel here puts the large count on axis 0)."""
    if dims[0] > MAX_GRID_X or any(d > MAX_GRID_YZ for d in dims[1:]):
        raise ValueError(f"launch grid {dims} exceeds CUDA's limits ({MAX_GRID_X} on axis 0, {MAX_GRID_YZ} on "
                         "axes 1 and 2)")
    return dims


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (PyTorch's default: TF32 off); 16-bit inputs are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_major(t: torch.Tensor) -> torch.Tensor:
    """Kernels index rows by stride but need unit stride along the last (feature) axis."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(named_args: dict) -> int | None:
    """The compute capability (e.g. 90) of the GPU holding a launch's first CUDA tensor argument; None
    without one (the configs are then not filtered by arch)."""
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return _capability(value.device.index if value.device.index is not None else torch.cuda.current_device())
    return None


class Kernel:
    """A jit kernel, the name its launches are counted under, and its argument types for the compile check.

    ``arg_types`` names the arguments that are not the defaults (``*_ptr``: a pointer to the data dtype,
    anything else: int32), e.g. ``{"mean_ptr": "*fp32", "eps": "fp32"}``; ``aligned`` lists the int arguments
    that are multiples of 16 in real ViT runs (Triton specializes those the same way).
    ``quiet_fp`` lists the numpy floating-point warnings the interpreter raises for lanes the kernel
    computes on purpose and masks out (e.g. ``"divide"`` for log2(0) of empty rows): silenced around its
    launches only, not globally."""

    def __init__(self, name: str, kernel, arg_types: dict | None = None, aligned=(), quiet_fp=()):
        self.name = name
        self.kernel = kernel
        self.arg_types = dict(arg_types or {})
        self.aligned = frozenset(aligned)
        self.quiet_fp = tuple(quiet_fp)
        self.fast = LaunchCache(name, kernel.fn, kernel)  # problems launched before: relaunched without Triton's path

    def configs_for(self, variant: dict, arch: int | None = None) -> list:
        """The configs a launch of ``variant`` may use on a GPU of compute capability ``arch`` (e.g. 80, 90;
        None: on any)."""
        raise NotImplementedError

    def compile_cases(self, variants, archs=(80, 90), only=None) -> list:
        """(label, constexprs, num_warps, num_stages, the archs among ``archs`` that use it) for every variant
        x config (``only``: the configs whose meta passes it)."""
        cases = []
        for variant in variants:
            for cfg in self.configs_for(variant):
                if only is not None and not only(cfg.kwargs):
                    continue
                constexprs = {**{k: v for k, v in variant.items() if k in self.constexpr_names}, **cfg.kwargs}
                label = f"{self.name}[{' '.join(f'{k}={v}' for k, v in {**cfg.kwargs, **variant}.items())}]"
                used_on = tuple(a for a in archs if any(c is cfg for c in self.configs_for(variant, arch=a)))
                if used_on:  # else no launch on any of the archs uses it (e.g. an sm_90-only rule meets an sm_80 one)
                    cases.append((label, constexprs, cfg.num_warps, cfg.num_stages, used_on))
        return cases

    @property
    def constexpr_names(self) -> set:
        """From the signature (a jit kernel and its interpreted twin both keep the Python function)."""
        parameters = inspect.signature(self.kernel.fn).parameters
        return {name for name, p in parameters.items() if "constexpr" in str(p.annotation)}

    def launch(self, grid, *args, config: triton.Config, **kwargs) -> None:
        """``grid`` maps the config's meta-parameters to the launch grid."""
        record_launch(self.name)
        meta = dict(config.kwargs)
        options = {**kwargs, **meta, "num_warps": config.num_warps, "num_stages": config.num_stages}
        with self._quiet():
            if INTERPRET:
                self.kernel[grid(meta)](*args, **options)
            else:
                self._direct_or_triton(grid, args, options, lambda: self.kernel[grid(meta)](*args, **options),
                                       lambda: config)

    def _direct_or_triton(self, grid, args, kwargs, triton_launch, config) -> None:
        """The cached compiled kernel launched directly (``fast_launch``), or Triton's launch, whose kernel
        (with the ``config()`` it ran) is then cached for the next launch of the problem."""
        prepared = self.fast.prepare(args, kwargs)
        if self.fast.launch(prepared, grid, args, triton_launch):
            return
        plan = fast_launch.recorder()
        if plan is not None:
            plan.spoil(f"{self.name} launched through Triton's path")
        with self.fast.lock:  # the autotuner's best_config is the one this launch ran, not another thread's
            kernel = triton_launch()
            ran = config()
        self.fast.remember(prepared, kernel, args, kwargs, ran.kwargs, ran.pre_hook)

    def _quiet(self):
        if not (INTERPRET and self.quiet_fp):
            return contextlib.nullcontext()
        import numpy  # the interpreter computes with numpy

        return numpy.errstate(**dict.fromkeys(self.quiet_fp, "ignore"))


class Sized(Kernel):
    """One config per problem size: ``choose(**sizes)`` returns it. In the compile check a variant names the
    sizes (``size_keys``) next to the constexpr flags, e.g. ``dict(E=768, HAS_WEIGHT=True)``."""

    def __init__(self, name, kernel, choose, size_keys, **kwargs):
        super().__init__(name, kernel, **kwargs)
        self.choose = choose
        self.size_keys = tuple(size_keys)
        self.chosen = {}  # sizes -> config: one object per size, so compile_cases can tell configs apart

    def configs_for(self, variant: dict, arch: int | None = None) -> list:
        config = self.chosen.setdefault(tuple(variant[k] for k in self.size_keys),
                                        self.choose(**{k: variant[k] for k in self.size_keys}))
        return [config]


class Tuned(Kernel):
    """A jit kernel plus its bounded autotune configs.

    On a GPU, launches go through ``triton.autotune`` keyed on the shape arguments; in the interpreter
    (which cannot time anything) the fixed ``interpret_config`` is used. ``keep(meta, flags)`` (meta: see
    ``meta_of``) drops configs
    that a variant cannot use (e.g. tiles that would spill registers with a heavy epilogue), and
    ``arch_keep(meta, flags, arch)`` those it cannot use on one GPU generation (compute capability ``arch``:
    80, 90; e.g. a tile that fits Hopper's registers but spills on Ampere); the sm_80/sm_90 compile check
    walks exactly ``configs_for(flags, arch=...)`` per arch. ``size_keep(meta, sizes)`` (sizes: the launch's
    named arguments) drops configs the autotuner need not time for a problem size (e.g. small-M tiles at large M).
    """

    def __init__(self, name, kernel, configs, key, interpret_config: dict, keep=None, arch_keep=None, pending=None,
                 outputs=(), size_keep=None, **kwargs):
        super().__init__(name, kernel, **kwargs)
        self.configs = configs
        self.key = tuple(key)
        self.interpret_config = interpret_config
        self.keep = keep or (lambda meta, flags: True)
        self.arch_keep = arch_keep or (lambda meta, flags, arch: True)
        self.size_keep = size_keep
        # pending = (validation name, meta -> bool): new configs, screened (guard.screen) on the arguments named
        # in ``outputs`` before they may join the autotuner, until guard.VALIDATED_ON_GPU names them
        self.pending = pending
        self.outputs = tuple(outputs)
        self.arg_names = list(inspect.signature(kernel.fn).parameters)
        self.tuned = triton.autotune(configs=configs, key=key, prune_configs_by={
            "early_config_prune": lambda configs, named_args, **flags: self.configs_for(
                flags, configs, arch=device_arch(named_args), autotuning=True,
                screen_key=self.screen_key({**named_args, **flags}), sizes=named_args)})(kernel)

    def configs_for(self, flags: dict, configs=None, arch: int | None = None, autotuning: bool = False,
                    screen_key=None, sizes: dict | None = None) -> list:
        """The configs for ``flags`` (and GPU generation ``arch``; problem ``sizes``). ``autotuning``: without the
        pending configs (compiled by the check, run pinned by the GPU tests) unless validated or, for the
        problem ``screen_key``, screened and agreeing."""
        if flags.get("PDL") and arch is not None and arch < PDL_MIN_ARCH:
            return []  # griddepcontrol (programmatic dependent launch, ops/pdl.py) exists from sm_90 on
        kept = [c for c in (configs or self.configs)
                if self.keep(meta_of(c), flags) and (arch is None or self.arch_keep(meta_of(c), flags, arch))
                and (sizes is None or self.size_keep is None or self.size_keep(meta_of(c), sizes))]
        if autotuning and self.pending is not None and self.pending[0] not in guard.VALIDATED_ON_GPU:
            agreed = guard.screened(self.pending[0], screen_key)
            kept = [c for c in kept if not self.pending[1](c.kwargs) or config_label(c) in agreed]
        return kept

    def screen_key(self, named_args: dict) -> tuple:
        """What the autotuner keys a launch on (its key arguments, the tensors' dtypes) plus the GPU."""
        tensors = [v for v in named_args.values() if isinstance(v, torch.Tensor)]
        return (tuple(named_args.get(k) for k in self.key), tuple(str(t.dtype) for t in tensors),
                device_arch(named_args))

    def _screen(self, grid, args, kwargs) -> None:
        """Screen the pending configs for this launch's problem once, before the autotuner first sees it."""
        if self.pending[0] in guard.VALIDATED_ON_GPU:
            return
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        key = self.screen_key(named)
        if not guard.needs_screening(self.pending[0], key):
            return
        kept = self.configs_for(kwargs, arch=device_arch(named), sizes=named)
        proven = [c for c in kept if not self.pending[1](c.kwargs)]
        candidates = [c for c in kept if self.pending[1](c.kwargs)] if proven else []
        guard.screen(self.pending[0], key, lambda c: Kernel.launch(self, grid, *args, config=c, **kwargs),
                     [named[name] for name in self.outputs], proven[0] if proven else None, candidates, config_label)

    def _autotuned(self, grid, args, kwargs):
        """Triton's autotuned launch (pending configs screened first); returns the CompiledKernel it ran."""
        if self.pending is not None:
            self._screen(grid, args, kwargs)
        return self.tuned[grid](*args, **kwargs)

    def launch(self, grid, *args, config: triton.Config | None = None, **kwargs) -> None:
        """``config`` pins one config instead of autotuning, on a GPU and in the interpreter alike."""
        if config is not None:
            return super().launch(grid, *args, config=config, **kwargs)
        record_launch(self.name)
        with self._quiet():
            if INTERPRET:
                meta = dict(self.interpret_config)
                self.kernel[grid(meta)](*args, **kwargs, **meta)
            else:
                self._direct_or_triton(grid, args, kwargs, lambda: self._autotuned(grid, args, kwargs),
                                       lambda: self.tuned.best_config)
        return None
