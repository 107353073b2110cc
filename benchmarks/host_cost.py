"""Host microseconds per op call without a GPU (issue 24): what the direct relaunch (vit_kernels/ops/fast_launch.py)
removes and what is left.

Runs on CPU with Triton's interpreter build, the launchers switched to their GPU branch and Triton's runtime
faked (a CompiledKernel whose launcher does nothing), at ViT-B/16 batch-1 shapes. Per op:

- ``python_us``: the op's own Python up to the launch (checks, dispatch, output allocation, grid), launch stubbed;
- ``direct_us``: the whole call with the direct relaunch (key + launcher arguments + the no-op launcher call);
- ``plan_us``: the call replayed from its launch plan (``ops/plans.py``: key, allocations, launches);
- ``triton_bind_us``: what Triton's ``JITFunction.run`` spends binding this launch's arguments and building its
  cache key (``create_function_from_signature`` + ``compute_cache_key``, triton 3.8 internals) — a lower bound of
  the part the direct relaunch skips (``Autotuner.run`` and the launch metadata come on top).

The C launcher and the driver call (~5 us on an H100 host) are not in any column: they are the same on both
paths. Writes benchmarks/results/host_cost_cpu_<date>.json.

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/host_cost.py
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from vit_kernels import ops
from vit_kernels.bench.timing import device_info, save_json
from vit_kernels.ops import fast_launch, guard, launch, plans

SECONDS = 1.0


def per_call_us(fn) -> float:
    """Mean microseconds of fn() over >= SECONDS of calls."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        for _ in range(100):
            fn()
        n += 100
    return (time.perf_counter() - start) / n * 1e6


class NoopCompiled:
    function, packed_metadata = 1, ()

    def __init__(self):
        self.run = lambda *launch_args: None


class FakeTriton:
    """A launcher's ``kernel``/``tuned``: records the first launch's arguments, returns a no-op CompiledKernel."""

    def __init__(self, fn, best_config=None):
        self.fn, self.best_config, self.compiled, self.seen = fn, best_config, NoopCompiled(), None

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.seen = self.seen or (args, kwargs)
            return self.compiled
        return call


def launchers() -> list:
    import importlib

    found = []
    for name in ("linear", "layer_norm", "attention", "layer_norm_linear", "patch_embed"):
        module = importlib.import_module(f"vit_kernels.ops.{name}")
        found += [v for v in vars(module).values() if isinstance(v, launch.Kernel) and v not in found]
    return found


def triton_bind_us(kernel, args, kwargs) -> float | None:
    """Triton 3.8's argument binding + cache key for this launch (None where those internals differ)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
    except ImportError:
        return None
    jit = JITFunction(kernel.kernel.fn)
    binder = create_function_from_signature(jit.signature, jit.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    cache: dict = {}
    config = kernel.kernel.best_config  # autotuned launches: the config's meta as Autotuner.run adds it
    options = {"num_warps": 4, "num_stages": 3, **(config.kwargs if config else {}), **kwargs, "debug": False}

    def bind():
        _, specialization, opts = binder(*args, **options)
        compute_cache_key(cache, specialization, opts)
    return per_call_us(bind)


def main():
    launch.INTERPRET = False
    fast_launch.ENABLED = True
    fast_launch._current_device = lambda: 0
    fast_launch._raw_stream = lambda device: 0
    guard.VALIDATED_ON_GPU = guard.VALIDATED_ON_GPU | {fast_launch.NAME, "linear_tma", "attention_short"}
    import importlib

    importlib.import_module("vit_kernels.ops.linear").use_descriptor_scratch = lambda: None
    fakes = {}
    for kernel in launchers():
        tuned = isinstance(kernel, launch.Tuned)
        fakes[id(kernel)] = FakeTriton(kernel.kernel.fn, kernel.configs[0] if tuned else None)
        kernel.kernel = fakes[id(kernel)]
        if tuned:
            kernel.tuned = fakes[id(kernel)]
    torch.manual_seed(0)
    h, w, b = torch.randn(197, 768), torch.randn(2304, 768), torch.randn(2304)
    w1, b1, w2 = torch.randn(3072, 768), torch.randn(3072), torch.randn(768, 3072)
    g, qkv, img = torch.randn(768), torch.randn(1, 197, 2304), torch.randn(1, 3, 224, 224)
    pw, cls, pos = torch.randn(768, 3, 16, 16), torch.randn(1, 768), torch.randn(197, 768)
    calls = {
        "ops.linear (qkv)": lambda: ops.linear(h, w, b),
        "ops.linear (fc2 + residual)": lambda: ops.linear(torch.empty(197, 3072), w2, g, residual=h),
        "ops.layer_norm": lambda: ops.layer_norm(h, g, g, 1e-6),
        "ops.layer_norm_linear (fc1 + GELU)": lambda: ops.layer_norm_linear(h, g, g, w1, b1, eps=1e-6,
                                                                            activation="gelu"),
        "ops.attention": lambda: ops.attention(qkv, num_heads=12, layout="qkv h d", scaling="paper"),
        "ops.patch_embed": lambda: ops.patch_embed(img, pw, g, cls, pos),
    }
    rows = []
    with torch.no_grad():
        for name, call in calls.items():
            for fake in fakes.values():
                fake.seen = None
            plans.ENABLED = False
            call()  # Triton's (fake) launch, then cached
            direct = per_call_us(call)
            plans.ENABLED = True
            for _ in range(plans.ATTEMPTS):
                call()
            plan = per_call_us(call)
            plans.ENABLED = False
            used = [k for k in launchers() if fakes[id(k)].seen is not None]
            saved = [launch.Kernel.launch, launch.Tuned.launch]
            launch.Kernel.launch = launch.Tuned.launch = lambda self, *a, **k: launch.record_launch(self.name)
            python = per_call_us(call)
            launch.Kernel.launch, launch.Tuned.launch = saved
            bind = sum(filter(None, (triton_bind_us(k, *fakes[id(k)].seen) for k in used))) or None
            rows.append(dict(op=name, launches=len(used), python_us=python, direct_us=direct, plan_us=plan,
                             triton_bind_us=bind))
            print(f"{name:<36} python {python:6.1f} us   with direct launch {direct:6.1f} us   plan {plan:6.1f} us   "
                  f"Triton's bind+key it skips {bind or float('nan'):6.1f} us")
    device = {**device_info(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "python": platform.python_version()}
    out = save_json(Path(__file__).parent / "results", "host_cost", dict(
        benchmark="host_cost", device=device, method=__doc__.split("\n\n")[1], seconds_per_row=SECONDS, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
