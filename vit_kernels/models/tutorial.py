"""The tutorial's ViT on the fused kernels: its module tree patched in place, and the drop-in ``ViT`` class.

Patched (on ``reference.ViT``, on the tutorial's own einops ``ViT`` recognized by structure, and inside every
``vit_kernels.ViT``): ``PatchEmbedding.forward`` (projection + cls token + positions in one kernel), each
``TransformerEncoderBlock.forward`` (the fused block, qkv weights in the tutorial's (h d qkv) order read in
place) and ``ClassificationHead.forward`` (mean -> LayerNorm -> Linear in two kernels).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops, reference
from ..validate import check_image
from ._fused import (
    caster,
    check_head_dim,
    check_input,
    classification_head,
    compute_dtype,
    drop_rate,
    encoder_block,
    explicit_dtypes,
)
from .graphs import DEFAULT_BUCKETS, use_cuda_graphs
from .patching import patch
from .pos_embed import image_grid, resample_pos_embed

DYNAMIC = "vit_kernels_dynamic_img_size"  # on the PatchEmbedding: accept other image sizes


def _unsupported(feature: str):
    raise NotImplementedError(f"accelerate: tutorial-style ViT with {feature} is not supported by the vit_kernels "
                              f"kernels")


def is_tutorial_tree(model) -> bool:
    """nn.Sequential [patch embedding (projection, cls_token, positions), encoder of blocks, head]."""
    if not isinstance(model, nn.Sequential) or len(model) != 3:
        return False
    embed, encoder, head = model
    proj = getattr(embed, "projection", None)
    if not (isinstance(proj, nn.Sequential) and len(proj) and isinstance(proj[0], nn.Conv2d)
            and isinstance(getattr(embed, "cls_token", None), nn.Parameter)
            and isinstance(getattr(embed, "positions", None), nn.Parameter)):
        return False
    if not isinstance(encoder, nn.Sequential) or not len(encoder):
        return False
    for block in encoder:
        if not (isinstance(block, nn.Sequential) and len(block) == 2):
            return False
        attn_fn, mlp_fn = getattr(block[0], "fn", None), getattr(block[1], "fn", None)
        if not (isinstance(attn_fn, nn.Sequential) and len(attn_fn) == 3
                and all(hasattr(attn_fn[1], a) for a in ("qkv", "projection", "num_heads"))):
            return False
        if not (isinstance(mlp_fn, nn.Sequential) and len(mlp_fn) == 3 and isinstance(mlp_fn[1], nn.Sequential)
                and len(mlp_fn[1]) == 4):
            return False
    return isinstance(head, nn.Sequential) and len(head) == 3 and isinstance(head[2], nn.Linear)


def native_grid(embed) -> int:
    """The side of the patch grid the positions imply: (img_size // patch)^2 + 1 rows."""
    rows = embed.positions.shape[0]
    grid = math.isqrt(max(rows - 1, 0))
    if grid < 1 or grid * grid + 1 != rows:
        _unsupported(f"{rows} position rows (expected (img_size // patch_size)^2 + 1)")
    return grid


def check_supported(model) -> None:
    """Everything the fused forward would fail on, refused now, naming the module and the feature."""
    embed, encoder, head = model
    conv = embed.projection[0]
    p = conv.kernel_size[0]
    if (conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0) or conv.groups != 1
            or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel")
    E = conv.out_channels
    native_grid(embed)
    for i, block in enumerate(encoder):
        a, mlp = block[0].fn[1], block[1].fn[1]
        if getattr(a, "emb_size", E) != E:
            _unsupported(f"block {i}: attention emb_size {a.emb_size} != {E}")
        check_head_dim(f"accelerate: tutorial block {i} attention", E, a.num_heads)
        fc1, act, fc2 = mlp[0], mlp[1], mlp[3]
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            _unsupported(f"block {i}: MLP layers that are not nn.Linear")
        if type(act) is not nn.GELU or act.approximate != "none":
            _unsupported(f"block {i}: MLP activation {type(act).__name__} (only exact nn.GELU)")
        for norm in (block[0].fn[0], block[1].fn[0]):
            if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
                _unsupported(f"block {i}: norm of type {type(norm).__name__} (only nn.LayerNorm)")
    if getattr(head[0], "reduction", None) != "mean" or not isinstance(head[1], nn.LayerNorm):
        _unsupported("a head other than mean over tokens -> LayerNorm -> Linear")


# --- the patched methods ----------------------------------------------------------------------------------------
def _grid(embed, x) -> tuple[int, int]:
    """The patch grid of x. With ``img_size`` (reference.ViT) that size, as the reference checks; without it
    (the tutorial's own PatchEmbedding) any image whose (H // p, W // p) is the grid its positions imply, as the
    tutorial's conv floors the sides. With the dynamic opt-in, any multiple of the patch."""
    p = embed.projection[0].kernel_size[0]
    in_channels = embed.projection[0].in_channels
    img_size = getattr(embed, "img_size", None)
    native = native_grid(embed) if img_size is None else img_size // p
    if embed.__dict__.get(DYNAMIC) and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4 \
            and x.shape[1] == in_channels:
        native_size = (x.shape[2] // p, x.shape[3] // p) == (native, native) if img_size is None \
            else tuple(x.shape[2:]) == (img_size, img_size)
        if not native_size:
            return image_grid(x.shape[2], x.shape[3], p)
    check_image(x, in_channels, img_size)
    if img_size is None and (x.shape[2] // p, x.shape[3] // p) != (native, native):
        raise ValueError(f"image size {tuple(x.shape[2:])} gives a {x.shape[2] // p}x{x.shape[3] // p} patch grid, "
                         f"but the positions were built for {native}x{native} patches of {p} px (an image of "
                         f"{native * p} to {native * p + p - 1} px a side)")
    return native, native


def embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """PatchEmbedding: projection + cls token + positions (resampled for another grid) in one kernel."""
    grid = _grid(self, x)
    conv = self.projection[0]
    check_input("PatchEmbedding", conv.weight, x)
    native = math.isqrt(self.positions.shape[0] - 1)
    positions = self.positions
    if grid != (native, native):
        positions = resample_pos_embed(positions, (native, native), grid, 1)
    dtype = compute_dtype(x)
    with explicit_dtypes(x):
        cast = caster(dtype)
        return ops.patch_embed(cast(x), cast(conv.weight), cast(conv.bias), cast(self.cls_token).view(1, -1),
                               cast(positions))


def block_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TransformerEncoderBlock: one fused block (the tutorial's scaling unless the attention says otherwise)."""
    (norm1, attn, attn_out_drop), (norm2, mlp, mlp_out_drop) = self[0].fn, self[1].fn
    check_input("TransformerEncoderBlock", norm1.weight, x)
    dtype = compute_dtype(x)
    out_dtype, cast, training = torch.promote_types(x.dtype, dtype), caster(dtype), self.training
    with explicit_dtypes(x):
        out = encoder_block(cast(x), norm1, attn.qkv, attn.projection, norm2, mlp[0], mlp[3], cast,
                            num_heads=attn.num_heads, qkv_interleaved=True,
                            scaling=getattr(attn, "scaling", "tutorial"), mask=mask,
                            attn_drop=drop_rate(attn.att_drop, training), proj_drop=drop_rate(attn_out_drop, training),
                            hidden_drop=drop_rate(mlp[2], training), out_drop=drop_rate(mlp_out_drop, training))
    return out.to(out_dtype)


def head_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ClassificationHead: mean over all tokens -> LayerNorm (one kernel) -> Linear."""
    check_input("ClassificationHead", self[2].weight, x)
    return classification_head(x, self[1], self[2], "mean")


def patch_tutorial(model):
    """Patch a tutorial-tree ViT (reference.ViT, the tutorial's own) in place; returns ``model``."""
    check_supported(model)
    embed, encoder, head = model
    patch(embed, "forward", embed_forward)
    for block in encoder:
        patch(block, "forward", block_forward)
    patch(head, "forward", head_forward)
    return model


class ViT(reference.ViT):
    """``vit_kernels.reference.ViT`` (and so the tutorial's ViT) computed by the fused kernels.

    Same constructor, defaults (``num_heads=8``, ``scaling="tutorial"``), module tree and state_dict keys, so
    the tutorial's checkpoints load with ``strict=True``: it is ``reference.ViT`` with its modules patched in
    place (``vit_kernels.restore(model)`` turns it back into the reference). ``last_backend`` says which path
    the last forward took: ``"triton"`` (the kernels) or ``"torch"`` (the same fused math in PyTorch: CPU
    tensors without ``TRITON_INTERPRET=1``). In train mode the three dropouts (``dropout`` on the attention
    probabilities, ``forward_drop_p`` after the MLP's GELU, ``drop_p`` after each sub-layer) run inside the
    kernels, with masks drawn from Philox seeded by PyTorch's default generator (``torch.manual_seed``
    reproduces them; the same statistics as ``nn.Dropout``, not the same draws).

    Image size: like the tutorial, an image of another size than ``img_size`` raises a ``ValueError`` by
    default. ``ViT(..., dynamic_img_size=True)`` (or ``model.dynamic_img_size = True`` later) accepts any
    ``H x W`` that is a multiple of ``patch_size`` on both sides, non-square included: the grid rows of
    ``positions`` are resampled bicubically (antialiased, in fp32, as timm's ``resample_abs_pos_embed``;
    the cls row is kept) to the ``H/p x W/p`` grid, every forward (nothing cached, so no write to
    ``positions`` can be missed). The keyword is not stored in the state_dict.

    ``cuda_graphs=True`` (``graph_buckets``): inference forwards replay CUDA graphs, see ``vit_kernels.accelerate``.
    """

    last_backend: str | None = None

    def __init__(self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224,
                 depth: int = 12, n_classes: int = 1000, *, dynamic_img_size: bool = False, cuda_graphs: bool = False,
                 graph_buckets=DEFAULT_BUCKETS, **kwargs):
        super().__init__(in_channels, patch_size, emb_size, img_size, depth, n_classes, **kwargs)
        patch_tutorial(self)
        self.dynamic_img_size = dynamic_img_size
        use_cuda_graphs(self, cuda_graphs, graph_buckets)

    @property
    def dynamic_img_size(self) -> bool:
        return bool(self[0].__dict__.get(DYNAMIC, False))

    @dynamic_img_size.setter
    def dynamic_img_size(self, value: bool) -> None:
        self[0].__dict__[DYNAMIC] = bool(value)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            self.last_backend = ops.backend_for(x)
        return super().forward(x, mask)
