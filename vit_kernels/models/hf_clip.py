"""Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPForImageClassification`` on the
fused kernels, patched in place.

Patched on the user's own model: ``embeddings.forward`` (patch projection without bias + ``class_embedding`` +
``position_embedding`` in one kernel; ``interpolate_pos_encoding=True`` resamples the table with HF's own method on
every forward), ``pre_layrnorm``, each ``CLIPEncoderLayer.forward`` (the fused block: q/k/v read in place as one
GEMM, attention scaled by head_dim ** -0.5, ``quick_gelu`` or another supported ``hidden_act`` in the fc1
epilogue, ``attention_dropout`` in the attention kernel in train mode), ``post_layernorm`` (on the pooled
token), ``visual_projection`` and the classifier (HF's forward averages the patch tokens). The models' ``forward``
stays HF's, so outputs, ``output_hidden_states``, ``return_dict`` are HF's; ``output_attentions=True`` adds each
layer's probabilities from a separate kernel. SigLIP's encoder layers share this layout and use ``check_vision`` /
``patch_layers`` from here.
"""
from __future__ import annotations

from torch import nn

from ._fused import check_layer_norm, encoder_block, patch_layer_norm
from ._hf import (
    activation,
    check_layer,
    check_linears,
    check_patch_conv,
    embed,
    grid_tokens,
    hf_positions,
    linear_forward,
    run_block,
    self_attention,
    unsupported,
)
from .patching import patch

FAMILY = "CLIP"


def check_layers(family: str, vision: nn.Module) -> None:
    """CLIP-layout encoder layers (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp.fc1/fc2``)."""
    width = vision.config.hidden_size
    for i, layer in enumerate(vision.encoder.layers):
        where = f"encoder.layers.{i}"
        check_layer(family, where, {"layer_norm1": layer.layer_norm1, "layer_norm2": layer.layer_norm2},
                    layer.self_attn, width)
        check_linears(family, f"{where}.mlp", layer.mlp.fc1, layer.mlp.fc2)


def check_vision(family: str, model, models: tuple, wrappers: tuple) -> nn.Module:
    """The checks CLIP- and SigLIP-style vision models share (model type, ``hidden_act``, patch projection,
    position ``nn.Embedding``, encoder layers); returns the vision model (``model.vision_model`` of a wrapper)."""
    if not isinstance(model, models):
        raise TypeError(f"accelerate expects a transformers {' or '.join(c.__name__ for c in models)}, got "
                        f"{type(model).__name__}")
    vision = model.vision_model if isinstance(model, wrappers) else model
    activation(family, vision.config.hidden_act)
    emb = vision.embeddings
    check_patch_conv(family, "embeddings.patch_embedding", emb.patch_embedding)
    if not isinstance(emb.position_embedding, nn.Embedding):
        unsupported(family, f"embeddings.position_embedding of type {type(emb.position_embedding).__name__} (only "
                            f"nn.Embedding)")
    check_layers(family, vision)
    return vision


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from transformers.models.clip.modeling_clip import (
        CLIPForImageClassification,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    wrappers = (CLIPVisionModelWithProjection, CLIPForImageClassification)
    vision = check_vision(FAMILY, model, (CLIPVisionModel, *wrappers), wrappers)
    check_layer_norm("accelerate: pre_layrnorm", vision.pre_layrnorm)
    check_layer_norm("accelerate: post_layernorm", vision.post_layernorm)
    if isinstance(model, CLIPVisionModelWithProjection):
        check_linears(FAMILY, "visual_projection", model.visual_projection)
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
        unsupported(FAMILY, f"classifier of type {type(classifier).__name__}")


# --- the patched methods ----------------------------------------------------------------------------------------
def embeddings_forward(self, pixel_values, interpolate_pos_encoding: bool = False):
    """``CLIPVisionEmbeddings.forward`` in one kernel."""
    conv = self.patch_embedding
    grid_tokens(conv, pixel_values)  # the image checks
    height, width = pixel_values.shape[2:]
    if interpolate_pos_encoding:
        pos = hf_positions(self, conv, pixel_values, 1)
    elif height != self.image_size or width != self.image_size:
        raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*"
                         f"{self.image_size}).")
    else:
        pos = self.position_embedding.weight
    return embed(type(self).__name__, conv, pixel_values, self.class_embedding.view(1, -1), pos)


def layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """A CLIP-layout encoder layer (``CLIPEncoderLayer``, ``SiglipEncoderLayer``) as one fused block."""
    attn = self_attention(self.self_attn)
    return run_block(encoder_block, type(self).__name__, hidden_states, self.layer_norm1, attn, self.layer_norm2,
                     self.mlp.fc1, self.mlp.fc2, training=self.training, attention_mask=attention_mask,
                     activation=activation(FAMILY, attn.config.hidden_act), family=type(self).__name__)


def patch_layers(vision: nn.Module) -> None:
    for layer in vision.encoder.layers:
        patch(layer, "forward", layer_forward)


def patch_clip(model):
    """Patch a Hugging Face CLIP vision model in place (see the module docstring); returns ``model``."""
    check_supported(model)
    vision = getattr(model, "vision_model", model)
    patch(vision.embeddings, "forward", embeddings_forward)
    patch_layer_norm(vision.pre_layrnorm)
    patch_layers(vision)
    patch_layer_norm(vision.post_layernorm)
    for head in (getattr(model, "visual_projection", None), getattr(model, "classifier", None)):
        if isinstance(head, nn.Linear):
            patch(head, "forward", linear_forward)
    return model
