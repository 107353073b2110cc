"""Attention maps: the softmax probabilities [B, heads, N, N] that the fused attention never stores.

For users who visualize attention (rollout, per-head maps). Two passes over the keys per query tile: the
first finds each row's max and sum (online, fp32), the second writes the normalized probabilities. Reads the
fused qkv buffer in place like ``attention`` (either layout); a mask zeroes the keys it forbids and a row
with no allowed key is all zeros, as ``reference.attention_probabilities``. It is an N x N write per head:
slower and far more memory than attention itself, so it only runs when maps are asked for. Not
differentiable (maps are for looking at).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Tuned, config, dot_precision, new_output, row_major, use_kernels
from .attention import (
    allowed_keys,
    attention_grid,
    attention_torch_probabilities,
    check_attention,
    contiguous_key_mask,
    mask_strides,
    query_tile,
    scales,
)


@triton.jit
def _scores(q, k_base, cols, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """log2-domain scores [rows, cols] of one key tile, -inf where a key is out of range or masked."""
    k_t = tl.load(k_base + cols[None, :] * stride_n + d_off[:, None], mask=(cols[None, :] < N) & d_mask[:, None],
                  other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
    return tl.where(allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s, float("-inf"))


@triton.jit
def _attention_probs_kernel(qkv_ptr, mask_ptr, p_ptr, N, H, E, qk_scale, stride_b, stride_n, stride_mb,
                            stride_mh, stride_mq, D: tl.constexpr, INTERLEAVED: tl.constexpr,
                            HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, _, _, offs_m, row_ok, q, k_base, _, d_off, d_mask, mask_rows = query_tile(
        qkv_ptr, mask_ptr, N, H, E, stride_b, stride_n, stride_mb, stride_mh, stride_mq, D, INTERLEAVED, BLOCK_M,
        BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        s = _scores(q, k_base, start + offs_n, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK,
                    DOT_PRECISION)
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
        s = _scores(q, k_base, cols, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK,
                    DOT_PRECISION)
        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(out_rows + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


ATTENTION_PROBS = Tuned(
    _attention_probs_kernel,
    # a visualization path: small tiles that compile spill-free with a mask tile in both passes (compile check)
    configs=[config(4, 1, BLOCK_M=32, BLOCK_N=64), config(4, 1, BLOCK_M=32, BLOCK_N=32)],
    key=["N", "D", "HAS_MASK", "INTERLEAVED"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
)


def attention_probs_launch(qkv, num_heads, layout, scaling, mask):
    """[B, heads, N, N] in qkv's dtype; ``mask`` None or prepared by ``contiguous_key_mask``."""
    qkv = row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    probs = new_output((B, num_heads, N, N), qkv.device, qkv.dtype)
    if B * N:
        ATTENTION_PROBS.launch(
            "attention_probs", None, lambda meta: attention_grid(B, num_heads, N, meta["BLOCK_M"]),
            qkv, qkv if mask is None else mask, probs, N, num_heads, E, scales(scaling, E, D)[0], qkv.stride(0),
            qkv.stride(1), *mask_strides(mask), D=D, INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None,
            DOT_PRECISION=dot_precision(qkv.dtype), BLOCK_D=max(16, triton.next_power_of_2(D)))
    return probs


def attention_probabilities(qkv: torch.Tensor, num_heads: int, layout: str = "h d qkv", scaling: str = "seed",
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(qk_scale * Q K^T) per head from a fused qkv buffer [B, N, 3E]: [B, heads, N, N], rows summing
    to 1 (0 for a row with no allowed key). The same arguments as ``attention``; the tutorial's division by
    sqrt(emb_size) after the softmax (``scaling="seed"``) is not part of the map. Detached from autograd."""
    check_attention(qkv, num_heads, layout, scaling, mask)
    qkv = qkv.detach()
    if not use_kernels(qkv, mask):
        return attention_torch_probabilities(qkv, num_heads, layout, scaling, mask)
    prepared = None if mask is None else contiguous_key_mask(mask, qkv.shape[1])
    return attention_probs_launch(qkv, num_heads, layout, scaling, prepared)

