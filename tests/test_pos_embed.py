"""Variable image sizes: timm-exact position resampling, its cache, and both fused models at other sizes."""
import warnings

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import vit_kernels
from vit_kernels import reference as R
from vit_kernels.configs import timm_kwargs
from vit_kernels.models import pos_embed
from vit_kernels.models.pos_embed import PositionCache, image_grid, resample_pos_embed

TOL = dict(rtol=1e-4, atol=1e-5)


# --- resample_pos_embed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("old,new,prefix", [
    ((4, 4), (6, 6), 1),   # square up
    ((6, 6), (3, 3), 1),   # square down (antialias matters)
    ((4, 4), (5, 3), 0),   # non-square, no prefix
    ((3, 5), (7, 2), 3),   # non-square source, cls + registers
])
@pytest.mark.parametrize("antialias", [True, False])
def test_resample_equals_timm(old, new, prefix, antialias):
    pos = torch.randn(prefix + old[0] * old[1], 24)
    got = resample_pos_embed(pos, old, new, prefix, antialias=antialias)
    expected = resample_abs_pos_embed(pos[None], list(new), list(old), prefix, antialias=antialias)[0]
    assert torch.equal(got, expected)
    assert torch.equal(got[:prefix], pos[:prefix])


def test_resample_fp16_interpolates_in_fp32_like_timm():
    pos = torch.randn(1 + 16, 24).half()
    got = resample_pos_embed(pos, (4, 4), (3, 6), 1)
    assert got.dtype == torch.float16
    assert torch.equal(got, resample_abs_pos_embed(pos[None], [3, 6], [4, 4], 1)[0])


def test_resample_same_grid_returns_pos_itself_and_checks_shapes():
    pos = torch.randn(17, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4), 1) is pos
    with pytest.raises(ValueError, match="expected num_prefix"):
        resample_pos_embed(pos, (4, 4), (5, 5), 0)
    with pytest.raises(ValueError, match=r"\[tokens, dim\]"):
        resample_pos_embed(pos[None], (4, 4), (5, 5), 1)


def test_image_grid():
    assert image_grid(48, 24, 8) == (6, 3)
    assert image_grid(32, 48, (8, 16)) == (4, 3)
    for h, w in [(30, 32), (32, 4), (0, 8)]:
        with pytest.raises(ValueError, match="multiple of the patch size"):
            image_grid(h, w, 8)


# --- PositionCache -----------------------------------------------------------------------------------------
def count_resamples(monkeypatch):
    calls = []
    real = pos_embed.resample_pos_embed

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(pos_embed, "resample_pos_embed", counting)
    return calls


def test_cache_hits_and_invalidation(monkeypatch):
    calls = count_resamples(monkeypatch)
    param = torch.nn.Parameter(torch.randn(17, 8))
    cache = PositionCache()
    with torch.no_grad():
        first = cache.get(param, (4, 4), (5, 3), 1)
        assert cache.get(param, (4, 4), (5, 3), 1) is first
        other = cache.get(param, (4, 4), (2, 6), 1)
        assert cache.get(param, (4, 4), (2, 6), 1) is other
        assert calls == [(5, 3), (2, 6)] and (cache.hits, cache.misses) == (2, 2)
        assert cache.get(param.half(), (4, 4), (5, 3), 1).dtype == torch.float16  # per dtype: a miss
        assert len(calls) == 3
        param.mul_(2)  # in place (an optimizer step): the version changes
        again = cache.get(param, (4, 4), (5, 3), 1)
    assert len(calls) == 4 and again is not first
    torch.testing.assert_close(again, 2 * first)
    assert not again.requires_grad


def test_cache_does_not_cache_when_autograd_needs_the_parameter(monkeypatch):
    calls = count_resamples(monkeypatch)
    param = torch.nn.Parameter(torch.randn(17, 8))
    cache = PositionCache()
    weights = torch.randn(1 + 15, 8)
    for _ in range(2):
        out = cache.get(param, (4, 4), (5, 3), 1)
        assert out.requires_grad
        (out * weights).sum().backward()
    assert len(calls) == 2 and len(cache) == 0
    expected = torch.autograd.grad((resample_pos_embed(param, (4, 4), (5, 3), 1) * weights).sum(), param)[0]
    torch.testing.assert_close(param.grad, 2 * expected)


def test_cache_is_bounded():
    cache = PositionCache(maxsize=2)
    pos = torch.randn(17, 8)
    for h in (2, 3, 5):
        cache.get(pos, (4, 4), (h, h), 1)
    assert len(cache) == 2


# --- the tutorial flavour ----------------------------------------------------------------------------------
CFG = dict(in_channels=3, patch_size=8, emb_size=48, img_size=32, depth=2, n_classes=10, num_heads=3)


def tutorial_twin(**kw):
    ref = R.ViT(**CFG).eval()
    fast = vit_kernels.ViT(**CFG, **kw).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def reference_forward(ref, x, grid):
    """The oracle: the reference ViT's own modules with its positions replaced by the resampled table."""
    g = CFG["img_size"] // CFG["patch_size"]
    positions = resample_pos_embed(ref[0].positions, (g, g), grid, 1)
    embed = ref[0]
    tokens = torch.cat([embed.cls_token.expand(x.shape[0], -1, -1), embed.projection(x)], dim=1) + positions
    return ref[2](ref[1](tokens))


