"""``HFViT``: a Hugging Face ``ViTModel`` / ``ViTForImageClassification`` on the fused kernels, same keys.

The wrapper *shares* the given model's parameters (no copy): training or loading weights into either one
changes both. It returns the same output classes as the original (``BaseModelOutputWithPooling``,
``ImageClassifierOutput``). Features the kernels cannot honour raise ``NotImplementedError`` naming them.

Hugging Face keeps q, k and v in three Linears; the qkv GEMM wants one [3E, E] weight (rows q, then k,
then v). When autograd needs gradients to those parameters the fused weight is concatenated on every
forward (so the gradients reach ``q_proj``/``k_proj``/``v_proj``); otherwise it is cached and rebuilt only
when a source tensor changes (``_version`` or storage: optimizer steps, ``load_state_dict``, ``.to()``).
Both module layouts are read: transformers 5 (``layers.{i}.attention.q_proj``, ``mlp.fc1``) and
transformers 4 (``encoder.layer.{i}.attention.attention.query``, ``intermediate.dense``).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .. import ops
from ._fused import (
    SharedModel,
    caster,
    compute_dtype,
    drop_rate,
    encoder_block,
    explicit_dtypes,
    recording_attention_maps,
)
from .pos_embed import PositionCache

ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _unsupported(feature: str):
    raise NotImplementedError(f"HFViT: {feature} is not supported by the vit_kernels kernels")


class _Weights:
    """The (weight, bias) pair ``encoder_block`` reads, for the fused q/k/v parameters."""

    __slots__ = ("bias", "weight")

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


class _Layer:
    """One ViTLayer's pieces, whichever transformers layout it uses."""

    __slots__ = (
        "attn",
        "attn_drop",
        "fc1",
        "fc2",
        "head_dim",
        "k",
        "norm1",
        "norm2",
        "num_heads",
        "out_drop",
        "proj",
        "proj_drop",
        "q",
        "scaling",
        "v",
    )

    def __init__(self, layer):
        attn = layer.attention
        self.norm1, self.norm2 = layer.layernorm_before, layer.layernorm_after
        if hasattr(attn, "q_proj"):  # transformers 5
            self.attn = attn
            self.q, self.k, self.v, self.proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
            self.fc1, self.fc2 = layer.mlp.fc1, layer.mlp.fc2
            self.num_heads, self.head_dim = attn.num_attention_heads, attn.head_dim
            self.scaling = attn.scaling
            # the attention-probability dropout is a float; one nn.Dropout serves both sub-layer outputs
            self.attn_drop, self.proj_drop, self.out_drop = attn.attention_dropout, layer.dropout, layer.dropout
        else:  # transformers 4: attention.attention.{query,key,value}, attention.output.dense
            self.attn = attn.attention
            self.q, self.k, self.v = attn.attention.query, attn.attention.key, attn.attention.value
            self.proj = attn.output.dense
            self.fc1, self.fc2 = layer.intermediate.dense, layer.output.dense
            self.num_heads, self.head_dim = attn.attention.num_attention_heads, attn.attention.attention_head_size
            self.scaling = getattr(attn.attention, "scaling", self.head_dim ** -0.5)
            self.attn_drop, self.proj_drop, self.out_drop = attn.attention.dropout, attn.output.dropout, \
                layer.output.dropout

    def dropout_rates(self, training: bool) -> dict:
        """encoder_block's dropout keywords: HF has none after the MLP's activation."""
        attn = self.attn_drop if isinstance(self.attn_drop, float) else drop_rate(self.attn_drop, True)
        return dict(attn_drop=attn if training else 0.0, proj_drop=drop_rate(self.proj_drop, training),
                    out_drop=drop_rate(self.out_drop, training))

    def sources(self):
        return (self.q.weight, self.k.weight, self.v.weight) + \
            (() if self.q.bias is None else (self.q.bias, self.k.bias, self.v.bias))


def _layers(vit):
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


