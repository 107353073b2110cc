"""Small M (batch 1-2 at ViT lengths, issue 24). The 16- and 32-row GEMM tiles: pinned, against the reference on
odd shapes with the inference epilogues (plain and LayerNorm-in), and the rules that let the autotuner time them
only where they can win (M <= SMALL_M, no training epilogue). Split-K: partials + a deterministic reduction with
ops.linear's epilogues, against the reference; when ops.linear considers it; the per-shape choice (timed)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops import guard
from vit_kernels.ops.layer_norm_linear import LAYER_NORM_LINEAR, layer_norm_linear_launch
from vit_kernels.ops.linear import (
    LINEAR,
    LINEAR_TMA,
    SMALL_M,
    SMALL_M_CONFIGS,
    SPLIT_K_MIN_K,
    SPLIT_K_STEP,
    chunk_stats,
    linear_launch,
    linear_torch,
    split_k_launch,
    split_k_plan,
)

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


@pytest.mark.parametrize("m, n, k", [(1, 8, 1024), (197, 768, 3072), (512, 768, 4096), (5, 100000, 1024),
                                     (300, 24, 65536)])
def test_split_k_plan_covers_k_in_whole_steps(m, n, k):
    splits, k_per_split = split_k_plan(m, n, k, torch.device("cpu"))
    assert 2 <= splits <= 16 and k_per_split % SPLIT_K_STEP == 0
    assert (splits - 1) * k_per_split < k <= splits * k_per_split


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 24, 1040), (37, 72, 1300)])
def test_split_k_computes_the_fused_gemm(shape, dtype, device):
    m, n, k = shape
    x, w = randn(m, k, dtype=dtype, device=device), randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    b, ls, r = randn(n, dtype=dtype, device=device), randn(n, dtype=dtype, device=device), \
        randn(m, n, dtype=dtype, device=device)
    x64, w64, b64 = x.double(), w.double(), b.double()
    got = split_k_launch(x, w, b, "gelu", None, None)
    assert_matches(got, linear_torch(x, w, b, "gelu"), linear_torch(x64, w64, b64, "gelu"))
    got, stats = split_k_launch(x, w, b, None, ls, r, stats_out=True)  # fc2: layer scale, residual, statistics
    expected = linear_torch(x64, w64, b64, None, ls.double(), r.double())
    assert_matches(got, linear_torch(x, w, b, None, ls, r), expected)
    torch.testing.assert_close(stats, chunk_stats(got), rtol=1e-4, atol=1e-4)


def test_ops_linear_considers_split_k_for_small_m_and_long_k(device):
    x, w, b = randn(37, 1040, device=device), randn(24, 1040, device=device), randn(24, device=device)

    def kernels(fn):
        ops.reset_launch_counts()
        fn()
        return set(ops.launch_counts())

    assert kernels(lambda: ops.linear(x, w, b)) == {"linear_split_k", "linear_split_k_reduce"}  # off GPU: the new
    assert kernels(lambda: ops.linear(x[:, :1000], w[:, :1000], b)) == {"linear"}  # K < SPLIT_K_MIN_K
    assert kernels(lambda: ops.linear(x, w, b, dropout=0.1)) == {"linear"}  # training epilogues: one launch
    assert kernels(lambda: ops.linear(x, (w, w), (b, b))) == {"linear"}  # row blocks
    assert SPLIT_K_MIN_K == 1024


def test_split_k_is_chosen_per_shape_by_timing(monkeypatch, device):
    monkeypatch.setattr(guard, "on_gpu", lambda x: True)
    w, b = randn(24, 1040, device=device), randn(24, device=device)
    # rows, and leading dims (both paths return the output with x's leading dims: the guard compares them)
    for x in (randn(37, 1040, device=device), randn(2, 19, 1040, device=device)):
        residual = randn(*x.shape[:-1], 24, device=device)
        with torch.no_grad():
            for split_wins, expected in ((True, {"linear_split_k", "linear_split_k_reduce"}), (False, {"linear"})):
                order = itertools.cycle([1.0, 2.0] if split_wins else [2.0, 1.0])  # the new path is timed first
                monkeypatch.setattr(guard, "time_ms", lambda fn, order=order: next(order))
                guard.reset()
                ops.reset_launch_counts()
                got = ops.linear(x, w, b, activation="gelu")
                assert set(ops.launch_counts()) == expected and got.shape == (*x.shape[:-1], 24)
                assert list(guard.verdicts().values()) == [split_wins]
                assert_matches(got, None, linear_torch(x.double(), w.double(), b.double(), "gelu"))
                got = ops.linear(x, w, b, scale=b, residual=residual)
                assert got.shape == residual.shape
                assert_matches(got, None, linear_torch(x.double(), w.double(), b.double(), None, b.double(),
                                                       residual.double()))
    guard.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(197, 768, 3072), (394, 768, 3072), (64, 1000, 1024)])
def test_split_k_at_vit_b_batch_1_and_2_on_gpu(shape):
    m, n, k = shape
    x, w, b, ls, r = (randn(m, k, dtype=torch.bfloat16, device="cuda"),
                      randn(n, k, dtype=torch.bfloat16, device="cuda", scale=k ** -0.5),
                      randn(n, dtype=torch.bfloat16, device="cuda"), randn(n, dtype=torch.bfloat16, device="cuda"),
                      randn(m, n, dtype=torch.bfloat16, device="cuda"))
    got, stats = split_k_launch(x, w, b, None, ls, r, stats_out=True)
    expected = linear_torch(x.double(), w.double(), b.double(), None, ls.double(), r.double())
    assert_matches(got, linear_torch(x, w, b, None, ls, r), expected)
    torch.testing.assert_close(stats, chunk_stats(got), rtol=1e-3, atol=1e-3)


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
