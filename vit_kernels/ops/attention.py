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

Optional qk-norm and 2D RoPE, in timm's (Eva) order: q and k rows are each normalized over head_dim
(LayerNorm or RMSNorm, fp32 statistics, their own weight/bias), then rotated (``x cos + rot(x) sin``, pairs
(2i, 2i+1) for the ``"interleaved"`` layout of EVA-02, (i, i + D/2) for the ``"half"`` layout of DINOv3) with
host-built cos/sin tables [N, D] or [heads, N, D] (prefix tokens hold cos 1, sin 0). Both happen in registers
as q/k tiles are loaded, forward and backward: no pass over q/k and no transformed copy in memory. Backward
applies the transposes to dQ/dK where they are stored and writes per-program partial dW/dB sums.
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
from .launch import Tuned, cdiv, config, dot_precision, launch_grid, new_output, row_major
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_allowed_keys, tl_apply_dropout, tl_dropout_keep, tl_qkv_bases, tl_query_tile

LAYOUTS = ("h d qkv", "qkv h d")
LOG2E = 1.4426950408889634

MAX_HEAD_DIM = 256  # one head's q, k and v rows live in registers


# --- qk-norm and RoPE on q/k tiles in registers -----------------------------------------------------------------
# q.k is invariant under a common permutation of the head-dim columns, so with qk-norm/RoPE on, q and k rows are
# held as two half tiles a, b [rows, HALF] where b[:, i] is the RoPE partner of a[:, i]: the rotation is then
# elementwise (no register shuffle), scores are dot(q_a, k_a^T) + dot(q_b, k_b^T) and dQ/dK accumulate per
# half. v and the output keep the plain column order.
@triton.jit
def tl_qk_columns(D: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr):
    """(d_a, d_b, real_a, real_b): the head-dim index of each column of the half tiles and whether it is real.
    Pairs (2i, 2i+1) for interleaved RoPE (ROPE=1), (i, i + D/2) for half RoPE (ROPE=2) and without RoPE."""
    i = tl.arange(0, HALF)
    if ROPE == 1:
        return 2 * i, 2 * i + 1, 2 * i < D, 2 * i + 1 < D
    SPLIT: tl.constexpr = (D + 1) // 2
    return i, i + SPLIT, i < SPLIT, i + SPLIT < D


@triton.jit
def tl_qk_norm(xa, xb, da, db, a_ok, b_ok, w_ptr, bias_ptr, eps, D: tl.constexpr, QK_NORM: tl.constexpr,
               NORM_WEIGHT: tl.constexpr, NORM_BIAS: tl.constexpr):
    """(y_a, y_b, x_hat_a, x_hat_b, rstd) of the fp32 half tiles xa, xb (zeros in unreal columns): LayerNorm
    (QK_NORM=1) or RMSNorm (QK_NORM=2) over the D real columns; y = x_hat * w + b."""
    if QK_NORM == 1:
        mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / D
        xa = tl.where(a_ok[None, :], xa - mean[:, None], 0.0)
        xb = tl.where(b_ok[None, :], xb - mean[:, None], 0.0)
    rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / D + eps)
    xa = xa * rstd[:, None]
    xb = xb * rstd[:, None]
    ya, yb = xa, xb
    if NORM_WEIGHT:
        ya = ya * tl.load(w_ptr + da, mask=a_ok, other=0.0).to(tl.float32)[None, :]
        yb = yb * tl.load(w_ptr + db, mask=b_ok, other=0.0).to(tl.float32)[None, :]
    if NORM_BIAS:
        ya = ya + tl.load(bias_ptr + da, mask=a_ok, other=0.0).to(tl.float32)[None, :]
        yb = yb + tl.load(bias_ptr + db, mask=b_ok, other=0.0).to(tl.float32)[None, :]
    return ya, yb, xa, xb, rstd


@triton.jit
def tl_qk_rows(base, rows, row_ok, off_a, off_b, da, db, a_ok, b_ok, stride_n, w_ptr, bias_ptr, cos_ptr, sin_ptr,
               stride_rn, eps, D: tl.constexpr, QK_NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr,
               NORM_BIAS: tl.constexpr, ROPE: tl.constexpr):
    """q or k rows as attention uses them, as fp32 half tiles (z_a, z_b): loaded raw (feature offsets off_a,
    off_b), normalized, then rotated: z = y cos + rot(y) sin, i.e. z_a = y_a cos_a - y_b sin_a and
    z_b = y_b cos_b + y_a sin_b. cos_ptr/sin_ptr point at this head's table."""
    ok_a, ok_b = row_ok[:, None] & a_ok[None, :], row_ok[:, None] & b_ok[None, :]
    row_off = rows[:, None] * stride_n
    ya = tl.load(base + row_off + off_a[None, :], mask=ok_a, other=0.0).to(tl.float32)
    yb = tl.load(base + row_off + off_b[None, :], mask=ok_b, other=0.0).to(tl.float32)
    if QK_NORM:
        ya, yb, _, _, _ = tl_qk_norm(ya, yb, da, db, a_ok, b_ok, w_ptr, bias_ptr, eps, D, QK_NORM, NORM_WEIGHT,
                                     NORM_BIAS)
    if ROPE:
        ta, tb = rows[:, None] * stride_rn + da[None, :], rows[:, None] * stride_rn + db[None, :]
        za = ya * tl.load(cos_ptr + ta, mask=ok_a, other=0.0) - yb * tl.load(sin_ptr + ta, mask=ok_a, other=0.0)
        zb = yb * tl.load(cos_ptr + tb, mask=ok_b, other=0.0) + ya * tl.load(sin_ptr + tb, mask=ok_b, other=0.0)
        return za, zb
    return ya, yb


