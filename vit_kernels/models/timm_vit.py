"""timm ``VisionTransformer`` on the fused kernels, patched in place (``from_timm`` / ``accelerate``).

Patched on the user's own model: each ``Block.forward`` (the fused block), ``patch_embed.forward`` (the fused
patch projection, used by ``forward_intermediates``), the LayerNorms ``norm_pre`` / ``norm`` / ``fc_norm``,
and the model's ``forward_features`` / ``forward_head`` / ``forward`` (patch projection, prefix tokens and
position embedding in one kernel; with token pooling the final LayerNorm runs on the pooled token only).
Everything is read from the model at call time, so ``.eval()``, ``reset_classifier``, ``load_state_dict(...,
assign=True)``, ``.data`` writes, ``set_grad_checkpointing``, hooks and FSDP2 all act as on timm's own model.
Features the kernels cannot compute raise ``NotImplementedError`` when patching, naming the module.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .. import ops
from ._fused import (
    autocast_on,
    caster,
    check_head_dim,
    check_image_batch,
    check_input,
    check_layer_norm,
    compute_dtype,
    drop_path_factors,
    drop_rate,
    encoder_block,
    explicit_dtypes,
    is_identity,
    patch_layer_norm,
)
from .patching import patch
from .pos_embed import image_grid, resample_pos_embed

POOLS = {"token": "token", "avg": "mean"}
DYNAMIC = "vit_kernels_dynamic_img_size"  # from_timm's opt-in / opt-out for other image sizes


def _unsupported(feature: str):
    raise NotImplementedError(f"from_timm: {feature} is not supported by the vit_kernels kernels")


def _gelu_mode(where: str, act) -> str:
    """nn.GELU (exact or tanh) and timm's own GELU / GELUTanh modules; anything else is refused."""
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    mode = _timm_gelus().get(type(act))
    if mode is None:
        _unsupported(f"{where} activation {type(act).__name__} (only GELU, exact or tanh)")
    return mode


@functools.cache
def _timm_gelus() -> dict:
    from timm.layers.activations import GELU, GELUTanh

    return {GELU: "gelu", GELUTanh: "gelu_tanh"}


def _check_layer_scale(where: str, module) -> None:
    """Identity or timm's LayerScale (a per-feature gamma, which the GEMM epilogue applies)."""
    if not is_identity(module) and (type(module).__name__ != "LayerScale" or not hasattr(module, "gamma")):
        _unsupported(f"{where} of type {type(module).__name__}")


