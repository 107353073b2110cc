"""The TMA engine of the fused GEMM (persistent programs over tensor descriptors, PERSISTENT=True configs),
pinned, against the reference and the pointer engine: odd M, N, K (multiples of no tile; row strides kept
16-byte aligned, as TMA needs), every epilogue, fp32/fp16 (bf16 on a GPU), fewer programs than tiles; which
problems it may serve; and the selection contract: screened, then timed by the autotuner, the faster engine
serves the shape and the result is the same whichever wins."""
import pytest
import torch

from vit_kernels.ops import guard
from vit_kernels.ops.dropout import new_seed
from vit_kernels.ops.launch import config, config_label
from vit_kernels.ops.linear import (
    LINEAR_TMA,
    STATS_CHUNK,
    chunk_stats,
    gemm_grid,
    linear_launch,
    linear_torch,
    persistent_programs,
    tma_ready,
)

from helpers import DTYPES, assert_matches, randn

TMA = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=True, PERSISTENT=True)
TMA_WHOLE = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=False, PERSISTENT=True)
POINTER = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=True)
# [M, N, K]: 16-byte row strides in fp32 and fp16, none a multiple of the 32-wide tiles; 130 x 72 is 15 tiles
SHAPES = [(1, 8, 8), (37, 72, 40), (130, 72, 24), (5, 200, 56)]


def operands(m, n, k, dtype, device):
    return (randn(m, k, dtype=dtype, device=device), randn(n, k, dtype=dtype, device=device, scale=k ** -0.5),
            randn(n, dtype=dtype, device=device), randn(n, dtype=dtype, device=device),
            randn(m, n, dtype=dtype, device=device))


def as64(*tensors):
    return [t.double() for t in tensors]


