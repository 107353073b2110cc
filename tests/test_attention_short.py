"""The attention forward's tilings for ViT lengths, pinned, against the reference and the proven tiling:

- TAIL_N: whole key tiles without bounds checks, the last N % BLOCK_N keys in narrow tiles;
- RESIDENT: one program per (batch, head, Q_SPLIT part), the head's keys as up to three power-of-two pieces
  (one softmax step, no rescale), whole query tiles unchecked and the last N % BLOCK_M queries in 16-row tiles.

N from 1 to 300 around every tile boundary, odd head dims, both layouts and scalings, masks (with empty rows),
dropout (the same mask as the proven tiling), fp32/fp16. Until a GPU round validates "attention_short", the
autotuner takes them only after screening (tested at the end)."""
import pytest
import torch

from vit_kernels.ops import guard
from vit_kernels.ops.attention import (
    ATTENTION,
    RESIDENT_MAX_N,
    attention_launch,
    attention_torch,
    contiguous_key_mask,
    resident_pieces,
)
from vit_kernels.ops.dropout import new_seed
from vit_kernels.ops.launch import config, config_label

from helpers import assert_matches, randn

TAIL = config(4, 2, BLOCK_M=32, BLOCK_N=32, TAIL_N=16)  # the interpreter's tiles, with a 16-wide tail
RESIDENT = config(4, 2, BLOCK_M=32, BLOCK_N=32, RESIDENT=True, TAIL_M=16, Q_SPLIT=1)
RESIDENT_SPLIT = config(4, 2, BLOCK_M=32, BLOCK_N=32, RESIDENT=True, TAIL_M=16, Q_SPLIT=3)
PROVEN = config(4, 2, BLOCK_M=32, BLOCK_N=32, TAIL_N=0)
SHORT = {"tail": TAIL, "resident": RESIDENT, "resident_split": RESIDENT_SPLIT}


def run(qkv, heads, layout, scaling, mask=None, dropout=0.0, seed=None, cfg=TAIL):
    prepared = None if mask is None else contiguous_key_mask(mask, qkv.shape[1])
    return attention_launch(qkv, prepared, heads, layout, scaling, dropout, seed, config=cfg)


@pytest.mark.parametrize("tiling", SHORT)
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 31, 32, 33, 47, 64, 100, 197, 257, 272, 273, 300])
def test_every_length_around_the_tile_boundaries(tiling, tokens, device):
    qkv = randn(2, tokens, 3 * 2 * 24, device=device)
    if tiling.startswith("resident") and tokens > RESIDENT_MAX_N:
        with pytest.raises(ValueError, match=f"at most {RESIDENT_MAX_N} tokens, got {tokens}"):
            run(qkv, 2, "qkv h d", "paper", cfg=SHORT[tiling])
        return
    out, lse = run(qkv, 2, "qkv h d", "paper", cfg=SHORT[tiling])
    assert_matches(out, None, attention_torch(qkv.double(), 2, "qkv h d", "paper"))
    proven_out, proven_lse = run(qkv, 2, "qkv h d", "paper", cfg=PROVEN)
    torch.testing.assert_close(out, proven_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, proven_lse, rtol=1e-5, atol=1e-5)  # backward reads it


@pytest.mark.parametrize("tiling", SHORT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout,scaling,head_dim", [("h d qkv", "tutorial", 40), ("qkv h d", "paper", 72),
                                                     ("qkv h d", "tutorial", 16)])
def test_layouts_scalings_head_dims(tiling, layout, scaling, head_dim, dtype, device):
    qkv = randn(2, 197, 3 * 3 * head_dim, device=device, dtype=dtype)
    out, _ = run(qkv, 3, layout, scaling, cfg=SHORT[tiling])
    assert_matches(out, attention_torch(qkv, 3, layout, scaling), attention_torch(qkv.double(), 3, layout, scaling))