def _same_forward(module, cls) -> bool:
    """``module`` is a ``cls`` running ``cls.forward`` (FSDP2's per-module subclasses keep it)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _check_head(model) -> None:
    if getattr(model, "attn_pool", None) is not None or model.global_pool == "map":
        _unsupported("global_pool='map' (attention pooling)")
    if model.global_pool not in POOLS:
        _unsupported(f"global_pool={model.global_pool!r} (supported: 'token', 'avg')")
    if not (is_identity(model.head) or isinstance(model.head, nn.Linear)):
        _unsupported(f"head of type {type(model.head).__name__}")


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from timm.layers import Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    _check_head(model)
    pe = model.patch_embed
    if not _same_forward(pe, PatchEmbed):
        _unsupported(f"patch embedding {type(pe).__name__} (only timm's PatchEmbed)")
    if getattr(pe, "dynamic_img_pad", False):
        _unsupported("dynamic_img_pad=True (padding images to a multiple of the patch)")
    if not (pe.flatten or pe.output_fmt.value == "NHWC"):
        _unsupported(f"patch embedding with output format {pe.output_fmt.value}")
    conv = pe.proj
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0)
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel")
    if not is_identity(pe.norm):
        _unsupported("patch_embed.norm (norm after patch projection)")
    for name in ("norm_pre", "norm", "fc_norm"):
        check_layer_norm(f"from_timm: {name}", getattr(model, name), allow_identity=True)
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if not _same_forward(blk, Block):
            _unsupported(f"{where} of type {type(blk).__name__} (only timm's pre-norm Block)")
        attn, mlp = blk.attn, blk.mlp
        if not _same_forward(attn, Attention):
            _unsupported(f"{where}.attn of type {type(attn).__name__}")
        if not (is_identity(attn.q_norm) and is_identity(attn.k_norm)):
            _unsupported(f"{where}.attn qk_norm")
        if not is_identity(getattr(attn, "norm", None)) or getattr(attn, "gate", None) is not None:
            _unsupported(f"{where}.attn scale_norm/gating")
        if not math.isclose(attn.scale, attn.head_dim ** -0.5, rel_tol=1e-6):
            _unsupported(f"{where}.attn scale {attn.scale} (only head_dim ** -0.5)")
        if attn.qkv.in_features != attn.proj.out_features or attn.attn_dim != attn.proj.out_features:
            _unsupported(f"{where}.attn with attn_dim != embed_dim")
        check_head_dim(f"from_timm: {where}.attn", attn.attn_dim, attn.num_heads)
        check_layer_norm(f"from_timm: {where}.norm1", blk.norm1)
        check_layer_norm(f"from_timm: {where}.norm2", blk.norm2)
        if not _same_forward(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear) or not is_identity(mlp.norm):
            _unsupported(f"{where}.mlp of type {type(mlp).__name__} (only timm Mlp with Linear layers, no norm)")
        _gelu_mode(f"{where}.mlp", mlp.act)
        _check_layer_scale(f"{where}.ls1", blk.ls1)
        _check_layer_scale(f"{where}.ls2", blk.ls2)


# --- the patched methods ----------------------------------------------------------------------------------------
def _bool_mask(attn_mask, is_causal: bool, tokens: int, device):
    """timm's attn_mask / is_causal as the kernels' boolean mask (True = attend), or None."""
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool):
        _unsupported("a float (additive) attn_mask; pass a torch.bool mask, True = attend")
    if is_causal:
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
        return causal if attn_mask is None else attn_mask & causal
    return attn_mask


def block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Block.forward`` as one fused block; returns x's dtype (under autocast as timm: its dtype
    promoted with autocast's)."""
    attn, mlp = self.attn, self.mlp
    check_input("timm Block", self.norm1.weight, x)
    mask = _bool_mask(attn_mask, is_causal, x.shape[1], x.device)
    dtype = compute_dtype(x)
    out_dtype = torch.promote_types(x.dtype, dtype)
    training, cast = self.training, caster(dtype)
    with explicit_dtypes(x):
        y = encoder_block(cast(x), self.norm1, attn.qkv, attn.proj, self.norm2, mlp.fc1, mlp.fc2, cast,
                          num_heads=attn.num_heads, qkv_interleaved=False, scaling="paper", mask=mask,
                          activation=_gelu_mode("Block.mlp", mlp.act), gamma1=getattr(self.ls1, "gamma", None),
                          gamma2=getattr(self.ls2, "gamma", None), attn_drop=drop_rate(attn.attn_drop, training),
                          proj_drop=drop_rate(attn.proj_drop, training), hidden_drop=drop_rate(mlp.drop1, training),
                          out_drop=drop_rate(mlp.drop2, training),
                          drop_path1=drop_path_factors(self.drop_path1, x.shape[0], training, x.device),
                          drop_path2=drop_path_factors(self.drop_path2, x.shape[0], training, x.device))
    return y.to(out_dtype)


def _check_image(pe, x, dynamic: bool) -> tuple[int, int]:
    """timm PatchEmbed's image checks as ValueErrors; returns the patch grid."""
    check_image_batch(pe.proj, x)
    if tuple(x.shape[2:]) == tuple(pe.img_size):
        return tuple(pe.grid_size)
    if not dynamic:
        raise ValueError(f"image size {tuple(x.shape[2:])} differs from the model's {tuple(pe.img_size)}; for other "
                         f"sizes build the timm model with dynamic_img_size=True or use "
                         f"from_timm(model, dynamic_img_size=True)")
    return image_grid(x.shape[2], x.shape[3], pe.patch_size)


def patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``PatchEmbed.forward`` (the Conv2d patch projection) on the fused kernel, same output format."""
    grid = _check_image(self, x, not self.strict_img_size)
    check_input("timm PatchEmbed", self.proj.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        prefix = self.proj.weight.new_empty((0, self.proj.out_channels), dtype=dtype)
        out = ops.patch_embed(cast(x), cast(self.proj.weight), cast(self.proj.bias), prefix, None)
    return out if self.flatten else out.view(x.shape[0], *grid, out.shape[-1])


def _positions(model, grid) -> torch.Tensor | None:
    """pos_embed as a [T, E] table for this grid, resampled as timm does (every forward: nothing cached)."""
    pos = model.pos_embed
    native = tuple(model.patch_embed.grid_size)
    if pos is None or grid == native:
        return None if pos is None else pos[0]
    return resample_pos_embed(pos[0], native, grid, 0 if model.no_embed_class else model.num_prefix_tokens)


def _trunk(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    """timm's forward_features up to the final norm: patch projection + prefix + positions in one kernel,
    embedding dropout in the kernels, timm's patch dropout module, norm_pre, then the blocks as timm runs them."""
    dynamic = self.__dict__.get(DYNAMIC)
    grid = _check_image(self.patch_embed, x, self.dynamic_img_size if dynamic is None else dynamic)
    conv = self.patch_embed.proj
    check_input("timm VisionTransformer", conv.weight, x)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        prefix = [t.view(-1, t.shape[-1]) for t in (self.cls_token, self.reg_token) if t is not None]
        prefix = torch.cat(prefix) if prefix else conv.weight.new_empty((0, conv.out_channels))
        x = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(prefix), cast(_positions(self, grid)),
                            not self.no_embed_class)
        x = ops.dropout(x, drop_rate(self.pos_drop, self.training))
    x = self.norm_pre(self.patch_drop(x))  # patch dropout: timm's module (a PyTorch gather), identity in eval
    if attn_mask is not None or is_causal:
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
    elif self.grad_checkpointing and not torch.jit.is_scripting():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(self.blocks, x)
    else:
        x = self.blocks(x)
    return x


