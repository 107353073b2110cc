"""``TorchvisionViT``: a torchvision ``VisionTransformer`` (vit_b_16, ...) on the fused kernels, same keys.

The wrapper *shares* the given model's parameters (no copy): training or loading weights into either one
changes both. Features the kernels cannot honour raise ``NotImplementedError`` naming them.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._fused import (
    SharedModel,
    caster,
    check_matches_model,
    compute_dtype,
    drop_rate,
    encoder_block,
    explicit_dtypes,
)


def _unsupported(feature: str):
    raise NotImplementedError(f"TorchvisionViT: {feature} is not supported by the vit_kernels kernels")


def _check_norm(name: str, module) -> None:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        _unsupported(f"{name} of type {type(module).__name__} (norm_layer must be nn.LayerNorm)")


def _gelu_mode(name: str, act) -> str:
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    _unsupported(f"{name} activation {type(act).__name__} (only nn.GELU)")


class _Weights:
    """The (weight, bias) pair ``encoder_block`` reads, for parameters that do not live in an nn.Linear."""

    __slots__ = ("bias", "weight")

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def check_supported(model) -> None:
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"TorchvisionViT expects a torchvision VisionTransformer, got {type(model).__name__}")
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
    if not isinstance(heads, nn.Sequential) or list(heads._modules) != ["head"] or \
            not isinstance(heads.head, nn.Linear):
        _unsupported(f"heads other than a single Linear 'head' ({list(getattr(heads, '_modules', {}))})")
    _check_norm("encoder.ln", model.encoder.ln)
    for i, blk in enumerate(model.encoder.layers):
        where = f"encoder.layers.{i}"
        if type(blk) is not EncoderBlock:
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
        mlp = blk.mlp
        if (not isinstance(mlp, nn.Sequential) or len(mlp) != 5 or not isinstance(mlp[0], nn.Linear)
                or not isinstance(mlp[3], nn.Linear) or not isinstance(mlp[2], nn.Dropout)
                or not isinstance(mlp[4], nn.Dropout)):
            _unsupported(f"{where}.mlp of type {type(mlp).__name__} (only MLPBlock: Linear, GELU, Dropout, "
                         f"Linear, Dropout)")
        _gelu_mode(f"{where}.mlp", mlp[1])


class TorchvisionViT(SharedModel):
    """A torchvision VisionTransformer's modules and parameters (shared, same names) with a fused forward.

    ``last_backend`` says which path the last forward took: ``"triton"`` or ``"torch"`` (CPU tensors without
    ``TRITON_INTERPRET=1``). Train mode applies every torchvision dropout inside the kernels: after the
    position embedding, on the attention probabilities (``nn.MultiheadAttention.dropout``), after the
    attention and after each MLP Linear.
    """

    def __init__(self, model):
        check_supported(model)
        super().__init__(model)
        self.image_size, self.patch_size = model.image_size, model.patch_size
        self._activations = [_gelu_mode(f"encoder.layers.{i}.mlp", blk.mlp[1])
                             for i, blk in enumerate(model.encoder.layers)]

    def _check_image(self, x: torch.Tensor) -> None:
        conv = self.conv_proj
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"expected a floating-point image batch [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"expected {conv.in_channels} input channels, got {x.shape[1]}")
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"image size {tuple(x.shape[2:])} differs from the model's image_size "
                             f"({self.image_size}, {self.image_size}); torchvision's ViT does not interpolate "
                             f"its position embedding either")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_image(x)
        check_matches_model(self, x)
        self.last_backend = ops.backend_for(x)
        cast = caster(compute_dtype(x))
        conv, encoder = self.conv_proj, self.encoder
        with explicit_dtypes(x):
            tokens = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(self.class_token).view(1, -1),
                                     cast(encoder.pos_embedding)[0], True)
            training = self.training
            tokens = ops.dropout(tokens, drop_rate(encoder.dropout, training))
            for blk, activation in zip(encoder.layers, self._activations):
                attn, mlp = blk.self_attention, blk.mlp
                tokens = encoder_block(tokens, blk.ln_1, _Weights(attn.in_proj_weight, attn.in_proj_bias),
                                       attn.out_proj, blk.ln_2, mlp[0], mlp[3], cast, num_heads=attn.num_heads,
                                       qkv_interleaved=False, scaling="paper", activation=activation,
                                       attn_drop=attn.dropout if training else 0.0,
                                       proj_drop=drop_rate(blk.dropout, training),
                                       hidden_drop=drop_rate(mlp[2], training), out_drop=drop_rate(mlp[4], training))
            norm, head = encoder.ln, self.heads.head
            # LayerNorm then taking token 0 == taking token 0 then LayerNorm: one fused kernel
            return ops.classification_head(tokens, cast(norm.weight), cast(norm.bias), norm.eps,
                                           cast(head.weight), cast(head.bias), pool="token", start=0)
