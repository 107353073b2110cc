"""The reference ViT against the tutorial's own code, SDPA (paper scaling) and its masks; bad input."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vit_kernels import reference as R

import tutorial_vit as tutorial

TINY = dict(in_channels=3, patch_size=8, emb_size=64, img_size=40, depth=2, n_classes=10)  # N = 26


def twin(**cfg):
    """A tutorial model and a reference model with the same weights."""
    theirs = tutorial.ViT(**cfg).eval()
    ours = R.ViT(**cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [TINY, dict(TINY, emb_size=48, num_heads=4, img_size=48, in_channels=1),
                                 dict(TINY, emb_size=72, num_heads=3, forward_expansion=2, depth=1)])
def test_matches_tutorial(cfg, dtype):
    theirs, ours = twin(**cfg)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, cfg["in_channels"], cfg["img_size"], cfg["img_size"], dtype=dtype)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_tutorial_checkpoint_keys_and_defaults():
    _, ours = twin(**TINY)
    keys = set(ours.state_dict())
    for key in ["0.cls_token", "0.positions", "0.projection.0.weight", "1.0.0.fn.0.weight", "1.0.0.fn.1.qkv.weight",
                "1.0.0.fn.1.projection.bias", "1.1.1.fn.0.bias", "1.1.1.fn.1.0.weight", "1.1.1.fn.1.3.weight",
                "2.1.weight", "2.2.bias"]:
        assert key in keys
    assert ours[1][0][0].fn[1].num_heads == 8  # the tutorial's code default, not the text's 12
    for name in ["ViT", "PatchEmbedding", "TransformerEncoderBlock", "TransformerEncoder", "ClassificationHead",
                 "FeedForwardBlock"]:
        assert params(getattr(R, name)) == params(getattr(tutorial, name)), name
    assert params(R.MultiHeadAttention) == [*params(tutorial.MultiHeadAttention),
                                            ("scaling", "tutorial", inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def params(cls):
    """(name, default, kind) of a constructor's parameters (annotations are strings on one side)."""
    return [(p.name, p.default, p.kind) for p in inspect.signature(cls).parameters.values()]


def paper_attention_via_sdpa(mha, x, mask=None):
    qkv = rearrange(mha.qkv(x), "b n (h d qkv) -> qkv b h n d", h=mha.num_heads, qkv=3)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
    return mha.projection(rearrange(out, "b h n d -> b n (h d)"))


@pytest.mark.parametrize("heads,emb", [(2, 48), (3, 72), (8, 64)])
def test_paper_scaling_matches_sdpa(heads, emb):
    mha = R.MultiHeadAttention(emb, heads, scaling="paper").double()
    x = torch.randn(2, 26, emb, dtype=torch.float64)
    torch.testing.assert_close(mha(x), paper_attention_via_sdpa(mha, x))
    mask = torch.rand(2, 1, 26, 26) > 0.4
    mask[..., 0] = True  # SDPA returns NaN for fully masked rows; those are tested separately
    torch.testing.assert_close(mha(x, mask), paper_attention_via_sdpa(mha, x, mask))


def test_tutorial_scaling_formula_and_mask():
    mha = R.MultiHeadAttention(48, 4).double()
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    mask = torch.rand(1, 4, 17, 17) > 0.5
    qkv = rearrange(mha.qkv(x), "b n (h d qkv) -> qkv b h n d", h=4, qkv=3)
    energy = torch.einsum("bhqd,bhkd->bhqk", qkv[0], qkv[1]).masked_fill(~mask, -math.inf)
    att = torch.nan_to_num(F.softmax(energy, -1), nan=0.0) / math.sqrt(48)
    expected = mha.projection(rearrange(att @ qkv[2], "b h n d -> b n (h d)"))
    torch.testing.assert_close(mha(x, mask), expected)


def test_default_scaling_is_tutorial():
    assert R.MultiHeadAttention(48, 4).scaling == "tutorial"
    assert R.ViT(**TINY)[1][0][0].fn[1].scaling == "tutorial"


