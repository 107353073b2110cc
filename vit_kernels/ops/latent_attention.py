"""Latent-query attention: the attention of MAP pooling (multi-head attention pooling).

SigLIP's ``global_pool="map"`` head (timm ``AttentionPoolLatent``, HF ``SiglipMultiheadAttentionPoolingHead``):
a few learned latent queries (usually L = 1) attend over all N tokens of each image. One launch computes,
per batch element b and head h, ``out_scale * softmax(qk_scale * q_h k_h^T) v_h``:

- q [B, L, E]: the projected latent queries in ``(h d)`` order. Callers pass ``latent.expand(B, L, E)`` of a
  shared [1, L, E]: a stride-0 batch axis is read as is, never copied.
- kv [B, N, 2E]: timm's ``kv = Linear(E, 2E)`` output in ``(kv h d)`` order (the k block, then the v block);
  for HF's ``nn.MultiheadAttention`` the caller stacks the k and v rows of ``in_proj`` the same way.
- out [B, L, E] in ``(h d)`` order, ready for the output projection.

Scalings as in ``ops.attention``: ``"paper"`` (softmax(QK^T / sqrt(head_dim)), what both families use) or
``"tutorial"`` (softmax(QK^T) / sqrt(E)). Optional qk-norm exactly as timm ``AttentionPoolLatent(qk_norm=True)``:
a LayerNorm over head_dim (weight, optional bias, ``qk_norm_eps``) on each head's queries and keys before the
scores. No mask and no dropout: neither family uses one in this attention (timm's ``AttentionPoolLatent`` has
no attention dropout; its ``attn_mask`` argument is never passed by the ViT).

Kernels: one program per (batch, head) on a 1-D grid. The queries are one tile padded to 16 rows (``tl.dot``'s
smallest), L = 1 included: on an H200 that ran 2.5x faster than a one-row broadcast-multiply-and-reduce
variant (SigLIP so400m, bf16, B = 256: 261 vs 644 us forward, 702 vs 1156 us backward). Larger L runs in
launches of 16 queries. Online softmax over key tiles with fp32 running max and sum; head_dim up to 256
(padded to a power of two, masked); any N. Backward: one program per (batch, head) walks the key tiles once,
recomputing P from the saved log-sum-exp, writes dK and dV of each tile and accumulates dQ in registers:
deterministic, no atomics. qk-norm weight gradients are per-program fp32 partial sums reduced on the host.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..validate import check_device, check_positive_int, check_sample_size, check_tensor, check_vector, resolve_scaling
from .attention import LOG2E, MAX_HEAD_DIM, head_tile, scales  # the same scalings and head tile as attention
from .dispatch import dispatch
from .launch import Tuned, config, dot_precision, launch_grid, new_output, row_major
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register

QUERY_TILE = 16  # queries per launch, padded to tl.dot's smallest tile; more latents: several launches


# --- device helpers ------------------------------------------------------------------------------------------
@triton.jit
def tl_mm(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b in fp32 with tl.dot, a cast to b's dtype (P and dS are fp32)."""
    return tl.dot(a.to(b.dtype), b, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def tl_head_norm(x, d_mask, D: tl.constexpr, w, b, eps):
    """LayerNorm of each row of x [R, BLOCK_D] (zeros past D) over its D features, with weight w and bias b
    ([BLOCK_D] fp32, zeros past D). Returns (y, mean, rstd) in fp32."""
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(d_mask[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / D + eps)
    return centered * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def tl_head_norm_backward(dy, x, mean, rstd, d_mask, w, D: tl.constexpr):
    """Backward of tl_head_norm from dy [R, BLOCK_D] (fp32) and its input x (x_hat is recomputed from the
    statistics rather than kept in registers): (dx, this tile's weight gradient sum(dy * x_hat) and bias
    gradient sum(dy), both [BLOCK_D])."""
    x_hat = tl.where(d_mask[None, :], (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * w[None, :]
    mean_g = tl.sum(g, axis=1) / D
    mean_gx = tl.sum(g * x_hat, axis=1) / D
    dx = (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd[:, None]
    return dx, tl.sum(dy * x_hat, axis=0), tl.sum(dy, axis=0)


@triton.jit
def tl_load_norm(w_ptr, b_ptr, offs_d, d_mask):
    w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    return w, b


# --- kernels -------------------------------------------------------------------------------------------------
@triton.jit
def _latent_attention_fwd_kernel(q_ptr, kv_ptr, out_ptr, lse_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, L, N, H, E,
                                 qk_scale, out_scale, eps, stride_qb, stride_ql, stride_kvb, stride_kvn, stride_ob,
                                 stride_ol, stride_lse, D: tl.constexpr, Q_NORM: tl.constexpr,
                                 K_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_ok = offs_l < L
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + offs_l[:, None] * stride_ql + h * D + offs_d[None, :], mask=q_mask,
                other=0.0)
    if Q_NORM:
        qw, qb = tl_load_norm(qw_ptr, qb_ptr, offs_d, d_mask)
        q = tl_head_norm(q, d_mask, D, qw, qb, eps)[0].to(q_ptr.dtype.element_ty)
    if K_NORM:
        kw, kb = tl_load_norm(kw_ptr, kb_ptr, offs_d, d_mask)
    k_base = kv_ptr + b * stride_kvb + h * D
    v_base = k_base + E
    m_i = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < N
        kv_mask = col_ok[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kvn + offs_d[None, :], mask=kv_mask, other=0.0)
        if K_NORM:
            k = tl_head_norm(k, d_mask, D, kw, kb, eps)[0].to(kv_ptr.dtype.element_ty)
        # log2(e) is folded into qk_scale: exp2 is the fast exponential. Every tile has a key in range, so the
        # running max is finite (for finite inputs).
        s = tl.where(col_ok[None, :], tl_mm(q, tl.trans(k), DOT_PRECISION) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_kvn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl_mm(p, v, DOT_PRECISION)
        m_i = m_new
    out = acc * (out_scale / l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + offs_l[:, None] * stride_ol + h * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
    # log2-domain log-sum-exp for backward
    tl.store(lse_ptr + bh.to(tl.int64) * stride_lse + offs_l, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _latent_attention_bwd_kernel(q_ptr, kv_ptr, out_ptr, do_ptr, lse_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, dq_ptr,
                                 dkv_ptr, dnorm_ptr, L, N, H, E, qk_scale, out_scale, score_scale, eps, stride_qb,
                                 stride_ql, stride_kvb, stride_kvn, stride_ob, stride_ol, stride_dob, stride_dol,
                                 stride_lse, stride_dqb, stride_dql, stride_gb, stride_gn, D: tl.constexpr,
                                 Q_NORM: tl.constexpr, K_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch, head), one pass over the keys. With O = out_scale P V, P = softmax(S),
    S = score_scale Q K^T (Q, K after qk-norm): dV = out_scale P^T dO, dP = out_scale dO V^T,
    dS = P (dP - rowsum(dO * O)), dQ = score_scale dS K, dK = score_scale dS^T Q; then LayerNorm backward
    for the normalized ones, with per-program weight/bias partial sums in dnorm [B * heads, 4, D]."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_ok = offs_l < L
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + offs_l[:, None] * stride_ql + h * D + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(do_ptr + b * stride_dob + offs_l[:, None] * stride_dol + h * D + offs_d[None, :], mask=q_mask,
                 other=0.0)
    o = tl.load(out_ptr + b * stride_ob + offs_l[:, None] * stride_ol + h * D + offs_d[None, :], mask=q_mask,
                other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # the softmax-backward correction term
    lse = tl.load(lse_ptr + bh.to(tl.int64) * stride_lse + offs_l, mask=row_ok, other=float("inf"))  # P = 0 past L
    if Q_NORM:  # the raw q is loaded again at the end for the norm's backward
        qw, qb = tl_load_norm(qw_ptr, qb_ptr, offs_d, d_mask)
        q = tl_head_norm(q, d_mask, D, qw, qb, eps)[0].to(q_ptr.dtype.element_ty)
    if K_NORM:
        kw, kb = tl_load_norm(kw_ptr, kb_ptr, offs_d, d_mask)
        dkw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dkb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    k_base = kv_ptr + b * stride_kvb + h * D
    gk_base = dkv_ptr + b * stride_gb + h * D
    dq = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < N
        kv_mask = col_ok[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kvn + offs_d[None, :], mask=kv_mask, other=0.0)
        if K_NORM:
            k_raw = k
            k_n, k_mean, k_rstd = tl_head_norm(k_raw, d_mask, D, kw, kb, eps)
            k = k_n.to(kv_ptr.dtype.element_ty)
        p = tl.exp2(tl_mm(q, tl.trans(k), DOT_PRECISION) * qk_scale - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        # dV first and stored at once, V loaded only then: fewer tiles live at a time (no spills)
        dv = tl_mm(tl.trans(p), do, DOT_PRECISION) * out_scale
        tl.store(gk_base + E + cols[:, None] * stride_gn + offs_d[None, :], dv.to(dkv_ptr.dtype.element_ty),
                 mask=kv_mask)
        v = tl.load(k_base + E + cols[:, None] * stride_kvn + offs_d[None, :], mask=kv_mask, other=0.0)
        ds = p * (tl_mm(do, tl.trans(v), DOT_PRECISION) * out_scale - delta[:, None])
        dq += tl_mm(ds, k, DOT_PRECISION)
        dk = tl_mm(tl.trans(ds), q, DOT_PRECISION) * score_scale
        if K_NORM:
            dk, dw, db = tl_head_norm_backward(dk, k_raw, k_mean, k_rstd, d_mask, kw, D)
            dkw += dw
            dkb += db
        tl.store(gk_base + cols[:, None] * stride_gn + offs_d[None, :], dk.to(dkv_ptr.dtype.element_ty),
                 mask=kv_mask)
    dq = dq * score_scale
    partials = dnorm_ptr + bh.to(tl.int64) * 4 * D + offs_d
    if Q_NORM:
        q = tl.load(q_ptr + b * stride_qb + offs_l[:, None] * stride_ql + h * D + offs_d[None, :], mask=q_mask,
                    other=0.0)
        _, q_mean, q_rstd = tl_head_norm(q, d_mask, D, qw, qb, eps)
        dq, dw, db = tl_head_norm_backward(dq, q, q_mean, q_rstd, d_mask, qw, D)
        tl.store(partials, dw, mask=d_mask)
        tl.store(partials + D, db, mask=d_mask)
    if K_NORM:
        tl.store(partials + 2 * D, dkw, mask=d_mask)
        tl.store(partials + 3 * D, dkb, mask=d_mask)
    tl.store(dq_ptr + b * stride_dqb + offs_l[:, None] * stride_dql + h * D + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# --- launchers -----------------------------------------------------------------------------------------------
def forward_fits(meta: dict, flags: dict) -> bool:
    """Forward tilings that compile spill-free within shared memory (compile check, sm_80/sm_90): a key tile of
    at most 16K elements (pipelined K and V tiles), 8K with qk-norm."""
    tile = meta["BLOCK_N"] * flags.get("BLOCK_D", MAX_HEAD_DIM)
    return tile <= (8192 if flags.get("Q_NORM") or flags.get("K_NORM") else 16384)


def backward_fits(meta: dict, flags: dict) -> bool:
    """Backward tilings that compile spill-free (compile check, sm_80/sm_90): 16-key tiles (8 warps) with qk-norm,
    32- and 64-key tiles without."""
    return (meta["BLOCK_N"] == 16) == bool(flags.get("Q_NORM") or flags.get("K_NORM"))


LATENT_TYPES = {"lse_ptr": "*fp32", "dnorm_ptr": "*fp32", "qk_scale": "fp32", "out_scale": "fp32",
                "score_scale": "fp32", "eps": "fp32"}
ALIGNED = ("stride_ql", "stride_kvb", "stride_kvn", "stride_ob", "stride_ol", "stride_dob", "stride_dol",
           "stride_dqb", "stride_dql", "stride_gb", "stride_gn", "E")
KEY = ["N", "D", "Q_NORM", "K_NORM"]

LATENT_ATTENTION = Tuned(
    "latent_attention", _latent_attention_fwd_kernel,
    configs=[config(4, 3, BLOCK_N=32), config(4, 3, BLOCK_N=64), config(8, 2, BLOCK_N=128)],
    key=KEY, interpret_config=dict(BLOCK_N=16), keep=forward_fits, arg_types=LATENT_TYPES, aligned=ALIGNED,
)

LATENT_ATTENTION_BACKWARD = Tuned(
    "latent_attention_backward", _latent_attention_bwd_kernel,
    configs=[config(8, 2, BLOCK_N=16), config(4, 2, BLOCK_N=32), config(8, 2, BLOCK_N=64)],
    key=KEY, interpret_config=dict(BLOCK_N=16), keep=backward_fits, arg_types=LATENT_TYPES, aligned=ALIGNED,
)


def query_chunks(latents: int) -> list:
    """(first, end) of each launch's queries: at most QUERY_TILE per launch."""
    return [(c, min(c + QUERY_TILE, latents)) for c in range(0, latents, QUERY_TILE)]


def norm_pointers(q, head_dim, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias) -> tuple:
    """The four qk-norm vectors as kernel arguments: a missing bias of a present norm is zeros, a missing norm
    any pointer (never read)."""
    def bias(weight, b):
        if weight is None:
            return q
        return b if b is not None else torch.zeros(head_dim, device=q.device, dtype=q.dtype)

    return (q if q_norm_weight is None else q_norm_weight, bias(q_norm_weight, q_norm_bias),
            q if k_norm_weight is None else k_norm_weight, bias(k_norm_weight, k_norm_bias))


def latent_attention_launch(q, kv, num_heads, scaling, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                            k_norm_bias=None, qk_norm_eps=1e-6):
    """(out [B, L, E], the fp32 log2-domain log-sum-exp [B * heads, L] that backward needs)."""
    q, kv = row_major(q), row_major(kv)
    B, L, E = q.shape
    N = kv.shape[1]
    D = E // num_heads
    out = new_output((B, L, E), q.device, q.dtype)
    lse = new_output((B * num_heads, L), q.device, torch.float32)
    if B * L * N == 0:
        return out, lse
    qk_scale, out_scale = scales(scaling, E, D)
    norms = norm_pointers(q, D, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    for c0, c1 in query_chunks(L):
        LATENT_ATTENTION.launch(
            lambda meta: launch_grid(B * num_heads),
            q[:, c0:c1], kv, out[:, c0:c1], lse[:, c0:c1], *norms, c1 - c0, N, num_heads, E, qk_scale, out_scale,
            qk_norm_eps, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1),
            lse.stride(0), D=D, Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None,
            DOT_PRECISION=dot_precision(q.dtype), BLOCK_L=QUERY_TILE, BLOCK_D=head_tile(D))
    return out, lse


def latent_attention_backward(dout, q, kv, out, lse, num_heads, scaling, q_norm_weight=None, q_norm_bias=None,
                              k_norm_weight=None, k_norm_bias=None, qk_norm_eps=1e-6):
    """(dq [B, L, E], dkv [B, N, 2E], dnorm [4, D] fp32: the gradients of q_norm_weight, q_norm_bias,
    k_norm_weight, k_norm_bias; zeros for an absent norm). Deterministic: one program per (batch, head)."""
    dout, q, kv = row_major(dout), row_major(q), row_major(kv)
    B, L, E = q.shape
    N = kv.shape[1]
    D = E // num_heads
    dq = new_output((B, L, E), q.device, q.dtype)
    dnorm = torch.zeros((4, D), device=q.device, dtype=torch.float32)
    if B * L * N == 0:
        return dq.zero_(), torch.zeros(kv.shape, device=kv.device, dtype=kv.dtype), dnorm
    chunks = query_chunks(L)
    # several query launches each give a dK/dV contribution: summed in fp32
    dkv = new_output(kv.shape, kv.device, kv.dtype if len(chunks) == 1 else torch.float32)
    total = None
    has_norm = q_norm_weight is not None or k_norm_weight is not None
    partials = new_output((B * num_heads, 4, D), q.device, torch.float32) if has_norm else dnorm
    qk_scale, out_scale = scales(scaling, E, D)
    norms = norm_pointers(q, D, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    for c0, c1 in chunks:
        LATENT_ATTENTION_BACKWARD.launch(
            lambda meta: launch_grid(B * num_heads),
            q[:, c0:c1], kv, out[:, c0:c1], dout[:, c0:c1], lse[:, c0:c1], *norms, dq[:, c0:c1], dkv, partials,
            c1 - c0, N, num_heads, E, qk_scale, out_scale, qk_scale / LOG2E, qk_norm_eps, q.stride(0),
            q.stride(1), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            lse.stride(0), dq.stride(0), dq.stride(1), dkv.stride(0), dkv.stride(1), D=D,
            Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None,
            DOT_PRECISION=dot_precision(q.dtype), BLOCK_L=QUERY_TILE, BLOCK_D=head_tile(D))
        if len(chunks) > 1:
            total = dkv.clone() if total is None else total.add_(dkv)
        if has_norm:
            dnorm += partials.sum(0)
    if q_norm_weight is None:
        dnorm[:2] = 0.0  # an absent norm's partial rows were never written
    if k_norm_weight is None:
        dnorm[2:] = 0.0
    return dq, dkv if total is None else total.to(kv.dtype), dnorm


# --- torch.library custom ops --------------------------------------------------------------------------------
@torch.library.custom_op("vit_kernels::latent_attention", mutates_args=())
def latent_attention_op(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scaling: str,
                        q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
                        k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
                        qk_norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, log-sum-exp) as a torch.library op."""
    return latent_attention_launch(q, kv, num_heads, scaling, q_norm_weight, q_norm_bias, k_norm_weight,
                                   k_norm_bias, qk_norm_eps)


@latent_attention_op.register_fake
def _(q, kv, num_heads, scaling, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
      qk_norm_eps=1e-6):
    B, L, E = q.shape
    return q.new_empty((B, L, E)), q.new_empty((B * num_heads, L), dtype=torch.float32)


@torch.library.custom_op("vit_kernels::latent_attention_backward", mutates_args=())
def latent_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                                 lse: torch.Tensor, num_heads: int, scaling: str,
                                 q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
                                 k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
                                 qk_norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return latent_attention_backward(dout, q, kv, out, lse, num_heads, scaling, q_norm_weight, q_norm_bias,
                                     k_norm_weight, k_norm_bias, qk_norm_eps)


@latent_attention_backward_op.register_fake
def _(dout, q, kv, out, lse, num_heads, scaling, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
      k_norm_bias=None, qk_norm_eps=1e-6):
    return (q.new_empty(q.shape), kv.new_empty(kv.shape),
            q.new_empty((4, q.shape[2] // num_heads), dtype=torch.float32))


def _latent_attention_setup(ctx, inputs, output):
    q, kv, num_heads, scaling, qw, qb, kw, kb, eps = inputs
    ctx.save_for_backward(q, kv, output[0], output[1], qw, qb, kw, kb)
    ctx.args = (num_heads, scaling)
    ctx.eps = eps


def _latent_attention_grad(ctx, dout, _dlse):
    """dq has q's own shape (contiguous): with an expanded q, autograd then sums it over the batch."""
    q, kv, out, lse, qw, qb, kw, kb = ctx.saved_tensors
    dq, dkv, dnorm = latent_attention_backward_op(dout, q, kv, out, lse, *ctx.args, qw, qb, kw, kb, ctx.eps)
    norm_grads = [None if t is None else g.to(t.dtype) for t, g in zip((qw, qb, kw, kb), dnorm.unbind(0))]
    return dq, dkv, None, None, *norm_grads, None


latent_attention_op.register_autograd(_latent_attention_grad, setup_context=_latent_attention_setup)


# --- the PyTorch fallback ------------------------------------------------------------------------------------
def split_latent_heads(q, kv, num_heads):
    """q [B, L, E], kv [B, N, 2E] -> q, k, v as [B, heads, rows, head_dim] views (the PyTorch path)."""
    D = q.shape[2] // num_heads
    k, v = kv.unflatten(2, (2, num_heads, D)).permute(2, 0, 3, 1, 4).unbind(0)
    return q.unflatten(2, (num_heads, D)).transpose(1, 2), k, v


def latent_attention_torch(q, kv, num_heads, scaling="paper", q_norm_weight=None, q_norm_bias=None,
                           k_norm_weight=None, k_norm_bias=None, qk_norm_eps=1e-6):
    """The PyTorch fallback, same function: scores and softmax in fp32 (fp64 for float64 inputs)."""
    B, L, E = q.shape
    qh, k, v = split_latent_heads(q, kv, num_heads)
    D = E // num_heads
    if q_norm_weight is not None:
        qh = F.layer_norm(qh, (D,), q_norm_weight, q_norm_bias, qk_norm_eps)
    if k_norm_weight is not None:
        k = F.layer_norm(k, (D,), k_norm_weight, k_norm_bias, qk_norm_eps)
    qk_scale, out_scale = scales(scaling, E, D)
    scores = torch.matmul(qh, k.transpose(-1, -2)) * (qk_scale / LOG2E)
    att = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    out = torch.matmul(att.to(v.dtype), v)
    if out_scale != 1.0:
        out = out * out_scale
    return out.transpose(1, 2).reshape(B, L, E)


# --- checks and the public function --------------------------------------------------------------------------
def check_latent_attention(q, kv, num_heads, scaling, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                           qk_norm_eps) -> str:
    """Validates the arguments of ``latent_attention``; returns the scaling's current name."""
    check_tensor("q", q, dims=3)
    check_tensor("kv", kv, dims=3, dtype=q.dtype)
    check_device("kv", kv, q.device)
    check_positive_int("num_heads", num_heads)
    B, L, E = q.shape
    if kv.shape[0] != B:
        raise ValueError(f"kv has batch {kv.shape[0]} but q has batch {B} (expand a shared latent query with "
                         f"q.expand({kv.shape[0]}, -1, -1))")
    if kv.shape[2] != 2 * E:
        raise ValueError(f"kv feature size {kv.shape[2]} must be 2 * E = {2 * E} (k then v) for q of width E = {E}")
    if E % num_heads:
        raise ValueError(f"q width E = {E} must be divisible by num_heads = {num_heads}")
    head_dim = E // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM}")
    if kv.shape[1] == 0 and B * L:
        raise ValueError("kv has no tokens: latent queries need at least one key")
    scaling = resolve_scaling(scaling, stacklevel=4)
    for name, weight, bias in (("q_norm", q_norm_weight, q_norm_bias), ("k_norm", k_norm_weight, k_norm_bias)):
        check_vector(f"{name}_weight", weight, head_dim, q.dtype, q.device)
        check_vector(f"{name}_bias", bias, head_dim, q.dtype, q.device)
        if bias is not None and weight is None:
            raise ValueError(f"{name}_bias needs {name}_weight (qk-norm is a LayerNorm with a weight)")
    if isinstance(qk_norm_eps, bool) or not isinstance(qk_norm_eps, (int, float)) or not qk_norm_eps > 0:
        raise ValueError(f"qk_norm_eps must be a positive number, got {qk_norm_eps!r}")
    check_sample_size("kv", kv.shape[1] * kv.stride(1))
    check_sample_size("q", L * q.stride(1))
    return scaling


@planned
def latent_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, *, scaling: str = "paper",
                     q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
                     k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
                     qk_norm_eps: float = 1e-6) -> torch.Tensor:
    """Multi-head attention of latent queries over the tokens (MAP pooling); returns [B, L, E] in (h d) order.

    q: [B, L, E] projected latent queries (``latent.expand(B, L, E)`` is read without a copy); kv: [B, N, 2E]
    in (kv h d) order (timm ``AttentionPoolLatent.kv``'s output). scaling: ``"paper"`` (softmax(QK^T /
    sqrt(head_dim)), timm and HF) or ``"tutorial"`` (softmax(QK^T) / sqrt(E)). q_norm_* / k_norm_*: timm's
    qk-norm, a LayerNorm over head_dim of each head's queries / keys (weight [head_dim], bias optional,
    ``qk_norm_eps``). No mask and no dropout (timm's ``AttentionPoolLatent`` has no attention dropout).
    Differentiable in q, kv and the qk-norm vectors.
    """
    scaling = check_latent_attention(q, kv, num_heads, scaling, q_norm_weight, q_norm_bias, k_norm_weight,
                                     k_norm_bias, qk_norm_eps)
    norms = (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    return dispatch((q, kv, *norms),
                    lambda: latent_attention_torch(q, kv, num_heads, scaling, *norms, qk_norm_eps),
                    latent_attention_op, latent_attention_launch,
                    lambda: (q, kv, num_heads, scaling, *norms, float(qk_norm_eps)),
                    finish=lambda out: out[0])


# --- registry entry ----------------------------------------------------------------------------------------
HEAD_DIMS = (24, 64, 72, 256)
FORWARD_VARIANTS = tuple(
    dict(D=d, BLOCK_D=head_tile(d), BLOCK_L=QUERY_TILE, Q_NORM=norm, K_NORM=norm, DOT_PRECISION="tf32")
    for d in HEAD_DIMS for norm in (False, True) if not norm or d in (72, 256))
BACKWARD_VARIANTS = FORWARD_VARIANTS


def shared_query(batch, latents, emb, device, dtype=torch.float32, grad=False, scale=1.0):
    """A [1, L, E] latent query expanded to the batch (stride 0), as the MAP heads pass it."""
    latent = randn(1, latents, emb, device=device, dtype=dtype, grad=grad, scale=scale)
    return latent.expand(batch, latents, emb)


def _norm_vectors(head_dim, device, dtype=torch.float32, grad=False):
    return tuple(randn(head_dim, device=device, dtype=dtype, grad=grad, scale=0.5) + (1.0 if i % 2 == 0 else 0.0)
                 for i in range(4))


def _opcheck_samples(device):
    def r(*shape):
        return randn(*shape, device=device, grad=True)

    q, kv = shared_query(2, 1, 2 * 16, device, grad=True), r(2, 9, 2 * 2 * 16)
    out, lse = latent_attention_op(q.detach(), kv.detach(), 2, "paper")
    norms = [randn(16, device=device, grad=True) for _ in range(4)]
    return [
        (latent_attention_op, (q, kv, 2, "paper")),
        (latent_attention_op, (r(2, 3, 2 * 16), r(2, 9, 2 * 2 * 16), 2, "tutorial")),
        (latent_attention_op, (r(2, 3, 2 * 16), r(2, 9, 2 * 2 * 16), 2, "paper", *norms, 1e-6)),
        (latent_attention_backward_op, (randn(2, 1, 32, device=device), q.detach(), kv.detach(), out, lse, 2,
                                        "paper")),
    ]


def _grad_cases(device):
    cases = []
    for latents, scaling in ((1, "paper"), (3, "tutorial")):
        cases.append(GradCase(
            f"L={latents} {scaling}, shared query",
            lambda latent, kv, scaling=scaling: latent_attention_op(
                latent.expand(kv.shape[0], -1, -1), kv, 2, scaling)[0],
            (randn(1, latents, 2 * 16, device=device, scale=0.5, grad=True),
             randn(2, 7, 2 * 2 * 16, device=device, scale=0.5, grad=True))))
    # the k-norm bias adds q . bias to every score of a query: softmax ignores it, its gradient is exactly 0 (a
    # finite difference sees only rounding noise), so it is a fixed input here
    qw, qb, kw, kb = _norm_vectors(16, device)
    cases += [GradCase(
        f"L={latents} qk-norm",
        lambda q, kv, qw, qb, kw, kb=kb: latent_attention_op(q, kv, 2, "paper", qw, qb, kw, kb, 1e-6)[0],
        (randn(2, latents, 2 * 16, device=device, grad=True), randn(2, 7, 2 * 2 * 16, device=device, grad=True),
         *(t.detach().requires_grad_() for t in (qw, qb, kw)))) for latents in (1, 3)]
    return cases


def _examples(device, dtype, batch):
    q = shared_query(batch, 1, 3 * 8, device, dtype)
    kv = randn(batch, 11, 2 * 3 * 8, device=device, dtype=dtype)
    norms = _norm_vectors(8, device, dtype)
    return [((q, kv, 3), dict(scaling="paper")),
            ((randn(batch, 3, 3 * 8, device=device, dtype=dtype), kv, 3),
             dict(scaling="tutorial", q_norm_weight=norms[0], q_norm_bias=norms[1], k_norm_weight=norms[2],
                  k_norm_bias=norms[3]))]


def _bench(size, batch, dtype, device):
    """The MAP head's attention at the size's token grid (no cls token: SigLIP has none), one latent query."""
    n, h, d = (size["img"] // size["patch"]) ** 2, size["heads"], size["emb"] // size["heads"]
    q = shared_query(batch, 1, h * d, device, dtype)
    kv = randn(batch, n, 2 * h * d, dtype=dtype, device=device)
    qh, k, v = split_latent_heads(q, kv, h)

    def merge(o):
        return o.transpose(1, 2).reshape(batch, 1, h * d)

    def einsum():
        att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", qh, k) / math.sqrt(d), dim=-1)
        return merge(torch.einsum("bhqk,bhkd->bhqd", att, v))

    baselines = {"einsum": einsum, "sdpa": lambda: merge(F.scaled_dot_product_attention(qh, k, v))}
    yield BenchCase(lambda: latent_attention(q, kv, h), baselines, flops=4 * batch * h * n * d,
                    nbytes=kv.numel() * kv.element_size(), label="L=1")


register(OpSpec(
    name="latent_attention",
    fn=latent_attention,
    summary="MAP-pooling attention (SigLIP / timm `AttentionPoolLatent`): latent queries (a shared, expanded [1, L, "
            "E] read without a copy) over all tokens of the kv GEMM's [B, N, 2E] output, one program per (batch, "
            "head), online softmax, optional qk-norm, one-pass deterministic backward",
    kernels=(KernelGrid(LATENT_ATTENTION, FORWARD_VARIANTS), KernelGrid(LATENT_ATTENTION_BACKWARD, BACKWARD_VARIANTS)),
    custom_ops=(latent_attention_op, latent_attention_backward_op),
    opcheck_samples=_opcheck_samples,
    grad_cases=_grad_cases,
    examples=_examples,
    bench=_bench,
))
