"""Classification head: token pooling + LayerNorm in one kernel, then the shared GEMM for the Linear.

Pooling modes: ``"mean"`` over tokens ``start..N-1`` (the tutorial: start 0, cls included; timm ``avg``:
start = number of prefix tokens) or ``"token"`` (the single token at ``start``: timm's cls pooling).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validate import check_sample_size, check_tensor
from .dispatch import dispatch
from .launch import Sized, config, launch_grid, new_output, row_major
from .layer_norm import MAX_WIDTH, WIDTHS, check_layer_norm, layer_norm, layer_norm_backward_op, layer_norm_op
from .linear import linear
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_normalize_rows

POOLS = ("mean", "token")


@triton.jit
def _pool_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, E, start, stride_b, stride_n, stride_yb, eps,
                      MEAN: tl.constexpr, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    base = x_ptr + b * stride_b
    if MEAN:
        tokens = tl.arange(0, BLOCK_N)
        total = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        for n0 in range(start, N, BLOCK_N):
            rows = n0 + tokens
            total += tl.load(base + rows[:, None].to(tl.int64) * stride_n + cols[None, :],
                             mask=(rows[:, None] < N) & col_ok[None, :], other=0.0).to(tl.float32)
        pooled = tl.sum(total, axis=0) / (N - start)
    else:
        pooled = tl.load(base + start * stride_n + cols, mask=col_ok, other=0.0).to(tl.float32)
    pooled = pooled[None, :]
    if NORM:
        pooled, _mean, _rstd = tl_normalize_rows(pooled, cols, E, w_ptr, b_ptr, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(y_ptr + b * stride_yb + cols[None, :], pooled.to(y_ptr.dtype.element_ty), mask=col_ok[None, :])


def pool_norm_config(E: int) -> triton.Config:
    """The whole width in one tile, token chunks of ~8K elements. 3 stages: Triton's default, which the launches
    used before the configs were written down (unmeasured against 1)."""
    block_e = triton.next_power_of_2(E)
    return config(4 if block_e <= 2048 else 8, 3, BLOCK_N=max(1, min(64, 8192 // block_e)), BLOCK_E=block_e)


POOL_NORM = Sized("pool_norm", _pool_norm_kernel, pool_norm_config, ("E",), arg_types={"eps": "fp32"},
                  aligned=("stride_b", "stride_n", "stride_yb", "E"))


def pool_norm_launch(x, pool, start, weight, bias, eps, norm):
    x = row_major(x)
    B, N, E = x.shape
    y = new_output((B, E), x.device, x.dtype)
    if B:
        POOL_NORM.launch(lambda meta: launch_grid(B),
                         x, x if weight is None else weight, x if bias is None else bias, y, N, E, start,
                         x.stride(0), x.stride(1), y.stride(0), eps, MEAN=pool == "mean", NORM=norm,
                         HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, config=pool_norm_config(E))
    return y


@torch.library.custom_op("vit_kernels::pool_norm", mutates_args=())
def pool_norm_op(x: torch.Tensor, pool: str, start: int, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float, norm: bool) -> torch.Tensor:
    return pool_norm_launch(x, pool, start, weight, bias, eps, norm)


@pool_norm_op.register_fake
def _(x, pool, start, weight, bias, eps, norm):
    return x.new_empty((x.shape[0], x.shape[2]))


def _pool_norm_setup(ctx, inputs, output):
    x, pool, start, weight, bias, eps, norm = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (pool, start, eps, norm)


def _pool_norm_grad(ctx, dy):
    """[B, E]-sized work: recompute the pooled row, LayerNorm backward with our kernel, spread to tokens."""
    x, weight, bias = ctx.saved_tensors
    pool, start, eps, norm = ctx.args
    pooled = x[:, start:].float().mean(1).to(x.dtype) if pool == "mean" else x[:, start].contiguous()
    dw = db = None
    if norm:
        _, mean, rstd = layer_norm_op(pooled, weight, bias, eps)
        dpooled, dw, db = layer_norm_backward_op(dy, pooled, weight, mean, rstd)
    else:
        dpooled = dy
    before = torch.zeros_like(x[:, :start])
    if pool == "mean":
        spread = (dpooled.float() / (x.shape[1] - start)).to(x.dtype)[:, None, :]
        dx = torch.cat([before, spread.expand(-1, x.shape[1] - start, -1)], dim=1)
    else:
        dx = torch.cat([before, dpooled[:, None, :].to(x.dtype), torch.zeros_like(x[:, start + 1:])], dim=1)
    return dx, None, None, dw if weight is not None else None, db if bias is not None else None, None, None


pool_norm_op.register_autograd(_pool_norm_grad, setup_context=_pool_norm_setup)


@planned
def pool_tokens(x: torch.Tensor, pool: str = "mean", start: int = 0, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5, norm: bool = True) -> torch.Tensor:
    """[B, N, E] -> [B, E]: mean of tokens ``start:`` or the token at ``start``, then LayerNorm if ``norm``."""
    check_tensor("x", x, dims=3)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    N = x.shape[1]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < N:
        raise ValueError(f"start token {start!r} outside the {N} tokens")
    check_sample_size("x", x.shape[1] * x.stride(1))
    if x.shape[2] > MAX_WIDTH:
        raise ValueError(f"width {x.shape[2]} exceeds the kernel's maximum {MAX_WIDTH}")
    if norm:
        check_layer_norm(x, weight, bias, eps)
    return dispatch((x,), lambda: pool_tokens_torch(x, pool, start, weight, bias, eps, norm), pool_norm_op,
                    pool_norm_launch, lambda: (x, pool, start, weight, bias, float(eps), norm))


def pool_tokens_torch(x, pool, start, weight, bias, eps, norm):
    """The PyTorch fallback, same semantics."""
    pooled = x[:, start:].mean(dim=1) if pool == "mean" else x[:, start]
    return layer_norm(pooled, weight, bias, eps) if norm else pooled


def classification_head(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                        eps: float, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
                        pool: str = "mean", start: int = 0, norm: bool = True) -> torch.Tensor:
    """pool -> LayerNorm -> Linear: the tutorial's head with the defaults, timm's with pool/start."""
    return linear(pool_tokens(x, pool, start, norm_weight, norm_bias, eps, norm), head_weight, head_bias)


# --- registry entry ----------------------------------------------------------------------------------------
def _bench(size, batch, dtype, device):
    e, tokens = size["emb"], (size["img"] // size["patch"]) ** 2 + 1
    x = randn(batch, tokens, e, device=device, dtype=dtype)
    w, b = randn(e, device=device, dtype=dtype), randn(e, device=device, dtype=dtype)
    yield BenchCase(lambda: pool_tokens(x, "mean", 1, w, b, 1e-6),
                    {"mean+F.layer_norm": lambda: torch.nn.functional.layer_norm(x[:, 1:].mean(1), (e,), w, b, 1e-6)},
                    nbytes=x.numel() * x.element_size(), label="mean")


def _grad_cases(device):
    return [GradCase(f"{pool} from {start}", lambda x, w, b, pool=pool, start=start: pool_norm_op(
                x, pool, start, w, b, 1e-5, True),
                tuple(randn(*shape, device=device, grad=True) for shape in ((2, 5, 24), (24,), (24,))))
            for pool, start in (("mean", 1), ("token", 0))]


register(OpSpec(
    name="pool_tokens",
    fn=pool_tokens,
    summary="token mean or cls select + LayerNorm in one kernel (`ops.classification_head` adds the GEMM)",
    kernels=(KernelGrid(POOL_NORM, tuple(dict(E=e, MEAN=mean, NORM=True, HAS_WEIGHT=True, HAS_BIAS=True)
                                         for e in WIDTHS for mean in (True, False))),),
    custom_ops=(pool_norm_op,),
    opcheck_samples=lambda device: [
        (pool_norm_op, (randn(2, 9, 24, device=device, grad=True), "mean", 1, randn(24, device=device, grad=True),
                        randn(24, device=device, grad=True), 1e-5, True)),
        (pool_norm_op, (randn(2, 9, 24, device=device, grad=True), "token", 0, None, None, 1e-5, False))],
    grad_cases=_grad_cases,
    examples=lambda device, dtype, batch: [
        ((randn(batch, 9, 40, device=device, dtype=dtype), "mean", 1, randn(40, device=device, dtype=dtype),
          randn(40, device=device, dtype=dtype), 1e-6), {}),
        ((randn(batch, 9, 40, device=device, dtype=dtype), "token", 2), dict(norm=False))],
    bench=_bench,
))
