"""``attention_maps(model, ...)``: a forward that also returns every layer's attention probabilities.

The fused attention kernel never materializes the N x N probabilities; this opt-in path runs a second
kernel per layer (``ops.attention_probabilities``) that writes them, so it is slower and needs
B x heads x N x N memory per layer. Maps are the softmax probabilities (rows sum to 1), before dropout and
before the tutorial's division by sqrt(emb_size); they are detached from autograd.
"""
from __future__ import annotations

import torch
from torch import nn

from ._fused import recording_attention_maps


def attention_maps(model: nn.Module, *args, **kwargs) -> tuple[object, list[torch.Tensor]]:
    """Run ``model(*args, **kwargs)`` and return ``(output, maps)``, maps[i] = layer i's [B, heads, N, N].

    ``model`` is any model ``vit_kernels.accelerate`` takes (a tutorial, timm, torchvision or Hugging Face
    ViT); one not yet accelerated is accelerated first (in place). Raises ``RuntimeError`` if the forward did
    not run every fused block (e.g. a block the user replaced by another module)."""
    from .accelerate import accelerate
    from .patching import is_accelerated

    fused = model if is_accelerated(model) else accelerate(model)  # as the user left it, if already patched
    with recording_attention_maps() as maps:
        output = fused(*args, **kwargs)
    depth = _depth(fused)
    if len(maps) != depth:
        raise RuntimeError(f"attention_maps: the forward ran {len(maps)} of {depth} fused blocks; maps come only "
                           f"from the fused blocks")
    return output, list(maps)


def _depth(fused: nn.Module) -> int:
    if hasattr(fused, "blocks"):
        return len(fused.blocks)  # timm
    vit = getattr(fused, "vit", fused)
    if hasattr(vit, "layers"):
        return len(vit.layers)  # Hugging Face
    if hasattr(fused, "encoder") and hasattr(fused.encoder, "layers"):
        return len(fused.encoder.layers)  # torchvision
    return len(fused[1])  # the tutorial's TransformerEncoder
