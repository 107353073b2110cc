"""Kernel regression benchmarks: each fused op and the model against its PyTorch baseline, at ViT-B/16 shapes.

    pytest benchmarks/ --benchmark-only                       # time
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # save, then later compare a change with
    pytest benchmarks/ --benchmark-only --benchmark-compare

Skipped without a GPU; the default `pytest` (tests/) never collects this folder.
"""
import pytest
import torch

from vit_kernels.bench.models import CONFIGS, build_candidates
from vit_kernels.bench.ops import op_suites


def _cases():
    if not torch.cuda.is_available():
        return [pytest.param(None, None, id="no-gpu")]
    params = []
    with torch.no_grad():
        for name, suite in op_suites().items():
            for case in suite(CONFIGS["vit_b_16"], 64, torch.bfloat16, "cuda"):
                op = f"{name} {case.label}".strip()
                params.append(pytest.param(op, case.ours, id=f"{op}-ours"))
                for label, fn in case.baselines.items():
                    params.append(pytest.param(op, fn, id=f"{op}-{label}"))
    return params


def _synchronized(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("op,fn", _cases())
def test_op(benchmark, op, fn):
    benchmark.group = op
    with torch.no_grad():
        benchmark(_synchronized(fn))


@pytest.mark.parametrize("candidate", ["ours (from_timm)", "timm eager (SDPA)", "ours (tutorial ViT)",
                                       "reference eager"])
@pytest.mark.parametrize("batch", [1, 64])
def test_vit_b16(benchmark, candidate, batch):
    model = build_candidates("vit_b_16", torch.bfloat16, "cuda")[candidate].model
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    benchmark.group = f"vit_b_16 batch {batch}"
    with torch.no_grad():
        benchmark(_synchronized(lambda: model(x)))
