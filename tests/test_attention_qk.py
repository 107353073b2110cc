"""qk-norm and 2D RoPE inside the attention kernels, against timm's way of computing them: q = q_norm(q),
k = k_norm(k), then the rotation of the tokens after the prefix (timm.layers.pos_embed_sincos), then SDPA."""
import functools

import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_rope_embed
from timm.layers.pos_embed_sincos import apply_rot_embed
from timm.models.eva import EvaAttention

from vit_kernels import ops
from vit_kernels.ops.attention import attention_op, split_qkv
from vit_kernels.ops.dropout import new_seed

from helpers import assert_matches, randn

PARAMS = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")


# --- the reference: timm's order and formulas, written out here ----------------------------------------------
def timm_qk(q, k, qk_norm=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
            qk_norm_eps=1e-6, rope=None, npt=0, rope_layout="interleaved"):
    """timm's Eva attention up to SDPA: norms in q's dtype (as nn.LayerNorm / RmsNorm), then
    apply_rot_embed on the tokens after the prefix, cast back like ``.type_as(v)``. rope = (sin, cos) for the
    rotated tokens only ([N - npt, D] or [heads, N - npt, D])."""
    D = q.shape[-1]

    def norm(x, w, b):
        if qk_norm == "layer":
            return F.layer_norm(x, (D,), w, b, qk_norm_eps)
        if qk_norm == "rms":
            y = F.rms_norm(x, (D,), w, qk_norm_eps)
            return y if b is None else y + b
        return x

    q, k = norm(q, q_norm_weight, q_norm_bias), norm(k, k_norm_weight, k_norm_bias)
    if rope is not None:
        sin, cos = rope
        q, k = (torch.cat([x[:, :, :npt], apply_rot_embed(x[:, :, npt:], sin, cos, half=rope_layout == "half")],
                          dim=2).type_as(x) for x in (q, k))
    return q, k


def timm_attention(qkv, H, layout, scaling, mask=None, **qk):
    q, k, v = split_qkv(qkv, H, layout)
    q, k = timm_qk(q, k, **qk)
    E = qkv.shape[2] // 3
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 if scaling == "tutorial" else None)
    if scaling == "tutorial":
        out = out / E ** 0.5
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], E)


def rope_tables(N, D, H, npt, per_head, device):
    """Random (sin, cos) for the N - npt rotated tokens (any table is a valid input: random values catch a
    mixed-up column better than a real frequency grid) and the kernels' full float32 tables [N, D] or
    [H, N, D], prefix rows cos = 1, sin = 0."""
    shape = (H, N - npt, D) if per_head else (N - npt, D)
    angle = torch.rand(shape) * 6.3
    sin, cos = angle.sin().to(device), angle.cos().to(device)
    return (sin, cos), full_tables(sin, cos, npt)


def full_tables(sin, cos, npt):
    pad = (*sin.shape[:-2], npt, sin.shape[-1])
    return (torch.cat([torch.ones(pad, device=cos.device), cos.float()], dim=-2),
            torch.cat([torch.zeros(pad, device=sin.device), sin.float()], dim=-2))


def case_inputs(B, N, H, D, dtype, device, qk_norm, bias, rope_layout, npt=1, per_head=False, weight=True):
    """(qkv, our keyword arguments, the reference's keyword arguments), parameters as leaves."""
    qkv = randn(B, N, 3 * H * D, dtype=dtype, device=device)
    ours, ref = dict(qk_norm=qk_norm), dict(qk_norm=qk_norm)
    if qk_norm:
        for name in PARAMS:
            if (name.endswith("weight") and weight) or (name.endswith("bias") and bias):
                ours[name] = ref[name] = randn(D, dtype=dtype, device=device, scale=0.5) + (
                    1.0 if name.endswith("weight") else 0.0)
    if rope_layout:
        ref["rope"], (ours["rope_cos"], ours["rope_sin"]) = rope_tables(N, D, H, npt, per_head, device)
        ours["rope_layout"] = ref["rope_layout"] = rope_layout
        ref["npt"] = npt
    return qkv, ours, ref


