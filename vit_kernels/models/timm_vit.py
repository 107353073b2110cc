"""``from_timm``: a timm ``VisionTransformer`` running on the fused kernels, same state_dict keys.

The returned module *shares* the given model's parameters (no copy): training or loading weights into
either one changes both. Features the kernels cannot honour raise ``NotImplementedError`` naming them.
Models built with ``dynamic_img_size=True`` accept other image sizes as timm does (position embedding
resampled bicubically); ``from_timm(model, dynamic_img_size=True)`` opts any other model in.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ._fused import (
    SharedModel,
    caster,
    check_matches_model,
    compute_dtype,
    drop_path_factors,
    drop_rate,
    encoder_block,
    explicit_dtypes,
    unfused_dropout,
    warn_dropout_fallback,
)
from .pos_embed import PositionCache, image_grid

POOLS = {"token": "token", "avg": "mean"}


def _unsupported(feature: str):
    raise NotImplementedError(f"from_timm: {feature} is not supported by the vit_kernels kernels")


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _check_norm(name: str, module, allow_identity: bool = True) -> None:
    if allow_identity and _is_identity(module):
        return
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        _unsupported(f"{name} of type {type(module).__name__} (only nn.LayerNorm over the last axis)")


def _gelu_mode(name: str, act) -> str:
    """nn.GELU (exact or tanh) and timm's own GELU / GELUTanh modules; anything else is refused."""
    from timm.layers.activations import GELU, GELUTanh

    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if type(act) in (GELU, GELUTanh):
        return "gelu_tanh" if type(act) is GELUTanh else "gelu"
    _unsupported(f"{name} activation {type(act).__name__} (only GELU, exact or tanh)")


def _check_layer_scale(name: str, module) -> None:
    """Identity or timm's LayerScale (a per-feature gamma, which the GEMM epilogue applies)."""
    if not _is_identity(module) and (type(module).__name__ != "LayerScale" or not hasattr(module, "gamma")):
        _unsupported(f"{name} of type {type(module).__name__}")


def check_supported(model) -> None:
    from timm.layers import Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None or model.global_pool == "map":
        _unsupported("global_pool='map' (attention pooling)")
    if model.global_pool not in POOLS:
        _unsupported(f"global_pool={model.global_pool!r} (supported: 'token', 'avg')")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        _unsupported(f"patch embedding {type(pe).__name__} (only timm's PatchEmbed)")
    if getattr(pe, "dynamic_img_pad", False):
        _unsupported("dynamic_img_pad=True (padding images to a multiple of the patch)")
    # a dynamic_img_size model's PatchEmbed outputs NHWC, which its _pos_embed flattens: the same tokens
    if not (pe.flatten or (getattr(model, "dynamic_img_size", False) and pe.output_fmt.value == "NHWC")):
        _unsupported(f"patch embedding with output format {pe.output_fmt.value} (unflattened output)")
    conv = pe.proj
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0)
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel")
    if not _is_identity(pe.norm):
        _unsupported("patch_embed.norm (norm after patch projection)")
    _check_norm("norm_pre", model.norm_pre)
    _check_norm("norm", model.norm)
    _check_norm("fc_norm", model.fc_norm)
    if not (_is_identity(model.head) or isinstance(model.head, nn.Linear)):
        _unsupported(f"head of type {type(model.head).__name__}")
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if type(blk) is not Block:
            _unsupported(f"{where} of type {type(blk).__name__} (only timm's pre-norm Block)")
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not Attention:
            _unsupported(f"{where}.attn of type {type(attn).__name__}")
        if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
            _unsupported(f"{where}.attn qk_norm")
        if not _is_identity(getattr(attn, "norm", None)) or getattr(attn, "gate", None) is not None:
            _unsupported(f"{where}.attn scale_norm/gating")
        if not math.isclose(attn.scale, attn.head_dim ** -0.5, rel_tol=1e-6):
            _unsupported(f"{where}.attn scale {attn.scale} (only head_dim ** -0.5)")
        if attn.qkv.in_features != attn.proj.out_features or attn.attn_dim != attn.proj.out_features:
            _unsupported(f"{where}.attn with attn_dim != embed_dim")
        _check_norm(f"{where}.norm1", blk.norm1, allow_identity=False)
        _check_norm(f"{where}.norm2", blk.norm2, allow_identity=False)
        if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not _is_identity(mlp.norm):
            _unsupported(f"{where}.mlp of type {type(mlp).__name__} (only timm Mlp with Linear layers, no norm)")
        _gelu_mode(f"{where}.mlp", mlp.act)
        _check_layer_scale(f"{where}.ls1", blk.ls1)
        _check_layer_scale(f"{where}.ls2", blk.ls2)


