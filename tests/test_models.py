"""The drop-in fused ViT against the tutorial's code and the reference; from_timm against timm.

``from_timm`` patches the timm model it is given in place and returns it, so every timm reference below is a
``copy.deepcopy`` taken before accelerating (a deep copy of an unpatched model is unpatched)."""
import copy
import warnings

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.configs import timm_kwargs, tutorial_kwargs

import tutorial_vit as tutorial
from helpers import assert_matches

# N = 1 + (48 / 8)^2 = 37 tokens (odd); emb 72 / 3 heads = head_dim 24 (not a power of two)
ODD = tutorial_kwargs("tiny")
DEFAULT_HEADS = dict(in_channels=2, patch_size=8, emb_size=64, img_size=40, depth=2, n_classes=7)  # 8 heads, N=26


def fused_twin(cls=R.ViT, device="cpu", **cfg):
    ref = cls(**cfg).to(device).eval()
    fast = vit_kernels.ViT(**cfg).to(device).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def image(cfg, batch=3, dtype=torch.float32, device="cpu"):
    return torch.randn(batch, cfg["in_channels"], cfg["img_size"], cfg["img_size"]).to(device, dtype)


@pytest.mark.parametrize("cfg", [ODD, DEFAULT_HEADS])
def test_matches_tutorial_code(cfg, device):
    theirs, ours = fused_twin(tutorial.ViT, device, **cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = image(cfg, device=device)
    with torch.no_grad():
        expected = theirs.double()(x.double())
        got = ours(x)
    assert ours.last_backend == "triton"
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(scaling, masked, device):
    ref, fast = fused_twin(device=device, **ODD, scaling=scaling)
    x = image(ODD, device=device)
    mask = torch.rand(3, 1, 37, 37, device=device) > 0.3 if masked else None
    with torch.no_grad():
        torch.testing.assert_close(fast(x, mask), ref(x, mask), rtol=1e-4, atol=1e-5)


def assert_fp16_within_twice_pytorch_error(ref, fast, x):
    """fp16 output of ``fast`` vs the fp64 ``ref``: within twice PyTorch's own fp16 error."""
    with torch.no_grad():
        expected = ref.double()(x.double())
        lowp_torch = ref.half()(x.half())
        got = fast.half()(x.half())
    assert got.dtype == torch.float16
    assert_matches(got, lowp_torch, expected)


def test_fp16_within_twice_pytorch_error(device):
    ref, fast = fused_twin(device=device, **ODD)
    assert_fp16_within_twice_pytorch_error(ref, fast, image(ODD, device=device))


def test_autocast_runs_in_the_autocast_dtype(device):
    ref, fast = fused_twin(device=device, **ODD)
    x = image(ODD, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        got = fast(x)
    assert got.dtype == torch.float16
    with torch.no_grad():
        expected = ref.double()(x.double())
        lowp_torch = ref.half()(x.half())
    assert_matches(got, lowp_torch, expected)


BANNED_ATEN = ("mm", "addmm", "bmm", "matmul", "linear", "_softmax", "softmax", "native_layer_norm", "layer_norm",
               "convolution", "conv2d", "gelu", "scaled_dot_product", "einsum", "mean", "cat")


class AtenRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add((func.namespace, func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_fused_forward_dispatches_no_torch_compute(grad, device):
    """Proof the kernels ran: no aten matmul/softmax/layer_norm/conv/gelu op is dispatched. With autograd the
    ops go through torch.library (visible here); under no_grad they skip the dispatcher (launch counts)."""
    _, fast = fused_twin(device=device, **ODD)
    x = image(ODD, device=device)
    mask = torch.rand(37, 37, device=device) > 0.2
    ops.reset_launch_counts()
    with torch.set_grad_enabled(grad), AtenRecorder() as recorder:
        fast(x, mask)
    banned = {name for space, name in recorder.ops if space == "aten" and name.lstrip("_").startswith(BANNED_ATEN)}
    assert not banned, f"PyTorch computed part of the fused forward: {sorted(banned)}"
    ours = {name for space, name in recorder.ops if space == "vit_kernels"}
    # proj goes through linear_with_stats (it also hands LN2 its statistics): launched as "linear"; under autograd
    # the MLP is one ops.mlp (launched as fc1's "layer_norm_linear" and fc2's "linear")
    assert ours == ({"patch_embed", "layer_norm_linear", "mlp", "linear", "linear_with_stats", "attention",
                     "pool_norm"} if grad else set())
    depth = ODD["depth"]
    assert ops.launch_counts() == {"patch_embed": 1, "layer_norm_linear": 2 * depth, "linear": 2 * depth + 1,
                                   "attention": depth, "pool_norm": 1}


def test_torch_backend_computes_the_same():
    ref, fast = fused_twin(**ODD, scaling="paper")
    x = image(ODD)
    with torch.no_grad(), ops.use_backend("torch"):
        got = fast(x)
    assert fast.last_backend == "torch"
    torch.testing.assert_close(got, ref(x).detach(), rtol=1e-4, atol=1e-5)


DROPOUTS = dict(dropout=0.2, drop_p=0.1, forward_drop_p=0.15)


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_train_mode_dropout_runs_in_the_kernels(device):
    ref, fast = fused_twin(device=device, **ODD, **DROPOUTS)
    fast.train()
    x = image(ODD, device=device)
    ops.reset_launch_counts()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vit_kernels")  # no fallback warning
        torch.manual_seed(1)
        a = fast(x)
    assert fast.last_backend == "triton"
    assert set(ops.launch_counts()) == {"patch_embed", "layer_norm_linear", "linear", "attention", "pool_norm"}
    torch.manual_seed(1)
    b = fast(x)
    c = fast(x)
    assert torch.equal(a, b) and not torch.equal(a, c)  # reproducible per seed, fresh masks otherwise
    with torch.no_grad():
        assert not torch.allclose(a, ref(x))  # eval (no dropout) differs
    a.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_train_mode_dropout_placement_matches_the_tutorial():
    """The fused model's PyTorch path draws its dropout masks from torch's RNG in the tutorial's order and
    shapes, so with the same seed it equals the reference exactly: every dropout sits where the tutorial's
    does (the kernels' Philox masks are checked against the same formulas in tests/test_dropout.py)."""
    ref, fast = fused_twin(**ODD, **DROPOUTS)
    ref.train()
    fast.train()
    x = image(ODD)
    torch.manual_seed(7)
    expected = ref(x)
    with ops.use_backend("torch"):
        torch.manual_seed(7)
        got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_train_mode_without_dropout_uses_kernels_and_trains(device):
    _, fast = fused_twin(device=device, **ODD)
    fast.train()
    out = fast(image(ODD, device=device))
    assert fast.last_backend == ops.backend_for(out)
    out.square().mean().backward()  # gradients vs the reference: tests/test_backward.py
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(3, 48, 48), ValueError, "expected an image batch"),
    (torch.randn(2, 1, 48, 48), ValueError, "input channels"),
    (torch.randn(2, 3, 40, 40), ValueError, "differs from the size"),
    (torch.randn(2, 3, 48, 48).double(), TypeError, r"input dtype .* differs from the (model's )?parameters"),
    (torch.zeros(2, 3, 48, 48, dtype=torch.int32), TypeError, "floating-point"),
])
def test_bad_input(x, error, match):
    _, fast = fused_twin(**ODD)
    with pytest.raises(error, match=match), torch.no_grad():
        fast(x)


def test_float64_model_is_refused_by_the_kernels():
    _, fast = fused_twin(**ODD)
    with pytest.raises(TypeError, match="supported: float32, float16, bfloat16"), torch.no_grad():
        fast.double()(image(ODD, dtype=torch.float64))


def test_bad_mask():
    _, fast = fused_twin(**ODD)
    with pytest.raises(ValueError, match="does not broadcast"), torch.no_grad():
        fast(image(ODD), torch.ones(36, 36, dtype=torch.bool))


@pytest.mark.gpu
def test_device_mix_is_rejected():
    _, fast = fused_twin(**ODD)
    match = r"input is on cuda.* but the (model's )?parameters are on cpu"
    with pytest.raises(ValueError, match=match), torch.no_grad():
        fast(image(ODD).cuda())


# --- timm -------------------------------------------------------------------------------------------------
TIMM_TINY = timm_kwargs("tiny_timm")  # 17 tokens, emb 48, 2 heads, 7 classes
TIMM_VARIANTS = {
    "token": dict(global_pool="token"),
    "avg_fc_norm": dict(global_pool="avg"),
    "avg_final_norm": dict(global_pool="avg", fc_norm=False),
    "no_cls_token": dict(class_token=False, global_pool="avg"),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "registers": dict(reg_tokens=1),
    "layer_scale_no_qkv_bias": dict(init_values=0.1, qkv_bias=False),
    "gelu_tanh_pre_norm_head_dim_24": dict(act_layer="gelu_tanh", pre_norm=True, num_heads=3, embed_dim=72),
    "no_head": dict(num_classes=0),
}


def timm_model(device="cpu", **kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TIMM_TINY, **kw)).to(device).eval()


