"""Attention maps: the softmax probabilities [B, heads, N, N] that the fused attention never stores.

For users who visualize attention (rollout, per-head maps). Two passes over the keys per query tile: the
first finds each row's max and sum (online, fp32), the second writes the normalized probabilities. Reads the
fused qkv buffer in place like ``attention`` (either layout); a mask zeroes the keys it forbids and a row
with no allowed key is all zeros, as in ``attention``. It is an N x N write per head:
slower and far more memory than attention itself, so it only runs when maps are asked for. Not
differentiable (maps are for looking at). qk-norm and RoPE as in ``attention`` (same helpers, same flags).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import (
    ATTENTION_TYPES,
    QK_OFF,
    QK_VARIANTS,
    attention_grid,
    attention_torch_probabilities,
    check_attention,
    contiguous_key_mask,
    head_tile,
    mask_strides,
    qk_kernel_args,
    sample_mask,
    sample_qk_args,
    scales,
    tl_qk_dot,
    tl_qk_rows,
    tl_qk_setup,
    transforms_qk,
)
from .dispatch import dispatch
from .launch import Tuned, config, dot_precision, new_output, row_major
from .registry import BenchCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_allowed_keys, tl_query_tile


@triton.jit
def tl_scores(q, k_base, cols, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """log2-domain scores [rows, cols] of one key tile, -inf where a key is out of range or masked."""
    k_t = tl.load(k_base + cols[None, :] * stride_n + d_off[:, None], mask=(cols[None, :] < N) & d_mask[:, None],
                  other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
    return tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s, float("-inf"))


@triton.jit
def tl_qk_scores(q1, q2, k_base, cols, off1, off2, d1, d2, ok1, ok2, stride_n, N, qk_scale, mask_rows, row_ok,
                 kw_ptr, kb_ptr, cos_ptr, sin_ptr, stride_rn, eps, HAS_MASK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr,
                 NORM_BIAS: tl.constexpr, ROPE: tl.constexpr):
    """tl_scores with qk-norm/RoPE: q as transformed half tiles, the keys transformed as loaded."""
    k1, k2 = tl_qk_rows(k_base, cols, cols < N, off1, off2, d1, d2, ok1, ok2, stride_n, kw_ptr, kb_ptr, cos_ptr,
                        sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
    s = tl_qk_dot(q1, q2, k1.to(q1.dtype), k2.to(q1.dtype), DOT_PRECISION) * qk_scale
    return tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s, float("-inf"))


@triton.jit
def _attention_probs_kernel(qkv_ptr, mask_ptr, p_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr, N, H, E,
                            qk_scale, eps, stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_rh, stride_rn,
                            D: tl.constexpr, INTERLEAVED: tl.constexpr,
                            HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr = 0,
                            NORM_WEIGHT: tl.constexpr = False, NORM_BIAS: tl.constexpr = False,
                            ROPE: tl.constexpr = 0):
    bh, b, h, offs_m, row_ok, q, k_base, _, d_off, d_mask, mask_rows = tl_query_tile(
        qkv_ptr, mask_ptr, N, H, E, stride_b, stride_n, stride_mb, stride_mh, stride_mq, D, INTERLEAVED, BLOCK_M,
        BLOCK_D)
    if QK_NORM or ROPE:  # as in the attention forward (tl_query_tile's plain q is then unused)
        HALF: tl.constexpr = BLOCK_D // 2 if BLOCK_D > 16 else 16
        d1, d2, ok1, ok2, off1, off2, cos_ptr, sin_ptr, q_base = tl_qk_setup(
            qkv_ptr, b, h, E, stride_b, cos_ptr, sin_ptr, stride_rh, D, INTERLEAVED, ROPE, HALF)
        q1, q2 = tl_qk_rows(q_base, offs_m, row_ok, off1, off2, d1, d2, ok1, ok2, stride_n, qw_ptr, qb_ptr, cos_ptr,
                            sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
        q1, q2 = q1.to(qkv_ptr.dtype.element_ty), q2.to(qkv_ptr.dtype.element_ty)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        if QK_NORM or ROPE:
            s = tl_qk_scores(q1, q2, k_base, start + offs_n, off1, off2, d1, d2, ok1, ok2, stride_n, N, qk_scale,
                             mask_rows, row_ok, kw_ptr, kb_ptr, cos_ptr, sin_ptr, stride_rn, eps, HAS_MASK,
                             DOT_PRECISION, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
        else:
            s = tl_scores(q, k_base, start + offs_n, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok,
                          HAS_MASK, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new

    # a row with no allowed key has m = -inf and l = 0: exp2(-inf) = 0 writes zeros
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    out_rows = p_ptr + (bh.to(tl.int64) * N + offs_m[:, None]) * N
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        if QK_NORM or ROPE:
            s = tl_qk_scores(q1, q2, k_base, cols, off1, off2, d1, d2, ok1, ok2, stride_n, N, qk_scale, mask_rows,
                             row_ok, kw_ptr, kb_ptr, cos_ptr, sin_ptr, stride_rn, eps, HAS_MASK, DOT_PRECISION, D,
                             QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
        else:
            s = tl_scores(q, k_base, cols, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK,
                          DOT_PRECISION)
        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(out_rows + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


ATTENTION_PROBS = Tuned(
    "attention_probs", _attention_probs_kernel,
    # a visualization path: small tiles that compile spill-free with a mask tile in both passes (compile check);
    # with qk-norm/RoPE (keys transformed in both passes) 16-row tiles
    configs=[config(4, 1, BLOCK_M=32, BLOCK_N=64), config(4, 1, BLOCK_M=32, BLOCK_N=32),
             config(4, 1, BLOCK_M=16, BLOCK_N=32)],
    key=["N", "D", "HAS_MASK", "INTERLEAVED", "QK_NORM", "ROPE"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
    keep=lambda meta, flags: (meta["BLOCK_M"] == 16) == transforms_qk(flags),
    arg_types=ATTENTION_TYPES, aligned=("stride_b", "stride_n", "E"),
)


def attention_probs_launch(qkv, mask, num_heads, layout, scaling, q_norm_weight=None, q_norm_bias=None,
                           k_norm_weight=None, k_norm_bias=None, qk_norm=None, qk_norm_eps=1e-6, rope_cos=None,
                           rope_sin=None, rope_layout="interleaved"):
    """[B, heads, N, N] in qkv's dtype; ``mask`` None or prepared by ``contiguous_key_mask``; the qk-norm / RoPE
    arguments as in ``attention``."""
    qkv = row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    probs = new_output((B, num_heads, N, N), qkv.device, qkv.dtype)
    if B * N:
        params, eps, rope_strides, qk_flags = qk_kernel_args(qkv, q_norm_weight, q_norm_bias, k_norm_weight,
                                                             k_norm_bias, qk_norm, qk_norm_eps, rope_cos, rope_sin,
                                                             rope_layout)
        ATTENTION_PROBS.launch(
            lambda meta: attention_grid(B, num_heads, N, meta["BLOCK_M"]),
            qkv, qkv if mask is None else mask, probs, *params, N, num_heads, E, scales(scaling, E, D)[0], eps,
            qkv.stride(0), qkv.stride(1), *mask_strides(mask), *rope_strides, D=D, INTERLEAVED=layout == "h d qkv",
            HAS_MASK=mask is not None, DOT_PRECISION=dot_precision(qkv.dtype), BLOCK_D=head_tile(D), **qk_flags)
    return probs


def attention_probabilities(qkv: torch.Tensor, num_heads: int, layout: str = "h d qkv", scaling: str = "tutorial",
                            mask: torch.Tensor | None = None, *, q_norm_weight: torch.Tensor | None = None,
                            q_norm_bias: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                            k_norm_bias: torch.Tensor | None = None, qk_norm: str | None = None,
                            qk_norm_eps: float = 1e-6, rope_cos: torch.Tensor | None = None,
                            rope_sin: torch.Tensor | None = None, rope_layout: str = "interleaved") -> torch.Tensor:
    """softmax(qk_scale * Q K^T) per head from a fused qkv buffer [B, N, 3E]: [B, heads, N, N] in qkv's dtype
    (computed in fp32 on both backends), rows summing
    to 1 (0 for a row with no allowed key). The same arguments as ``attention``; the tutorial's division by
    sqrt(emb_size) after the softmax (``scaling="tutorial"``) is not part of the map. Detached from autograd:
    there is no custom op, the kernel is launched directly."""
    qk = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
              k_norm_bias=k_norm_bias, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, rope_cos=rope_cos, rope_sin=rope_sin,
              rope_layout=rope_layout)
    scaling = check_attention(qkv, num_heads, layout, scaling, mask, **qk)
    qk = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in qk.items()}
    qk["qk_norm_eps"] = float(qk_norm_eps)
    qkv = qkv.detach()
    tensors = (qkv, mask, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, rope_cos, rope_sin)
    return dispatch(tensors, lambda: attention_torch_probabilities(qkv, num_heads, layout, scaling, mask, **qk).to(
                        qkv.dtype),
                    attention_probs_launch, attention_probs_launch,
                    lambda: (qkv, None if mask is None else contiguous_key_mask(mask, qkv.shape[1]), num_heads, layout,
                             scaling, *qk.values()))


# --- registry entry ----------------------------------------------------------------------------------------
def _bench(size, batch, dtype, device):
    n, h, d = (size["img"] // size["patch"]) ** 2 + 1, size["heads"], size["emb"] // size["heads"]
    qkv = randn(batch, n, 3 * h * d, dtype=dtype, device=device)
    q, k = qkv[..., :h * d].unflatten(-1, (h, d)).transpose(1, 2), qkv[..., h * d:2 * h * d].unflatten(-1, (h, d))
    yield BenchCase(lambda: attention_probabilities(qkv, h, "qkv h d", "paper"),
                    {"softmax(QK^T)": lambda: torch.softmax(q @ k.permute(0, 2, 3, 1) / d ** 0.5, dim=-1)},
                    nbytes=batch * h * n * n * qkv.element_size())


register(OpSpec(
    name="attention_probabilities",
    fn=attention_probabilities,
    summary="the attention maps [B, heads, N, N], for visualization only (opt-in, N x N memory)",
    kernels=(KernelGrid(ATTENTION_PROBS, tuple(
        dict(HAS_MASK=mask, D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter,
             DOT_PRECISION="tf32", **QK_OFF)
        for d in (64, 80) for mask in (False, True) for inter in (False, True) if d == 64 or not inter) + tuple(
        dict(v, HAS_MASK=True) for v in QK_VARIANTS if not v["DROPOUT"])),),
    custom_ops=(),  # not differentiable: nothing for opcheck or the gradient check
    opcheck_samples=lambda device: [],
    grad_cases=lambda device: [],
    examples=lambda device, dtype, batch: [
        ((randn(batch, 10, 3 * 2 * 12, device=device, dtype=dtype), 2),
         dict(layout="h d qkv", mask=sample_mask(batch, 10, device))),
        ((randn(batch, 10, 3 * 2 * 12, device=device, dtype=dtype), 2),
         dict(layout="qkv h d", **sample_qk_args(2, 10, 12, device, "rms", "interleaved", dtype, per_head=True)))],
    bench=_bench,
))

