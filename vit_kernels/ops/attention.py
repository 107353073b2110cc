"""Flash attention (online softmax, fp32 running max/sum) reading the fused qkv buffer in place.

qkv is the qkv GEMM's output [B, N, 3E]. Its feature axis is split either as the tutorial's
``(h d qkv)`` (the q/k/v index fastest) or as timm's ``(qkv h d)``; both are just strides here. The output is
[B, N, E] in ``(h d)`` order, ready for the projection GEMM. No N x N matrix is ever stored.

Scalings: ``"seed"`` = softmax(QK^T) / sqrt(E) (the tutorial), ``"paper"`` = softmax(QK^T / sqrt(head_dim)).
Both are ``out_scale * softmax(qk_scale * QK^T) V``. A boolean mask (True = attend) broadcastable to
[B, heads, N, N] is optional; a query row with no allowed key gets zeros.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference import attention_probabilities, check_mask
from ._common import (
    ForwardOnly,
    Tuned,
    check_sample_size,
    check_tensor,
    config,
    dot_precision,
    launch_grid,
    new_output,
    row_major,
    use_kernels,
)

LAYOUTS = ("h d qkv", "qkv h d")
LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd_kernel(qkv_ptr, mask_ptr, out_ptr, N, H, E, qk_scale, out_scale,
                          stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_ob, stride_on,
                          D: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_MASK: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # 1-D grid, query tiles of one (batch, head) adjacent: no grid-axis limit, K/V stay hot in L2.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_M)
    bh = pid // n_tiles
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    # Compile-time feature strides keep address math cheap (and vectorized for the grouped layout).
    if INTERLEAVED:  # (h d qkv): feature = (h * D + d) * 3 + s
        d_off = offs_d * 3
        q_base = qkv_ptr + b * stride_b + h * 3 * D
        k_base = q_base + 1
        v_base = q_base + 2
    else:  # (qkv h d): feature = s * E + h * D + d
        d_off = offs_d
        q_base = qkv_ptr + b * stride_b + h * D
        k_base = q_base + E
        v_base = q_base + 2 * E

    q = tl.load(q_base + offs_m[:, None] * stride_n + d_off[None, :],
                mask=(offs_m[:, None] < N) & d_mask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_MASK:
        # the launcher makes the key axis contiguous
        mask_base = mask_ptr + b * stride_mb + h * stride_mh + offs_m[:, None].to(tl.int64) * stride_mq

    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < N
        k_t = tl.load(k_base + cols[None, :] * stride_n + d_off[:, None],
                      mask=col_ok[None, :] & d_mask[:, None], other=0.0)
        # log2(e) is folded into qk_scale: exp2 is the fast exponential
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
        allowed = col_ok[None, :]
        if HAS_MASK:
            allowed = allowed & (tl.load(mask_base + cols[None, :],
                                         mask=(offs_m[:, None] < N) & col_ok[None, :], other=0) != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows that have seen no allowed key yet keep m = -inf; subtract 0 there to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_n + d_off[None, :],
                    mask=col_ok[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION,
                                            out_dtype=tl.float32)
        m_i = m_new

    # a fully masked row has l = 0 and acc = 0: write zeros
    out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    out_ptrs = out_ptr + b * stride_ob + offs_m[:, None] * stride_on + h * D + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < N) & d_mask[None, :])


ATTENTION = Tuned(
    _attention_fwd_kernel,
    configs=[
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(8, 3, BLOCK_M=128, BLOCK_N=64),
        config(8, 2, BLOCK_M=128, BLOCK_N=128),
        config(4, 2, BLOCK_M=64, BLOCK_N=128),
    ],
    key=["N", "D", "HAS_MASK", "INTERLEAVED"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
    # 128-wide key tiles spill registers with a mask tile or head_dim > 64 (compile check, sm_80/sm_90)
    keep=lambda meta, flags: meta["BLOCK_N"] <= 64 or not (flags.get("HAS_MASK") or flags.get("BLOCK_D", 0) > 64),
)


def scales(scaling: str, E: int, D: int) -> tuple:
    """(qk_scale in log2 units, out_scale)."""
    if scaling == "seed":
        return LOG2E, 1.0 / math.sqrt(E)
    return LOG2E / math.sqrt(D), 1.0


def attention_launch(qkv, num_heads, layout, scaling, mask):
    qkv = row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    out = new_output((B, N, E), qkv.device, qkv.dtype)
    if B * N == 0:
        return out
    qk_scale, out_scale = scales(scaling, E, D)
    mask_arg, mask_strides = qkv, (0, 0, 0)
    if mask is not None:
        mask_arg, mask_strides = contiguous_key_mask(mask, N)
    ATTENTION.launch(
        "attention", None, lambda meta: attention_grid(B, num_heads, N, meta["BLOCK_M"]),
        qkv, mask_arg, out, N, num_heads, E, qk_scale, out_scale, qkv.stride(0), qkv.stride(1),
        *mask_strides, out.stride(0), out.stride(1), D=D,
        INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None, DOT_PRECISION=dot_precision(qkv.dtype),
        BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out


def attention_grid(batch: int, heads: int, tokens: int, block_m: int) -> tuple:
    """One program per (batch, head, query tile), flattened onto axis 0: batch x heads may pass 65,535."""
    return launch_grid(batch * heads * triton.cdiv(tokens, block_m))


def contiguous_key_mask(mask, N):
    """A 4-D bool mask with unit stride over keys and rows padded to 16 bytes (vectorized loads);
    broadcast batch/head axes stay size 1 with stride 0. Returns (mask, (stride_b, stride_h, stride_q))."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    padded = torch.zeros((m.shape[0], m.shape[1], N, triton.cdiv(N, 16) * 16), dtype=torch.bool, device=m.device)
    padded[..., :N] = m
    m = padded
    return m, (m.stride(0) if m.shape[0] > 1 else 0, m.stride(1) if m.shape[1] > 1 else 0, m.stride(2))


