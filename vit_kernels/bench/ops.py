"""Per-op benchmarks at real ViT shapes against their natural PyTorch baselines (and torch.compile of them).

The cases come from the op registry (``OpSpec.bench``, next to each op's launcher); composites of several
ops (the MLP half-block) are defined here."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.registry import BenchCase, randn, registered_ops
from ..tolerance import agreement_limit, max_error
from .models import CONFIGS
from .timing import device_info, measured_peaks, on_gpu, rounds_summary, time_ms


def mlp_cases(size, batch, dtype, device):
    """The MLP half-block: x + fc2(GELU(fc1(LN(x))))."""
    e = size["emb"]
    n = (size["img"] // size["patch"]) ** 2 + 1
    x = randn(batch, n, e, dtype=dtype, device=device)
    norm = torch.nn.LayerNorm(e, eps=1e-6).to(device, dtype)
    fc1, fc2 = torch.nn.Linear(e, 4 * e).to(device, dtype), torch.nn.Linear(4 * e, e).to(device, dtype)

    def ours():
        h = ops.layer_norm(x, norm.weight, norm.bias, 1e-6)
        h = ops.linear(h, fc1.weight, fc1.bias, activation="gelu")
        return ops.linear(h, fc2.weight, fc2.bias, residual=x)

    def eager():
        return x + fc2(F.gelu(fc1(norm(x))))

    yield BenchCase(ours, {"eager nn.Module": eager}, flops=2 * 2 * batch * n * e * 4 * e, label="half-block")


COMPOSITES = {"mlp": mlp_cases}


def op_suites() -> dict:
    """{name: bench(size, batch, dtype, device)}: every registered op with a benchmark, then the composites."""
    return {**{spec.name: spec.bench for spec in registered_ops() if spec.bench is not None}, **COMPOSITES}


def run_ops(op_names=None, models=("vit_b_16",), batches=(256,), dtype=torch.bfloat16,
            compile_baselines=False, repeats=1, progress=print) -> dict:
    """Time each op and its baselines (checked against ours first: relative max error <= 5% in 16-bit; random
    ops by their fraction of zeros), interleaved, ``repeats`` rounds: medians, min, max and the per-round range
    of our speed-up over each baseline. ``op_names`` defaults to every suite."""
    suites = op_suites()
    op_names = list(suites) if op_names is None else op_names
    unknown = set(op_names) - set(suites)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {sorted(suites)}")
    device = "cuda" if on_gpu() else "cpu"
    peaks = measured_peaks(dtype)
    rows = []
    with torch.no_grad():
        for op in op_names:
            for name in models:
                for batch in batches:
                    for case in suites[op](CONFIGS[name], batch, dtype, device):
                        rows += _run_case(f"{op} {case.label}".strip(), f"{name} B={batch}", case,
                                          compile_baselines and on_gpu(), peaks, repeats, progress)
    return dict(device=device_info(), benchmark="ops", dtype=str(dtype).replace("torch.", ""), peaks=peaks,
                repeats=repeats, rows=rows)


def _difference(ours: torch.Tensor, other: torch.Tensor, exact: bool) -> tuple:
    """(error, limit): the max difference and what it may be (5% of the scale in 16-bit, 1e-3 in fp32), or for
    random ops the difference in the fraction of zeros (at most 0.02)."""
    if not exact:
        return abs((ours == 0).float().mean().item() - (other == 0).float().mean().item()), 0.02
    return max_error(ours, other), agreement_limit(other, ours.dtype)


def _run_case(op: str, shape: str, case: BenchCase, compile_baselines: bool, peaks: dict, repeats: int,
              progress) -> list:
    reference = case.ours()
    baselines = dict(case.baselines)
    if compile_baselines:
        for label, fn in case.baselines.items():
            if not label.startswith("sdpa"):  # SDPA backends are already fused kernels
                baselines[f"torch.compile({label})"] = torch.compile(fn, dynamic=False)
    runnable, errors = {"ours": case.ours}, {}
    for label, fn in baselines.items():
        try:
            out = fn()
        except RuntimeError as exc:  # an SDPA backend that does not take this shape or dtype
            progress(f"  {op} {shape}: {label} unavailable ({str(exc).splitlines()[0][:70]})")
            continue
        errors[label], limit = _difference(reference, out, case.exact)
        if not errors[label] <= limit:
            raise AssertionError(f"{op} {shape}: ours differs from {label} by {errors[label]:.3g}")
        runnable[label] = fn
    rounds = {label: [] for label in runnable}
    for _ in range(repeats):  # interleaved rounds
        for label, fn in runnable.items():
            rounds[label].append(time_ms(fn))
    timings = {label: statistics.median(samples) for label, samples in rounds.items()}
    rows = []
    best = min((ms for label, ms in timings.items() if label != "ours"), default=None)
    for label, ms in timings.items():
        tflops = case.flops / ms / 1e9 if case.flops and on_gpu() else None
        gbps = case.nbytes / ms / 1e6 if case.nbytes and on_gpu() else None
        # ratio_*: the range of this row's per-round ours_speedup
        rows.append(dict(op=op, shape=shape, impl=label, ms=ms, ms_min=min(rounds[label]),
                         ms_max=max(rounds[label]), rounds=rounds[label],
                         **rounds_summary(rounds[label], rounds["ours"]), tflops=tflops, gbps=gbps,
                         frac_of_peak=(tflops / peaks["gemm_tflops"] if tflops and peaks["gemm_tflops"] else
                                       gbps / peaks["copy_gbps"] if gbps and peaks["copy_gbps"] else None),
                         ours_speedup=ms / timings["ours"], max_error_vs_ours=errors.get(label, 0.0)))
        progress(f"  {op:<22} {shape:<16} {label:<34} {ms:9.4f} ms"
                 + (f" {tflops:6.1f} TFLOP/s" if tflops else "") + (f" {gbps:7.0f} GB/s" if gbps else "")
                 + ("" if on_gpu() else "  (CPU)"))
    if best:
        for r in rows:
            r["speedup_ours_vs_best_baseline"] = best / timings["ours"]
    return rows


def ops_headline(result: dict) -> dict:
    """The headline's attention figure: ViT-B/16 at batch 256 (N = 197, 12 heads x 64) in bf16 on a GPU, the
    fastest SDPA backend's time over ours; {} when this run did not measure it."""
    if result["device"]["gpu"] is None or result["dtype"] != "bfloat16":
        return {}
    here = [r for r in result["rows"] if r["op"] == "attention" and r["shape"] == "vit_b_16 B=256"]
    ours = next((r["ms"] for r in here if r["impl"] == "ours"), None)
    sdpa = [r["ms"] for r in here if r["impl"].startswith("sdpa")]
    return {"attention_n197_vs_best_sdpa": min(sdpa) / ours} if ours and sdpa else {}
