"""vit_kernels: fused Triton kernels for Vision Transformers and a drop-in fast ViT.

    from vit_kernels import ViT                 # the tutorial's ViT, same keys, fused kernels
    from vit_kernels import accelerate          # any supported ViT (tutorial, timm, torchvision, HF), in place
    from vit_kernels import from_timm           # accelerate() for a timm VisionTransformer (+ dynamic_img_size)
    from vit_kernels import restore             # undo accelerate(): the model's own methods back
    from vit_kernels import use_cuda_graphs     # accelerate(model, cuda_graphs=True): CUDA-graph serving, on/off
    from vit_kernels import layer_norm_folding  # with layer_norm_folding(False): LayerNorm and GEMM unfused
    from vit_kernels import create_model        # a standard timm ViT by name (+ local checkpoint), fused
    from vit_kernels import attention_maps      # a forward plus every layer's attention probabilities
    from vit_kernels import reference, ops      # the pure-PyTorch oracle; the individual fused ops

Attributes load lazily so that ``vit-kernels`` can set TRITON_INTERPRET before any kernel is defined.
"""
from __future__ import annotations

import importlib

from ._version import __version__

_MODELS = ("ViT", "accelerate", "attention_maps", "create_model", "from_timm", "graph_runner", "is_accelerated",
           "layer_norm_folding", "restore", "use_cuda_graphs")
_LAZY = {**dict.fromkeys(_MODELS, "vit_kernels.models"), "ops": "vit_kernels.ops", "reference": "vit_kernels.reference"}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'vit_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
