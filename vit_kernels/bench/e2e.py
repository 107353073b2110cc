"""End-to-end inference: img/s, MFU and CUDA-graph batch-1 latency for each model x batch x candidate."""
from __future__ import annotations

import contextlib
import statistics

import torch

from ..tolerance import agreement_limit, max_error
from .models import CONFIGS, GRAPH_MAX_BATCH, OURS, OURS_GRAPHS, TIMM, build_candidates, gflop_per_image
from .timing import cuda_graph_ms, device_info, measured_peaks, on_gpu, rounds_summary, time_ms

# the figures the GPU rounds track (issue 20); each is a number or None with a reason in "headline_missing"
HEADLINE_KEYS = ("gpu", "torch", "triton", "clock_mhz", "peak_gemm_tflops", "bs256_img_s", "bs256_vs_timm_eager",
                 "bs256_vs_compile_max_autotune", "bs256_mfu", "bs64_eager_vs_timm_eager", "bs1_eager_ms",
                 "bs1_eager_vs_timm_eager", "bs1_latency_ms", "bs1_graph_vs_timm_graph",
                 "bs1_graph_vs_compile_cudagraphs", "bs1_graph_runner_ms", "bs1_graph_runner_vs_compile_cudagraphs",
                 "attention_n197_vs_best_sdpa", "train_bs128_vs_compile", "train_bs128_vs_timm_eager",
                 "train_bs128_peak_vs_timm_eager")


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    previous, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def run_e2e(models=("vit_b_16",), batches=(1, 8, 32, 64, 128, 256), dtype=torch.bfloat16, compile_modes=(),
            compile_batches=None, repeats=3, progress=print, partial=None) -> dict:
    """Rows for every model x batch x candidate, plus the ViT-B/16 headline.

    Every candidate's output is checked against its twin (relative max error <= 5% in 16-bit, 1e-3 in fp32)
    before anything is timed. Then the candidates are timed interleaved, the whole round ``repeats`` times: each
    row has the median, min and max of its rounds (each round >= 1 s and >= 50 samples on a GPU), its CUDA-graph
    replay time for eager candidates at batch <= 64, and its speed-up over timm eager with the spread of the
    per-round ratios (``ratio_spread_crosses_1`` flags a comparison the noise could flip). torch.compile
    candidates run only at ``compile_batches`` (default: every batch): each new batch size recompiles."""
    device = "cuda" if on_gpu() else "cpu"
    peak = measured_peaks(dtype)["gemm_tflops"]
    rows, total, done = [], len(models) * len(batches), 0
    for name in models:
        candidates = build_candidates(name, dtype, device, compile_modes if on_gpu() else ())
        gflop = gflop_per_image(name)
        for batch in batches:
            done += 1
            x = torch.randn(batch, 3, CONFIGS[name]["img"], CONFIGS[name]["img"], device=device, dtype=dtype)
            here = {cand: c for cand, c in candidates.items() if c.runs_at(batch) and (
                "compile" not in cand or compile_batches is None or batch in compile_batches)}
            with torch.no_grad():
                errors = _check(name, batch, here, x, dtype)
                times = {cand: [] for cand in here}
                graphs = {cand: [] for cand in here}
                for _ in range(repeats):  # interleaved: drift in clocks or temperature hits every candidate alike
                    for cand, c in here.items():
                        def forward(model=c.model, x=x):
                            return model(x)

                        with cudnn_benchmark(c.cudnn_benchmark):
                            times[cand].append(time_ms(forward))
                            if c.graph and batch <= GRAPH_MAX_BATCH and on_gpu():
                                graphs[cand].append(cuda_graph_ms(forward))
            for cand in here:
                ms = statistics.median(times[cand])
                graph = [g for g in graphs[cand] if g is not None]
                tflops = gflop * batch / ms if on_gpu() else None
                rows.append(dict(model=name, batch=batch, dtype=str(dtype).replace("torch.", ""), candidate=cand,
                                 ms=ms, ms_min=min(times[cand]), ms_max=max(times[cand]), rounds=times[cand],
                                 img_per_s=batch / ms * 1e3, tflops=tflops,
                                 mfu=None if tflops is None or not peak else tflops / peak,
                                 graph_ms=statistics.median(graph) if graph else None, max_error_vs_twin=errors[cand]))
                progress(f"[{done}/{total}] {name} batch {batch} {cand:<44} {ms:9.3f} ms"
                         + (f"  graph {rows[-1]['graph_ms']:.3f} ms" if graph else "")
                         + ("" if on_gpu() else "  (CPU)"))
            _ratios(rows, name, batch)
            if partial is not None:
                partial(dict(device=device_info(), benchmark="e2e", complete=False, repeats=repeats, rows=rows))
    head, missing = headline(rows, dtype, peak)
    return dict(device=device_info(), benchmark="e2e", repeats=repeats, peak_gemm_tflops=peak, gflop_per_image={
        m: gflop_per_image(m) for m in models}, rows=rows, headline=head, headline_missing=missing)


