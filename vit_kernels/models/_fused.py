"""Pieces shared by the framework patches: the fused encoder block, the dtype/autocast policy, dropout rates,
patch-time checks and the fused LayerNorm forward."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import ops
from ..ops import guard
from ..ops.dispatch import Flag
from ..ops.linear import as_blocks, saves_pre
from ..ops.mlp import MLP_ACTIVATIONS
from .patching import patch

AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def autocast_on(x: torch.Tensor) -> bool:
    device_type = x.device.type
    return device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: autocast's when it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if autocast_on(x) else x.dtype


@contextlib.contextmanager
def explicit_dtypes(x: torch.Tensor):
    """Every cast is explicit inside a fused forward, so autocast must not re-cast the fallback ops. Read the
    compute dtype (``compute_dtype``) before entering: inside, autocast is off."""
    if x.device.type not in AUTOCAST_DEVICES:  # meta: no autocast to switch off
        yield
        return
    with torch.autocast(x.device.type, enabled=False):
        yield


def caster(dtype: torch.dtype):
    """t -> t in ``dtype`` (None stays None; a tuple of tensors, e.g. q/k/v weights, is cast element-wise)."""
    def cast(t):
        if t is None:
            return None
        return tuple(u.to(dtype) for u in t) if isinstance(t, tuple) else t.to(dtype)
    return cast


def check_input(where: str, param: torch.Tensor, x) -> None:
    """What a PyTorch module demands of its input: a floating tensor on the parameters' device, and outside
    autocast their dtype."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if param.device != x.device:
        raise ValueError(f"{where}: input is on {x.device} but the parameters are on {param.device}")
    if x.dtype != param.dtype and not autocast_on(x):
        raise TypeError(f"{where}: input dtype {x.dtype} differs from the parameters' ({param.dtype}); convert one "
                        f"of them (e.g. model.to({x.dtype})) or run under torch.autocast")


def check_image_batch(conv: nn.Conv2d, x) -> None:
    """A floating [B, C, H, W] image batch with the patch projection's channel count (ValueError otherwise)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"expected a floating-point image batch [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"expected {conv.in_channels} input channels, got {x.shape[1]}")


def classification_head(x: torch.Tensor, norm: nn.LayerNorm, fc: nn.Linear, pool: str) -> torch.Tensor:
    """pool (``"mean"`` of all tokens or ``"token"`` 0) -> LayerNorm -> Linear in the compute dtype, two kernels."""
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        return ops.classification_head(cast(x), cast(norm.weight), cast(norm.bias), norm.eps, cast(fc.weight),
                                       cast(fc.bias), pool=pool, start=0)


def drop_rate(module: nn.Module | None, training: bool) -> float:
    """The rate a dropout module applies in this forward: its ``p`` in train mode, else 0."""
    return float(module.p) if training and module is not None else 0.0


def drop_path_factors(module: nn.Module | None, batch: int, training: bool, device) -> torch.Tensor | None:
    """timm's DropPath as per-sample factors: fp32 [B] of 0 or 1 / keep (or 1 without ``scale_by_keep``),
    drawn from PyTorch's generator like timm's own ``bernoulli_``; None when nothing is dropped."""
    p = float(getattr(module, "drop_prob", 0.0) or 0.0) if training and module is not None else 0.0
    if not p:
        return None
    keep = 1.0 - p
    factors = torch.empty(batch, device=device, dtype=torch.float32).bernoulli_(keep)
    if keep > 0.0 and getattr(module, "scale_by_keep", True):
        factors.div_(keep)
    return factors


def is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def check_layer_norm(where: str, module, allow_identity: bool = False) -> None:
    """Patch-time check: an nn.LayerNorm over the last axis (or, if allowed, nothing)."""
    if allow_identity and is_identity(module):
        return
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        raise NotImplementedError(f"{where} of type {type(module).__name__} is not supported by the vit_kernels "
                                  f"kernels (only nn.LayerNorm over the last axis)")


def check_head_dim(where: str, width: int, heads: int) -> None:
    """Patch-time check of what ``ops.attention`` accepts, so a model is refused before its first forward."""
    if heads < 1 or width % heads:
        raise NotImplementedError(f"{where}: width {width} is not divisible into {heads} heads")
    if width // heads > ops.MAX_HEAD_DIM:
        raise NotImplementedError(f"{where}: head_dim {width // heads} exceeds the attention kernel's maximum of "
                                  f"{ops.MAX_HEAD_DIM}")


def layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm.forward on the fused kernel, dtypes as PyTorch: under autocast layer_norm computes and
    returns fp32; otherwise x's dtype."""
    if self.weight is not None:
        check_input(type(self).__name__, self.weight, x)
    if autocast_on(x):
        x = x.float()
    with explicit_dtypes(x):
        cast = caster(x.dtype)
        return ops.layer_norm(x, cast(self.weight), cast(self.bias), self.eps)