def timm_pair(device="cpu", **kw):
    """(timm's own model, the same weights accelerated in place): the reference is copied before patching."""
    model = timm_model(device, **kw)
    ref = copy.deepcopy(model)
    fast = vit_kernels.from_timm(model)
    assert fast is model and vit_kernels.is_accelerated(fast) and not vit_kernels.is_accelerated(ref)
    return ref, fast


FUSED_KERNELS = {"patch_embed", "layer_norm_linear", "linear", "attention"}


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_from_timm_matches_timm(variant, device):
    ref, fast = timm_pair(device, **TIMM_VARIANTS[variant])
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        ops.reset_launch_counts()
        got = fast(x)
        assert set(ops.launch_counts()) >= FUSED_KERNELS  # the kernels computed it
        torch.testing.assert_close(got, ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-5)
        feats = ref.forward_features(x)
        torch.testing.assert_close(fast.forward_head(feats, pre_logits=True), ref.forward_head(feats, True),
                                   rtol=1e-4, atol=1e-5)


def test_from_timm_patches_in_place_and_round_trips_checkpoints():
    model = timm_model()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    fast = vit_kernels.from_timm(model)
    assert fast is model and vit_kernels.is_accelerated(model)
    assert list(fast.state_dict()) == keys and all(p is params[n] for n, p in fast.named_parameters())
    assert vit_kernels.from_timm(model) is model  # twice is once
    other = timm_model()
    with torch.no_grad():  # different weights, so the load below is seen in the outputs
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(other.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ops.reset_launch_counts()
        torch.testing.assert_close(fast(x), other(x), rtol=1e-4, atol=1e-5)
        assert set(ops.launch_counts()) >= FUSED_KERNELS
        assert vit_kernels.restore(model) is model and not vit_kernels.is_accelerated(model)
        ops.reset_launch_counts()
        torch.testing.assert_close(model(x), other(x), rtol=1e-4, atol=1e-5)
        assert ops.launch_counts() == {}  # restored: timm's own forward


def test_from_timm_fp16(device):
    ref, fast = timm_pair(device)
    assert_fp16_within_twice_pytorch_error(ref, fast, torch.randn(2, 3, 32, 32, device=device))


@pytest.mark.parametrize("kw,match", [
    (dict(global_pool="max"), "global_pool='max'"),
    (dict(dynamic_img_size=True, dynamic_img_pad=True), "dynamic_img_pad"),  # dynamic_img_size alone works
    (dict(act_layer="relu"), "activation ReLU"),  # map pooling, qk_norm, QuickGELU: tests/test_families_timm.py
])
def test_from_timm_unsupported_features_are_named(kw, match):
    model = timm_model(**kw)
    with pytest.raises(NotImplementedError, match=match):
        vit_kernels.from_timm(model)
    assert not vit_kernels.is_accelerated(model)  # refused before anything was patched


def test_from_timm_rejects_other_models_and_bad_images():
    with pytest.raises(TypeError, match="expects a timm VisionTransformer"):
        vit_kernels.from_timm(R.ViT(**ODD))
    fast = vit_kernels.from_timm(timm_model())
    with pytest.raises(ValueError, match="differs from the model's"), torch.no_grad():
        fast(torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match="input channels"), torch.no_grad():
        fast(torch.randn(2, 1, 32, 32))


def test_from_timm_patch_dropout_runs_timms_module_inside_the_fused_trunk():
    """Patch dropout: the fused trunk calls the model's own ``patch_drop`` module (same RNG draws as timm), the
    rest runs in the kernels; with the same seed the result equals timm's."""
    ref, fast = timm_pair(patch_drop_rate=0.25)
    ref.train()
    fast.train()
    x = torch.randn(3, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vit_kernels")  # no fallback warning
        ops.reset_launch_counts()
        torch.manual_seed(1)
        got = fast(x)
    assert set(ops.launch_counts()) >= FUSED_KERNELS
    torch.manual_seed(1)
    torch.testing.assert_close(got, ref(x), rtol=1e-4, atol=1e-5)
    torch.manual_seed(1)
    features = fast.forward_features(x)
    torch.manual_seed(1)
    expected = ref.forward_features(x)
    assert features.shape == expected.shape and features.shape[1] < 17  # patches were dropped
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_from_timm_dropout_and_stochastic_depth_run_in_the_kernels():
    ref, fast = timm_pair(drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)
    fast.train()
    x = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vit_kernels")
        ops.reset_launch_counts()
        torch.manual_seed(2)
        a = fast(x)
    assert set(ops.launch_counts()) >= FUSED_KERNELS
    torch.manual_seed(2)
    b = fast(x)
    c = fast(x)
    assert torch.equal(a, b) and not torch.equal(a, c)  # reproducible per seed, fresh masks otherwise
    with torch.no_grad():
        assert not torch.allclose(a, ref(x), rtol=1e-4, atol=1e-5)  # timm in eval (no dropout) differs
        torch.testing.assert_close(fast.eval()(x), ref(x), rtol=1e-4, atol=1e-5)  # fast in eval: equal
