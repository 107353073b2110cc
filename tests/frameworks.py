"""Tiny fp32 models of every supported framework (image 32, patch 8, width 48, 3 heads, 2 layers, MLP 96), with
every parameter perturbed so no zero-initialized head or bias hides a mistake; shared by the adapter tests."""
import timm
import torch
from torchvision.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from vit_kernels import reference as R

import tutorial_vit as tutorial

TOL = dict(rtol=1e-4, atol=1e-5)
TV = dict(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=5)
HF = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
          intermediate_size=96, num_labels=5)
TUTORIAL = dict(in_channels=3, patch_size=8, emb_size=48, img_size=32, depth=2, n_classes=5, num_heads=3,
                forward_expansion=2)
TIMM = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)


def perturbed(model, seed=0):
    """Random non-zero values everywhere (torchvision zero-inits its head, HF its biases), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def torchvision_model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(VisionTransformer(**dict(TV, **kw)), seed)


def hf_model(cls=ViTModel, seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(cls(ViTConfig(**dict(HF, **kw))), seed)


def timm_model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TIMM, **kw)), seed)


def tutorial_model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(tutorial.ViT(**dict(TUTORIAL, **kw)), seed)


BUILDERS = {
    "tutorial": tutorial_model,
    "reference": lambda seed=0: perturbed(R.ViT(**TUTORIAL, scaling="paper"), seed),
    "timm": timm_model,
    "torchvision": torchvision_model,
    "hf_model": hf_model,
    "hf_classifier": lambda seed=0: hf_model(ViTForImageClassification, seed),
}


def first(out):
    """The tensor a user reads first: logits / last_hidden_state for HF, the output otherwise."""
    return out[0] if isinstance(out, (tuple, dict)) else out