def forward_features(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    return self.norm(_trunk(self, x, attn_mask, is_causal))


def _head(self, x, pool: str, start: int, norm, pre_logits: bool, fp32_norm: bool) -> torch.Tensor:
    """Pool (+ LayerNorm ``norm``, fused into the pooling kernel) + head dropout + head Linear. ``fp32_norm``:
    pool and normalize in fp32, as timm's LayerNorm under autocast returns fp32 (for pre-logit features)."""
    if fp32_norm:
        x = x.float()
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(x.dtype)
        x = ops.pool_tokens(x, pool, start, cast(getattr(norm, "weight", None)), cast(getattr(norm, "bias", None)),
                            getattr(norm, "eps", 1e-6), norm=norm is not None)
        x = ops.dropout(x, drop_rate(self.head_drop, self.training))
        if pre_logits or is_identity(self.head):
            return x
        cast = caster(dtype)
        return ops.linear(cast(x), cast(self.head.weight), cast(self.head.bias))


def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's forward_head: pool, fc_norm, head_drop, head, with the pooling and fc_norm in one kernel."""
    _check_head(self)
    pool = POOLS[self.global_pool]
    start = self.num_prefix_tokens if pool == "mean" and not getattr(self, "pool_include_prefix", False) else 0
    norm = None if is_identity(self.fc_norm) else self.fc_norm
    return _head(self, x, pool, start, norm, pre_logits, fp32_norm=norm is not None and autocast_on(x))


def forward(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    """With token pooling and no fc_norm, the final LayerNorm then token 0 equals token 0 then the LayerNorm:
    one fused kernel on B rows instead of a LayerNorm over all B x N tokens."""
    if self.global_pool == "token" and is_identity(self.fc_norm) and isinstance(self.norm, nn.LayerNorm) \
            and self.attn_pool is None and not self.norm._forward_hooks and not self.norm._forward_pre_hooks:
        # logits only: the pooled row is normalized in the compute dtype (no fp32 copy of the tokens)
        return _head(self, _trunk(self, x, attn_mask, is_causal), "token", 0, self.norm, False, fp32_norm=False)
    return self.forward_head(self.forward_features(x, attn_mask, is_causal))


def patch_timm(model, dynamic_img_size: bool | None = None):
    """Patch a timm ``VisionTransformer`` in place (see the module docstring); returns ``model``."""
    check_supported(model)
    if dynamic_img_size is not None and not isinstance(dynamic_img_size, bool):
        raise TypeError(f"dynamic_img_size must be None, True or False, got {dynamic_img_size!r}")
    for blk in model.blocks:
        patch(blk, "forward", block_forward)
    patch(model.patch_embed, "forward", patch_embed_forward)
    for norm in (model.norm_pre, model.norm, model.fc_norm):
        patch_layer_norm(norm)
    for name, method in (("forward_features", forward_features), ("forward_head", forward_head),
                         ("forward", forward)):
        patch(model, name, method)
    if dynamic_img_size is not None:
        model.__dict__[DYNAMIC] = dynamic_img_size
    return model


def from_timm(model, dynamic_img_size: bool | None = None):
    """Put a timm ``VisionTransformer`` on the fused kernels, in place; returns the same model.

    ``dynamic_img_size``: None follows the model (timm's ``dynamic_img_size``); True lets ``model(x)`` and
    ``forward_features`` take any image whose sides are multiples of the patch size, resampling ``pos_embed``
    exactly as timm's dynamic models do (bicubic, antialiased, every forward); False accepts only the model's
    ``img_size``. ``vit_kernels.restore(model)`` undoes the patch.
    """
    return patch_timm(model, dynamic_img_size)
