"""The fused GEMM at ViT-B/16 shapes (qkv, proj+residual, fc1+GELU, fc2+residual) vs cuBLAS (F.linear plus the
eager epilogue), with --sweep timing every candidate tile config of our kernel on its own. One process.

    PYTHONPATH=$PWD python benchmarks/bench_linear.py [--batch 256] [--dtype bfloat16] [--sweep]
"""
from __future__ import annotations

import argparse

import torch

from vit_kernels import ops
from vit_kernels.ops._common import config
from vit_kernels.ops.linear import LINEAR, linear_launch, linear_torch

from common import do_bench_ms, save_results

SHAPES = {  # name: (N, K, epilogue)
    "qkv": (2304, 768, dict()),
    "proj+res": (768, 768, dict(residual=True)),
    "fc1+gelu": (3072, 768, dict(activation="gelu")),
    "fc2+res": (768, 3072, dict(residual=True)),
}
SWEEP = [config(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, SPLIT_EPILOGUE=split)
         for m, n, k, w, s, split in [(128, 256, 64, 8, 3, True), (128, 256, 64, 8, 4, True),
                                      (256, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, False),
                                      (256, 128, 64, 8, 3, False),
                                      (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 4, True),
                                      (128, 128, 64, 8, 3, False), (128, 64, 64, 4, 4, False),
                                      (64, 128, 64, 4, 4, False), (64, 64, 64, 4, 5, False)]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    M = args.batch * 197
    rows = []
    for name, (N, K, epi) in SHAPES.items():
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5
        b = torch.randn(N, device="cuda", dtype=dtype)
        res = torch.randn(M, N, device="cuda", dtype=dtype) if epi.get("residual") else None
        act = epi.get("activation")
        expected = linear_torch(x, w, b, act, None, res)
        ours = ops.linear(x, w, b, activation=act, residual=res)
        assert (ours.float() - expected.float()).abs().max().item() < 0.1
        flops = 2 * M * N * K
        t_ours = do_bench_ms(lambda: ops.linear(x, w, b, activation=act, residual=res))
        t_torch = do_bench_ms(lambda: linear_torch(x, w, b, act, None, res))
        t_gemm = do_bench_ms(lambda: torch.mm(x, w.t()))
        best = LINEAR.tuned.best_config
        rows.append(dict(shape=name, M=M, N=N, K=K, ours_ms=t_ours, torch_ms=t_torch, cublas_gemm_only_ms=t_gemm,
                         ours_tflops=flops / t_ours / 1e9, cublas_tflops=flops / t_gemm / 1e9,
                         speedup_vs_torch=t_torch / t_ours, best_config=str(best)))
        print(f"{name:<9} M={M} N={N} K={K}: ours {t_ours:.3f} ms ({flops / t_ours / 1e9:.0f} TFLOP/s, {best}) | "
              f"torch {t_torch:.3f} ms | cuBLAS mm alone {t_gemm:.3f} ms ({flops / t_gemm / 1e9:.0f} TFLOP/s)",
              flush=True)
        if args.sweep:
            for cfg in SWEEP:
                label = f"{cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
                run = lambda: linear_launch(x, w, b, act, None, res, config=cfg)  # noqa: E731
                try:
                    run()
                    t = do_bench_ms(run)
                except Exception as exc:  # out of resources etc.
                    print(f"    {label}: {type(exc).__name__}")
                    continue
                rows.append(dict(shape=name, sweep_config=label, ms=t, tflops=flops / t / 1e9))
                print(f"    {label}: {t:.3f} ms {flops / t / 1e9:.0f} TFLOP/s", flush=True)
    save_results("linear", dict(benchmark="bench_linear", batch=args.batch, dtype=args.dtype, rows=rows))


if __name__ == "__main__":
    main()
