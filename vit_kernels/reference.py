"""Pure-PyTorch reference ViT: the oracle every kernel and fused model is checked against.

It keeps the seed tutorial's class tree, constructor signatures, defaults and ``state_dict`` keys, so a
checkpoint of the tutorial's model loads here with ``strict=True`` and gives the same outputs. It differs
from the tutorial only where the tutorial is broken or silent:

* ``scaling``: ``"tutorial"`` (default) is the tutorial's ``softmax(QK^T) / sqrt(emb_size)``; ``"paper"`` is
  ``softmax(QK^T / sqrt(head_dim))`` as in the ViT paper and timm. ``"seed"``, the old name of
  ``"tutorial"``, still works with a ``DeprecationWarning``.
* ``mask`` works (the tutorial calls the non-existent ``Tensor.mask_fill``): a boolean tensor broadcastable
  to ``[B, heads, N, N]``, True = attend. A query row with no key to attend to yields zeros, not NaN.
* bad input raises a ``ValueError``/``TypeError`` naming the problem.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn

from vit_kernels.validate import (  # the checks shared with the ops and the fused models (no kernels)
    SCALINGS,  # noqa: F401  (re-exported: the scalings this model accepts)
    check_heads,
    check_image,
    check_mask,
    check_probability,
    check_tokens,
    resolve_scaling,
)


class PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224):
        self.patch_size = patch_size
        super().__init__()
        if min(in_channels, patch_size, emb_size, img_size) < 1 or img_size < patch_size:
            raise ValueError(f"need positive sizes with img_size >= patch_size, got in_channels={in_channels}, "
                             f"patch_size={patch_size}, emb_size={emb_size}, img_size={img_size}")
        self.in_channels, self.emb_size, self.img_size = in_channels, emb_size, img_size
        self.projection = nn.Sequential(
            nn.Conv2d(in_channels, emb_size, kernel_size=patch_size, stride=patch_size),
            Rearrange("b e (h) (w) -> b (h w) e"),
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, emb_size))
        self.positions = nn.Parameter(torch.randn((img_size // patch_size) ** 2 + 1, emb_size))

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.in_channels, self.img_size)
        b = x.shape[0]
        x = self.projection(x)
        cls_tokens = repeat(self.cls_token, "() n e -> b n e", b=b)
        x = torch.cat([cls_tokens, x], dim=1)
        return x + self.positions


def attention_probabilities(energy: Tensor, mask: Tensor | None) -> Tensor:
    """softmax over keys; masked-out keys get 0, and a row with no allowed key is all zeros."""
    if mask is None:
        return F.softmax(energy, dim=-1)
    # A finite fill keeps fully masked rows finite (also in backward); zeroing afterwards empties them.
    energy = energy.masked_fill(~mask, torch.finfo(energy.dtype).min)
    return F.softmax(energy, dim=-1).masked_fill(~mask, 0.0)


class MultiHeadAttention(nn.Module):
    def __init__(self, emb_size: int = 768, num_heads: int = 8, dropout: float = 0, scaling: str = "tutorial"):
        super().__init__()
        check_heads(emb_size, num_heads)
        check_probability("dropout", dropout)
        self.emb_size = emb_size
        self.num_heads = num_heads
        self.scaling = resolve_scaling(scaling)  # the deprecated "seed" is stored as "tutorial"
        self.qkv = nn.Linear(emb_size, emb_size * 3)
        self.att_drop = nn.Dropout(dropout)
        self.projection = nn.Linear(emb_size, emb_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        check_tokens(x, self.emb_size)
        check_mask(mask, x.shape[0], self.num_heads, x.shape[1])
        # the tutorial's layout: the q/k/v index is the fastest-varying feature
        qkv = rearrange(self.qkv(x), "b n (h d qkv) -> (qkv) b h n d", h=self.num_heads, qkv=3)
        queries, keys, values = qkv[0], qkv[1], qkv[2]
        energy = torch.einsum("bhqd, bhkd -> bhqk", queries, keys)
        if self.scaling == "paper":
            att = attention_probabilities(energy / math.sqrt(self.emb_size // self.num_heads), mask)
        else:  # the tutorial: softmax first, then divide by sqrt(emb_size)
            att = attention_probabilities(energy, mask) / self.emb_size ** (1 / 2)
        att = self.att_drop(att)
        out = torch.einsum("bhal, bhlv -> bhav ", att, values)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.projection(out)


class ResidualAdd(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) + x


class MaskedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``mask`` to the attention module inside it (the tutorial's cannot)."""

    def forward(self, x, mask: Tensor | None = None):
        for module in self:
            x = module(x, mask) if isinstance(module, MultiHeadAttention) else module(x)
        return x


class FeedForwardBlock(nn.Sequential):
    def __init__(self, emb_size: int, expansion: int = 4, drop_p: float = 0.0):
        check_probability("forward_drop_p", drop_p)
        if expansion < 1:
            raise ValueError(f"forward_expansion must be a positive integer, got {expansion!r}")
        super().__init__(
            nn.Linear(emb_size, expansion * emb_size),
            nn.GELU(),
            nn.Dropout(drop_p),
            nn.Linear(expansion * emb_size, emb_size),
        )


class TransformerEncoderBlock(nn.Sequential):
    def __init__(self, emb_size: int = 768, drop_p: float = 0.0, forward_expansion: int = 4,
                 forward_drop_p: float = 0.0, **kwargs):
        check_probability("drop_p", drop_p)
        super().__init__(
            ResidualAdd(MaskedSequential(
                nn.LayerNorm(emb_size),
                MultiHeadAttention(emb_size, **kwargs),
                nn.Dropout(drop_p),
            )),
            ResidualAdd(nn.Sequential(
                nn.LayerNorm(emb_size),
                FeedForwardBlock(emb_size, expansion=forward_expansion, drop_p=forward_drop_p),
                nn.Dropout(drop_p),
            )))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self[1](self[0](x, mask=mask))


class TransformerEncoder(nn.Sequential):
    def __init__(self, depth: int = 12, **kwargs):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth!r}")
        super().__init__(*[TransformerEncoderBlock(**kwargs) for _ in range(depth)])

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self:
            x = block(x, mask)
        return x


class ClassificationHead(nn.Sequential):
    def __init__(self, emb_size: int = 768, n_classes: int = 1000):
        super().__init__(
            Reduce("b n e -> b e", reduction="mean"),
            nn.LayerNorm(emb_size),
            nn.Linear(emb_size, n_classes))


class ViT(nn.Sequential):
    """The tutorial's ViT. Extra keywords (``num_heads``, ``dropout``, ``scaling``, ``drop_p``,
    ``forward_expansion``, ``forward_drop_p``) are handed down exactly as the tutorial does."""

    def __init__(self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224,
                 depth: int = 12, n_classes: int = 1000, **kwargs):
        super().__init__(
            PatchEmbedding(in_channels, patch_size, emb_size, img_size),
            TransformerEncoder(depth, emb_size=emb_size, **kwargs),
            ClassificationHead(emb_size, n_classes),
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self[2](self[1](self[0](x), mask))
