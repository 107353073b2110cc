"""Large offsets, grid limits, empty batches, device/dtype mixes, layouts, non-finite values, big magnitudes.

The sweeps in the first section run over every registered op (``OpSpec.examples``): a new op is covered
without editing this file."""
import importlib

import pytest
import timm
import torch
import torch.nn.functional as F

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.configs import SIZES, timm_kwargs, tutorial_kwargs
from vit_kernels.ops.attention import attention_torch
from vit_kernels.ops.launch import MAX_GRID_X, launch_grid
from vit_kernels.ops.linear import linear_torch
from vit_kernels.ops.patch_embed import patch_embed_torch
from vit_kernels.ops.registry import registered_ops

from helpers import assert_matches, randn

TINY = tutorial_kwargs("tiny", depth=1)
TIMM_TINY = timm_kwargs("tiny_timm", depth=1)
SPECS = {spec.name: spec for spec in registered_ops()}
HUGE_STRIDE = 2**30  # sample 2 starts at element 2**31: int32 offsets would wrap (the interpreter emulates it)


# --- every registered op: the sweeps ------------------------------------------------------------------------
def tensors_of(args, kwargs):
    """(position or keyword, tensor) of each tensor argument of an example call."""
    return [*((i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)),
            *((k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor))]


def replaced(args, kwargs, where, value):
    if isinstance(where, int):
        return (*args[:where], value, *args[where + 1:]), kwargs
    return args, {**kwargs, where: value}


@pytest.mark.every_op
@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_op_matches_its_pytorch_fallback(name, dtype, device):
    """The kernels and the op's own PyTorch fallback compute the same function (random ops: the same share of
    zeros), and the kernel path launches one of the op's registered kernels."""
    spec = SPECS[name]
    kernel_names = {grid.launcher.name for grid in spec.kernels} | set(spec.also_launches)
    for args, kwargs in spec.examples(device, dtype, 3):
        vit_kernels.ops.reset_launch_counts()
        got = spec.fn(*args, **kwargs)
        assert set(vit_kernels.ops.launch_counts()) & kernel_names, f"{name}: none of {kernel_names} launched"
        with vit_kernels.ops.use_backend("torch"):
            expected = spec.fn(*args, **kwargs)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        if spec.random:
            assert abs((got == 0).float().mean() - (expected == 0).float().mean()) < 0.1
        else:
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.every_op
@pytest.mark.parametrize("name", SPECS)
def test_every_op_takes_an_empty_batch(name, device):
    spec = SPECS[name]
    for args, kwargs in spec.examples(device, torch.float32, 0):
        got = spec.fn(*args, **kwargs)
        with vit_kernels.ops.use_backend("torch"):
            assert got.shape == spec.fn(*args, **kwargs).shape and got.shape[0] == 0


@pytest.mark.every_op
@pytest.mark.parametrize("name", SPECS)
def test_every_op_rejects_bad_dtypes_and_non_tensors(name, device):
    spec = SPECS[name]
    args, kwargs = spec.examples(device, torch.float32, 2)[0]
    x = args[0]
    for bad in (x.to(torch.int32), x.double()):
        with pytest.raises(TypeError, match="supported: float32, float16, bfloat16"):
            spec.fn(bad, *args[1:], **kwargs)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        spec.fn(x.tolist(), *args[1:], **kwargs)


@pytest.mark.every_op
@pytest.mark.parametrize("name", SPECS)
def test_every_op_rejects_tensors_on_another_device(name, device):
    """Each tensor argument after the first, moved to the meta device, is a ValueError naming the device."""
    spec = SPECS[name]
    args, kwargs = spec.examples(device, torch.float32, 2)[0]
    for where, t in tensors_of(args, kwargs)[1:]:
        bad_args, bad_kwargs = replaced(args, kwargs, where, t.to("meta"))
        with pytest.raises(ValueError, match="is on meta"):
            spec.fn(*bad_args, **bad_kwargs)


