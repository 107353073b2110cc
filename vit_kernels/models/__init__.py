from .timm_vit import TimmViT, from_timm
from .tutorial import ViT

__all__ = ["TimmViT", "ViT", "from_timm"]
