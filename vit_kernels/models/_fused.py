"""Pieces shared by the fused models: the fused encoder block, dtype/autocast policy, dropout rates."""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .. import ops


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@contextlib.contextmanager
def explicit_dtypes(x: torch.Tensor):
    """Every cast is explicit inside the fused forward, so autocast must not re-cast the fallback ops."""
    with torch.autocast(x.device.type, enabled=False):
        yield


def caster(dtype: torch.dtype):
    return lambda t: None if t is None else t.to(dtype)


def check_matches_model(model: nn.Module, x: torch.Tensor) -> None:
    """Same device as the parameters, and (outside autocast) the same dtype, as a PyTorch module demands."""
    param = next(model.parameters(), None)
    if param is None:
        return
    if param.device != x.device:
        raise ValueError(f"input is on {x.device} but the model's parameters are on {param.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} differs from the model's parameters ({param.dtype}); convert "
                        f"one of them (e.g. model.to({x.dtype})) or run under torch.autocast")


class SharedModel(nn.Module):
    """Base of the wrappers around another framework's ViT: the model's own parameters, buffers and children
    are registered here under the same names and in the same order (the same state_dict keys; tensors
    shared, not copied). The model itself is kept as ``original`` (not a child, so not in the state_dict),
    its train/eval flag in step with ours."""

    last_backend: str | None = None

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "original", model)
        self.train(model.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if "original" in self.__dict__:
            self.original.training = mode  # the children are shared; the original's own flag follows
        return self


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


def _rate(module: nn.Module) -> float:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    if "drop" in type(module).__name__.lower():  # timm's DropPath (drop_prob), PatchDropout (prob)
        return getattr(module, "drop_prob", None) or getattr(module, "prob", None) or getattr(module, "p", 0.0)
    return 0.0


def unfused_dropout(model: nn.Module, fused: set) -> list:
    """Names of dropout-like modules that would drop something in this forward (train mode, rate > 0) but
    that the kernels do not apply (``fused`` holds the ids of those they do): stochastic depth, patch dropout."""
    if not model.training:
        return []
    return [name for name, module in model.named_modules() if id(module) not in fused and _rate(module)]


_warned = set()


def warn_dropout_fallback(model: nn.Module, names: list) -> None:
    key = type(model).__name__
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"vit_kernels: {key} is in train mode with dropout the kernels do not fuse "
                      f"({', '.join(names[:3])}{'...' if len(names) > 3 else ''}); this forward runs the "
                      f"PyTorch reference path", stacklevel=3)


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


def encoder_block(x, norm1, qkv, proj, norm2, fc1, fc2, cast, *, num_heads, qkv_interleaved, scaling, mask=None,
                  activation="gelu", gamma1=None, gamma2=None, attn_drop=0.0, proj_drop=0.0, hidden_drop=0.0,
                  out_drop=0.0, drop_path1=None, drop_path2=None):
    """One pre-norm block, seven launches: LN1, qkv GEMM, attention, proj GEMM (+residual), LN2,
    fc1 GEMM (+GELU), fc2 GEMM (+residual). x: [B, N, E] in the compute dtype.

    qkv_interleaved: the qkv weight rows are in the tutorial's (h d qkv) order; the GEMM then writes them
    in (qkv h d) order, so attention always reads contiguous head dims.
    Dropout rates (0 in eval): attn_drop on the attention probabilities, proj_drop on the projection before
    its layer scale and residual, hidden_drop after the MLP's GELU, out_drop on fc2 before its residual.
    drop_path1/2: stochastic depth, fp32 per-sample factors [B] on the attention / MLP branch (see
    ``drop_path_factors``), applied in the proj / fc2 epilogues before the residual add."""
    h = ops.layer_norm(x, cast(norm1.weight), cast(norm1.bias), norm1.eps)
    h = ops.linear(h, cast(qkv.weight), cast(qkv.bias), deinterleave=3 if qkv_interleaved else 1)
    if _attention_maps is not None:
        _attention_maps.append(ops.attention_probabilities(h, num_heads, "qkv h d", scaling, mask))
    h = ops.attention(h, num_heads, layout="qkv h d", scaling=scaling, mask=mask, dropout=attn_drop)
    x = ops.linear(h, cast(proj.weight), cast(proj.bias), scale=cast(gamma1), residual=x, dropout=proj_drop,
                   branch_scale=drop_path1)
    h = ops.layer_norm(x, cast(norm2.weight), cast(norm2.bias), norm2.eps)
    h = ops.linear(h, cast(fc1.weight), cast(fc1.bias), activation=activation, dropout=hidden_drop)
    return ops.linear(h, cast(fc2.weight), cast(fc2.bias), scale=cast(gamma2), residual=x, dropout=out_drop,
                      branch_scale=drop_path2)
