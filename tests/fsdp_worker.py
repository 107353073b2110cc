"""Run by tests/test_fsdp.py: two gloo processes train an accelerated timm ViT with FSDP2 (``fully_shard`` per
block and on the root) and rank 0 compares it with timm's own model trained in one process on the whole batch;
then the trained model is saved sharded (torch.distributed.checkpoint) and loaded into a fresh sharded model.
Writes one JSON file: the losses, the largest parameter difference after the steps, the reload's result."""
import copy
import json
import os
import sys

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


def shard(model, mesh):
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reload(model, x, checkpoint_dir, mesh, timm_model) -> dict:
    """Save the trained model sharded (torch.distributed.checkpoint), load it into a fresh sharded accelerated
    model: its largest parameter difference and whether its forward equals the trained one's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import vit_kernels

    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_dir)
    fresh = shard(vit_kernels.accelerate(timm_model(seed=1).train()), mesh)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(fresh, state)
    diff = max((p.full_tensor() - q.full_tensor()).abs().max().item()
               for p, q in zip(fresh.parameters(), model.parameters(), strict=True))
    with torch.no_grad():
        same = torch.equal(fresh.eval()(x), model.eval()(x))
    return dict(max_param_diff=diff, same_forward=same)


def worker(rank: int, world: int, port: int, result_path: str, checkpoint_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from frameworks import timm_model

    import vit_kernels
    from vit_kernels import ops

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    model = timm_model().train()
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
        loss = F.cross_entropy(model(x[part]), y[part])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    launches = ops.launch_counts()
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    reloaded = reload(model, x[part], checkpoint_dir, mesh, timm_model)
    if rank == 0:
        opt = torch.optim.SGD(single.parameters(), lr=LR)
        expected = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(single(x), y)
            loss.backward()
            opt.step()
            expected.append(loss.item())
        diff = max((params[n] - p).abs().max().item() for n, p in single.named_parameters())
        moved = min((p - q).abs().max().item() for (_, p), q in zip(single.named_parameters(),
                                                                   timm_model().parameters(), strict=True))
        with open(result_path, "w") as f:
            json.dump(dict(losses=losses, expected=expected, max_param_diff=diff, min_param_change=moved,
                           launches=launches, reloaded=reloaded), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, result_path, checkpoint_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    mp.spawn(worker, args=(2, port, result_path, checkpoint_dir), nprocs=2, join=True)
