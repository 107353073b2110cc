"""Train the drop-in fused ViT for a few steps on synthetic data: AdamW, autocast, loss and img/s printed.

    python examples/train.py                    # GPU: ViT-S/16 at 224, bf16 autocast
    python examples/train.py --steps 5          # CPU: a tiny model in Triton's interpreter, fp16 autocast

The batch is fixed, so a falling loss shows the gradients through the kernels are working.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before vit_kernels defines its kernels

import vit_kernels
from vit_kernels.configs import tutorial_kwargs

CONFIGS = {name: tutorial_kwargs(name) for name in ("tiny", "vit_s_16")}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), help="default: vit_s_16 on a GPU, tiny on a CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, help="default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = CONFIGS[args.config or ("vit_s_16" if device == "cuda" else "tiny")]
    batch = args.batch or (64 if device == "cuda" else 8)
    # bf16 autocast on a GPU; the interpreter computes bf16 wrongly, so fp16 there
    amp_dtype = torch.bfloat16 if device == "cuda" else torch.float16
    torch.manual_seed(0)
    model = vit_kernels.ViT(**cfg, scaling="paper").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    images = torch.randn(batch, cfg["in_channels"], cfg["img_size"], cfg["img_size"], device=device)
    labels = torch.randint(0, cfg["n_classes"], (batch,), device=device)
    losses = []
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}  {batch / seconds:9.1f} img/s  ({model.last_backend})",
              flush=True)
    return losses


if __name__ == "__main__":
    main()
