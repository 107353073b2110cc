"""Attention forward at ViT shapes: our fused-qkv flash kernel vs F.scaled_dot_product_attention with each
backend pinned (flash, efficient, cuDNN, math) and the tutorial's einsum attention. One process.

SDPA gets q, k, v already split ([B, H, N, D] views of the same qkv buffer, as timm passes them); our kernel
reads the [B, N, 3E] buffer directly. Results checked against the math backend before timing.

    PYTHONPATH=$PWD python benchmarks/bench_attention.py [--batches 64 256] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vit_kernels import ops
from vit_kernels.ops.attention import split_qkv

from common import do_bench_ms, save_results

BACKENDS = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa math": SDPBackend.MATH}


def sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def einsum_attention(q, k, v):
    att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", att, v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    H, D, N = args.heads, args.head_dim, args.tokens
    rows = []
    for B in args.batches:
        qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype)
        q, k, v = split_qkv(qkv, H, "qkv h d")
        expected = sdpa(SDPBackend.MATH, q.float(), k.float(), v.float()).transpose(1, 2).reshape(B, N, H * D)
        candidates = {"ours qkv h d": lambda: ops.attention(qkv, H, "qkv h d", "paper"),
                      "ours h d qkv": lambda: ops.attention(qkv, H, "h d qkv", "paper"),
                      "einsum (tutorial)": lambda: einsum_attention(q, k, v)}
        candidates.update({name: (lambda b=b: sdpa(b, q, k, v)) for name, b in BACKENDS.items()})
        flops = 4 * B * H * N * N * D
        for name, fn in candidates.items():
            try:
                out = fn()
            except RuntimeError as exc:  # a backend that does not take this shape/dtype
                print(f"B={B} {name}: unavailable ({str(exc).splitlines()[0][:80]})")
                continue
            if out.dim() == 4:
                out = out.transpose(1, 2).reshape(B, N, H * D)
            if name.startswith("ours h d qkv"):
                q2, k2, v2 = split_qkv(qkv.float(), H, "h d qkv")
                ref = sdpa(SDPBackend.MATH, q2, k2, v2).transpose(1, 2).reshape(B, N, H * D)
            else:
                ref = expected
            err = (out.float() - ref).abs().max().item()
            assert err < 0.05, f"{name} wrong: max error {err}"
            ms = do_bench_ms(fn)
            rows.append(dict(impl=name, batch=B, tokens=N, heads=H, head_dim=D, dtype=args.dtype, ms=ms,
                             tflops=flops / ms / 1e9, max_error=err))
            print(f"B={B:4d} {name:<18} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s  err {err:.2e}", flush=True)
        best_sdpa = min((r["ms"] for r in rows if r["batch"] == B and r["impl"].startswith("sdpa")), default=None)
        for r in rows:
            if r["batch"] == B and best_sdpa:
                r["speedup_vs_best_sdpa"] = best_sdpa / r["ms"]
    save_results("attention", dict(benchmark="bench_attention", rows=rows))


if __name__ == "__main__":
    main()