@pytest.mark.parametrize("cfg", [TMA, TMA_WHOLE], ids=["split_epilogue", "whole_epilogue"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_bias_and_residual(shape, dtype, cfg, device):
    x, w, b, s, r = operands(*shape, dtype, device)
    for kwargs in (dict(), dict(bias=b), dict(bias=b, scale=s, residual=r)):
        got = linear_launch(x, w, config=cfg, **kwargs)
        expected = linear_torch(*as64(x, w), **{k: v.double() for k, v in kwargs.items()})
        assert_matches(got, linear_torch(x, w, **kwargs), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu", "silu"])
def test_activations(activation, dtype, device):
    x, w, b, _, _ = operands(37, 72, 40, dtype, device)
    got = linear_launch(x, w, b, activation, config=TMA)
    assert_matches(got, linear_torch(x, w, b, activation), linear_torch(*as64(x, w, b), activation))


def test_training_epilogues_equal_the_pointer_engines(device):
    """Dropout draws from (seed, row, column) and stochastic depth scales rows: both engines give the same output
    element for element."""
    x, w, b, s, r = operands(130, 72, 40, torch.float32, device)
    seed = new_seed()
    branch = torch.tensor([0.0, 2.0], device=device)  # two samples of 65 rows: dropped, kept
    kwargs = dict(bias=b, activation="gelu", scale=s, residual=r, dropout=0.3, seed=seed, branch_scale=branch)
    torch.testing.assert_close(linear_launch(x, w, config=TMA, **kwargs),
                               linear_launch(x, w, config=POINTER, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_statistics_out(dtype, device):
    """proj/fc2 also write the residual stream's LayerNorm chunk statistics: the same as the pointer engine's."""
    x, w, b, s, r = operands(37, 72, 40, dtype, device)
    out, stats = linear_launch(x, w, b, scale=s, residual=r, config=TMA, stats_out=True)
    ref_out, ref_stats = linear_launch(x, w, b, scale=s, residual=r, config=POINTER, stats_out=True)
    torch.testing.assert_close(out, ref_out)
    assert stats.shape == (37, -(-72 // STATS_CHUNK), 2)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, chunk_stats(out.float()), rtol=1e-4, atol=1e-4)


def test_fewer_programs_than_tiles(device):
    """Off the GPU the engine runs 3 persistent programs per "SM" (PROGRAMS_PER_SM of them where a config asks),
    never more than there are tiles; the pointer engine one program per tile."""
    assert persistent_programs(None) == 3
    grid = gemm_grid(130, 200, torch.device("cpu"))
    assert grid(dict(BLOCK_M=32, BLOCK_N=32, PERSISTENT=True)) == (3,)
    assert grid(dict(BLOCK_M=32, BLOCK_N=32, PERSISTENT=True, PROGRAMS_PER_SM=2)) == (6,)
    assert grid(dict(BLOCK_M=128, BLOCK_N=256, PERSISTENT=True, PROGRAMS_PER_SM=2)) == (2,)  # 2 tiles
    assert grid(dict(BLOCK_M=32, BLOCK_N=32)) == (5 * 7,)
    x, w, b, _, _ = operands(130, 200, 24, torch.float32, device)
    two = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=False, PERSISTENT=True,
                 PROGRAMS_PER_SM=2)
    assert_matches(linear_launch(x, w, b, config=two), None, linear_torch(*as64(x, w, b)))


def test_which_problems_it_serves(device):
    x, w, _, _, _ = operands(37, 72, 40, torch.float32, device)
    assert tma_ready(x, [w], None, 1, None)
    assert not tma_ready(x, [w, w], None, 1, None)  # row blocks: the pointer engine's per-column block choice
    assert tma_ready(x, [randn(96, 40, device=device)], None, 3, None)  # de-interleave, 32 rows per part
    assert not tma_ready(x, [w, w], "swiglu", 1, None)
    assert not tma_ready(x, [w], None, 1, ("norm",))  # LayerNorm in the K loop
    odd = randn(37, 41, device=device)  # 164-byte rows: no TMA descriptor
    assert not tma_ready(odd, [randn(72, 41, device=device)], None, 1, None)
    assert not tma_ready(x, [randn(70, 40, device=device)], None, 1, None)  # the output's 280-byte rows
    with pytest.raises(ValueError, match="TMA engine serves one weight block"):
        linear_launch(odd, randn(72, 41, device=device), config=TMA)
    with pytest.raises(ValueError, match="TMA engine serves one weight block"):
        linear_launch(x, w, weight2=w, config=TMA)


def test_configs_are_sm90_only_and_screened():
    flags = dict(HAS_BIAS=True, ACTIVATION="gelu", DROPOUT=False, HAS_BRANCH_SCALE=False)
    assert not any(c.kwargs.get("PERSISTENT") for c in LINEAR_TMA.configs_for(flags, arch=80))
    on_90 = LINEAR_TMA.configs_for(flags, arch=90)
    assert any(c.kwargs.get("PERSISTENT") for c in on_90)
    guard.reset()
    assert not any(c.kwargs.get("PERSISTENT") for c in LINEAR_TMA.configs_for(flags, arch=90, autotuning=True,
                                                                               screen_key="k"))


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_the_faster_engine_serves_the_shape_with_the_same_result(monkeypatch, device):
    """The GPU path in the interpreter with a fake timer (Triton's autotuner, its _bench faked): the first launch
    screens the TMA configs against a pointer config, the autotuner then keeps whichever engine the timer says is
    faster, and the output is the same (and the reference's) whichever wins."""
    import triton.runtime.autotuner as autotuner

    from vit_kernels.ops import launch

    x, w, b, _, _ = operands(37, 72, 40, torch.float32, device)
    monkeypatch.setattr(launch, "INTERPRET", False)
    outputs = {}
    for winner in ("tma", "pointer"):
        fast = next(c for c in LINEAR_TMA.configs if bool(c.kwargs.get("PERSISTENT")) == (winner == "tma"))
        monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *a, config, fast=fast, **k: [
            1.0 if config is fast else 5.0] * 3)
        guard.reset()
        LINEAR_TMA.tuned.cache.clear()
        outputs[winner] = linear_launch(x, w, b, "gelu")
        assert list(LINEAR_TMA.tuned.cache.values()) == [fast]
        (screened,) = [v for (name, _), v in guard._screened.items() if name == "linear_tma"]
        assert screened == {config_label(c) for c in LINEAR_TMA.configs if c.kwargs.get("PERSISTENT")}
    assert_matches(outputs["tma"], None, linear_torch(*as64(x, w, b), "gelu"))
    torch.testing.assert_close(outputs["tma"], outputs["pointer"], rtol=1e-6, atol=1e-6)
    LINEAR_TMA.tuned.cache.clear()
    guard.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(197, 2304, 768), (50432, 3072, 768), (50432, 768, 3072), (64, 1000, 768)])
def test_every_tma_config_on_gpu(shape):
    """ViT-B/16 shapes, bf16, every TMA config the GPU may pick: within twice PyTorch's bf16 error (what validates
    "linear_tma")."""
    m, n, k = shape
    x, w, b, _, r = operands(m, n, k, torch.bfloat16, "cuda")
    expected = linear_torch(*as64(x, w, b), "gelu", residual=r.double())
    lowp = linear_torch(x, w, b, "gelu", residual=r)
    configs = [c for c in LINEAR_TMA.configs_for(dict(HAS_BIAS=True, ACTIVATION="gelu"), arch=90)
               if c.kwargs.get("PERSISTENT")]
    assert configs
    for cfg in configs:
        assert_matches(linear_launch(x, w, b, "gelu", residual=r, config=cfg), lowp, expected, name=str(cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deinterleave_through_a_3d_descriptor(dtype, device):
    """The tutorial's (h d qkv) qkv weight read as [N / 3, 3, K] by TMA: the same (qkv h d) output as the pointer
    engine's row gather and as permuting the weight first."""
    x, w, b, _, _ = operands(37, 3 * 64, 40, dtype, device)
    got = linear_launch(x, w, b, deinterleave=3, config=TMA)
    torch.testing.assert_close(got, linear_launch(x, w, b, deinterleave=3, config=POINTER))
    grouped = w.view(64, 3, 40).transpose(0, 1).reshape(192, 40)
    assert_matches(got, linear_torch(x, grouped, b.view(64, 3).t().reshape(192)),
                   linear_torch(*as64(x, w, b), deinterleave=3))
    assert not tma_ready(x, [randn(3 * 48, 40, device=device)], None, 3, None)  # a tile would straddle two parts
