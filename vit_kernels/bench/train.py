"""Training step: forward + backward + AdamW under bf16 autocast, ms/step, img/s and peak memory per candidate.

Each candidate is built fresh from the same seed (fp32 master weights, as mixed-precision training keeps
them), checked against its twin on the first step (loss and gradient norm) and then timed; peak memory is
``torch.cuda.max_memory_allocated`` over its own steps, the model, gradients and optimizer state included.
"""
from __future__ import annotations

import contextlib
import gc
import statistics

import torch
import torch.nn.functional as F

from .e2e import cudnn_benchmark
from .models import CONFIGS, OURS, TIMM, timm_model, tutorial_model
from .timing import device_info, on_gpu, rounds_summary, time_ms


def _builders(name: str, device, compile_modes) -> dict:
    """{candidate: (build() -> model, twin candidate)}; every build starts from the same random weights and is a
    new model: ``from_timm`` patches its argument in place, so the timm twin is never the accelerated object."""
    import vit_kernels
    from vit_kernels import reference

    def timm_vit():
        torch.manual_seed(0)
        return timm_model(name).to(device)

    def tutorial(cls):
        torch.manual_seed(0)
        return tutorial_model(cls, name).to(device)

    builders = {
        TIMM: (timm_vit, None),
        OURS: (lambda: vit_kernels.from_timm(timm_vit()), TIMM),
        OURS_RECOMPUTE: (lambda: RecomputingPre(vit_kernels.from_timm(timm_vit())), OURS),
        OURS_CHECKPOINTED: (lambda: checkpointed(vit_kernels.from_timm(timm_vit())), OURS),
        OURS_FSDP2: (lambda: fsdp2_one_process(vit_kernels.from_timm(timm_vit())), OURS),
    }
    if CONFIGS[name]["family"] == "vit":  # the tutorial flavour exists for the original ViT only
        builders["reference eager"] = (lambda: tutorial(reference.ViT), None)
        builders["ours (tutorial ViT)"] = (lambda: tutorial(vit_kernels.ViT), "reference eager")
    for mode in compile_modes:
        builders[f"timm torch.compile ({mode})"] = (
            lambda mode=mode: torch.compile(timm_vit(), mode=None if mode == "default" else mode, dynamic=False),
            TIMM)
    return builders


OURS_RECOMPUTE = "ours (from_timm, fc1 pre-activation recomputed)"
OURS_CHECKPOINTED = "ours (from_timm, activation checkpointing)"
OURS_FSDP2 = "ours (from_timm, FSDP2 fully_shard, 1 GPU)"


class RecomputingPre(torch.nn.Module):
    """The model with ``ops.save_pre_activations(False)``: backward recomputes fc1's pre-activation with a GEMM
    instead of reading the one forward saved (the memory / time trade of ops/linear.py's ``saves_pre``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from vit_kernels import ops

        with ops.save_pre_activations(False):
            return self.model(x)


def checkpointed(model):
    """Activation checkpointing per block (the composable API FSDP2 training uses): backward recomputes each block."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)
    return model


