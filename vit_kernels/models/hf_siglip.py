"""Hugging Face ``SiglipVisionModel`` / ``SiglipForImageClassification`` on the fused kernels, patched in place.

Patched on the user's own model: ``embeddings.forward`` (patch projection with bias + ``position_embedding``, no
class token, one kernel; ``interpolate_pos_encoding=True`` resamples the table with HF's own method), each
``SiglipEncoderLayer.forward`` (the fused block, CLIP's layout: ``hf_clip.layer_forward``; ``gelu_pytorch_tanh``
in the fc1 epilogue), ``post_layernorm`` (all tokens), the multihead-attention pooling head (``vision_use_head``)
and the classifier. The head's probe is projected by the GEMM, its k and v by one GEMM reading the
``in_proj_weight`` row blocks in place, its attention by ``ops.latent_attention``, then out_proj, LayerNorm and
the MLP with its residual (fused in the fc2 epilogue): seven launches. The models' ``forward`` stays HF's.

``Siglip2VisionModel`` (NaFlex: pre-patchified pixels through a Linear, per-image position resizing, attention
masks) has another structure and is refused by ``accelerate`` with NotImplementedError.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._fused import (
    caster,
    check_head_dim,
    check_input,
    check_layer_norm,
    compute_dtype,
    explicit_dtypes,
    mlp_block,
    patch_layer_norm,
    residual_linear,
)
from ._hf import (
    activation,
    check_linears,
    embed,
    hf_positions,
    linear_forward,
    unsupported,
)
from .hf_clip import check_vision, patch_layers
from .patching import patch

FAMILY = "SigLIP"


def check_head(head) -> None:
    """``SiglipMultiheadAttentionPoolingHead``: an nn.MultiheadAttention the latent-attention kernel computes."""
    attn = head.attention
    if not isinstance(attn, nn.MultiheadAttention):
        unsupported(FAMILY, f"head.attention of type {type(attn).__name__} (only nn.MultiheadAttention)")
    if not attn.batch_first or not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        unsupported(FAMILY, "head.attention without batch_first or with separate q/k/v projection weights")
    if attn.bias_k is not None or attn.add_zero_attn:
        unsupported(FAMILY, "head.attention with bias_k/bias_v or add_zero_attn")
    if attn.dropout:
        unsupported(FAMILY, f"head.attention dropout={attn.dropout} (the latent-attention kernel has no dropout)")
    E = attn.embed_dim
    if tuple(head.probe.shape) != (1, 1, E):
        unsupported(FAMILY, f"head.probe of shape {tuple(head.probe.shape)} (only one latent query [1, 1, {E}])")
    check_head_dim("accelerate: head.attention", E, attn.num_heads)
    check_linears(FAMILY, "head", attn.out_proj, head.mlp.fc1, head.mlp.fc2)
    check_layer_norm("accelerate: head.layernorm", head.layernorm)


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from transformers.models.siglip.modeling_siglip import SiglipForImageClassification, SiglipVisionModel

    vision = check_vision(FAMILY, model, (SiglipVisionModel, SiglipForImageClassification),
                          (SiglipForImageClassification,))
    check_layer_norm("accelerate: post_layernorm", vision.post_layernorm)
    if getattr(vision, "head", None) is not None and vision.use_head:
        check_head(vision.head)
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
        unsupported(FAMILY, f"classifier of type {type(classifier).__name__}")


# --- the patched methods ----------------------------------------------------------------------------------------
def embeddings_forward(self, pixel_values, interpolate_pos_encoding: bool = False):
    """``SiglipVisionEmbeddings.forward`` in one kernel (no prefix token)."""
    conv = self.patch_embedding
    # without interpolation HF adds the table as it is: any image with as many patches
    pos = hf_positions(self, conv, pixel_values, 0) if interpolate_pos_encoding else self.position_embedding.weight
    prefix = conv.weight.new_empty((0, conv.out_channels))
    return embed(type(self).__name__, conv, pixel_values, prefix, pos)


def head_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """``SiglipMultiheadAttentionPoolingHead.forward``: probe attention pooling -> out_proj -> LayerNorm -> MLP
    (+ residual) -> token 0, in the compute dtype."""
    attn, mlp, norm = self.attention, self.mlp, self.layernorm
    check_input(type(self).__name__, self.probe, hidden_state)
    B, E = hidden_state.shape[0], attn.embed_dim
    w, b = attn.in_proj_weight, attn.in_proj_bias
    dtype = compute_dtype(hidden_state)
    with explicit_dtypes(hidden_state):
        cast = caster(dtype)

        def rows(t, i):  # block i (q, k, v) of in_proj, a view
            return None if t is None else cast(t[i * E:(i + 1) * E])

        q = ops.linear(cast(self.probe.view(1, E)), rows(w, 0), rows(b, 0)).view(1, 1, E)
        kv = ops.linear(cast(hidden_state), (rows(w, 1), rows(w, 2)), None if b is None else (rows(b, 1), rows(b, 2)))
        h = ops.latent_attention(q.expand(B, 1, E), kv, attn.num_heads, scaling="paper")
        h, stats = residual_linear(h, attn.out_proj.weight, attn.out_proj.bias, cast, norm)
        return mlp_block(h, norm, mlp.fc1, mlp.fc2, cast, stats=stats,
                         activation=activation(FAMILY, mlp.config.hidden_act), gamma=None, hidden_drop=0.0,
                         out_drop=0.0, drop_path=None)[:, 0]


def patch_siglip(model):
    """Patch a Hugging Face SigLIP vision model in place (see the module docstring); returns ``model``."""
    check_supported(model)
    vision = getattr(model, "vision_model", model)
    patch(vision.embeddings, "forward", embeddings_forward)
    patch_layers(vision)
    patch_layer_norm(vision.post_layernorm)
    if getattr(vision, "head", None) is not None and vision.use_head:
        patch(vision.head, "forward", head_forward)
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        patch(model.classifier, "forward", linear_forward)
    return model