def leaves(qkv, kwargs):
    """qkv and the norm parameters as fresh leaves requiring grad: (list, kwargs using them)."""
    names = [n for n in PARAMS if kwargs.get(n) is not None]
    tensors = [t.detach().clone().requires_grad_() for t in [qkv] + [kwargs[n] for n in names]]
    return tensors, {**kwargs, **dict(zip(names, tensors[1:]))}


def ours_and_grads(qkv, H, layout, scaling, mask, kwargs, g=None, dropout=0.0):
    tensors, kw = leaves(qkv, kwargs)
    out = ops.attention(tensors[0], H, layout, scaling, mask, dropout, **kw)
    g = randn(*out.shape, dtype=out.dtype, device=out.device) if g is None else g
    return out, torch.autograd.grad((out * g).sum(), tensors), g


def reference_and_grads(qkv, H, layout, scaling, mask, kwargs, g, dtype):
    """timm's computation in ``dtype`` (tables stay float32, as timm keeps them)."""
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and k in PARAMS else v for k, v in kwargs.items()}
    tensors, kw = leaves(qkv.to(dtype), cast)
    if dtype == torch.float64 and "rope" in kw:
        kw["rope"] = tuple(t.double() for t in kw["rope"])
    out = timm_attention(tensors[0], H, layout, scaling, mask, **kw)
    return out, torch.autograd.grad((out * g.to(dtype)).sum(), tensors)


def check(qkv, H, layout, scaling, ours_kw, ref_kw, mask=None):
    """Forward and every gradient (qkv, the given norm parameters) vs the fp64 reference, 16-bit dtypes by the
    2x rule against timm's own computation at that precision."""
    out, grads, g = ours_and_grads(qkv, H, layout, scaling, mask, ours_kw)
    expected, expected_grads = reference_and_grads(qkv, H, layout, scaling, mask, ref_kw, g, torch.float64)
    lowp, lowp_grads = reference_and_grads(qkv, H, layout, scaling, mask, ref_kw, g, qkv.dtype)
    assert out.dtype == qkv.dtype
    assert_matches(out, lowp, expected)
    names = ["qkv"] + [n for n in PARAMS if ours_kw.get(n) is not None]
    for name, got, want, low in zip(names, grads, expected_grads, lowp_grads):
        assert got.dtype == qkv.dtype, name
        assert_matches(got, low, want, fp32_tol=2e-4, name=f"grad of {name}")


# --- values and gradients -------------------------------------------------------------------------------------
CASES = [  # B, N, heads, head_dim, qkv layout, qk_norm, bias, rope layout, prefix tokens, per-head tables
    (2, 37, 2, 24, "qkv h d", "layer", True, "interleaved", 1, False),
    (2, 37, 2, 24, "h d qkv", "layer", False, "half", 1, False),
    (1, 19, 3, 24, "qkv h d", "rms", False, "half", 0, True),
    (2, 19, 2, 24, "h d qkv", "rms", False, "interleaved", 4, False),
    (1, 37, 2, 18, "qkv h d", "layer", True, "half", 1, False),  # BLOCK_D 32: the half layout's split columns
    (1, 19, 2, 18, "h d qkv", "rms", False, "interleaved", 1, True),
    (1, 19, 1, 72, "qkv h d", "layer", True, "half", 1, True),  # BLOCK_D 128
    (2, 19, 2, 24, "qkv h d", "layer", True, None, 0, False),  # qk-norm alone
    (1, 37, 2, 24, "h d qkv", None, False, "half", 1, False),  # RoPE alone
    (1, 19, 2, 18, "qkv h d", None, False, "interleaved", 5, True),
    (1, 19, 2, 16, "qkv h d", "rms", False, "half", 1, False),  # BLOCK_D 16: half tiles padded to 16
    (1, 19, 2, 15, "h d qkv", "layer", True, None, 0, False),  # odd head_dim (qk-norm alone)
]


