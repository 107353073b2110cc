"""LayerNorm folded into the next GEMM: ``linear(layer_norm(x))`` in one launch, no normalized copy of x.

The GEMM reads the raw residual stream x and normalizes each x tile in its K loop, in fp32, rounding the
result to x's dtype exactly as ``ops.layer_norm`` stores it: the tensor cores see the unfused path's operand,
so the numerics are the unfused path's. The rows' statistics must be known before the loop:

- from the producer of x: ``ops.linear(..., norm_stats=True)`` (proj + residual, fc2 + residual) writes,
  from the values it stores, each row's mean and sum of squared deviations per chunk of columns; this GEMM
  merges a row's few chunks (Chan's formula, exact, no E[x^2] - E[x]^2 cancellation). Pass them as ``stats``.
- without them (the first block, a stream made elsewhere): a pass over the tile's rows before the K loop,
  merged per K tile the same way. Still one launch, but every column tile re-reads its rows once more.

Why not fold the norm into the weights (W diag(gamma), an epilogue correction): that needs copies of the
weights cached per parameter version, which a write through ``.data`` (weight averaging, EMA) would leave
stale, and it changes the rounding (benchmarks/NOTES.md, item 12, measures both on ViT-like streams).

Backward is the unfused path's, exactly: LayerNorm recomputed (``ops.layer_norm``'s kernel, nothing saved but
x and, with an activation, the GEMM's pre-activation: ``linear.saves_pre``), the GEMM's backward
(``linear_backward``), then LayerNorm's backward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..validate import check_device, check_eps, check_vector
from .dispatch import dispatch
from .dropout import new_seed
from .launch import Tuned
from .layer_norm import layer_norm, layer_norm_backward_op, layer_norm_op
from .linear import (
    BIAS_ARGS,
    LINEAR,
    LINEAR_ARGS,
    LINEAR_GLU,
    PLAIN,
    RESIDUAL_ARG,
    SCALE_ARG,
    STATS_CHUNK,
    WEIGHT_ARGS,
    check_public_linear,
    chunk_stats,
    fake_output,
    gemm_launch,
    later_blocks,
    leading,
    linear,
    linear_backward,
    linear_torch,
    present,
    saves_pre,
    with_pdl,
)
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register


def norm_fits_arch(meta: dict, flags: dict, arch: int) -> bool:
    """128x256 normalizing tiles that spill 8 bytes (compile check, since the epilogue became the shared
    tl_store_tile): on sm_80 with a residual, on sm_90 with three weight blocks (Hugging Face's q/k/v)."""
    if meta["BLOCK_N"] <= 128:
        return True
    return not (flags.get("HAS_RESIDUAL") if arch < 90 else flags.get("WEIGHT_BLOCKS", 1) > 1)


# Separate launchers (the same kernel and configs as ops.linear's) so launch counts name the fused op.
LAYER_NORM_LINEAR = Tuned("layer_norm_linear", LINEAR.kernel, configs=LINEAR.configs, keep=LINEAR.keep,
                          arch_keep=norm_fits_arch, size_keep=LINEAR.size_keep, **LINEAR_ARGS)
LAYER_NORM_LINEAR_GLU = Tuned("layer_norm_linear", LINEAR.kernel, configs=LINEAR_GLU.configs,
                              arch_keep=LINEAR_GLU.arch_keep, **LINEAR_ARGS)


def layer_norm_linear_launch(x, norm_weight, norm_bias, eps, stats, weight, bias, activation, scale, residual,
                             deinterleave, dropout, seed, branch_scale, weight2, weight3, bias2, bias3, config=None,
                             pre_out=False):
    """The GEMM with the LayerNorm applied to its x tiles, on x [..., K] (the output has x's leading dims);
    ``stats``: x's chunk statistics [rows, chunks, 2] from its producer, or None (a pass over x's rows first).
    ``pre_out``: returns (output, pre-activation)."""
    weights = present(weight, weight2, weight3)
    biases = None if bias is None else present(bias, bias2, bias3)
    launcher = LAYER_NORM_LINEAR_GLU if activation == "swiglu" else LAYER_NORM_LINEAR
    return gemm_launch(launcher, x, weights, biases, activation, scale, residual, deinterleave, dropout, seed,
                       branch_scale, norm=(norm_weight, norm_bias, eps, stats), config=config, pre_out=pre_out)


@torch.library.custom_op("vit_kernels::layer_norm_linear", mutates_args=())
def layer_norm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                         eps: float, stats: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                         activation: str | None, scale: torch.Tensor | None, residual: torch.Tensor | None,
                         deinterleave: int, dropout: float, seed: torch.Tensor | None,
                         branch_scale: torch.Tensor | None, weight2: torch.Tensor | None,
                         weight3: torch.Tensor | None, bias2: torch.Tensor | None,
                         bias3: torch.Tensor | None) -> torch.Tensor:
    """The LayerNorm + GEMM on 2-D x as a torch.library op (arguments: the norm's, x's statistics, then
    ``linear_op``'s)."""
    return layer_norm_linear_launch(x, norm_weight, norm_bias, eps, stats, weight, bias, activation, scale, residual,
                                    deinterleave, dropout, seed, branch_scale, weight2, weight3, bias2, bias3)


