"""``create_model``: a standard timm ViT by name, optionally loaded from a local checkpoint, on the kernels.

    model = vit_kernels.create_model("vit_base_patch16_224", checkpoint_path="vit_b_16.safetensors")

Nothing is downloaded: the model is built with ``pretrained=False`` and weights come only from
``checkpoint_path`` (timm keys, or torchvision ``VisionTransformer`` keys, converted).
"""
from __future__ import annotations

import os
import re

import torch

NAME_PATTERNS = {  # timm module -> the names of its models that the fused kernels run, by family
    "vision_transformer": re.compile("|".join((
        r"vit_(tiny|small|base|large|huge)_patch(8|14|16|32)_(224|384)",  # the original ViT
        r"vit_[a-z0-9]+_patch\d+(_plus)?_clip(_quickgelu)?_\d+",  # CLIP: pre-norm, (Quick)GELU
        r"vit_[a-z0-9]+_patch\d+_siglip(_gap)?_\d+",  # SigLIP: MAP pooling (or gap), tanh GELU
        r"vit_[a-z0-9]+_patch14_(reg4_)?dinov2",  # DINOv2: LayerScale, registers (giant: SwiGLU)
    ))),
    "eva": re.compile("|".join((
        r"eva02_(tiny|small|base|large)_patch(14|16)(_clip)?_\d+",  # EVA-02: 2D RoPE, SwiGLU + inner LayerNorm
        r"vit_[a-z0-9_]+_patch16_dinov3(_qkvb)?",  # DINOv3: 2D RoPE (half layout), registers, LayerScale
    ))),
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError("vit_kernels.create_model builds its models with timm, which is not installed: "
                          "pip install timm") from e
    return timm


def supported_models() -> list[str]:
    """The timm model names ``create_model`` accepts (from the installed timm's registry): the original
    ``vit_{tiny,small,base,large,huge}_patch{8,14,16,32}_{224,384}``, CLIP (``vit_*_clip_*``, QuickGELU
    variants included), SigLIP (``vit_*_siglip_*``), DINOv2 (``vit_*_dinov2``, with registers too), EVA-02
    (``eva02_*``) and DINOv3 (``vit_*_dinov3``)."""
    timm = _timm()
    return sorted(name for module, pattern in NAME_PATTERNS.items() for name in timm.list_models(module=module)
                  if pattern.fullmatch(name))


def _check_name(name) -> None:
    supported = supported_models()
    base, _, tag = name.partition(".") if isinstance(name, str) else (name, "", "")
    if base not in supported:
        raise ValueError(f"unsupported model name {name!r}; supported (optionally with a timm '.tag'): "
                         f"{', '.join(supported)}")
    if tag:
        tags = [n.partition(".")[2] for n in _timm().list_pretrained(f"{base}.*")]
        if tag not in tags:
            raise ValueError(f"unknown tag {tag!r} for {base}; timm knows: {', '.join(tags) or 'none'}")


# torchvision.models.VisionTransformer -> timm VisionTransformer
_TV_GLOBAL = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed", "conv_proj.": "patch_embed.proj.",
              "encoder.ln.": "norm.", "heads.head.": "head."}
_TV_BLOCK = {"ln_1.": "norm1.", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj.": "attn.proj.",
             "ln_2.": "norm2.", "mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2.",
             "mlp.linear_1.": "mlp.fc1.", "mlp.linear_2.": "mlp.fc2."}  # linear_1/2: torchvision < 0.13
_TV_LAYER = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.*)")


def is_torchvision_state_dict(state_dict) -> bool:
    return any(k.startswith(("conv_proj.", "encoder.layers.encoder_layer_")) or k == "class_token"
               for k in state_dict)


def torchvision_to_timm(state_dict: dict) -> dict:
    """Rename a torchvision ``VisionTransformer`` state_dict to timm's keys (same tensors; the layouts agree:
    in_proj is [q; k; v] like timm's qkv). Keys it does not know are kept, so a strict load names them."""
    out = {}
    for key, value in state_dict.items():
        new = key
        layer = _TV_LAYER.fullmatch(key)
        if layer:
            index, rest = layer.groups()
            for old, repl in _TV_BLOCK.items():
                if rest.startswith(old):
                    new = f"blocks.{index}.{repl}{rest[len(old):]}"
                    break
        else:
            for old, repl in _TV_GLOBAL.items():
                if key == old or (old.endswith(".") and key.startswith(old)):
                    new = repl + key[len(old):]
                    break
        out[new] = value
    return out


def load_checkpoint(path) -> dict:
    """A state_dict from a local ``.safetensors`` or ``.pth/.pt/.bin`` file (tensors only, on the CPU);
    ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and a DDP ``module.`` prefix are removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    elif path.endswith(CHECKPOINT_SUFFIXES):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unknown checkpoint format {path!r}: expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with one error naming every missing key,
    unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
              for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{what} ({len(items)}): {', '.join(items[:12])}{', ...' if len(items) > 12 else ''}"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems)
                         + ". Pass the matching model name / keyword arguments (e.g. num_classes, img_size)")
    model.load_state_dict(state_dict, strict=True)


def create_model(name: str, *, checkpoint_path=None, **kwargs):
    """A timm ViT by name (``vit_base_patch16_224``, ``vit_large_patch14_clip_224``, ``vit_so400m_patch14_siglip_224``,
    ``vit_base_patch14_reg4_dinov2``, ...: ``supported_models()``) on the fused kernels.

    ``kwargs`` go to ``timm.create_model(name, pretrained=False, **kwargs)`` (e.g. ``num_classes``,
    ``img_size``, ``dynamic_img_size=True``, ``device``). ``checkpoint_path``: a local ``.safetensors`` or
    ``.pth/.pt/.bin`` state_dict with timm or torchvision keys, loaded strictly. Returns
    ``vit_kernels.from_timm(model)``. Nothing is downloaded.
    """
    timm = _timm()
    _check_name(name)
    if kwargs.pop("pretrained", False):
        raise ValueError("create_model never downloads weights: pass checkpoint_path= a local file instead")
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)
        if is_torchvision_state_dict(state):
            state = torchvision_to_timm(state)
        load_state_dict_strict(model, state, f"checkpoint {os.fspath(checkpoint_path)!r}")
    from .timm_vit import from_timm

    return from_timm(model)
