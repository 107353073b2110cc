"""Dropout from a counter-based RNG (Philox): masks are recomputed, never stored.

Whether an element survives depends only on (seed, row, column, stream). The kernels that drop something
(the GEMM epilogue, the attention tile, this standalone kernel) draw the mask where they produce the
values (``tl_helpers.tl_dropout_keep``), and backward regenerates the very same mask from the saved seed. A
surviving element is scaled by 1 / (1 - p), as ``nn.Dropout`` does.

Seeds are CPU int64 tensors drawn from PyTorch's default generator (``new_seed``): ``torch.manual_seed``
makes dropout reproducible, no GPU sync is needed to read them, and torch.compile traces the draw like any
other random op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..validate import check_probability, check_tensor
from .dispatch import dispatch
from .launch import Tuned, cdiv, config, launch_grid, new_output, row_major
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_apply_dropout


@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(x_ptr, out_ptr, M, N, stride_xm, stride_om, seed, p, keep_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl_apply_dropout(x, seed, rows, cols, 0, p, keep_scale)
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


DROPOUT = Tuned(
    "dropout", _dropout_kernel,
    configs=[config(4, 1, BLOCK_M=16, BLOCK_N=128), config(8, 1, BLOCK_M=32, BLOCK_N=128)],
    key=["N"],
    interpret_config=dict(BLOCK_M=16, BLOCK_N=64),
    arg_types={"p": "fp32", "keep_scale": "fp32"},
    aligned=("stride_xm", "stride_om"),
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
        DROPOUT.launch(lambda meta: launch_grid(cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"])),
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
    x2 = x.reshape(-1, x.shape[-1])
    return dispatch((x,), lambda: F.dropout(x, p), dropout_op, dropout_launch, lambda: (x2, new_seed(), float(p)),
                    finish=lambda out: out.view(x.shape))


# --- registry entry ----------------------------------------------------------------------------------------
def _bench(size, batch, dtype, device):
    tokens = (size["img"] // size["patch"]) ** 2 + 1
    x = randn(batch, tokens, size["emb"], device=device, dtype=dtype)
    yield BenchCase(lambda: dropout(x, 0.1), {"F.dropout": lambda: F.dropout(x, 0.1)},
                    nbytes=2 * x.numel() * x.element_size(), exact=False)


def _grad_cases(device):
    seed = new_seed()  # fixed: finite differences need a deterministic function
    return [GradCase("p=0.4", lambda x: dropout_op(x, seed, 0.4), (randn(5, 24, device=device, grad=True),))]


register(OpSpec(
    name="dropout",
    fn=dropout,
    summary="standalone dropout (the embedding dropout of timm/torchvision/HF); masks from Philox, regenerated "
            "in backward",
    kernels=(KernelGrid(DROPOUT, ({},)),),
    custom_ops=(dropout_op,),
    opcheck_samples=lambda device: [(dropout_op, (randn(6, 40, device=device, grad=True), new_seed(), 0.4))],
    grad_cases=_grad_cases,
    examples=lambda device, dtype, batch: [((randn(batch, 7, 36, device=device, dtype=dtype), 0.3), {})],
    bench=_bench,
    random=True,
))
