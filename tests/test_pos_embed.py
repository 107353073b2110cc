"""Variable image sizes: timm-exact position resampling and both fused models at other sizes.

Nothing is cached: the fused models resample their position table on every forward at another size, so an
optimizer step, ``load_state_dict`` or a ``.data`` write is seen by the next forward. ``from_timm`` patches the
timm model in place, so each timm reference is a ``copy.deepcopy`` taken before accelerating."""
import copy
import warnings

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.configs import timm_kwargs
from vit_kernels.models import pos_embed
from vit_kernels.models import timm_vit as timm_patch
from vit_kernels.models import tutorial as tutorial_patch
from vit_kernels.models.pos_embed import image_grid, resample_pos_embed

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


def test_position_cache_is_gone():
    """Nothing caches resampled tables any more (see the module docstring)."""
    assert not hasattr(pos_embed, "PositionCache")


def count_resamples(monkeypatch, module):
    """Record the new grid of every ``resample_pos_embed`` call the patched forwards of ``module`` make."""
    calls = []
    real = module.resample_pos_embed

    def counting(*args, **kwargs):
        calls.append(tuple(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "resample_pos_embed", counting)
    return calls


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
    calls = count_resamples(monkeypatch, tutorial_patch)
    x = torch.randn(2, 3, 40, 24)
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = fast(x)
        assert fast.last_backend == "triton"
        torch.testing.assert_close(got, reference_forward(ref, x, (5, 3)), **TOL)
        torch.testing.assert_close(fast(x.flip(0)), got.flip(0), **TOL)  # resampled again, same answer
        torch.testing.assert_close(fast(y), ref(y), **TOL)  # the model's own size: positions as they are
    assert calls == [(5, 3), (5, 3)]  # every forward at another size resamples; none at the native size


def test_tutorial_dynamic_sees_data_writes_to_positions():
    """A write through ``positions.data`` (no version bump) is seen by the very next forward."""
    ref, fast = tutorial_twin(dynamic_img_size=True)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        before = fast(x)
        delta = torch.randn_like(ref[0].positions)
        fast[0].positions.data.add_(delta)
        ref[0].positions.data.add_(delta)
        after = fast(x)
        torch.testing.assert_close(after, reference_forward(ref, x, (3, 5)), **TOL)
    assert not torch.allclose(after, before, **TOL)


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
    assert fast.last_backend == "triton"
    for name in ("positions", "cls_token"):
        torch.testing.assert_close(getattr(fast[0], name).grad, getattr(ref[0], name).grad, rtol=1e-4, atol=1e-6)


# --- the timm flavour --------------------------------------------------------------------------------------
TIMM_TINY = timm_kwargs("tiny_timm")  # 32 x 32 images, patch 8, emb 48, 2 heads, 7 classes


def timm_model(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TIMM_TINY, **kw)).eval()


FUSED_KERNELS = {"patch_embed", "layer_norm_linear", "linear", "attention"}


@pytest.mark.parametrize("variant", [dict(), dict(reg_tokens=2, no_embed_class=True),
                                     dict(class_token=False, global_pool="avg")])
def test_timm_dynamic_model_matches_timm_at_other_sizes(variant):
    model = timm_model(dynamic_img_size=True, **variant)
    ref = copy.deepcopy(model)  # timm's own forward; from_timm patches `model` in place
    fast = vit_kernels.from_timm(model)
    assert fast is model and list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        ops.reset_launch_counts()
        got = fast(x)
        assert set(ops.launch_counts()) >= FUSED_KERNELS
        torch.testing.assert_close(got, ref(x), **TOL)
        torch.testing.assert_close(fast.forward_features(x), ref.forward_features(x), **TOL)
    with pytest.raises(ValueError, match="multiple of the patch size"), torch.no_grad():
        fast(torch.randn(2, 3, 36, 32))


def test_timm_dynamic_sees_data_writes_to_pos_embed(monkeypatch):
    """Every forward at another size resamples ``pos_embed`` (nothing cached), so a write through
    ``pos_embed.data`` (which bypasses the version counter) is seen by the next forward, as in timm."""
    model = timm_model(dynamic_img_size=True, reg_tokens=1)
    ref = copy.deepcopy(model)
    fast = vit_kernels.from_timm(model)
    calls = count_resamples(monkeypatch, timm_patch)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        before = fast(x)
        torch.testing.assert_close(before, ref(x), **TOL)
        delta = torch.randn_like(ref.pos_embed)
        fast.pos_embed.data.add_(delta)
        ref.pos_embed.data.add_(delta)
        after = fast(x)
        torch.testing.assert_close(after, ref(x), **TOL)
        assert fast(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert not torch.allclose(after, before, **TOL)
    assert calls == [(3, 5), (3, 5)]  # once per forward at 24 x 40, none at the native 32 x 32


def test_from_timm_opt_in_on_a_fixed_size_model():
    model = timm_model()
    fixed = copy.deepcopy(model)  # timm's own fixed-size model
    dynamic = timm_model(dynamic_img_size=True)
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 24, 40)
    with pytest.raises(ValueError, match="dynamic_img_size=True"), torch.no_grad():
        vit_kernels.from_timm(model)(x)
    fast = vit_kernels.from_timm(model, dynamic_img_size=True)
    assert fast is model
    with torch.no_grad():
        torch.testing.assert_close(fast(x), dynamic(x), **TOL)
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fast(y), fixed(y), **TOL)
    assert not vit_kernels.is_accelerated(fixed) and not vit_kernels.is_accelerated(dynamic)


def test_from_timm_opt_out_on_a_dynamic_model():
    fast = vit_kernels.from_timm(timm_model(dynamic_img_size=True), dynamic_img_size=False)
    with pytest.raises(ValueError, match="differs from the model's"), torch.no_grad():
        fast(torch.randn(2, 3, 24, 40))


def test_timm_opt_in_with_patch_dropout_matches_timm():
    """Train mode with patch dropout: an opted-in fixed-size model at another size runs the kernels with the
    resampled table and timm's own ``patch_drop`` module, as a dynamic timm model does (same seed, same draws)."""
    model = timm_model(patch_drop_rate=0.25)
    dynamic = timm_model(dynamic_img_size=True, patch_drop_rate=0.25)
    dynamic.load_state_dict(model.state_dict())
    fast = vit_kernels.from_timm(model, dynamic_img_size=True).train()
    dynamic.train()
    x = torch.randn(4, 3, 40, 24)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vit_kernels")  # no fallback warning
        ops.reset_launch_counts()
        torch.manual_seed(3)
        got = fast(x)
        assert set(ops.launch_counts()) >= FUSED_KERNELS
        torch.manual_seed(3)
        features = fast.forward_features(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, dynamic(x), **TOL)
    torch.manual_seed(3)
    expected = dynamic.forward_features(x)
    assert features.shape == expected.shape and features.shape[1] < 1 + 5 * 3  # patches were dropped
    torch.testing.assert_close(features, expected, **TOL)


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
    ops.reset_launch_counts()
    fast(x).square().mean().backward()
    assert set(ops.launch_counts()) >= FUSED_KERNELS
    twin(x).square().mean().backward()
    for name in ("pos_embed", "cls_token", "reg_token", "patch_embed.proj.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, twin.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-6)