@pytest.mark.parametrize("tiling", SHORT)
@pytest.mark.parametrize("tokens", [37, 197])
def test_masks_with_empty_rows(tiling, tokens, device):
    qkv = randn(2, tokens, 3 * 2 * 24, device=device)
    mask = torch.rand(2, 2, tokens, tokens, device=device) > 0.5
    mask[0, 1, 3] = False  # a query with nothing to attend to: zeros, as the proven kernel writes
    out, lse = run(qkv, 2, "h d qkv", "paper", mask, cfg=SHORT[tiling])
    assert_matches(out, None, attention_torch(qkv.double(), 2, "h d qkv", "paper", mask))
    assert out[0, 3, 24:48].abs().max() == 0 and lse[1, 3] == float("-inf")
    proven_out, proven_lse = run(qkv, 2, "h d qkv", "paper", mask, cfg=PROVEN)
    torch.testing.assert_close(out, proven_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, proven_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiling", SHORT)
def test_dropout_mask_is_the_proven_tilings(tiling, device):
    """Dropout is drawn per (query, key) element from the seed: every tiling keeps every element's draw."""
    qkv = randn(2, 197, 3 * 2 * 32, device=device)
    seed = new_seed()
    out, _ = run(qkv, 2, "qkv h d", "paper", dropout=0.3, seed=seed, cfg=SHORT[tiling])
    torch.testing.assert_close(out, run(qkv, 2, "qkv h d", "paper", dropout=0.3, seed=seed, cfg=PROVEN)[0],
                               rtol=1e-5, atol=1e-5)


def test_resident_pieces():
    """N rounded up to 16 in at most three power-of-two pieces, little padding; none past RESIDENT_MAX_N."""
    assert resident_pieces(197) == dict(KV_A=128, KV_B=64, KV_C=16)
    assert resident_pieces(257) == dict(KV_A=256, KV_B=16, KV_C=0)
    assert resident_pieces(240) == dict(KV_A=128, KV_B=64, KV_C=64)  # the third piece rounds up
    assert resident_pieces(1) == dict(KV_A=16, KV_B=0, KV_C=0)
    assert resident_pieces(RESIDENT_MAX_N + 1) == dict(KV_A=0, KV_B=0, KV_C=0)
    for tokens in range(1, RESIDENT_MAX_N + 1):
        pieces = list(resident_pieces(tokens).values())
        assert all(p == 0 or p & (p - 1) == 0 for p in pieces) and sum(pieces) >= tokens
        assert sum(pieces) - tokens < 16 + pieces[2] // 2 + 1  # waste: the rounding to 16 and half the last piece


def test_which_variants_take_the_short_tilings():
    flags = dict(D=64, BLOCK_D=64, HAS_MASK=False, DROPOUT=False, INTERLEAVED=False, **resident_pieces(197))
    labels = {config_label(c) for c in ATTENTION.configs_for(flags, arch=90)}
    assert any("RESIDENT" in label for label in labels) and any("'TAIL_N', 16" in label for label in labels)
    assert not any(c.kwargs.get("RESIDENT") for c in ATTENTION.configs_for(flags, arch=80))  # spills on sm_80
    for heavy in (dict(HAS_MASK=True), dict(DROPOUT=True), dict(INTERLEAVED=True), dict(QK_NORM=1),
                  dict(D=80, BLOCK_D=128), resident_pieces(RESIDENT_MAX_N + 1)):
        assert not any(c.kwargs.get("RESIDENT") for c in ATTENTION.configs_for({**flags, **heavy}, arch=90))
    assert not any(c.kwargs.get("TAIL_N") for c in ATTENTION.configs_for(dict(flags, QK_NORM=1)))  # plain q/k
    wide = [c for c in ATTENTION.configs_for({**flags, **resident_pieces(257)}, arch=90) if c.kwargs.get("RESIDENT")]
    assert wide and all(c.num_warps == 8 for c in wide)  # 272 keys: 4 warps spill


def test_autotune_takes_short_tilings_only_once_screened_or_validated(monkeypatch):
    """Unvalidated, the autotuner's config list for a problem holds the short tilings only after screening found
    them agreeing for that problem; validated, always."""
    flags = dict(D=64, BLOCK_D=64, HAS_MASK=False, DROPOUT=False, INTERLEAVED=False, **resident_pieces(197))
    guard.reset()
    everything = ATTENTION.configs_for(flags, arch=90)
    tuned = ATTENTION.configs_for(flags, arch=90, autotuning=True, screen_key="k")
    assert not any(ATTENTION.pending[1](c.kwargs) for c in tuned) and tuned
    resident = next(c for c in everything if c.kwargs.get("RESIDENT"))
    monkeypatch.setitem(guard._screened, ("attention_short", "k"), frozenset({config_label(resident)}))
    assert ATTENTION.configs_for(flags, arch=90, autotuning=True, screen_key="k") == [*tuned, resident]
    assert ATTENTION.configs_for(flags, arch=90, autotuning=True, screen_key="other") == tuned
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({"attention_short"}))
    assert ATTENTION.configs_for(flags, arch=90, autotuning=True) == everything
    guard.reset()


