"""Position embeddings for other image sizes: timm-exact resampling and the grid check.

``resample_pos_embed`` is ``timm.layers.resample_abs_pos_embed`` for a ``[T, E]`` table (no batch axis):
prefix rows (cls, registers) pass through, the ``gh x gw`` grid rows are interpolated in float32
(bicubic, antialiased by default) and cast back to the table's dtype. The fused models call it on every
forward at another image size, as timm does: nothing is cached, so no update of the table can be missed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _grid(name: str, grid) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an (h, w) pair of ints, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def resample_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int, *,
                       mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resample a position table ``pos`` [num_prefix + gh*gw, E] from ``old_grid`` (gh, gw) to ``new_grid``.

    The first ``num_prefix`` rows are kept as they are; the grid rows are interpolated with
    ``F.interpolate(mode, antialias)`` in float32 and cast back to ``pos.dtype``, exactly as
    ``timm.layers.resample_abs_pos_embed(pos[None], new_grid, old_grid, num_prefix, mode, antialias)[0]``.
    Returns ``pos`` itself when the grid is unchanged. Differentiable.
    """
    old_grid, new_grid = _grid("old_grid", old_grid), _grid("new_grid", new_grid)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
        raise ValueError(f"pos must be a [tokens, dim] tensor, got "
                         f"{tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__}")
    if num_prefix < 0 or pos.shape[0] != num_prefix + old_grid[0] * old_grid[1]:
        raise ValueError(f"pos has {pos.shape[0]} rows, expected num_prefix + gh*gw = "
                         f"{num_prefix} + {old_grid[0]}*{old_grid[1]} for the grid {old_grid}")
    if old_grid == new_grid:
        return pos
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    dim = pos.shape[1]
    grid = grid.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=mode, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, dim).to(pos.dtype)
    return torch.cat([prefix, grid]) if num_prefix else grid


def image_grid(height: int, width: int, patch_size) -> tuple[int, int]:
    """The patch grid (H // p, W // p) of an image; ValueError unless both sides are positive multiples of p."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else _grid("patch_size", patch_size)
    height, width = int(height), int(width)
    if height < ph or width < pw or height % ph or width % pw:
        raise ValueError(f"image size ({height}, {width}) must be a positive multiple of the patch size "
                         f"({ph}, {pw}) on both sides; resize or crop it (e.g. to "
                         f"({max(ph, height // ph * ph)}, {max(pw, width // pw * pw)}))")
    return height // ph, width // pw