def _activation(config) -> str:
    act = config.hidden_act
    if not isinstance(act, str) or act not in ACTIVATIONS:
        _unsupported(f"hidden_act={act!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def _check_norm(name: str, module) -> None:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        _unsupported(f"{name} of type {type(module).__name__} (only nn.LayerNorm)")


def check_supported(model) -> None:
    from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTModel

    if not isinstance(model, (ViTModel, ViTForImageClassification)):
        raise TypeError(f"HFViT expects a transformers ViTModel or ViTForImageClassification, "
                        f"got {type(model).__name__}")
    vit = model.vit if isinstance(model, ViTForImageClassification) else model
    _activation(model.config)
    conv = vit.embeddings.patch_embeddings.projection
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0)
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel (non-square patch_size)")
    E = conv.out_channels
    _check_norm("layernorm", vit.layernorm)
    for i, layer in enumerate(_layers(vit)):
        where = f"layer {i}"
        parts = _Layer(layer)
        _check_norm(f"{where} layernorm_before", parts.norm1)
        _check_norm(f"{where} layernorm_after", parts.norm2)
        linears = (parts.q, parts.k, parts.v, parts.proj, parts.fc1, parts.fc2)
        if not all(isinstance(m, nn.Linear) for m in linears):
            _unsupported(f"{where} with non-Linear projections")
        if parts.num_heads * parts.head_dim != E or any(m.out_features != E for m in linears[:4]):
            _unsupported(f"{where} with num_attention_heads * head_dim != hidden_size")
        if len({m.bias is None for m in linears[:3]}) != 1:
            _unsupported(f"{where} with a bias on only some of query/key/value")
        if not math.isclose(parts.scaling, parts.head_dim ** -0.5, rel_tol=1e-6):
            _unsupported(f"{where} attention scaling {parts.scaling} (only head_dim ** -0.5)")
    pooler = getattr(vit, "pooler", None)
    if pooler is not None and not isinstance(getattr(pooler, "dense", None), nn.Linear):
        _unsupported(f"pooler of type {type(pooler).__name__}")
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
        _unsupported(f"classifier of type {type(classifier).__name__}")


