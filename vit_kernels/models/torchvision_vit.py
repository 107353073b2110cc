"""torchvision ``VisionTransformer`` (vit_b_16, ...) on the fused kernels, patched in place (``accelerate``).

Patched on the user's own model: each ``EncoderBlock.forward`` (the fused block), ``encoder.ln`` (fused
LayerNorm) and the model's ``forward`` (patch projection + class token + position embedding in one kernel, the
blocks called as modules, then the final LayerNorm on the class token only, fused with the head). Every
torchvision dropout runs inside the kernels in train mode. Features the kernels cannot compute raise
``NotImplementedError`` when patching, naming the module.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._fused import (
    caster,
    check_head_dim,
    check_image_batch,
    check_input,
    check_layer_norm,
    classification_head,
    compute_dtype,
    drop_rate,
    encoder_block,
    explicit_dtypes,
    patch_layer_norm,
)
from .patching import patch


def _unsupported(feature: str):
    raise NotImplementedError(f"accelerate (torchvision ViT): {feature} is not supported by the vit_kernels kernels")


def _check_norm(name: str, module) -> None:
    check_layer_norm(f"accelerate: {name}", module)


def _gelu_mode(name: str, act) -> str:
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    _unsupported(f"{name} activation {type(act).__name__} (only nn.GELU)")


class Weights:
    """The (weight, bias) pair ``encoder_block`` reads, for parameters that do not live in an nn.Linear."""

    __slots__ = ("bias", "weight")

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def check_supported(model) -> None:
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"accelerate expects a torchvision VisionTransformer, got {type(model).__name__}")
    conv = model.conv_proj
    if not isinstance(conv, nn.Conv2d):
        _unsupported(f"conv_stem_configs (a convolutional stem, conv_proj of type {type(conv).__name__})")
    p = model.patch_size
    if (conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0) or conv.groups != 1
            or conv.dilation != (1, 1) or conv.out_channels != model.hidden_dim):
        _unsupported("a conv_proj other than a square Conv2d with kernel = stride = patch_size")
    heads = model.heads
    if hasattr(heads, "pre_logits"):
        _unsupported("representation_size (heads.pre_logits + Tanh before the classifier)")
    if not _single_linear_head(heads):
        _unsupported(f"heads other than a single Linear 'head' ({list(getattr(heads, '_modules', {}))})")
    _check_norm("encoder.ln", model.encoder.ln)
    for i, blk in enumerate(model.encoder.layers):
        where = f"encoder.layers.{i}"
        if not isinstance(blk, EncoderBlock) or type(blk).forward is not EncoderBlock.forward:
            _unsupported(f"{where} of type {type(blk).__name__} (only torchvision's EncoderBlock)")
        _check_norm(f"{where}.ln_1", blk.ln_1)
        _check_norm(f"{where}.ln_2", blk.ln_2)
        attn = blk.self_attention
        if not isinstance(attn, nn.MultiheadAttention):
            _unsupported(f"{where}.self_attention of type {type(attn).__name__}")
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            _unsupported(f"{where}.self_attention without in_proj_weight (kdim/vdim != embed_dim)")
        if attn.bias_k is not None or attn.bias_v is not None:
            _unsupported(f"{where}.self_attention bias_k/bias_v (add_bias_kv=True)")
        if attn.add_zero_attn:
            _unsupported(f"{where}.self_attention add_zero_attn=True")
        if attn.in_proj_bias is None or attn.out_proj.bias is None:
            _unsupported(f"{where}.self_attention without bias (bias=False)")
        if not attn.batch_first:
            _unsupported(f"{where}.self_attention with batch_first=False")
        check_head_dim(f"accelerate: {where}.self_attention", attn.embed_dim, attn.num_heads)
        mlp = blk.mlp
        if (not isinstance(mlp, nn.Sequential) or len(mlp) != 5 or not isinstance(mlp[0], nn.Linear)
                or not isinstance(mlp[3], nn.Linear) or not isinstance(mlp[2], nn.Dropout)
                or not isinstance(mlp[4], nn.Dropout)):
            _unsupported(f"{where}.mlp of type {type(mlp).__name__} (only MLPBlock: Linear, GELU, Dropout, "
                         f"Linear, Dropout)")
        _gelu_mode(f"{where}.mlp", mlp[1])


def block_forward(self, input: torch.Tensor) -> torch.Tensor:
    """torchvision ``EncoderBlock.forward`` as one fused block (x's dtype; under autocast, x's dtype promoted
    with autocast's, as torchvision's residual adds give)."""
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        raise ValueError(f"Expected (batch_size, seq_length, hidden_dim) got "
                         f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
    check_input("torchvision EncoderBlock", self.ln_1.weight, input)
    attn, mlp, training = self.self_attention, self.mlp, self.training
    dtype = compute_dtype(input)
    out_dtype, cast = torch.promote_types(input.dtype, dtype), caster(dtype)
    with explicit_dtypes(input):
        out = encoder_block(cast(input), self.ln_1, Weights(attn.in_proj_weight, attn.in_proj_bias), attn.out_proj,
                            self.ln_2, mlp[0], mlp[3], cast, num_heads=attn.num_heads, qkv_interleaved=False,
                            scaling="paper", activation=_gelu_mode("EncoderBlock.mlp", mlp[1]),
                            attn_drop=attn.dropout if training else 0.0, proj_drop=drop_rate(self.dropout, training),
                            hidden_drop=drop_rate(mlp[2], training), out_drop=drop_rate(mlp[4], training))
    return out.to(out_dtype)


def _check_image(model, x: torch.Tensor) -> None:
    check_image_batch(model.conv_proj, x)
    if tuple(x.shape[2:]) != (model.image_size, model.image_size):
        raise ValueError(f"image size {tuple(x.shape[2:])} differs from the model's image_size "
                         f"({model.image_size}, {model.image_size}); torchvision's ViT does not interpolate "
                         f"its position embedding either")


def _single_linear_head(heads) -> bool:
    """torchvision's own classifier: ``heads`` = Sequential(head=Linear), which the fused head kernel computes."""
    return isinstance(heads, nn.Sequential) and list(heads._modules) == ["head"] and isinstance(heads.head, nn.Linear)


def forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward: one patch-embedding kernel, the (patched) blocks, then LayerNorm on the class
    token only fused with the head (LayerNorm then token 0 == token 0 then LayerNorm)."""
    _check_image(self, x)
    conv, encoder = self.conv_proj, self.encoder
    check_input("torchvision VisionTransformer", conv.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        tokens = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(self.class_token).view(1, -1),
                                 cast(encoder.pos_embedding)[0], True)
        tokens = ops.dropout(tokens, drop_rate(encoder.dropout, self.training))
    tokens = encoder.layers(tokens)
    norm = encoder.ln
    if norm._forward_hooks or norm._forward_pre_hooks or not _single_linear_head(self.heads):
        # the user watches the LayerNorm, or replaced the classifier since patching: run them as modules
        return self.heads(norm(tokens)[:, 0])
    return classification_head(tokens, norm, self.heads.head, "token")


def patch_torchvision(model):
    """Patch a torchvision ``VisionTransformer`` in place (see the module docstring); returns ``model``."""
    check_supported(model)
    for blk in model.encoder.layers:
        patch(blk, "forward", block_forward)
    patch_layer_norm(model.encoder.ln)
    patch(model, "forward", forward)
    return model
