"""Small-M GEMM tiles (16 and 32 rows, issue 24): pinned, against the reference on odd shapes with the inference
epilogues (plain and LayerNorm-in), and the rules that let the autotuner time them only where they can win:
M <= SMALL_M, no training epilogue."""
import pytest
import torch
import torch.nn.functional as F

from vit_kernels.ops.layer_norm_linear import LAYER_NORM_LINEAR, layer_norm_linear_launch
from vit_kernels.ops.linear import LINEAR, LINEAR_TMA, SMALL_M, SMALL_M_CONFIGS, linear_launch, linear_torch

from helpers import DTYPES, assert_matches, randn

INFERENCE = dict(HAS_BIAS=True, ACTIVATION="gelu", DROPOUT=False, HAS_BRANCH_SCALE=False)


def small(configs):
    return [c for c in configs if c.kwargs["BLOCK_M"] < 64]


@pytest.mark.parametrize("launcher", [LINEAR, LINEAR_TMA, LAYER_NORM_LINEAR], ids=["linear", "tma", "norm"])
def test_small_tiles_are_timed_only_for_small_m_inference(launcher):
    assert len(small(launcher.configs_for(INFERENCE, autotuning=True, sizes=dict(M=197)))) == len(SMALL_M_CONFIGS)
    assert small(launcher.configs_for(INFERENCE, autotuning=True, sizes=dict(M=SMALL_M)))
    assert not small(launcher.configs_for(INFERENCE, autotuning=True, sizes=dict(M=SMALL_M + 1)))
    assert not small(launcher.configs_for({**INFERENCE, "DROPOUT": True}, autotuning=True, sizes=dict(M=197)))
    assert not small(launcher.configs_for({**INFERENCE, "HAS_BRANCH_SCALE": True}))
    assert len(small(launcher.configs_for(INFERENCE))) == len(SMALL_M_CONFIGS)  # all compiled by the check


@pytest.mark.parametrize("cfg", SMALL_M_CONFIGS, ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (37, 72, 40), (45, 130, 136)])
def test_small_tiles_compute_the_fused_gemm(shape, dtype, cfg, device):
    m, n, k = shape
    x, w, b, r = randn(m, k, dtype=dtype, device=device), randn(n, k, dtype=dtype, device=device), \
        randn(n, dtype=dtype, device=device), randn(m, n, dtype=dtype, device=device)
    expected = linear_torch(x.double(), w.double(), b.double(), "gelu", residual=r.double())
    got = linear_launch(x, w, b, "gelu", residual=r, config=cfg)
    assert_matches(got, linear_torch(x, w, b, "gelu", residual=r), expected)
    g, beta = randn(k, dtype=dtype, device=device), randn(k, dtype=dtype, device=device)
    normed = F.layer_norm(x.double(), (k,), g.double(), beta.double(), 1e-6)
    got = layer_norm_linear_launch(x, g, beta, 1e-6, None, w, b, "gelu", None, None, 1, 0.0, None, None, None,
                                   None, None, None, config=cfg)
    assert_matches(got, linear_torch(F.layer_norm(x, (k,), g, beta, 1e-6), w, b, "gelu"),
                   linear_torch(normed, w.double(), b.double(), "gelu"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(197, 768, 3072), (197, 2304, 768), (394, 768, 768)])
def test_small_tiles_at_vit_b_batch_1_and_2_on_gpu(shape):
    m, n, k = shape
    x, w, b = (randn(m, k, dtype=torch.bfloat16, device="cuda"),
               randn(n, k, dtype=torch.bfloat16, device="cuda", scale=k ** -0.5),
               randn(n, dtype=torch.bfloat16, device="cuda"))
    expected = linear_torch(x.double(), w.double(), b.double(), "gelu")
    for cfg in SMALL_M_CONFIGS:
        assert_matches(linear_launch(x, w, b, "gelu", config=cfg), linear_torch(x, w, b, "gelu"), expected,
                       name=str(cfg))
