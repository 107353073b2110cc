"""End-to-end inference: img/s, MFU and CUDA-graph batch-1 latency for each model x batch x candidate."""
from __future__ import annotations

import torch

from ..tolerance import agreement_limit, max_error
from .models import CONFIGS, build_candidates, gflop_per_image
from .timing import cuda_graph_ms, device_info, measured_peaks, on_gpu, time_ms

HEADLINE_KEYS = ("gpu", "bs256_img_s", "bs256_vs_timm_eager", "bs256_vs_compile_max_autotune", "bs256_mfu",
                 "bs1_latency_ms", "bs1_vs_timm_eager", "train_bs128_vs_compile", "train_bs128_vs_timm_eager",
                 "train_bs128_peak_vs_timm_eager")  # the train_* keys come from `bench --train` (bench/train.py)
OURS, TIMM = "ours (from_timm)", "timm eager (SDPA)"


def run_e2e(models=("vit_b_16",), batches=(1, 8, 32, 64, 128, 256), dtype=torch.bfloat16, compile_modes=(),
            compile_batches=None, progress=print) -> dict:
    """Rows for every model x batch x candidate, plus the ViT-B/16 headline. Outputs are checked against the
    eager twin (relative max error <= 5% in 16-bit, 1e-3 in fp32) before anything is timed. torch.compile
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
            with torch.no_grad():
                here = {cand: entry for cand, entry in candidates.items()
                        if "compile" not in cand or compile_batches is None or batch in compile_batches}
                outputs = {cand: model(x) for cand, (model, _) in here.items()}
                for cand, (model, twin) in here.items():
                    err = None if twin is None else max_error(outputs[cand], outputs[twin])
                    if err is not None and not err <= agreement_limit(outputs[twin], dtype):
                        raise AssertionError(f"{name} batch {batch}: {cand} differs from {twin} by {err:.3g}")

                    def forward(model=model, x=x):
                        return model(x)

                    ms = time_ms(forward)
                    # compiled candidates manage their own graphs (max-autotune replays CUDA graphs already)
                    graph = cuda_graph_ms(forward) if batch == 1 and "compile" not in cand else None
                    tflops = gflop * batch / ms if on_gpu() else None
                    rows.append(dict(model=name, batch=batch, dtype=str(dtype).replace("torch.", ""), candidate=cand,
                                     ms=ms, img_per_s=batch / ms * 1e3, tflops=tflops,
                                     mfu=None if tflops is None or not peak else tflops / peak, graph_ms=graph,
                                     max_error_vs_twin=err))
                    progress(f"[{done}/{total}] {name} batch {batch} {cand:<34} {ms:9.3f} ms"
                             + (f"  graph {graph:.3f} ms" if graph else "") + ("" if on_gpu() else "  (CPU)"))
            _ratios(rows, name, batch)
    return dict(device=device_info(), benchmark="e2e", peak_gemm_tflops=peak, gflop_per_image={
        m: gflop_per_image(m) for m in models}, rows=rows, headline=headline(rows, dtype))


def _ratios(rows, name, batch):
    here = [r for r in rows if r["model"] == name and r["batch"] == batch]
    base = {r["candidate"]: r["ms"] for r in here}
    for r in here:
        r["speedup_vs_timm_eager"] = base[TIMM] / r["ms"]
        r["speedup_vs_reference"] = base["reference eager"] / r["ms"]


def headline(rows, dtype) -> dict:
    """ViT-B/16 at 224 in bf16: the figures the GPU rounds track (None where not measured)."""
    head = dict.fromkeys(HEADLINE_KEYS)
    if not on_gpu() or dtype != torch.bfloat16:
        return head

    def find(batch, cand):
        return next((r for r in rows if r["model"] == "vit_b_16" and r["batch"] == batch
                     and r["candidate"] == cand), None)

    head["gpu"] = torch.cuda.get_device_name(0)
    ours256, timm256 = find(256, OURS), find(256, TIMM)
    if ours256 and timm256:
        head.update(bs256_img_s=ours256["img_per_s"], bs256_vs_timm_eager=timm256["ms"] / ours256["ms"],
                    bs256_mfu=ours256["mfu"])
        compiled = find(256, "timm torch.compile (max-autotune)")
        if compiled:
            head["bs256_vs_compile_max_autotune"] = compiled["ms"] / ours256["ms"]
    ours1, timm1 = find(1, OURS), find(1, TIMM)
    if ours1 and timm1 and ours1["graph_ms"]:
        head.update(bs1_latency_ms=ours1["graph_ms"], bs1_vs_timm_eager=timm1["ms"] / ours1["graph_ms"])
    return head