def patch_layer_norm(module) -> None:
    """Put an nn.LayerNorm (checked at patch time) on the fused kernel; nn.Identity stays as it is."""
    if not is_identity(module):
        patch(module, "forward", layer_norm_forward)


_attention_maps: list | None = None  # set while ``recording_attention_maps`` is active


@contextlib.contextmanager
def recording_attention_maps():
    """Inside the block, every fused encoder block also appends its attention probabilities
    [B, heads, N, N] (``ops.attention_probabilities``, a separate kernel) to the yielded list."""
    global _attention_maps
    previous, _attention_maps = _attention_maps, []
    try:
        yield _attention_maps
    finally:
        _attention_maps = previous


def qk_norm_kind(module) -> str | None:
    """"layer" / "rms" for a per-head q or k norm the attention kernel applies in its prologue; None for none."""
    if is_identity(module):
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layer"
    if type(module).__name__ in ("RmsNorm", "RMSNorm") and len(getattr(module, "normalized_shape", (0, 0))) == 1:
        return "rms"  # timm.layers.RmsNorm and torch.nn.RMSNorm
    return "unsupported"


def check_qk_norm(where: str, q_norm, k_norm) -> None:
    """Patch-time check: both norms absent, or both a LayerNorm / RMSNorm of one kind over head_dim."""
    kinds = {qk_norm_kind(q_norm), qk_norm_kind(k_norm)}
    if "unsupported" in kinds or len(kinds) > 1:
        raise NotImplementedError(f"{where} qk-norm of types {type(q_norm).__name__}/{type(k_norm).__name__} is not "
                                  f"supported by the vit_kernels kernels (only LayerNorm or RMSNorm on both q and k)")


def qk_norm_args(q_norm, k_norm, cast, dtype: torch.dtype) -> dict:
    """The keywords of ``ops.attention`` that apply q_norm / k_norm (checked by ``check_qk_norm``) in the
    attention kernel's prologue; {} without them."""
    kind = qk_norm_kind(q_norm)
    if kind is None:
        return {}
    eps = q_norm.eps if q_norm.eps is not None else torch.finfo(dtype).eps  # nn.RMSNorm(eps=None)
    return dict(qk_norm=kind, qk_norm_eps=float(eps), q_norm_weight=cast(getattr(q_norm, "weight", None)),
                q_norm_bias=cast(getattr(q_norm, "bias", None)), k_norm_weight=cast(getattr(k_norm, "weight", None)),
                k_norm_bias=cast(getattr(k_norm, "bias", None)))


def self_attention(qkv, num_heads, scaling, mask=None, dropout=0.0, attn_args=None):
    """``ops.attention`` on the qkv GEMM's (qkv h d) output, recording the probabilities inside
    ``recording_attention_maps``."""
    attn_args = attn_args or {}
    if _attention_maps is not None:
        _attention_maps.append(ops.attention_probabilities(qkv, num_heads, "qkv h d", scaling, mask, **attn_args))
    return ops.attention(qkv, num_heads, layout="qkv h d", scaling=scaling, mask=mask, dropout=dropout, **attn_args)