class AttentionFunction(ForwardOnly):
    @staticmethod
    def forward(ctx, qkv, num_heads, layout, scaling, mask):
        return attention_launch(qkv, num_heads, layout, scaling, mask)


def split_qkv(qkv: torch.Tensor, num_heads: int, layout: str):
    """[B, N, 3E] -> q, k, v as [B, heads, N, head_dim] views (the PyTorch path)."""
    B, N, E3 = qkv.shape
    D = E3 // 3 // num_heads
    if layout == "h d qkv":
        parts = qkv.view(B, N, num_heads, D, 3).permute(4, 0, 2, 1, 3)
    else:
        parts = qkv.view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def attention_torch(qkv, num_heads, layout="h d qkv", scaling="seed", mask=None):
    """The PyTorch fallback, same semantics (fully masked rows give zeros)."""
    q, k, v = split_qkv(qkv, num_heads, layout)
    B, N, E3 = qkv.shape
    E, D = E3 // 3, E3 // 3 // num_heads
    qk_scale, out_scale = scales(scaling, E, D)
    energy = torch.matmul(q, k.transpose(-1, -2)) * (qk_scale / LOG2E)
    att = attention_probabilities(energy.float(), mask).to(v.dtype) * out_scale
    return torch.matmul(att, v).transpose(1, 2).reshape(B, N, E)


def check_attention(qkv, num_heads, layout, scaling, mask):
    check_tensor("qkv", qkv, dims=3)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"qkv feature size {qkv.shape[2]} must be 3 * num_heads * head_dim "
                         f"(num_heads={num_heads})")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if scaling not in ("seed", "paper"):
        raise ValueError(f"scaling must be 'seed' or 'paper', got {scaling!r}")
    check_mask(mask, qkv.shape[0], num_heads, qkv.shape[1])
    if mask is not None and mask.device != qkv.device:
        raise ValueError(f"mask is on {mask.device} but qkv is on {qkv.device}")
    check_sample_size("qkv", qkv.shape[1] * qkv.stride(1) if qkv.dim() == 3 and qkv.shape[1] else 0)
    head_dim = qkv.shape[2] // 3 // num_heads
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} exceeds the kernel's maximum of 256")


def attention(qkv: torch.Tensor, num_heads: int, layout: str = "h d qkv", scaling: str = "seed",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention from a fused qkv buffer [B, N, 3E]; returns [B, N, E] in (h d) order.

    layout: ``"h d qkv"`` (the tutorial's rearrange) or ``"qkv h d"`` (timm). scaling: ``"seed"`` or
    ``"paper"``. mask: optional bool, broadcastable to [B, heads, N, N], True = attend.
    """
    check_attention(qkv, num_heads, layout, scaling, mask)
    if not use_kernels(qkv, mask):
        return attention_torch(qkv, num_heads, layout, scaling, mask)
    return AttentionFunction.apply(qkv, num_heads, layout, scaling, mask)
