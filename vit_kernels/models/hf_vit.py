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

import torch
from torch import nn

from ._fused import check_input, check_layer_norm, drop_rate, encoder_block, patch_layer_norm
from ._hf import (
    activation,
    check_layer,
    check_linears,
    check_patch_conv,
    embed,
    hf_positions,
    linear_forward,
    run_block,
    self_attention,
    unsupported,
)
from .patching import patch

FAMILY = "ViT"


def _unsupported(feature: str):
    unsupported(FAMILY, feature)


def _activation(config) -> str:
    return activation(FAMILY, config.hidden_act)


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
    check_patch_conv(FAMILY, "embeddings.patch_embeddings.projection", vit.embeddings.patch_embeddings.projection)
    check_layer_norm("accelerate: layernorm", vit.layernorm)
    width = vit.embeddings.patch_embeddings.projection.out_channels
    for i, layer in enumerate(vit.layers):
        where = f"layers.{i}"
        check_layer(FAMILY, where, {"layernorm_before": layer.layernorm_before,
                                    "layernorm_after": layer.layernorm_after}, layer.attention, width)
        check_linears(FAMILY, f"{where}.mlp", layer.mlp.fc1, layer.mlp.fc2)
    pooler = getattr(vit, "pooler", None)
    if pooler is not None and not isinstance(getattr(pooler, "dense", None), nn.Linear):
        _unsupported(f"pooler of type {type(pooler).__name__}")
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
        _unsupported(f"classifier of type {type(classifier).__name__}")


# --- the patched methods ----------------------------------------------------------------------------------------
def _positions(emb, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The [1 + L, E] position table for this image, as ``ViTEmbeddings`` builds it (resampled every forward by
    HF's own ``interpolate_pos_encoding``)."""
    height, width = pixel_values.shape[2:]
    if interpolate:
        return hf_positions(emb, emb.patch_embeddings.projection, pixel_values, 1)
    image_size = tuple(emb.patch_embeddings.image_size)
    if (height, width) != image_size:
        raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({image_size[0]}*"
                         f"{image_size[1]}); pass interpolate_pos_encoding=True to resample the position "
                         f"embeddings")
    return emb.position_embeddings[0]


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
    pos = _positions(self, pixel_values, bool(interpolate_pos_encoding))
    return embed("ViTEmbeddings", conv, pixel_values, self.cls_token.view(1, -1), pos,
                 dropout=drop_rate(self.dropout, self.training))


def layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``ViTLayer.forward`` as one fused block."""
    attn, drop = self_attention(self.attention), drop_rate(self.dropout, self.training)
    return run_block(encoder_block, "ViTLayer", hidden_states, self.layernorm_before, attn, self.layernorm_after,
                     self.mlp.fc1, self.mlp.fc2, training=self.training, attention_mask=attention_mask,
                     activation=_activation(attn.config), family=FAMILY, proj_drop=drop, out_drop=drop)


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

