"""LayerNorm over the last axis: fp32 mean/rstd (kept for backward), any width (masked), any eps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..validate import check_eps, check_tensor, check_vector
from .dispatch import dispatch
from .launch import Sized, cdiv, config, launch_grid, new_output, row_major
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_normalize_rows

MAX_WIDTH = 65536  # one row lives in registers/shared memory


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, E, stride_xm, stride_ym, eps,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < E)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = tl_normalize_rows(x, cols, E, w_ptr, b_ptr, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, M, E,
                           rows_per_program, stride_dym, stride_xm, stride_dxm,
                           HAS_WEIGHT: tl.constexpr, BLOCK_E: tl.constexpr):
    """dx for a run of rows, plus this program's fp32 partial sums of dW and dB: a second, fixed-order
    reduction over programs makes the weight gradients deterministic (no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(col_ok, 1.0, 0.0)
    dw_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(rows_per_program):
        row = first + i
        ok = col_ok & (row < M)  # the last program's run may pass M: masked rows add zeros
        x = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dym + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)
        xhat = tl.where(ok, (x - tl.load(mean_ptr + row, mask=row < M, other=0.0)) * rstd, 0.0)
        wdy = w * dy
        dx = (wdy - (xhat * (tl.sum(xhat * wdy, axis=0) / E) + tl.sum(wdy, axis=0) / E)) * rstd
        tl.store(dx_ptr + row * stride_dxm + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(dw_part_ptr + pid * E + cols, dw_acc, mask=col_ok)
    tl.store(db_part_ptr + pid * E + cols, db_acc, mask=col_ok)


def forward_config(E: int) -> triton.Config:
    """Rows per program so a program handles ~4K elements; warps grow with the row width."""
    block_e = triton.next_power_of_2(E)
    rows = max(1, min(16, 4096 // block_e))
    return config(min(16, max(1, block_e * rows // 512)), 3, ROWS=rows, BLOCK_E=block_e)


def backward_config(E: int) -> triton.Config:
    """One row at a time, the whole width in one tile. 3 stages: Triton's default, which the launches used
    before the configs were written down (unmeasured against 1)."""
    block_e = triton.next_power_of_2(E)
    return config(min(16, max(1, block_e // 256)), 3, BLOCK_E=block_e)


STATS_TYPES = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "eps": "fp32"}
LAYER_NORM = Sized("layer_norm", _layer_norm_fwd_kernel, forward_config, ("E",), arg_types=STATS_TYPES,
                   aligned=("stride_xm", "stride_ym", "E"))
LAYER_NORM_BACKWARD = Sized("layer_norm_backward", _layer_norm_bwd_kernel, backward_config, ("E",),
                            arg_types={**STATS_TYPES, "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32"},
                            aligned=("stride_xm", "E"))


def layer_norm_launch(x, weight, bias, eps):
    """x: [M, E] with unit feature stride. Returns (y [M, E] in x's dtype, mean fp32 [M], rstd fp32 [M])."""
    x = row_major(x)
    M, E = x.shape
    y = new_output((M, E), x.device, x.dtype)
    mean = new_output((M,), x.device, torch.float32)
    rstd = new_output((M,), x.device, torch.float32)
    if M:
        LAYER_NORM.launch(lambda meta: launch_grid(cdiv(M, meta["ROWS"])),
                          x, x if weight is None else weight, x if bias is None else bias, y, mean, rstd, M, E,
                          x.stride(0), y.stride(0), eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                          config=forward_config(E))
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    """(dx, dweight, dbias): dx per row in one pass; dW/dB from fp32 per-program partials summed in a fixed
    order. Gradients come back in the dtypes of x and weight."""
    dy, x = row_major(dy), row_major(x)
    M, E = x.shape
    dx = new_output((M, E), x.device, x.dtype)
    programs = max(1, min(M, 4 * _sm_count(x.device)))
    rows_per_program = cdiv(M, programs) if M else 1
    programs = cdiv(M, rows_per_program) if M else 1
    dw_part = torch.zeros((programs, E), device=x.device, dtype=torch.float32)
    db_part = torch.zeros((programs, E), device=x.device, dtype=torch.float32)
    if M:
        LAYER_NORM_BACKWARD.launch(
            lambda meta: launch_grid(programs),
            dy, x, x if weight is None else weight, mean, rstd, dx, dw_part, db_part, M, E, rows_per_program,
            dy.stride(0), x.stride(0), dx.stride(0), HAS_WEIGHT=weight is not None, config=backward_config(E))
    wdtype = x.dtype if weight is None else weight.dtype
    return dx, dw_part.sum(0).to(wdtype), db_part.sum(0).to(wdtype)


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs, each looping over many rows


@torch.library.custom_op("vit_kernels::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of a [M, E] input: a torch.library op, so torch.compile sees through it."""
    return layer_norm_launch(x, weight, bias, eps)


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("vit_kernels::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dy, x, weight, mean, rstd)


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    wdtype = x.dtype if weight is None else weight.dtype
    return x.new_empty(x.shape), x.new_empty((x.shape[1],), dtype=wdtype), x.new_empty((x.shape[1],), dtype=wdtype)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias = bias is not None


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_backward_op(dy, x, weight, mean, rstd)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


def check_layer_norm(x, weight, bias, eps):
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (feature) axis, got shape {tuple(x.shape)}")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"LayerNorm width {x.shape[-1]} exceeds the kernel's maximum {MAX_WIDTH}")
    check_vector("weight", weight, x.shape[-1], x.dtype, x.device)
    check_vector("bias", bias, x.shape[-1], x.dtype, x.device)
    check_eps(eps)


@planned
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last axis of ``x``; output in x's dtype, statistics in fp32."""
    check_layer_norm(x, weight, bias, eps)
    x2 = x.reshape(-1, x.shape[-1])
    return dispatch((x,), lambda: F.layer_norm(x, x.shape[-1:], weight, bias, eps), layer_norm_op,
                    layer_norm_launch, lambda: (x2, weight, bias, float(eps)), finish=lambda out: out[0].view(x.shape))


# --- registry entry ----------------------------------------------------------------------------------------
WIDTHS = (192, 384, 768, 1024, 1280)  # ViT-Ti/S/B/L/H


def _opcheck_samples(device):
    x, w = randn(7, 24, device=device, grad=True), randn(24, device=device, grad=True)
    _, mean, rstd = layer_norm_op(x.detach(), w.detach(), None, 1e-5)
    return [(layer_norm_op, (x, w, randn(24, device=device, grad=True), 1e-5)),
            (layer_norm_op, (randn(5, 33, device=device, grad=True), None, None, 1e-6)),
            (layer_norm_backward_op, (randn(7, 24, device=device), x.detach(), w.detach(), mean, rstd))]


def _bench(size, batch, dtype, device):
    e, tokens = size["emb"], (size["img"] // size["patch"]) ** 2 + 1
    x = randn(batch, tokens, e, device=device, dtype=dtype)
    w, b = randn(e, device=device, dtype=dtype), randn(e, device=device, dtype=dtype)
    yield BenchCase(lambda: layer_norm(x, w, b, 1e-6), {"F.layer_norm": lambda: F.layer_norm(x, (e,), w, b, 1e-6)},
                    nbytes=2 * x.numel() * x.element_size())


register(OpSpec(
    name="layer_norm",
    fn=layer_norm,
    summary="LayerNorm with fp32 statistics, any width, any eps",
    kernels=(KernelGrid(LAYER_NORM, tuple(dict(E=e, HAS_WEIGHT=True, HAS_BIAS=True) for e in WIDTHS)),
             KernelGrid(LAYER_NORM_BACKWARD, tuple(dict(E=e, HAS_WEIGHT=True) for e in WIDTHS))),
    custom_ops=(layer_norm_op, layer_norm_backward_op),
    opcheck_samples=_opcheck_samples,
    grad_cases=lambda device: [GradCase("weight+bias", lambda x, w, b: layer_norm_op(x, w, b, 1e-5)[0],
                                        tuple(randn(*s, device=device, grad=True) for s in ((5, 37), (37,), (37,))))],
    examples=lambda device, dtype, batch: [
        ((randn(batch, 5, 37, device=device, dtype=dtype), randn(37, device=device, dtype=dtype),
          randn(37, device=device, dtype=dtype)), {}),
        ((randn(batch, 33, device=device, dtype=dtype), None, None, 1e-6), {})],
    bench=_bench,
))
