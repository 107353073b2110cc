"""Run by tests/test_fsdp.py: two gloo processes train an accelerated timm, torchvision or Hugging Face ViT with
FSDP2 (``fully_shard`` per block and on the root) and rank 0 compares it with the framework's own model trained
in one process on the whole batch;
then the trained model is saved sharded (torch.distributed.checkpoint) and loaded into a fresh sharded model.
Writes one JSON file: the losses, the largest parameter difference after the steps, the reload's result."""
import copy
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

STEPS, BATCH, LR = 2, 4, 0.5


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def blocks(model):
    """The encoder blocks of a timm, torchvision or Hugging Face (ViTForImageClassification) ViT."""
    if hasattr(model, "blocks"):
        return model.blocks
    if hasattr(model, "encoder"):  # torchvision
        return model.encoder.layers
    return model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer  # transformers 5 / 4


def logits(model, x):
    out = model(x)
    return out[0] if isinstance(out, (tuple, dict)) else out


def shard(model, mesh):
    for blk in blocks(model):
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reload(model, x, checkpoint_dir, mesh, build) -> dict:
    """Save the trained model sharded (torch.distributed.checkpoint), load it into a fresh sharded accelerated
    model: its largest parameter difference and whether its forward equals the trained one's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import vit_kernels

    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_dir)
    fresh = shard(vit_kernels.accelerate(build(seed=1).train()), mesh)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(fresh, state)
    diff = max((p.full_tensor() - q.full_tensor()).abs().max().item()
               for p, q in zip(fresh.parameters(), model.parameters(), strict=True))
    with torch.no_grad():
        same = torch.equal(logits(fresh.eval(), x), logits(model.eval(), x))
    return dict(max_param_diff=diff, same_forward=same)


def worker(rank: int, world: int, port: int, result_path: str, checkpoint_dir: str, framework: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from frameworks import BUILDERS

    import vit_kernels
    from vit_kernels import ops

    build = BUILDERS[framework]
    # the blocks' and the model's outputs are no views (an in-place op on one would skip FSDP2's pre-backward hook)
    warnings.filterwarnings("error", message=".*returned a view tensor")
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    model = build().train()
    single = copy.deepcopy(model)  # timm's own model, one process, the whole batch
    vit_kernels.accelerate(model)
    mesh = init_device_mesh("cpu", (world,))
    shard(model, mesh)
    x, y = data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ops.reset_launch_counts()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(logits(model, x[part]), y[part])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    launches = ops.launch_counts()
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    reloaded = reload(model, x[part], checkpoint_dir, mesh, build)
    if rank == 0:
        opt = torch.optim.SGD(single.parameters(), lr=LR)
        expected = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(logits(single, x), y)
            loss.backward()
            opt.step()
            expected.append(loss.item())
        diff = max((params[n] - p).abs().max().item() for n, p in single.named_parameters())
        moved = min((p - q).abs().max().item() for (_, p), q in zip(single.named_parameters(),
                                                                   build().parameters(), strict=True))
        with open(result_path, "w") as f:
            json.dump(dict(losses=losses, expected=expected, max_param_diff=diff, min_param_change=moved,
                           launches=launches, reloaded=reloaded), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, result_path, checkpoint_dir, framework = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    mp.spawn(worker, args=(2, port, result_path, checkpoint_dir, framework), nprocs=2, join=True)
