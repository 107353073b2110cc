"""Attention maps: the softmax probabilities [B, heads, N, N] that the fused attention never stores.

For users who visualize attention (rollout, per-head maps). Two passes over the keys per query tile: the
first finds each row's max and sum (online, fp32), the second writes the normalized probabilities. Reads the
fused qkv buffer in place like ``attention`` (either layout); a mask zeroes the keys it forbids and a row
with no allowed key is all zeros, as in ``attention``. It is an N x N write per head:
slower and far more memory than attention itself, so it only runs when maps are asked for. Not
differentiable (maps are for looking at).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import (
    ATTENTION_TYPES,
    attention_grid,
    attention_torch_probabilities,
    check_attention,
    contiguous_key_mask,
    head_tile,
    mask_strides,
    sample_mask,
    scales,
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
def _attention_probs_kernel(qkv_ptr, mask_ptr, p_ptr, N, H, E, qk_scale, stride_b, stride_n, stride_mb,
                            stride_mh, stride_mq, D: tl.constexpr, INTERLEAVED: tl.constexpr,
                            HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, _, _, offs_m, row_ok, q, k_base, _, d_off, d_mask, mask_rows = tl_query_tile(
        qkv_ptr, mask_ptr, N, H, E, stride_b, stride_n, stride_mb, stride_mh, stride_mq, D, INTERLEAVED, BLOCK_M,
        BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        s = tl_scores(q, k_base, start + offs_n, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK,
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
        s = tl_scores(q, k_base, cols, d_off, d_mask, stride_n, N, qk_scale, mask_rows, row_ok, HAS_MASK,
                    DOT_PRECISION)
        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(out_rows + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


ATTENTION_PROBS = Tuned(
    "attention_probs", _attention_probs_kernel,
    # a visualization path: small tiles that compile spill-free with a mask tile in both passes (compile check)
    configs=[config(4, 1, BLOCK_M=32, BLOCK_N=64), config(4, 1, BLOCK_M=32, BLOCK_N=32)],
    key=["N", "D", "HAS_MASK", "INTERLEAVED"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
    arg_types=ATTENTION_TYPES, aligned=("stride_b", "stride_n", "E"),
)


def attention_probs_launch(qkv, mask, num_heads, layout, scaling):
    """[B, heads, N, N] in qkv's dtype; ``mask`` None or prepared by ``contiguous_key_mask``."""
    qkv = row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    probs = new_output((B, num_heads, N, N), qkv.device, qkv.dtype)
    if B * N:
        ATTENTION_PROBS.launch(
            lambda meta: attention_grid(B, num_heads, N, meta["BLOCK_M"]),
            qkv, qkv if mask is None else mask, probs, N, num_heads, E, scales(scaling, E, D)[0], qkv.stride(0),
            qkv.stride(1), *mask_strides(mask), D=D, INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None,
            DOT_PRECISION=dot_precision(qkv.dtype), BLOCK_D=head_tile(D))
    return probs


def attention_probabilities(qkv: torch.Tensor, num_heads: int, layout: str = "h d qkv", scaling: str = "tutorial",
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(qk_scale * Q K^T) per head from a fused qkv buffer [B, N, 3E]: [B, heads, N, N] in qkv's dtype
    (computed in fp32 on both backends), rows summing
    to 1 (0 for a row with no allowed key). The same arguments as ``attention``; the tutorial's division by
    sqrt(emb_size) after the softmax (``scaling="tutorial"``) is not part of the map. Detached from autograd:
    there is no custom op, the kernel is launched directly."""
    scaling = check_attention(qkv, num_heads, layout, scaling, mask)
    qkv = qkv.detach()
    return dispatch((qkv, mask), lambda: attention_torch_probabilities(qkv, num_heads, layout, scaling, mask).to(
                        qkv.dtype),
                    attention_probs_launch, attention_probs_launch,
                    lambda: (qkv, None if mask is None else contiguous_key_mask(mask, qkv.shape[1]), num_heads, layout,
                             scaling))


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
             DOT_PRECISION="tf32")
        for d in (64, 80) for mask in (False, True) for inter in (False, True) if d == 64 or not inter)),),
    custom_ops=(),  # not differentiable: nothing for opcheck or the gradient check
    opcheck_samples=lambda device: [],
    grad_cases=lambda device: [],
    examples=lambda device, dtype, batch: [
        ((randn(batch, 10, 3 * 2 * 12, device=device, dtype=dtype), 2),
         dict(layout="h d qkv", mask=sample_mask(batch, 10, device)))],
    bench=_bench,
))

