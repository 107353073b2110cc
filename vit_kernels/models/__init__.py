from ._fused import layer_norm_folding
from .accelerate import accelerate
from .attention_maps import attention_maps
from .factory import create_model
from .patching import is_accelerated, restore
from .timm_vit import from_timm
from .tutorial import ViT

__all__ = ["ViT", "accelerate", "attention_maps", "create_model", "from_timm", "is_accelerated", "layer_norm_folding",
           "restore"]
