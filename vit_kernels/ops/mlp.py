"""A transformer block's MLP under autograd: [LayerNorm] -> fc1 + activation + dropout -> fc2 + epilogue, whose
backward applies fc1's activation gradient inside fc2's dgrad GEMM.

Forward is the two GEMM launches ``ops.linear`` / ``ops.layer_norm_linear`` make (fc1 with the LayerNorm
folded when one is given, storing its pre-activation next to the hidden output; fc2 with its layer scale,
dropout, stochastic depth and residual). The op exists for its backward: as two ops, fc2's backward writes
dh = g2 @ W2 [M, H] and fc1's reads it back with the saved pre-activation to form g1 = dh * mask *
act'(pre) (``_linear_grad_kernel``). Here ``_activation_dgrad_kernel`` computes g2 @ W2 and applies the mask
and act'(pre) in its epilogue, with the column sums of fc1's bias gradient: dh never exists, one [M, H]
16-bit write and read less per block. Whether that beats cuBLAS's GEMM + the separate pass is the card's call:
``guard.choose`` times both per shape (and compares them until "mlp_dgrad" is validated on a GPU).

The rest of backward is the two ops' own: fc2's weight, bias and layer-scale gradients (``gemm_grads``), fc1's
weight gradient and dx by cuBLAS, LayerNorm recomputed and differentiated by its kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..validate import check_eps, check_probability, check_vector
from . import guard
from .dispatch import INTERPRET, dispatch
from .dropout import dropout_args, new_seed
from .launch import Tuned, cdiv, config, dot_precision, launch_grid, new_output, row_major
from .layer_norm import layer_norm_backward_op, layer_norm_op
from .layer_norm_linear import check_stats, layer_norm_linear_launch, layer_norm_linear_op
from .linear import (
    BIAS_ARGS,
    SCALE_ARG,
    WEIGHT_ARGS,
    check_branch_scale,
    check_public_linear,
    chunk_stats,
    gemm_grads,
    grad_epilogue,
    leading,
    linear,
    linear_launch,
    linear_op,
    linear_torch,
    tl_grouped_tile,
    tracing,
)
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register
from .tl_helpers import tl_activation_grad, tl_apply_dropout

# the elementwise activations fc1 may have (swiglu's MLP is ops.linear's two-block GEMM, then fc2)
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")


@triton.jit(do_not_specialize=["seed"])
def _activation_dgrad_kernel(g_ptr, w_ptr, pre_ptr, out_ptr, dbias_part_ptr, M, N, K, stride_gm, stride_wk,
                             stride_pm, stride_om, seed, dropout_p, keep_scale, ACTIVATION: tl.constexpr,
                             DROPOUT: tl.constexpr, NEEDS_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             PART_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = (g @ W) * dropout mask * act'(pre), [M, N]: g [M, K] the gradient of fc2's product, W [K, N] fc2's
    weight as stored (NN: no transposed copy), pre [M, N] fc1's saved pre-activation; the mask is fc1's
    epilogue's (output row, column). NEEDS_DBIAS: each tile stores its fp32 column sums as partial rows of fc1's bias
    gradient, one per PART_M rows (summed on the host in a fixed order: deterministic; PART_M divides every
    BLOCK_M, so the partial count does not depend on the config the autotuner picks)."""
    pid_m, pid_n = tl_grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap around so the main loop only masks K; the epilogue masks them.
    g_ptrs = g_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_gm + offs_k[None, :]
    w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + (offs_n % N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(g_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        g_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    # the epilogue in two column halves, one after the other: half its registers (whole, exact GELU's derivative
    # with the bias sums spills 16-24 bytes on sm_90)
    halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    for half in tl.static_range(2):
        tl_dgrad_epilogue(halves[half], pid_m, pid_n * BLOCK_N + half * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2),
                          offs_m, M, N, pre_ptr, out_ptr, dbias_part_ptr, stride_pm, stride_om, seed, dropout_p,
                          keep_scale, ACTIVATION, DROPOUT, NEEDS_DBIAS, PART_M, BLOCK_M)


@triton.jit
def tl_dgrad_epilogue(acc, pid_m, offs_n, offs_m, M, N, pre_ptr, out_ptr, dbias_part_ptr, stride_pm, stride_om, seed,
                      dropout_p, keep_scale, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
                      NEEDS_DBIAS: tl.constexpr, PART_M: tl.constexpr, BLOCK_M: tl.constexpr):
    """``_activation_dgrad_kernel``'s epilogue on the columns ``offs_n`` of its tile."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if DROPOUT:
        acc = tl_apply_dropout(acc, seed, offs_m, offs_n, 0, dropout_p, keep_scale)
    pre = tl.load(pre_ptr + rows * stride_pm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = tl.where(mask, acc * tl_activation_grad(pre, ACTIVATION), 0.0)  # wrapped rows add nothing to the sums
    tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    if NEEDS_DBIAS:  # the tile's sum in its first partial row, zeros in the others
        sums = tl.sum(acc, axis=0)
        for sub in tl.static_range(BLOCK_M // PART_M):
            part_row = pid_m * (BLOCK_M // PART_M) + sub
            tl.store(dbias_part_ptr + part_row.to(tl.int64) * N + offs_n, sums if sub == 0 else tl.zeros_like(sums),
                     mask=(offs_n < N) & (part_row < tl.cdiv(M, PART_M)))


# ops.linear's pointer tiles, spill-free with this epilogue (compile check, sm_80 / sm_90) once it works on column
# halves (whole, fc1's dropout mask spilled every tile but 64x64 by 96-240 bytes); 128x64 still spills 8 bytes
# on sm_80 with exact GELU's derivative. No 128x256.
DGRAD_CONFIGS = [
    config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    config(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
]
DGRAD_INTERPRET = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
PART_M = 16 if INTERPRET else 64  # <= and dividing every BLOCK_M above (16: the tests cross partial rows)
MLP_DGRAD = Tuned(
    "mlp_dgrad", _activation_dgrad_kernel, configs=DGRAD_CONFIGS,
    key=["M", "N", "K", "ACTIVATION", "DROPOUT", "NEEDS_DBIAS"], interpret_config=DGRAD_INTERPRET,
    arch_keep=lambda meta, flags, arch: arch >= 90 or (meta["BLOCK_M"], meta["BLOCK_N"]) != (128, 64),
    arg_types={"dbias_part_ptr": "*fp32", "dropout_p": "fp32", "keep_scale": "fp32"},
    aligned=("stride_gm", "stride_wk", "stride_pm", "stride_om", "N", "K"),
    quiet_fp=("over",),  # exp overflow in gelu_tanh's sigmoid at large |x|: it saturates right
)


def activation_dgrad_launch(g, weight, pre, activation, dropout, seed, needs_dbias, dtype):
    """``activation_dgrad_torch``'s (g1, dbias) from one ``_activation_dgrad_kernel`` launch."""
    g, weight, pre = (row_major(t) for t in (g, weight, pre))
    M, K = g.shape
    N = weight.shape[1]
    out = new_output((M, N), g.device, dtype)
    parts = new_output((cdiv(M, PART_M), N), g.device, torch.float32) if needs_dbias else None
    if M and N:
        MLP_DGRAD.launch(lambda meta: launch_grid(cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),
                         g, weight, pre, out, g if parts is None else parts, M, N, K, g.stride(0), weight.stride(0),
                         pre.stride(0), out.stride(0), *dropout_args(dropout, seed), ACTIVATION=activation,
                         DROPOUT=dropout > 0, NEEDS_DBIAS=needs_dbias, DOT_PRECISION=dot_precision(g.dtype),
                         PART_M=PART_M)
    return out, None if parts is None else parts.sum(0)


def activation_dgrad_torch(g, weight, pre, activation, dropout, seed, needs_dbias, dtype):
    """The two ops' way: dh = g @ W by cuBLAS, then fc1's gradient epilogue on it (``grad_epilogue``): the
    gradient of fc1's pre-activation (dtype) and its column sums (fp32, or None)."""
    g1, dbias, _ = grad_epilogue(torch.mm(g, weight), pre, None, None, seed, activation, 1, False, needs_dbias, dtype,
                                 dropout)
    return g1, dbias


def activation_dgrad(g, weight, pre, activation, dropout, seed, needs_dbias, dtype):
    """(g1, fc1's bias gradient or None): the fused kernel or the composition, chosen per shape by guard.choose
    (traced backward: the composition)."""
    args = (g, weight, pre, activation)
    more = (seed, needs_dbias, dtype)
    if tracing(g):
        return activation_dgrad_torch(*args, dropout, *more)
    return guard.choose(
        "mlp_dgrad", lambda: (tuple(g.shape), tuple(weight.shape), g.dtype, dtype, activation, dropout > 0, needs_dbias,
                              g.device),
        g, lambda p: activation_dgrad_launch(*args, p, *more), lambda p: activation_dgrad_torch(*args, p, *more),
        dropout)


def two_gemms(linear_fn, normed_fn, args, saving=False):
    """fc1 (LayerNorm folded when ``eps`` is not None) then fc2 on ``mlp_op``'s ``args``, through ``linear_fn`` /
    ``normed_fn``: the launchers or their custom ops (the same positional arguments). ``saving`` (launchers
    only): returns (output, hidden, fc1's pre-activation) for backward."""
    (x, norm_weight, norm_bias, eps, stats, fc1_weight, fc1_bias, activation, hidden_dropout, hidden_seed, fc2_weight,
     fc2_bias, scale, residual, dropout, seed, branch_scale) = args
    pre_out = {"pre_out": True} if saving else {}
    if eps is None:
        first = linear_fn(x, fc1_weight, fc1_bias, activation, None, None, 1, hidden_dropout, hidden_seed, **pre_out)
    else:
        first = normed_fn(x, norm_weight, norm_bias, eps, stats, fc1_weight, fc1_bias, activation, None, None, 1,
                          hidden_dropout, hidden_seed, None, None, None, None, None, **pre_out)
    hidden, pre = first if saving else (first, None)
    out = linear_fn(hidden, fc2_weight, fc2_bias, None, scale, residual, 1, dropout, seed, branch_scale)
    return (out, hidden, pre) if saving else out


def mlp_launch(*args, saving=False):
    """``mlp_op``'s arguments -> two launches (``two_gemms``)."""
    return two_gemms(linear_launch, layer_norm_linear_launch, args, saving)


@torch.library.custom_op("vit_kernels::mlp", mutates_args=())
def mlp_op(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, eps: float | None,
           stats: torch.Tensor | None, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, activation: str,
           hidden_dropout: float, hidden_seed: torch.Tensor | None, fc2_weight: torch.Tensor,
           fc2_bias: torch.Tensor | None, scale: torch.Tensor | None, residual: torch.Tensor | None, dropout: float,
           seed: torch.Tensor | None,
           branch_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, hidden, fc1's pre-activation): the last two not differentiable, kept for backward."""
    return mlp_launch(x, norm_weight, norm_bias, eps, stats, fc1_weight, fc1_bias, activation, hidden_dropout,
                      hidden_seed, fc2_weight, fc2_bias, scale, residual, dropout, seed, branch_scale, saving=True)


@mlp_op.register_fake
def _(x, norm_weight, norm_bias, eps, stats, fc1_weight, fc1_bias, activation, hidden_dropout, hidden_seed,
      fc2_weight, fc2_bias, scale, residual, dropout, seed, branch_scale):
    hidden = x.new_empty((*x.shape[:-1], fc1_weight.shape[0]))
    return x.new_empty((*x.shape[:-1], fc2_weight.shape[0])), hidden, torch.empty_like(hidden)


def mlp_recorded(*args):
    """``mlp_op``'s output when there is a gradient to compute; otherwise (torch.compile's inference) the two GEMM
    ops, which keep nothing for backward."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return mlp_op(*args)[0]
    return two_gemms(linear_op, layer_norm_linear_op, args)


# mlp_op's argument positions (ctx.needs_input_grad)
X, NORM_WEIGHT, NORM_BIAS, FC1_WEIGHT, FC1_BIAS, FC2_WEIGHT, FC2_BIAS, SCALE, RESIDUAL = 0, 1, 2, 5, 6, 10, 11, 12, 13


def _setup(ctx, inputs, output):
    (x, norm_weight, norm_bias, eps, _stats, fc1_weight, fc1_bias, activation, hidden_dropout, hidden_seed,
     fc2_weight, fc2_bias, scale, _residual, dropout, seed, branch_scale) = inputs
    _, hidden, pre = output
    ctx.save_for_backward(x, norm_weight, norm_bias, fc1_weight, fc1_bias, hidden_seed, fc2_weight, fc2_bias, scale,
                          seed, branch_scale, hidden, pre)
    ctx.eps, ctx.activation, ctx.hidden_dropout, ctx.dropout = eps, activation, hidden_dropout, dropout
    ctx.mark_non_differentiable(hidden, pre)


def _grad(ctx, dy, _dhidden, _dpre):
    (x, norm_weight, norm_bias, fc1_weight, fc1_bias, hidden_seed, fc2_weight, fc2_bias, scale, seed, branch_scale,
     hidden, pre) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    below = any(needs[i] for i in (X, NORM_WEIGHT, NORM_BIAS, FC1_WEIGHT, FC1_BIAS))  # all reached through g1
    fc2_needs = [False] * 14  # in linear_op's positions
    fc2_needs[0], fc2_needs[WEIGHT_ARGS[0]], fc2_needs[BIAS_ARGS[0]] = below, needs[FC2_WEIGHT], needs[FC2_BIAS]
    fc2_needs[SCALE_ARG] = needs[SCALE]
    g2, (dw2,), (db2,), dscale = gemm_grads(
        dy.reshape(-1, dy.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), [fc2_weight],
        None if fc2_bias is None else [fc2_bias], None, scale, 1, ctx.dropout, seed, branch_scale, fc2_needs)
    dx = dnorm_weight = dnorm_bias = dw1 = db1 = None
    if below:
        g1, db1 = activation_dgrad(g2, fc2_weight, pre.reshape(-1, pre.shape[-1]), ctx.activation, ctx.hidden_dropout,
                                   hidden_seed, fc1_bias is not None and needs[FC1_BIAS], x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        needs_dx = any(needs[i] for i in (X, NORM_WEIGHT, NORM_BIAS))
        normed, mean, rstd = x2, None, None
        if ctx.eps is not None and (needs[FC1_WEIGHT] or needs_dx):  # recomputed, as layer_norm_linear's backward
            normed, mean, rstd = layer_norm_op(x2, norm_weight, norm_bias, ctx.eps)
        dw1 = torch.mm(g1.t(), normed) if needs[FC1_WEIGHT] else None
        if needs_dx:
            dx = torch.mm(g1, fc1_weight)
            if ctx.eps is not None:
                dx, dnorm_weight, dnorm_bias = layer_norm_backward_op(dx, x2, norm_weight, mean, rstd)
            dx = dx.view(x.shape)
    return (dx if needs[X] else None, dnorm_weight if needs[NORM_WEIGHT] else None,
            dnorm_bias if needs[NORM_BIAS] else None, None, None, dw1, None if db1 is None else db1.to(fc1_bias.dtype),
            None, None, None, dw2, db2, dscale, dy if needs[RESIDUAL] else None, None, None, None)


mlp_op.register_autograd(_grad, setup_context=_setup)


def mlp_torch(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, activation, hidden_dropout, fc2_weight, fc2_bias,
              scale, residual, dropout, branch_scale):
    """The PyTorch fallback: F.layer_norm (when eps is given), then ``linear_torch`` twice."""
    h = x if eps is None else F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
    h = linear_torch(h, fc1_weight, fc1_bias, activation, dropout=hidden_dropout)
    return linear_torch(h, fc2_weight, fc2_bias, None, scale, residual, 1, dropout, branch_scale)


def named(stage: str, check) -> None:
    """Run ``check()``, naming the GEMM (fc1 / fc2) in its error: ops.linear's checks say "weight", "bias"."""
    try:
        check()
    except (TypeError, ValueError) as e:
        raise type(e)(f"{stage}: {e}") from None


def check_mlp(x, norm_weight, norm_bias, eps, stats, fc1_weight, fc1_bias, activation, hidden_dropout, fc2_weight,
              fc2_bias, scale, residual, dropout, branch_scale) -> None:
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {activation!r} (a SwiGLU MLP: "
                         "ops.linear(x, (w_gate, w_up), activation='swiglu'), then fc2)")
    for name, w in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise (ValueError if isinstance(w, torch.Tensor) else TypeError)(
                f"{name} must be a 2-D tensor [out_features, in_features], got "
                f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    check_probability("hidden_dropout", hidden_dropout)
    named("fc1", lambda: check_public_linear(x, fc1_weight, fc1_bias, activation, None, None, 1, 0.0, None))
    check_branch_scale(branch_scale, x)  # against x (fc2's check below sees a stand-in of the hidden activation)
    if fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"fc2_weight has shape {tuple(fc2_weight.shape)}: it must take fc1's "
                         f"{fc1_weight.shape[0]} features (fc1_weight has shape {tuple(fc1_weight.shape)})")
    hidden = x.new_empty(()).expand(*x.shape[:-1], fc1_weight.shape[0])  # what fc2 reads, for its checks
    named("fc2", lambda: check_public_linear(hidden, fc2_weight, fc2_bias, None, scale, residual, 1, dropout, None))
    if eps is None:
        given = [n for n, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("stats", stats))
                 if t is not None]
        if given:
            raise ValueError(f"{', '.join(given)} belong to a LayerNorm, which eps=None leaves out: pass its eps")
        return
    check_eps(eps)
    check_vector("norm_weight", norm_weight, x.shape[-1], x.dtype, x.device)
    check_vector("norm_bias", norm_bias, x.shape[-1], x.dtype, x.device)
    check_stats(stats, x.reshape(-1, x.shape[-1]))


@planned
def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor | None = None, *, activation: str = "gelu", norm_weight: torch.Tensor | None = None,
        norm_bias: torch.Tensor | None = None, eps: float | None = None, stats: torch.Tensor | None = None,
        hidden_dropout: float = 0.0, scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        dropout: float = 0.0, branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + scale * dropout(fc2(dropout(activation(fc1(layer_norm(x))))))``, each stochastic-depth
    sample's rows times ``branch_scale``: a transformer block's MLP, as ``ops.layer_norm_linear`` (or
    ``ops.linear``) for fc1 and ``ops.linear`` for fc2 compute it, with their arguments' meanings.

    eps: the LayerNorm applied to x first (norm_weight / norm_bias: its affine parameters, None: 1 / 0; stats:
    x's statistics from ``ops.linear(..., norm_stats=True)``); None: x goes into fc1 as it is. activation: fc1's,
    an elementwise one (``MLP_ACTIVATIONS``); hidden_dropout after it; scale (layer scale), dropout,
    branch_scale (float32 [B]) and residual on fc2's output.

    Under autograd the op keeps fc1's pre-activation and the hidden activation (what the two ops keep) and its
    backward applies fc1's activation gradient inside fc2's dgrad GEMM (module docstring). Without gradients it
    is the two launches."""
    check_mlp(x, norm_weight, norm_bias, eps, stats, fc1_weight, fc1_bias, activation, hidden_dropout, fc2_weight,
              fc2_bias, scale, residual, dropout, branch_scale)
    lead = x.shape[:-1]
    return dispatch(
        (x,), lambda: mlp_torch(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, activation, hidden_dropout,
                                fc2_weight, fc2_bias, scale, residual, dropout, branch_scale),
        mlp_recorded, mlp_launch,
        lambda: (x, norm_weight, norm_bias, None if eps is None else float(eps), stats, fc1_weight, fc1_bias,
                 activation, float(hidden_dropout), new_seed() if hidden_dropout else None, fc2_weight, fc2_bias,
                 scale, leading(residual, lead), float(dropout), new_seed() if dropout else None, branch_scale))


# --- registry entry ----------------------------------------------------------------------------------------
_DGRAD = dict(ACTIVATION="gelu", DROPOUT=False, NEEDS_DBIAS=True, DOT_PRECISION="tf32", PART_M=64)
DGRAD_VARIANTS = (
    *({**_DGRAD, "ACTIVATION": act} for act in MLP_ACTIVATIONS),
    {**_DGRAD, "DROPOUT": True}, {**_DGRAD, "NEEDS_DBIAS": False}, {**_DGRAD, "DROPOUT": True, "NEEDS_DBIAS": False},
)


def _opcheck_samples(device):
    def r(*shape, scale=1.0):
        return randn(*shape, device=device, scale=scale, grad=True)

    def sample(x, norm, stats, activation, hidden_dropout, scale, residual, dropout, branch_scale=None, bias=True):
        nw, nb, eps = (r(x.shape[-1]), r(x.shape[-1]), 1e-5) if norm else (None, None, None)
        e = x.shape[-1]
        return (mlp_op, (x, nw, nb, eps, stats, r(30, e, scale=e ** -0.5), r(30) if bias else None, activation,
                         hidden_dropout, new_seed() if hidden_dropout else None, r(e, 30, scale=30 ** -0.5),
                         r(e) if bias else None, scale, residual, dropout, new_seed() if dropout else None,
                         branch_scale))

    x = r(9, 20)
    return [sample(x, True, chunk_stats(x.detach()), "gelu", 0.25, r(20), r(9, 20), 0.0),
            sample(r(7, 12), False, None, "quick_gelu", 0.0, None, None, 0.25, bias=False),
            sample(r(3, 3, 20), True, None, "gelu_tanh", 0.0, r(20), r(3, 3, 20), 0.0,
                   torch.tensor([0.0, 2.0, 1.5], device=device))]


def _grad_cases(device):
    def r(*shape, scale=1.0):
        return randn(*shape, device=device, scale=scale, grad=True)

    def case(label, norm, activation, hidden_dropout, dropout):
        hidden_seed, seed = new_seed(), new_seed()

        def fn(x, w1, b1, w2, b2, s, res, nw=None, nb=None):
            return mlp_op(x, nw, nb, 1e-5 if norm else None, None, w1, b1, activation, hidden_dropout,
                          hidden_seed if hidden_dropout else None, w2, b2, s, res, dropout,
                          seed if dropout else None, None)[0]
        return GradCase(label, fn, (r(2, 5, 16, scale=2.0), r(24, 16, scale=0.3), r(24), r(16, 24, scale=0.3), r(16),
                                    r(16), r(2, 5, 16), *((r(16), r(16)) if norm else ())))

    return [case("LayerNorm, gelu, layer scale, residual", True, "gelu", 0.0, 0.0),
            case("no norm, silu, both dropouts", False, "silu", 0.2, 0.3)]


def _examples(device, dtype, batch):
    def r(*shape, scale=1.0, shift=0.0):
        return randn(*shape, device=device, dtype=dtype, scale=scale) + shift

    x = r(batch, 5, 20, scale=2.0, shift=3.0)  # rows with a large mean, as residual streams have
    return [((x, r(36, 20, scale=0.3), r(36), r(20, 36, scale=0.3), r(20)),
             dict(norm_weight=r(20), norm_bias=r(20), eps=1e-6, scale=r(20), residual=x)),
            ((x, r(36, 20, scale=0.3), None, r(20, 36, scale=0.3)), dict(activation="quick_gelu")),
            ((x, r(36, 20, scale=0.3), r(36), r(20, 36, scale=0.3), r(20)), dict(eps=1e-5, activation="gelu_tanh"))]


def _bench(size, batch, dtype, device):
    e = size["emb"]
    m = batch * ((size["img"] // size["patch"]) ** 2 + 1)
    x = randn(m, e, dtype=dtype, device=device, grad=True)
    nw, nb = randn(e, dtype=dtype, device=device), randn(e, dtype=dtype, device=device)
    w1, b1 = randn(4 * e, e, dtype=dtype, device=device, scale=e ** -0.5), randn(4 * e, dtype=dtype, device=device)
    w2, b2 = randn(e, 4 * e, dtype=dtype, device=device, scale=(4 * e) ** -0.5), randn(e, dtype=dtype, device=device)
    params = [w1, b1, w2, b2]
    for p in params:
        p.requires_grad_(True)
    dy = randn(m, e, dtype=dtype, device=device)

    def step(forward):  # forward and the whole backward; dx is what the paths are compared on
        return torch.autograd.grad(forward(), [x, *params], dy)[0]

    def eager():
        return F.linear(F.gelu(F.linear(F.layer_norm(x, (e,), nw, nb, 1e-6), w1, b1)), w2, b2) + x

    def two_ops():
        h = linear(F.layer_norm(x, (e,), nw, nb, 1e-6), w1, b1, activation="gelu")
        return linear(h, w2, b2, residual=x)

    def ours():
        return mlp(x, w1, b1, w2, b2, norm_weight=nw, norm_bias=nb, eps=1e-6, residual=x)

    yield BenchCase(lambda: step(ours), {"PyTorch eager": lambda: step(eager), "ops.linear x2": lambda: step(two_ops)},
                    flops=3 * 2 * 2 * m * 4 * e * e, label="MLP forward + backward")


register(OpSpec(
    name="mlp",
    fn=mlp,
    summary="a block's MLP under autograd: [LayerNorm in] fc1 + activation + dropout, fc2 + its epilogue (two "
            "GEMM launches); backward applies fc1's activation gradient and dropout mask inside fc2's dgrad GEMM",
    kernels=(KernelGrid(MLP_DGRAD, DGRAD_VARIANTS),),
    also_launches=("linear", "layer_norm_linear"),
    custom_ops=(mlp_op,),
    opcheck_samples=_opcheck_samples,
    grad_cases=_grad_cases,
    examples=_examples,
    bench=_bench,
))
