"""The fused GEMM at ViT shapes (qkv, proj+residual, fc1+GELU, fc2+residual) vs F.linear + eager epilogue
(see `vit-kernels bench --help`). With --sweep it instead times every candidate tile config of both engines
(pointer and TMA) on its own, and cuBLAS's plain GEMM (F.linear, no epilogue) on the same shape, at ViT-B/16
batch 1, 64 and 256 (--batch picks some): the tool behind the config lists in vit_kernels/ops/linear.py.

    PYTHONPATH=$PWD python benchmarks/bench_linear.py [--model vit_b_16] [--batch 256] [--dtype bfloat16]
    PYTHONPATH=$PWD python benchmarks/bench_linear.py --sweep
"""
import json
import sys

import torch

from vit_kernels.bench.timing import device_info, save_json, time_ms
from vit_kernels.cli import main
from vit_kernels.ops.launch import config
from vit_kernels.ops.linear import TMA_CONFIGS, linear_launch, linear_torch

SHAPES = {"qkv": (2304, 768, None, False), "proj+res": (768, 768, None, True), "fc1+gelu": (3072, 768, "gelu", False),
          "fc2+res": (768, 3072, None, True)}
SWEEP = [config(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, SPLIT_EPILOGUE=split)
         for m, n, k, w, s, split in [(128, 256, 64, 8, 3, True), (128, 256, 64, 8, 4, True),
                                      (256, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, False),
                                      (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 3, False),
                                      (128, 64, 64, 4, 4, False), (64, 128, 64, 4, 4, False),
                                      (64, 64, 64, 4, 5, False)]] + TMA_CONFIGS


def sweep(batches=(1, 64, 256), dtype=torch.bfloat16) -> None:
    rows = []
    for batch in batches:
        sweep_batch(batch, dtype, rows)
    path = save_json("benchmarks/results", "linear_sweep", dict(device=device_info(), rows=rows))
    print(f"saved {path}")


def sweep_batch(batch, dtype, rows) -> None:
    m = batch * 197
    for name, (n, k, act, residual) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
        b = torch.randn(n, device="cuda", dtype=dtype)
        res = torch.randn(m, n, device="cuda", dtype=dtype) if residual else None
        expected = linear_torch(x, w, b, act, None, res).float()
        ms = time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        rows.append(dict(shape=name, batch=batch, M=m, N=n, K=k, config="cuBLAS F.linear, no bias or epilogue",
                         ms=ms, tflops=2 * m * n * k / ms / 1e9))
        print(f"{name:<9} batch {batch} cuBLAS plain: {ms:.3f} ms {rows[-1]['tflops']:.0f} TFLOP/s", flush=True)
        for cfg in SWEEP:
            label = f"{cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
            def run(x=x, w=w, b=b, act=act, res=res, cfg=cfg):
                return linear_launch(x, w, b, act, None, res, config=cfg)
            try:
                err = (run().float() - expected).abs().max().item()
                ms = time_ms(run)
            except Exception as exc:  # out of resources: not a candidate on this card
                print(f"{name:<9} {label}: {type(exc).__name__}")
                continue
            rows.append(dict(shape=name, batch=batch, M=m, N=n, K=k, config=label, ms=ms,
                             tflops=2 * m * n * k / ms / 1e9, max_error=err,
                             engine="tma" if cfg.kwargs.get("PERSISTENT") else "pointer"))
            print(f"{name:<9} batch {batch} {label}: {ms:.3f} ms {rows[-1]['tflops']:.0f} TFLOP/s (err {err:.2g})",
                  flush=True)
        best = min((r for r in rows if r["shape"] == name and r["batch"] == batch), key=lambda r: r["ms"])
        print(json.dumps(best))


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        batches = [int(a) for a in sys.argv[sys.argv.index("--batch") + 1:] if a.isdigit()] if "--batch" in sys.argv \
            else (1, 64, 256)
        sweep(batches)
    else:
        sys.exit(main(["bench", "--no-e2e", "--ops", "linear", *sys.argv[1:]]))