# fp32 for every case, fp16 (the 2x rule) for a few: the interpreter is slow
GRID = [(case, torch.float32) for case in CASES] + [(CASES[i], torch.float16) for i in (0, 1, 4, 6)]


@pytest.mark.parametrize("case,dtype", GRID, ids=lambda v: str(v).replace("torch.", "") if isinstance(
    v, torch.dtype) else "-".join(map(str, v)))
def test_matches_timm(case, dtype, device):
    B, N, H, D, layout, qk_norm, bias, rope_layout, npt, per_head = case
    qkv, ours, ref = case_inputs(B, N, H, D, dtype, device, qk_norm, bias, rope_layout, npt, per_head)
    check(qkv, H, layout, "paper", ours, ref)


@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
def test_tutorial_scaling_and_eps(scaling, device):
    qkv, ours, ref = case_inputs(2, 19, 2, 24, torch.float32, device, "layer", True, "interleaved")
    ours["qk_norm_eps"] = ref["qk_norm_eps"] = 1e-2
    check(qkv * 0.1, 2, "qkv h d", scaling, ours, ref)


@pytest.mark.parametrize("qk_norm,given", [("layer", ("q_norm_weight",)), ("layer", ("k_norm_bias",)),
                                           ("rms", ("k_norm_weight",)), ("layer", ())])
def test_parameters_given_for_one_side_or_none(qk_norm, given, device):
    """Missing parameters are the identity: a weight for q only, a LayerNorm bias without weight, none."""
    qkv, ours, ref = case_inputs(2, 19, 2, 24, torch.float32, device, qk_norm, True, "half")
    for name in PARAMS:
        if name not in given:
            ours.pop(name, None)
            ref.pop(name, None)
    check(qkv, 2, "qkv h d", "paper", ours, ref)


@pytest.mark.parametrize("mask_shape", [(37, 37), (2, 1, 37, 37), (1, 2, 37, 37)])
def test_masks(mask_shape, device):
    mask = torch.rand(*mask_shape, device=device) > 0.3
    mask |= torch.eye(37, dtype=torch.bool, device=device)  # no empty row: SDPA would give NaN there
    qkv, ours, ref = case_inputs(2, 37, 2, 24, torch.float32, device, "rms", False, "interleaved", 1, True)
    check(qkv, 2, "h d qkv", "tutorial", ours, ref, mask)