FOLD_LAYER_NORM = Flag("layer_norm_folding", True)


def layer_norm_folding(enabled: bool):
    """Inside the block, the fused models apply each LayerNorm inside the GEMM after it (``enabled=True``, the
    default: ``ops.layer_norm_linear``, one launch, its statistics from the GEMM that produced x) or run
    ``ops.layer_norm`` then ``ops.linear`` (two launches, a normalized copy of x written and read): the
    unfused path, kept for comparison."""
    return FOLD_LAYER_NORM.set(enabled)


def folds_layer_norm(norm) -> bool:
    """True when ``norm_linear`` will apply this norm inside its GEMM (so its input's producer should hand
    over statistics: ``residual_linear``)."""
    return FOLD_LAYER_NORM.on and not is_identity(norm)


def residual_linear(h, weight, bias, cast, next_norm, **linear_kwargs):
    """``ops.linear`` writing the residual stream, returning ``(x, stats)``: x's LayerNorm statistics when the
    next norm is applied inside the next GEMM (``norm_linear(..., stats=stats)``), else None."""
    if folds_layer_norm(next_norm):
        return ops.linear(h, cast(weight), cast(bias), norm_stats=True, **linear_kwargs)
    return ops.linear(h, cast(weight), cast(bias), **linear_kwargs), None


def normalized(x, norm, cast):
    """``norm(x)`` for an nn.LayerNorm (``ops.layer_norm``) or none (nn.Identity / None: x)."""
    return x if is_identity(norm) else ops.layer_norm(x, cast(norm.weight), cast(norm.bias), norm.eps)


def norm_linear(x, norm, weight, bias, cast, *, stats=None, **linear_kwargs):
    """``ops.linear(norm(x), weight, bias, ...)`` for an nn.LayerNorm ``norm`` (or none: nn.Identity / None):
    one launch with the norm applied inside the GEMM (``layer_norm_folding``), else two. ``weight``/``bias``:
    tensors or row-block tuples, uncast (``cast`` makes them the compute dtype of x); ``stats``: x's
    statistics from ``residual_linear``, or None (the GEMM gathers them)."""
    dropout = linear_kwargs.pop("dropout", 0.0)

    def unfused(p):
        return ops.linear(normalized(x, norm, cast), cast(weight), cast(bias), dropout=p, **linear_kwargs)

    if not folds_layer_norm(norm):
        return unfused(dropout)

    def fused(p):
        return ops.layer_norm_linear(x, cast(norm.weight), cast(norm.bias), cast(weight), cast(bias), eps=norm.eps,
                                     stats=stats, dropout=p, **linear_kwargs)

    # on a GPU the first call per problem times both (and compares them until validated): guard.choose
    def key():  # what the speed or a disagreement depends on: shapes, dtype, the statistics' source, the epilogue
        return (tuple(x.shape), x.dtype, tuple(t.shape[0] for t in as_blocks(weight, None)[0]), stats is not None,
                tuple(sorted((k, v if isinstance(v, (str, int, float)) or v is None else "tensor")
                             for k, v in linear_kwargs.items())))

    return guard.choose("layer_norm_linear", key, x, fused, unfused, dropout)


