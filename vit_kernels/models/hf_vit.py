"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` on the fused kernels, patched in place.

Patched on the user's own model: ``embeddings.forward`` (patch projection + cls token + position embedding in
one kernel, ``interpolate_pos_encoding`` resampled every forward as HF does), each ``ViTLayer.forward`` (the
fused block; the q/k/v GEMM reads ``q_proj``/``k_proj``/``v_proj`` in place, nothing concatenated or cached),
the final ``layernorm``, the pooler and the classifier. ``ViTModel.forward`` stays HF's, so ``output_hidden_states``
(HF's hooks on the layers), ``return_dict``, labels and loss, ``save_pretrained``, pipelines and Trainer are
HF's own. ``output_attentions=True`` adds each layer's probabilities from a separate kernel
(``ops.attention_probabilities``; before attention dropout, detached). Transformers >= 5 module layout.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from .. import ops
from ._fused import (
    caster,
    check_head_dim,
    check_input,
    check_layer_norm,
    compute_dtype,
    drop_rate,
    encoder_block,
    explicit_dtypes,
    patch_layer_norm,
    recording_attention_maps,
)
from .patching import patch
from .pos_embed import resample_pos_embed

ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _unsupported(feature: str):
    raise NotImplementedError(f"accelerate (Hugging Face ViT): {feature} is not supported by the vit_kernels "
                              f"kernels")


class QKV:
    """q/k/v projections as the (weight, bias) pair ``encoder_block`` reads: tuples of the three parameters,
    which the GEMM reads in place as the row blocks of one [3E, E] weight."""

    __slots__ = ("bias", "weight")

    def __init__(self, attn):
        self.weight = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        self.bias = None if attn.q_proj.bias is None else (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)


def _activation(config) -> str:
    act = config.hidden_act
    if not isinstance(act, str) or act not in ACTIVATIONS:
        _unsupported(f"hidden_act={act!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTModel

    if not isinstance(model, (ViTModel, ViTForImageClassification)):
        raise TypeError(f"accelerate expects a transformers ViTModel or ViTForImageClassification, "
                        f"got {type(model).__name__}")
    vit = model.vit if isinstance(model, ViTForImageClassification) else model
    _activation(model.config)
    if not hasattr(vit, "layers"):
        _unsupported("the transformers < 5 module layout (encoder.layer); upgrade to transformers >= 5")
    conv = vit.embeddings.patch_embeddings.projection
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0)
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel (non-square patch_size)")
    E = conv.out_channels
    check_layer_norm("accelerate: layernorm", vit.layernorm)
    for i, layer in enumerate(vit.layers):
        where, attn = f"layers.{i}", layer.attention
        check_layer_norm(f"accelerate: {where}.layernorm_before", layer.layernorm_before)
        check_layer_norm(f"accelerate: {where}.layernorm_after", layer.layernorm_after)
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.fc1, layer.mlp.fc2)
        if not all(isinstance(m, nn.Linear) for m in linears):
            _unsupported(f"{where} with non-Linear projections")
        if attn.num_attention_heads * attn.head_dim != E or any(m.out_features != E for m in linears[:4]):
            _unsupported(f"{where} with num_attention_heads * head_dim != hidden_size")
        check_head_dim(f"accelerate: {where}.attention", E, attn.num_attention_heads)
        if len({m.bias is None for m in linears[:3]}) != 1:
            _unsupported(f"{where} with a bias on only some of query/key/value")
        if not math.isclose(attn.scaling, attn.head_dim ** -0.5, rel_tol=1e-6):
            _unsupported(f"{where} attention scaling {attn.scaling} (only head_dim ** -0.5)")
    pooler = getattr(vit, "pooler", None)
    if pooler is not None and not isinstance(getattr(pooler, "dense", None), nn.Linear):
        _unsupported(f"pooler of type {type(pooler).__name__}")
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
        _unsupported(f"classifier of type {type(classifier).__name__}")


