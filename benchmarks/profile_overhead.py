"""Where the host time of a fused forward goes (small batches are launch-bound): CPU issue time per forward
and per op entry point, and a cProfile of repeated forwards.

    PYTHONPATH=$PWD python benchmarks/profile_overhead.py [--batch 1]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import vit_kernels
from vit_kernels import ops
from vit_kernels.bench.timing import device_info, save_json
from vit_kernels.ops.linear import linear_launch


def issue_us(fn, n=200):
    """Mean host microseconds to issue fn (GPU work queued, not awaited)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = vit_kernels.ViT(emb_size=768, num_heads=12, scaling="paper").cuda().eval().to(torch.bfloat16)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(args.batch * 197, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2304, 768, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2304, device="cuda", dtype=torch.bfloat16)
    rows = {}
    with torch.no_grad():
        rows["forward (no_grad)"] = issue_us(lambda: model(x), 20)
        rows["ops.linear (no_grad)"] = issue_us(lambda: ops.linear(h, w, b))
        rows["linear_launch (autotuner)"] = issue_us(lambda: linear_launch(h, w, b))
        rows["torch.empty"] = issue_us(lambda: torch.empty(10, device="cuda"))
        rows["F.linear"] = issue_us(lambda: torch.nn.functional.linear(h, w, b))
        rows["ops.layer_norm"] = issue_us(lambda: ops.layer_norm(h, w[0], b[:768], 1e-5))
    rows["forward (grad enabled)"] = issue_us(lambda: model(x), 20)
    rows["ops.linear (grad enabled)"] = issue_us(lambda: ops.linear(h, w, b))
    for name, us in rows.items():
        print(f"{name:<28} {us:9.1f} us issue time")
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(10):
            model(x)
        profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    path = save_json("benchmarks/results", "overhead", dict(device=device_info(), benchmark="profile_overhead",
                                                            batch=args.batch, issue_us=rows,
                                                            cprofile_top=text.getvalue()))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
