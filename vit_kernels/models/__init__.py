from .accelerate import accelerate
from .attention_maps import attention_maps
from .factory import create_model
from .hf_vit import HFViT
from .timm_vit import TimmViT, from_timm
from .torchvision_vit import TorchvisionViT
from .tutorial import ViT

__all__ = ["HFViT", "TimmViT", "TorchvisionViT", "ViT", "accelerate", "attention_maps", "create_model", "from_timm"]