# --- the patched methods ----------------------------------------------------------------------------------------
def _positions(emb, height: int, width: int, interpolate: bool) -> torch.Tensor:
    """The [1 + L, E] position table for this image, as ``ViTEmbeddings`` builds it (resampled every forward)."""
    pos = emb.position_embeddings[0]
    image_size = tuple(emb.patch_embeddings.image_size)
    if not interpolate:
        if (height, width) != image_size:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({image_size[0]}*"
                             f"{image_size[1]}); pass interpolate_pos_encoding=True to resample the position "
                             f"embeddings")
        return pos
    # HF's interpolate_pos_encoding: the square grid resampled bicubically (align_corners=False, no antialias) to
    # (H // p, W // p), the cls row kept; the table itself for the same patch count and H == W
    p = emb.patch_embeddings.projection.kernel_size[0]
    num_positions = pos.shape[0] - 1
    side = round(num_positions ** 0.5)
    if side * side != num_positions:
        raise ValueError(f"interpolate_pos_encoding needs a square grid of positions, got {num_positions}")
    if height < p or width < p:
        raise ValueError(f"image size ({height}, {width}) is smaller than one {p}x{p} patch")
    return resample_pos_embed(pos, (side, side), (height // p, width // p), 1, mode="bicubic", antialias=False)


def embeddings_forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                       interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """``ViTEmbeddings.forward`` in one kernel (+ the embedding dropout kernel in train mode). Under autocast the
    tokens are in autocast's dtype (HF's fp32 position table would promote them to fp32)."""
    if bool_masked_pos is not None:
        _unsupported("bool_masked_pos (masked image modeling)")
    conv = self.patch_embeddings.projection
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"expected pixel_values [B, C, H, W], got {got}")
    if pixel_values.shape[1] != conv.in_channels:
        raise ValueError(f"expected {conv.in_channels} input channels, got {pixel_values.shape[1]}")
    check_input("ViTEmbeddings", conv.weight, pixel_values)
    pos = _positions(self, pixel_values.shape[2], pixel_values.shape[3], bool(interpolate_pos_encoding))
    dtype = compute_dtype(pixel_values)
    with explicit_dtypes(pixel_values):
        cast = caster(dtype)
        tokens = ops.patch_embed(cast(pixel_values), cast(conv.weight), cast(conv.bias),
                                 cast(self.cls_token).view(1, -1), cast(pos), True)
        return ops.dropout(tokens, drop_rate(self.dropout, self.training))


def _attention_outputs():
    """HF's list collecting ``attentions`` in this forward (``output_attentions=True``), else None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing: no attentions requested this way
        return None
    collected = _active_collector.get()
    return collected.get("attentions") if isinstance(collected, dict) else None


def layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``ViTLayer.forward`` as one fused block."""
    if attention_mask is not None:
        _unsupported("attention_mask")
    x, attn = hidden_states, self.attention
    check_input("ViTLayer", self.layernorm_before.weight, x)
    dtype = compute_dtype(x)
    out_dtype, cast, training = torch.promote_types(x.dtype, dtype), caster(dtype), self.training
    attentions = _attention_outputs()
    with explicit_dtypes(x), recording_attention_maps() if attentions is not None else nullcontext() as maps:
        out = encoder_block(cast(x), self.layernorm_before, QKV(attn), attn.o_proj, self.layernorm_after,
                            self.mlp.fc1, self.mlp.fc2, cast, num_heads=attn.num_attention_heads,
                            qkv_interleaved=False, scaling="paper", activation=_activation(attn.config),
                            attn_drop=attn.attention_dropout if training else 0.0,
                            proj_drop=drop_rate(self.dropout, training), out_drop=drop_rate(self.dropout, training))
    if attentions is not None:
        attentions.append(maps[0])
    return out.to(out_dtype)


def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` on the fused GEMM (under autocast: in autocast's dtype, as F.linear)."""
    check_input(type(self).__name__, self.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        return ops.linear(cast(x), cast(self.weight), cast(self.bias))


def pooler_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``ViTPooler.forward``: token 0 -> dense (fused GEMM) -> HF's activation."""
    return self.activation(linear_forward(self.dense, hidden_states[:, 0]))


def patch_hf(model):
    """Patch a Hugging Face ViT in place (see the module docstring); returns ``model``."""
    check_supported(model)
    vit = getattr(model, "vit", model)
    patch(vit.embeddings, "forward", embeddings_forward)
    for layer in vit.layers:
        patch(layer, "forward", layer_forward)
    patch_layer_norm(vit.layernorm)
    if getattr(vit, "pooler", None) is not None:
        patch(vit.pooler, "forward", pooler_forward)
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        patch(model.classifier, "forward", linear_forward)
    return model

