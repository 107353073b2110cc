"""Train the drop-in fused ViT on synthetic data: AdamW, mixed precision, one process or many (DDP / FSDP2).

    python examples/train.py                                   # GPU: ViT-S/16 at 224, bf16; CPU: tiny, interpreter
    python examples/train.py --steps 5 --grad-checkpointing    # activation checkpointing per block
    torchrun --nproc-per-node 8 examples/train.py --strategy fsdp          # FSDP2, one GPU per process
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train.py --strategy fsdp                                   # two machines (run on each)

Not launched by torchrun it runs one process (``--strategy`` then runs on a one-process group, the same code).
``--batch`` is per process; rank 0 prints each step's mean loss over the processes, the images per second of
all of them and its peak memory. The batches are fixed, so a falling loss shows the gradients are right.
FSDP2: ``fully_shard`` on each block and on the root, parameters in the compute dtype and gradients reduced in
fp32 (``MixedPrecisionPolicy``) on a GPU. ``--compile``: ``torch.compile`` of the model (after wrapping).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before vit_kernels defines its kernels

import torch.distributed as dist
import torch.nn.functional as F

import vit_kernels
from vit_kernels.configs import tutorial_kwargs

CONFIGS = {name: tutorial_kwargs(name) for name in ("tiny", "vit_s_16")}
STRATEGIES = ("none", "ddp", "fsdp")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), help="default: vit_s_16 on a GPU, tiny on a CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, help="per process; default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--strategy", choices=STRATEGIES, help="default: ddp under torchrun, else none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the (wrapped) model")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                        help="default: bf16 on a GPU, fp16 on a CPU (the interpreter computes bf16 wrongly)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_group(device: str) -> tuple[int, int]:
    """(rank, world size): torchrun's group, or a one-process group on a free local port."""
    backend = "nccl" if device == "cuda" else "gloo"
    if not launched_by_torchrun():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def blocks(model) -> list:
    """The transformer blocks of the tutorial ViT (model[1] is its encoder)."""
    return list(model[1])


def wrap(model, strategy: str, dtype: torch.dtype, device: str, checkpointing: bool):
    """Activation checkpointing per block, then DDP or FSDP2 (each block, then the root)."""
    if checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks(model):
            checkpoint(block)
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux: the process's peak RSS


def main(argv=None) -> list:
    args = parse(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    strategy = args.strategy or ("ddp" if launched_by_torchrun() else "none")
    if launched_by_torchrun() and strategy == "none":
        raise SystemExit("launched by torchrun: choose --strategy ddp or fsdp (none would train unsynchronized)")
    rank, world = start_group(device) if strategy != "none" else (0, 1)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cfg = CONFIGS[args.config or ("vit_s_16" if device == "cuda" else "tiny")]
    batch = args.batch or (64 if device == "cuda" else 8)
    precision = args.precision or ("bf16" if device == "cuda" else "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    torch.manual_seed(0)  # every rank starts from the same weights (DDP and FSDP2 expect it)
    model = vit_kernels.ViT(**cfg, scaling="paper").to(device).train()
    model = wrap(model, strategy, dtype, device, args.grad_checkpointing)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1)  # the global batch, each rank training on its slice
    images = torch.randn(world * batch, cfg["in_channels"], cfg["img_size"], cfg["img_size"], generator=g)
    labels = torch.randint(0, cfg["n_classes"], (world * batch,), generator=g)
    images, labels = (t[rank * batch:(rank + 1) * batch].to(device) for t in (images, labels))
    # FSDP2 casts parameters itself; otherwise autocast
    amp = contextlib.nullcontext() if strategy == "fsdp" or dtype == torch.float32 else torch.autocast(
        device, dtype=dtype)
    losses = []
    try:
        for step in range(args.steps):
            start = time.perf_counter()
            with amp:
                loss = F.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mean = loss.detach().clone()
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            losses.append(mean.item())
            if rank == 0:
                print(f"step {step:3d}  loss {losses[-1]:.4f}  {world * batch / seconds:9.1f} img/s  peak "
                      f"{peak_memory_mb(device):8.1f} MB  ({strategy}, {world} process{'es' * (world > 1)}, "
                      f"{precision}, {unwrapped(model).last_backend})", flush=True)
    finally:
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()
    return losses


def unwrapped(model):
    """The ViT under torch.compile's and DDP's wrappers (FSDP2 keeps the module itself)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
