"""The timm VisionTransformer families people deploy, tiny and random, accelerated in place and checked against
timm's own forward and gradients: CLIP (pre-norm, QuickGELU), SigLIP (no cls token, MAP attention pooling,
tanh GELU), DINOv2 (LayerScale, 4 register tokens, other image sizes) and qk-norm."""
import copy

import pytest
import timm
import torch
from frameworks import perturbed
from test_models import BANNED_ATEN, AtenRecorder

import vit_kernels
from vit_kernels import ops

TOL = dict(rtol=1e-4, atol=5e-5)  # fp32; SwiGLU's gate x value product roughly doubles the rounding of an MLP
TINY = dict(embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)  # head_dim 24
FAMILIES = {  # timm name -> (overrides, image side): odd token counts everywhere
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", dict(img_size=40, patch_size=8), 40),  # 26 tokens
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=36, patch_size=4), 36),  # 81 tokens, MAP head
    "dinov2_reg4": ("vit_base_patch14_reg4_dinov2", dict(img_size=28, patch_size=7), 28),  # 16 + 5 tokens
    "qk_norm": ("vit_base_patch16_224", dict(img_size=24, patch_size=8, qk_norm=True), 24),  # 10 tokens
    # timm Eva: 2D RoPE on q/k inside the attention kernel
    "eva02": ("eva02_base_patch14_224", dict(img_size=28, patch_size=7), 28),  # q/k/v Linears, SwiGLU + sub-LN
    "eva02_packed": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7), 28),  # q/v biases, packed SwiGLU
    "dinov3": ("vit_small_patch16_dinov3_qkvb", dict(img_size=24, patch_size=8), 24),  # half RoPE, 4 registers
}


class TokenAtenRecorder(AtenRecorder):
    """The dispatch guard, except that concatenating parameters (cls + register tokens, [1 + R, E], the prefix
    the patch-embedding kernel writes) is glue: a ``cat`` counts only on activations (3-D and up)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "cat" and all(t.dim() < 3 for t in args[0]):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def build(family, seed=0, **kw):
    name, overrides, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return perturbed(timm.create_model(name, pretrained=False, **dict(TINY, **overrides, **kw)), seed)


def image(family, batch=2, seed=1):
    side = FAMILIES[family][2]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    model = build(request.param)
    return request.param, copy.deepcopy(model), vit_kernels.accelerate(model)


def test_family_features_are_what_the_family_has():
    """The tiny models carry the features that make each family (so the tests below exercise them)."""
    clip, siglip, dino, qk, eva, eva_packed, dinov3 = (build(f) for f in FAMILIES)
    assert type(clip.blocks[0].mlp.act).__name__ == "QuickGELU" and not isinstance(clip.norm_pre, torch.nn.Identity)
    assert siglip.cls_token is None and siglip.attn_pool is not None and siglip.global_pool == "map"
    assert dino.num_prefix_tokens == 5 and type(dino.blocks[0].ls1).__name__ == "LayerScale"
    assert isinstance(qk.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    assert eva.blocks[0].attn.qkv is None and type(eva.blocks[0].mlp).__name__ == "SwiGLU"
    assert not isinstance(eva.blocks[0].mlp.norm, torch.nn.Identity) and not eva.blocks[0].attn.rotate_half
    assert eva_packed.blocks[0].attn.q_bias is not None and type(eva_packed.blocks[0].mlp).__name__ == "GluMlp"
    assert dinov3.blocks[0].attn.rotate_half and dinov3.num_prefix_tokens == 5 and dinov3.pos_embed is None


def test_eval_forward_equals_timm(pair):
    family, ref, fast = pair
    x = image(family)
    with torch.no_grad():
        ops.reset_launch_counts()
        got = fast(x)
        counts = ops.launch_counts()
        torch.testing.assert_close(got, ref(x), **TOL)
        torch.testing.assert_close(fast.forward_features(x), ref.forward_features(x), **TOL)
        torch.testing.assert_close(fast.forward_head(ref.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True), **TOL)
    assert counts["attention"] == 2 and counts["patch_embed"] == 1, counts
    assert counts["linear"] + counts["layer_norm_linear"] >= 8 and counts["layer_norm_linear"] >= 4, counts
    if family == "siglip":
        assert counts["latent_attention"] == 1, counts


def test_train_forward_and_gradients_equal_timm_and_run_only_our_kernels(pair):
    """Train mode (dropout rates 0): same loss, same gradient for every parameter, and under autograd no aten
    matmul / softmax / LayerNorm / GELU ran — the dispatch guard."""
    family, ref, fast = pair
    ref.train()
    fast.train()
    x = image(family)
    target = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    try:
        with TokenAtenRecorder() as recorder:
            loss = ((fast(x) - target) ** 2).sum()
        loss.backward()
        ((ref(x) - target) ** 2).sum().backward()
        banned = {n for space, n in recorder.ops if space == "aten" and n.lstrip("_").startswith(BANNED_ATEN)}
        assert not banned, f"PyTorch computed part of the fused forward: {sorted(banned)}"
        for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    finally:
        for m in (ref, fast):
            m.eval()
            m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["dinov2_reg4", "dinov3", "eva02"])
def test_other_image_sizes_resample_positions_and_rotary_tables_like_timm(family):
    ref = build(family, dynamic_img_size=True)
    fast = vit_kernels.accelerate(copy.deepcopy(ref))
    patch = FAMILIES[family][1]["patch_size"]
    x = torch.randn(1, 3, 5 * patch, 3 * patch)  # a 5 x 3 grid
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **TOL)


def test_eva_blocks_called_by_timm_take_timms_rope_embedding():
    """timm's own forward_intermediates passes its rope tensor to each block: the fused block converts it."""
    ref = build("eva02")
    fast = vit_kernels.accelerate(copy.deepcopy(ref))
    x = image("eva02")
    with torch.no_grad():
        got = fast.forward_intermediates(x, indices=1, intermediates_only=True)
        expected = ref.forward_intermediates(x, indices=1, intermediates_only=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)