def test_screening_keeps_the_agreeing_configs_and_warns_about_the_others(device):
    """guard.screen runs the proven config, then each candidate into the same outputs, and keeps the candidates
    whose out and log-sum-exp agree; a wrong one (here: another scaling) is dropped with a warning."""
    qkv = randn(2, 70, 3 * 2 * 24, device=device)
    out, lse = attention_launch(qkv, None, 2, "qkv h d", "paper", config=PROVEN)
    wrong = config(4, 2, BLOCK_M=32, BLOCK_N=32, TAIL_N=0, WRONG=True)

    def launch(cfg):
        scaling = "tutorial" if cfg.kwargs.get("WRONG") else "paper"
        got = attention_launch(qkv, None, 2, "qkv h d", scaling, config=config(4, 2, **{
            k: v for k, v in cfg.kwargs.items() if k != "WRONG"}))
        out.copy_(got[0]), lse.copy_(got[1])

    guard.reset()
    with pytest.warns(RuntimeWarning, match="attention_short config .*WRONG.* disagreed"):
        agreed = guard.screen("attention_short", "k", launch, [out, lse], PROVEN, [TAIL, RESIDENT, wrong],
                              config_label)
    assert agreed == {config_label(TAIL), config_label(RESIDENT)} == guard.screened("attention_short", "k")
    assert not guard.needs_screening("attention_short", "k") and guard.needs_screening("attention_short", "k2")
    guard.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [197, 257, 50])
@pytest.mark.parametrize("masked", [False, True])
def test_short_configs_on_gpu(tokens, masked):
    """Every short-tiling config the GPU may autotune, bf16, ViT-B heads: within twice PyTorch's bf16 error (what
    validates "attention_short" for autotuning)."""
    qkv = randn(4, tokens, 3 * 768, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4, 1, tokens, tokens, device="cuda") > 0.2 if masked else None
    expected = attention_torch(qkv.double(), 12, "qkv h d", "paper", mask)
    lowp = attention_torch(qkv, 12, "qkv h d", "paper", mask)
    flags = dict(D=64, BLOCK_D=64, HAS_MASK=masked, DROPOUT=False, INTERLEAVED=False, **resident_pieces(tokens))
    configs = [c for c in ATTENTION.configs_for(flags, arch=90) if ATTENTION.pending[1](c.kwargs)]
    assert configs
    for cfg in configs:
        assert_matches(run(qkv, 12, "qkv h d", "paper", mask, cfg=cfg)[0], lowp, expected, name=str(cfg))


@pytest.mark.filterwarnings("ignore:divide by zero")  # log2(0) of masked-out rows, quiet in real launches
def test_autotuner_takes_the_faster_screened_config(monkeypatch, device):
    """The whole GPU path in the interpreter, with a fake timer: the first launch for a problem screens every
    pending config (all agree), the autotuner then times proven and screened configs alike and keeps the fastest
    (here a resident one); the output is the reference's whichever config wins."""
    import triton.runtime.autotuner as autotuner

    from vit_kernels.ops import launch

    qkv = randn(1, 41, 3 * 2 * 16, device=device)
    target = next(c for c in ATTENTION.configs if c.kwargs.get("RESIDENT") and c.kwargs["Q_SPLIT"] == 4)
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *a, config, **k: [1.0 if config is target
                                                                                     else 5.0] * 3)
    guard.reset()
    ATTENTION.tuned.cache.clear()
    out, _ = attention_launch(qkv, None, 2, "qkv h d", "paper")
    assert_matches(out, None, attention_torch(qkv.double(), 2, "qkv h d", "paper"))
    pending = {config_label(c) for c in ATTENTION.configs if ATTENTION.pending[1](c.kwargs)}
    (screened,) = [v for (name, _), v in guard._screened.items() if name == "attention_short"]
    assert screened and screened <= pending  # the pending configs this problem may use, all agreeing
    assert list(ATTENTION.tuned.cache.values()) == [target]
    ATTENTION.tuned.cache.clear()
    guard.reset()