def test_fully_masked_rows_give_zeros_and_finite_gradients(device):
    qkv, ours, _ = case_inputs(1, 19, 2, 24, torch.float32, device, "layer", True, "half")
    mask = torch.rand(1, 2, 19, 19, device=device) > 0.3
    mask[0, 1, 4] = False
    out, grads, _ = ours_and_grads(qkv, 2, "qkv h d", "paper", mask, ours)
    assert torch.count_nonzero(out[0, 4, 24:]) == 0
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("layout", ["qkv h d", "h d qkv"])
def test_dropout(layout, device):
    """Dropout masks depend on (seed, query, key, head) only: with the same seed, the fused op equals the plain
    kernel run on q and k transformed the timm way, forward and backward (chain rule through the transform)."""
    H, D, N = 2, 24, 19
    qkv, ours, ref = case_inputs(2, N, H, D, torch.float32, device, "layer", True, "interleaved", 1)
    seed = new_seed()
    tensors, kw = leaves(qkv, ours)
    out = attention_op(tensors[0], None, H, layout, "paper", 0.3, seed, *(kw.get(n) for n in PARAMS), "layer",
                       1e-6, kw["rope_cos"], kw["rope_sin"], "interleaved")[0]
    g = randn(*out.shape, device=device)
    grads = torch.autograd.grad((out * g).sum(), tensors)

    ref_tensors, ref_kw = leaves(qkv, ref)
    q, k, v = split_qkv(ref_tensors[0], H, layout)
    q, k = timm_qk(q, k, **ref_kw)
    if layout == "qkv h d":
        plain = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(qkv.shape)
    else:
        plain = torch.stack([q, k, v], dim=-1).permute(0, 2, 1, 3, 4).reshape(qkv.shape)
    expected = attention_op(plain, None, H, layout, "paper", 0.3, seed)[0]
    expected_grads = torch.autograd.grad((expected * g).sum(), ref_tensors)
    assert not torch.allclose(expected, attention_op(plain, None, H, layout, "paper")[0])  # dropout did act
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("rope_type,rotate_half,npt", [("cat", False, 1), ("dinov3", True, 5), ("mixed", False, 1)])
def test_timm_eva_attention_module(rope_type, rotate_half, npt, device):
    """timm's own EvaAttention (qk_norm, fused qkv) with timm's own rope tables: our op on its qkv projection
    matches the module's output before the projection."""
    H, D, grid = 2, 24, (3, 4)
    attn = EvaAttention(H * D, H, qkv_fused=True, num_prefix_tokens=npt, qk_norm=True, scale_norm=False,
                        rotate_half=rotate_half, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    attn = attn.to(device).eval()
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    kwargs = dict(rotate_half=True) if rope_type == "dinov3" else dict(depth=1) if rope_type == "mixed" else \
        dict(in_pixels=False)
    rope = create_rope_embed(rope_type=rope_type, dim=H * D, num_heads=H, feat_shape=list(grid), **kwargs)
    emb = rope.get_embed().to(device)
    emb = emb[0] if rope_type == "mixed" else emb  # [depth, heads, N, 2D]: this block's per-head table
    x = randn(2, npt + grid[0] * grid[1], H * D, device=device)
    attn.proj = torch.nn.Identity()
    with torch.no_grad():
        expected = attn(x, rope=emb)
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        cos, sin = full_tables(*emb.chunk(2, -1), npt)
        got = ops.attention(qkv, H, "qkv h d", "paper", qk_norm="layer", q_norm_weight=attn.q_norm.weight,
                            q_norm_bias=attn.q_norm.bias, k_norm_weight=attn.k_norm.weight,
                            k_norm_bias=attn.k_norm.bias, rope_cos=cos, rope_sin=sin,
                            rope_layout="half" if rotate_half else "interleaved")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_norm_gradients_are_deterministic(device):
    qkv, ours, _ = case_inputs(2, 37, 2, 24, torch.float32, device, "layer", True, "half")
    g = randn(2, 37, 48, device=device)
    first = ours_and_grads(qkv, 2, "qkv h d", "paper", None, ours, g)[1]
    second = ours_and_grads(qkv, 2, "qkv h d", "paper", None, ours, g)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_fallback_and_probabilities(device):
    """The PyTorch fallback computes the same function, and attention_probabilities takes the same arguments."""
    qkv, ours, ref = case_inputs(2, 19, 2, 18, torch.float32, device, "rms", False, "half", 1, True)
    got = ops.attention(qkv, 2, "h d qkv", "paper", **ours)
    with ops.use_backend("torch"):
        torch.testing.assert_close(got, ops.attention(qkv, 2, "h d qkv", "paper", **ours), rtol=1e-4, atol=1e-5)
        fallback_probs = ops.attention_probabilities(qkv, 2, "h d qkv", "paper", **ours)
    probs = ops.attention_probabilities(qkv, 2, "h d qkv", "paper", **ours)
    q, k, _ = split_qkv(qkv.double(), 2, "h d qkv")
    q, k = timm_qk(q, k, **{n: t.double() if n in PARAMS else t for n, t in ref.items()}
                   | {"rope": tuple(t.double() for t in ref["rope"])})
    expected = torch.softmax(q @ k.transpose(-1, -2) / 18 ** 0.5, dim=-1)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fallback_probs.double(), expected, rtol=1e-4, atol=1e-6)


def test_empty_batch(device):
    qkv, ours, _ = case_inputs(0, 19, 2, 24, torch.float32, device, "layer", True, "half")
    out, grads, _ = ours_and_grads(qkv, 2, "qkv h d", "paper", None, ours)
    assert out.shape == (0, 19, 48)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


