"""Pieces shared by the Hugging Face adapters (``hf_vit``, ``hf_clip``, ``hf_siglip``, ``hf_dinov2``).

Each adapter patches the user's own transformers model in place and keeps the model's own ``forward``, so output
classes, ``output_hidden_states`` (HF's hooks on the layers), ``return_dict``, labels and loss stay HF's. What they
share: reading an HF self-attention module (its q/k/v Linears as row blocks of one GEMM weight, read in place),
the fused encoder layer with HF's dtype rules and ``output_attentions``, the fused patch embedding with HF's own
position-table interpolation, the patch-time checks and the fused ``nn.Linear``.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple, NoReturn

import torch
from torch import nn

from .. import ops
from ._fused import (
    caster,
    check_head_dim,
    check_image_batch,
    check_input,
    check_layer_norm,
    compute_dtype,
    drop_rate,
    explicit_dtypes,
    recording_attention_maps,
)

# HF's ``hidden_act`` names -> the GEMM epilogue's activation
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}


def unsupported(family: str, feature: str) -> NoReturn:
    raise NotImplementedError(f"accelerate (Hugging Face {family}): {feature} is not supported by the vit_kernels "
                              f"kernels")


def activation(family: str, act, supported: dict = ACTIVATIONS) -> str:
    """The epilogue activation for HF's ``hidden_act`` (NotImplementedError naming it otherwise)."""
    if not isinstance(act, str) or act not in supported:
        unsupported(family, f"hidden_act={act!r} (supported: {', '.join(supported)})")
    return supported[act]


class RowBlocks:
    """Weights (and biases) as the (weight, bias) pair ``ops.linear`` / ``encoder_block`` read as one GEMM: tuples
    of tensors (parameters or row views of one), read in place as the row blocks of their concatenation."""

    __slots__ = ("bias", "weight")

    def __init__(self, weights, biases):
        self.weight = tuple(weights)
        self.bias = None if all(b is None for b in biases) else tuple(biases)

    @classmethod
    def of(cls, *linears: nn.Linear) -> RowBlocks:
        return cls([m.weight for m in linears], [m.bias for m in linears])


class SelfAttention(NamedTuple):
    """An HF self-attention module read as the fused block needs it (looked up on every forward: no cache)."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    proj: nn.Module
    num_heads: int
    head_dim: int
    scaling: float
    dropout: float  # on the probabilities, in train mode
    proj_dropout: nn.Module | None  # after the output projection (DINOv2's older layout), else None
    config: object

    @property
    def qkv(self) -> RowBlocks:
        return RowBlocks.of(self.q, self.k, self.v)


def self_attention(module: nn.Module) -> SelfAttention:
    """Both HF layouts: ``q_proj/k_proj/v_proj`` + ``o_proj``/``out_proj`` (ViT, CLIP, SigLIP; DINOv2 in recent
    transformers) and ``attention.{query,key,value}`` + ``output.{dense,dropout}`` (DINOv2 in earlier 5.x, e.g.
    5.17)."""
    if hasattr(module, "q_proj"):
        heads = getattr(module, "num_attention_heads", None) or module.num_heads
        scaling = module.scaling if hasattr(module, "scaling") else module.scale
        dropout = module.attention_dropout if hasattr(module, "attention_dropout") else module.dropout
        proj = module.o_proj if hasattr(module, "o_proj") else module.out_proj
        return SelfAttention(module.q_proj, module.k_proj, module.v_proj, proj, heads, module.head_dim, scaling,
                             float(dropout), None, module.config)
    inner, output = module.attention, module.output
    return SelfAttention(inner.query, inner.key, inner.value, output.dense, inner.num_attention_heads,
                         inner.attention_head_size, inner.scaling, float(inner.dropout_prob),
                         getattr(output, "dropout", None), inner.config)


# --- patch-time checks -------------------------------------------------------------------------------------------
def check_patch_conv(family: str, where: str, conv) -> None:
    """A square Conv2d with stride = kernel, no padding, groups or dilation (what ``ops.patch_embed`` computes)."""
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding not in ((0, 0), "valid")
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1)):
        unsupported(family, f"{where}: a patch projection other than a square Conv2d with stride = kernel "
                            f"(non-square patch_size, padding, groups or dilation)")


def check_attention(family: str, where: str, attn: SelfAttention, width: int) -> None:
    linears = (attn.q, attn.k, attn.v, attn.proj)
    if not all(isinstance(m, nn.Linear) for m in linears):
        unsupported(family, f"{where} with non-Linear projections")
    if (attn.num_heads * attn.head_dim != width or any(m.out_features != width for m in linears)
            or attn.proj.in_features != width):
        unsupported(family, f"{where} with num_attention_heads * head_dim != hidden_size")
    check_head_dim(f"accelerate: {where}", width, attn.num_heads)
    if len({m.bias is None for m in linears[:3]}) != 1:
        unsupported(family, f"{where} with a bias on only some of query/key/value")
    if not math.isclose(attn.scaling, attn.head_dim ** -0.5, rel_tol=1e-6):
        unsupported(family, f"{where} attention scaling {attn.scaling} (only head_dim ** -0.5)")


def check_linears(family: str, where: str, *modules) -> None:
    if not all(isinstance(m, nn.Linear) for m in modules):
        kinds = ", ".join(type(m).__name__ for m in modules)
        unsupported(family, f"{where} of types {kinds} (only nn.Linear)")


def check_layer(family: str, where: str, norms: dict, attention: nn.Module, width: int) -> SelfAttention:
    """The parts every pre-norm HF encoder layer has: LayerNorms (by attribute name) and a self-attention module
    (returned as read by ``self_attention``)."""
    for name, norm in norms.items():
        check_layer_norm(f"accelerate: {where}.{name}", norm)
    try:
        attn = self_attention(attention)
    except AttributeError:
        unsupported(family, f"{where} attention of type {type(attention).__name__}")
    check_attention(family, f"{where} attention", attn, width)
    return attn


# --- the fused pieces --------------------------------------------------------------------------------------------
def attention_outputs():
    """HF's list collecting ``attentions`` in this forward (``output_attentions=True``), else None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing: no attentions requested this way
        return None
    collected = _active_collector.get()
    return collected.get("attentions") if isinstance(collected, dict) else None


