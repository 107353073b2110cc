"""Pieces shared by the fused models: the fused encoder block, dtype/autocast policy, dropout check."""
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


def active_dropout(model: nn.Module) -> list:
    """Names of dropout-like modules that would drop something in this forward (train mode, p > 0)."""
    if not model.training:
        return []
    names = []
    for name, module in model.named_modules():
        p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else \
            getattr(module, "drop_prob", None)
        if p:
            names.append(name)
    return names


_warned = set()


def warn_dropout_fallback(model: nn.Module, names: list) -> None:
    key = type(model).__name__
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"vit_kernels: {key} is in train mode with active dropout ({', '.join(names[:3])}"
                      f"{'...' if len(names) > 3 else ''}); the fused kernels have no dropout yet, so this "
                      f"forward runs the PyTorch reference path", stacklevel=3)


def encoder_block(x, norm1, qkv, proj, norm2, fc1, fc2, cast, *, num_heads, qkv_interleaved, scaling, mask=None,
                  activation="gelu", gamma1=None, gamma2=None):
    """One pre-norm block, seven launches: LN1, qkv GEMM, attention, proj GEMM (+residual), LN2,
    fc1 GEMM (+GELU), fc2 GEMM (+residual). x: [B, N, E] in the compute dtype.

    qkv_interleaved: the qkv weight rows are in the tutorial's (h d qkv) order; the GEMM then writes them
    in (qkv h d) order, so attention always reads contiguous head dims."""
    h = ops.layer_norm(x, cast(norm1.weight), cast(norm1.bias), norm1.eps)
    h = ops.linear(h, cast(qkv.weight), cast(qkv.bias), deinterleave=3 if qkv_interleaved else 1)
    h = ops.attention(h, num_heads, layout="qkv h d", scaling=scaling, mask=mask)
    x = ops.linear(h, cast(proj.weight), cast(proj.bias), scale=cast(gamma1), residual=x)
    h = ops.layer_norm(x, cast(norm2.weight), cast(norm2.bias), norm2.eps)
    h = ops.linear(h, cast(fc1.weight), cast(fc1.bias), activation=activation)
    return ops.linear(h, cast(fc2.weight), cast(fc2.bias), scale=cast(gamma2), residual=x)
