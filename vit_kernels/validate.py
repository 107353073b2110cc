"""Input checks shared by the ops, the fused models and the reference: pure PyTorch, no kernels (importing
this module defines none, so the reference stays free of Triton).

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or device)
with a message naming the argument, so a bad call fails before any launch.
"""
from __future__ import annotations

import warnings

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# "tutorial": softmax(QK^T) / sqrt(emb_size) (the seed tutorial's code); "paper": softmax(QK^T / sqrt(head_dim))
SCALINGS = ("tutorial", "paper")
MAX_SAMPLE_ELEMENTS = 2**31 - 1  # int32 offsets inside one image/sample; across samples they are int64


def check_tensor(name: str, t, dims: int | None = None, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input's {dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def check_vector(name: str, t, length: int, dtype: torch.dtype, device: torch.device) -> None:
    """Optional per-feature vectors (bias, LayerNorm weight, layer scale)."""
    if t is None:
        return
    check_tensor(name, t, dims=1, dtype=dtype)
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} elements, expected {length}")
    check_device(name, t, device)


def check_probability(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def check_eps(eps) -> None:
    """A normalization's epsilon: a positive number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_sample_size(name: str, elements: int) -> None:
    if elements > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"one sample of {name} spans {elements} elements; the kernels index within a sample "
                         f"with int32 offsets (limit {MAX_SAMPLE_ELEMENTS})")


def resolve_scaling(scaling: str, stacklevel: int = 3) -> str:
    """The attention scaling by its current name. ``"seed"`` (its name in 0.1, easy to confuse with the
    dropout RNG's seed) still means ``"tutorial"``, with a DeprecationWarning pointing ``stacklevel`` frames up
    (the default: the caller's caller)."""
    if scaling == "seed":
        warnings.warn('scaling="seed" is deprecated; use scaling="tutorial" (the same softmax(QK^T) / '
                      "sqrt(emb_size))", DeprecationWarning, stacklevel=stacklevel)
        return "tutorial"
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    return scaling


def check_heads(emb_size: int, num_heads: int) -> None:
    if num_heads < 1 or emb_size % num_heads:
        raise ValueError(f"emb_size ({emb_size}) must be divisible by num_heads ({num_heads})")


def check_tokens(x: torch.Tensor, emb_size: int) -> None:
    """Token tensors are [B, N, E] floating point with E == emb_size."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor of tokens, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if x.dim() != 3:
        raise ValueError(f"expected tokens of shape [batch, tokens, {emb_size}], got shape {tuple(x.shape)}")
    if x.shape[-1] != emb_size:
        raise ValueError(f"token width {x.shape[-1]} does not match emb_size {emb_size}")


def check_image(x: torch.Tensor, in_channels: int, img_size: int | None) -> None:
    """A floating [B, C, H, W] batch with ``in_channels`` channels and (unless None) H = W = ``img_size``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"expected a floating-point image tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got {x.shape[1]}")
    if img_size is not None and tuple(x.shape[2:]) != (img_size, img_size):
        raise ValueError(f"image size {tuple(x.shape[2:])} differs from the size the position embedding "
                         f"was built for ({img_size}, {img_size})")


def check_mask(mask: torch.Tensor | None, batch: int, heads: int, tokens: int) -> None:
    """An attention mask: bool, True = attend, broadcastable to [B, heads, N, N]."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor (True = attend), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    target = (batch, heads, tokens, tokens)
    try:
        ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to [B, heads, N, N] = {target}")
