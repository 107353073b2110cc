"""timm ``Eva`` (EVA-02, DINOv3 in timm's definition, ...) on the fused kernels, patched in place.

Patched like ``timm_vit``: each ``EvaBlock.forward`` (the fused block: qk-norm and the 2D rotary embedding
applied to q and k inside the attention kernel, SwiGLU as one GEMM, EVA-02's inner LayerNorms), the patch
embedding, the LayerNorms, and the model's ``forward_features`` / ``forward_head`` / ``forward``. The rotary
tables come from the model's own ``rope`` module every forward (nothing cached) and are turned once per forward
into per-token cos/sin tables that leave the prefix (cls, register) tokens unrotated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._fused import check_layer_norm, drop_rate
from .timm_vit import (
    DYNAMIC,
    _check_head,
    _check_image,
    _same_forward,
    _unsupported,
    check_attention,
    check_mlp,
    check_patch_embed,
    embed_tokens,
    fused_block,
    head_forward,
    patch_modules,
)

ROPE_LAYOUTS = {False: "interleaved", True: "half"}  # timm's rotate_half flag -> the kernel's pair layout


class RopeTables:
    """Per-token cos/sin tables [N, D] (or [heads, N, D] for per-head frequencies), fp32, prefix rows cos = 1 and
    sin = 0: what ``ops.attention`` reads. Built once per forward and handed to every block."""

    __slots__ = ("args",)

    def __init__(self, embed: torch.Tensor, prefix: int, rotate_half: bool):
        sin, cos = embed.float().chunk(2, -1)  # timm's 'cat' embedding: [..., N_patches, 2D] = (sin, cos)
        pad = (0, 0, prefix, 0)
        self.args = dict(rope_cos=F.pad(cos, pad, value=1.0).contiguous(), rope_sin=F.pad(sin, pad).contiguous(),
                         rope_layout=ROPE_LAYOUTS[bool(rotate_half)])


def _qkv(attn):
    """(weight, bias) of the qkv GEMM, read in place: the fused qkv Linear (with EVA's separate q/v biases and
    zero k bias as three bias blocks), or three q/k/v Linears as three weight blocks."""
    if attn.qkv is not None:
        if attn.q_bias is None:
            return attn.qkv.weight, attn.qkv.bias
        return attn.qkv.weight.chunk(3), (attn.q_bias, attn.k_bias, attn.v_bias)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    if all(p.bias is None for p in projs):
        return tuple(p.weight for p in projs), None
    # EVA-02's k_proj has no bias: a zero block, as EVA's own fused path uses a zero k_bias buffer
    biases = tuple(p.weight.new_zeros(p.out_features) if p.bias is None else p.bias for p in projs)
    return tuple(p.weight for p in projs), biases


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    from timm.models.eva import Eva, EvaAttention, EvaBlock

    if not isinstance(model, Eva):
        raise TypeError(f"from_timm expects a timm Eva, got {type(model).__name__}")
    _check_head(model)
    check_patch_embed(model.patch_embed)
    if model.patch_drop is not None:
        _unsupported("patch_drop_rate > 0 on an Eva model (the rotary table follows the kept patches)")
    if model.rope is not None and not hasattr(model.rope, "get_embed"):
        _unsupported(f"rope of type {type(model.rope).__name__}")
    for name in ("norm_pre", "norm", "fc_norm"):
        check_layer_norm(f"from_timm: {name}", getattr(model, name), allow_identity=True)
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if not _same_forward(blk, EvaBlock):
            _unsupported(f"{where} of type {type(blk).__name__} (only timm's pre-norm EvaBlock)")
        attn = blk.attn
        if not _same_forward(attn, EvaAttention):
            _unsupported(f"{where}.attn of type {type(attn).__name__} (only EvaAttention)")
        if bool(getattr(attn, "rotate_half", False)) != bool(getattr(model.rope, "rotate_half", attn.rotate_half)):
            _unsupported(f"{where}.attn rotate_half differing from the model's rope")
        if attn.num_prefix_tokens != model.num_prefix_tokens:
            _unsupported(f"{where}.attn num_prefix_tokens differing from the model's")
        check_attention(f"{where}.attn", attn, attn.head_dim * attn.num_heads)
        if attn.head_dim * attn.num_heads != attn.proj.out_features:
            _unsupported(f"{where}.attn with attn_dim != embed_dim")
        check_layer_norm(f"from_timm: {where}.norm1", blk.norm1)
        check_layer_norm(f"from_timm: {where}.norm2", blk.norm2)
        check_mlp(f"{where}.mlp", blk.mlp)


def _rope(self, grid) -> list | None:
    """The model's rotary embedding for this patch grid as one ``RopeTables`` per block (one shared table, or
    per-depth tables for timm's 'mixed' rope), or None without rope."""
    if self.rope is None:
        return None
    cached = getattr(self.rope, "feat_shape", None) is not None and grid == tuple(self.patch_embed.grid_size)
    embed = self.rope.get_embed() if cached else self.rope.get_embed(shape=list(grid))  # as timm's _pos_embed
    npt, half = self.num_prefix_tokens, self.blocks[0].attn.rotate_half if len(self.blocks) else False
    if getattr(self, "rope_mixed", False):  # [depth, heads, N, 2D]: per block, per head
        return [RopeTables(e, npt, half) for e in embed]
    return [RopeTables(embed, npt, half)] * len(self.blocks)


def block_forward(self, x: torch.Tensor, rope=None, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``EvaBlock.forward`` as one fused block. ``rope``: timm's embedding ([N_patches, 2D] = sin, cos) as
    timm's own forward passes it, or the ``RopeTables`` the patched ``forward_features`` built once."""
    attn = self.attn
    if rope is not None and not isinstance(rope, RopeTables):
        if rope.dim() > 3 or (rope.dim() == 3 and rope.shape[0] != attn.num_heads):
            _unsupported(f"a rope embedding of shape {tuple(rope.shape)} (batched: patch dropout)")
        rope = RopeTables(rope, attn.num_prefix_tokens, attn.rotate_half)
    weight, bias = _qkv(attn)
    return fused_block(self, x, weight, bias, self.gamma_1, self.gamma_2, attn_mask, is_causal,
                       None if rope is None else rope.args)


def forward_features(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    """timm's Eva forward_features: the fused patch embedding (prefix tokens, absolute positions), the rotary
    tables built once, norm_pre, the blocks as timm runs them (gradient checkpointing included), the norm."""
    dynamic = self.__dict__.get(DYNAMIC)
    grid = _check_image(self.patch_embed, x, self.dynamic_img_size if dynamic is None else dynamic)
    x = self.norm_pre(embed_tokens(self, x, grid, drop_rate(self.pos_drop, self.training)))
    ropes = _rope(self, grid) or [None] * len(self.blocks)
    for blk, rope in zip(self.blocks, ropes):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = torch.utils.checkpoint.checkpoint(blk, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal,
                                                  use_reentrant=False)
        else:
            x = blk(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    return self.norm(x)


def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's Eva forward_head (its attention pool sees every token, prefix included)."""
    return head_forward(self, x, pre_logits, attn_pool_prefix=True)


def forward(self, x, attn_mask=None, is_causal=False) -> torch.Tensor:
    return self.forward_head(self.forward_features(x, attn_mask, is_causal))


def patch_eva(model, dynamic_img_size: bool | None = None):
    """Patch a timm ``Eva`` in place (see the module docstring); returns ``model``."""
    check_supported(model)
    return patch_modules(model, dynamic_img_size, block_forward, (forward_features, forward_head, forward))