# --- bad inputs ---------------------------------------------------------------------------------------------
def _bad(**kwargs):
    return lambda q, w, t: ops.attention(q, 2, **{k: v(q, w, t) if callable(v) else v for k, v in kwargs.items()})


@pytest.mark.parametrize("call,error,match", [
    (_bad(qk_norm="batch"), ValueError, "qk_norm must be one of"),
    (_bad(q_norm_weight=lambda q, w, t: w), ValueError, "q_norm_weight is given but qk_norm is None"),
    (_bad(qk_norm="layer", k_norm_weight=lambda q, w, t: w[:5]), ValueError, "k_norm_weight has 5 elements"),
    (_bad(qk_norm="layer", q_norm_bias=lambda q, w, t: w[None]), ValueError, "q_norm_bias must have 1 dim"),
    (_bad(qk_norm="layer", q_norm_weight=lambda q, w, t: w.long()), TypeError, "q_norm_weight has dtype"),
    (_bad(qk_norm="layer", q_norm_weight=lambda q, w, t: w.tolist()), TypeError, "q_norm_weight must be a torch"),
    (_bad(qk_norm="layer", k_norm_bias=lambda q, w, t: w.to("meta")), ValueError, "k_norm_bias is on meta"),
    (_bad(qk_norm="rms", q_norm_bias=lambda q, w, t: w), ValueError, "q_norm_bias without q_norm_weight"),
    (_bad(qk_norm="layer", qk_norm_eps=-1.0), ValueError, "qk_norm_eps must be"),
    (_bad(rope_layout="spiral"), ValueError, "rope_layout must be one of"),
    (_bad(rope_cos=lambda q, w, t: t), ValueError, "rope_cos and rope_sin must be given together"),
    (_bad(rope_cos=lambda q, w, t: t.double(), rope_sin=lambda q, w, t: t), TypeError, "rope_cos has dtype"),
    (_bad(rope_cos=lambda q, w, t: t, rope_sin=lambda q, w, t: t.half()), TypeError, "rope_sin has dtype"),
    (_bad(rope_cos=lambda q, w, t: t[:-1], rope_sin=lambda q, w, t: t[:-1]), ValueError, "rope_cos has shape"),
    (_bad(rope_cos=lambda q, w, t: t, rope_sin=lambda q, w, t: t.expand(3, -1, -1)), ValueError,
     "rope_sin has shape"),
    (_bad(rope_cos=lambda q, w, t: t, rope_sin=lambda q, w, t: t.expand(2, -1, -1)), ValueError, "differ in shape"),
    (_bad(rope_cos=lambda q, w, t: t.to("meta"), rope_sin=lambda q, w, t: t), ValueError, "rope_cos is on meta"),
    (_bad(rope_cos=lambda q, w, t: t.tolist(), rope_sin=lambda q, w, t: t), TypeError, "rope_cos must be a torch"),
    (lambda q, w, t: ops.attention(torch.randn(2, 26, 3 * 2 * 15), 2, rope_cos=torch.ones(26, 15),
                                   rope_sin=torch.zeros(26, 15)), ValueError, "head_dim 15 must be even"),
    (lambda q, w, t: ops.attention_probabilities(q, 2, qk_norm="rms", k_norm_bias=w), ValueError,
     "k_norm_bias without k_norm_weight"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 26, 96), torch.randn(16), torch.rand(26, 16))


# --- real sizes on a GPU, bf16 --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["qkv h d", "h d qkv"])
@pytest.mark.parametrize("D,N,qk_norm,rope_layout,per_head", [(64, 197, "layer", "interleaved", False),
                                                              (64, 257, "rms", "half", True),
                                                              (72, 197, "layer", "half", False),
                                                              (72, 257, None, "interleaved", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_sizes_on_gpu(dtype, D, N, qk_norm, rope_layout, per_head, layout, device):
    qkv, ours, ref = case_inputs(4, N, 6, D, dtype, device, qk_norm, True, rope_layout, 1, per_head)
    check(qkv, 6, layout, "paper", ours, ref)