class TimmViT(SharedModel):
    """A timm VisionTransformer's modules and parameters (shared, same names) with a fused forward."""

    def __init__(self, model, dynamic_img_size: bool | None = None):
        check_supported(model)
        super().__init__(model)  # self.original: timm's own forward, the path for patch dropout
        self.num_prefix_tokens = model.num_prefix_tokens
        self.pos_on_prefix = not model.no_embed_class
        self.pool = POOLS[model.global_pool]
        self.pool_start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        # per-block activation, decided once (no per-forward isinstance work on the launch path)
        self._activations = [_gelu_mode(f"blocks.{i}.mlp", blk.mlp.act) for i, blk in enumerate(model.blocks)]
        # other image sizes: timm's own setting unless the caller opts in (or out); settable later
        self.dynamic_img_size = bool(getattr(model, "dynamic_img_size", False) if dynamic_img_size is None
                                     else dynamic_img_size)
        # timm resamples the grid rows only; with no_embed_class the table has no prefix rows
        self._pos_prefix = self.num_prefix_tokens if self.pos_on_prefix else 0
        self._pos_cache = PositionCache()
        # dropouts the kernels apply (train mode, stochastic depth included); patch_drop runs timm's forward
        fused = [getattr(model, "pos_drop", None), getattr(model, "head_drop", None)]
        for blk in model.blocks:
            fused += [blk.attn.attn_drop, blk.attn.proj_drop, blk.mlp.drop1, blk.mlp.drop2, blk.drop_path1,
                      blk.drop_path2]
        self._fused_dropout = {id(m) for m in fused if m is not None}

    def _check_image(self, x: torch.Tensor) -> tuple[int, int]:
        """Checks x; returns its patch grid."""
        conv = self.patch_embed.proj
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"expected a floating-point image batch [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"expected {conv.in_channels} input channels, got {x.shape[1]}")
        if tuple(x.shape[2:]) == tuple(self.patch_embed.img_size):
            return tuple(self.patch_embed.grid_size)
        if not self.dynamic_img_size:
            raise ValueError(f"image size {tuple(x.shape[2:])} differs from the model's "
                             f"{tuple(self.patch_embed.img_size)}; for other sizes build the timm model with "
                             f"dynamic_img_size=True or use from_timm(model, dynamic_img_size=True)")
        return image_grid(x.shape[2], x.shape[3], self.patch_embed.patch_size)

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """pos_embed as a [T, E] table for this grid (timm's resampling, cached per size)."""
        pos = getattr(self, "pos_embed", None)
        if pos is None or grid == tuple(self.patch_embed.grid_size):
            return None if pos is None else pos[0]
        return self._pos_cache.get(pos[0], self.patch_embed.grid_size, grid, self._pos_prefix)

    def _prepare(self, x: torch.Tensor) -> tuple[tuple[int, int], bool]:
        """Checks x; its patch grid, and True (with a one-time warning) when train mode has patch dropout, which
        needs timm's own forward (every other dropout and stochastic depth run inside the kernels)."""
        grid = self._check_image(x)
        check_matches_model(self, x)
        dropping = unfused_dropout(self, self._fused_dropout)
        if dropping:
            warn_dropout_fallback(self, dropping)
            self.last_backend = "reference"
            return grid, True
        self.last_backend = ops.backend_for(x)
        return grid, False

    def _timm_takes(self, grid) -> bool:
        """Whether timm's own forward accepts this grid (its size, or a dynamic_img_size model)."""
        return getattr(self.original, "dynamic_img_size", False) or grid == tuple(self.patch_embed.grid_size)

    def _timm_features(self, x: torch.Tensor, grid) -> torch.Tensor:
        """timm's forward_features in PyTorch (patch dropout): timm's own when it takes this size, else
        timm's modules with the resampled position table (an opted-in model at another size)."""
        m = self.original
        if self._timm_takes(grid):
            return m.forward_features(x)
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        pos = self._positions(grid)
        if pos is not None and not self.pos_on_prefix:
            tokens = tokens + pos
        tokens = torch.cat([*prefix, tokens], dim=1) if prefix else tokens
        if pos is not None and self.pos_on_prefix:
            tokens = tokens + pos
        tokens = m.norm_pre(m.patch_drop(m.pos_drop(tokens)))
        return m.norm(m.blocks(tokens))

    def _encode(self, x: torch.Tensor, grid) -> torch.Tensor:
        """Patch embedding, norm_pre and the blocks; the final norm is left to the caller."""
        cast = caster(compute_dtype(x))
        prefix = [t.view(-1, t.shape[-1]) for t in (getattr(self, "cls_token", None),
                                                    getattr(self, "reg_token", None)) if t is not None]
        conv = self.patch_embed.proj
        prefix = torch.cat(prefix) if prefix else conv.weight.new_empty((0, conv.out_channels))
        pos = self._positions(grid)
        x = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(prefix), cast(pos),
                            self.pos_on_prefix)
        x = ops.dropout(x, drop_rate(getattr(self, "pos_drop", None), self.training))
        x = _layer_norm(self.norm_pre, x)
        training, batch = self.training, x.shape[0]
        for blk, activation in zip(self.blocks, self._activations):
            attn, mlp = blk.attn, blk.mlp
            x = encoder_block(x, blk.norm1, attn.qkv, attn.proj, blk.norm2, mlp.fc1, mlp.fc2, cast,
                              num_heads=attn.num_heads, qkv_interleaved=False, scaling="paper",
                              activation=activation, gamma1=getattr(blk.ls1, "gamma", None),
                              gamma2=getattr(blk.ls2, "gamma", None), attn_drop=drop_rate(attn.attn_drop, training),
                              proj_drop=drop_rate(attn.proj_drop, training), hidden_drop=drop_rate(mlp.drop1, training),
                              out_drop=drop_rate(mlp.drop2, training),
                              drop_path1=drop_path_factors(blk.drop_path1, batch, training, x.device),
                              drop_path2=drop_path_factors(blk.drop_path2, batch, training, x.device))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, N, E] after the final norm (timm's forward_features)."""
        grid, reference_path = self._prepare(x)
        if reference_path:
            return self._timm_features(x, grid)
        with explicit_dtypes(x):
            return _layer_norm(self.norm, self._encode(x, grid))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [B, N, E] (after the final norm) -> logits, or the pooled features with ``pre_logits``."""
        with explicit_dtypes(x):
            return self._head(x, None, pre_logits)

    def _head(self, x, norm, pre_logits=False):
        """Pool, then LayerNorm (``norm`` fused into the pooling kernel, else fc_norm), then the Linear."""
        cast = caster(x.dtype)
        norm = norm if norm is not None else None if _is_identity(self.fc_norm) else self.fc_norm
        start = self.pool_start if self.pool == "mean" else 0
        x = ops.pool_tokens(x, self.pool, start, cast(getattr(norm, "weight", None)),
                            cast(getattr(norm, "bias", None)), getattr(norm, "eps", 1e-6), norm=norm is not None)
        x = ops.dropout(x, drop_rate(getattr(self, "head_drop", None), self.training))
        if pre_logits or _is_identity(self.head):
            return x
        return ops.linear(x, cast(self.head.weight), cast(self.head.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, reference_path = self._prepare(x)
        if reference_path:
            m = self.original
            return m(x) if self._timm_takes(grid) else m.forward_head(self._timm_features(x, grid))
        with explicit_dtypes(x):
            tokens = self._encode(x, grid)
            if self.pool == "token" and _is_identity(self.fc_norm) and not _is_identity(self.norm):
                # LayerNorm then taking token 0 == taking token 0 then LayerNorm: one fused kernel
                return self._head(tokens, self.norm)
            return self._head(_layer_norm(self.norm, tokens), None)


def _layer_norm(norm, x):
    """Apply an nn.LayerNorm (or Identity) with the fused op, in x's dtype."""
    if _is_identity(norm):
        return x
    cast = caster(x.dtype)
    return ops.layer_norm(x, cast(norm.weight), cast(norm.bias), norm.eps)


def from_timm(model, dynamic_img_size: bool | None = None) -> TimmViT:
    """Wrap a timm ``VisionTransformer`` so its forward runs on the fused kernels.

    The result has the same state_dict keys and shares the model's parameters (no copy).
    ``dynamic_img_size``: None follows the model (timm's ``dynamic_img_size``); True accepts any image whose
    sides are multiples of the patch size, resampling ``pos_embed`` exactly as timm's dynamic models do
    (bicubic, antialiased, cached per size); False accepts only the model's ``img_size``.
    """
    return TimmViT(model, dynamic_img_size)
