"""``accelerate(model)``: one entry point that puts a ViT from any supported framework on the fused kernels."""
from __future__ import annotations

import math
import sys

from torch import nn

from .. import reference

SUPPORTED = ("vit_kernels.ViT / vit_kernels.reference.ViT; the tutorial's einops ViT (nn.Sequential of "
             "PatchEmbedding, TransformerEncoder, ClassificationHead); timm VisionTransformer; torchvision "
             "VisionTransformer (vit_b_16, ...); Hugging Face transformers ViTModel / ViTForImageClassification")


def _classes(module_name: str, *names: str) -> tuple:
    """Classes of an optional framework, only if it is already imported (a model of it implies it is)."""
    module = sys.modules.get(module_name)
    return tuple(getattr(module, n) for n in names if hasattr(module, n)) if module is not None else ()


def accelerate(model: nn.Module) -> nn.Module:
    """Return a module computing ``model``'s forward with the fused kernels.

    Recognized: ``vit_kernels.ViT`` and already-wrapped models (returned as they are);
    ``vit_kernels.reference.ViT`` and the tutorial's own einops ``ViT`` (recognized by structure;
    → ``vit_kernels.ViT``, keeping ``scaling``: ``"tutorial"`` for the tutorial); a timm ``VisionTransformer``
    (→ ``from_timm``); a torchvision ``VisionTransformer`` (→ ``TorchvisionViT``); a Hugging Face
    ``ViTModel`` or ``ViTForImageClassification`` (→ ``HFViT``, same output classes).

    The result is a new module that *shares* the given model's parameters: no weights are copied, the
    state_dict keys are the same, the original keeps working, and training (or loading a checkpoint into)
    either one changes both. It starts in the model's train/eval mode.

    Raises ``TypeError`` for any other kind of model, and ``NotImplementedError`` naming the feature when
    a recognized model uses one the kernels cannot compute (e.g. a conv stem, attention pooling).
    """
    from .hf_vit import HFViT
    from .timm_vit import TimmViT, from_timm
    from .torchvision_vit import TorchvisionViT
    from .tutorial import ViT

    if isinstance(model, (ViT, TimmViT, TorchvisionViT, HFViT)):
        return model
    if isinstance(model, reference.ViT) or _is_tutorial_tree(model):
        return _from_tutorial_tree(model)
    if isinstance(model, _classes("timm.models.vision_transformer", "VisionTransformer")):
        return from_timm(model)
    if isinstance(model, _classes("torchvision.models.vision_transformer", "VisionTransformer")):
        return TorchvisionViT(model)
    if isinstance(model, _classes("transformers.models.vit.modeling_vit", "ViTModel", "ViTForImageClassification")):
        return HFViT(model)
    raise TypeError(f"accelerate: unsupported model type {type(model).__module__}.{type(model).__qualname__}; "
                    f"supported: {SUPPORTED}")


# --- the tutorial's class tree ----------------------------------------------------------------------------
def _is_tutorial_tree(model) -> bool:
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


def _unsupported(feature: str):
    raise NotImplementedError(f"accelerate: tutorial-style ViT with {feature} is not supported by the vit_kernels "
                              f"kernels")


def _tutorial_config(model) -> dict:
    """The constructor arguments of a tutorial / reference ViT, read back from its modules."""
    embed, encoder, head = model
    conv = embed.projection[0]
    p = conv.kernel_size[0]
    if (conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0) or conv.groups != 1
            or conv.dilation != (1, 1)):
        _unsupported("a patch projection other than a square Conv2d with stride = kernel")
    E = conv.out_channels
    img_size = getattr(embed, "img_size", None)
    if img_size is None:  # the tutorial does not keep it: positions has (img // p)^2 + 1 rows
        grid = math.isqrt(max(embed.positions.shape[0] - 1, 0))
        if grid * grid + 1 != embed.positions.shape[0]:
            _unsupported(f"{embed.positions.shape[0]} position rows (expected (img_size // patch_size)^2 + 1)")
        img_size = grid * p
    attn = encoder[0][0].fn[1]
    fc1 = encoder[0][1].fn[1][0]
    if not isinstance(fc1, nn.Linear) or fc1.out_features % E:
        _unsupported("an MLP hidden width that is not a multiple of emb_size")
    scaling = getattr(attn, "scaling", "tutorial")
    for i, block in enumerate(encoder):
        a, mlp = block[0].fn[1], block[1].fn[1]
        if a.num_heads != attn.num_heads or getattr(a, "scaling", "tutorial") != scaling:
            _unsupported(f"block {i}: num_heads/scaling differing between blocks")
        if getattr(a, "emb_size", E) != E:
            _unsupported(f"block {i}: attention emb_size {a.emb_size} != {E}")
        act = mlp[1]
        if type(act) is not nn.GELU or act.approximate != "none":
            _unsupported(f"block {i}: MLP activation {type(act).__name__} (only exact nn.GELU)")
        for norm in (block[0].fn[0], block[1].fn[0]):
            if not isinstance(norm, nn.LayerNorm):
                _unsupported(f"block {i}: norm of type {type(norm).__name__} (only nn.LayerNorm)")
    pool = head[0]
    if getattr(pool, "reduction", None) != "mean" or not isinstance(head[1], nn.LayerNorm):
        _unsupported("a head other than mean over tokens -> LayerNorm -> Linear")
    return dict(in_channels=conv.in_channels, patch_size=p, emb_size=E, img_size=img_size, depth=len(encoder),
                n_classes=head[2].out_features, num_heads=attn.num_heads, scaling=scaling,
                forward_expansion=fc1.out_features // E)


def _from_tutorial_tree(model):
    """A ``vit_kernels.ViT`` built on the meta device, then given the model's own Parameter objects."""
    import torch

    from .tutorial import ViT

    cfg = _tutorial_config(model)
    with torch.device("meta"):
        fused = ViT(**cfg)
    theirs = dict(model.named_modules())
    ours_params = [(n, tuple(p.shape)) for n, p in fused.named_parameters()]
    their_params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if ours_params != their_params:
        _unsupported(f"parameters that differ from the tutorial's layout for {cfg}")
    for name, module in fused.named_modules():
        other = theirs[name]
        for pname in module._parameters:
            module._parameters[pname] = other._parameters[pname]
        for bname in module._buffers:
            module._buffers[bname] = other._buffers[bname]
        if isinstance(module, nn.Dropout):
            module.p = other.p
        if isinstance(module, nn.LayerNorm):
            module.eps = other.eps
    if any(t.is_meta for t in (*fused.parameters(), *fused.buffers())):
        raise RuntimeError("accelerate: a tensor of the tutorial-style model was not shared")
    return fused.train(model.training)
