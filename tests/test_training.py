"""Training through the kernels: the example script (one process, and FSDP2 with activation checkpointing under
torchrun), and DistributedDataParallel (gloo, two processes)."""
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vit_kernels
from vit_kernels.configs import tutorial_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = tutorial_kwargs("tiny_timm", depth=1, n_classes=5)  # 17 tokens, emb 48, 2 heads


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_example_training_loop_lowers_the_loss(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", "--steps", "3", "--batch", "2"])
    losses = runpy.run_path(os.path.join(ROOT, "examples", "train.py"))["main"]()
    out = capsys.readouterr().out
    assert "img/s" in out and "(none, 1 process, fp16, triton)" in out
    assert losses[-1] < losses[0]


def run_example(*args, torchrun=None):
    command = [sys.executable, os.path.join(ROOT, "examples", "train.py"), *args]
    if torchrun:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo, interpreter) check")
def test_example_trains_under_torchrun_with_fsdp2_and_checkpointing():
    proc = run_example("--strategy", "fsdp", "--steps", "2", "--batch", "2", "--grad-checkpointing", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2, proc.stdout  # rank 0 prints
    assert all("(fsdp, 2 processes, fp16, triton)" in line and "img/s" in line and "MB" in line for line in steps)


@pytest.mark.slow  # two processes compiling the model on CPU: ~1.5 minutes
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo, interpreter) check")
def test_example_trains_under_torchrun_with_fsdp2_and_torch_compile():
    """--compile over FSDP2's per-block sharding: the custom ops (the pre-activation-saving fc1 included) traced
    by torch.compile inside fully_shard's hooks, two processes."""
    proc = run_example("--strategy", "fsdp", "--steps", "2", "--batch", "2", "--compile", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2 and all("(fsdp, 2 processes, fp16, triton)" in line for line in steps), proc.stdout
    losses = [float(line.split()[3]) for line in steps]
    assert all(0 < loss < 10 for loss in losses), losses


def test_example_refuses_bad_arguments(monkeypatch):
    example = runpy.run_path(os.path.join(ROOT, "examples", "train.py"))
    for bad in (["--steps", "0"], ["--batch", "-1"], ["--strategy", "zero"]):
        with pytest.raises(SystemExit):
            example["main"](bad)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="choose --strategy ddp or fsdp"):
        example["main"](["--strategy", "none"])


def _ddp_worker(rank, world, port, images, labels, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = vit_kernels.ViT(**TINY, scaling="paper")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = images.shape[0] // world
        shard = slice(rank * half, (rank + 1) * half)
        torch.nn.functional.cross_entropy(ddp(images[shard]), labels[shard]).backward()
        assert model.last_backend == "triton"
        if rank == 0:
            torch.save({name: p.grad for name, p in model.named_parameters()}, result_path)
        # both ranks leave together: a rank tearing gloo down while the other still holds the connection can
        # abort it ("terminate called without an active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 40 s: tests/test_fsdp.py checks distributed training against one process in the fast tier
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo, interpreter) DDP check")
def test_ddp_gradients_equal_single_process(tmp_path):
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    port = 29500 + os.getpid() % 1000
    result = tmp_path / "ddp_grads.pt"
    mp.spawn(_ddp_worker, args=(2, port, images, labels, str(result)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = vit_kernels.ViT(**TINY, scaling="paper")
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    ddp_grads = torch.load(result)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
