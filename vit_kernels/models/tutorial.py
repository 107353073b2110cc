"""The drop-in fused ViT: the tutorial's module tree, constructor and state_dict keys, our kernels."""
from __future__ import annotations

import torch

from .. import ops, reference
from ..validate import check_image
from ._fused import caster, check_matches_model, compute_dtype, drop_rate, encoder_block, explicit_dtypes
from .pos_embed import PositionCache, image_grid


class ViT(reference.ViT):
    """``vit_kernels.reference.ViT`` (and so the tutorial's ViT) computed by the fused kernels.

    Same constructor, defaults (``num_heads=8``, ``scaling="tutorial"``), module tree and state_dict keys, so
    the tutorial's checkpoints load with ``strict=True``. ``last_backend`` says which path the last forward
    took: ``"triton"`` (the kernels) or ``"torch"`` (the same fused math in PyTorch: CPU tensors without
    ``TRITON_INTERPRET=1``). In train mode the three dropouts (``dropout`` on the attention probabilities,
    ``forward_drop_p`` after the MLP's GELU, ``drop_p`` after each sub-layer) run inside the kernels, with
    masks drawn from PyTorch's default generator (``torch.manual_seed`` reproduces them; the same
    statistics as ``nn.Dropout``, not the same draws).

    Image size: like the tutorial, an image of another size than ``img_size`` raises a ``ValueError`` by
    default. ``ViT(..., dynamic_img_size=True)`` (or ``model.dynamic_img_size = True`` later) accepts any
    ``H x W`` that is a multiple of ``patch_size`` on both sides, non-square included: the grid rows of
    ``positions`` are resampled bicubically (antialiased, in fp32, as timm's ``resample_abs_pos_embed``;
    the cls row is kept) to the ``H/p x W/p`` grid. The resampled table is cached per size, dtype and
    device until ``positions`` changes; in training (grad enabled) it is recomputed each forward so that
    ``positions`` gets its gradient. The keyword is not stored in the state_dict.
    """

    last_backend: str | None = None
    dynamic_img_size: bool = False

    def __init__(self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224,
                 depth: int = 12, n_classes: int = 1000, *, dynamic_img_size: bool = False, **kwargs):
        super().__init__(in_channels, patch_size, emb_size, img_size, depth, n_classes, **kwargs)
        self.dynamic_img_size = bool(dynamic_img_size)
        self._pos_cache = PositionCache()

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Checks the image as the tutorial does (all but the size when dynamic); returns its patch grid."""
        embed = self[0]
        if (self.dynamic_img_size and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
                and x.shape[1] == embed.in_channels and tuple(x.shape[2:]) != (embed.img_size,) * 2):
            return image_grid(x.shape[2], x.shape[3], embed.patch_size)
        check_image(x, embed.in_channels, embed.img_size)
        return (embed.img_size // embed.patch_size,) * 2

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor:
        embed = self[0]
        native = (embed.img_size // embed.patch_size,) * 2
        if grid == native:  # the drop-in path touches no cache (and stays simple for torch.compile)
            return embed.positions
        return self._pos_cache.get(embed.positions, native, grid, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        embed, encoder, head = self[0], self[1], self[2]
        grid = self._grid(x)
        check_matches_model(self, x)
        positions = self._positions(grid)
        self.last_backend = ops.backend_for(x)
        cast = caster(compute_dtype(x))
        conv = embed.projection[0]
        with explicit_dtypes(x):
            tokens = ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias),
                                     cast(embed.cls_token).view(1, -1), cast(positions))
            for block in encoder:
                (norm1, attn, attn_out_drop), (norm2, mlp, mlp_out_drop) = block[0].fn, block[1].fn
                tokens = encoder_block(tokens, norm1, attn.qkv, attn.projection, norm2, mlp[0], mlp[3], cast,
                                       num_heads=attn.num_heads, qkv_interleaved=True, scaling=attn.scaling,
                                       mask=mask, attn_drop=drop_rate(attn.att_drop, self.training),
                                       proj_drop=drop_rate(attn_out_drop, self.training),
                                       hidden_drop=drop_rate(mlp[2], self.training),
                                       out_drop=drop_rate(mlp_out_drop, self.training))
            norm, fc = head[1], head[2]
            return ops.classification_head(tokens, cast(norm.weight), cast(norm.bias), norm.eps,
                                           cast(fc.weight), cast(fc.bias), pool="mean", start=0)
