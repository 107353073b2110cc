"""One GEMM engine for every Linear of the ViT:
``out = residual + scale * dropout(act(x @ W^T + bias))``.

Each epilogue piece (bias, activation: GELU erf/tanh, quick-GELU, SiLU; dropout, per-feature scale = timm's
LayerScale, residual add) is a constexpr flag, so qkv, proj(+dropout+residual), fc1(+GELU+dropout),
fc2(+dropout+residual) and the head are one kernel source. Dropout masks come from Philox on (seed, row,
column): backward regenerates them.

W (and the bias) may also be up to three separate tensors stacked along the output rows (WEIGHT_BLOCKS): each
output column reads the block holding its row of their concatenation, in place, so Hugging Face's separate
q/k/v Linears feed one qkv GEMM with no concatenated copy of their parameters.

SwiGLU (ACTIVATION="swiglu", two blocks: gate and up): each program reads the same rows of both blocks into
two accumulators and forms silu(gate) * up before the epilogue: one launch, output width H.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..validate import check_device, check_probability, check_tensor, check_vector
from . import guard, pdl
from .dispatch import INTERPRET, Flag, dispatch
from .dropout import dropout_args, dropout_op, new_seed
from .fast_launch import use_descriptor_scratch
from .launch import Sized, Tuned, cdiv, config, dot_precision, launch_grid, new_output, row_major
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_activation, tl_activation_grad, tl_apply_dropout, tl_dependent_launch_wait

ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu", "silu", "swiglu")
# LayerNorm statistics travel between GEMMs per STATS_CHUNK-column chunk of a row (a divisor of every
# epilogue tile's width: 64 on a GPU, the interpreter's 16-column split halves there)
STATS_CHUNK = 16 if INTERPRET else 64
MAX_WEIGHT_BLOCKS = 3


@triton.jit
def tl_weight_row(n, N, DEINTERLEAVE: tl.constexpr):
    """Weight row feeding output column n: with G = DEINTERLEAVE > 1, column g * (N / G) + j reads row
    j * G + g, so the tutorial's (h d qkv) qkv weights produce a (qkv h d) output."""
    if DEINTERLEAVE > 1:
        return (n % (N // DEINTERLEAVE)) * DEINTERLEAVE + n // (N // DEINTERLEAVE)
    return n


@triton.jit
def tl_block_ptrs(row, col, split1, split2, p1, p2, p3, stride1, stride2, stride3, WEIGHT_BLOCKS: tl.constexpr):
    """Pointers to (row, col) of the row-wise concatenation of up to three tensors (block 2 starts at row
    split1, block 3 at split2), each with its own row stride: chosen per element, no copy. ``row`` and
    ``col`` broadcast together; row's integer type sets the offsets' width. The choice is made on the final
    pointers (not on row bases, then + col) so the compiler still sees ``col``'s contiguity and alignment:
    a select on values that vary along an axis drops their known divisibility there."""
    if WEIGHT_BLOCKS == 1:
        return p1 + row * stride1 + col
    ptrs = tl.where(row < split1, p1 + row * stride1 + col, p2 + (row - split1) * stride2 + col)
    if WEIGHT_BLOCKS == 3:
        ptrs = tl.where(row < split2, ptrs, p3 + (row - split2) * stride3 + col)
    return ptrs


@triton.jit
def tl_epilogue(acc, offs_m, offs_n, M, N, bias_ptr, bias2_ptr, bias3_ptr, split1, split2, scale_ptr, branch_ptr,
              res_ptr, out_ptr, stride_rm, stride_om, seed, dropout_p, keep_scale, rows_per_sample,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_BRANCH_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DEINTERLEAVE: tl.constexpr,
              WEIGHT_BLOCKS: tl.constexpr, stats_out_ptr, STATS_OUT: tl.constexpr, STATS_CHUNK: tl.constexpr,
              TMA_STORE: tl.constexpr, FAST_GELU: tl.constexpr, pre_ptr, PRE_OUT: tl.constexpr):
    """The epilogue of one output tile; returns the tile as stored (TMA_STORE: the caller stores it through a
    descriptor instead of the pointer store here; FAST_GELU: see tl_gelu_fast). PRE_OUT: the pre-activation
    (after the bias) is stored to ``pre_ptr`` too, laid out like the output: backward reads it instead of
    recomputing the GEMM."""
    n_mask = offs_n < N
    if HAS_BIAS and ACTIVATION != "swiglu":  # swiglu: both blocks' biases went in before the gated product
        bias_ptrs = tl_block_ptrs(tl_weight_row(offs_n % N, N, DEINTERLEAVE), 0, split1, split2, bias_ptr, bias2_ptr,
                                  bias3_ptr, 1, 1, 1, WEIGHT_BLOCKS)
        acc += tl.load(bias_ptrs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if PRE_OUT:  # (the output's addressing is formed below, after the activation: fewer live registers there)
        tl.store(pre_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                 acc.to(pre_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])
    acc = tl_activation(acc, ACTIVATION, FAST_GELU)  # elementwise; swiglu's product is formed before the epilogue
    if DROPOUT:  # indexed by output (row, column): the same mask whatever the tiling
        acc = tl_apply_dropout(acc, seed, offs_m, offs_n, 0, dropout_p, keep_scale)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BRANCH_SCALE:  # stochastic depth: one factor per sample (0 or 1 / keep) over its rows
        acc *= tl.load(branch_ptr + offs_m // rows_per_sample, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if not TMA_STORE:
        tl.store(out_ptr + rows * stride_om + offs_n[None, :], out, mask=mask)
    if STATS_OUT:  # LayerNorm statistics of what was stored, for the GEMM that normalizes it next
        tl_store_chunk_stats(out.to(tl.float32), offs_m, offs_n, M, N, stats_out_ptr, STATS_CHUNK)
    return out


@triton.jit
def tl_merge(mean, m2, seen, chunk_mean, chunk_m2, count):
    """Chan's merge of a chunk of ``count`` values (its mean and sum of squared deviations) into running
    per-row statistics over ``seen`` values: exact, with no large sum of squares to cancel."""
    total = seen + count
    delta = chunk_mean - mean
    return mean + delta * (count / total), m2 + chunk_m2 + delta * delta * (seen * count / total)


@triton.jit
def tl_store_chunk_stats(y, offs_m, offs_n, M, N, stats_ptr, STATS_CHUNK: tl.constexpr):
    """Per row, the mean and sum of squared deviations of each STATS_CHUNK-column chunk of the tile y
    [R, C] (fp32; C a multiple of the chunk; columns from N on excluded) into stats [M, cdiv(N, chunk), 2]."""
    R: tl.constexpr = y.shape[0]
    C: tl.constexpr = y.shape[1]
    CHUNKS: tl.constexpr = C // STATS_CHUNK
    tl.static_assert(C % STATS_CHUNK == 0, "an epilogue tile must hold whole statistics chunks")
    valid = tl.reshape(offs_n < N, (CHUNKS, STATS_CHUNK))
    y = tl.where(valid[None, :, :], tl.reshape(y, (R, CHUNKS, STATS_CHUNK)), 0.0)
    count = tl.maximum(tl.sum(valid.to(tl.float32), axis=1), 1.0)
    mean = tl.sum(y, axis=2) / count[None, :]
    dev = tl.where(valid[None, :, :], y - mean[:, :, None], 0.0)
    m2 = tl.sum(dev * dev, axis=2)
    chunk = tl.min(offs_n, axis=0) // STATS_CHUNK + tl.arange(0, CHUNKS)
    ptrs = stats_ptr + offs_m.to(tl.int64)[:, None] * (2 * tl.cdiv(N, STATS_CHUNK)) + 2 * chunk[None, :]
    ok = (offs_m[:, None] < M) & (chunk[None, :] * STATS_CHUNK < N)
    tl.store(ptrs, mean, mask=ok)
    tl.store(ptrs + 1, m2, mask=ok)


@triton.jit
def tl_input_row_stats(a_ptr, stats_ptr, safe_m, stride_am, K, NORM_STATS: tl.constexpr, STATS_CHUNK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, sum of squared deviations) of each of this tile's rows of x over all K features: merged from the
    chunk statistics its producer wrote (NORM_STATS="partials", a few floats per row), or by reading the rows
    once before the main loop ("prepass")."""
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM_STATS == "partials":
        chunks = tl.cdiv(K, STATS_CHUNK)
        row_ptrs = stats_ptr + safe_m * (2 * chunks)
        for t in range(chunks):
            count = tl.minimum(K - t * STATS_CHUNK, STATS_CHUNK) * 1.0  # "* 1.0": a Python int in the interpreter
            chunk_mean, chunk_m2 = tl.load(row_ptrs + 2 * t), tl.load(row_ptrs + 2 * t + 1)
            mean, m2 = tl_merge(mean, m2, t * STATS_CHUNK * 1.0, chunk_mean, chunk_m2, count)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k in range(tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            valid = offs_k[None, :] < k_left
            a = tl.load(a_ptr + safe_m[:, None] * stride_am + k * BLOCK_K + offs_k[None, :], mask=valid, other=0.0)
            count = tl.minimum(k_left, BLOCK_K) * 1.0
            tile_mean = tl.sum(a.to(tl.float32), axis=1) / count
            dev = tl.where(valid, a.to(tl.float32) - tile_mean[:, None], 0.0)
            mean, m2 = tl_merge(mean, m2, k * BLOCK_K * 1.0, tile_mean, tl.sum(dev * dev, axis=1), count)
    return mean, m2


@triton.jit
def tl_normalize_tile(a, mean, rstd, norm_w_ptr, norm_b_ptr, k_offs, k_valid, NORM_WEIGHT: tl.constexpr,
                      NORM_BIAS: tl.constexpr):
    """The LayerNorm of an x tile [BLOCK_M, BLOCK_K] in fp32, rounded back to x's dtype as ops.layer_norm
    stores it (so the GEMM sees the unfused path's operand); padding columns stay 0."""
    y = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if NORM_WEIGHT:
        y *= tl.load(norm_w_ptr + k_offs, mask=k_valid, other=0.0).to(tl.float32)[None, :]
    if NORM_BIAS:
        y += tl.load(norm_b_ptr + k_offs, mask=k_valid, other=0.0).to(tl.float32)[None, :]
    return tl.where(k_valid[None, :], y, 0.0).to(a.dtype)


@triton.jit
def tl_grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number ``tile`` in grouped order: GROUP_M row tiles share their W column
    tiles while those sit in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % rows_in_group, (tile % group_size) // rows_in_group


@triton.jit
def tl_store_tile(acc, pid_m, pid_n, M, N, bias_ptr, bias2_ptr, bias3_ptr, split1, split2, scale_ptr, branch_ptr,
                  res_ptr, out_ptr, stride_rm, stride_om, seed, dropout_p, keep_scale, rows_per_sample,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_BRANCH_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DEINTERLEAVE: tl.constexpr,
                  WEIGHT_BLOCKS: tl.constexpr, stats_out_ptr, STATS_OUT: tl.constexpr, STATS_CHUNK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr, out_desc,
                  TMA_STORE: tl.constexpr, FAST_GELU: tl.constexpr, pre_ptr, PRE_OUT: tl.constexpr):
    """The epilogue of output tile (pid_m, pid_n); SPLIT_EPILOGUE: as two column halves, one after the other
    (half the epilogue registers, so wide tiles do not spill). TMA_STORE: the output leaves through ``out_desc``
    (a descriptor of [M, N] with blocks of one half or whole tile; TMA clips what lies past M and N)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    HALVES: tl.constexpr = 2 if SPLIT_EPILOGUE else 1
    WIDTH: tl.constexpr = BLOCK_N // HALVES
    parts = (acc,)
    if SPLIT_EPILOGUE:
        parts = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, WIDTH)), (0, 2, 1)))
    for half in tl.static_range(HALVES):
        n0 = pid_n * BLOCK_N + half * WIDTH
        out = tl_epilogue(parts[half], offs_m, n0 + tl.arange(0, WIDTH), M, N, bias_ptr, bias2_ptr, bias3_ptr,
                          split1, split2, scale_ptr, branch_ptr, res_ptr, out_ptr, stride_rm, stride_om, seed,
                          dropout_p, keep_scale, rows_per_sample, HAS_BIAS, ACTIVATION, DROPOUT, HAS_SCALE,
                          HAS_BRANCH_SCALE, HAS_RESIDUAL, DEINTERLEAVE, WEIGHT_BLOCKS, stats_out_ptr, STATS_OUT,
                          STATS_CHUNK, TMA_STORE, FAST_GELU, pre_ptr, PRE_OUT)
        if TMA_STORE:
            out_desc.store([pid_m * BLOCK_M, n0], out)


@triton.jit
def tl_linear_persistent(a_ptr, w_ptr, bias_ptr, scale_ptr, branch_ptr, res_ptr, out_ptr, stats_out_ptr, pre_ptr, M,
                         N, K, stride_am, stride_wn, stride_rm, stride_om, seed, dropout_p, keep_scale, rows_per_sample,
                         HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_BRANCH_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, STATS_OUT: tl.constexpr, STATS_CHUNK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         SPLIT_EPILOGUE: tl.constexpr, DEINTERLEAVE: tl.constexpr, PRE_OUT: tl.constexpr):
    """The TMA engine: a persistent program walks output tiles (grouped order, stride = the grid size) and
    loads x and W tiles through device-side tensor descriptors (TMA on sm_90: no address math, zero fill past
    M, N and K, so the K loop has no masks). The tile loop is flattened into the K loop, so the software
    pipeliner issues the next tile's loads while this tile's epilogue runs. Epilogue: tl_store_tile's, stores
    through a descriptor, GELU as tl_gelu_fast (an engine that loses on time loses its GELU with it: the two are
    one candidate until a GPU round times them apart).
    DEINTERLEAVE=3 (the tutorial's (h d qkv) qkv weight, output in (qkv h d) order; N / 3 a multiple of
    BLOCK_N): W is described as [N / 3, 3, K] and output tile columns n .. n + BLOCK_N of part g = n // (N / 3)
    read rows [j, g, :] for j from n % (N / 3): the TMA unit's addressing does the permutation, with no copy
    of the weight and nothing in the loop."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if DEINTERLEAVE == 3:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N // 3, 3, K], strides=[3 * stride_wn, stride_wn, 1],
                                           block_shape=[BLOCK_N, 1, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    EPILOGUE_N: tl.constexpr = BLOCK_N // 2 if SPLIT_EPILOGUE else BLOCK_N
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                         block_shape=[BLOCK_M, EPILOGUE_N])
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = tl_grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if DEINTERLEAVE == 3:
                n0 = pid_n * BLOCK_N
                w = tl.reshape(w_desc.load([n0 % (N // 3), n0 // (N // 3), k * BLOCK_K]), (BLOCK_N, BLOCK_K))
            else:
                w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        tl_store_tile(acc, pid_m, pid_n, M, N, bias_ptr, bias_ptr, bias_ptr, N, N, scale_ptr, branch_ptr, res_ptr,
                      out_ptr, stride_rm, stride_om, seed, dropout_p, keep_scale, rows_per_sample, HAS_BIAS,
                      ACTIVATION, DROPOUT, HAS_SCALE, HAS_BRANCH_SCALE, HAS_RESIDUAL, DEINTERLEAVE, 1, stats_out_ptr,
                      STATS_OUT, STATS_CHUNK, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE, out_desc, True, True, pre_ptr, PRE_OUT)


@triton.jit(do_not_specialize=["seed"])
def _linear_kernel(a_ptr, w_ptr, w2_ptr, w3_ptr, bias_ptr, bias2_ptr, bias3_ptr, scale_ptr, branch_ptr, res_ptr,
                   out_ptr, stats_in_ptr, norm_w_ptr, norm_b_ptr, stats_out_ptr, pre_ptr, M, N, K, split1, split2,
                   stride_am, stride_wn, stride_wn2, stride_wn3, stride_rm, stride_om, seed, dropout_p, keep_scale,
                   rows_per_sample, norm_eps,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_BRANCH_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DEINTERLEAVE: tl.constexpr,
                   WEIGHT_BLOCKS: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM_STATS: tl.constexpr,
                   NORM_WEIGHT: tl.constexpr, NORM_BIAS: tl.constexpr, STATS_OUT: tl.constexpr,
                   STATS_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr, PERSISTENT: tl.constexpr = False,
                   PROGRAMS_PER_SM: tl.constexpr = 1, PDL: tl.constexpr = 0, PRE_OUT: tl.constexpr = False):
    """The pointer engine: one output tile per program, cp.async loads masked along K. PERSISTENT: the TMA
    engine instead (tl_linear_persistent; one weight block, no LayerNorm in, no swiglu), PROGRAMS_PER_SM of them
    per SM (read by the launch grid only: two where a config's shared memory lets two CTAs share an SM).
    LayerNorm in (NORM_STATS "partials" or "prepass", ops.layer_norm_linear): x is the raw input of a
    LayerNorm, normalized tile by tile in the K loop with its rows' statistics (tl_input_row_stats).
    Statistics out (STATS_OUT): the epilogue also writes per-chunk statistics of the stored output, which the
    next layer_norm_linear reads as "partials" instead of a pass over x.
    PDL (launched as a programmatic dependent launch, ops/pdl.py): 1 waits for the previous kernel before any
    read or write, 2 first prefetches the weight rows of the program's first tile into L2 (not in the split-
    epilogue 128x256 tiles); the pointer engine lets the next kernel launch once its K loop is done.
    PRE_OUT (training, not swiglu): the epilogue also stores the pre-activation to ``pre_ptr`` for backward."""
    if PDL:  # no prefetch in the 128x256 tiles: at 255 registers it spills them (compile check)
        first_n = tl_grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)[1] * BLOCK_N
        tl_dependent_launch_wait(1 if SPLIT_EPILOGUE else PDL, w_ptr, tl_weight_row(
            (first_n + tl.arange(0, BLOCK_N)) % N, N, DEINTERLEAVE).to(tl.int64), stride_wn, K)
    if PERSISTENT:
        tl_linear_persistent(a_ptr, w_ptr, bias_ptr, scale_ptr, branch_ptr, res_ptr, out_ptr, stats_out_ptr, pre_ptr,
                             M, N, K, stride_am, stride_wn, stride_rm, stride_om, seed, dropout_p, keep_scale,
                             rows_per_sample, HAS_BIAS, ACTIVATION, DROPOUT, HAS_SCALE, HAS_BRANCH_SCALE,
                             HAS_RESIDUAL, DOT_PRECISION, STATS_OUT, STATS_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                             SPLIT_EPILOGUE, DEINTERLEAVE, PRE_OUT)
        return
    pid_m, pid_n = tl_grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap around so the main loop only masks K; the epilogue masks them.
    safe_m = (offs_m % M).to(tl.int64)
    w_row = tl_weight_row(offs_n % N, N, DEINTERLEAVE)
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_k[None, :]
    GATED: tl.constexpr = ACTIVATION == "swiglu"
    if GATED:  # output column n is silu(gate row n) * (up row n): rows of both blocks, two accumulators
        w_ptrs = w_ptr + w_row.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        u_ptrs = w2_ptr + w_row.to(tl.int64)[None, :] * stride_wn2 + offs_k[:, None]
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # each column's weight row, in whichever block holds it: chosen once here, the loop only advances K
        w_ptrs = tl_block_ptrs(w_row.to(tl.int64)[None, :], offs_k[:, None], split1, split2, w_ptr, w2_ptr, w3_ptr,
                               stride_wn, stride_wn2, stride_wn3, WEIGHT_BLOCKS)

    NORM_IN: tl.constexpr = NORM_STATS is not None
    if NORM_IN:
        row_mean, row_m2 = tl_input_row_stats(a_ptr, stats_in_ptr, safe_m, stride_am, K, NORM_STATS, STATS_CHUNK,
                                              BLOCK_M, BLOCK_K)
        row_rstd = tl.rsqrt(row_m2 / K + norm_eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if NORM_IN:
            a = tl_normalize_tile(a, row_mean, row_rstd, norm_w_ptr, norm_b_ptr, k * BLOCK_K + offs_k, offs_k < k_left,
                                  NORM_WEIGHT, NORM_BIAS)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if GATED:
            u = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            u_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PDL:  # the epilogue is left: the next kernel's programs may start their own pre-wait work
        tl.extra.cuda.gdc_launch_dependents()

    if GATED:  # silu(gate + bias) * (up + bias2): the epilogue then sees one tile, with no bias or activation
        if HAS_BIAS:
            n_mask = offs_n < N
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = acc * tl.sigmoid(acc) * acc_up

    tl_store_tile(acc, pid_m, pid_n, M, N, bias_ptr, bias2_ptr, bias3_ptr, split1, split2, scale_ptr, branch_ptr,
                  res_ptr, out_ptr, stride_rm, stride_om, seed, dropout_p, keep_scale, rows_per_sample, HAS_BIAS,
                  ACTIVATION, DROPOUT, HAS_SCALE, HAS_BRANCH_SCALE, HAS_RESIDUAL, DEINTERLEAVE, WEIGHT_BLOCKS,
                  stats_out_ptr, STATS_OUT, STATS_CHUNK, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE, out_ptr, False, False,
                  pre_ptr, PRE_OUT)


@triton.jit
def _linear_split_k_kernel(a_ptr, w_ptr, part_ptr, M, N, K, k_per_split, stride_am, stride_wn,
                           DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Split-K, step 1 (small M): program (tile, s) multiplies the K range [s * k_per_split, (s + 1) * k_per_split)
    of one output tile into fp32 partial sums, part[s] of [SPLITS, M, N]. One weight block, no epilogue."""
    pid_m, pid_n = tl_grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_start = tl.program_id(1) * k_per_split
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_wn + (k_start + offs_k)[:, None]
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(k_per_split, BLOCK_K)):
        k_left = k_end - k_start - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    part = part_ptr + tl.program_id(1).to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(part, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _split_k_reduce_kernel(part_ptr, bias_ptr, scale_ptr, res_ptr, out_ptr, stats_out_ptr, M, N, splits, stride_rm,
                           stride_om, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, STATS_OUT: tl.constexpr, STATS_CHUNK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K, step 2: each output tile sums its partials in split order (deterministic), then the epilogue of
    ``ops.linear`` (bias, activation, layer scale, residual, LayerNorm statistics out) stores it."""
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    part = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(splits):
        acc += tl.load(part, mask=mask, other=0.0)
        part += M * N
    tl_store_tile(acc, pid_m, pid_n, M, N, bias_ptr, bias_ptr, bias_ptr, N, N, scale_ptr, scale_ptr, res_ptr, out_ptr,
                  stride_rm, stride_om, 0, 0.0, 1.0, 1, HAS_BIAS, ACTIVATION, False, HAS_SCALE, False, HAS_RESIDUAL, 1,
                  1, stats_out_ptr, STATS_OUT, STATS_CHUNK, BLOCK_M, BLOCK_N, False, out_ptr, False, False, out_ptr,
                  False)


def training_epilogue_fits(meta: dict, flags: dict) -> bool:
    """Tiles that compile spill-free with the training-only epilogues (compile check, sm_80/sm_90): Philox
    dropout, the stochastic-depth row factor and the saved pre-activation (PRE_OUT) each spill the 128x256
    tile; 128x128 and below fit, but for 128x64 (4 warps) with PRE_OUT (8 bytes on sm_80: triton 3.8 with dropout,
    triton 3.6 with gelu_tanh)."""
    if (flags.get("DROPOUT") or flags.get("HAS_BRANCH_SCALE") or flags.get("PRE_OUT")) and meta["BLOCK_N"] > 128:
        return False
    return not (flags.get("PRE_OUT") and (meta["BLOCK_M"], meta["BLOCK_N"]) == (128, 64))


LINEAR_ARGS = dict(
    key=["M", "N", "K", "HAS_RESIDUAL", "ACTIVATION", "DROPOUT", "HAS_BRANCH_SCALE", "WEIGHT_BLOCKS", "NORM_STATS",
         "STATS_OUT", "PRE_OUT"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=True),
    arg_types={"branch_ptr": "*fp32", "dropout_p": "fp32", "keep_scale": "fp32", "stats_in_ptr": "*fp32",
               "stats_out_ptr": "*fp32", "norm_eps": "fp32"},
    aligned=("stride_am", "stride_wn", "stride_wn2", "stride_wn3", "stride_rm", "stride_om", "K", "split1", "split2"),
)
# Small-M tiles (issue 24): at batch 1-2 (M = 197-394 tokens) the 64/128-row tiles give proj and fc2 a few
# dozen programs on a 132-SM card (fc2 at M = 197: 48 programs of 48 serial k-steps). 32- and 16-row tiles give
# 84-156 programs there; the autotuner times them next to the others, for M <= SMALL_M only, inference epilogues
# only (the training ones are not where latency is bound).
SMALL_M = 512
SMALL_M_CONFIGS = [
    config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
    config(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_EPILOGUE=False),
]


def small_m_fits(meta: dict, flags: dict) -> bool:
    return meta["BLOCK_M"] >= 64 or not (flags.get("DROPOUT") or flags.get("HAS_BRANCH_SCALE"))


def small_m_size(meta: dict, sizes: dict) -> bool:
    return meta["BLOCK_M"] >= 64 or sizes["M"] <= SMALL_M


LINEAR = Tuned(
    "linear", _linear_kernel,
    configs=[
        # 128x256 needs the split epilogue to stay under 255 registers with GELU/scale/residual; 256x128
        # spills even split (sm_80, triton 3.6 ptxas) and measured no faster on H100 (benchmarks/NOTES.md)
        config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=True),
        config(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=True),
        config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        *SMALL_M_CONFIGS,
    ],
    keep=lambda meta, flags: training_epilogue_fits(meta, flags) and small_m_fits(meta, flags),
    size_keep=small_m_size,
    **LINEAR_ARGS,
)
# The TMA engine (PERSISTENT=True): persistent programs over TMA descriptors, sm_90 only. A candidate next to the
# pointer configs: screened against them until a GPU round validates "linear_tma", then timed with them by the
# autotuner, per shape. The last config is small enough in shared memory (compile check) for two CTAs per SM.
TMA_CONFIGS = [
    config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=True, PERSISTENT=True),
    config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False, PERSISTENT=True),
    config(8, 2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False, PERSISTENT=True),
    config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False, PERSISTENT=True),
    config(4, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False, PERSISTENT=True,
           PROGRAMS_PER_SM=2),
]


# a de-interleaving TMA tile is at most 128 wide: 128x256 spills (72 bytes) with the epilogue's bias gather
DEINTERLEAVE_MAX_BLOCK_N = 128
# so a de-interleave needs N / 3 to be a multiple of it (of the interpreter's 32-wide tiles there)
DEINTERLEAVE_PART = 32 if INTERPRET else DEINTERLEAVE_MAX_BLOCK_N


# with dropout and stochastic depth both on, these TMA tiles (BLOCK_M, BLOCK_N, stages) spill 8-16 bytes
TMA_TRAINING_SPILLS = {(128, 128, 2), (64, 128, 4)}


def tma_fits(meta: dict, flags: dict) -> bool:
    """LINEAR_TMA's rule (compile check, sm_90): the pointer configs' training rule, plus the TMA tiles' own."""
    if not meta.get("PERSISTENT"):
        return training_epilogue_fits(meta, flags) and small_m_fits(meta, flags)
    wide = flags.get("DEINTERLEAVE", 1) > 1 and meta["BLOCK_N"] > DEINTERLEAVE_MAX_BLOCK_N
    training = flags.get("DROPOUT") and flags.get("HAS_BRANCH_SCALE") and (
        meta["BLOCK_M"], meta["BLOCK_N"], meta["num_stages"]) in TMA_TRAINING_SPILLS
    saving_dropout = flags.get("DROPOUT") and flags.get("PRE_OUT")  # every TMA tile spills 8-16 bytes (fp16)
    return training_epilogue_fits(meta, flags) and not wide and not training and not saving_dropout


def tma_fits_arch(meta: dict, flags: dict, arch: int) -> bool:
    """TMA exists from sm_90 on."""
    return not meta.get("PERSISTENT") or arch >= 90


LINEAR_TMA = Tuned(
    "linear", _linear_kernel,
    configs=LINEAR.configs + TMA_CONFIGS,
    keep=tma_fits,
    size_keep=small_m_size,
    arch_keep=tma_fits_arch,
    pending=("linear_tma", lambda meta: meta.get("PERSISTENT", False)),
    outputs=("out_ptr", "stats_out_ptr", "pre_ptr"),
    **LINEAR_ARGS,
)


def tma_ready(x, weights, activation, deinterleave, norm) -> bool:
    """Whether the TMA engine may serve this GEMM: one weight block, no swiglu or LayerNorm in, a de-interleave
    only where no tile straddles two parts (N / 3 a multiple of DEINTERLEAVE_PART), and what TMA descriptors of
    x, W and the output need (16-byte aligned bases and row strides)."""
    if len(weights) != 1 or activation == "swiglu" or norm is not None:
        return False
    if deinterleave != 1 and (weights[0].shape[0] // deinterleave) % DEINTERLEAVE_PART:
        return False
    rows = weights[0].shape[0] * x.element_size()  # the output's row stride in bytes
    return rows % 16 == 0 and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
                                  for t in (x, weights[0]))


@functools.cache
def persistent_programs(device_index: int | None) -> int:
    """The TMA engine's grid: one program per SM (3 in the interpreter, so the tile loop runs)."""
    if device_index is None:
        return 3
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cuda_index(device: torch.device) -> int | None:
    """The CUDA device index of ``device`` (the current one for a bare "cuda"); None off CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def gemm_grid(M, N, device):
    index = cuda_index(device)

    def grid(meta):
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
        if meta.get("PERSISTENT"):
            return launch_grid(min(tiles, persistent_programs(index) * meta.get("PROGRAMS_PER_SM", 1)))
        return launch_grid(tiles)
    return grid


# swiglu (ACTIVATION="swiglu"): two accumulators and two weight tiles per K step, so a tile does the work of a
# plain one twice as wide. 128x128 fits sm_90 (255 registers) but spills on sm_80 (120-160 bytes, 8 or 16 warps,
# split epilogue or not): Hopper only (benchmarks/NOTES.md item 11: 464-498 TFLOP/s pinned on an H200, vs 391
# autotuned without it); 128x64 with 4 warps and 256x64 spill on both.


def glu_fits_arch(meta: dict, flags: dict, arch: int) -> bool:
    return arch >= 90 or meta["BLOCK_M"] * meta["BLOCK_N"] < 128 * 128


LINEAR_GLU = Tuned(
    "linear", _linear_kernel,
    configs=[
        config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
        config(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_EPILOGUE=False),
    ],
    arch_keep=glu_fits_arch,
    **LINEAR_ARGS,
)


def as_blocks(weight, bias):
    """The public (weight, bias) as (weights, biases): tuples of the row blocks, a single tensor as one block;
    biases is None or one bias per block. Only the container is checked here, the tensors in check_linear."""
    if not isinstance(weight, (tuple, list)):
        if isinstance(bias, (tuple, list)):
            raise TypeError("bias is a tuple/list of blocks but weight is a single tensor; pass weight as blocks too")
        return (weight,), None if bias is None else (bias,)
    weights = tuple(weight)
    if not 1 <= len(weights) <= MAX_WEIGHT_BLOCKS:
        raise ValueError(f"weight as row blocks must hold 1 to {MAX_WEIGHT_BLOCKS} tensors, got {len(weights)}")
    if bias is None:
        return weights, None
    if not isinstance(bias, (tuple, list)):
        raise TypeError(f"bias must be None or a tuple/list of one 1-D tensor per weight block when weight is "
                        f"blocks, got {type(bias).__name__}")
    if len(bias) != len(weights):
        raise ValueError(f"bias has {len(bias)} blocks but weight has {len(weights)}")
    if all(b is None for b in bias):
        return weights, None
    if any(b is None for b in bias):
        raise ValueError("bias blocks must be all tensors or all None, got a mix")
    return weights, tuple(bias)


def check_swiglu(weights, scale, residual, deinterleave, branch_scale) -> None:
    """swiglu's own rules: exactly the (gate, up) blocks, and none of the epilogue pieces it does not fuse."""
    if len(weights) != 2:
        raise ValueError(f"activation='swiglu' needs weight as exactly two blocks (w_gate, w_up), got "
                         f"{len(weights)} block{'s' if len(weights) != 1 else ''}")
    unsupported = [name for name, value in (("scale", scale), ("residual", residual), ("branch_scale", branch_scale))
                   if value is not None]
    if deinterleave != 1:
        unsupported.append(f"deinterleave={deinterleave!r}")
    if unsupported:
        raise ValueError(f"activation='swiglu' does not combine with {', '.join(unsupported)} (its output feeds "
                         "fc2 or a norm: apply those there)")


def check_linear(x, weights, biases, activation, scale, residual, deinterleave, branch_scale=None):
    """weights / biases: as_blocks' tuples (one entry: a plain weight, named "weight"; several: "weight[i]")."""
    check_tensor("x", x, dims=2)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "swiglu":
        check_swiglu(weights, scale, residual, deinterleave, branch_scale)
    names = ["weight"] if len(weights) == 1 else [f"weight[{i}]" for i in range(len(weights))]
    for name, weight in zip(names, weights):
        check_tensor(name, weight, dims=2, dtype=x.dtype)
        check_device(name, weight, x.device)
        if weight.shape[1] != x.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but {name} expects {weight.shape[1]} "
                             f"({name} shape {tuple(weight.shape)})")
    for i, weight in enumerate(weights):
        check_vector(names[i].replace("weight", "bias"), None if biases is None else biases[i], weight.shape[0],
                     x.dtype, x.device)
    if activation == "swiglu" and weights[0].shape != weights[1].shape:
        raise ValueError(f"activation='swiglu' needs gate and up blocks of the same shape, got weight[0] "
                         f"{tuple(weights[0].shape)} and weight[1] {tuple(weights[1].shape)}")
    n = sum(weight.shape[0] for weight in weights)
    check_vector("scale", scale, n, x.dtype, x.device)
    if isinstance(deinterleave, bool) or not isinstance(deinterleave, int) or deinterleave < 1 or n % deinterleave:
        raise ValueError(f"deinterleave must be a positive int dividing the {n} output features, got {deinterleave!r}")
    if deinterleave > 1 and len(weights) > 1:
        raise ValueError(f"deinterleave={deinterleave} reads one interleaved weight; it cannot combine with "
                         f"{len(weights)} weight blocks")
    if residual is not None:
        check_tensor("residual", residual, dims=2, dtype=x.dtype)
        check_device("residual", residual, x.device)
        if residual.shape != (x.shape[0], n):
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {(x.shape[0], n)}")


def present(*tensors) -> list:
    return [t for t in tensors if t is not None]


def later_blocks(blocks) -> list:
    """Blocks 2 and 3 of a tuple of blocks (or None), None where absent: the custom op's weight2, weight3 or
    bias2, bias3."""
    return [*(blocks or ())[1:], None, None][:2]


def linear_launch(x, weight, bias=None, activation=None, scale=None, residual=None, deinterleave=1, dropout=0.0,
                  seed=None, branch_scale=None, weight2=None, weight3=None, bias2=None, bias3=None, config=None,
                  stats_out=False, pre_out=False):
    """Launch the fused GEMM on ``x`` [..., K] and ``weight`` [N, K]; returns [..., N] in x's dtype (x's leading
    dims; a residual has the output's shape).
    ``dropout`` > 0 needs ``seed`` (a ``new_seed()`` tensor); ``branch_scale`` is an fp32 [S] vector, S
    dividing M, row m scaled by branch_scale[m // (M / S)]. ``weight2``/``weight3`` (and ``bias2``/``bias3``,
    given exactly when ``bias`` is) are further row blocks: the weight is cat([weight, weight2, weight3]),
    read in place. ``activation="swiglu"``: ``weight``/``weight2`` are the gate and up blocks [H, K] (biases
    likewise) and the output is silu(x gate^T + bias) * (x up^T + bias2), [M, H]. ``config`` (a triton.Config)
    bypasses autotuning: tests and the config sweep use it. ``stats_out``: returns (output, its LayerNorm
    chunk statistics) instead (``linear_with_stats_launch``); ``pre_out``: returns (output, pre-activation)
    (``linear_saving_pre_launch``)."""
    if weight3 is not None and weight2 is None:
        raise ValueError("weight3 is given without weight2")
    weights = present(weight, weight2, weight3)
    biases = None if bias is None else present(bias, bias2, bias3)
    if (biases is None and (bias2 is not None or bias3 is not None)) or (biases and len(biases) != len(weights)):
        raise ValueError(f"{len(weights)} weight blocks need as many bias blocks (bias, bias2, bias3) or none")
    return gemm_launch((LINEAR_GLU if activation == "swiglu" else LINEAR), x, weights, biases, activation, scale,
                       residual, deinterleave, dropout, seed, branch_scale, stats_out=stats_out, config=config,
                       pre_out=pre_out)


def linear_with_stats_launch(x, weight, bias=None, activation=None, scale=None, residual=None, deinterleave=1,
                             dropout=0.0, seed=None, branch_scale=None, weight2=None, weight3=None, bias2=None,
                             bias3=None):
    """``linear_launch`` that also returns the output's LayerNorm statistics per STATS_CHUNK-column chunk,
    fp32 [M, cdiv(N, STATS_CHUNK), 2] (mean, sum of squared deviations), for ``ops.layer_norm_linear``."""
    return linear_launch(x, weight, bias, activation, scale, residual, deinterleave, dropout, seed, branch_scale,
                         weight2, weight3, bias2, bias3, stats_out=True)


def linear_saving_pre_launch(x, weight, bias=None, activation=None, scale=None, residual=None, deinterleave=1,
                             dropout=0.0, seed=None, branch_scale=None, weight2=None, weight3=None, bias2=None,
                             bias3=None):
    """``linear_launch`` that also returns the pre-activation x @ W^T + bias (the output's shape and column
    order), which the epilogue stores next to the output: backward reads it instead of recomputing the GEMM."""
    return linear_launch(x, weight, bias, activation, scale, residual, deinterleave, dropout, seed, branch_scale,
                         weight2, weight3, bias2, bias3, pre_out=True)


# Split-K (issue 24): at small M even 16-row tiles leave fc2's K = 3072 loop serial (48 k-steps per program at
# M = 197). SPLIT_K's programs own (tile, K range) pairs and write fp32 partial tiles; SPLIT_K_REDUCE sums each
# tile's partials in split order (deterministic) and runs ops.linear's epilogue. Two launches instead of one:
# guard.choose times it against the one-launch GEMM per shape (compared until "linear_split_k" is validated).
SPLIT_K_MIN_K = 1024
SPLIT_K_STEP = 128  # k_per_split is a multiple of it: of every BLOCK_K below
SPLIT_K = Tuned(
    "linear_split_k", _linear_split_k_kernel,
    configs=[config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
             config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
             config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)],
    key=["M", "N", "K", "k_per_split"], interpret_config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
    arg_types={"part_ptr": "*fp32"}, aligned=("stride_am", "stride_wn", "K", "k_per_split"),
)
SPLIT_K_REDUCE = Tuned(
    "linear_split_k_reduce", _split_k_reduce_kernel, configs=[config(4, 1, BLOCK_M=32, BLOCK_N=64)],
    key=["M", "N", "splits"], interpret_config=dict(BLOCK_M=32, BLOCK_N=64),
    arg_types={"part_ptr": "*fp32", "stats_out_ptr": "*fp32"}, aligned=("stride_rm", "stride_om", "N"),
)


def split_k_fits(M, N, K, weights, activation, deinterleave, norm, dropout, branch_scale) -> bool:
    """Small M, long K, one weight block, an inference epilogue (no swiglu, de-interleave, LayerNorm in)."""
    return (0 < M <= SMALL_M and N > 0 and K >= SPLIT_K_MIN_K and len(weights) == 1 and activation != "swiglu"
            and deinterleave == 1 and norm is None and not dropout and branch_scale is None)


def split_k_plan(M, N, K, device) -> tuple[int, int]:
    """(splits, k_per_split): about two waves of 64x64 tiles on the card, each split >= 4 steps of 128."""
    tiles = cdiv(M, 64) * cdiv(N, 64)
    splits = max(2, min(16, cdiv(2 * persistent_programs(cuda_index(device)), tiles), K // (4 * SPLIT_K_STEP)))
    k_per_split = cdiv(cdiv(K, splits), SPLIT_K_STEP) * SPLIT_K_STEP
    return cdiv(K, k_per_split), k_per_split


def split_k_launch(x, weight, bias, activation, scale, residual, stats_out=False, lead=None):
    """``gemm_launch`` of one weight block with an inference epilogue, as split-K partials + a reduction, on 2-D
    x and residual; the output has leading dims ``lead`` (default: x's rows)."""
    M, K = x.shape
    N = weight.shape[0]
    splits, k_per_split = split_k_plan(M, N, K, x.device)
    part = new_output((splits, M, N), x.device, torch.float32)
    SPLIT_K.launch(lambda meta: launch_grid(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits),
                   x, weight, part, M, N, K, k_per_split, x.stride(0), weight.stride(0),
                   DOT_PRECISION=dot_precision(x.dtype))
    out = new_output((*(lead or (M,)), N), x.device, x.dtype)
    stats = new_output((M, cdiv(N, STATS_CHUNK), 2), x.device, torch.float32) if stats_out else None
    dummy = x  # never read: its flag is off
    SPLIT_K_REDUCE.launch(lambda meta: launch_grid(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),
                          part, *(dummy if t is None else t for t in (bias, scale, residual)), out,
                          dummy if stats is None else stats, M, N, splits,
                          0 if residual is None else residual.stride(0), N, HAS_BIAS=bias is not None,
                          ACTIVATION=activation, HAS_SCALE=scale is not None, HAS_RESIDUAL=residual is not None,
                          STATS_OUT=stats_out, STATS_CHUNK=STATS_CHUNK)
    return (out, stats) if stats_out else out


def gemm_launch(launcher, x, weights, biases, activation, scale, residual, deinterleave, dropout, seed, branch_scale,
                norm=None, stats_out=False, config=None, split_k=True, pre_out=False):
    """``_linear_kernel`` through ``launcher`` (a Tuned over it) for weight blocks ``weights`` and bias blocks
    ``biases`` (None or one per block). ``norm``: (norm_weight, norm_bias, eps, stats) of a LayerNorm applied
    to x inside the K loop (stats: chunk statistics of x from its producer, or None: a pass over x first);
    ``stats_out``: also return the output's chunk statistics, fp32 [M, cdiv(N, STATS_CHUNK), 2]. ``split_k``:
    where ``split_k_fits``, let guard.choose pick split-K or this one-launch GEMM for the shape. ``pre_out``:
    return (output, pre-activation) instead, the latter shaped like the output, in x's dtype (any activation but
    swiglu). x (and the residual) may have any leading dims: the output has x's, allocated so (a model's output is
    then no view of a 2-D one: FSDP2 warns of views, as an in-place op on one would skip its pre-backward hook)."""
    weights = [row_major(w) for w in weights]
    biases = None if biases is None else [row_major(b) for b in biases]
    lead, x_given, residual_given = x.shape[:-1], x, residual  # split-K's one-launch alternative gets these
    x = as_rows(x)
    scale, branch_scale = (None if t is None else row_major(t) for t in (scale, branch_scale))
    residual = None if residual is None else as_rows(residual)
    M, K = x.shape
    rows = [w.shape[0] for w in weights]
    if activation == "swiglu" and (len(rows) != 2 or rows[0] != rows[1]):
        raise ValueError(f"swiglu needs two weight blocks (gate, up) of equal rows, got blocks of {rows} rows")
    N = out_features(rows, activation)
    if residual is not None and tuple(residual_given.shape) != (*lead, N):  # its gradient is dy: the output's shape
        raise ValueError(f"residual has shape {tuple(residual_given.shape)}; it must have the output's, {(*lead, N)}")
    if pre_out and (activation == "swiglu" or stats_out):
        raise ValueError("pre_out serves one-tensor epilogues: not swiglu's gated product, not with stats_out")
    if split_k and not pre_out and config is None and split_k_fits(M, N, K, weights, activation, deinterleave,
                                                                    norm, dropout, branch_scale):
        bias = None if biases is None else biases[0]
        return guard.choose(
            "linear_split_k",
            lambda: (M, N, K, x.dtype, activation, bias is not None, scale is not None, residual is not None,
                     stats_out, x.device),
            x, lambda _: split_k_launch(x, weights[0], bias, activation, scale, residual, stats_out, lead),
            lambda _: gemm_launch(launcher, x_given, weights, biases, activation, scale, residual_given,
                                  deinterleave, dropout, seed, branch_scale, norm, stats_out, split_k=False))
    out = new_output((*lead, N), x.device, x.dtype)  # written as rows of N (contiguous)
    stats = new_output((M, cdiv(N, STATS_CHUNK), 2), x.device, torch.float32) if stats_out else None
    pre = new_output((*lead, N), x.device, x.dtype) if pre_out else None
    if M and N:
        if launcher is LINEAR and tma_ready(x, weights, activation, deinterleave, norm):
            launcher = LINEAR_TMA
            if x.is_cuda:
                use_descriptor_scratch()
        elif config is not None and config.kwargs.get("PERSISTENT"):
            raise ValueError("the TMA engine serves one weight block without swiglu or LayerNorm (a de-interleave "
                             f"with N / 3 a multiple of {DEINTERLEAVE_PART}), on 16-byte aligned x, weight and "
                             "output rows")
        dummy = x  # never read: its flag is off
        norm_weight, norm_bias, eps, stats_in = norm if norm is not None else (None, None, 0.0, None)
        w1, w2, w3 = (weights + [weights[0]] * 2)[:3]  # unused block slots repeat block 1: WEIGHT_BLOCKS skips them
        b1, b2, b3 = (dummy,) * 3 if biases is None else (biases + [biases[0]] * 2)[:3]
        launcher.launch(
            gemm_grid(M, N, x.device),
            x, w1, w2, w3, b1, b2, b3, *(dummy if t is None else t for t in (scale, branch_scale, residual)), out,
            *(dummy if t is None else t for t in (stats_in, norm_weight, norm_bias, stats, pre)), M, N, K,
            rows[0], rows[0] + (rows[1] if len(rows) > 1 else 0),
            x.stride(0), w1.stride(0), w2.stride(0), w3.stride(0), 0 if residual is None else residual.stride(0),
            N, *dropout_args(dropout, seed), 1 if branch_scale is None else M // branch_scale.shape[0],
            float(eps), HAS_BIAS=biases is not None, ACTIVATION=activation, DROPOUT=dropout > 0,
            HAS_SCALE=scale is not None, HAS_BRANCH_SCALE=branch_scale is not None, HAS_RESIDUAL=residual is not None,
            DEINTERLEAVE=deinterleave, WEIGHT_BLOCKS=len(weights), DOT_PRECISION=dot_precision(x.dtype),
            NORM_STATS=None if norm is None else "prepass" if stats_in is None else "partials",
            NORM_WEIGHT=norm_weight is not None, NORM_BIAS=norm_bias is not None, STATS_OUT=stats_out,
            STATS_CHUNK=STATS_CHUNK, PRE_OUT=pre_out, config=config,
            **pdl.gemm_options(x, pdl_prefetches(len(weights), activation)))
    return (out, stats) if stats_out else (out, pre) if pre_out else out


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as rows [M, features] with unit stride along the features (a view where t's strides allow; t itself
    when it is such rows already: no view op on the launch path)."""
    return row_major(t if t.dim() == 2 else t.reshape(-1, t.shape[-1]))


def pdl_prefetches(weight_blocks: int, activation) -> bool:
    """Whether a PDL launch of the GEMM prefetches its weight rows (PDL=2): one weight block, no swiglu."""
    return weight_blocks == 1 and activation != "swiglu"


def with_pdl(variant: dict) -> dict:
    """A compile variant as the graph runner's PDL captures launch it (gemm_launch's rule)."""
    return {**variant, "PDL": 2 if pdl_prefetches(variant["WEIGHT_BLOCKS"], variant["ACTIVATION"]) else 1}


def out_features(rows, activation) -> int:
    """Output width for weight blocks of ``rows`` rows: all of them, or one block's (H) for swiglu."""
    return rows[0] if activation == "swiglu" else sum(rows)


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """An epilogue activation in PyTorch (the fallback's, and backward's recompute). swiglu: y is the gate
    and up pre-activations side by side, [..., 2H] -> silu(gate) * up, [..., H]."""
    if activation is None:
        return y
    if activation == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    if activation == "silu":
        return F.silu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_derivative(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """d activation / d pre, in fp32 (exact GELU: Phi(x) + x phi(x); tanh: the derivative of the tanh
    approximation; x sigmoid(a x): s + a x s (1 - s), a = 1.702 for quick_gelu, 1 for silu)."""
    x = pre.float()
    if activation in ("quick_gelu", "silu"):
        a = 1.702 if activation == "quick_gelu" else 1.0
        s = torch.sigmoid(a * x)
        return s * (1 + a * x * (1 - s))
    if activation == "gelu_tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x ** 3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * torch.exp(-0.5 * x * x) * 0.3989422804014327


# custom op argument positions of each weight / bias block, for needs_input_grad
WEIGHT_ARGS, BIAS_ARGS, SCALE_ARG, RESIDUAL_ARG = (1, 10, 11), (2, 12, 13), 4, 5


def linear_backward(dy, x, weights, biases, activation, scale, deinterleave, dropout, seed, branch_scale, needs,
                    pre=None):
    """(dx, dweights, dbiases, dscale) for the weight blocks ``weights`` and bias blocks ``biases`` (None or
    one per block; dweights / dbiases: one entry per block, None where not needed): ``gemm_grads``, then
    dx = g @ W, one GEMM on the blocks' concatenation (a backward-only temporary)."""
    shape = x.shape
    x, dy, pre = (None if t is None else t.reshape(-1, t.shape[-1]) for t in (x, dy, pre))  # as rows
    g, dws, dbs, dscale = gemm_grads(dy, x, weights, biases, activation, scale, deinterleave, dropout, seed,
                                     branch_scale, needs, pre)
    dx = torch.mm(g, cat_rows(weights)).view(shape) if needs[0] else None
    return dx, dws, dbs, dscale


def gemm_grads(dy, x, weights, biases, activation, scale, deinterleave, dropout, seed, branch_scale, needs,
               pre=None):
    """On rows (2-D dy, x, pre): (g, dweights, dbiases, dscale), g the gradient of the product x W^T (weight-row
    order, x's dtype; None when dx is not needed and dW is computed without it), so dx = g @ W. ``pre``: the
    pre-activation the forward saved (``linear_saving_pre_op``), else recomputed with our kernel, reading the
    blocks in place, when the activation needs it (swiglu: one GEMM over the gate and up blocks gives both). A
    layer scale's gradient needs no pre-activation (``layer_scale_backward``). The elementwise part (stochastic
    depth, the dropout mask regenerated from the seed, layer scale, the activation's derivative, the bias and
    scale sums) is one pass (``grad_epilogue``). The GEMMs are cuBLAS through torch.mm (allowed for the plain
    GEMMs of backward): dW is one GEMM split into per-block views."""
    needs_dscale = scale is not None and bool(needs[SCALE_ARG])
    if activation is None and needs_dscale:
        return layer_scale_backward(dy, x, weights, biases, scale, deinterleave, dropout, seed, branch_scale, needs)
    needs_dbias = needs_bias_grads(biases, needs)
    if pre is None and activation is not None:  # so the pre-activation is there exactly when there is an activation
        pre = linear_op(x, weights[0], None if biases is None else biases[0], None, None, None, deinterleave, 0.0,
                        None, None, *later_blocks(weights), *later_blocks(biases))
    g, dbias, dscale = grad_epilogue(dy, pre, scale, branch_scale, seed, activation, deinterleave, needs_dscale,
                                     needs_dbias, x.dtype, dropout)
    dws = [None] * len(weights)
    if any(needs[i] for i in WEIGHT_ARGS[:len(weights)]):
        dws = per_block(torch.mm(g.t(), x), weights, WEIGHT_ARGS, needs)
    dbs = per_block(dbias, weights, BIAS_ARGS, needs, like=biases) if needs_dbias else [None] * len(weights)
    return g, dws, dbs, None if dscale is None else dscale.to(scale.dtype)


def needs_bias_grads(biases, needs) -> bool:
    return biases is not None and any(needs[i] for i in BIAS_ARGS[:len(biases)])


def grad_epilogue(dy, pre, scale, branch_scale, seed, activation, deinterleave, needs_dscale, needs_dbias, dtype,
                  dropout):
    """``grad_epilogue_torch``'s (g, dbias, dscale): one pass of ``_linear_grad_kernel``, chosen per shape by
    guard.choose against the PyTorch composition (swiglu and traced backward: that one)."""
    if (activation is None and scale is None and branch_scale is None and not dropout and deinterleave == 1
            and dy.dtype == dtype):  # nothing to apply: g is dy itself, the bias gradient a column sum (no pass)
        return dy, dy.sum(0, dtype=torch.float32) if needs_dbias else None, None
    args = (dy, pre, scale, branch_scale, seed, activation, deinterleave, needs_dscale, needs_dbias, dtype)
    if activation == "swiglu" or tracing(dy):
        return grad_epilogue_torch(*args, dropout)
    return guard.choose(
        "linear_grad_epilogue", lambda: (tuple(dy.shape), dy.dtype, dtype, activation, scale is not None,
                                         branch_scale is not None, deinterleave, needs_dscale, needs_dbias,
                                         dy.device),
        dy, lambda p: grad_epilogue_launch(*args, p), lambda p: grad_epilogue_torch(*args, p), dropout)


def cat_rows(weights) -> torch.Tensor:
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def per_block(t, weights, positions, needs, like=None) -> list:
    """One tensor over all blocks' rows -> a view per block (None where its argument needs no gradient), cast
    to the dtype of the matching tensor of ``like`` (the blocks' weights or biases) when given."""
    parts = (t,) if len(weights) == 1 else t.split([w.shape[0] for w in weights])
    like = like or parts
    return [p.to(ref.dtype) if needs[i] else None for p, i, ref in zip(parts, positions, like)]


def layer_scale_backward(dy, x, weights, biases, scale, deinterleave, dropout, seed, branch_scale, needs):
    """``gemm_grads`` of y = scale * (x W^T + b) (+ residual) when the scale's gradient is needed, with no
    GEMM recomputed and nothing saved: with u the gradient reaching the scaled product (dy after stochastic depth
    and dropout, weight-row order) and P = u^T x in fp32, dscale = rowsum(P * W) + b * colsum(u),
    dW = scale * P, dbias = scale * colsum(u), g = u * scale (dx = g @ W): elementwise work in place of an M x N x K
    GEMM (proj and fc2 of layer-scale models: DINOv2, EVA-02, CaiT). u * scale is rounded like PyTorch's own
    dy * gamma (not u @ (scale * W): layer scales start at 1e-5 to 1e-6, and scale * W underflows fp16 where
    the loss-scaled u * scale does not)."""
    u, usum, _ = grad_epilogue(dy, None, None, branch_scale, seed, None, deinterleave, False, True, x.dtype, dropout)
    rows_scale = scale.float()
    if deinterleave > 1:  # the scale is in output order; u, P and W in weight-row order
        rows_scale = rows_scale.view(deinterleave, -1).t().reshape(-1)
    w = cat_rows(weights)
    p = mm_fp32(u.t(), x)
    dscale = (p * w.float()).sum(1)
    if biases is not None:
        dscale += cat_rows(biases).float() * usum
    if deinterleave > 1:  # back to output order
        dscale = dscale.view(-1, deinterleave).t().reshape(-1)
    g = u * rows_scale.to(u.dtype) if needs[0] else None
    dws = per_block(p * rows_scale[:, None], weights, WEIGHT_ARGS, needs, like=weights)
    dbs = (per_block(usum * rows_scale, weights, BIAS_ARGS, needs, like=biases) if needs_bias_grads(biases, needs)
           else [None] * len(weights))
    return g, dws, dbs, dscale.to(scale.dtype)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: 16-bit CUDA inputs through cuBLAS's fp32 output (``out_dtype``), so the
    product is never rounded to 16 bits (nor overflows fp16); elsewhere in fp32."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8: no out_dtype
            pass
    return torch.mm(a.float(), b.float())


@torch.library.custom_op("vit_kernels::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
              scale: torch.Tensor | None, residual: torch.Tensor | None, deinterleave: int,
              dropout: float = 0.0, seed: torch.Tensor | None = None,
              branch_scale: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
              weight3: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
              bias3: torch.Tensor | None = None) -> torch.Tensor:
    """The fused GEMM on 2-D x as a torch.library op (torch.compile sees through it). weight2/weight3 and
    bias2/bias3: further row blocks of the weight and bias (see linear_launch)."""
    return linear_launch(x, weight, bias, activation, scale, residual, deinterleave, dropout, seed, branch_scale,
                         weight2, weight3, bias2, bias3)


def fake_output(x, activation, *weights):
    """The GEMM's output for fake tensors: x's leading dims, out_features of the present weight blocks, x's
    dtype."""
    return x.new_empty((*x.shape[:-1], out_features([w.shape[0] for w in present(*weights)], activation)))


@linear_op.register_fake
def _(x, weight, bias, activation, scale, residual, deinterleave, dropout=0.0, seed=None, branch_scale=None,
      weight2=None, weight3=None, bias2=None, bias3=None):
    return fake_output(x, activation, weight, weight2, weight3)


def _linear_setup(ctx, inputs, output, pre=None):
    (x, weight, bias, activation, scale, residual, deinterleave, dropout, seed, branch_scale,
     weight2, weight3, bias2, bias3) = inputs
    ctx.save_for_backward(x, weight, bias, scale, seed, branch_scale, weight2, weight3, bias2, bias3, pre)
    ctx.activation, ctx.deinterleave, ctx.has_residual, ctx.dropout = (activation, deinterleave,
                                                                       residual is not None, dropout)


def _linear_grad(ctx, dy):
    x, weight, bias, scale, seed, branch_scale, weight2, weight3, bias2, bias3, pre = ctx.saved_tensors
    needs = ctx.needs_input_grad
    weights = present(weight, weight2, weight3)
    biases = None if bias is None else present(bias, bias2, bias3)
    dx, dws, dbs, dscale = linear_backward(dy, x, weights, biases, ctx.activation, scale, ctx.deinterleave,
                                           ctx.dropout, seed, branch_scale, needs, pre)
    dws, dbs = [*dws, None, None][:3], [*dbs, None, None][:3]
    return (dx, dws[0], dbs[0], None, dscale, (dy if ctx.has_residual and needs[RESIDUAL_ARG] else None), None, None,
            None, None, dws[1], dws[2], dbs[1], dbs[2])


linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


@torch.library.custom_op("vit_kernels::linear_with_stats", mutates_args=())
def linear_with_stats_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                         scale: torch.Tensor | None, residual: torch.Tensor | None, deinterleave: int,
                         dropout: float = 0.0, seed: torch.Tensor | None = None,
                         branch_scale: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
                         weight3: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
                         bias3: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_op`` plus the output's LayerNorm chunk statistics (not differentiable): the residual GEMMs
    (proj, fc2) hand them to the next ``layer_norm_linear``."""
    return linear_with_stats_launch(x, weight, bias, activation, scale, residual, deinterleave, dropout, seed,
                                    branch_scale, weight2, weight3, bias2, bias3)


@linear_with_stats_op.register_fake
def _(x, weight, bias, activation, scale, residual, deinterleave, dropout=0.0, seed=None, branch_scale=None,
      weight2=None, weight3=None, bias2=None, bias3=None):
    out = fake_output(x, activation, weight, weight2, weight3)
    rows = math.prod(x.shape[:-1])
    return out, x.new_empty((rows, cdiv(out.shape[-1], STATS_CHUNK), 2), dtype=torch.float32)


def _linear_with_stats_setup(ctx, inputs, output):
    _linear_setup(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])


linear_with_stats_op.register_autograd(lambda ctx, dy, _dstats: _linear_grad(ctx, dy),
                                       setup_context=_linear_with_stats_setup)


def linear_torch(x, weight, bias=None, activation=None, scale=None, residual=None, deinterleave=1, dropout=0.0,
                 branch_scale=None):
    """The PyTorch fallback, same semantics (its dropout masks come from torch's RNG, not Philox). ``weight``
    and ``bias`` may be row blocks (tuples/lists, as ``linear`` takes them): concatenated here (swiglu: the
    gate and up pre-activations side by side, then split by ``activate``)."""
    weights, biases = as_blocks(weight, bias)
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    bias = None if biases is None else biases[0] if len(biases) == 1 else torch.cat(biases)
    y = F.linear(x, weight, bias)
    if deinterleave > 1:
        y = y.unflatten(-1, (-1, deinterleave)).transpose(-1, -2).flatten(-2)
    y = activate(y, activation)
    if dropout:
        y = F.dropout(y, dropout)
    if scale is not None:
        y = y * scale
    if branch_scale is not None:
        y = (y.reshape(branch_scale.shape[0], -1, y.shape[-1]) * branch_scale[:, None, None].to(y.dtype)).view(y.shape)
    return y if residual is None else residual + y


def check_branch_scale(branch_scale, x) -> None:
    if branch_scale is None:
        return
    if not isinstance(branch_scale, torch.Tensor) or branch_scale.dtype != torch.float32 or branch_scale.dim() != 1:
        what = branch_scale.dtype if isinstance(branch_scale, torch.Tensor) else type(branch_scale).__name__
        raise TypeError(f"branch_scale must be a 1-D float32 tensor, got {what}")
    if x.dim() < 3 or branch_scale.shape[0] != x.shape[0]:
        raise ValueError(f"branch_scale has {branch_scale.shape[0]} elements; it needs one per sample of x [B, N, K], "
                         f"got x of shape {tuple(x.shape)}")
    check_device("branch_scale", branch_scale, x.device)


@planned
def linear(x: torch.Tensor, weight: torch.Tensor | Sequence[torch.Tensor],
           bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None, activation: str | None = None,
           scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           deinterleave: int = 1, dropout: float = 0.0, branch_scale: torch.Tensor | None = None,
           norm_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``residual + scale * dropout(activation(x @ weight.T + bias))`` over the last axis of ``x`` (any
    leading dims).

    activation: None, ``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"quick_gelu"`` (x sigmoid(1.702 x), OpenAI
    CLIP's), ``"silu"`` (x sigmoid(x)) or ``"swiglu"`` (below); dropout: the probability of zeroing an
    element (survivors scaled by 1 / (1 - p), as nn.Dropout; 0 compiles it out); scale is a per-output-feature
    vector; residual has the output's shape. All tensors share x's dtype and device, except branch_scale: a
    float32 [B] vector for x of shape [B, ...], multiplying each sample's rows after ``scale`` and before the
    residual (timm's stochastic depth: 0 or 1 / keep_prob per sample; not differentiated).
    deinterleave=G reads the weight rows (and bias) as interleaved groups, row j*G+g, and writes them grouped,
    column g*(N/G)+j: with G=3 the tutorial's "(h d qkv)" qkv weights give a "(qkv h d)" output, whose head
    dims are contiguous for attention. The scale and residual apply in output order.

    Row blocks: ``weight`` may be a tuple/list of 1 to 3 2-D tensors [N_i, K] (row counts may differ), meaning
    their concatenation along the rows, and ``bias`` then None or a matching tuple/list of 1-D [N_i] tensors
    (all None counts as None). The kernel reads each block in place, no concatenated copy (e.g. Hugging Face's
    separate query/key/value Linears as one qkv GEMM: ``linear(x, (wq, wk, wv), (bq, bk, bv))``); gradients
    reach every block. Not combinable with deinterleave > 1.

    SwiGLU in one GEMM: ``linear(x, (w_gate, w_up), (b_gate, b_up) or None, activation="swiglu", dropout=p)``
    is ``dropout(silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up))``, of width H (the rows of each block; the
    two blocks have the same shape). Each tile reads the rows of both blocks in place (timm SwiGLU's
    fc1_g/fc1_x weights, or ``w.chunk(2)`` views of a packed [2H, K] weight as in timm SwiGLUPacked and Hugging
    Face Dinov2SwiGLUFFN, gate first); gradients reach them (through the views: the packed tensor). Dropout
    (timm's drop1) applies after the product; scale, residual, branch_scale and deinterleave are rejected.

    ``norm_stats=True`` returns ``(output, stats)``: stats are the output's LayerNorm statistics (per row, the
    mean and sum of squared deviations of each chunk of columns, fp32), written by the same epilogue from the
    stored values. Pass them to ``ops.layer_norm_linear(output, ..., stats=stats)`` to normalize the output in
    the next GEMM without another pass over it. The PyTorch fallback computes them with PyTorch.
    """
    _, _, weights, biases = check_public_linear(x, weight, bias, activation, scale, residual, deinterleave,
                                                dropout, branch_scale)
    lead = x.shape[:-1]
    n = out_features([w.shape[0] for w in weights], activation)
    b1 = None if biases is None else biases[0]
    blocks = () if len(weights) == 1 else (*later_blocks(weights), *later_blocks(biases))  # weight2, 3, bias2, 3
    if not isinstance(norm_stats, bool):
        raise TypeError(f"norm_stats must be a bool, got {type(norm_stats).__name__}")

    def fallback():
        y = linear_torch(x, weights, biases, activation, scale, residual, deinterleave, dropout, branch_scale)
        return (y, chunk_stats(y.reshape(-1, n))) if norm_stats else y

    return dispatch(
        (x,), fallback, linear_with_stats_op if norm_stats else linear_recorded,
        linear_with_stats_launch if norm_stats else linear_launch,
        lambda: (x, weights[0], b1, activation, scale, leading(residual, lead), deinterleave, float(dropout),
                 new_seed() if dropout else None, branch_scale, *blocks))


def leading(residual: torch.Tensor | None, lead) -> torch.Tensor | None:
    """A (checked) residual with x's leading dims ``lead``: as given when it has them, else (given as rows
    [M, N]) reshaped to them. The custom ops take it shaped as the output, whose gradient they return for it."""
    if residual is None or residual.shape[:-1] == lead:
        return residual
    return residual.reshape(*lead, residual.shape[-1])


def check_public_linear(x, weight, bias, activation, scale, residual, deinterleave, dropout, branch_scale):
    """The checks of ``linear``'s public arguments (``layer_norm_linear`` shares them); returns x and the
    residual as 2-D rows (the rows the checks read; ``leading`` gives the residual x's leading dims for the ops)
    and the (weights, biases) blocks."""
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., features], got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    res2 = None
    if residual is not None:
        check_tensor("residual", residual)
        res2 = residual.reshape(-1, residual.shape[-1]) if residual.shape[:-1] == x.shape[:-1] else residual
    weights, biases = as_blocks(weight, bias)
    check_linear(x2, weights, biases, activation, scale, res2, deinterleave, branch_scale)
    check_probability("dropout", dropout)
    check_branch_scale(branch_scale, x)
    return x2, res2, weights, biases


def chunk_stats(y: torch.Tensor) -> torch.Tensor:
    """What the STATS_OUT epilogue writes, in PyTorch: for y [M, N], fp32 [M, cdiv(N, STATS_CHUNK), 2], the
    mean and the sum of squared deviations of each STATS_CHUNK-column chunk of each row (last chunk: the rest)."""
    y = y.float()
    chunks = y.split(STATS_CHUNK, dim=1)
    means = [c.mean(1, keepdim=True) for c in chunks]
    m2 = [((c - mean) ** 2).sum(1, keepdim=True) for c, mean in zip(chunks, means)]
    return torch.stack([torch.cat(means, 1), torch.cat(m2, 1)], 2)


# --- backward: the elementwise part of a GEMM's gradient, fused -------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _linear_grad_kernel(dy_ptr, pre_ptr, scale_ptr, branch_ptr, g_ptr, dbias_part_ptr, dscale_part_ptr, M, N,
                        stride_dym, stride_pm, stride_gm, seed, dropout_p, keep_scale, rows_per_sample,
                        ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                        HAS_BRANCH_SCALE: tl.constexpr, DEINTERLEAVE: tl.constexpr, NEEDS_DSCALE: tl.constexpr,
                        NEEDS_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        ROW_STEPS: tl.constexpr):
    """From the output gradient dy to the pre-activation's, g = dy * branch * dropout mask * scale * act'(pre),
    stored in the weight's row order (de-interleaved) and dtype, in one pass: one read of dy and of the
    recomputed pre, one write of g. Each program walks ROW_STEPS row blocks of one column block and stores its
    column sums (fp32) for the bias gradient (of g) and the layer-scale gradient (of dy * branch * dropout mask *
    act(pre)) as one partial row: summed on the host in a fixed order, so the result is deterministic."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_cols = tl_weight_row(offs_n % N, N, DEINTERLEAVE)  # output column -> the weight row it came from
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    for step in range(ROW_STEPS):
        offs_m = (tl.program_id(0) * ROW_STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & n_mask[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        d = tl.load(dy_ptr + rows * stride_dym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BRANCH_SCALE:
            d *= tl.load(branch_ptr + offs_m // rows_per_sample, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
        if DROPOUT:  # the forward epilogue's mask: indexed by output (row, column)
            d = tl_apply_dropout(d, seed, offs_m, offs_n, 0, dropout_p, keep_scale)
        if ACTIVATION is not None or NEEDS_DSCALE:
            pre = tl.load(pre_ptr + rows * stride_pm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEEDS_DSCALE:
            dscale += tl.sum(d * tl_activation(pre, ACTIVATION, False), axis=0)
        if HAS_SCALE:
            d *= scale[None, :]
        if ACTIVATION is not None:
            d *= tl_activation_grad(pre, ACTIVATION)
        tl.store(g_ptr + rows * stride_gm + w_cols[None, :], d.to(g_ptr.dtype.element_ty), mask=mask)
        if NEEDS_DBIAS:
            dbias += tl.sum(d, axis=0)
    part = tl.program_id(0).to(tl.int64) * N
    if NEEDS_DBIAS:
        tl.store(dbias_part_ptr + part + w_cols, dbias, mask=n_mask)
    if NEEDS_DSCALE:
        tl.store(dscale_part_ptr + part + offs_n, dscale, mask=n_mask)


def linear_grad_config(**sizes) -> triton.Config:
    """Memory-bound: 128-column blocks, 32 x 8 rows a program (what the compile check builds; the interpreter
    runs GRAD_INTERPRET_CONFIG's small tiles, so the tests cross tile edges)."""
    return config(4, 1, BLOCK_M=32, BLOCK_N=128, ROW_STEPS=8)


GRAD_INTERPRET_CONFIG = config(4, 1, BLOCK_M=16, BLOCK_N=32, ROW_STEPS=2)


LINEAR_GRAD = Sized("linear_grad", _linear_grad_kernel, linear_grad_config, (),
                    arg_types={"dbias_part_ptr": "*fp32", "dscale_part_ptr": "*fp32", "dropout_p": "fp32",
                               "keep_scale": "fp32", "branch_ptr": "*fp32"},
                    aligned=("stride_dym", "stride_pm", "stride_gm", "N"),
                    quiet_fp=("over",))  # exp overflow in gelu_tanh's sigmoid at large |x|: it saturates right


@torch.library.custom_op("vit_kernels::linear_saving_pre", mutates_args=())
def linear_saving_pre_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                         scale: torch.Tensor | None, residual: torch.Tensor | None, deinterleave: int,
                         dropout: float = 0.0, seed: torch.Tensor | None = None,
                         branch_scale: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
                         weight3: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
                         bias3: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_op`` plus its pre-activation (not differentiable), saved for backward (``saves_pre``)."""
    return linear_saving_pre_launch(x, weight, bias, activation, scale, residual, deinterleave, dropout, seed,
                                    branch_scale, weight2, weight3, bias2, bias3)


@linear_saving_pre_op.register_fake
def _(x, weight, bias, activation, scale, residual, deinterleave, dropout=0.0, seed=None, branch_scale=None,
      weight2=None, weight3=None, bias2=None, bias3=None):
    out = fake_output(x, activation, weight, weight2, weight3)
    return out, torch.empty_like(out)


def _linear_saving_pre_setup(ctx, inputs, output):
    _linear_setup(ctx, inputs, output, output[1])
    ctx.mark_non_differentiable(output[1])


linear_saving_pre_op.register_autograd(lambda ctx, dy, _dpre: _linear_grad(ctx, dy),
                                       setup_context=_linear_saving_pre_setup)


# Backward needs fc1's pre-activation x @ W^T + b for the activation's derivative. Saving it costs one more
# 16-bit [M, N] write in forward and that memory until backward (what timm's own GELU keeps); recomputing it
# costs a GEMM in backward (2 M N K flops, several times the write's time at ViT sizes). Default: save.
# VIT_KERNELS_SAVE_PRE=0 or ``save_pre_activations(False)``: recompute (less memory).
SAVE_PRE = Flag("save_pre_activations", os.environ.get("VIT_KERNELS_SAVE_PRE", "1") != "0")


def save_pre_activations(on: bool):
    """Inside the ``with`` block, GEMMs with an activation (not swiglu) recorded for autograd save their
    pre-activation for backward (``on=True``, the default) or backward recomputes it with a GEMM (``on=False``:
    one [M, N] activation less kept per such GEMM). Under non-reentrant activation checkpointing the forward is
    rerun in backward with the setting of that moment: keep it the same for the forward and its backward (as
    ``layer_norm_folding``)."""
    return SAVE_PRE.set(on)


def saves_pre(activation, tensors) -> bool:
    """Whether a GEMM recorded for autograd saves its pre-activation: an elementwise activation (swiglu's two
    pre-activations are recomputed), saving on, and a gradient to compute (not torch.compile's inference)."""
    return (SAVE_PRE.on and activation not in (None, "swiglu") and torch.is_grad_enabled()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


def linear_recorded(*args):
    """``linear_op``, or under autograd with an activation ``linear_saving_pre_op`` (``saves_pre``)."""
    return linear_saving_pre_op(*args)[0] if saves_pre(args[3], args) else linear_op(*args)


def tracing(t: torch.Tensor) -> bool:
    """Whether backward is being traced (torch.compile, AOT dispatch, make_fx: fake, functional or proxied
    tensors): the gradient kernel is no custom op, so such traces take the PyTorch composition."""
    return (torch.compiler.is_compiling() or type(t) is not torch.Tensor or torch._is_functional_tensor(t)
            or _get_current_dispatch_mode() is not None)


def grad_epilogue_launch(dy, pre, scale, branch_scale, seed, activation, deinterleave, needs_dscale, needs_dbias,
                         dtype, dropout):
    """``grad_epilogue_torch``'s results from ``_linear_grad_kernel`` (any activation but swiglu)."""
    dy = row_major(dy)
    pre = dy if pre is None else row_major(pre)  # None: never read (no activation, no scale gradient)
    M, N = dy.shape
    g = new_output((M, N), dy.device, dtype)
    cfg = GRAD_INTERPRET_CONFIG if INTERPRET else LINEAR_GRAD.configs_for({})[0]
    parts = cdiv(M, cfg.kwargs["BLOCK_M"] * cfg.kwargs["ROW_STEPS"])
    # every partial row is written: each program stores its row for its columns
    dbias = new_output((parts, N), dy.device, torch.float32) if needs_dbias else None
    dscale = new_output((parts, N), dy.device, torch.float32) if needs_dscale else None
    if M and N:
        dummy = dy
        LINEAR_GRAD.launch(
            lambda meta: launch_grid(parts, cdiv(N, meta["BLOCK_N"])),
            dy, pre, dummy if scale is None else scale, dummy if branch_scale is None else branch_scale, g,
            dummy if dbias is None else dbias, dummy if dscale is None else dscale, M, N, dy.stride(0),
            pre.stride(0), g.stride(0), *dropout_args(dropout, seed),
            1 if branch_scale is None else M // branch_scale.shape[0], ACTIVATION=activation, DROPOUT=dropout > 0,
            HAS_SCALE=scale is not None, HAS_BRANCH_SCALE=branch_scale is not None, DEINTERLEAVE=deinterleave,
            NEEDS_DSCALE=needs_dscale, NEEDS_DBIAS=needs_dbias, config=cfg)
    return g, None if dbias is None else dbias.sum(0), None if dscale is None else dscale.sum(0)


def grad_epilogue_torch(dy, pre, scale, branch_scale, seed, activation, deinterleave, needs_dscale, needs_dbias,
                        dtype, dropout):
    """In PyTorch (fp32): g, the gradient of the GEMM's pre-activation (dtype, weight row order), its column sums
    (the bias gradient, fp32, or None) and the layer scale's gradient (fp32, or None)."""
    dy32 = dy.float()
    pre = None if pre is None else pre.float()
    if branch_scale is not None:  # each sample's rows carry its stochastic-depth factor
        dy32 = (dy32.view(branch_scale.shape[0], -1, dy32.shape[1]) * branch_scale[:, None, None]).view(dy32.shape)
    if dropout:  # the same mask multiplies dy and the activation alike: regenerate it once, on dy
        dy32 = dropout_op(dy32, seed, dropout)
    dscale = None
    if scale is not None:
        if needs_dscale:
            dscale = (dy32 * activate(pre, activation)).sum(0)
        dy32 = dy32 * scale.float()
    if activation == "swiglu":  # d/d gate and d/d up of silu(gate) * up, side by side like the blocks' rows
        gate, up = pre.chunk(2, dim=1)
        dy32 = torch.cat([dy32 * up * activation_derivative(gate, "silu"), dy32 * F.silu(gate)], dim=1)
    elif activation is not None:
        dy32 = dy32 * activation_derivative(pre, activation)
    if deinterleave > 1:  # back from output order to weight-row order
        m, n = dy32.shape
        dy32 = dy32.view(m, deinterleave, n // deinterleave).transpose(1, 2).reshape(m, n)
    return dy32.to(dtype), dy32.sum(0) if needs_dbias else None, dscale


# --- registry entry ----------------------------------------------------------------------------------------
PLAIN = dict(HAS_BIAS=True, ACTIVATION=None, DROPOUT=False, HAS_SCALE=False, HAS_BRANCH_SCALE=False,
             HAS_RESIDUAL=False, DEINTERLEAVE=1, WEIGHT_BLOCKS=1, DOT_PRECISION="tf32", NORM_STATS=None,
             NORM_WEIGHT=False, NORM_BIAS=False, STATS_OUT=False, STATS_CHUNK=64)
VARIANTS = (
    # proj / fc2: layer scale + residual, with dropout and stochastic depth on or off
    *({**PLAIN, "DROPOUT": drop, "HAS_SCALE": True, "HAS_BRANCH_SCALE": branch, "HAS_RESIDUAL": True}
      for drop in (False, True) for branch in (False, True)),
    # fc1: GELU (erf or tanh), quick-GELU (CLIP), SiLU, with dropout on or off
    *({**PLAIN, "ACTIVATION": act, "DROPOUT": drop} for act in ("gelu", "gelu_tanh", "quick_gelu", "silu")
      for drop in (False, True)),
    {**PLAIN, "DEINTERLEAVE": 3},  # the tutorial's qkv
    {**PLAIN, "WEIGHT_BLOCKS": 3},  # Hugging Face's qkv: separate query/key/value weights and biases
    {**PLAIN, "HAS_BIAS": False},
    # proj / fc2 also writing the residual stream's LayerNorm statistics (for ops.layer_norm_linear)
    *({**PLAIN, "HAS_SCALE": True, "HAS_RESIDUAL": True, "STATS_OUT": True, "DROPOUT": drop, "HAS_BRANCH_SCALE": drop}
      for drop in (False, True)),
    # fc1 in training: the pre-activation stored for backward too (PRE_OUT), each activation, GELU with dropout
    *({**PLAIN, "ACTIVATION": act, "DROPOUT": drop, "PRE_OUT": True}
      for act, drop in (("gelu", False), ("gelu", True), ("gelu_tanh", False), ("quick_gelu", False), ("silu", False))),
)
# inside the graph runner's PDL captures (sm_90 only) every inference variant, and proj / fc2 without layer scale
# (ViT-B's), with the weight prefetch (PDL=2) where one weight block; Hugging Face's three q/k/v blocks wait only
PDL_VARIANTS = tuple(with_pdl(v) for v in (
    *(v for v in VARIANTS if not v["DROPOUT"] and not v["HAS_BRANCH_SCALE"] and not v.get("PRE_OUT")),
    {**PLAIN, "HAS_RESIDUAL": True}, {**PLAIN, "HAS_RESIDUAL": True, "STATS_OUT": True}))
# the TMA engine serves one weight block (the pointer grid builds LINEAR_TMA's other configs)
TMA_VARIANTS = tuple(v for v in VARIANTS + PDL_VARIANTS if v["WEIGHT_BLOCKS"] == 1)
# SwiGLU fc1 (LINEAR_GLU's configs): gate and up blocks, with dropout on or off, with and without biases
GLU_VARIANTS = (*({**PLAIN, "ACTIVATION": "swiglu", "WEIGHT_BLOCKS": 2, "DROPOUT": drop, "HAS_BIAS": bias}
                   for drop, bias in ((False, True), (True, True), (False, False))),
                with_pdl({**PLAIN, "ACTIVATION": "swiglu", "WEIGHT_BLOCKS": 2}))
# the fused gradient epilogue: fc1 (each activation, dropout on or off), proj / fc2 (layer scale with its gradient,
# stochastic depth, dropout), the tutorial's de-interleaved qkv
_GRAD = dict(ACTIVATION=None, DROPOUT=False, HAS_SCALE=False, HAS_BRANCH_SCALE=False, DEINTERLEAVE=1,
             NEEDS_DSCALE=False, NEEDS_DBIAS=True)
GRAD_VARIANTS = (
    *({**_GRAD, "ACTIVATION": act, "DROPOUT": drop} for act in ("gelu", "gelu_tanh", "quick_gelu", "silu")
      for drop in (False, True)),
    *({**_GRAD, "HAS_SCALE": True, "NEEDS_DSCALE": True, "HAS_BRANCH_SCALE": drop, "DROPOUT": drop}
      for drop in (False, True)),
    {**_GRAD, "DEINTERLEAVE": 3}, {**_GRAD, "NEEDS_DBIAS": False},
)
# split-K at small M: fc2 + layer scale + residual (with and without statistics out), and a GELU epilogue
SPLIT_K_VARIANTS = ({"DOT_PRECISION": "tf32"},)
SPLIT_K_REDUCE_VARIANTS = (  # STATS_CHUNK: the GPU's (PLAIN's), whatever the interpreter's is here
    *({"HAS_BIAS": True, "ACTIVATION": None, "HAS_SCALE": scale, "HAS_RESIDUAL": True, "STATS_OUT": stats,
       "STATS_CHUNK": PLAIN["STATS_CHUNK"]} for scale in (False, True) for stats in (False, True)),
    {"HAS_BIAS": True, "ACTIVATION": "gelu", "HAS_SCALE": False, "HAS_RESIDUAL": False, "STATS_OUT": False,
     "STATS_CHUNK": PLAIN["STATS_CHUNK"]},
)


def _opcheck_samples(device):
    def r(*shape):
        return randn(*shape, device=device, grad=True)

    return [
        (linear_op, (r(9, 20), r(30, 20), r(30), "gelu", r(30), r(9, 30), 3)),
        (linear_op, (r(4, 8), r(6, 8), None, None, None, None, 1)),
        (linear_op, (r(9, 20), r(30, 20), r(30), "gelu", None, None, 1, 0.25, new_seed())),
        (linear_op, (r(9, 20), r(30, 20), r(30), None, r(30), r(9, 30), 1, 0.25, new_seed())),
        (linear_op, (r(9, 20), r(30, 20), r(30), None, r(30), r(9, 30), 1, 0.0, None,
                     torch.tensor([0.0, 1.5, 1.5], device=device))),
        # row blocks: q/k/v-like weights and biases read in place, then two blocks of unequal rows, no bias
        (linear_op, (r(9, 20), r(10, 20), r(10), "gelu", r(30), r(9, 30), 1, 0.0, None, None, r(10, 20), r(10, 20),
                     r(10), r(10))),
        (linear_op, (r(9, 20), r(7, 20), None, None, None, None, 1, 0.0, None, None, r(13, 20))),
        (linear_op, (r(9, 20), r(30, 20), r(30), "quick_gelu", None, None, 1)),
        (linear_op, (r(9, 20), r(30, 20), None, "silu", r(30), r(9, 30), 1, 0.25, new_seed())),
        # swiglu: gate and up blocks (with biases and dropout; without biases)
        (linear_op, (r(9, 20), r(13, 20), r(13), "swiglu", None, None, 1, 0.25, new_seed(), None, r(13, 20), None,
                     r(13))),
        (linear_op, (r(9, 20), r(13, 20), None, "swiglu", None, None, 1, 0.0, None, None, r(13, 20))),
        # proj / fc2 handing the residual stream's LayerNorm statistics to the next layer_norm_linear
        (linear_with_stats_op, (r(9, 20), r(70, 20), r(70), None, r(70), r(9, 70), 1, 0.25, new_seed(),
                                torch.tensor([0.0, 1.5, 1.5], device=device))),
        # fc1 in training, its pre-activation saved for backward
        (linear_saving_pre_op, (r(9, 20), r(30, 20), r(30), "gelu", None, None, 1, 0.25, new_seed())),
        (linear_saving_pre_op, (r(9, 20), r(30, 20), None, "quick_gelu", r(30), r(9, 30), 3)),
        # leading dims: the output is allocated with them (no view of a 2-D result)
        (linear_op, (r(2, 5, 20), r(30, 20), r(30), "gelu", r(30), r(2, 5, 30), 1)),
        (linear_with_stats_op, (r(3, 3, 20), r(70, 20), r(70), None, r(70), r(3, 3, 70), 1)),
        (linear_saving_pre_op, (r(2, 5, 20), r(30, 20), r(30), "silu", None, None, 1, 0.25, new_seed())),
    ]


def _grad_cases(device):
    def r(*shape, scale=1.0):
        return randn(*shape, device=device, scale=scale, grad=True)

    cases = []
    for activation, deinterleave, p in ((None, 3, 0.0), ("gelu", 1, 0.2), ("gelu_tanh", 1, 0.0), ("quick_gelu", 1, 0.2),
                                        ("silu", 1, 0.0)):
        seed = new_seed()
        cases.append(GradCase(
            f"{activation} deinterleave={deinterleave} dropout={p}",
            lambda x, w, b, s, res, a=activation, g=deinterleave, p=p, seed=seed: linear_op(x, w, b, a, s, res, g, p,
                                                                                           seed),
            (r(5, 16), r(24, 16, scale=0.3), r(24), r(24), r(5, 24))))
    factors = torch.tensor([0.0, 1.6, 1.6], device=device)
    cases.append(GradCase("stochastic depth",
                          lambda x, w, s, res: linear_op(x, w, None, "gelu", s, res, 1, 0.0, None, factors),
                          (r(6, 16), r(24, 16, scale=0.3), r(24), r(6, 24))))
    cases.append(GradCase("3 weight/bias row blocks",
                          lambda x, w, w2, w3, b, b2, b3, s, res: linear_op(x, w, b, "gelu", s, res, 1, 0.0, None, None,
                                                                            w2, w3, b2, b3),
                          (r(5, 16), r(8, 16, scale=0.3), r(8, 16, scale=0.3), r(8, 16, scale=0.3), r(8), r(8), r(8),
                           r(24), r(5, 24))))
    seed = new_seed()
    cases.append(GradCase("swiglu gate/up blocks, dropout=0.2",
                          lambda x, wg, wu, bg, bu: linear_op(x, wg, bg, "swiglu", None, None, 1, 0.2, seed, None, wu,
                                                              None, bu),
                          (r(5, 16), r(12, 16, scale=0.3), r(12, 16, scale=0.3), r(12), r(12))))
    seed = new_seed()
    cases.append(GradCase("pre-activation saved, layer scale, dropout=0.2",
                          lambda x, w, b, s, res: linear_saving_pre_op(x, w, b, "gelu", s, res, 1, 0.2, seed)[0],
                          (r(5, 16), r(24, 16, scale=0.3), r(24), r(24), r(5, 24))))
    cases.append(GradCase("layer scale, unequal row blocks",
                          lambda x, w, w2, b, b2, s: linear_op(x, w, b, None, s, None, 1, 0.0, None, None, w2, None,
                                                               b2),
                          (r(5, 16), r(7, 16, scale=0.3), r(11, 16, scale=0.3), r(7), r(11), r(18))))
    return cases


def _examples(device, dtype, batch):
    def r(*shape, scale=1.0):
        return randn(*shape, device=device, dtype=dtype, scale=scale)

    x = r(batch, 5, 20)
    return [((x, r(30, 20, scale=0.3), r(30)), dict(activation="gelu", scale=r(30), residual=r(batch, 5, 30))),
            ((x, r(30, 20, scale=0.3)), dict(deinterleave=3)),
            ((r(batch, 24), r(7, 24, scale=0.3), r(7)), dict(activation="gelu_tanh")),
            ((x, r(30, 20, scale=0.3), r(30)), dict(activation="quick_gelu")),
            ((x, r(30, 20, scale=0.3)), dict(activation="silu")),
            # SwiGLU: the two row halves of a packed [2H, K] weight as gate and up blocks
            ((x, r(26, 20, scale=0.3).chunk(2), r(26).chunk(2)), dict(activation="swiglu")),
            # Hugging Face's q/k/v: three weight and bias blocks, read in place
            ((x, tuple(r(10, 20, scale=0.3) for _ in range(3)), tuple(r(10) for _ in range(3))),
             dict(scale=r(30), residual=r(batch, 5, 30)))]


def _bench(size, batch, dtype, device):
    e = size["emb"]
    m = batch * ((size["img"] // size["patch"]) ** 2 + 1)
    for label, n, k, act, residual in [("qkv", 3 * e, e, None, False), ("proj+residual", e, e, None, True),
                                       ("fc1+gelu", 4 * e, e, "gelu", False), ("fc2+residual", e, 4 * e, None, True)]:
        x = randn(m, k, dtype=dtype, device=device)
        w, b = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5), randn(n, dtype=dtype, device=device)
        r = randn(m, n, dtype=dtype, device=device) if residual else None

        def eager(x=x, w=w, b=b, r=r, act=act):
            y = F.linear(x, w, b)
            y = F.gelu(y) if act else y
            return y if r is None else y + r

        yield BenchCase(lambda x=x, w=w, b=b, r=r, act=act: linear(x, w, b, activation=act, residual=r),
                        {"F.linear+epilogue": eager}, flops=2 * m * n * k, label=label)


register(OpSpec(
    name="linear",
    fn=linear,
    summary="GEMM + bias + GELU (erf or tanh) / quick-GELU / SiLU + dropout + layer scale + stochastic depth + "
            "residual add, autotuned over two engines (cp.async tiles; on sm_90 persistent programs on TMA "
            "descriptors; at small M also 16/32-row tiles, and split-K with a fixed-order reduction chosen per shape "
            "by timing); can write the tutorial's interleaved qkv as contiguous q/k/v; SwiGLU (silu(gate) * up "
            "from two weight blocks) in one GEMM",
    kernels=(KernelGrid(LINEAR, VARIANTS + PDL_VARIANTS), KernelGrid(LINEAR_GRAD, GRAD_VARIANTS),
             KernelGrid(LINEAR_GLU, GLU_VARIANTS),
             KernelGrid(LINEAR_TMA, TMA_VARIANTS, only=lambda meta: meta.get("PERSISTENT", False)),
             KernelGrid(SPLIT_K, SPLIT_K_VARIANTS), KernelGrid(SPLIT_K_REDUCE, SPLIT_K_REDUCE_VARIANTS)),
    custom_ops=(linear_op, linear_with_stats_op, linear_saving_pre_op),
    opcheck_samples=_opcheck_samples,
    grad_cases=_grad_cases,
    examples=_examples,
    bench=_bench,
))