def test_seed_scaling_is_a_deprecated_alias_of_tutorial():
    torch.manual_seed(1)
    tutorial = R.ViT(**TINY, scaling="tutorial").eval()
    with pytest.warns(DeprecationWarning, match='scaling="seed" is deprecated'):
        seed = R.ViT(**TINY, scaling="seed").eval()
    assert all(block[0].fn[1].scaling == "tutorial" for block in seed[1])  # stored by its current name
    seed.load_state_dict(tutorial.state_dict(), strict=True)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(seed(x), tutorial(x))
    with pytest.warns(DeprecationWarning):
        mha = R.MultiHeadAttention(48, 4, scaling="seed")
    assert mha.scaling == "tutorial"


def test_unknown_scaling_names_the_choices():
    with pytest.raises(ValueError, match=r"scaling must be one of \('tutorial', 'paper'\), got 'flash'"):
        R.MultiHeadAttention(48, 4, scaling="flash")
    assert R.SCALINGS == ("tutorial", "paper")


@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
def test_fully_masked_rows_give_zeros(scaling):
    mha = R.MultiHeadAttention(48, 4, scaling=scaling)
    x = torch.randn(2, 9, 48)
    mask = torch.ones(2, 4, 9, 9, dtype=torch.bool)
    mask[0, :, 3] = False  # query 3 of image 0 may attend to nothing
    out = mha(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3], mha.projection.bias.detach())  # zero attention -> bias only
    out.sum().backward()  # and gradients stay finite
    assert all(torch.isfinite(p.grad).all() for p in mha.parameters())


def test_mask_reaches_every_block_through_vit():
    model = R.ViT(**TINY).eval()
    x = torch.randn(2, 3, 40, 40)
    full = torch.ones(26, 26, dtype=torch.bool)
    torch.testing.assert_close(model(x, full), model(x))
    diagonal = torch.eye(26, dtype=torch.bool)
    assert not torch.allclose(model(x, diagonal), model(x))


def test_dropout_active_only_in_train_mode():
    model = R.ViT(**TINY, dropout=0.5, drop_p=0.2, forward_drop_p=0.3)
    x = torch.randn(2, 3, 40, 40)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(emb_size=50, num_heads=8), "divisible by num_heads"),
    (dict(num_heads=0), "divisible by num_heads"),
    (dict(dropout=-0.1), "dropout must be a probability"),
    (dict(dropout=1.5), "dropout must be a probability"),
    (dict(drop_p=2.0), "drop_p must be a probability"),
    (dict(forward_drop_p=-1), "forward_drop_p must be a probability"),
    (dict(scaling="flash"), "scaling must be one of"),
    (dict(depth=0), "depth must be at least 1"),
    (dict(patch_size=64), "img_size >= patch_size"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.ViT(**dict(TINY, **kwargs))


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        R.ViT(**TINY, heads=4)


@pytest.mark.parametrize("shape,match", [
    ((3, 40, 40), "expected an image batch"),
    ((2, 1, 40, 40), "expected 3 input channels"),
    ((2, 3, 48, 48), "differs from the size"),
    ((2, 3, 40, 32), "differs from the size"),
])
def test_bad_images(shape, match):
    with pytest.raises(ValueError, match=match):
        R.ViT(**TINY)(torch.randn(*shape))


def test_integer_image_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        R.ViT(**TINY)(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(26, 26), TypeError, "torch.bool"),
    (torch.ones(2, 26, 25, dtype=torch.bool), ValueError, "does not broadcast"),
    (torch.ones(3, 8, 26, 26, dtype=torch.bool), ValueError, "does not broadcast"),
    (torch.ones(1, 1, 1, 26, 26, dtype=torch.bool), ValueError, "does not broadcast"),
])
def test_bad_masks(mask, error, match):
    with pytest.raises(error, match=match):
        R.ViT(**TINY)(torch.randn(2, 3, 40, 40), mask)


def test_bad_token_width():
    with pytest.raises(ValueError, match="does not match emb_size"):
        R.MultiHeadAttention(48, 4)(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match="expected tokens of shape"):
        R.MultiHeadAttention(48, 4)(torch.randn(5, 48))