def sdpa_mask(family: str, attention_mask):
    """The mask HF hands its layers, as ``ops.attention`` takes it: HF's sdpa mask is already one (bool
    [B, 1, N, N], True = attend; transformers builds an all-True one under torch.compile). Others (eager's
    additive float mask, flash's [B, N] padding mask, flex's BlockMask) raise NotImplementedError."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        return attention_mask
    kind = (f"{attention_mask.dtype} {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__)
    unsupported(family, f"an attention_mask of {kind} (only the boolean [B, 1, N, N] mask that "
                        f"attn_implementation='sdpa' builds)")


def run_block(block, where: str, x: torch.Tensor, norm1, attn: SelfAttention, norm2, fc1, fc2, *, training: bool,
              activation: str, attention_mask=None, family: str = "ViT", **kwargs) -> torch.Tensor:
    """One HF encoder layer through ``block`` (``_fused.encoder_block``): x in the compute dtype (autocast's, else
    x's), out in x's dtype promoted with it, as HF's residual adds give. The attention's own dropouts come from
    ``attn`` (``proj_drop`` from its output dropout unless given); ``kwargs`` go to the block (layer scale, drop
    path, MLP dropouts). HF's sdpa ``attention_mask`` goes to the attention kernel (``sdpa_mask``). With
    ``output_attentions=True`` each layer adds its probabilities (``ops.attention_probabilities``: before attention
    dropout, detached) to HF's collected ``attentions``."""
    mask = sdpa_mask(family, attention_mask)
    check_input(where, norm1.weight if norm1.weight is not None else attn.q.weight, x)
    dtype = compute_dtype(x)
    out_dtype, cast = torch.promote_types(x.dtype, dtype), caster(dtype)
    kwargs.setdefault("proj_drop", drop_rate(attn.proj_dropout, training))
    attentions = attention_outputs()
    with explicit_dtypes(x), recording_attention_maps() if attentions is not None else nullcontext() as maps:
        out = block(cast(x), norm1, attn.qkv, attn.proj, norm2, fc1, fc2, cast, num_heads=attn.num_heads,
                    qkv_interleaved=False, scaling="paper", mask=mask, activation=activation,
                    attn_drop=attn.dropout if training else 0.0, **kwargs)
    if attentions is not None:
        attentions.append(maps[0])
    return out.to(out_dtype)


def embed(where: str, conv: nn.Conv2d, pixel_values, prefix: torch.Tensor, pos: torch.Tensor | None,
          pos_on_prefix: bool = True, dropout: float = 0.0) -> torch.Tensor:
    """Patch projection + prefix tokens + positions in one ``ops.patch_embed`` launch (+ the dropout kernel when
    ``dropout`` > 0). As HF's embeddings, the image is first cast to the projection's dtype; the tokens are in the
    compute dtype (under autocast, autocast's: HF's fp32 tables would promote them to fp32)."""
    check_image_batch(conv, pixel_values)
    pixel_values = pixel_values.to(conv.weight.dtype)
    check_input(where, conv.weight, pixel_values)
    dtype = compute_dtype(pixel_values)
    with explicit_dtypes(pixel_values):
        cast = caster(dtype)
        tokens = ops.patch_embed(cast(pixel_values), cast(conv.weight), cast(conv.bias), cast(prefix), cast(pos),
                                 pos_on_prefix)
        return ops.dropout(tokens, dropout)


def grid_tokens(conv: nn.Conv2d, pixel_values: torch.Tensor) -> int:
    """Patches of the image (HF's conv floors each side); ValueError for an image smaller than one patch."""
    check_image_batch(conv, pixel_values)
    p = conv.kernel_size[0]
    if pixel_values.shape[2] < p or pixel_values.shape[3] < p:
        raise ValueError(f"image size {tuple(pixel_values.shape[2:])} is smaller than one {p}x{p} patch")
    return (pixel_values.shape[2] // p) * (pixel_values.shape[3] // p)


def hf_positions(embeddings: nn.Module, conv: nn.Conv2d, pixel_values: torch.Tensor, prefix: int) -> torch.Tensor:
    """The [prefix + patches, E] position table that HF's own ``embeddings.interpolate_pos_encoding`` gives this
    image: its resampling exactly (bicubic, in fp32 or not, antialiased or not, as that model's code in the
    installed transformers does), recomputed every forward. HF reads only the shape of the embeddings it is
    passed, so an empty stand-in of that shape goes in."""
    tokens = prefix + grid_tokens(conv, pixel_values)
    shape_only = pixel_values.new_empty((0, tokens, conv.out_channels))
    table = embeddings.interpolate_pos_encoding(shape_only, pixel_values.shape[2], pixel_values.shape[3])
    return table.reshape(tokens, conv.out_channels)


def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` on the fused GEMM (under autocast: in autocast's dtype, as F.linear)."""
    check_input(type(self).__name__, self.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        return ops.linear(cast(x), cast(self.weight), cast(self.bias))