@triton.jit
def tl_qk_dot(qa, qb, ka, kb, DOT_PRECISION: tl.constexpr):
    """Unscaled scores [rows of q, rows of k], fp32, from half tiles: q_a k_a^T + q_b k_b^T."""
    s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return tl.dot(qb, tl.trans(kb), s, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def tl_qk_rows_grad(dza, dzb, base, rows, row_ok, off_a, off_b, da, db, a_ok, b_ok, stride_n, w_ptr, bias_ptr,
                    cos_ptr, sin_ptr, stride_rn, eps, dnorm_ptr, D: tl.constexpr, QK_NORM: tl.constexpr,
                    NORM_WEIGHT: tl.constexpr, NORM_BIAS: tl.constexpr, ROPE: tl.constexpr):
    """The gradient w.r.t. the raw rows (half tiles) from (dz_a, dz_b), the one w.r.t. tl_qk_rows' result.
    Writes this program's dW, dB partial sums over its rows to dnorm_ptr[0, d], dnorm_ptr[1, d]."""
    ok_a, ok_b = row_ok[:, None] & a_ok[None, :], row_ok[:, None] & b_ok[None, :]
    if ROPE:  # the rotation's transpose: dy_a = dz_a cos_a + dz_b sin_b, dy_b = dz_b cos_b - dz_a sin_a
        ta, tb = rows[:, None] * stride_rn + da[None, :], rows[:, None] * stride_rn + db[None, :]
        dya = dza * tl.load(cos_ptr + ta, mask=ok_a, other=0.0) + dzb * tl.load(sin_ptr + tb, mask=ok_b, other=0.0)
        dzb = dzb * tl.load(cos_ptr + tb, mask=ok_b, other=0.0) - dza * tl.load(sin_ptr + ta, mask=ok_a, other=0.0)
        dza = dya
    if QK_NORM:  # statistics recomputed from the raw rows (cheaper than keeping them live through the loop)
        row_off = rows[:, None] * stride_n
        xa = tl.load(base + row_off + off_a[None, :], mask=ok_a, other=0.0).to(tl.float32)
        xb = tl.load(base + row_off + off_b[None, :], mask=ok_b, other=0.0).to(tl.float32)
        _, _, xa, xb, rstd = tl_qk_norm(xa, xb, da, db, a_ok, b_ok, w_ptr, bias_ptr, eps, D, QK_NORM, NORM_WEIGHT,
                                        NORM_BIAS)
        # rows past N have dz = 0 (P = 0 there) and x_hat = 0: they add nothing to the partial sums
        if NORM_BIAS:
            tl.store(dnorm_ptr + D + da, tl.sum(dza, axis=0), mask=a_ok)
            tl.store(dnorm_ptr + D + db, tl.sum(dzb, axis=0), mask=b_ok)
        if NORM_WEIGHT:
            tl.store(dnorm_ptr + da, tl.sum(dza * xa, axis=0), mask=a_ok)
            tl.store(dnorm_ptr + db, tl.sum(dzb * xb, axis=0), mask=b_ok)
            dza = dza * tl.load(w_ptr + da, mask=a_ok, other=0.0).to(tl.float32)[None, :]
            dzb = dzb * tl.load(w_ptr + db, mask=b_ok, other=0.0).to(tl.float32)[None, :]
        # g = dz (times w) is zero in unreal columns: sums over the tiles are sums over D
        # LayerNorm: dx = rstd (g - mean(g) - x_hat mean(g x_hat)); RMSNorm: without mean(g)
        proj = (tl.sum(dza * xa, axis=1) + tl.sum(dzb * xb, axis=1)) / D
        if QK_NORM == 1:
            shift = (tl.sum(dza, axis=1) + tl.sum(dzb, axis=1)) / D
            dza -= shift[:, None]
            dzb -= shift[:, None]
        dza = (dza - xa * proj[:, None]) * rstd[:, None]
        dzb = (dzb - xb * proj[:, None]) * rstd[:, None]
    return dza, dzb


@triton.jit
def tl_qk_setup(qkv_ptr, b, h, E, stride_b, cos_ptr, sin_ptr, stride_rh, D: tl.constexpr, INTERLEAVED: tl.constexpr,
                ROPE: tl.constexpr, HALF: tl.constexpr):
    """The half tiles' head-dim indices, real-column flags and qkv feature offsets, this head's RoPE tables
    (stride_rh = 0 for a table shared by all heads) and its q base pointer."""
    d1, d2, ok1, ok2 = tl_qk_columns(D, ROPE, HALF)
    q_base, _, _, off1 = tl_qkv_bases(qkv_ptr, b, h, E, stride_b, d1, D, INTERLEAVED)
    _, _, _, off2 = tl_qkv_bases(qkv_ptr, b, h, E, stride_b, d2, D, INTERLEAVED)
    return d1, d2, ok1, ok2, off1, off2, cos_ptr + h * stride_rh, sin_ptr + h * stride_rh, q_base


@triton.jit
def tl_softmax_step(acc, m_i, l_i, s, cols, offs_m, v_base, d_off, d_mask, N, stride_n, seed, dropout_p, keep_scale,
                    bh, EVEN: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax: s holds the tile's scores, scaled into log2 units (log2(e) is
    folded into qk_scale: exp2 is the fast exponential), -inf where not allowed. EVEN: every column is a key."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows that have seen no allowed key yet keep m = -inf; subtract 0 there to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_mask = d_mask[None, :] if EVEN else (cols[:, None] < N) & d_mask[None, :]
    v = tl.load(v_base + cols[:, None] * stride_n + d_off[None, :], mask=v_mask, other=0.0)
    if DROPOUT:
        p = tl_apply_dropout(p, seed, offs_m, cols, bh, dropout_p, keep_scale)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return acc, m_new, l_i


@triton.jit
def tl_attend_keys(acc, m_i, l_i, q, cols, offs_m, row_ok, k_base, v_base, d_off, d_mask, mask_rows, N, stride_n,
                   qk_scale, seed, dropout_p, keep_scale, bh, EVEN: tl.constexpr, HAS_MASK: tl.constexpr,
                   DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The key tile ``cols`` (any width) for the plain q: scores, then the softmax step. EVEN (every column a
    key, the tile inside N): no bounds checks, and without a mask no -inf select at all."""
    k_mask = d_mask[:, None] if EVEN else (cols[None, :] < N) & d_mask[:, None]
    k_t = tl.load(k_base + cols[None, :] * stride_n + d_off[:, None], mask=k_mask, other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
    if HAS_MASK or not EVEN:
        s = tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s, float("-inf"))
    return tl_softmax_step(acc, m_i, l_i, s, cols, offs_m, v_base, d_off, d_mask, N, stride_n, seed, dropout_p,
                           keep_scale, bh, EVEN, DROPOUT, DOT_PRECISION)


# --- one program per (batch, head): K and V loaded once, every query tile served from them ------------------
# For N <= RESIDENT_MAX_N the keys are held as up to three power-of-two pieces A, B, C (N rounded up to 16 =
# A + B + C, e.g. 197 -> 128 + 64 + 16): every query tile's scores over all keys exist at once, so the softmax
# is exact in one step (no running max, no rescale) and only the last piece is bounds-checked.
@triton.jit
def tl_resident_keys(k_base, v_base, start, d_off, d_mask, N, stride_n, WIDTH: tl.constexpr, LAST: tl.constexpr):
    """(key indices, K^T [BLOCK_D, WIDTH], V [WIDTH, BLOCK_D]) of keys start .. start + WIDTH; LAST: the piece
    that crosses N (bounds-checked)."""
    cols = start + tl.arange(0, WIDTH)
    ok = (cols[:, None] < N) & d_mask[None, :] if LAST else d_mask[None, :]
    rows = cols[:, None] * stride_n + d_off[None, :]
    return cols, tl.trans(tl.load(k_base + rows, mask=ok, other=0.0)), tl.load(v_base + rows, mask=ok, other=0.0)


@triton.jit
def tl_piece_scores(q, k_t, cols, mask_rows, row_ok, N, qk_scale, HAS_MASK: tl.constexpr, LAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Scores of q against one key piece in log2 units, -inf where a key is masked or (LAST) past N."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
    if HAS_MASK or LAST:
        s = tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s, float("-inf"))
    return s


@triton.jit
def tl_piece_values(acc, s, m, v, rows, cols, seed, dropout_p, keep_scale, bh, DROPOUT: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """(acc + P V, the piece's row sums of P) with P = exp2(s - m) (undropped sums: the normalizer)."""
    p = tl.exp2(s - m[:, None])
    total = tl.sum(p, axis=1)
    if DROPOUT:
        p = tl_apply_dropout(p, seed, rows, cols, bh, dropout_p, keep_scale)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32), total


@triton.jit
def tl_resident_rows(rows, q_base, mask_head, out_rows, lse_rows, d_off, d_mask, offs_d, N, stride_n, stride_mq,
                     stride_on, qk_scale, out_scale, seed, dropout_p, keep_scale, bh, k_base, v_base,
                     KV_A: tl.constexpr, KV_B: tl.constexpr, KV_C: tl.constexpr, CHECKED: tl.constexpr,
                     HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """Attention of the query rows ``rows`` (CHECKED: some may be past N) over the key pieces (KV_B/KV_C = 0:
    absent). The piece loads do not depend on the rows: the compiler keeps them resident across the query
    loop (hoisted), so K and V are read once per program."""
    row_ok = rows < N
    q_ok = row_ok[:, None] & d_mask[None, :] if CHECKED else d_mask[None, :]
    q = tl.load(q_base + rows[:, None] * stride_n + d_off[None, :], mask=q_ok, other=0.0)
    mask_rows = mask_head + rows[:, None].to(tl.int64) * stride_mq
    cols_a, k_a, v_a = tl_resident_keys(k_base, v_base, 0, d_off, d_mask, N, stride_n, KV_A, KV_B == 0)
    if KV_B > 0:
        cols_b, k_b, v_b = tl_resident_keys(k_base, v_base, KV_A, d_off, d_mask, N, stride_n, KV_B, KV_C == 0)
    if KV_C > 0:
        cols_c, k_c, v_c = tl_resident_keys(k_base, v_base, KV_A + KV_B, d_off, d_mask, N, stride_n, KV_C, True)
    s_a = tl_piece_scores(q, k_a, cols_a, mask_rows, row_ok, N, qk_scale, HAS_MASK, KV_B == 0, DOT_PRECISION)
    m = tl.max(s_a, axis=1)
    if KV_B > 0:
        s_b = tl_piece_scores(q, k_b, cols_b, mask_rows, row_ok, N, qk_scale, HAS_MASK, KV_C == 0, DOT_PRECISION)
        m = tl.maximum(m, tl.max(s_b, axis=1))
    if KV_C > 0:
        s_c = tl_piece_scores(q, k_c, cols_c, mask_rows, row_ok, N, qk_scale, HAS_MASK, True, DOT_PRECISION)
        m = tl.maximum(m, tl.max(s_c, axis=1))
    m = tl.where(m == float("-inf"), 0.0, m)  # a row with no allowed key: P = 0 everywhere, not NaN
    acc = tl.zeros((rows.shape[0], BLOCK_D), dtype=tl.float32)
    acc, l_i = tl_piece_values(acc, s_a, m, v_a, rows, cols_a, seed, dropout_p, keep_scale, bh, DROPOUT,
                               DOT_PRECISION)
    if KV_B > 0:
        acc, l_b = tl_piece_values(acc, s_b, m, v_b, rows, cols_b, seed, dropout_p, keep_scale, bh, DROPOUT,
                                   DOT_PRECISION)
        l_i += l_b
    if KV_C > 0:
        acc, l_c = tl_piece_values(acc, s_c, m, v_c, rows, cols_c, seed, dropout_p, keep_scale, bh, DROPOUT,
                                   DOT_PRECISION)
        l_i += l_c
    out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    o_ok = row_ok[:, None] & d_mask[None, :] if CHECKED else d_mask[None, :]
    tl.store(out_rows + rows[:, None] * stride_on + offs_d[None, :], out.to(out_rows.dtype.element_ty), mask=o_ok)
    if STORE_LSE:  # as the tiled kernel: m + log2(l), -inf for a row with nothing to attend to
        lse = tl.where(l_i == 0.0, float("-inf"), m + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_rows + rows, lse, mask=row_ok)


@triton.jit
def tl_attention_resident(qkv_ptr, mask_ptr, out_ptr, lse_ptr, N, H, E, qk_scale, out_scale, seed, dropout_p,
                          keep_scale, stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_ob, stride_on,
                          D: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                          STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr, TAIL_M: tl.constexpr, Q_SPLIT: tl.constexpr, KV_A: tl.constexpr,
                          KV_B: tl.constexpr, KV_C: tl.constexpr):
    """Program (batch x head) * Q_SPLIT + part: loads the head's K and V pieces once, then serves query tiles
    part, part + Q_SPLIT, ...: whole BLOCK_M tiles without bounds checks, the last N % BLOCK_M queries in
    TAIL_M-row tiles."""
    pid = tl.program_id(0)
    bh = pid // Q_SPLIT
    part = pid % Q_SPLIT
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_base, k_base, v_base, d_off = tl_qkv_bases(qkv_ptr, b, h, E, stride_b, offs_d, D, INTERLEAVED)
    mask_head = mask_ptr + b * stride_mb + h * stride_mh
    out_rows = out_ptr + b * stride_ob + h * D
    lse_rows = lse_ptr + bh.to(tl.int64) * N
    body_end = N - N % BLOCK_M
    for start in range(part * BLOCK_M, body_end, Q_SPLIT * BLOCK_M):
        tl_resident_rows(start + tl.arange(0, BLOCK_M), q_base, mask_head, out_rows, lse_rows, d_off, d_mask,
                         offs_d, N, stride_n, stride_mq, stride_on, qk_scale, out_scale, seed, dropout_p,
                         keep_scale, bh, k_base, v_base, KV_A, KV_B, KV_C, False,
                         HAS_MASK, DROPOUT, STORE_LSE, DOT_PRECISION, BLOCK_D)
    for start in range(body_end + part * TAIL_M, N, Q_SPLIT * TAIL_M):
        tl_resident_rows(start + tl.arange(0, TAIL_M), q_base, mask_head, out_rows, lse_rows, d_off, d_mask,
                         offs_d, N, stride_n, stride_mq, stride_on, qk_scale, out_scale, seed, dropout_p,
                         keep_scale, bh, k_base, v_base, KV_A, KV_B, KV_C, True,
                         HAS_MASK, DROPOUT, STORE_LSE, DOT_PRECISION, BLOCK_D)


@triton.jit(do_not_specialize=["seed"])
def _attention_fwd_kernel(qkv_ptr, mask_ptr, out_ptr, lse_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr,
                          N, H, E, qk_scale, out_scale, eps, seed, dropout_p, keep_scale,
                          stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_ob, stride_on, stride_rh,
                          stride_rn,
                          D: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                          STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          QK_NORM: tl.constexpr = 0, NORM_WEIGHT: tl.constexpr = False,
                          NORM_BIAS: tl.constexpr = False, ROPE: tl.constexpr = 0, TAIL_N: tl.constexpr = 0,
                          RESIDENT: tl.constexpr = False, TAIL_M: tl.constexpr = 16, Q_SPLIT: tl.constexpr = 1,
                          KV_A: tl.constexpr = 0, KV_B: tl.constexpr = 0, KV_C: tl.constexpr = 0):
    """QK_NORM: 0 off, 1 LayerNorm, 2 RMSNorm (NORM_WEIGHT/NORM_BIAS: parameters given); ROPE: 0 off,
    1 interleaved, 2 half. q and k are then transformed as loaded (see tl_qk_columns).
    TAIL_N (plain q and k only): the keys in whole BLOCK_N tiles with no bounds checks, the rest in TAIL_N-wide
    tiles: at N = 197 and BLOCK_N = 64, 208 key columns computed instead of 256.
    RESIDENT (plain q and k, N <= RESIDENT_MAX_N; the host passes the key pieces KV_A/B/C): one program per
    (batch, head) and Q_SPLIT part (see tl_attention_resident); BLOCK_N is unused."""
    if RESIDENT:
        tl_attention_resident(qkv_ptr, mask_ptr, out_ptr, lse_ptr, N, H, E, qk_scale, out_scale, seed, dropout_p,
                              keep_scale, stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_ob, stride_on,
                              D, INTERLEAVED, HAS_MASK, DROPOUT, STORE_LSE, DOT_PRECISION, BLOCK_M, BLOCK_D, TAIL_M,
                              Q_SPLIT, KV_A, KV_B, KV_C)
        return
    bh, b, h, offs_m, row_ok, q, k_base, v_base, d_off, d_mask, mask_rows = tl_query_tile(
        qkv_ptr, mask_ptr, N, H, E, stride_b, stride_n, stride_mb, stride_mh, stride_mq, D, INTERLEAVED, BLOCK_M,
        BLOCK_D)
    if QK_NORM or ROPE:  # tl_query_tile's plain q is then unused
        HALF: tl.constexpr = BLOCK_D // 2 if BLOCK_D > 16 else 16  # tl.dot needs >= 16
        dtype = qkv_ptr.dtype.element_ty
        d1, d2, ok1, ok2, off1, off2, cos_ptr, sin_ptr, q_base = tl_qk_setup(
            qkv_ptr, b, h, E, stride_b, cos_ptr, sin_ptr, stride_rh, D, INTERLEAVED, ROPE, HALF)
        q1, q2 = tl_qk_rows(q_base, offs_m, row_ok, off1, off2, d1, d2, ok1, ok2,
                            stride_n, qw_ptr, qb_ptr, cos_ptr, sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT,
                            NORM_BIAS, ROPE)
        q1, q2 = q1.to(dtype), q2.to(dtype)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    if TAIL_N:  # whole key tiles with no bounds checks, then the last N % BLOCK_N keys in narrow tiles
        body_end = N - N % BLOCK_N
        for start in range(0, body_end, BLOCK_N):
            acc, m_i, l_i = tl_attend_keys(acc, m_i, l_i, q, start + offs_n, offs_m, row_ok, k_base, v_base, d_off,
                                           d_mask, mask_rows, N, stride_n, qk_scale, seed, dropout_p, keep_scale, bh,
                                           True, HAS_MASK, DROPOUT, DOT_PRECISION)
        for start in range(body_end, N, TAIL_N):
            acc, m_i, l_i = tl_attend_keys(acc, m_i, l_i, q, start + tl.arange(0, TAIL_N), offs_m, row_ok, k_base,
                                           v_base, d_off, d_mask, mask_rows, N, stride_n, qk_scale, seed, dropout_p,
                                           keep_scale, bh, False, HAS_MASK, DROPOUT, DOT_PRECISION)
    else:
        for start in range(0, N, BLOCK_N):
            cols = start + offs_n
            if QK_NORM or ROPE:
                k1, k2 = tl_qk_rows(k_base, cols, cols < N, off1, off2, d1, d2, ok1, ok2, stride_n, kw_ptr, kb_ptr,
                                    cos_ptr, sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
                s = tl_qk_dot(q1, q2, k1.to(dtype), k2.to(dtype), DOT_PRECISION)
                s = tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), s * qk_scale, float("-inf"))
                acc, m_i, l_i = tl_softmax_step(acc, m_i, l_i, s, cols, offs_m, v_base, d_off, d_mask, N, stride_n,
                                                seed, dropout_p, keep_scale, bh, False, DROPOUT, DOT_PRECISION)
            else:
                acc, m_i, l_i = tl_attend_keys(acc, m_i, l_i, q, cols, offs_m, row_ok, k_base, v_base, d_off,
                                               d_mask, mask_rows, N, stride_n, qk_scale, seed, dropout_p, keep_scale,
                                               bh, False, HAS_MASK, DROPOUT, DOT_PRECISION)

    # a fully masked row has l = 0 and acc = 0: write zeros
    out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    out_ptrs = out_ptr + b * stride_ob + offs_m[:, None] * stride_on + h * D + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    if STORE_LSE:  # log2-domain log-sum-exp for backward; -inf marks a row with nothing to attend to
        tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def tl_probabilities(s, lse, mask_rows, row_ok, cols, N, qk_scale, HAS_MASK: tl.constexpr):
    """Recomputed softmax probabilities P [rows, cols] from the unscaled scores and the saved log-sum-exp
    (0 where masked)."""
    p = tl.exp2(s * qk_scale - lse[:, None])
    return tl.where(tl_allowed_keys(mask_rows, row_ok, cols, N, HAS_MASK), p, 0.0)


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dqkv_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr,
                          cos_ptr, sin_ptr, dnorm_ptr, N, H, E, qk_scale, out_scale, score_scale, eps, seed,
                          dropout_p, keep_scale, stride_b, stride_n, stride_mb, stride_mh, stride_mq, stride_dob,
                          stride_don, stride_gb, stride_gn, stride_rh, stride_rn, D: tl.constexpr,
                          INTERLEAVED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                          DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          QK_NORM: tl.constexpr = 0, NORM_WEIGHT: tl.constexpr = False,
                          NORM_BIAS: tl.constexpr = False, ROPE: tl.constexpr = 0):
    """FlashAttention-2 backward, recomputing P from the log-sum-exp. DQ=False: one program per key tile,
    looping over queries, accumulates dK and dV; DQ=True: one program per query tile accumulates dQ. Two
    passes and no atomics: deterministic. Gradients land in the qkv buffer's own layout.
    With O = out_scale * Z(P) V, Z the dropout (mask / (1 - p), regenerated from the seed):
    dV = out_scale Z(P)^T dO,  dP = out_scale Z(dO V^T),  dS = P (dP - rowsum(dO * O)),
    dQ = score_scale dS K,  dK = score_scale dS^T Q.
    With qk-norm/RoPE (flags as in the forward), Q and K are the transformed rows (half tiles), recomputed as
    loaded; the transposes of RoPE and the norm are applied where dQ (dK) is stored, and the program writes
    the partial dW, dB sums of q's (k's) norm over its rows to dnorm_ptr[pid] ([programs, 2, D])."""
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
    if QK_NORM or ROPE:
        HALF: tl.constexpr = BLOCK_D // 2 if BLOCK_D > 16 else 16
        dtype = qkv_ptr.dtype.element_ty
        d1, d2, ok1, ok2, off1, off2, cos_ptr, sin_ptr, _ = tl_qk_setup(
            qkv_ptr, b, h, E, stride_b, cos_ptr, sin_ptr, stride_rh, D, INTERLEAVED, ROPE, HALF)
        dnorm_ptr += pid.to(tl.int64) * 2 * D
    if DQ:
        if QK_NORM or ROPE:
            q1, q2 = tl_qk_rows(q_base, tile, tile_ok, off1, off2, d1, d2, ok1, ok2, stride_n, qw_ptr, qb_ptr,
                                cos_ptr, sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
            q1, q2 = q1.to(dtype), q2.to(dtype)
            dq1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
            dq2 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        else:
            q = tl.load(q_base + tile[:, None] * stride_n + d_off[None, :], mask=tile_ok[:, None] & d_mask[None, :],
                        other=0.0)
            dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        do = tl.load(do_base + tile[:, None] * stride_don + offs_d[None, :], mask=tile_ok[:, None] & d_mask[None, :],
                     other=0.0)
        lse = tl.load(lse_ptr + stats + tile, mask=tile_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # no allowed key: P = 0
        delta = tl.load(delta_ptr + stats + tile, mask=tile_ok, other=0.0)
        mask_rows = mask_head + tile[:, None].to(tl.int64) * stride_mq
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kv_mask = (cols[:, None] < N) & d_mask[None, :]
            if QK_NORM or ROPE:
                k1, k2 = tl_qk_rows(k_base, cols, cols < N, off1, off2, d1, d2, ok1, ok2, stride_n, kw_ptr, kb_ptr,
                                    cos_ptr, sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
                k1, k2 = k1.to(dtype), k2.to(dtype)
                s = tl_qk_dot(q1, q2, k1, k2, DOT_PRECISION)
            else:
                k = tl.load(k_base + cols[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=tl.float32)
            v = tl.load(v_base + cols[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
            p = tl_probabilities(s, lse, mask_rows, tile_ok, cols, N, qk_scale, HAS_MASK)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=tl.float32) * out_scale
            if DROPOUT:
                dp = tl_apply_dropout(dp, seed, tile, cols, bh, dropout_p, keep_scale)
            ds = p * (dp - delta[:, None])
            if QK_NORM or ROPE:
                dq1 = tl.dot(ds.to(dtype), k1, dq1, input_precision=DOT_PRECISION, out_dtype=tl.float32)
                dq2 = tl.dot(ds.to(dtype), k2, dq2, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            else:
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if QK_NORM or ROPE:
            dq1, dq2 = tl_qk_rows_grad(dq1 * score_scale, dq2 * score_scale, q_base, tile, tile_ok, off1, off2, d1,
                                       d2, ok1, ok2, stride_n, qw_ptr, qb_ptr, cos_ptr, sin_ptr, stride_rn, eps,
                                       dnorm_ptr, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
            g_rows = gq_base + tile[:, None] * stride_gn
            tl.store(g_rows + off1[None, :], dq1.to(dqkv_ptr.dtype.element_ty), mask=tile_ok[:, None] & ok1[None, :])
            tl.store(g_rows + off2[None, :], dq2.to(dqkv_ptr.dtype.element_ty), mask=tile_ok[:, None] & ok2[None, :])
        else:
            tl.store(gq_base + tile[:, None] * stride_gn + d_off[None, :], (dq * score_scale).to(
                dqkv_ptr.dtype.element_ty), mask=tile_ok[:, None] & d_mask[None, :])
    else:
        kv_mask = tile_ok[:, None] & d_mask[None, :]
        if QK_NORM or ROPE:
            k1, k2 = tl_qk_rows(k_base, tile, tile_ok, off1, off2, d1, d2, ok1, ok2, stride_n, kw_ptr, kb_ptr,
                                cos_ptr, sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
            k1, k2 = k1.to(dtype), k2.to(dtype)
            dk1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
            dk2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        else:
            k = tl.load(k_base + tile[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
            dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        v = tl.load(v_base + tile[:, None] * stride_n + d_off[None, :], mask=kv_mask, other=0.0)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q_mask = row_ok[:, None] & d_mask[None, :]
            if QK_NORM or ROPE:
                q1, q2 = tl_qk_rows(q_base, rows, row_ok, off1, off2, d1, d2, ok1, ok2, stride_n, qw_ptr, qb_ptr,
                                    cos_ptr, sin_ptr, stride_rn, eps, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
                q1, q2 = q1.to(dtype), q2.to(dtype)
                s = tl_qk_dot(q1, q2, k1, k2, DOT_PRECISION)
            else:
                q = tl.load(q_base + rows[:, None] * stride_n + d_off[None, :], mask=q_mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=tl.float32)
            do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
            mask_rows = mask_head + rows[:, None].to(tl.int64) * stride_mq
            p = tl_probabilities(s, lse, mask_rows, row_ok, tile, N, qk_scale, HAS_MASK)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=tl.float32) * out_scale
            if DROPOUT:
                keep = tl_dropout_keep(seed, rows, tile, bh, dropout_p)
                dv = tl.dot(tl.trans(tl.where(keep, p * keep_scale, 0.0).to(do.dtype)), do, dv,
                            input_precision=DOT_PRECISION, out_dtype=tl.float32)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            else:
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            ds = p * (dp - delta[:, None])
            if QK_NORM or ROPE:
                ds_t = tl.trans(ds.to(dtype))
                dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PRECISION, out_dtype=tl.float32)
                dk2 = tl.dot(ds_t, q2, dk2, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            else:
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if QK_NORM or ROPE:
            dk1, dk2 = tl_qk_rows_grad(dk1 * score_scale, dk2 * score_scale, k_base, tile, tile_ok, off1, off2, d1,
                                       d2, ok1, ok2, stride_n, kw_ptr, kb_ptr, cos_ptr, sin_ptr, stride_rn, eps,
                                       dnorm_ptr, D, QK_NORM, NORM_WEIGHT, NORM_BIAS, ROPE)
            g_rows = gk_base + tile[:, None] * stride_gn
            tl.store(g_rows + off1[None, :], dk1.to(dqkv_ptr.dtype.element_ty), mask=tile_ok[:, None] & ok1[None, :])
            tl.store(g_rows + off2[None, :], dk2.to(dqkv_ptr.dtype.element_ty), mask=tile_ok[:, None] & ok2[None, :])
        else:
            tl.store(gk_base + tile[:, None] * stride_gn + d_off[None, :], (dk * score_scale).to(
                dqkv_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(gv_base + tile[:, None] * stride_gn + d_off[None, :], (dv * out_scale).to(
            dqkv_ptr.dtype.element_ty), mask=kv_mask)


def transforms_qk(flags: dict) -> bool:
    return bool(flags.get("QK_NORM") or flags.get("ROPE"))


# the keys one program holds spill-free (compile check, sm_90, head_dim <= 64): 208 with 4 warps (ViT-B/16's
# 197), 272 with 8 (ViT-L/14's 257, 261 with registers)
RESIDENT_KEYS = {4: 208, 8: 272}
RESIDENT_MAX_N = max(RESIDENT_KEYS.values())
RESIDENT_MAX_D = 64


def resident_pieces(tokens: int) -> dict:
    """KV_A/KV_B/KV_C for the resident tiling: ``tokens`` rounded up to 16 split into at most three power-of-two
    pieces, the last rounded up (197 -> 128 + 64 + 16, 240 -> 128 + 64 + 64); all 0 past RESIDENT_MAX_N."""
    pieces = []
    rest = cdiv(tokens, 16) * 16 if 0 < tokens <= RESIDENT_MAX_N else 0
    while rest and len(pieces) < 3:
        piece = triton.next_power_of_2(rest) if len(pieces) == 2 else 1 << (rest.bit_length() - 1)
        pieces.append(piece)
        rest = max(0, rest - piece)
    pieces += [0] * (3 - len(pieces))
    return dict(KV_A=pieces[0], KV_B=pieces[1], KV_C=pieces[2])


def forward_fits(meta: dict, flags: dict) -> bool:
    """Forward tilings that compile spill-free (compile check, sm_80/sm_90): 128-wide key tiles spill with a
    mask tile, head_dim > 64 or dropout's Philox. With qk-norm/RoPE every key tile is transformed in registers:
    128 x 64 for head_dim <= 64, 32-wide key tiles (their own configs) above. The resident tiling: plain q/k,
    head_dim <= 64, at most RESIDENT_KEYS keys for its warps, no mask or dropout, the (qkv h d) layout;
    sm_90 only (resident_fits_arch)."""
    if meta.get("RESIDENT"):  # the mask's loads, Philox and the stride-3 gathers of (h d qkv) spill it
        plain = not (transforms_qk(flags) or flags.get("HAS_MASK") or flags.get("DROPOUT") or flags.get("INTERLEAVED"))
        keys = flags.get("KV_A", 0) + flags.get("KV_B", 0) + flags.get("KV_C", 0)
        fits = 0 < keys <= RESIDENT_KEYS.get(meta.get("num_warps"), RESIDENT_MAX_N)
        return plain and fits and flags.get("BLOCK_D", 0) <= RESIDENT_MAX_D
    tiles = (meta["BLOCK_M"], meta["BLOCK_N"])
    if transforms_qk(flags):
        return not meta.get("TAIL_N") and tiles in (((128, 64),) if flags.get("BLOCK_D", 0) <= 64
                                                    else ((128, 32), (64, 32)))
    heavy = flags.get("HAS_MASK") or flags.get("BLOCK_D", 0) > 64 or flags.get("DROPOUT")
    return meta["BLOCK_N"] in (64, 128) and (meta["BLOCK_N"] <= 64 or not heavy)


def resident_fits_arch(meta: dict, flags: dict, arch: int) -> bool:
    """The resident tiling holds ~250 registers per thread: spill-free on sm_90, spilling on sm_80."""
    return not meta.get("RESIDENT") or arch >= 90


def backward_fits(meta: dict, flags: dict) -> bool:
    """Backward tilings that compile spill-free (compile check, sm_80/sm_90). The stride-3 (h d qkv) gathers
    spill in 64x32 (sm_80) and 32x32 (sm_90). With qk-norm/RoPE the tile transformed inside the loop (q rows in
    the dK/dV pass, k rows in the dQ pass) is 16 rows: 16 x 32 and 64 x 16, their own configs."""
    tiles = (meta["BLOCK_M"], meta["BLOCK_N"])
    if transforms_qk(flags):
        return tiles == ((64, 16) if flags.get("DQ") else (16, 32))
    if tiles not in ((32, 64), (64, 32), (32, 32)):
        return False
    return not flags.get("INTERLEAVED") or tiles == (32, 64)


ATTENTION_TYPES = {"mask_ptr": "*i1", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "qk_scale": "fp32",
                   "out_scale": "fp32", "score_scale": "fp32", "dropout_p": "fp32", "keep_scale": "fp32",
                   "eps": "fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "dnorm_ptr": "*fp32"}
ALIGNED = ("stride_b", "stride_n", "stride_ob", "stride_on", "E")

ATTENTION = Tuned(
    "attention", _attention_fwd_kernel,
    configs=[
        config(4, 3, BLOCK_M=64, BLOCK_N=64, TAIL_N=0),
        config(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=0),
        config(8, 2, BLOCK_M=128, BLOCK_N=128, TAIL_N=0),
        config(4, 2, BLOCK_M=64, BLOCK_N=128, TAIL_N=0),
        config(8, 2, BLOCK_M=128, BLOCK_N=32, TAIL_N=0),  # qk-norm/RoPE with head_dim > 64 only
        config(8, 2, BLOCK_M=64, BLOCK_N=32, TAIL_N=0),  # likewise
        # ViT lengths (N = 197, 257): whole key tiles unchecked, the tail in narrow ones (plain q/k only)
        config(4, 3, BLOCK_M=64, BLOCK_N=64, TAIL_N=16),
        config(8, 3, BLOCK_M=128, BLOCK_N=64, TAIL_N=16),
        config(8, 2, BLOCK_M=128, BLOCK_N=128, TAIL_N=32),
        config(4, 2, BLOCK_M=64, BLOCK_N=128, TAIL_N=32),
        # ViT lengths: one program per (batch, head, Q_SPLIT part) with K and V loaded once (BLOCK_N unused)
        config(4, 1, BLOCK_M=64, BLOCK_N=64, RESIDENT=True, TAIL_M=16, Q_SPLIT=1),
        config(8, 2, BLOCK_M=64, BLOCK_N=64, RESIDENT=True, TAIL_M=16, Q_SPLIT=1),
        config(8, 1, BLOCK_M=128, BLOCK_N=64, RESIDENT=True, TAIL_M=16, Q_SPLIT=1),
        config(4, 2, BLOCK_M=64, BLOCK_N=64, RESIDENT=True, TAIL_M=16, Q_SPLIT=4),  # small batches fill the card
    ],
    key=["N", "D", "HAS_MASK", "INTERLEAVED", "DROPOUT", "QK_NORM", "ROPE"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32, TAIL_N=0),
    keep=lambda meta, flags: forward_fits(meta, flags),
    arch_keep=resident_fits_arch,
    outputs=("out_ptr", "lse_ptr"),
    pending=("attention_short", lambda meta: meta.get("TAIL_N", 0) > 0 or meta.get("RESIDENT", False)),
    arg_types=ATTENTION_TYPES, aligned=ALIGNED,
    quiet_fp=("divide",),  # log2(0) of out-of-range query rows, stored masked
)


ATTENTION_BACKWARD = Tuned(
    "attention_backward", _attention_bwd_kernel,
    # the three tilings that compile spill-free for every variant on sm_80 and sm_90 (4-warp 64x64 spills);
    # untuned on a GPU so far
    configs=[config(8, 2, BLOCK_M=32, BLOCK_N=64), config(8, 2, BLOCK_M=64, BLOCK_N=32),
             config(4, 2, BLOCK_M=32, BLOCK_N=32),
             config(8, 2, BLOCK_M=16, BLOCK_N=32), config(8, 2, BLOCK_M=64, BLOCK_N=16)],  # qk-norm/RoPE only
    key=["N", "D", "HAS_MASK", "INTERLEAVED", "DROPOUT", "DQ", "QK_NORM", "ROPE"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32),
    keep=backward_fits,
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


QK_NORMS = (None, "layer", "rms")
ROPE_LAYOUTS = ("interleaved", "half")
# the qk-norm/RoPE arguments, in the order every launcher and custom op takes them after (..., dropout, seed)
QK_ARGS = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias", "qk_norm", "qk_norm_eps", "rope_cos",
           "rope_sin", "rope_layout")


def qk_kernel_args(qkv, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, qk_norm, qk_norm_eps, rope_cos,
                   rope_sin, rope_layout) -> tuple:
    """(pointers qw, qb, kw, kb, cos, sin; eps; (stride_rh, stride_rn); constexpr flags) for the kernels.
    One NORM_WEIGHT/NORM_BIAS flag covers q and k, so a parameter given for one side only is the identity
    (ones / zeros) on the other; unused pointers point at qkv. A [N, D] table is read with head stride 0."""
    qw, qb, kw, kb = q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias
    has_w, has_b = qw is not None or kw is not None, qb is not None or kb is not None
    if has_w:
        qw, kw = (qw if qw is not None else torch.ones_like(kw)), (kw if kw is not None else torch.ones_like(qw))
    if has_b:
        qb, kb = (qb if qb is not None else torch.zeros_like(kb)), (kb if kb is not None else torch.zeros_like(qb))
    rope = rope_cos is not None
    cos, sin = (rope_cos.contiguous(), rope_sin.contiguous()) if rope else (None, None)  # one set of strides
    strides = (cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2)) if rope else (0, 0)
    flags = dict(QK_NORM=QK_NORMS.index(qk_norm), NORM_WEIGHT=has_w, NORM_BIAS=has_b,
                 ROPE=1 + ROPE_LAYOUTS.index(rope_layout) if rope else 0)
    return tuple(qkv if t is None else t for t in (qw, qb, kw, kb, cos, sin)), float(qk_norm_eps), strides, flags


def attention_launch(qkv, mask, num_heads, layout, scaling, dropout=0.0, seed=None, q_norm_weight=None,
                     q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, qk_norm=None, qk_norm_eps=1e-6,
                     rope_cos=None, rope_sin=None, rope_layout="interleaved", config=None):
    """(out [B, N, E], the fp32 log2-domain log-sum-exp [B * heads, N] that backward needs). ``mask`` is None or
    already prepared by ``contiguous_key_mask``; ``dropout`` > 0 needs a ``new_seed()`` tensor; the qk-norm /
    RoPE arguments as in ``attention``; ``config`` pins a tiling (tests)."""
    qkv = row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    if config is not None and config.kwargs.get("RESIDENT") and not 0 < N <= RESIDENT_MAX_N:
        raise ValueError(f"the resident attention tiling holds at most {RESIDENT_MAX_N} tokens, got {N}")
    out = new_output((B, N, E), qkv.device, qkv.dtype)
    lse = new_output((B * num_heads, N), qkv.device, torch.float32)
    if B * N:
        qk_scale, out_scale = scales(scaling, E, D)
        params, eps, rope_strides, qk_flags = qk_kernel_args(qkv, q_norm_weight, q_norm_bias, k_norm_weight,
                                                             k_norm_bias, qk_norm, qk_norm_eps, rope_cos, rope_sin,
                                                             rope_layout)
        ATTENTION.launch(
            lambda meta: attention_grid(B, num_heads, N, meta["BLOCK_M"], meta.get("RESIDENT") and meta["Q_SPLIT"]),
            qkv, qkv if mask is None else mask, out, lse, *params, N, num_heads, E, qk_scale, out_scale, eps,
            *dropout_args(dropout, seed), qkv.stride(0), qkv.stride(1), *mask_strides(mask), out.stride(0),
            out.stride(1), *rope_strides, D=D, INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None,
            DROPOUT=dropout > 0, STORE_LSE=True, DOT_PRECISION=dot_precision(qkv.dtype),
            BLOCK_D=head_tile(D), config=config, **qk_flags, **resident_pieces(N))
    return out, lse


MIN_TILE = 16  # no config tiles tokens finer (tl.dot's minimum): bounds the number of backward programs


def norm_grad_rows(q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias) -> int:
    """Rows of the norm-parameter gradient the backward op returns: 4 (dW_q, dB_q, dW_k, dB_k) when the norm
    has parameters, else 0."""
    return 4 if any(t is not None for t in (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)) else 0


def attention_backward(dout, qkv, out, lse, mask, num_heads, layout, scaling, dropout=0.0, seed=None,
                       q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, qk_norm=None,
                       qk_norm_eps=1e-6, rope_cos=None, rope_sin=None, rope_layout="interleaved"):
    """(d qkv [B, N, 3E] in qkv's own layout, the norm parameters' gradients fp32 [4, D] = dW_q, dB_q, dW_k,
    dB_k, or [0, D] without norm parameters) from dout [B, N, E]: two deterministic passes (dK/dV, then dQ)."""
    dout, qkv = row_major(dout), row_major(qkv)
    B, N, E3 = qkv.shape
    E = E3 // 3
    D = E // num_heads
    dqkv = new_output((B, N, E3), qkv.device, qkv.dtype)
    rows = norm_grad_rows(q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    if B * N == 0:
        return dqkv, torch.zeros((rows, D), device=qkv.device, dtype=torch.float32)
    # rowsum(dO * O) per (batch, head, query), the softmax-backward correction term
    delta = (dout.float() * out.float()).view(B, N, num_heads, D).sum(-1).transpose(1, 2).contiguous()
    qk_scale, out_scale = scales(scaling, E, D)
    params, eps, rope_strides, qk_flags = qk_kernel_args(qkv, q_norm_weight, q_norm_bias, k_norm_weight,
                                                         k_norm_bias, qk_norm, qk_norm_eps, rope_cos, rope_sin,
                                                         rope_layout)
    # per-program dW/dB partial sums of k's (dK/dV pass) and q's (dQ pass) norm: zeroed, as the autotuned tile
    # (hence the number of programs) is chosen at launch
    partials = [torch.zeros((B * num_heads * cdiv(N, MIN_TILE), 2, D), device=qkv.device,
                            dtype=torch.float32) if rows else qkv for _ in range(2)]
    for dq, dnorm in zip((False, True), partials):
        ATTENTION_BACKWARD.launch(
            lambda meta, dq=dq: attention_grid(B, num_heads, N, meta["BLOCK_M" if dq else "BLOCK_N"]),
            qkv, dout, lse, delta, qkv if mask is None else mask, dqkv, *params, dnorm, N, num_heads, E, qk_scale,
            out_scale, qk_scale / LOG2E, eps, *dropout_args(dropout, seed), qkv.stride(0), qkv.stride(1),
            *mask_strides(mask), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1), *rope_strides,
            D=D, INTERLEAVED=layout == "h d qkv", HAS_MASK=mask is not None, DROPOUT=dropout > 0, DQ=dq,
            DOT_PRECISION=dot_precision(qkv.dtype), BLOCK_D=head_tile(D), **qk_flags)
    if not rows:
        return dqkv, torch.empty((0, D), device=qkv.device, dtype=torch.float32)
    dk_params, dq_params = (part.sum(0) for part in partials)
    return dqkv, torch.cat([dq_params, dk_params])


def attention_grid(batch: int, heads: int, tokens: int, block_m: int, q_split: int = 0) -> tuple:
    """One program per (batch, head, query tile), or with ``q_split`` (the resident tiling) per (batch, head,
    part), flattened onto axis 0: batch x heads may pass 65,535."""
    return launch_grid(batch * heads * (q_split or cdiv(tokens, block_m)))


def contiguous_key_mask(mask, N):
    """A 4-D bool mask with unit stride over keys and rows padded to 16 bytes (vectorized loads); broadcast
    batch/head axes stay size 1 (read with stride 0)."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    padded = torch.zeros((m.shape[0], m.shape[1], N, cdiv(N, 16) * 16), dtype=torch.bool, device=m.device)
    padded[..., :N] = m
    return padded


def mask_strides(mask) -> tuple:
    """(batch, head, query) strides of a prepared mask; 0 on broadcast axes, and for no mask."""
    if mask is None:
        return 0, 0, 0
    return (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(2))


@torch.library.custom_op("vit_kernels::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, mask: torch.Tensor | None, num_heads: int, layout: str,
                 scaling: str, dropout: float = 0.0, seed: torch.Tensor | None = None,
                 q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
                 k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
                 qk_norm: str | None = None, qk_norm_eps: float = 1e-6, rope_cos: torch.Tensor | None = None,
                 rope_sin: torch.Tensor | None = None, rope_layout: str = "interleaved"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, log-sum-exp) as a torch.library op; ``mask`` prepared by ``contiguous_key_mask``."""
    return attention_launch(qkv, mask, num_heads, layout, scaling, dropout, seed, q_norm_weight, q_norm_bias,
                            k_norm_weight, k_norm_bias, qk_norm, qk_norm_eps, rope_cos, rope_sin, rope_layout)


@attention_op.register_fake
def _(qkv, mask, num_heads, layout, scaling, dropout=0.0, seed=None, q_norm_weight=None, q_norm_bias=None,
      k_norm_weight=None, k_norm_bias=None, qk_norm=None, qk_norm_eps=1e-6, rope_cos=None, rope_sin=None,
      rope_layout="interleaved"):
    B, N, E3 = qkv.shape
    return qkv.new_empty((B, N, E3 // 3)), qkv.new_empty((B * num_heads, N), dtype=torch.float32)


@torch.library.custom_op("vit_kernels::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          mask: torch.Tensor | None, num_heads: int, layout: str, scaling: str,
                          dropout: float = 0.0, seed: torch.Tensor | None = None,
                          q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
                          k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
                          qk_norm: str | None = None, qk_norm_eps: float = 1e-6,
                          rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None,
                          rope_layout: str = "interleaved") -> tuple[torch.Tensor, torch.Tensor]:
    """(d qkv, the norm parameters' fp32 gradients [4 or 0, head_dim]); see ``attention_backward``."""
    return attention_backward(dout, qkv, out, lse, mask, num_heads, layout, scaling, dropout, seed, q_norm_weight,
                              q_norm_bias, k_norm_weight, k_norm_bias, qk_norm, qk_norm_eps, rope_cos, rope_sin,
                              rope_layout)


@attention_backward_op.register_fake
def _(dout, qkv, out, lse, mask, num_heads, layout, scaling, dropout=0.0, seed=None, q_norm_weight=None,
      q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, qk_norm=None, qk_norm_eps=1e-6, rope_cos=None,
      rope_sin=None, rope_layout="interleaved"):
    rows = norm_grad_rows(q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    return qkv.new_empty(qkv.shape), qkv.new_empty((rows, qkv.shape[2] // 3 // num_heads), dtype=torch.float32)


def _attention_setup(ctx, inputs, output):
    qkv, mask, num_heads, layout, scaling, dropout, seed, *qk = inputs
    qw, qb, kw, kb, qk_norm, eps, cos, sin, rope_layout = qk
    ctx.save_for_backward(qkv, output[0], output[1], mask, seed, qw, qb, kw, kb, cos, sin)
    ctx.args = (num_heads, layout, scaling, dropout)
    ctx.qk_options = (qk_norm, eps, rope_layout)


def _attention_grad(ctx, dout, _dlse):
    qkv, out, lse, mask, seed, qw, qb, kw, kb, cos, sin = ctx.saved_tensors
    qk_norm, eps, rope_layout = ctx.qk_options
    dqkv, dnorm = attention_backward_op(dout, qkv, out, lse, mask, *ctx.args, seed, qw, qb, kw, kb, qk_norm, eps,
                                        cos, sin, rope_layout)
    dparams = [None if t is None else dnorm[i].to(t.dtype) for i, t in enumerate((qw, qb, kw, kb))]
    # no gradient for mask, the ints/strings, seed, eps and the rope tables
    return dqkv, None, None, None, None, None, None, *dparams, None, None, None, None, None


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


def rope_rotate(x: torch.Tensor, rope_layout: str) -> torch.Tensor:
    """timm's ``rot`` (interleaved: pairs (2i, 2i+1)) or ``rope_rotate_half`` (half: pairs (i, i + D/2))."""
    if rope_layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def qk_transform(x, weight, bias, qk_norm, eps, rope_cos, rope_sin, rope_layout):
    """q or k [B, heads, N, D] as timm's Eva attention uses them: the norm (fp32 statistics), then the rotation
    ``x cos + rot(x) sin`` (tables [N, D] or [heads, N, D]); computed in fp32 (fp64 for a float64 input) and
    returned in x's dtype."""
    if qk_norm is None and rope_cos is None:
        return x
    y = x.to(torch.promote_types(x.dtype, torch.float32))

    def cast(t):
        return None if t is None else t.to(y.dtype)

    if qk_norm == "layer":
        y = F.layer_norm(y, y.shape[-1:], cast(weight), cast(bias), eps)
    elif qk_norm == "rms":
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
        y = y if weight is None else y * cast(weight)
        y = y if bias is None else y + cast(bias)
    if rope_cos is not None:
        y = y * cast(rope_cos) + rope_rotate(y, rope_layout) * cast(rope_sin)
    return y.to(x.dtype)


def split_transformed_qkv(qkv, num_heads, layout, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                          k_norm_bias=None, qk_norm=None, qk_norm_eps=1e-6, rope_cos=None, rope_sin=None,
                          rope_layout="interleaved"):
    """``split_qkv`` with q and k through ``qk_transform`` (the PyTorch path)."""
    q, k, v = split_qkv(qkv, num_heads, layout)
    rope = (rope_cos, rope_sin, rope_layout)
    return (qk_transform(q, q_norm_weight, q_norm_bias, qk_norm, qk_norm_eps, *rope),
            qk_transform(k, k_norm_weight, k_norm_bias, qk_norm, qk_norm_eps, *rope), v)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys that the kernels compute: masked keys get 0 and a row with no allowed key is all zeros
    (its normalizer is 0: divided by 1 instead), finite in backward too; NaN/Inf propagate from allowed keys."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * mask
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total == 0, 1.0, total)


def attention_torch_probabilities(qkv, num_heads, layout="h d qkv", scaling="tutorial", mask=None, **qk):
    """softmax(qk_scale * Q K^T), [B, heads, N, N], in fp32 or fp64 for a float64 input (the PyTorch path;
    0 where masked). ``qk``: the qk-norm / RoPE keywords of ``attention``."""
    q, k, _ = split_transformed_qkv(qkv, num_heads, layout, **qk)
    E = qkv.shape[2] // 3
    energy = torch.matmul(q, k.transpose(-1, -2)) * (scales(scaling, E, E // num_heads)[0] / LOG2E)
    return masked_softmax(energy.to(torch.promote_types(energy.dtype, torch.float32)), mask)


def attention_torch(qkv, num_heads, layout="h d qkv", scaling="tutorial", mask=None, dropout=0.0, **qk):
    """The PyTorch fallback, same semantics (fully masked rows give zeros; dropout masks from torch's RNG).
    ``qk``: the qk-norm / RoPE keywords of ``attention``."""
    v = split_qkv(qkv, num_heads, layout)[2]
    B, N, E3 = qkv.shape
    out_scale = scales(scaling, E3 // 3, E3 // 3 // num_heads)[1]
    att = F.dropout(attention_torch_probabilities(qkv, num_heads, layout, scaling, mask, **qk), dropout)
    return torch.matmul(att.to(v.dtype) * out_scale, v).transpose(1, 2).reshape(B, N, E3 // 3)


def check_qk_options(qkv, num_heads, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
                     qk_norm=None, qk_norm_eps=1e-6, rope_cos=None, rope_sin=None, rope_layout="interleaved"):
    """The qk-norm / RoPE arguments of ``attention`` (qkv already checked)."""
    N, D = qkv.shape[1], qkv.shape[2] // 3 // num_heads
    params = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
                  k_norm_bias=k_norm_bias)
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
    for name, t in params.items():
        if t is None:
            continue
        if qk_norm is None:
            raise ValueError(f"{name} is given but qk_norm is None (pass qk_norm='layer' or 'rms')")
        check_tensor(name, t, dims=1)
        if t.shape[0] != D:
            raise ValueError(f"{name} has {t.shape[0]} elements, expected head_dim = {D}")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    if qk_norm == "rms":
        for side in "qk":
            if params[f"{side}_norm_bias"] is not None and params[f"{side}_norm_weight"] is None:
                raise ValueError(f"{side}_norm_bias without {side}_norm_weight: qk_norm='rms' has no bias of its "
                                 "own (RMSNorm is x * rsqrt(mean(x^2) + eps) * weight)")
    if isinstance(qk_norm_eps, bool) or not isinstance(qk_norm_eps, (int, float)) or not 0 <= qk_norm_eps < math.inf:
        raise ValueError(f"qk_norm_eps must be a finite number >= 0, got {qk_norm_eps!r}")
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together")
    if rope_cos is None:
        return
    if D % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim {D} must be even")
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} has dtype {t.dtype}; the RoPE tables must be float32")
        if tuple(t.shape) not in ((N, D), (num_heads, N, D)):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [N, head_dim] = {(N, D)} or "
                             f"[heads, N, head_dim] = {(num_heads, N, D)}")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    if rope_cos.shape != rope_sin.shape:
        raise ValueError(f"rope_cos {tuple(rope_cos.shape)} and rope_sin {tuple(rope_sin.shape)} differ in shape")


def check_attention(qkv, num_heads, layout, scaling, mask, dropout=0.0, **qk) -> str:
    """Validates the arguments of ``attention`` / ``attention_probabilities``; returns the scaling's current
    name (``"seed"`` is accepted with a DeprecationWarning). ``qk``: the qk-norm / RoPE keywords."""
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
    check_qk_options(qkv, num_heads, **qk)
    return scaling


@planned
def attention(qkv: torch.Tensor, num_heads: int, layout: str = "h d qkv", scaling: str = "tutorial",
              mask: torch.Tensor | None = None, dropout: float = 0.0, *,
              q_norm_weight: torch.Tensor | None = None, q_norm_bias: torch.Tensor | None = None,
              k_norm_weight: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
              qk_norm: str | None = None, qk_norm_eps: float = 1e-6, rope_cos: torch.Tensor | None = None,
              rope_sin: torch.Tensor | None = None, rope_layout: str = "interleaved") -> torch.Tensor:
    """Multi-head self-attention from a fused qkv buffer [B, N, 3E]; returns [B, N, E] in (h d) order.

    layout: ``"h d qkv"`` (the tutorial's rearrange) or ``"qkv h d"`` (timm). scaling: ``"tutorial"`` or
    ``"paper"``. mask: optional bool, broadcastable to [B, heads, N, N], True = attend. dropout: the rate
    applied to the attention probabilities (0 compiles it out).

    qk-norm and RoPE, in timm's Eva order (q = q_norm(q), then the rotation; k likewise), inside the kernels:
    qk_norm: None, ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) over head_dim, with ``qk_norm_eps`` and the
    optional [head_dim] parameters ``q_norm_weight``/``q_norm_bias`` (q) and ``k_norm_weight``/``k_norm_bias``
    (k), which receive gradients. rope_cos, rope_sin: float32 tables [N, head_dim] or [heads, N, head_dim]
    (per-head frequencies), applied as ``x cos + rot(x) sin`` to every token (prefix tokens: cos 1, sin 0);
    rope_layout ``"interleaved"`` (EVA-02: pairs (2i, 2i+1)) or ``"half"`` (DINOv3, rotate_half: pairs
    (i, i + head_dim/2)). No gradient reaches the tables.
    """
    qk = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
              k_norm_bias=k_norm_bias, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, rope_cos=rope_cos, rope_sin=rope_sin,
              rope_layout=rope_layout)
    scaling = check_attention(qkv, num_heads, layout, scaling, mask, dropout, **qk)
    qk["qk_norm_eps"] = float(qk_norm_eps)
    tensors = (qkv, mask, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, rope_cos, rope_sin)
    return dispatch(tensors, lambda: attention_torch(qkv, num_heads, layout, scaling, mask, dropout, **qk),
                    attention_op, attention_launch,
                    lambda: (qkv, None if mask is None else contiguous_key_mask(mask, qkv.shape[1]), num_heads, layout,
                             scaling, float(dropout), new_seed() if dropout else None, *qk.values()),
                    finish=lambda out: out[0])


# --- registry entry ----------------------------------------------------------------------------------------
QK_OFF = dict(QK_NORM=0, NORM_WEIGHT=False, NORM_BIAS=False, ROPE=0)
# qk-norm / RoPE at head_dim 64 (EVA-02, DINOv3 ViT-B/L) and 72 (not a power of two: the half layout's split
# column order), both qkv layouts, both norms and both rotations
QK_VARIANTS = tuple(
    dict(D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter, QK_NORM=norm, NORM_WEIGHT=norm > 0, NORM_BIAS=norm == 1,
         ROPE=rope, HAS_MASK=mask, DROPOUT=drop, DOT_PRECISION="tf32")
    for d, inter, norm, rope, mask, drop in ((64, False, 1, 1, False, False), (64, True, 1, 2, False, False),
                                             (64, False, 2, 2, False, False), (64, False, 0, 1, False, False),
                                             (72, False, 1, 2, False, False), (64, False, 1, 1, True, True)))
FORWARD_VARIANTS = tuple(  # dropout variants at head_dim 64, both layouts
    dict(HAS_MASK=mask, D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter, STORE_LSE=lse, DROPOUT=drop,
         DOT_PRECISION="tf32", **QK_OFF)
    for d in (16, 24, 64, 80, 128) for mask in (False, True) for inter in (False, True) for lse in (False, True)
    for drop in (False, True)
    if (d == 64 or not (mask or inter)) and (not lse or d in (64, 80)) and (not drop or (d == 64 and lse))
) + tuple(dict(v, STORE_LSE=True) for v in QK_VARIANTS)
RESIDENT_VARIANTS = tuple(  # the resident tiling at ViT lengths (its own grid: only its configs)
    dict(HAS_MASK=mask, D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter, STORE_LSE=True, DROPOUT=drop,
         DOT_PRECISION="tf32", **QK_OFF, **resident_pieces(tokens))
    for tokens, d, mask, inter, drop in ((197, 64, False, False, False), (257, 64, False, False, False),
                                         (50, 64, False, False, False), (197, 32, False, False, False),
                                         (100, 64, False, False, False)))
BACKWARD_VARIANTS = tuple(
    dict(HAS_MASK=mask, D=d, BLOCK_D=head_tile(d), INTERLEAVED=inter, DQ=dq, DROPOUT=drop, DOT_PRECISION="tf32",
         **QK_OFF)
    for d in (24, 64, 80, 128) for mask in (False, True) for inter in (False, True) for dq in (False, True)
    for drop in (False, True)
    if (d == 64 or not (mask or inter)) and (not drop or (d == 64 and not mask))
) + tuple(dict(v, DQ=dq) for v in QK_VARIANTS for dq in (False, True))


def sample_mask(batch: int, tokens: int, device) -> torch.Tensor:
    """A random [batch, 1, N, N] key mask (about 70% allowed), some rows likely empty."""
    return torch.rand(batch, 1, tokens, tokens).to(device) > 0.3


def sample_rope(heads: int, tokens: int, head_dim: int, device, prefix: int = 1) -> tuple:
    """Random (rope_cos, rope_sin) float32 tables [heads, N, D] (heads=None: [N, D]), prefix rows unrotated."""
    angle = torch.rand(((heads,) if heads else ()) + (tokens, head_dim)) * 6.3
    angle[..., :prefix, :] = 0.0
    return angle.cos().to(device), angle.sin().to(device)


def sample_qk_args(heads: int, tokens: int, head_dim: int, device, qk_norm="layer", rope_layout="half",
                   dtype=torch.float32, grad=False, per_head=False) -> dict:
    """The qk-norm / RoPE keywords of ``attention`` with random parameters (bias too for LayerNorm)."""
    def param(offset):
        return (randn(head_dim, device=device, dtype=dtype, scale=0.3) + offset).requires_grad_(grad)

    args = dict(q_norm_weight=param(1.0), q_norm_bias=param(0.0) if qk_norm == "layer" else None,
                k_norm_weight=param(1.0), k_norm_bias=param(0.0) if qk_norm == "layer" else None, qk_norm=qk_norm,
                qk_norm_eps=1e-6)
    cos, sin = sample_rope(heads if per_head else None, tokens, head_dim, device)
    return dict(args, rope_cos=cos, rope_sin=sin, rope_layout=rope_layout)


def _opcheck_samples(device):
    def r(*shape):
        return randn(*shape, device=device, grad=True)

    mask = contiguous_key_mask(sample_mask(2, 9, device), 9)
    qkv = r(2, 9, 3 * 2 * 16)
    out, lse = attention_op(qkv.detach(), None, 2, "qkv h d", "paper")
    qk = sample_qk_args(2, 9, 16, device, grad=True)
    qk_rms = sample_qk_args(2, 9, 16, device, "rms", "interleaved", grad=True, per_head=True)
    qkv_qk = r(2, 9, 3 * 2 * 16)
    with torch.no_grad():
        out_qk, lse_qk = attention_op(qkv_qk.detach(), None, 2, "h d qkv", "paper", 0.0, None, *qk.values())
    return [
        (attention_op, (qkv, None, 2, "qkv h d", "paper")),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "h d qkv", "tutorial")),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "h d qkv", "tutorial", 0.3, new_seed())),
        (attention_op, (qkv_qk, None, 2, "h d qkv", "paper", 0.0, None, *qk.values())),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "qkv h d", "tutorial", 0.3, new_seed(), *qk_rms.values())),
        (attention_backward_op, (randn(2, 9, 32, device=device), qkv.detach(), out, lse, None, 2, "qkv h d",
                                 "paper")),
        (attention_backward_op, (randn(2, 9, 32, device=device), qkv_qk.detach(), out_qk, lse_qk, None, 2,
                                 "h d qkv", "paper", 0.0, None,
                                 *(v.detach() if isinstance(v, torch.Tensor) else v for v in qk.values()))),
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
    # qk-norm + RoPE: gradients of qkv and the norm parameters (the tables get none)
    for layout, qk_norm, rope_layout, masked, per_head in (("qkv h d", "layer", "half", False, False),
                                                           ("h d qkv", "rms", "interleaved", True, True)):
        mask = contiguous_key_mask(sample_mask(2, 7, device), 7) if masked else None
        q_w, q_b, k_w, k_b, *options = sample_qk_args(2, 7, 24, device, qk_norm, rope_layout, grad=True,
                                                      per_head=per_head).values()

        def fn(qkv, *params, layout=layout, mask=mask, options=options, has_bias=q_b is not None):
            qw, qb, kw, kb = params if has_bias else (params[0], None, params[1], None)
            return attention_op(qkv, mask, 2, layout, "paper", 0.0, None, qw, qb, kw, kb, *options)[0]

        cases.append(GradCase(f"{layout} qk_norm={qk_norm} rope={rope_layout} mask={masked}", fn,
                              (randn(2, 7, 3 * 2 * 24, device=device, scale=0.5, grad=True),
                               *(t for t in (q_w, q_b, k_w, k_b) if t is not None))))
    return cases


def _examples(device, dtype, batch):
    qkv = randn(batch, 11, 3 * 3 * 8, device=device, dtype=dtype)
    return [((qkv, 3), dict(layout="h d qkv", scaling="tutorial")),
            ((qkv, 3), dict(layout="qkv h d", scaling="paper", mask=sample_mask(batch, 11, device))),
            ((qkv, 3), dict(layout="qkv h d", scaling="paper", **sample_qk_args(3, 11, 8, device, dtype=dtype)))]


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
            "the probabilities; qk-norm (LayerNorm/RMSNorm per head) and 2D RoPE (EVA's interleaved or DINOv3's "
            "half layout) applied to q and k in its prologue, forward and backward; forward tilings for ViT "
            "lengths (whole key tiles unchecked and a narrow tail, or one program per head with K and V loaded "
            "once and a one-step softmax), screened against the proven tiling, then timed by the autotuner",
    kernels=(KernelGrid(ATTENTION, FORWARD_VARIANTS), KernelGrid(ATTENTION_BACKWARD, BACKWARD_VARIANTS),
             KernelGrid(ATTENTION, RESIDENT_VARIANTS, only=lambda meta: meta.get("RESIDENT", False))),
    custom_ops=(attention_op, attention_backward_op),
    opcheck_samples=_opcheck_samples,
    grad_cases=_grad_cases,
    examples=_examples,
    bench=_bench,
))
