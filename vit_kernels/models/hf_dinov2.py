"""Hugging Face DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel``,
``Dinov2WithRegistersForImageClassification``) on the fused kernels, patched in place.

Patched on the user's own model: ``embeddings.forward`` (patch projection + cls token + the position table, and
for the registers variant the register tokens after the cls token, in one kernel; the table is resampled on every
forward by HF's own ``interpolate_pos_encoding``: bicubic in fp32, antialiased for the registers variant, as each
version of transformers does), each ``Dinov2Layer.forward`` (the fused block: q/k/v read in place as one GEMM,
``layer_scale1/2`` as the per-feature scale of the proj / fc2 epilogues, stochastic depth as per-sample factors
drawn like HF's ``Dinov2DropPath``, GELU MLP or the SwiGLU FFN of the giant models in one gated GEMM), the final
``layernorm`` and the classifier. The models' ``forward`` stays HF's (``pooler_output`` = the cls token, the
classifier's cls + mean-of-patches input).

``bool_masked_pos`` (masked image modeling) is computed: the fused kernel embeds every patch, then one
``torch.where`` puts ``mask_token + position`` on the masked patch rows, which is what HF computes (it replaces
the masked patch embeddings by the mask token before adding the positions).

Both module layouts of transformers 5.x are read: ``attention.{q,k,v,o}_proj`` with ``mlp.gate_proj/up_proj/
down_proj`` (recent), and ``attention.attention.{query,key,value}`` + ``attention.output.{dense,dropout}`` with
the packed ``mlp.weights_in`` / ``weights_out`` SwiGLU (earlier 5.x; its gate and up halves are read as row views).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._fused import check_layer_norm, compute_dtype, drop_rate, encoder_block, is_identity, patch_layer_norm
from ._hf import (
    RowBlocks,
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

FAMILY = "DINOv2"


def _mlp(layer):
    """(fc1, fc2, epilogue activation) of the layer's MLP: Dinov2MLP, or the SwiGLU FFN as one gated GEMM."""
    mlp = layer.mlp
    if hasattr(mlp, "fc1"):
        return mlp.fc1, mlp.fc2, activation(FAMILY, self_attention(layer.attention).config.hidden_act)
    if hasattr(mlp, "gate_proj"):
        return RowBlocks.of(mlp.gate_proj, mlp.up_proj), mlp.down_proj, "swiglu"
    packed = mlp.weights_in  # [2H, E]: silu(first half) * second half
    hidden = packed.out_features // 2
    w, b = packed.weight, packed.bias
    halves = (None, None) if b is None else (b[:hidden], b[hidden:])
    return RowBlocks((w[:hidden], w[hidden:]), halves), mlp.weights_out, "swiglu"


def _check_mlp(where: str, layer) -> None:
    mlp = layer.mlp
    for names in (("fc1", "fc2"), ("gate_proj", "up_proj", "down_proj"), ("weights_in", "weights_out")):
        if hasattr(mlp, names[0]):
            check_linears(FAMILY, where, *(getattr(mlp, name) for name in names))
            if names[0] == "weights_in" and mlp.weights_in.out_features % 2:
                unsupported(FAMILY, f"{where}.weights_in with an odd number of outputs")
            _mlp(layer)  # the activation
            return
    unsupported(FAMILY, f"{where} of type {type(mlp).__name__}")


