"""LayerNorm over the last axis: fp32 mean/rstd (kept for backward), any width (masked), any eps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    ForwardOnly,
    check_tensor,
    check_vector,
    launch_grid,
    new_output,
    record_launch,
    row_major,
    use_kernels,
)


@triton.jit
def normalize_rows(x, cols, E, w_ptr, b_ptr, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x: fp32 [ROWS, BLOCK_E] with zeros past E. Returns (y, mean, rstd); shared with the head kernel."""
    col_mask = cols < E
    mean = tl.sum(x, axis=1) / E
    centered = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / E + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y, mean, rstd


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
    y, mean, rstd = normalize_rows(x, cols, E, w_ptr, b_ptr, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


MAX_WIDTH = 65536  # one row lives in registers/shared memory


def layer_norm_meta(E: int) -> dict:
    """Rows per program so a program handles ~4K elements; warps grow with the row width."""
    block_e = triton.next_power_of_2(E)
    rows = max(1, min(16, 4096 // block_e))
    warps = min(16, max(1, block_e * rows // 512))
    return dict(ROWS=rows, BLOCK_E=block_e, num_warps=warps)


def layer_norm_launch(x, weight, bias, eps):
    """x: [M, E] with unit feature stride. Returns (y [M, E] in x's dtype, mean fp32 [M], rstd fp32 [M])."""
    x = row_major(x)
    M, E = x.shape
    y = new_output((M, E), x.device, x.dtype)
    mean = new_output((M,), x.device, torch.float32)
    rstd = new_output((M,), x.device, torch.float32)
    if M == 0:
        return y, mean, rstd
    meta = layer_norm_meta(E)
    record_launch("layer_norm")
    _layer_norm_fwd_kernel[launch_grid(triton.cdiv(M, meta["ROWS"]))](
        x, x if weight is None else weight, x if bias is None else bias, y, mean, rstd, M, E,
        x.stride(0), y.stride(0), eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **meta)
    return y, mean, rstd


class LayerNormFunction(ForwardOnly):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, _mean, _rstd = layer_norm_launch(x, weight, bias, eps)
        return y


def check_layer_norm(x, weight, bias, eps):
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (feature) axis, got shape {tuple(x.shape)}")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"LayerNorm width {x.shape[-1]} exceeds the kernel's maximum {MAX_WIDTH}")
    check_vector("weight", weight, x.shape[-1], x.dtype, x.device)
    check_vector("bias", bias, x.shape[-1], x.dtype, x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last axis of ``x``; output in x's dtype, statistics in fp32."""
    check_layer_norm(x, weight, bias, eps)
    if not use_kernels(x):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    x2 = x.reshape(-1, x.shape[-1])
    return LayerNormFunction.apply(x2, weight, bias, float(eps)).view(x.shape)
