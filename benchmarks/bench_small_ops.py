"""LayerNorm, patch embedding and the head at ViT-B/16 shapes vs their eager PyTorch baselines. One process.

    PYTHONPATH=$PWD python benchmarks/bench_small_ops.py [--batch 256] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.patch_embed import patch_embed_torch

from common import do_bench_ms, save_results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = parser.parse_args()
    dtype, B, E = getattr(torch, args.dtype), args.batch, 768
    dev = dict(device="cuda", dtype=dtype)
    x = torch.randn(B, 197, E, **dev)
    w, b = torch.randn(E, **dev), torch.randn(E, **dev)
    img = torch.randn(B, 3, 224, 224, **dev)
    conv_w, cls, pos = torch.randn(E, 3, 16, 16, **dev) * 0.05, torch.randn(1, E, **dev), torch.randn(197, E, **dev)
    head_w = torch.randn(1000, E, **dev) * 0.03
    cases = {
        "layer_norm": (lambda: ops.layer_norm(x, w, b, 1e-6), lambda: F.layer_norm(x, (E,), w, b, 1e-6),
                       2 * x.numel() * x.element_size()),
        "patch_embed": (lambda: ops.patch_embed(img, conv_w, b, cls, pos),
                        lambda: patch_embed_torch(img, conv_w, b, cls, pos, True),
                        img.numel() * img.element_size() + x.numel() * x.element_size()),
        "head (mean+LN+linear)": (lambda: ops.classification_head(x, w, b, 1e-5, head_w, None),
                                  lambda: F.linear(F.layer_norm(x.mean(1), (E,), w, b, 1e-5), head_w),
                                  x.numel() * x.element_size()),
    }
    rows = []
    for name, (ours, theirs, nbytes) in cases.items():
        err = (ours().float() - theirs().float()).abs().max().item()
        assert err < 0.25, f"{name}: max error {err}"
        t_ours, t_torch = do_bench_ms(ours), do_bench_ms(theirs)
        rows.append(dict(op=name, batch=B, ours_ms=t_ours, torch_ms=t_torch, speedup=t_torch / t_ours,
                         ours_gbps=nbytes / t_ours / 1e6))
        print(f"{name:<22} ours {t_ours:.4f} ms ({nbytes / t_ours / 1e6:.0f} GB/s) | torch {t_torch:.4f} ms | "
              f"x{t_torch / t_ours:.2f}", flush=True)
    save_results("small_ops", dict(benchmark="bench_small_ops", dtype=args.dtype, rows=rows))


if __name__ == "__main__":
    main()
