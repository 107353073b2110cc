from ._fused import layer_norm_folding
from .accelerate import accelerate
from .attention_maps import attention_maps
from .factory import create_model
from .graphs import graph_runner, use_cuda_graphs
from .patching import is_accelerated, restore
from .timm_vit import from_timm
from .tutorial import ViT

__all__ = ["ViT", "accelerate", "attention_maps", "create_model", "from_timm", "graph_runner", "is_accelerated",
           "layer_norm_folding", "restore", "use_cuda_graphs"]
