"""End-to-end inference: fused ViT-B/16 vs the reference (eager) and timm (eager, SDPA), one process.

Every model's output is checked against an fp32 run before it is timed. Times are triton.testing.do_bench
medians; batch 1 is also timed as a CUDA-graph replay. Results: benchmarks/results/vit_<card>_<date>.json.

    PYTHONPATH=$PWD python benchmarks/bench_vit.py [--batches 1 8 64 256] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import sys

import torch

import vit_kernels
from vit_kernels import reference

from common import cuda_graph_ms, do_bench_ms, save_results

GFLOP_PER_IMAGE = {"vit_b_16": 35.2}  # forward, 2 x MACs, as in the GPU-round issues


def build(dtype):
    import timm

    torch.manual_seed(0)
    cfg = dict(in_channels=3, patch_size=16, emb_size=768, img_size=224, depth=12, n_classes=1000, num_heads=12,
               scaling="paper")
    ref = reference.ViT(**cfg).cuda().eval()
    fused = vit_kernels.ViT(**cfg).cuda().eval()
    fused.load_state_dict(ref.state_dict())
    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().eval()
    timm_fused = vit_kernels.from_timm(timm_model)
    models = {"ours (tutorial ViT)": fused, "reference eager": ref, "ours (from_timm)": timm_fused,
              "timm eager (SDPA)": timm_model}
    return {name: m.to(dtype) for name, m in models.items()}


def check(models, x):
    """Outputs of the fused models against their eager twins at the benchmark precision."""
    with torch.no_grad():
        pairs = [("ours (tutorial ViT)", "reference eager"), ("ours (from_timm)", "timm eager (SDPA)")]
        for ours, theirs in pairs:
            err = (models[ours](x).float() - models[theirs](x).float()).abs().max().item()
            scale = models[theirs](x).float().abs().max().item()
            if not err <= 0.05 * max(scale, 1.0):
                sys.exit(f"{ours} disagrees with {theirs}: max error {err:.3g} (scale {scale:.3g})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    models = build(dtype)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
        check(models, x)
        for name, model in models.items():
            with torch.no_grad():
                ms = do_bench_ms(lambda: model(x))
                graph_ms = cuda_graph_ms(lambda: model(x)) if batch == 1 else None
            rows.append(dict(model=name, batch=batch, dtype=args.dtype, ms=ms, img_per_s=batch / ms * 1e3,
                             tflops=GFLOP_PER_IMAGE["vit_b_16"] * batch / ms / 1e3, graph_ms=graph_ms))
            print(f"batch {batch:4d} {name:<22} {ms:8.3f} ms  {batch / ms * 1e3:9.0f} img/s"
                  + (f"  graph {graph_ms:.3f} ms" if graph_ms else ""), flush=True)
        base = {r["model"]: r["ms"] for r in rows if r["batch"] == batch}
        for r in rows:
            if r["batch"] == batch:
                r["speedup_vs_timm_eager"] = base["timm eager (SDPA)"] / r["ms"]
                r["speedup_vs_reference"] = base["reference eager"] / r["ms"]
    save_results("vit", dict(benchmark="bench_vit", model="ViT-B/16 224", rows=rows), args.out)


if __name__ == "__main__":
    main()