class HFViT(SharedModel):
    """A Hugging Face ViTModel / ViTForImageClassification's modules and parameters (shared, same names)
    with a fused forward returning the same output class.

    ``last_backend``: ``"triton"`` or ``"torch"`` (CPU tensors without ``TRITON_INTERPRET=1``).
    ``output_attentions=True`` returns HF's ``attentions`` from a separate probabilities kernel (slower:
    N x N per head and layer; the softmax before attention dropout, detached from autograd). Train mode
    applies HF's dropouts (embeddings, attention probabilities, after the attention and after the MLP)
    inside the kernels.
    """

    def __init__(self, model):
        check_supported(model)
        super().__init__(model)
        self.config = model.config
        self.is_classifier = hasattr(model, "classifier")
        vit = model.vit if self.is_classifier else model
        object.__setattr__(self, "_vit", vit)  # already registered under its own name
        self._layers = [_Layer(layer) for layer in _layers(vit)]
        self._qkv_cache = [None] * len(self._layers)
        self._pos_cache = PositionCache()  # interpolate_pos_encoding: one resample per image size
        self._activation = _activation(model.config)

    # --- pieces ------------------------------------------------------------------------------------------
    def _fused_qkv(self, i: int) -> _Weights:
        """The [3E, E] q|k|v weight and [3E] bias: concatenated per forward when gradients must flow back to
        the three Linears, else cached until any source tensor changes (version counter or storage)."""
        layer = self._layers[i]
        sources = layer.sources()
        has_bias = layer.q.bias is not None

        def build():
            w = torch.cat(sources[:3])
            return _Weights(w, torch.cat(sources[3:]) if has_bias else None)

        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            self._qkv_cache[i] = None
            return build()
        key = (torch.is_inference_mode_enabled(), *((t._version, t.data_ptr(), t.dtype, t.device) for t in sources))
        cached = self._qkv_cache[i]
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._qkv_cache[i] = (key, build())
        return cached[1]

    def _positions(self, height: int, width: int, interpolate: bool) -> torch.Tensor:
        """The [1 + L, E] position table for this image, as ``ViTEmbeddings`` builds it."""
        emb = self._vit.embeddings
        pos = emb.position_embeddings[0]
        image_size = tuple(emb.patch_embeddings.image_size)
        if not interpolate:
            if (height, width) != image_size:
                raise ValueError(f"image size ({height}, {width}) differs from the model's {image_size}; pass "
                                 f"interpolate_pos_encoding=True to resample the position embeddings")
            return pos
        # HF's interpolate_pos_encoding: the square grid of positions resampled bicubically (align_corners=False,
        # no antialias) to the image's (H // p, W // p) grid, the cls row kept; unchanged when the grid is the same
        # (HF returns the table as is for the same patch count and H == W; any other same-grid case is an identity
        # resample). resample_pos_embed computes in float32 (HF in the table's dtype: equal for fp32 tables).
        p = emb.patch_embeddings.projection.kernel_size[0]
        num_positions = pos.shape[0] - 1
        side = round(num_positions ** 0.5)
        if side * side != num_positions:
            raise ValueError(f"interpolate_pos_encoding needs a square grid of positions, got {num_positions}")
        if height < p or width < p:
            raise ValueError(f"image size ({height}, {width}) is smaller than one {p}x{p} patch")
        if "_pos_cache" not in self.__dict__:
            self._pos_cache = PositionCache()
        return self._pos_cache.get(pos, (side, side), (height // p, width // p), 1, mode="bicubic", antialias=False)

    def _check_image(self, x) -> torch.Tensor:
        conv = self._vit.embeddings.patch_embeddings.projection
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"expected pixel_values [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"expected {conv.in_channels} input channels, got {x.shape[1]}")
        if x.device != conv.weight.device:
            raise ValueError(f"input is on {x.device} but the model's parameters are on {conv.weight.device}")
        return x.to(conv.weight.dtype)  # as ViTModel.forward does

    def _encode(self, x: torch.Tensor, interpolate: bool, keep_hidden: bool):
        """Embeddings and the layers: the tokens before the final norm, and the hidden states if asked."""
        cast = caster(compute_dtype(x))
        emb = self._vit.embeddings
        conv = emb.patch_embeddings.projection
        pos = self._positions(x.shape[2], x.shape[3], interpolate)
        tokens = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(emb.cls_token).view(1, -1),
                                 cast(pos), True)
        tokens = ops.dropout(tokens, drop_rate(emb.dropout, self.training))
        hidden = [tokens] if keep_hidden else None
        for i, layer in enumerate(self._layers):
            tokens = encoder_block(tokens, layer.norm1, self._fused_qkv(i), layer.proj, layer.norm2, layer.fc1,
                                   layer.fc2, cast, num_heads=layer.num_heads, qkv_interleaved=False,
                                   scaling="paper", activation=self._activation,
                                   **layer.dropout_rates(self.training))
            if keep_hidden:
                hidden.append(tokens)
        return tokens, None if hidden is None else tuple(hidden)

    # --- forward -----------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                bool_masked_pos: torch.Tensor | None = None, head_mask: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                interpolate_pos_encoding: bool | None = None, return_dict: bool | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs):
        given = {"bool_masked_pos": bool_masked_pos, "head_mask": head_mask, "attention_mask": attention_mask}
        unsupported = [name for name, value in given.items() if value is not None] + sorted(kwargs)
        if unsupported:
            _unsupported(f"forward argument(s) {', '.join(unsupported)}")
        if labels is not None and not self.is_classifier:
            raise TypeError("labels are only accepted by a wrapped ViTForImageClassification")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        interpolate = bool(interpolate_pos_encoding)
        x = self._check_image(pixel_values)
        self.last_backend = ops.backend_for(x)
        with explicit_dtypes(x):
            # attention maps: a second kernel per layer writes the probabilities the fused attention never stores
            with recording_attention_maps() if output_attentions else contextlib.nullcontext() as maps:
                tokens, hidden = self._encode(x, interpolate, output_hidden_states)
            attentions = tuple(maps) if output_attentions else None
            norm = self._vit.layernorm
            cast = caster(tokens.dtype)
            if self.is_classifier:
                # LayerNorm then taking token 0 == taking token 0 then LayerNorm: one fused kernel
                logits = ops.pool_tokens(tokens, "token", 0, cast(norm.weight), cast(norm.bias), norm.eps)
                if isinstance(self.classifier, nn.Linear):
                    logits = ops.linear(logits, cast(self.classifier.weight), cast(self.classifier.bias))
            else:
                sequence = ops.layer_norm(tokens, cast(norm.weight), cast(norm.bias), norm.eps)
                pooler, pooled = self._vit.pooler, None
                if pooler is not None:
                    first = ops.pool_tokens(sequence, "token", 0, norm=False)
                    pooled = pooler.activation(ops.linear(first, cast(pooler.dense.weight), cast(pooler.dense.bias)))
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        if self.is_classifier:
            loss = None if labels is None else self.original.loss_function(labels, logits, config)
            out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden, attentions=attentions)
        else:
            out = BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled, hidden_states=hidden,
                                             attentions=attentions)
        return out if return_dict else out.to_tuple()