@layer_norm_linear_op.register_fake
def _(x, norm_weight, norm_bias, eps, stats, weight, bias, activation, scale, residual, deinterleave, dropout, seed,
      branch_scale, weight2, weight3, bias2, bias3):
    return fake_output(x, activation, weight, weight2, weight3)


@torch.library.custom_op("vit_kernels::layer_norm_linear_saving_pre", mutates_args=())
def layer_norm_linear_saving_pre_op(x: torch.Tensor, norm_weight: torch.Tensor | None,
                                    norm_bias: torch.Tensor | None, eps: float, stats: torch.Tensor | None,
                                    weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                                    scale: torch.Tensor | None, residual: torch.Tensor | None, deinterleave: int,
                                    dropout: float, seed: torch.Tensor | None, branch_scale: torch.Tensor | None,
                                    weight2: torch.Tensor | None, weight3: torch.Tensor | None,
                                    bias2: torch.Tensor | None,
                                    bias3: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer_norm_linear_op`` plus the GEMM's pre-activation (not differentiable), saved for backward."""
    return layer_norm_linear_launch(x, norm_weight, norm_bias, eps, stats, weight, bias, activation, scale, residual,
                                    deinterleave, dropout, seed, branch_scale, weight2, weight3, bias2, bias3,
                                    pre_out=True)


@layer_norm_linear_saving_pre_op.register_fake
def _(x, norm_weight, norm_bias, eps, stats, weight, bias, activation, scale, residual, deinterleave, dropout, seed,
      branch_scale, weight2, weight3, bias2, bias3):
    out = fake_output(x, activation, weight, weight2, weight3)
    return out, torch.empty_like(out)


def layer_norm_linear_recorded(*args):
    """``layer_norm_linear_op``, or under autograd with an activation the op saving its pre-activation."""
    if saves_pre(args[7], args):
        return layer_norm_linear_saving_pre_op(*args)[0]
    return layer_norm_linear_op(*args)


# argument positions in layer_norm_linear_op -> linear_op's (for linear_backward's needs_input_grad)
_LINEAR_POSITIONS = {0: 0, 5: 1, 6: 2, 8: 4, 9: 5, 14: 10, 15: 11, 16: 12, 17: 13}
_NORM_ARGS = (1, 2)


def _setup(ctx, inputs, output, pre=None):
    (x, norm_weight, norm_bias, eps, _stats, weight, bias, activation, scale, _residual, deinterleave, dropout, seed,
     branch_scale, weight2, weight3, bias2, bias3) = inputs
    ctx.save_for_backward(x, norm_weight, norm_bias, weight, bias, scale, seed, branch_scale, weight2, weight3, bias2,
                          bias3, pre)
    ctx.eps, ctx.activation, ctx.deinterleave, ctx.dropout = eps, activation, deinterleave, dropout


def _grad(ctx, dy):
    x, norm_weight, norm_bias, weight, bias, scale, seed, branch_scale, weight2, weight3, bias2, bias3, pre = \
        ctx.saved_tensors
    needs = ctx.needs_input_grad
    linear_needs = [False] * 14
    for ours, theirs in _LINEAR_POSITIONS.items():
        linear_needs[theirs] = needs[ours]
    linear_needs[0] = needs[0] or any(needs[i] for i in _NORM_ARGS)  # d(normalized x) feeds all three
    shape = x.shape
    x = x.reshape(-1, x.shape[-1])  # as rows
    normed, mean, rstd = layer_norm_op(x, norm_weight, norm_bias, ctx.eps)
    weights = present(weight, weight2, weight3)
    biases = None if bias is None else present(bias, bias2, bias3)
    dnormed, dws, dbs, dscale = linear_backward(dy, normed, weights, biases, ctx.activation, scale, ctx.deinterleave,
                                                ctx.dropout, seed, branch_scale, linear_needs, pre)
    dx = dnorm_weight = dnorm_bias = None
    if linear_needs[0]:
        dx, dnorm_weight, dnorm_bias = layer_norm_backward_op(dnormed, x, norm_weight, mean, rstd)
        dx = dx.view(shape)
    dws, dbs = [*dws, None, None][:3], [*dbs, None, None][:3]
    return (dx if needs[0] else None, dnorm_weight if norm_weight is not None and needs[1] else None,
            dnorm_bias if norm_bias is not None and needs[2] else None, None, None, dws[0], dbs[0], None, dscale,
            dy if needs[9] else None, None, None, None, None, dws[1], dws[2], dbs[1], dbs[2])


layer_norm_linear_op.register_autograd(_grad, setup_context=_setup)


def _saving_pre_setup(ctx, inputs, output):
    _setup(ctx, inputs, output, output[1])
    ctx.mark_non_differentiable(output[1])


layer_norm_linear_saving_pre_op.register_autograd(lambda ctx, dy, _dpre: _grad(ctx, dy),
                                                  setup_context=_saving_pre_setup)

# linear_backward reads its needs by linear_op's positions; these keep the two tables honest
assert {_LINEAR_POSITIONS[k] for k in (5, 14, 15)} == set(WEIGHT_ARGS)
assert {_LINEAR_POSITIONS[k] for k in (6, 16, 17)} == set(BIAS_ARGS)
assert (_LINEAR_POSITIONS[8], _LINEAR_POSITIONS[9]) == (SCALE_ARG, RESIDUAL_ARG)


def layer_norm_linear_torch(x, norm_weight, norm_bias, weight, bias=None, eps=1e-5, activation=None, scale=None,
                            residual=None, deinterleave=1, dropout=0.0, branch_scale=None):
    """The PyTorch fallback: F.layer_norm, then ``linear_torch``."""
    h = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
    return linear_torch(h, weight, bias, activation, scale, residual, deinterleave, dropout, branch_scale)


def check_stats(stats, x2: torch.Tensor) -> None:
    """``stats`` as ``ops.linear(..., norm_stats=True)`` returns them for x (rows of x2 [M, K])."""
    if stats is None:
        return
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.float32:
        what = stats.dtype if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise TypeError(f"stats must be the float32 tensor ops.linear(..., norm_stats=True) returns, got {what}")
    expected = (x2.shape[0], -(-x2.shape[1] // STATS_CHUNK), 2)
    if tuple(stats.shape) != expected:
        raise ValueError(f"stats has shape {tuple(stats.shape)}; for x with {x2.shape[0]} rows of {x2.shape[1]} "
                         f"features it must be {expected} (ops.linear(..., norm_stats=True) of x itself)")
    check_device("stats", stats, x2.device)


@planned
def layer_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                      weight: torch.Tensor | Sequence[torch.Tensor],
                      bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None, *, eps: float = 1e-5,
                      stats: torch.Tensor | None = None, activation: str | None = None,
                      scale: torch.Tensor | None = None, residual: torch.Tensor | None = None, deinterleave: int = 1,
                      dropout: float = 0.0, branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.linear(ops.layer_norm(x, norm_weight, norm_bias, eps), weight, bias, ...)`` in one GEMM launch,
    never writing the normalized x. Every keyword after ``stats`` is ``ops.linear``'s, with its meaning (row
    blocks, deinterleave, swiglu included); norm_weight / norm_bias are the LayerNorm's (None: 1 / 0).

    stats: x's LayerNorm statistics as ``x, stats = ops.linear(..., norm_stats=True)`` returned them with x
    (it is the caller's promise that x has not changed since); None: the kernel gathers them with a pass over
    x's rows before its K loop."""
    x2, _, weights, biases = check_public_linear(x, weight, bias, activation, scale, residual, deinterleave,
                                                 dropout, branch_scale)
    check_eps(eps)
    check_vector("norm_weight", norm_weight, x.shape[-1], x.dtype, x.device)
    check_vector("norm_bias", norm_bias, x.shape[-1], x.dtype, x.device)
    check_stats(stats, x2)
    lead = x.shape[:-1]
    return dispatch(
        (x,), lambda: layer_norm_linear_torch(x, norm_weight, norm_bias, weights, biases, eps, activation, scale,
                                              residual, deinterleave, dropout, branch_scale),
        layer_norm_linear_recorded, layer_norm_linear_launch,
        lambda: (x, norm_weight, norm_bias, float(eps), stats, weights[0], None if biases is None else biases[0],
                 activation, scale, leading(residual, lead), deinterleave, float(dropout),
                 new_seed() if dropout else None, branch_scale, *later_blocks(weights), *later_blocks(biases)))


# --- registry entry ----------------------------------------------------------------------------------------
NORMED = {**PLAIN, "NORM_STATS": "partials", "NORM_WEIGHT": True, "NORM_BIAS": True}
# What the norm adds (the statistics, the tile normalization) on the epilogues it meets in ViTs; the
# activations' own code is ops.linear's, compiled there in every variant.
VARIANTS = (
    {**NORMED, "NORM_STATS": "prepass"},  # qkv after a stream made elsewhere (the first block)
    {**NORMED, "DEINTERLEAVE": 3},  # the tutorial's qkv
    {**NORMED, "WEIGHT_BLOCKS": 3},  # Hugging Face's q/k/v
    {**NORMED, "ACTIVATION": "gelu"},  # fc1
    {**NORMED, "ACTIVATION": "gelu", "DROPOUT": True},  # fc1 in training
    *({**NORMED, "ACTIVATION": "gelu", "DROPOUT": drop, "PRE_OUT": True} for drop in (False, True)),  # saving pre
    {**NORMED, "NORM_STATS": "prepass", "HAS_SCALE": True, "HAS_RESIDUAL": True},  # proj / fc2 after an inner norm
)
# inside the graph runner's PDL captures (sm_90 only): every inference variant (ops/linear.py's PDL_VARIANTS)
PDL_VARIANTS = tuple(with_pdl(v) for v in VARIANTS if not v["DROPOUT"] and not v.get("PRE_OUT"))
GLU_VARIANTS = (*({**NORMED, "ACTIVATION": "swiglu", "WEIGHT_BLOCKS": 2, "DROPOUT": drop} for drop in (False, True)),
                with_pdl({**NORMED, "ACTIVATION": "swiglu", "WEIGHT_BLOCKS": 2}))


def _opcheck_samples(device):
    def r(*shape):
        return randn(*shape, device=device, grad=True)

    def sample(x, nw, nb, stats, w, b, activation=None, scale=None, residual=None, deinterleave=1, dropout=0.0,
               more_weights=(), more_biases=(), op=layer_norm_linear_op):
        weights, biases = (w, *more_weights), (None if b is None else (b, *more_biases))
        return (op, (x, nw, nb, 1e-5, stats, w, b, activation, scale, residual, deinterleave,
                                       dropout, new_seed() if dropout else None, None, *later_blocks(weights),
                                       *later_blocks(biases)))

    x = r(9, 20)
    stats = chunk_stats(x.detach())
    return [sample(x, r(20), r(20), None, r(30, 20), r(30), deinterleave=3),
            sample(x, r(20), r(20), stats, r(30, 20), r(30), "gelu", r(30), r(9, 30), dropout=0.25),
            sample(r(7, 12), None, None, None, r(5, 12), None),
            sample(x, r(20), r(20), stats, r(13, 20), r(13), "swiglu", more_weights=(r(13, 20),), more_biases=(r(13),)),
            sample(x, r(20), None, None, r(10, 20), r(10), more_weights=(r(10, 20), r(10, 20)),
                   more_biases=(r(10), r(10))),
            sample(x, r(20), r(20), stats, r(30, 20), r(30), "gelu", dropout=0.25, op=layer_norm_linear_saving_pre_op),
            sample(r(3, 3, 20), r(20), r(20), None, r(30, 20), r(30), "gelu", r(30), r(3, 3, 30),
                   op=layer_norm_linear_saving_pre_op)]


def _grad_cases(device):
    def r(*shape, scale=1.0):
        return randn(*shape, device=device, scale=scale, grad=True)

    def case(label, activation, deinterleave, p, saving=False):
        seed = new_seed()

        def fn(x, nw, nb, w, b, s, res):
            args = (x, nw, nb, 1e-5, None, w, b, activation, s, res, deinterleave, p, seed if p else None, None, None,
                    None, None, None)
            return layer_norm_linear_saving_pre_op(*args)[0] if saving else layer_norm_linear_op(*args)
        return GradCase(label, fn, (r(5, 16, scale=2.0), r(16), r(16), r(24, 16, scale=0.3), r(24), r(24), r(5, 24)))

    return [case("qkv deinterleave=3", None, 3, 0.0), case("gelu dropout=0.2 scale residual", "gelu", 1, 0.2),
            case("pre-activation saved, gelu dropout=0.2 scale residual", "gelu", 1, 0.2, saving=True)]


def _examples(device, dtype, batch):
    def r(*shape, scale=1.0, shift=0.0):
        return randn(*shape, device=device, dtype=dtype, scale=scale) + shift

    x = r(batch, 5, 20, scale=2.0, shift=3.0)  # rows with a large mean, as residual streams have
    return [((x, r(20), r(20), r(30, 20, scale=0.3), r(30)), dict(deinterleave=3)),
            ((x, r(20), r(20), r(30, 20, scale=0.3), r(30)), dict(activation="gelu", scale=r(30),
                                                                  residual=r(batch, 5, 30))),
            ((x, None, None, r(7, 20, scale=0.3)), dict(eps=1e-6, activation="quick_gelu")),
            ((x, r(20), r(20), r(26, 20, scale=0.3).chunk(2), r(26).chunk(2)), dict(activation="swiglu")),
            ((x, r(20), r(20), tuple(r(10, 20, scale=0.3) for _ in range(3)), tuple(r(10) for _ in range(3))), {})]


def _bench(size, batch, dtype, device):
    e = size["emb"]
    m = batch * ((size["img"] // size["patch"]) ** 2 + 1)
    x = randn(m, e, dtype=dtype, device=device)
    nw, nb = randn(e, dtype=dtype, device=device), randn(e, dtype=dtype, device=device)
    stats = chunk_stats(x)  # as the producing GEMM (proj / fc2 + residual) would hand them over
    for label, n, act in [("LN+qkv", 3 * e, None), ("LN+fc1+gelu", 4 * e, "gelu")]:
        w, b = randn(n, e, dtype=dtype, device=device, scale=e ** -0.5), randn(n, dtype=dtype, device=device)

        def eager(w=w, b=b, act=act):
            y = F.linear(F.layer_norm(x, (e,), nw, nb, 1e-6), w, b)
            return F.gelu(y) if act else y

        def unfused(w=w, b=b, act=act):  # before this op: our LayerNorm kernel, then our GEMM
            return linear(layer_norm(x, nw, nb, 1e-6), w, b, activation=act)

        def ours(w=w, b=b, act=act, stats=None):
            return layer_norm_linear(x, nw, nb, w, b, eps=1e-6, activation=act, stats=stats)

        yield BenchCase(lambda ours=ours: ours(stats=stats),  # statistics handed over, as fc1 gets them
                        {"F.layer_norm+F.linear+epilogue": eager, "ops.layer_norm+ops.linear": unfused,
                         "layer_norm_linear, own pass over x": ours}, flops=2 * m * n * e, label=label)


register(OpSpec(
    name="layer_norm_linear",
    fn=layer_norm_linear,
    summary="LayerNorm applied to the x tiles inside the next GEMM (row statistics from the producing GEMM's "
            "epilogue, or one pass over the rows), with every `ops.linear` epilogue: no normalized copy; the "
            "unfused backward",
    kernels=(KernelGrid(LAYER_NORM_LINEAR, VARIANTS + PDL_VARIANTS), KernelGrid(LAYER_NORM_LINEAR_GLU, GLU_VARIANTS)),
    custom_ops=(layer_norm_linear_op, layer_norm_linear_saving_pre_op),
    opcheck_samples=_opcheck_samples,
    grad_cases=_grad_cases,
    examples=_examples,
    bench=_bench,
))