def test_tutorial_dynamic_non_square_equals_reference_with_resampled_positions(monkeypatch):
    ref, fast = tutorial_twin(dynamic_img_size=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    calls = count_resamples(monkeypatch)
    x = torch.randn(2, 3, 40, 24)
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = fast(x)
        assert fast.last_backend == "triton"
        torch.testing.assert_close(got, reference_forward(ref, x, (5, 3)), **TOL)
        torch.testing.assert_close(fast(x.flip(0)), got.flip(0), **TOL)  # the cached table, same answer
        torch.testing.assert_close(fast(y), ref(y), **TOL)  # the model's own size: positions as they are
    assert calls == [(5, 3)]


def test_tutorial_default_refuses_other_sizes_and_attribute_opts_in():
    ref, fast = tutorial_twin()
    x = torch.randn(2, 3, 48, 32)
    with pytest.raises(ValueError, match="differs from the size"), torch.no_grad():
        fast(x)
    fast.dynamic_img_size = True
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference_forward(ref, x, (6, 4)), **TOL)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(2, 3, 36, 32), ValueError, "multiple of the patch size"),
    (torch.randn(2, 3, 4, 32), ValueError, "multiple of the patch size"),
    (torch.randn(2, 1, 40, 32), ValueError, "input channels"),
    (torch.randn(3, 40, 32), ValueError, "expected an image batch"),
    (torch.zeros(2, 3, 40, 32, dtype=torch.int32), TypeError, "floating-point"),
])
def test_tutorial_dynamic_bad_sizes(x, error, match):
    _, fast = tutorial_twin(dynamic_img_size=True)
    with pytest.raises(error, match=match), torch.no_grad():
        fast(x)


def test_tutorial_dynamic_training_reaches_positions():
    ref, fast = tutorial_twin(dynamic_img_size=True)
    fast.train()
    ref.train()
    x = torch.randn(2, 3, 24, 40)
    fast(x).square().mean().backward()
    reference_forward(ref, x, (3, 5)).square().mean().backward()
    assert fast.last_backend == "triton" and len(fast._pos_cache) == 0
    for name in ("positions", "cls_token"):
        torch.testing.assert_close(getattr(fast[0], name).grad, getattr(ref[0], name).grad, rtol=1e-4, atol=1e-6)


# --- the timm flavour --------------------------------------------------------------------------------------
TIMM_TINY = timm_kwargs("tiny_timm")  # 32 x 32 images, patch 8, emb 48, 2 heads, 7 classes


def timm_model(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TIMM_TINY, **kw)).eval()


@pytest.mark.parametrize("variant", [dict(), dict(reg_tokens=2, no_embed_class=True),
                                     dict(class_token=False, global_pool="avg")])
def test_timm_dynamic_model_matches_timm_at_other_sizes(variant):
    model = timm_model(dynamic_img_size=True, **variant)
    fast = vit_kernels.from_timm(model)
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)
        torch.testing.assert_close(fast.forward_features(x), model.forward_features(x), **TOL)
    assert fast.last_backend == "triton"
    with pytest.raises(ValueError, match="multiple of the patch size"), torch.no_grad():
        fast(torch.randn(2, 3, 36, 32))


def test_from_timm_opt_in_on_a_fixed_size_model():
    model = timm_model()
    dynamic = timm_model(dynamic_img_size=True)
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 24, 40)
    with pytest.raises(ValueError, match="dynamic_img_size=True"), torch.no_grad():
        vit_kernels.from_timm(model)(x)
    fast = vit_kernels.from_timm(model, dynamic_img_size=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), dynamic(x), **TOL)
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fast(y), model(y), **TOL)


def test_timm_opt_in_reference_path_matches_timm():
    """Train mode with dropout the kernels leave to PyTorch (patch dropout): an opted-in fixed-size model
    at another size runs timm's modules with the resampled table, as a dynamic timm model does."""
    model = timm_model(patch_drop_rate=0.25)
    dynamic = timm_model(dynamic_img_size=True, patch_drop_rate=0.25)
    dynamic.load_state_dict(model.state_dict())
    fast = vit_kernels.from_timm(model, dynamic_img_size=True).train()
    dynamic.train()
    x = torch.randn(4, 3, 40, 24)
    with warnings.catch_warnings():  # the fallback warns once per class and session
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        got = fast(x)
        torch.manual_seed(3)
        features = fast.forward_features(x)
    assert fast.last_backend == "reference"
    torch.manual_seed(3)
    torch.testing.assert_close(got, dynamic(x), **TOL)
    torch.manual_seed(3)
    torch.testing.assert_close(features, dynamic.forward_features(x), **TOL)


def test_timm_dynamic_img_pad_still_refused():
    with pytest.raises(NotImplementedError, match="dynamic_img_pad"):
        vit_kernels.from_timm(timm_model(dynamic_img_size=True, dynamic_img_pad=True))


def test_timm_dynamic_training_gradients_match_timm():
    model = timm_model(dynamic_img_size=True, reg_tokens=1)
    twin = timm_model(dynamic_img_size=True, reg_tokens=1)
    twin.load_state_dict(model.state_dict())
    fast = vit_kernels.from_timm(model).train()
    twin.train()
    x = torch.randn(2, 3, 24, 40)
    fast(x).square().mean().backward()
    twin(x).square().mean().backward()
    assert fast.last_backend == "triton" and len(fast._pos_cache) == 0
    for name in ("pos_embed", "cls_token", "reg_token", "patch_embed.proj.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, twin.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-6)
