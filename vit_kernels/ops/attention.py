"""Flash attention (online softmax, fp32 running max/sum) reading the fused qkv buffer in place.

qkv is the qkv GEMM's output [B, N, 3E]. Its feature axis is split either as the tutorial's
``(h d qkv)`` (the q/k/v index fastest) or as timm's ``(qkv h d)``; both are just strides here. The output is
[B, N, E] in ``(h d)`` order, ready for the projection GEMM. No N x N matrix is ever stored.

Scalings: ``"tutorial"`` = softmax(QK^T) / sqrt(E) (the seed tutorial's code; ``"seed"`` is its deprecated
name), ``"paper"`` = softmax(QK^T / sqrt(head_dim)).
Both are ``out_scale * softmax(qk_scale * QK^T) V``. A boolean mask (True = attend) broadcastable to
[B, heads, N, N] is optional; a query row with no allowed key gets zeros. Dropout on the probabilities
(``nn.Dropout`` after the softmax, as the tutorial and timm do) draws its mask from Philox on (seed, query,
key, batch * heads + head), so backward regenerates it; the softmax normalizer uses the undropped values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..validate import (
    check_mask,
    check_positive_int,
    check_probability,
    check_sample_size,
    check_tensor,
    resolve_scaling,
)
from .dispatch import dispatch
from .dropout import dropout_args, new_seed
from .launch import Tuned, config, dot_precision, launch_grid, new_output, row_major
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_allowed_keys, tl_apply_dropout, tl_dropout_keep, tl_qkv_bases, tl_query_tile

LAYOUTS = ("h d qkv", "qkv h d")
LOG2E = 1.4426950408889634

MAX_HEAD_DIM = 256  # one head's q, k and v rows live in registers


@triton.jit(do_not_specialize=["seed"])
def _attention_fwd_kernel(qkv_ptr, mask_ptr, out_ptr, lse_ptr, N, H, E, qk_scale, out_scale,
                          seed, dropout_p, keep_scale,
                          stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_ob, stride_on,
                          D: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                          STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, offs_m, row_ok, q, k_base, v_base, d_off, d_mask, mask_rows = tl_query_tile(
        qkv_ptr, mask_ptr, N, H, E, stride_b, stride_n, stride_mb, stride_mh, stride_mq, D, INTERLEAVED, BLOCK_M,
        BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < N
        k_t = tl.load(k_base + cols[None, :] * stride_n + d_off[:, None],
                      mask=col_ok[None, :] & d_mask[:, None], other=0.0)
        # log2(e) is folded into qk_scale: exp2 is the fast exponential
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
        s = tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows that have seen no allowed key yet keep m = -inf; subtract 0 there to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_n + d_off[None, :],
                    mask=col_ok[:, None] & d_mask[None, :], other=0.0)
        if DROPOUT:
            p = tl_apply_dropout(p, seed, offs_m, cols, bh, dropout_p, keep_scale)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION,
                                            out_dtype=tl.float32)
        m_i = m_new

    # a fully masked row has l = 0 and acc = 0: write zeros
    out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    out_ptrs = out_ptr + b * stride_ob + offs_m[:, None] * stride_on + h * D + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    if STORE_LSE:  # log2-domain log-sum-exp for backward; -inf marks a row with nothing to attend to
        tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def tl_probabilities(q, k, lse, mask_rows, row_ok, cols, N, qk_scale, HAS_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Recomputed softmax probabilities P [rows, cols] from the saved log-sum-exp (0 where masked)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
    p = tl.exp2(s - lse[:, None])
    return tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), p, 0.0)


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dqkv_ptr, N, H, E, qk_scale, out_scale,
                          score_scale, seed, dropout_p, keep_scale, stride_b, stride_n, stride_mb, stride_mh,
                          stride_mq, stride_dob, stride_don, stride_gb, stride_gn, D: tl.constexpr,
                          INTERLEAVED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                          DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """FlashAttention-2 backward, recomputing P from the log-sum-exp. DQ=False: one program per key tile,
    looping over queries, accumulates dK and dV; DQ=True: one program per query tile accumulates dQ. Two
    passes and no atomics: deterministic. Gradients land in the qkv buffer's own layout.
    With O = out_scale * Z(P) V, Z the dropout (mask / (1 - p), regenerated from the seed):
    dV = out_scale Z(P)^T dO,  dP = out_scale Z(dO V^T),  dS = P (dP - rowsum(dO * O)),
    dQ = score_scale dS K,  dK = score_scale dS^T Q."""
    pid = tl.program_id(0)
    TILE: tl.constexpr = BLOCK_N if not DQ else BLOCK_M
    n_tiles = tl.cdiv(N, TILE)
    bh = pid // n_tiles
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_base, k_base, v_base, d_off = tl_qkv_bases(qkv_ptr, b, h, E, stride_b, offs_d, D, INTERLEAVED)
    gq_base, gk_base, gv_base, _ = tl_qkv_bases(dqkv_ptr, b, h, E, stride_gb, offs_d, D, INTERLEAVED)
    do_base = do_ptr + b * stride_dob + h * D
    stats = bh.to(tl.int64) * N
    mask_head = mask_ptr + b * stride_mb + h * stride_mh
    tile = (pid % n_tiles) * TILE + tl.arange(0, TILE)
    tile_ok = tile < N
    if DQ:
        q = tl.load(q_base + tile[:, None] * stride_n + d_off[None, :], mask=tile_ok[:, None] & d_mask[None, :],
                    other=0.0)
        do = tl.load(do_base + tile[:, None] * stride_don + offs_d[None, :], mask=tile_ok[:, None] & d_mask[None, :],
                     other=0.0)
        lse = tl.load(lse_ptr + stats + tile, mask=tile_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # no allowed key: P = 0
        delta = tl.load(delta_ptr + stats + tile, mask=tile_ok, other=0.0)
        mask_rows = mask_head + tile[:, None].to(tl.int64) * stride_mq
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kv_mask = (cols[:, None] < N) & d_mask[None, :]
            k = tl.load(k_base + cols[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
            p = tl_probabilities(q, k, lse, mask_rows, tile_ok, cols, N, qk_scale, HAS_MASK, DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=tl.float32) * out_scale
            if DROPOUT:
                dp = tl_apply_dropout(dp, seed, tile, cols, bh, dropout_p, keep_scale)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        tl.store(gq_base + tile[:, None] * stride_gn + d_off[None, :], (dq * score_scale).to(
            dqkv_ptr.dtype.element_ty), mask=tile_ok[:, None] & d_mask[None, :])
    else:
        kv_mask = tile_ok[:, None] & d_mask[None, :]
        k = tl.load(k_base + tile[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + tile[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q_mask = row_ok[:, None] & d_mask[None, :]
            q = tl.load(q_base + rows[:, None] * stride_n + d_off[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
            mask_rows = mask_head + rows[:, None].to(tl.int64) * stride_mq
            p = tl_probabilities(q, k, lse, mask_rows, row_ok, tile, N, qk_scale, HAS_MASK, DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=tl.float32) * out_scale
            if DROPOUT:
                keep = tl_dropout_keep(seed, rows, tile, bh, dropout_p)
                dv = tl.dot(tl.trans(tl.where(keep, p * keep_scale, 0.0).to(do.dtype)), do, dv,
                            input_precision=DOT_PRECISION, out_dtype=tl.float32)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            else:
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        tl.store(gk_base + tile[:, None] * stride_gn + d_off[None, :], (dk * score_scale).to(
            dqkv_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(gv_base + tile[:, None] * stride_gn + d_off[None, :], (dv * out_scale).to(
            dqkv_ptr.dtype.element_ty), mask=kv_mask)


def forward_fits(meta: dict, flags: dict) -> bool:
    """Forward tilings that compile spill-free (compile check, sm_80/sm_90): 128-wide key tiles spill with a
    mask tile, head_dim > 64 or dropout's Philox."""
    heavy = flags.get("HAS_MASK") or flags.get("BLOCK_D", 0) > 64 or flags.get("DROPOUT")
    return meta["BLOCK_N"] <= 64 or not heavy