def _check(name, batch, here, x, dtype) -> dict:
    """Each candidate's max error against its twin's output; AssertionError if over the agreement limit."""
    outputs = {}
    for cand, c in here.items():
        with cudnn_benchmark(c.cudnn_benchmark):
            outputs[cand] = c.model(x)
    errors = {}
    for cand, c in here.items():
        errors[cand] = None if c.twin is None else max_error(outputs[cand], outputs[c.twin])
        if errors[cand] is not None and not errors[cand] <= agreement_limit(outputs[c.twin], dtype):
            raise AssertionError(f"{name} batch {batch}: {cand} differs from {c.twin} by {errors[cand]:.3g}")
    return errors


def _ratios(rows, name, batch):
    """Speed-ups over timm eager and the reference: of the medians, and the range of the per-round ratios."""
    here = [r for r in rows if r["model"] == name and r["batch"] == batch]
    by_cand = {r["candidate"]: r for r in here}
    for r in here:
        for key, base in (("timm_eager", by_cand[TIMM]), ("reference", by_cand.get("reference eager"))):
            r[f"speedup_vs_{key}"] = None if base is None else base["ms"] / r["ms"]  # families: no reference
        spread = rounds_summary(by_cand[TIMM]["rounds"], r["rounds"])
        r["speedup_vs_timm_eager_min"], r["speedup_vs_timm_eager_max"] = spread["ratio_min"], spread["ratio_max"]
        r["ratio_spread_crosses_1"] = spread["ratio_spread_crosses_1"]


def headline(rows, dtype, peak_gemm_tflops=None) -> tuple[dict, dict]:
    """ViT-B/16 at 224 in bf16, ``from_timm`` vs timm: the headline figures and, for each one left None, why.
    The attention and train_* figures come from the same ``vit-kernels bench`` run's op and training benchmarks
    (``merge_headline``); nothing is carried over from an earlier run."""
    import triton

    from .timing import clock_mhz

    head = dict.fromkeys(HEADLINE_KEYS)
    head.update(torch=torch.__version__, triton=triton.__version__)
    if not on_gpu():
        return head, {k: "CPU run: no GPU timings" for k, v in head.items() if v is None}
    head.update(gpu=torch.cuda.get_device_name(0), clock_mhz=clock_mhz(), peak_gemm_tflops=peak_gemm_tflops)
    missing = {}
    if dtype != torch.bfloat16:
        return head, {k: f"run in {dtype}, the headline is bf16" for k, v in head.items() if v is None}

    def find(batch, cand):
        return next((r for r in rows if r["model"] == "vit_b_16" and r["batch"] == batch
                     and r["candidate"] == cand), None)

    ours256, timm256, compiled256 = find(256, OURS), find(256, TIMM), find(256, "timm torch.compile (max-autotune)")
    if ours256 and timm256:
        head.update(bs256_img_s=ours256["img_per_s"], bs256_vs_timm_eager=timm256["ms"] / ours256["ms"],
                    bs256_mfu=ours256["mfu"])
        if compiled256:
            head["bs256_vs_compile_max_autotune"] = compiled256["ms"] / ours256["ms"]
    ours64, timm64 = find(64, OURS), find(64, TIMM)
    if ours64 and timm64:
        head["bs64_eager_vs_timm_eager"] = timm64["ms"] / ours64["ms"]
    ours1, timm1 = find(1, OURS), find(1, TIMM)
    if ours1 and timm1:
        head.update(bs1_eager_ms=ours1["ms"], bs1_eager_vs_timm_eager=timm1["ms"] / ours1["ms"],
                    bs1_latency_ms=ours1["graph_ms"])
        if ours1["graph_ms"] and timm1["graph_ms"]:
            head["bs1_graph_vs_timm_graph"] = timm1["graph_ms"] / ours1["graph_ms"]
        graphs = [r["ms"] for r in (find(1, "timm torch.compile (reduce-overhead)"),
                                    find(1, "timm torch.compile (max-autotune)")) if r]  # both replay CUDA graphs
        if graphs and ours1["graph_ms"]:
            head["bs1_graph_vs_compile_cudagraphs"] = min(graphs) / ours1["graph_ms"]
        runner1 = find(1, OURS_GRAPHS)  # a whole call of the graph runner: copy in, replay, clone out
        if runner1:
            head["bs1_graph_runner_ms"] = runner1["ms"]
            if graphs:
                head["bs1_graph_runner_vs_compile_cudagraphs"] = min(graphs) / runner1["ms"]
    for key, value in head.items():
        if value is None:
            missing[key] = _why_missing(key)
    return head, missing


def _why_missing(key: str) -> str:
    if key in ("bs1_graph_vs_compile_cudagraphs", "bs1_graph_runner_vs_compile_cudagraphs"):
        return "no torch.compile reduce-overhead / max-autotune baseline at batch 1 in this run (--compile)"
    if key.startswith("train_"):
        return "the training benchmark did not run (vit-kernels bench --train)"
    if key == "attention_n197_vs_best_sdpa":
        return "the attention op benchmark at ViT-B/16 did not run (vit-kernels bench --ops attention)"
    if key == "bs256_vs_compile_max_autotune":
        return "no torch.compile max-autotune candidate at batch 256 in this run"
    return "vit_b_16 (ViT-B/16) at this batch was not in this run"


def merge_headline(result: dict, figures: dict) -> None:
    """Fill headline keys measured by another benchmark of the same run (training, per-op)."""
    for key, value in figures.items():
        if key in result["headline"] and value is not None:
            result["headline"][key] = value
            result["headline_missing"].pop(key, None)