def huge_strided(shape, device):
    """A tensor whose leading-axis stride is 2**30 elements: its last sample lies past 2**31. Only the pages
    of the samples themselves are ever touched."""
    per_sample = torch.Size(shape[1:]).numel()
    storage = torch.empty(HUGE_STRIDE * (shape[0] - 1) + per_sample, dtype=torch.float16, device=device)
    inner = torch.empty(shape[1:]).stride()
    t = storage.as_strided(shape, (HUGE_STRIDE, *inner))
    for i in range(shape[0]):
        t[i].normal_()
    return t


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite allocates real >2**31-element tensors")
class TestOffsetsPast2To31:
    """Every kernel's per-sample base offset is int64: these inputs put sample 2 at element 2**31."""

    def test_linear_and_layer_norm(self, device):
        x = huge_strided((3, 64), device)
        w = randn(40, 64, dtype=torch.float16, device=device)
        torch.testing.assert_close(ops.linear(x, w).float(), x.float() @ w.float().t(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ops.layer_norm(x, None, None).float(), F.layer_norm(x.float(), (64,)),
                                   rtol=2e-2, atol=2e-2)

    def test_attention(self, device):
        qkv = huge_strided((3, 17, 3 * 32), device)
        got = ops.attention(qkv, 2, "qkv h d", "paper")
        torch.testing.assert_close(got.float(), attention_torch(qkv.float(), 2, "qkv h d", "paper"),
                                   rtol=2e-2, atol=2e-2)

    def test_patch_embed_and_pool(self, device):
        img = huge_strided((3, 2, 16, 16), device)
        w = randn(24, 2, 8, 8, dtype=torch.float16, device=device, scale=0.1)
        cls = randn(1, 24, dtype=torch.float16, device=device)
        got = ops.patch_embed(img, w, None, cls, None)
        torch.testing.assert_close(got.float(), patch_embed_torch(img.float(), w.float(), None, cls.float(), None,
                                                                  True), rtol=2e-2, atol=2e-2)
        tokens = huge_strided((3, 5, 24), device)
        torch.testing.assert_close(ops.pool_tokens(tokens, "mean", 1, norm=False).float(),
                                   tokens[:, 1:].float().mean(1), rtol=2e-2, atol=2e-2)


def test_grids_stay_within_cuda_limits():
    assert launch_grid(MAX_GRID_X) == (MAX_GRID_X,)
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        launch_grid(MAX_GRID_X + 1)
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        launch_grid(1, 65536)


def test_attention_grid_is_one_dimensional_for_many_heads(monkeypatch, device):
    """batch x heads beyond 65,535 would overflow grid axis 1 or 2: the attention grid is 1-D."""
    attention_module = importlib.import_module("vit_kernels.ops.attention")
    assert attention_module.attention_grid(70000, 16, 197, 64) == (70000 * 16 * 4,)
    grids = []
    real = attention_module.attention_grid
    monkeypatch.setattr(attention_module, "attention_grid", lambda *a: grids.append(real(*a)) or grids[-1])
    qkv = randn(40, 1, 3 * 2 * 16, device=device)
    got = ops.attention(qkv, 2, "qkv h d", "paper")
    assert grids and all(len(g) == 1 for g in grids) and grids[-1][0] >= 80
    torch.testing.assert_close(got, qkv[..., 64:])  # one token attends to itself: output = v


def test_sample_size_limit_is_a_clear_error():
    qkv = torch.empty(2**32, device="meta").as_strided((1, 2, 48), (48, 2**31, 1))  # no memory behind it
    with pytest.raises(ValueError, match="int32 offsets"):
        ops.attention(qkv, 1)


# --- empty batches: an empty result of the right shape, at every entry point --------------------------------
def test_empty_batches(device):
    assert ops.linear(randn(0, 8, device=device), randn(4, 8, device=device)).shape == (0, 4)
    assert ops.layer_norm(randn(0, 8, device=device), None, None).shape == (0, 8)
    assert ops.attention(randn(0, 5, 48, device=device), 2).shape == (0, 5, 16)
    img, w = randn(0, 3, 16, 16, device=device), randn(8, 3, 8, 8, device=device)
    assert ops.patch_embed(img, w, None, randn(1, 8, device=device), None).shape == (0, 5, 8)
    assert ops.pool_tokens(randn(0, 5, 8, device=device)).shape == (0, 8)
    ref = R.ViT(**TINY).to(device).eval()
    fast = vit_kernels.ViT(**TINY).to(device).eval()
    with torch.no_grad():
        assert fast(randn(0, 3, 48, 48, device=device)).shape == ref(randn(0, 3, 48, 48, device=device)).shape
        model = timm.create_model(SIZES["tiny_timm"].timm, **TIMM_TINY).to(device).eval()
        expected = model(randn(0, 3, 32, 32, device=device)).shape  # timm's own, before patching in place
        assert vit_kernels.from_timm(model)(randn(0, 3, 32, 32, device=device)).shape == expected == (0, 7)


# --- dtype and device mixes ------------------------------------------------------------------------------
def test_model_input_dtype_must_match_parameters(device):
    fast = vit_kernels.ViT(**TINY).to(device).eval()
    with pytest.raises(TypeError, match=r"input dtype .* differs from the (model's )?parameters"), torch.no_grad():
        fast(randn(2, 3, 48, 48, device=device).half())
    model = timm.create_model(SIZES["tiny_timm"].timm, **TIMM_TINY).to(device).eval()
    with pytest.raises(TypeError, match=r"input dtype .* differs from the (model's )?parameters"), torch.no_grad():
        vit_kernels.from_timm(model)(randn(2, 3, 32, 32, device=device).half())


def test_device_mixes_are_rejected():
    """Checked without a GPU through the meta device; the GPU suite repeats it with cuda."""
    fast = vit_kernels.ViT(**TINY).to("meta")
    with pytest.raises(ValueError, match=r"input is on cpu but the (model's )?parameters are on meta"):
        fast(torch.randn(2, 3, 48, 48))
    x, w = torch.randn(4, 8), torch.randn(3, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
        ops.linear(x, w)
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.layer_norm(x, w[0], None)
    with pytest.raises(ValueError, match="mask is on meta"):
        ops.attention(torch.randn(1, 4, 48), 2, mask=torch.ones(4, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8, device="meta"), None,
                        torch.randn(1, 4), None)


@pytest.mark.parametrize("call", [
    lambda: ops.linear(torch.ones(2, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32)),
    lambda: ops.layer_norm(torch.ones(2, 4, dtype=torch.int64), None, None),
    lambda: ops.attention(torch.ones(1, 2, 6, dtype=torch.int16), 1),
    lambda: ops.patch_embed(torch.ones(1, 3, 8, 8, dtype=torch.uint8), torch.ones(4, 3, 8, 8), None,
                            torch.ones(1, 4), None),
    lambda: ops.pool_tokens(torch.ones(1, 2, 4, dtype=torch.int32)),
    lambda: ops.linear(torch.ones(2, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)),
])
def test_integer_and_float64_inputs_are_type_errors(call):
    with pytest.raises(TypeError, match="supported: float32, float16, bfloat16"):
        call()


# --- layouts: non-contiguous and channels-last inputs give the right answer ----------------------------------
def test_model_accepts_channels_last_and_strided_images(device):
    ref = R.ViT(**TINY).to(device).eval()
    fast = vit_kernels.ViT(**TINY).to(device).eval()
    fast.load_state_dict(ref.state_dict())
    x = randn(2, 3, 48, 48, device=device)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), expected,
                                   rtol=1e-4, atol=1e-5)
        strided = torch.cat([x, x], dim=-1)[..., ::2]  # every other column: stride 2 along W
        torch.testing.assert_close(fast(strided), ref(strided), rtol=1e-4, atol=1e-5)