def test_siglip_head_variants_equal_timm():
    """MAP pooling with several latent queries averaged and timm's qk-norm on the latent queries and keys."""
    from timm.layers import AttentionPoolLatent

    ref = build("siglip")
    pool = ref.attn_pool
    ref.attn_pool = perturbed(AttentionPoolLatent(48, num_heads=2, mlp_ratio=2.0, latent_len=3, pool_type="avg",
                                                  norm_layer=torch.nn.LayerNorm, qk_norm=True), 3)
    fast = vit_kernels.accelerate(copy.deepcopy(ref))
    x = image("siglip")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **TOL)
    assert pool is not ref.attn_pool


def test_siglip_fp16_within_twice_pytorchs_error():
    from test_models import assert_fp16_within_twice_pytorch_error

    ref = build("siglip")
    assert_fp16_within_twice_pytorch_error(ref, vit_kernels.accelerate(copy.deepcopy(ref)), image("siglip"))


@pytest.mark.parametrize("edit,match", [
    (lambda m: setattr(m.attn_pool, "pos_embed", torch.nn.Parameter(torch.zeros(81, 48))), "pos_embed='abs'"),
    (lambda m: setattr(m.attn_pool.mlp, "act", torch.nn.ReLU()), "activation ReLU"),
    (lambda m: setattr(m.blocks[0].attn, "q_norm", torch.nn.BatchNorm1d(24)), "qk-norm"),
])
def test_unsupported_family_features_are_named(edit, match):
    model = build("siglip")
    edit(model)
    with pytest.raises(NotImplementedError, match=match):
        vit_kernels.accelerate(model)
    assert not vit_kernels.is_accelerated(model)


def test_restore_gives_back_the_attention_pool():
    model = vit_kernels.accelerate(build("siglip"))
    assert "forward" in model.attn_pool.__dict__
    vit_kernels.restore(model)
    assert "forward" not in model.attn_pool.__dict__


@pytest.mark.gpu
@pytest.mark.parametrize("name,img", [("vit_large_patch14_clip_quickgelu_224", 224),
                                      ("eva02_base_patch14_224", 224), ("vit_base_patch16_dinov3", 224),
                                      ("vit_so400m_patch14_siglip_224", 224),
                                      ("vit_large_patch14_reg4_dinov2", 518),
                                      ("vit_base_patch16_siglip_224", 224)])
def test_real_size_families_bf16(name, img):
    """Real widths in bf16 (depth cut to 4 to keep the GPU suite short): within twice PyTorch's own bf16
    error of the fp32 model."""
    from helpers import assert_matches

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=4, img_size=img).cuda().eval()
    x = torch.randn(4, 3, img, img, device="cuda")
    with torch.no_grad():
        ref = model(x).double()
        lowp = copy.deepcopy(model).bfloat16()(x.bfloat16())
        fast = vit_kernels.accelerate(copy.deepcopy(model).bfloat16())
        ops.reset_launch_counts()
        got = fast(x.bfloat16())
    assert ops.launch_counts()["attention"] == 4
    assert_matches(got, lowp, ref, name=name)
