"""Dropout from a counter-based RNG (Philox): masks are recomputed, never stored.

Whether an element survives depends only on (seed, row, column, stream). The kernels that drop something
(the GEMM epilogue, the attention tile, this standalone kernel) draw the mask where they produce the
values, and backward regenerates the very same mask from the saved seed. A surviving element is scaled by
1 / (1 - p), as ``nn.Dropout`` does.

Seeds are CPU int64 tensors drawn from PyTorch's default generator (``new_seed``): ``torch.manual_seed``
makes dropout reproducible, no GPU sync is needed to read them, and torch.compile traces the draw like any
other random op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..reference import check_probability
from ._common import (
    Tuned,
    check_tensor,
    config,
    dispatcher_free,
    launch_grid,
    new_output,
    row_major,
    use_kernels,
)


@triton.jit
def dropout_keep(seed, rows, cols, stream, p):
    """[R, C] True where element (rows[r], cols[c]) of ``stream`` survives dropout at rate p.
    rows: int32 indices; cols: contiguous int32 indices starting at a multiple of 4 (every tile here).
    One Philox call, counter (col // 4, row, stream, 0), gives the four words of columns 4q .. 4q + 3:
    a quarter of the rounds of one call per element."""
    R: tl.constexpr = rows.shape[0]
    C: tl.constexpr = cols.shape[0]
    quads = tl.min(tl.reshape(cols, (C // 4, 4)), axis=1) // 4
    zero = rows[:, None] * 0 + quads[None, :] * 0
    w0, w1, w2, w3 = tl.random.philox(seed, quads[None, :] + zero, rows[:, None] + zero, zero + stream, zero)
    # [R, C/4, 2, 2] with [.., a, b] = word 2a + b, flattened in order: column 4q + k gets word k
    bits = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (R, C))
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def apply_dropout(x, seed, rows, cols, stream, p, keep_scale):
    """x [R, C] (fp32) with dropped elements zeroed and survivors scaled by keep_scale = 1 / (1 - p)."""
    return tl.where(dropout_keep(seed, rows, cols, stream, p), x * keep_scale, 0.0)


@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(x_ptr, out_ptr, M, N, stride_xm, stride_om, seed, p, keep_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = apply_dropout(x, seed, rows, cols, 0, p, keep_scale)
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


DROPOUT = Tuned(
    _dropout_kernel,
    configs=[config(4, 1, BLOCK_M=16, BLOCK_N=128), config(8, 1, BLOCK_M=32, BLOCK_N=128)],
    key=["N"],
    interpret_config=dict(BLOCK_M=16, BLOCK_N=64),
)


def new_seed() -> torch.Tensor:
    """A fresh Philox seed: a CPU int64 tensor [1] from PyTorch's default generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def keep_scale(p: float) -> float:
    """What a surviving element is multiplied by; p = 1 drops everything (nn.Dropout gives zeros too)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_args(p: float, seed) -> tuple:
    """The (seed, p, keep_scale) kernel arguments of a dropping kernel; p = 0 needs no seed (the kernel's
    DROPOUT flag is off then)."""
    return (int(seed.item()) if p else 0), float(p), keep_scale(p)


def dropout_launch(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on a 2-D [M, N] tensor with the mask of (seed, row, column); any float dtype, same out."""
    x = row_major(x)
    M, N = x.shape
    out = new_output((M, N), x.device, x.dtype)
    if M * N:
        DROPOUT.launch("dropout", None, lambda meta: launch_grid(triton.cdiv(M, meta["BLOCK_M"]),
                                                                 triton.cdiv(N, meta["BLOCK_N"])),
                       x, out, M, N, x.stride(0), out.stride(0), *dropout_args(p, seed))
    return out


@torch.library.custom_op("vit_kernels::dropout", mutates_args=())
def dropout_op(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return dropout_launch(x, seed, p)


@dropout_op.register_fake
def _(x, seed, p):
    return torch.empty_like(x)


def _dropout_setup(ctx, inputs, output):
    _, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _dropout_grad(ctx, dy):
    (seed,) = ctx.saved_tensors
    return dropout_op(dy, seed, ctx.p), None, None


dropout_op.register_autograd(_dropout_grad, setup_context=_dropout_setup)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` over the last axis of ``x`` (any leading dims), mask from a fresh Philox seed.

    p = 0 or ``training=False`` returns x itself (no launch)."""
    check_tensor("x", x)
    check_probability("p", p)
    if not training or p == 0 or x.numel() == 0:
        return x
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension")
    if not use_kernels(x):
        return F.dropout(x, p)
    x2 = x.reshape(-1, x.shape[-1])
    op = dropout_launch if dispatcher_free(x2) else dropout_op
    return op(x2, new_seed(), float(p)).view(x.shape)
