"""The drop-in fused ViT: the tutorial's module tree, constructor and state_dict keys, our kernels."""
from __future__ import annotations

import torch

from .. import ops, reference
from ._fused import (
    active_dropout,
    caster,
    check_matches_model,
    compute_dtype,
    encoder_block,
    explicit_dtypes,
    warn_dropout_fallback,
)


class ViT(reference.ViT):
    """``vit_kernels.reference.ViT`` (and so the tutorial's ViT) computed by the fused kernels.

    Same constructor, defaults (``num_heads=8``, ``scaling="seed"``), module tree and state_dict keys, so
    the tutorial's checkpoints load with ``strict=True``. ``last_backend`` says which path the last forward
    took: ``"triton"`` (the kernels), ``"torch"`` (the same fused math in PyTorch: CPU tensors without
    ``TRITON_INTERPRET=1``) or ``"reference"`` (train mode with active dropout, which the kernels lack).
    """

    last_backend: str | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        embed, encoder, head = self[0], self[1], self[2]
        reference.check_image(x, embed.in_channels, embed.img_size)
        check_matches_model(self, x)
        dropping = active_dropout(self)
        if dropping:
            warn_dropout_fallback(self, dropping)
            self.last_backend = "reference"
            return super().forward(x, mask)
        self.last_backend = ops.backend_for(x)
        cast = caster(compute_dtype(x))
        conv = embed.projection[0]
        with explicit_dtypes(x):
            tokens = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias),
                                     cast(embed.cls_token).view(1, -1), cast(embed.positions))
            for block in encoder:
                (norm1, attn, _), (norm2, mlp, _) = block[0].fn, block[1].fn
                tokens = encoder_block(tokens, norm1, attn.qkv, attn.projection, norm2, mlp[0], mlp[3], cast,
                                       num_heads=attn.num_heads, qkv_interleaved=True, scaling=attn.scaling,
                                       mask=mask)
            norm, fc = head[1], head[2]
            return ops.classification_head(tokens, cast(norm.weight), cast(norm.bias), norm.eps,
                                           cast(fc.weight), cast(fc.bias), pool="mean", start=0)
