"""Model configurations, their FLOPs, and the candidates an end-to-end benchmark compares."""
from __future__ import annotations

import copy
import dataclasses

import torch

from ..configs import SIZES, as_dict, timm_kwargs, tutorial_kwargs

# {name: {timm, patch, emb, depth, heads, img, classes}}: the sizes the benchmarks run, from vit_kernels.configs
CONFIGS = {name: as_dict(name) for name in SIZES if name != "tiny_timm"}
COMPILE_MODES = ("default", "max-autotune")


def gflop_per_image(name: str, classes: int = 1000) -> float:
    """Forward GFLOP (2 x multiply-adds) of one image: patch GEMM, blocks (qkv, QK^T, PV, proj, MLP), head."""
    c = CONFIGS[name]
    if c["family"] != "vit":
        return _family_gflop(name, classes)
    patches = (c["img"] // c["patch"]) ** 2
    n, e = patches + 1, c["emb"]
    block = 2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e + 2 * 2 * n * e * 4 * e
    return (2 * patches * e * 3 * c["patch"] ** 2 + c["depth"] * block + 2 * e * classes) / 1e9


def _family_gflop(name: str, classes: int) -> float:
    """The same count read off the timm model (built on the meta device): every block Linear on every token,
    QK^T and PV, the patch GEMM and the head (an attention-pooling head's few latent rows left out)."""
    model = timm_model(name, device="meta")
    c = CONFIGS[name]
    patches = (c["img"] // c["patch"]) ** 2
    n, e = patches + model.num_prefix_tokens, c["emb"]
    block_weights = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    return (2 * patches * e * 3 * c["patch"] ** 2 + 2 * n * block_weights + c["depth"] * 4 * n * n * e
            + 2 * e * classes) / 1e9


def tutorial_model(cls, name: str):
    """``cls`` (reference.ViT or vit_kernels.ViT) in configuration ``name``, paper scaling, random weights."""
    return cls(**tutorial_kwargs(name, n_classes=1000), scaling="paper")


def timm_model(name: str, device=None):
    """timm's model in configuration ``name``, random weights (never downloads). A family size is the timm model
    of that name as timm defines it (its MLP ratio, pooling, registers, rotary embedding) at its image size."""
    import timm

    c = CONFIGS[name]
    if c["family"] != "vit":
        return timm.create_model(c["timm"], pretrained=False, num_classes=1000, img_size=c["img"], device=device)
    return timm.create_model(c["timm"], pretrained=False, device=device,
                             **timm_kwargs(name, num_classes=1000))


TIMM, TIMM_NO_CUDNN_BENCHMARK, OURS = "timm eager (SDPA)", "timm eager (SDPA, cudnn.benchmark off)", "ours (from_timm)"
OURS_UNFUSED_NORM = "ours (from_timm, LayerNorm unfused)"
OURS_GRAPHS = "ours (from_timm, cuda_graphs=True)"  # the built-in graph runner: serving latency, batch <= 64
GRAPH_MAX_BATCH = 64  # eager candidates are also timed as a CUDA-graph replay up to this batch
REDUCE_OVERHEAD_MAX_BATCH = 64  # torch.compile(mode="reduce-overhead"): the serving baseline, small batches


class UnfusedLayerNorm(torch.nn.Module):
    """A fused model run with ``layer_norm_folding(False)``: the 7-launch block, to measure the fold against."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        import vit_kernels

        with vit_kernels.layer_norm_folding(False):
            return self.model(x)


@dataclasses.dataclass
class Candidate:
    """A model in the comparison: the candidate it is checked against, the cudnn.benchmark setting it is timed
    with (timm's own benchmark.py turns it on: its patch-embedding conv is 9x faster on an H100), whether it is
    also timed as a CUDA-graph replay (eager candidates), and the batches it runs at (None: all)."""

    model: torch.nn.Module
    twin: str | None = None
    cudnn_benchmark: bool = True
    graph: bool = True
    max_batch: int | None = None

    def runs_at(self, batch: int) -> bool:
        return self.max_batch is None or batch <= self.max_batch


def build_candidates(name: str, dtype: torch.dtype, device, compile_modes=()) -> dict:
    """{name: Candidate}, all with one set of random weights: timm eager with cudnn.benchmark on (and a labelled
    row with it off), ours (``from_timm``) eager, and with its LayerNorms unfused (``layer_norm_folding``), ours
    with the built-in graph runner (``cuda_graphs=True``, on CUDA, batch <= 64: each call pads, copies in,
    replays and clones out, all timed), the reference and the tutorial-flavour ``vit_kernels.ViT``; with
    ``compile_modes`` also timm under ``torch.compile`` in each mode (``"reduce-overhead"``: CUDA graphs, batch
    <= 64 only) and ours under ``torch.compile`` (default mode).

    ``vit_kernels.from_timm`` patches the model it is given in place, so the accelerated candidate is a deep copy
    of the timm model: the timm baselines (eager and compiled) keep timm's own forward."""
    import vit_kernels
    from vit_kernels import reference

    torch.manual_seed(0)
    timm_eager = timm_model(name).to(device, dtype).eval()
    ours_timm = vit_kernels.from_timm(copy.deepcopy(timm_eager))  # in place: on a copy, not the baseline
    candidates = {
        TIMM: Candidate(timm_eager),
        TIMM_NO_CUDNN_BENCHMARK: Candidate(timm_eager, TIMM, cudnn_benchmark=False),
        OURS: Candidate(ours_timm, TIMM),
        OURS_UNFUSED_NORM: Candidate(UnfusedLayerNorm(ours_timm), TIMM),
    }
    if torch.device(device).type == "cuda":  # the runner refuses other devices
        candidates[OURS_GRAPHS] = Candidate(vit_kernels.from_timm(copy.deepcopy(timm_eager), cuda_graphs=True), TIMM,
                                            graph=False, max_batch=REDUCE_OVERHEAD_MAX_BATCH)
    if CONFIGS[name]["family"] == "vit":  # the tutorial flavour exists for the original ViT only
        ref = tutorial_model(reference.ViT, name).to(device, dtype).eval()
        ours = tutorial_model(vit_kernels.ViT, name).to(device, dtype).eval()
        ours.load_state_dict(ref.state_dict())
        candidates["reference eager"] = Candidate(ref)
        candidates["ours (tutorial ViT)"] = Candidate(ours, "reference eager")
    for mode in compile_modes:
        compiled = torch.compile(timm_eager, mode=None if mode == "default" else mode, dynamic=False)
        candidates[f"timm torch.compile ({mode})"] = Candidate(
            compiled, TIMM, graph=False, max_batch=REDUCE_OVERHEAD_MAX_BATCH if mode == "reduce-overhead" else None)
    if compile_modes:
        candidates[f"{OURS} torch.compile (default)"] = Candidate(torch.compile(ours_timm, dynamic=False), TIMM,
                                                                 graph=False)
    return candidates
