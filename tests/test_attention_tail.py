"""The attention forward's tail variant (TAIL_N: whole key tiles without bounds checks, the last N % BLOCK_N keys
in narrow tiles), pinned, against the reference and the proven tiling: N from 1 to 300 around every tile
boundary, odd head dims, both layouts and scalings, masks (with empty rows), dropout (the same mask as the
proven tiling), fp32/fp16. Autotune leaves it out until a GPU round validates it."""
import pytest
import torch

from vit_kernels.ops.attention import ATTENTION, attention_launch, attention_torch, contiguous_key_mask
from vit_kernels.ops.dropout import new_seed
from vit_kernels.ops.launch import config

from helpers import assert_matches, randn

TAIL = config(4, 2, BLOCK_M=32, BLOCK_N=32, TAIL_N=16)  # the interpreter's tiles, with a 16-wide tail
PROVEN = config(4, 2, BLOCK_M=32, BLOCK_N=32, TAIL_N=0)


def run(qkv, heads, layout, scaling, mask=None, dropout=0.0, seed=None, cfg=TAIL):
    prepared = None if mask is None else contiguous_key_mask(mask, qkv.shape[1])
    return attention_launch(qkv, prepared, heads, layout, scaling, dropout, seed, config=cfg)


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 31, 32, 33, 47, 64, 100, 197, 257, 300])
def test_every_length_around_the_tile_boundaries(tokens, device):
    qkv = randn(2, tokens, 3 * 2 * 24, device=device)
    out, lse = run(qkv, 2, "qkv h d", "paper")
    assert_matches(out, None, attention_torch(qkv.double(), 2, "qkv h d", "paper"))
    proven_out, proven_lse = run(qkv, 2, "qkv h d", "paper", cfg=PROVEN)
    torch.testing.assert_close(out, proven_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, proven_lse, rtol=1e-5, atol=1e-5)  # backward reads it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout,scaling,head_dim", [("h d qkv", "tutorial", 40), ("qkv h d", "paper", 72),
                                                     ("qkv h d", "tutorial", 16)])
def test_layouts_scalings_head_dims(layout, scaling, head_dim, dtype, device):
    qkv = randn(2, 197, 3 * 3 * head_dim, device=device, dtype=dtype)
    out, _ = run(qkv, 3, layout, scaling)
    assert_matches(out, attention_torch(qkv, 3, layout, scaling), attention_torch(qkv.double(), 3, layout, scaling))


@pytest.mark.parametrize("tokens", [37, 197])
def test_masks_with_empty_rows(tokens, device):
    qkv = randn(2, tokens, 3 * 2 * 24, device=device)
    mask = torch.rand(2, 2, tokens, tokens, device=device) > 0.5
    mask[0, 1, 3] = False  # a query with nothing to attend to: zeros, as the proven kernel writes
    out, _ = run(qkv, 2, "h d qkv", "paper", mask)
    assert_matches(out, None, attention_torch(qkv.double(), 2, "h d qkv", "paper", mask))
    assert out[0, 3, 24:48].abs().max() == 0
    torch.testing.assert_close(out, run(qkv, 2, "h d qkv", "paper", mask, cfg=PROVEN)[0], rtol=1e-5, atol=1e-5)


def test_dropout_mask_is_the_proven_tilings(device):
    """Dropout is drawn per (query, key) element from the seed: the narrow tail tiles keep every key's draw."""
    qkv = randn(2, 197, 3 * 2 * 32, device=device)
    seed = new_seed()
    out, _ = run(qkv, 2, "qkv h d", "paper", dropout=0.3, seed=seed)
    torch.testing.assert_close(out, run(qkv, 2, "qkv h d", "paper", dropout=0.3, seed=seed, cfg=PROVEN)[0],
                               rtol=1e-5, atol=1e-5)


def test_autotune_leaves_the_tail_out_until_validated(monkeypatch):
    from vit_kernels.ops import guard

    flags = dict(D=64, BLOCK_D=64, HAS_MASK=False, DROPOUT=False)
    all_configs = ATTENTION.configs_for(flags)
    assert any(c.kwargs.get("TAIL_N") for c in all_configs)  # compiled by the check
    assert not any(c.kwargs.get("TAIL_N") for c in ATTENTION.configs_for(flags, autotuning=True))
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({"attention_tail"}))
    assert ATTENTION.configs_for(flags, autotuning=True) == all_configs
    assert not any(c.kwargs.get("TAIL_N") for c in ATTENTION.configs_for(dict(flags, QK_NORM=1)))  # plain q/k only


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [197, 257, 50])
@pytest.mark.parametrize("masked", [False, True])
def test_tail_configs_on_gpu(tokens, masked):
    """Every tail config the GPU may autotune, bf16, ViT-B heads: within twice PyTorch's bf16 error and equal to
    the proven tiling's output (what validates "attention_tail" for autotuning)."""
    qkv = randn(4, tokens, 3 * 768, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4, 1, tokens, tokens, device="cuda") > 0.2 if masked else None
    expected = attention_torch(qkv.double(), 12, "qkv h d", "paper", mask)
    lowp = attention_torch(qkv, 12, "qkv h d", "paper", mask)
    flags = dict(D=64, BLOCK_D=64, HAS_MASK=masked, DROPOUT=False)
    for cfg in [c for c in ATTENTION.configs_for(flags) if c.kwargs.get("TAIL_N")]:
        assert_matches(run(qkv, 12, "qkv h d", "paper", mask, cfg=cfg)[0], lowp, expected, name=str(cfg))