def encoder_block(x, norm1, qkv, proj, norm2, fc1, fc2, cast, *, num_heads, qkv_interleaved, scaling, mask=None,
                  activation="gelu", gamma1=None, gamma2=None, attn_drop=0.0, proj_drop=0.0, hidden_drop=0.0,
                  out_drop=0.0, drop_path1=None, drop_path2=None, attn_args=None):
    """One pre-norm block, five launches: LN1 inside the qkv GEMM, attention, proj GEMM (+residual, + the
    stream's LayerNorm statistics), LN2 inside fc1 (+GELU), fc2 GEMM (+residual); seven with
    ``layer_norm_folding(False)``. x: [B, N, E] in the compute dtype.

    qkv_interleaved: the qkv weight rows are in the tutorial's (h d qkv) order; the GEMM then writes them
    in (qkv h d) order, so attention always reads contiguous head dims.
    Dropout rates (0 in eval): attn_drop on the attention probabilities, proj_drop on the projection before
    its layer scale and residual, hidden_drop after the MLP's GELU, out_drop on fc2 before its residual.
    drop_path1/2: stochastic depth, fp32 per-sample factors [B] on the attention / MLP branch (see
    ``drop_path_factors``), applied in the proj / fc2 epilogues before the residual add.
    attn_args: more keywords of ``ops.attention`` (qk-norm: ``qk_norm_args``; rotary tables)."""
    h = norm_linear(x, norm1, qkv.weight, qkv.bias, cast, deinterleave=3 if qkv_interleaved else 1)
    h = self_attention(h, num_heads, scaling, mask, attn_drop, attn_args)
    x, stats = residual_linear(h, proj.weight, proj.bias, cast, norm2, scale=cast(gamma1), residual=x,
                               dropout=proj_drop, branch_scale=drop_path1)
    return mlp_block(x, norm2, fc1, fc2, cast, stats=stats, activation=activation, gamma=gamma2,
                     hidden_drop=hidden_drop, out_drop=out_drop, drop_path=drop_path2)


def trains_fc1(x, norm, fc1, activation) -> bool:
    """Whether ``mlp_block`` takes ``ops.mlp``: an elementwise activation, fc1 one weight, a gradient to reach fc1
    or below and pre-activations saved (``saves_pre``). Inference returns at the grad-mode test."""
    if activation not in MLP_ACTIVATIONS or not torch.is_grad_enabled() or not isinstance(fc1.weight, torch.Tensor):
        return False
    return saves_pre(activation, (x, fc1.weight, fc1.bias, *(() if is_identity(norm) else (norm.weight, norm.bias))))


def mlp_block(x, norm, fc1, fc2, cast, *, stats, activation, gamma, hidden_drop, out_drop, drop_path):
    """``x + drop_path * gamma * fc2(activation(fc1(norm(x))))`` (with the dropouts): with an elementwise
    activation and a gradient to reach fc1 or below, ``ops.mlp`` (whose backward applies fc1's activation
    gradient inside fc2's dgrad GEMM), else ``norm_linear`` then ``ops.linear`` (inference, swiglu,
    ``save_pre_activations(False)``: fc1's pre-activation recomputed in backward). The norm is folded into fc1
    as ``norm_linear`` folds it: by ``layer_norm_folding``, and on a GPU by guard.choose's timing of both."""
    if not trains_fc1(x, norm, fc1, activation):
        h = norm_linear(x, norm, fc1.weight, fc1.bias, cast, stats=stats, activation=activation, dropout=hidden_drop)
        return ops.linear(h, cast(fc2.weight), cast(fc2.bias), scale=cast(gamma), residual=x, dropout=out_drop,
                          branch_scale=drop_path)

    def run(folded, hidden_dropout, dropout):
        h = x if folded else normalized(x, norm, cast)
        norm_args = dict(norm_weight=cast(norm.weight), norm_bias=cast(norm.bias), eps=norm.eps,
                         stats=stats) if folded else {}
        return ops.mlp(h, cast(fc1.weight), cast(fc1.bias), cast(fc2.weight), cast(fc2.bias), activation=activation,
                       hidden_dropout=hidden_dropout, scale=cast(gamma), residual=x, dropout=dropout,
                       branch_scale=drop_path, **norm_args)

    if not folds_layer_norm(norm):
        return run(False, hidden_drop, out_drop)
    # choose calls a path with 0.0 to compare and time it (no dropout), with ``on`` to run it
    on = 1.0 if hidden_drop or out_drop else 0.0
    return guard.choose("mlp_layer_norm",
                        lambda: (tuple(x.shape), x.dtype, tuple(fc1.weight.shape), stats is not None, activation,
                                 gamma is not None, drop_path is not None, norm.weight is not None,
                                 norm.bias is not None),
                        x, lambda p: run(True, p and hidden_drop, p and out_drop),
                        lambda p: run(False, p and hidden_drop, p and out_drop), on)
