"""``accelerate(model)``: put a ViT from any supported framework on the fused kernels, in place."""
from __future__ import annotations

import importlib
import sys

from torch import nn

from .. import reference
from .graphs import DEFAULT_BUCKETS, use_cuda_graphs

SUPPORTED = ("vit_kernels.ViT / vit_kernels.reference.ViT; the tutorial's einops ViT (nn.Sequential of "
             "PatchEmbedding, TransformerEncoder, ClassificationHead); timm VisionTransformer (CLIP, SigLIP, "
             "DINOv2, ...) and Eva (EVA-02, DINOv3); torchvision VisionTransformer (vit_b_16, ...); Hugging Face "
             "transformers ViTModel / ViTForImageClassification, CLIPVisionModel / CLIPVisionModelWithProjection / "
             "CLIPForImageClassification, SiglipVisionModel / SiglipForImageClassification, Dinov2Model / "
             "Dinov2ForImageClassification / Dinov2WithRegistersModel / Dinov2WithRegistersForImageClassification")

# transformers module -> (model classes, adapter module, patch function); imported only when the module is
HF_FAMILIES = {
    "transformers.models.vit.modeling_vit": (("ViTModel", "ViTForImageClassification"), "hf_vit", "patch_hf"),
    "transformers.models.clip.modeling_clip": (
        ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPForImageClassification"), "hf_clip", "patch_clip"),
    "transformers.models.siglip.modeling_siglip": (("SiglipVisionModel", "SiglipForImageClassification"),
                                                   "hf_siglip", "patch_siglip"),
    "transformers.models.dinov2.modeling_dinov2": (("Dinov2Model", "Dinov2ForImageClassification"), "hf_dinov2",
                                                   "patch_dinov2"),
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers": (
        ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"), "hf_dinov2", "patch_dinov2"),
}
# recognized, but another structure than the kernels compute
HF_REFUSED = {
    "transformers.models.siglip2.modeling_siglip2": (
        ("Siglip2VisionModel", "Siglip2ForImageClassification", "Siglip2Model"),
        ("NaFlex inputs (pre-patchified pixel_values through a Linear patch embedding, per-image position "
         "resizing by spatial_shapes, pixel_attention_mask)")),
}


def _classes(module_name: str, *names: str) -> tuple:
    """Classes of an optional framework, only if it is already imported (a model of it implies it is)."""
    module = sys.modules.get(module_name)
    return tuple(getattr(module, n) for n in names if hasattr(module, n)) if module is not None else ()


def accelerate(model: nn.Module, cuda_graphs: bool = False, graph_buckets=DEFAULT_BUCKETS) -> nn.Module:
    """Make ``model`` itself compute on the fused kernels and return it (the same object).

    ``cuda_graphs=True`` also serves ``model(x)`` in inference by replaying CUDA graphs, one captured per batch
    bucket (``graph_buckets``; a batch is padded up to its bucket) on first use: for small batches, whose
    forward is bound by launch cost (``vit_kernels.models.graphs``). ``cuda_graphs=False`` turns it off again.

    The framework's own modules are patched in place, like Liger-Kernel's ``apply_liger_kernel_to_*``: each
    encoder block's ``forward`` becomes the fused block, the patch embedding the fused patch embedding, the
    final LayerNorm, pooling and head the fused kernels where they can be fused. Nothing is copied or cached:
    every forward reads the modules' current parameters, flags and submodules, so one model keeps one mode, one
    structure, one ``state_dict``, its hooks and every method of its framework (``reset_classifier``,
    ``forward_intermediates``, ``save_pretrained``, FSDP2 ``fully_shard`` per block, activation checkpointing).
    ``vit_kernels.restore(model)`` undoes it. Accelerating twice is the same as once.

    Recognized: ``vit_kernels.ViT`` (already fused); ``vit_kernels.reference.ViT`` and the tutorial's own einops
    ``ViT`` (recognized by structure); a timm ``VisionTransformer`` or ``Eva`` (see ``from_timm``); a torchvision
    ``VisionTransformer``; Hugging Face (transformers >= 5) ``ViTModel`` / ``ViTForImageClassification``,
    ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPForImageClassification``,
    ``SiglipVisionModel`` / ``SiglipForImageClassification``, ``Dinov2Model`` / ``Dinov2WithRegistersModel`` and
    their ``...ForImageClassification``.

    Raises ``TypeError`` for any other kind of model, and ``NotImplementedError`` naming the module and the
    feature when a recognized model uses one the kernels cannot compute (e.g. a conv stem, attention pooling,
    a head_dim over ``ops.MAX_HEAD_DIM``) — when patching, before any forward.
    """
    use_cuda_graphs(_accelerate(model), cuda_graphs, graph_buckets)
    return model


def _accelerate(model: nn.Module) -> nn.Module:
    from .timm_eva import patch_eva
    from .timm_vit import patch_timm
    from .torchvision_vit import patch_torchvision
    from .tutorial import ViT, is_tutorial_tree, patch_tutorial

    if isinstance(model, ViT):
        return model
    if isinstance(model, reference.ViT) or is_tutorial_tree(model):
        return patch_tutorial(model)
    if isinstance(model, _classes("timm.models.vision_transformer", "VisionTransformer")):
        return patch_timm(model)
    if isinstance(model, _classes("timm.models.eva", "Eva")):
        return patch_eva(model)
    if isinstance(model, _classes("torchvision.models.vision_transformer", "VisionTransformer")):
        return patch_torchvision(model)
    for module_name, (names, adapter, fn) in HF_FAMILIES.items():
        if isinstance(model, _classes(module_name, *names)):
            return getattr(importlib.import_module(f"{__package__}.{adapter}"), fn)(model)
    for module_name, (names, why) in HF_REFUSED.items():
        if isinstance(model, _classes(module_name, *names)):
            raise NotImplementedError(f"accelerate: Hugging Face {type(model).__name__} is not supported by the "
                                      f"vit_kernels kernels: {why}")
    raise TypeError(f"accelerate: unsupported model type {type(model).__module__}.{type(model).__qualname__}; "
                    f"supported: {SUPPORTED}")