def _backbone(model):
    """The Dinov2(WithRegisters)Model inside a classifier, or the model itself."""
    for name in ("dinov2", "dinov2_with_registers"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    return model


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from transformers.models.dinov2 import modeling_dinov2 as plain
    from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as registers

    classes = (plain.Dinov2Model, plain.Dinov2ForImageClassification, registers.Dinov2WithRegistersModel,
               registers.Dinov2WithRegistersForImageClassification)
    if not isinstance(model, classes):
        raise TypeError(f"accelerate expects a transformers {' / '.join(c.__name__ for c in classes)}, got "
                        f"{type(model).__name__}")
    backbone = _backbone(model)
    width = backbone.config.hidden_size
    emb = backbone.embeddings
    check_patch_conv(FAMILY, "embeddings.patch_embeddings.projection", emb.patch_embeddings.projection)
    if getattr(emb, "position_embeddings", None) is None:
        unsupported(FAMILY, "embeddings without position_embeddings")
    check_layer_norm("accelerate: layernorm", backbone.layernorm)
    for i, layer in enumerate(backbone.encoder.layer):
        where = f"encoder.layer.{i}"
        attn = check_layer(FAMILY, where, {"norm1": layer.norm1, "norm2": layer.norm2}, layer.attention, width)
        if attn.proj_dropout is not None and not isinstance(attn.proj_dropout, nn.Dropout):
            unsupported(FAMILY, f"{where}.attention.output.dropout of type {type(attn.proj_dropout).__name__}")
        _check_mlp(f"{where}.mlp", layer)
        for name in ("layer_scale1", "layer_scale2"):
            scale = getattr(layer, name)
            if not is_identity(scale) and tuple(getattr(getattr(scale, "lambda1", None), "shape", ())) != (width,):
                unsupported(FAMILY, f"{where}.{name} of type {type(scale).__name__} (only Dinov2LayerScale)")
        if not is_identity(layer.drop_path) and not hasattr(layer.drop_path, "drop_prob"):
            unsupported(FAMILY, f"{where}.drop_path of type {type(layer.drop_path).__name__}")
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
        unsupported(FAMILY, f"classifier of type {type(classifier).__name__}")


# --- the patched methods ----------------------------------------------------------------------------------------
def embeddings_forward(self, pixel_values, bool_masked_pos=None):
    """``Dinov2Embeddings.forward`` / ``Dinov2WithRegistersEmbeddings.forward`` in one kernel (+ the embedding
    dropout kernel in train mode; + one torch.where with ``bool_masked_pos``)."""
    conv = self.patch_embeddings.projection
    patches = grid_tokens(conv, pixel_values)
    pos = hf_positions(self, conv, pixel_values, 1)
    cls = self.cls_token.view(1, -1)
    registers = getattr(self, "register_tokens", None)
    if registers is None:
        prefix, on_prefix = cls, True
    else:  # HF adds the positions to cls + patches, then inserts the registers after the cls token
        prefix, on_prefix = torch.cat([cls + pos[:1], registers.view(-1, cls.shape[1])]), False
        pos = pos[1:]
    mask_token = getattr(self, "mask_token", None)
    if bool_masked_pos is not None and mask_token is None and getattr(self, "use_mask_token", True):
        raise ValueError("bool_masked_pos needs the mask token (a config with use_mask_token=True)")
    masked = bool_masked_pos is not None and mask_token is not None
    drop = drop_rate(self.dropout, self.training)
    tokens = embed(type(self).__name__, conv, pixel_values, prefix, pos, on_prefix, 0.0 if masked else drop)
    if not masked:
        return tokens
    # HF: masked patch embeddings := mask_token, then + positions
    first = tokens.shape[1] - patches
    fill = (mask_token.view(1, -1) + pos[-patches:]).to(tokens.dtype)
    patch_rows = torch.where(bool_masked_pos.view(-1, patches, 1).to(torch.bool), fill, tokens[:, first:])
    return ops.dropout(torch.cat([tokens[:, :first], patch_rows], dim=1), drop)


def _drop_path_factors(module, batch: int, training: bool, dtype: torch.dtype, device) -> torch.Tensor | None:
    """``Dinov2DropPath`` as the per-sample factors of the epilogue (fp32 [B]): HF's own draw,
    floor(rand(B) + keep) / keep, in the dtype HF draws it (the layer-scaled branch's)."""
    p = float(getattr(module, "drop_prob", 0.0) or 0.0) if training else 0.0
    if not p:
        return None
    keep = 1.0 - p
    kept = torch.floor(torch.rand((batch,), dtype=dtype, device=device) + keep)
    return (kept / keep).float()


def layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """``Dinov2Layer.forward`` as one fused block."""
    attn = self_attention(self.attention)
    fc1, fc2, act = _mlp(self)
    gamma1, gamma2 = (getattr(m, "lambda1", None) for m in (self.layer_scale1, self.layer_scale2))
    training, x = self.training, hidden_states
    dtype = torch.promote_types(compute_dtype(x), (gamma1 if gamma1 is not None else x).dtype)
    drop1, drop2 = (_drop_path_factors(self.drop_path, x.shape[0], training, dtype, x.device) for _ in range(2))
    return run_block(encoder_block, type(self).__name__, x, self.norm1, attn, self.norm2, fc1, fc2,
                     training=training, attention_mask=attention_mask, activation=act, family=FAMILY,
                     gamma1=gamma1, gamma2=gamma2, drop_path1=drop1, drop_path2=drop2)


def patch_dinov2(model):
    """Patch a Hugging Face DINOv2 model in place (see the module docstring); returns ``model``."""
    check_supported(model)
    backbone = _backbone(model)
    patch(backbone.embeddings, "forward", embeddings_forward)
    for layer in backbone.encoder.layer:
        patch(layer, "forward", layer_forward)
    patch_layer_norm(backbone.layernorm)
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        patch(model.classifier, "forward", linear_forward)
    return model