def fsdp2_one_process(model):
    """``fully_shard`` per block and on the root over a one-process mesh: FSDP2's hooks and DTensor parameters at
    world size 1, i.e. their overhead on one GPU (``run_train`` provides the process group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if on_gpu() else "cpu", (1,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def one_process_group():
    """A world-size-1 process group for the FSDP2 row unless one exists (then that one, left as it is)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if on_gpu() else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trainer(model, x, y, dtype):
    """One optimizer step; returns (loss, grad norm) of the step it ran."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu())
    autocast = dtype != torch.float32

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()
                                                     if p.grad is not None]))
        opt.step()
        return loss, norm

    return step


def run_train(models=("vit_b_16",), batches=(64, 128), dtype=torch.bfloat16, compile_modes=(), repeats=1,
              progress=print) -> dict:
    """Rows for every model x batch x candidate, and the ViT-B/16 batch-128 headline figures: ``repeats`` rounds
    of every candidate in turn, median / min / max ms per step and the per-round speed-up range over timm eager
    (``ratio_*``). Every candidate runs
    with ``torch.backends.cudnn.benchmark`` on (timm's own benchmark setting: its patch-embedding conv, forward and
    backward, is far slower without it)."""
    with cudnn_benchmark(True), one_process_group():
        return _run_train(models, batches, dtype, compile_modes, repeats, progress)


def _run_train(models, batches, dtype, compile_modes, repeats, progress) -> dict:
    device = "cuda" if on_gpu() else "cpu"
    rows = []
    for name in models:
        builders = _builders(name, device, compile_modes if on_gpu() else ())
        for batch in batches:
            torch.manual_seed(1)
            x = torch.randn(batch, 3, CONFIGS[name]["img"], CONFIGS[name]["img"], device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            first, times, peaks = {}, {c: [] for c in builders}, {c: [] for c in builders}
            # rounds of every candidate in turn (one model alive at a time, so each peak is its own)
            for _ in range(repeats):
                for cand, (build, twin) in builders.items():
                    model = build().train()
                    step = _trainer(model, x, y, dtype)
                    loss, norm = (t.item() for t in step())  # the first step, from identical weights
                    if cand not in first:
                        first[cand] = (loss, norm)
                        if twin is not None:
                            _check(name, batch, cand, (loss, norm), twin, first[twin], dtype)
                    if on_gpu():
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    times[cand].append(time_ms(step))
                    peaks[cand].append(torch.cuda.max_memory_allocated() / 2**20 if on_gpu() else None)
                    del model, step
                    gc.collect()
                    if on_gpu():
                        torch.cuda.empty_cache()
            for cand, samples in times.items():
                ms, peak = statistics.median(samples), peaks[cand][-1]
                loss, norm = first[cand]
                rows.append(dict(model=name, batch=batch, dtype=str(dtype).replace("torch.", ""), candidate=cand,
                                 ms=ms, ms_min=min(samples), ms_max=max(samples), rounds=samples,
                                 **rounds_summary(times[TIMM], samples), img_per_s=batch / ms * 1e3, peak_mib=peak,
                                 first_loss=loss, first_grad_norm=norm, speedup_vs_timm_eager=statistics.median(
                                     times[TIMM]) / ms))
                progress(f"train {name} batch {batch} {cand:<34} {ms:9.2f} ms/step"
                         + (f"  peak {peak:8.0f} MiB" if peak else "") + ("" if on_gpu() else "  (CPU)"))
    return dict(device=device_info(), benchmark="train", repeats=repeats, rows=rows,
                headline=train_headline(rows, dtype))


def _check(name, batch, cand, got, twin, expected, dtype):
    """First-step loss and gradient norm within 5% (16-bit autocast) or 1e-3 (fp32) of the twin's."""
    limit = 1e-3 if dtype == torch.float32 else 5e-2
    for what, a, b in (("loss", got[0], expected[0]), ("gradient norm", got[1], expected[1])):
        if not abs(a - b) <= limit * max(1.0, abs(b)):
            raise AssertionError(f"train {name} batch {batch}: {cand} first-step {what} {a:.5g} differs from "
                                 f"{twin}'s {b:.5g}")


def train_headline(rows, dtype) -> dict:
    """ViT-B/16, batch 128, bf16 autocast: speedup vs compiled and eager timm, and the peak-memory ratio."""
    head = dict(train_bs128_vs_compile=None, train_bs128_vs_timm_eager=None, train_bs128_peak_vs_timm_eager=None)
    if not on_gpu() or dtype != torch.bfloat16:
        return head
    here = {r["candidate"]: r for r in rows if r["model"] == "vit_b_16" and r["batch"] == 128}
    if OURS in here and TIMM in here:
        head["train_bs128_vs_timm_eager"] = here[TIMM]["ms"] / here[OURS]["ms"]
        head["train_bs128_peak_vs_timm_eager"] = here[OURS]["peak_mib"] / here[TIMM]["peak_mib"]
        compiled = here.get("timm torch.compile (default)")
        if compiled:
            head["train_bs128_vs_compile"] = compiled["ms"] / here[OURS]["ms"]
    return head