# --- non-finite values propagate where the reference's do ---------------------------------------------------
def same_non_finite(got, expected):
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), "non-finite pattern differs"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite].double(), expected[finite].double(), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf of the inputs given
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_propagate(bad, device):
    x = randn(6, 40, device=device)
    x[2, 5] = bad
    w, b = randn(24, 40, device=device), randn(24, device=device)
    same_non_finite(ops.linear(x, w, b), F.linear(x, w, b))
    same_non_finite(ops.layer_norm(x, None, None), F.layer_norm(x, (40,)))
    qkv = randn(2, 9, 48, device=device)
    qkv[1, 4, 3] = bad  # a query element: one row of one head
    qkv[0, 2, 20] = bad  # a key element: every query of that head sees it
    same_non_finite(ops.attention(qkv, 2, "qkv h d", "paper"), attention_torch(qkv, 2, "qkv h d", "paper"))
    img = randn(1, 3, 16, 16, device=device)
    img[0, 1, 9, 2] = bad
    w4, cls = randn(8, 3, 8, 8, device=device), randn(1, 8, device=device)
    same_non_finite(ops.patch_embed(img, w4, None, cls, None), patch_embed_torch(img, w4, None, cls, None, True))


def test_nan_in_masked_keys_matches_reference(device):
    """A masked-out key is skipped in softmax, but 0 x NaN in P @ V is still NaN, as in the reference."""
    qkv = randn(1, 6, 48, device=device)
    qkv[0, 5, 32:] = float("nan")  # the value of key 5
    mask = torch.ones(6, 6, dtype=torch.bool, device=device)
    mask[:, 5] = False
    same_non_finite(ops.attention(qkv, 2, "qkv h d", "tutorial", mask),
                    attention_torch(qkv, 2, "qkv h d", "tutorial", mask))


# --- large magnitudes do not overflow where the reference does not -------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_large_magnitudes(dtype, device):
    x = randn(4, 26, 48, dtype=dtype, device=device, scale=1e3)
    w, b = randn(48, dtype=dtype, device=device), randn(48, dtype=dtype, device=device)
    got = ops.layer_norm(x, w, b)  # fp32 statistics: sum of squares ~ 1e8 fits
    assert torch.isfinite(got).all()
    assert_matches(got, F.layer_norm(x, (48,), w, b), F.layer_norm(x.double(), (48,), w.double(), b.double()))
    qkv = randn(2, 26, 3 * 48, dtype=dtype, device=device, scale=30.0)  # scores ~ 1e4 * head_dim
    got = ops.attention(qkv, 2, "qkv h d", "paper")
    assert torch.isfinite(got).all()
    assert_matches(got, attention_torch(qkv, 2, "qkv h d", "paper"),
                   attention_torch(qkv.double(), 2, "qkv h d", "paper"))
    h = randn(30, 64, dtype=dtype, device=device, scale=1e2)
    wl = randn(32, 64, dtype=dtype, device=device, scale=0.1)
    got = ops.linear(h, wl, activation="gelu")  # |y| ~ 1e2: GELU's erf saturates, no overflow
    assert torch.isfinite(got).all()
    assert_matches(got, linear_torch(h, wl, None, "gelu"), linear_torch(h.double(), wl.double(), None, "gelu"))
