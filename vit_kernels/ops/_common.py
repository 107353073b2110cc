"""Helpers shared by every op: backend choice, input checks, dtype maps, autotuned launches.

Backend rule: a CUDA tensor, or any tensor when ``TRITON_INTERPRET=1`` was set before this package was
imported, runs the Triton kernels; otherwise the op computes the same function with PyTorch.
``use_backend`` pins the choice and ``launch_counts`` tells which kernels ran, so tests can prove it.
"""
from __future__ import annotations

import collections
import contextlib
import os

import torch
import triton
import triton.language as tl

# @triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when vit_kernels.ops is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Tests set VIT_KERNELS_POISON=1: outputs start as NaN, so any element a kernel fails to write shows up.
POISON = os.environ.get("VIT_KERNELS_POISON", "0") == "1"

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
_launches: collections.Counter = collections.Counter()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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


def kernels_available(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET


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


def dispatcher_free(*tensors) -> bool:
    """True when an op may call its launcher directly: no autograd graph to record and not inside
    torch.compile. Inference then skips the torch.library dispatch, a few microseconds of host time per call
    that matter because small batches are launch-bound (benchmarks/NOTES.md, item 4)."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def backend_for(t: torch.Tensor) -> str:
    """Which backend an op would use for ``t`` right now: ``"triton"`` or ``"torch"``."""
    return "triton" if use_kernels(t) else "torch"


def record_launch(name: str) -> None:
    _launches[name] += 1


def launch_counts() -> dict:
    """Kernel launches per op since the last ``reset_launch_counts()``."""
    return dict(_launches)


def reset_launch_counts() -> None:
    _launches.clear()


def check_tensor(name: str, t, dims: int | None = None, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input's {dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def check_vector(name: str, t, length: int, dtype: torch.dtype, device: torch.device) -> None:
    """Optional per-feature vectors (bias, LayerNorm weight, layer scale)."""
    if t is None:
        return
    check_tensor(name, t, dims=1, dtype=dtype)
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} elements, expected {length}")
    check_device(name, t, device)


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def new_output(shape, device, dtype) -> torch.Tensor:
    """Allocate a kernel's output: uninitialized, or NaN-filled under VIT_KERNELS_POISON=1."""
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0; axes 1 and 2 stop at 65,535
MAX_GRID_YZ = 65535
MAX_SAMPLE_ELEMENTS = 2**31 - 1  # int32 offsets inside one image/sample; across samples they are int64


def launch_grid(*dims: int) -> tuple:
    """A launch grid, checked against CUDA's limits (every kernel here puts the large count on axis 0)."""
    if dims[0] > MAX_GRID_X or any(d > MAX_GRID_YZ for d in dims[1:]):
        raise ValueError(f"launch grid {dims} exceeds CUDA's limits ({MAX_GRID_X} on axis 0, {MAX_GRID_YZ} on "
                         "axes 1 and 2)")
    return dims


def check_sample_size(name: str, elements: int) -> None:
    if elements > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"one sample of {name} spans {elements} elements; the kernels index within a sample "
                         f"with int32 offsets (limit {MAX_SAMPLE_ELEMENTS})")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (PyTorch's default: TF32 off); 16-bit inputs are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_major(t: torch.Tensor) -> torch.Tensor:
    """Kernels index rows by stride but need unit stride along the last (feature) axis."""
    return t if t.stride(-1) == 1 else t.contiguous()


class Tuned:
    """A jit kernel plus its bounded autotune configs.

    On a GPU, launches go through ``triton.autotune`` keyed on the shape arguments; in the interpreter
    (which cannot time anything) the fixed ``interpret_config`` is used. ``keep(meta, flags)`` drops configs
    that a variant cannot use (e.g. tiles that would spill registers with a heavy epilogue); the sm_80/sm_90
    compile test walks exactly ``configs_for(flags)``.
    """

    def __init__(self, kernel, configs, key, interpret_config: dict, keep=None):
        self.kernel = kernel
        self.configs = configs
        self.interpret_config = interpret_config
        self.keep = keep or (lambda meta, flags: True)
        self.tuned = triton.autotune(configs=configs, key=key, prune_configs_by={
            "early_config_prune": lambda configs, named_args, **flags: self.configs_for(flags, configs)})(kernel)

    def configs_for(self, flags: dict, configs=None) -> list:
        return [c for c in (configs or self.configs) if self.keep(c.kwargs, flags)]

    def launch(self, name: str, config, grid, *args, **kwargs) -> None:
        """``grid`` is a function of the chosen config's meta-parameters. ``config`` (a triton.Config or
        None) pins one config instead of autotuning, on a GPU and in the interpreter alike."""
        record_launch(name)
        if config is not None:
            meta = dict(config.kwargs)
            self.kernel[grid(meta)](*args, **kwargs, **meta, num_warps=config.num_warps,
                                    num_stages=config.num_stages)
        elif INTERPRET:
            meta = dict(self.interpret_config)
            self.kernel[grid(meta)](*args, **kwargs, **meta)
        else:
            self.tuned[grid](*args, **kwargs)


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)
