"""Model sizes in one table, and the constructor keywords they give (pure Python: no torch import).

    from vit_kernels.configs import SIZES, tutorial_kwargs, timm_kwargs

    vit_kernels.ViT(**tutorial_kwargs("tiny"), scaling="paper")          # reference.ViT takes the same
    timm.create_model(SIZES["tiny_timm"].timm, **timm_kwargs("tiny_timm", num_classes=10))

``tutorial_kwargs`` gives ``in_channels, patch_size, emb_size, img_size, depth, n_classes, num_heads``;
``timm_kwargs`` gives ``img_size, patch_size, embed_dim, depth, num_heads, num_classes``. Keyword
overrides (in the target's own names, e.g. ``depth=1`` or ``n_classes=5``) replace or add entries.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Size:
    timm: str  # the timm model name of this architecture (its kwargs below override the name's sizes)
    patch: int
    emb: int
    depth: int
    heads: int
    img: int
    classes: int = 1000
    family: str = "vit"  # "vit": the original ViT (tutorial, reference and timm twins); else a timm-only family

    @property
    def tokens(self) -> int:
        """Tokens per image: the patches plus the cls token."""
        return (self.img // self.patch) ** 2 + 1


SIZES = {
    "vit_s_16": Size("vit_small_patch16_224", patch=16, emb=384, depth=12, heads=6, img=224),
    "vit_b_16": Size("vit_base_patch16_224", patch=16, emb=768, depth=12, heads=12, img=224),
    "vit_l_16": Size("vit_large_patch16_224", patch=16, emb=1024, depth=24, heads=16, img=224),
    "vit_h_14": Size("vit_huge_patch14_224", patch=14, emb=1280, depth=32, heads=16, img=224),
    # the families deployed today, as timm builds them (benchmarked against timm only: no tutorial twin)
    "clip_l_14": Size("vit_large_patch14_clip_quickgelu_224", patch=14, emb=1024, depth=24, heads=16, img=224,
                      family="clip"),
    "siglip_b_16": Size("vit_base_patch16_siglip_224", patch=16, emb=768, depth=12, heads=12, img=224,
                        family="siglip"),
    "siglip_so400m_14": Size("vit_so400m_patch14_siglip_224", patch=14, emb=1152, depth=27, heads=16, img=224,
                             family="siglip"),
    "dinov2_b_14_518": Size("vit_base_patch14_dinov2", patch=14, emb=768, depth=12, heads=12, img=518,
                            family="dinov2"),
    "eva02_b_14": Size("eva02_base_patch14_224", patch=14, emb=768, depth=12, heads=12, img=224, family="eva02"),
    # interpreter-sized (the CPU version of the benchmarks, verify and the example): 37 tokens, head_dim 24
    "tiny": Size("vit_tiny_patch16_224", patch=8, emb=72, depth=2, heads=3, img=48, classes=10),
    # the smaller CPU size of the timm-based tests and verify's timm rows: 17 tokens, head_dim 24
    "tiny_timm": Size("vit_tiny_patch16_224", patch=8, emb=48, depth=2, heads=2, img=32, classes=7),
}


def _size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(SIZES)}") from None


def tutorial_kwargs(name: str, **overrides) -> dict:
    """Keywords for ``vit_kernels.ViT`` / ``vit_kernels.reference.ViT`` (the tutorial's constructor)."""
    s = _size(name)
    return dict(dict(in_channels=3, patch_size=s.patch, emb_size=s.emb, img_size=s.img, depth=s.depth,
                     n_classes=s.classes, num_heads=s.heads), **overrides)


def timm_kwargs(name: str, **overrides) -> dict:
    """Keywords for ``timm.create_model`` (with ``SIZES[name].timm`` or any other ViT name)."""
    s = _size(name)
    return dict(dict(img_size=s.img, patch_size=s.patch, embed_dim=s.emb, depth=s.depth, num_heads=s.heads,
                     num_classes=s.classes), **overrides)


def as_dict(name: str) -> dict:
    """``SIZES[name]`` as a plain dict: timm, patch, emb, depth, heads, img, classes."""
    return dataclasses.asdict(_size(name))