ATTENTION_TYPES = {"mask_ptr": "*i1", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "qk_scale": "fp32",
                   "out_scale": "fp32", "score_scale": "fp32", "dropout_p": "fp32", "keep_scale": "fp32"}
ALIGNED = ("stride_b", "stride_n", "stride_ob", "stride_on", "E")

ATTENTION = Tuned(
    "attention", _attention_fwd_kernel,
    configs=[
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(8, 3, BLOCK_M=128, BLOCK_N=64),
        config(8, 2, BLOCK_M=128, BLOCK_N=128),
        config(4, 2, BLOCK_M=64, BLOCK_N=128),
    ],
    key=["N", "D", "HAS_MASK", "INTERLEAVED", "DROPOUT"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
    keep=lambda meta, flags: forward_fits(meta, flags),
    arg_types=ATTENTION_TYPES, aligned=ALIGNED,
    quiet_fp=("divide",),  # log2(0) of out-of-range query rows, stored masked
)


ATTENTION_BACKWARD = Tuned(
    "attention_backward", _attention_bwd_kernel,
    # the three tilings that compile spill-free for every variant on sm_80 and sm_90 (4-warp 64x64 spills);
    # untuned on a GPU so far
    configs=[config(8, 2, BLOCK_M=32, BLOCK_N=64), config(8, 2, BLOCK_M=64, BLOCK_N=32),
             config(4, 2, BLOCK_M=32, BLOCK_N=32)],
    key=["N", "D", "HAS_MASK", "INTERLEAVED", "DROPOUT", "DQ"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
    # the stride-3 (h d qkv) gathers spill in the other two tilings (sm_80: 64x32, sm_90: 32x32)
    keep=lambda meta, flags: not flags.get("INTERLEAVED") or (meta["BLOCK_M"], meta["BLOCK_N"]) == (32, 64),
    arg_types=ATTENTION_TYPES, aligned=ALIGNED,
)


def scales(scaling: str, E: int, D: int) -> tuple:
    """(qk_scale in log2 units, out_scale)."""
    if scaling == "tutorial":
        return LOG2E, 1.0 / math.sqrt(E)
    return LOG2E / math.sqrt(D), 1.0


def head_tile(head_dim: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two, at least 16 (tl.dot's smallest operand)."""
    return max(16, triton.next_power_of_2(head_dim))


def attention_launch(qkv, mask, num_heads, layout, scaling, dropout=0.0, seed=None):
    """(out [B, N, E], the fp32 log2-domain log-sum-exp [B * heads, N] that backward needs). ``mask`` is None or
    already prepared by ``contiguous_key_mask``; ``dropout`` > 0 needs a ``new_seed()`` tensor."""
    qkv = row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    out = new_output((B, N, E), qkv.device, qkv.dtype)
    lse = new_output((B * num_heads, N), qkv.device, torch.float32)
    if B * N:
        qk_scale, out_scale = scales(scaling, E, D)
        ATTENTION.launch(
            lambda meta: attention_grid(B, num_heads, N, meta["BLOCK_M"]),
            qkv, qkv if mask is None else mask, out, lse, N, num_heads, E, qk_scale, out_scale,
            *dropout_args(dropout, seed), qkv.stride(0), qkv.stride(1), *mask_strides(mask), out.stride(0),
            out.stride(1), D=D, INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None, DROPOUT=dropout > 0,
            STORE_LSE=True, DOT_PRECISION=dot_precision(qkv.dtype),
            BLOCK_D=head_tile(D))
    return out, lse


def attention_backward(dout, qkv, out, lse, mask, num_heads, layout, scaling, dropout=0.0, seed=None):
    """d qkv [B, N, 3E] in qkv's own layout, from dout [B, N, E]: two deterministic passes (dK/dV, then dQ)."""
    dout, qkv = row_major(dout), row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    dqkv = new_output((B, N, E3), qkv.device, qkv.dtype)
    if B * N == 0:
        return dqkv
    # rowsum(dO * O) per (batch, head, query), the softmax-backward correction term
    delta = (dout.float() * out.float()).view(B, N, num_heads, D).sum(-1).transpose(1, 2).contiguous()
    qk_scale, out_scale = scales(scaling, E, D)
    for dq in (False, True):
        ATTENTION_BACKWARD.launch(
            lambda meta, dq=dq: attention_grid(B, num_heads, N, meta["BLOCK_M" if dq else "BLOCK_N"]),
            qkv, dout, lse, delta, qkv if mask is None else mask, dqkv, N, num_heads, E, qk_scale,
            out_scale, qk_scale / LOG2E, *dropout_args(dropout, seed), qkv.stride(0), qkv.stride(1),
            *mask_strides(mask), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1), D=D,
            INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None, DROPOUT=dropout > 0, DQ=dq,
            DOT_PRECISION=dot_precision(qkv.dtype), BLOCK_D=head_tile(D))
    return dqkv


def attention_grid(batch: int, heads: int, tokens: int, block_m: int) -> tuple:
    """One program per (batch, head, query tile), flattened onto axis 0: batch x heads may pass 65,535."""
    return launch_grid(batch * heads * triton.cdiv(tokens, block_m))


def contiguous_key_mask(mask, N):
    """A 4-D bool mask with unit stride over keys and rows padded to 16 bytes (vectorized loads); broadcast
    batch/head axes stay size 1 (read with stride 0)."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    padded = torch.zeros((m.shape[0], m.shape[1], N, triton.cdiv(N, 16) * 16), dtype=torch.bool, device=m.device)
    padded[..., :N] = m
    return padded


def mask_strides(mask) -> tuple:
    """(batch, head, query) strides of a prepared mask; 0 on broadcast axes, and for no mask."""
    if mask is None:
        return 0, 0, 0
    return (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(2))


@torch.library.custom_op("vit_kernels::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, mask: torch.Tensor | None, num_heads: int, layout: str,
                 scaling: str, dropout: float = 0.0, seed: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, log-sum-exp) as a torch.library op; ``mask`` prepared by ``contiguous_key_mask``."""
    return attention_launch(qkv, mask, num_heads, layout, scaling, dropout, seed)


@attention_op.register_fake
def _(qkv, mask, num_heads, layout, scaling, dropout=0.0, seed=None):
    B, N, E3 = qkv.shape
    return qkv.new_empty((B, N, E3 // 3)), qkv.new_empty((B * num_heads, N), dtype=torch.float32)


@torch.library.custom_op("vit_kernels::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          mask: torch.Tensor | None, num_heads: int, layout: str, scaling: str,
                          dropout: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    return attention_backward(dout, qkv, out, lse, mask, num_heads, layout, scaling, dropout, seed)


@attention_backward_op.register_fake
def _(dout, qkv, out, lse, mask, num_heads, layout, scaling, dropout=0.0, seed=None):
    return qkv.new_empty(qkv.shape)


def _attention_setup(ctx, inputs, output):
    qkv, mask, num_heads, layout, scaling, dropout, seed = inputs
    ctx.save_for_backward(qkv, output[0], output[1], mask, seed)
    ctx.args = (num_heads, layout, scaling, dropout)


def _attention_grad(ctx, dout, _dlse):
    qkv, out, lse, mask, seed = ctx.saved_tensors
    return attention_backward_op(dout, qkv, out, lse, mask, *ctx.args, seed), None, None, None, None, None, None


attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def split_qkv(qkv: torch.Tensor, num_heads: int, layout: str):
    """[B, N, 3E] -> q, k, v as [B, heads, N, head_dim] views (the PyTorch path)."""
    B, N, E3 = qkv.shape
    D = E3 // 3 // num_heads
    if layout == "h d qkv":
        parts = qkv.view(B, N, num_heads, D, 3).permute(4, 0, 2, 1, 3)
    else:
        parts = qkv.view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys that the kernels compute: masked keys get 0 and a row with no allowed key is all zeros
    (its normalizer is 0: divided by 1 instead), finite in backward too; NaN/Inf propagate from allowed keys."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * mask
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total == 0, 1.0, total)


def attention_torch_probabilities(qkv, num_heads, layout="h d qkv", scaling="tutorial", mask=None):
    """softmax(qk_scale * Q K^T), [B, heads, N, N], in fp32 or fp64 for a float64 input (the PyTorch path;
    0 where masked)."""
    q, k, _ = split_qkv(qkv, num_heads, layout)
    E = qkv.shape[2] // 3
    energy = torch.matmul(q, k.transpose(-1, -2)) * (scales(scaling, E, E // num_heads)[0] / LOG2E)
    return masked_softmax(energy.to(torch.promote_types(energy.dtype, torch.float32)), mask)


def attention_torch(qkv, num_heads, layout="h d qkv", scaling="tutorial", mask=None, dropout=0.0):
    """The PyTorch fallback, same semantics (fully masked rows give zeros; dropout masks from torch's RNG)."""
    v = split_qkv(qkv, num_heads, layout)[2]
    B, N, E3 = qkv.shape
    out_scale = scales(scaling, E3 // 3, E3 // 3 // num_heads)[1]
    att = F.dropout(attention_torch_probabilities(qkv, num_heads, layout, scaling, mask), dropout)
    return torch.matmul(att.to(v.dtype) * out_scale, v).transpose(1, 2).reshape(B, N, E3 // 3)


def check_attention(qkv, num_heads, layout, scaling, mask, dropout=0.0) -> str:
    """Validates the arguments of ``attention`` / ``attention_probabilities``; returns the scaling's current
    name (``"seed"`` is accepted with a DeprecationWarning)."""
    check_tensor("qkv", qkv, dims=3)
    check_positive_int("num_heads", num_heads)
    if qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"qkv feature size {qkv.shape[2]} must be 3 * num_heads * head_dim "
                         f"(num_heads={num_heads})")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    scaling = resolve_scaling(scaling, stacklevel=4)  # the warning points at the caller of the public op
    check_mask(mask, qkv.shape[0], num_heads, qkv.shape[1])
    check_probability("dropout", dropout)
    if mask is not None and mask.device != qkv.device:
        raise ValueError(f"mask is on {mask.device} but qkv is on {qkv.device}")
    check_sample_size("qkv", qkv.shape[1] * qkv.stride(1) if qkv.dim() == 3 and qkv.shape[1] else 0)
    head_dim = qkv.shape[2] // 3 // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM}")
    return scaling


def attention(qkv: torch.Tensor, num_heads: int, layout: str = "h d qkv", scaling: str = "tutorial",
              mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention from a fused qkv buffer [B, N, 3E]; returns [B, N, E] in (h d) order.

    layout: ``"h d qkv"`` (the tutorial's rearrange) or ``"qkv h d"`` (timm). scaling: ``"tutorial"`` or
    ``"paper"``. mask: optional bool, broadcastable to [B, heads, N, N], True = attend. dropout: the rate
    applied to the attention probabilities (0 compiles it out).
    """
    scaling = check_attention(qkv, num_heads, layout, scaling, mask, dropout)
    return dispatch((qkv, mask), lambda: attention_torch(qkv, num_heads, layout, scaling, mask, dropout),
                    attention_op, attention_launch,
                    lambda: (qkv, None if mask is None else contiguous_key_mask(mask, qkv.shape[1]), num_heads, layout,
                             scaling, float(dropout), new_seed() if dropout else None),
                    finish=lambda out: out[0])


# --- registry entry ----------------------------------------------------------------------------------------
FORWARD_VARIANTS = tuple(  # dropout variants at head_dim 64, both layouts
    dict(HAS_MASK=mask, D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter, STORE_LSE=lse, DROPOUT=drop,
         DOT_PRECISION="tf32")
    for d in (16, 24, 64, 80, 128) for mask in (False, True) for inter in (False, True) for lse in (False, True)
    for drop in (False, True)
    if (d == 64 or not (mask or inter)) and (not lse or d in (64, 80)) and (not drop or (d == 64 and lse)))
BACKWARD_VARIANTS = tuple(
    dict(HAS_MASK=mask, D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter, DQ=dq, DROPOUT=drop, DOT_PRECISION="tf32")
    for d in (24, 64, 80, 128) for mask in (False, True) for inter in (False, True) for dq in (False, True)
    for drop in (False, True)
    if (d == 64 or not (mask or inter)) and (not drop or (d == 64 and not mask)))


def sample_mask(batch: int, tokens: int, device) -> torch.Tensor:
    """A random [batch, 1, N, N] key mask (about 70% allowed), some rows likely empty."""
    return torch.rand(batch, 1, tokens, tokens).to(device) > 0.3


def _opcheck_samples(device):
    def r(*shape):
        return randn(*shape, device=device, grad=True)

    mask = contiguous_key_mask(sample_mask(2, 9, device), 9)
    qkv = r(2, 9, 3 * 2 * 16)
    out, lse = attention_op(qkv.detach(), None, 2, "qkv h d", "paper")
    return [
        (attention_op, (qkv, None, 2, "qkv h d", "paper")),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "h d qkv", "tutorial")),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "h d qkv", "tutorial", 0.3, new_seed())),
        (attention_backward_op, (randn(2, 9, 32, device=device), qkv.detach(), out, lse, None, 2, "qkv h d",
                                 "paper")),
    ]


def _grad_cases(device):
    cases = []
    for layout, scaling, masked, p in (("qkv h d", "paper", False, 0.0), ("h d qkv", "tutorial", True, 0.0),
                                       ("qkv h d", "paper", True, 0.3)):
        mask = contiguous_key_mask(sample_mask(2, 7, device), 7) if masked else None
        seed = new_seed()  # fixed: finite differences need a deterministic function
        cases.append(GradCase(
            f"{layout} {scaling} mask={masked} dropout={p}",
            lambda qkv, layout=layout, scaling=scaling, mask=mask, p=p, seed=seed: attention_op(
                qkv, mask, 2, layout, scaling, p, seed)[0],
            (randn(2, 7, 3 * 2 * 16, device=device, scale=0.5, grad=True),)))
    return cases


def _examples(device, dtype, batch):
    qkv = randn(batch, 11, 3 * 3 * 8, device=device, dtype=dtype)
    return [((qkv, 3), dict(layout="h d qkv", scaling="tutorial")),
            ((qkv, 3), dict(layout="qkv h d", scaling="paper", mask=sample_mask(batch, 11, device)))]


def _bench(size, batch, dtype, device):
    n, h, d = (size["img"] // size["patch"]) ** 2 + 1, size["heads"], size["emb"] // size["heads"]
    qkv = randn(batch, n, 3 * h * d, dtype=dtype, device=device)
    q, k, v = split_qkv(qkv, h, "qkv h d")

    def merge(o):
        return o.transpose(1, 2).reshape(batch, n, h * d)

    def einsum():  # the tutorial's formulation, paper scaling
        att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d), dim=-1)
        return merge(torch.einsum("bhqk,bhkd->bhqd", att, v))

    baselines = {"einsum (tutorial)": einsum}
    if qkv.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, backend in [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient",
                               SDPBackend.EFFICIENT_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("sdpa math", SDPBackend.MATH)]:
            def pinned(backend=backend):
                with sdpa_kernel(backend):
                    return merge(F.scaled_dot_product_attention(q, k, v))
            baselines[label] = pinned
    else:
        baselines["sdpa"] = lambda: merge(F.scaled_dot_product_attention(q, k, v))
    yield BenchCase(lambda: attention(qkv, h, "qkv h d", "paper"), baselines, flops=4 * batch * h * n * n * d)


register(OpSpec(
    name="attention",
    fn=attention,
    summary="flash attention (online softmax, no N x N matrix) reading the fused qkv buffer in place, both qkv "
            "layouts, both scalings, odd token counts, any head_dim <= 256, optional boolean mask, dropout on "
            "the probabilities",
    kernels=(KernelGrid(ATTENTION, FORWARD_VARIANTS), KernelGrid(ATTENTION_BACKWARD, BACKWARD_VARIANTS)),
    custom_ops=(attention_op, attention_backward_op),
    opcheck_samples=_opcheck_samples,
    grad_cases=_grad_cases,
    examples=_examples,
    bench=_bench,
))
