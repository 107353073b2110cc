"""Model configurations, their FLOPs, and the candidates an end-to-end benchmark compares."""
from __future__ import annotations

import torch

CONFIGS = {  # timm name, patch, width, depth, heads, image size
    "vit_s_16": dict(timm="vit_small_patch16_224", patch=16, emb=384, depth=12, heads=6, img=224),
    "vit_b_16": dict(timm="vit_base_patch16_224", patch=16, emb=768, depth=12, heads=12, img=224),
    "vit_l_16": dict(timm="vit_large_patch16_224", patch=16, emb=1024, depth=24, heads=16, img=224),
    "vit_h_14": dict(timm="vit_huge_patch14_224", patch=14, emb=1280, depth=32, heads=16, img=224),
    "tiny": dict(timm="vit_tiny_patch16_224", patch=8, emb=72, depth=2, heads=3, img=48),  # the CPU version
}
COMPILE_MODES = ("default", "max-autotune")


def gflop_per_image(name: str, classes: int = 1000) -> float:
    """Forward GFLOP (2 x multiply-adds) of one image: patch GEMM, blocks (qkv, QK^T, PV, proj, MLP), head."""
    c = CONFIGS[name]
    patches = (c["img"] // c["patch"]) ** 2
    n, e = patches + 1, c["emb"]
    block = 2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e + 2 * 2 * n * e * 4 * e
    return (2 * patches * e * 3 * c["patch"] ** 2 + c["depth"] * block + 2 * e * classes) / 1e9


def tutorial_model(cls, name: str):
    """``cls`` (reference.ViT or vit_kernels.ViT) in configuration ``name``, paper scaling, random weights."""
    c = CONFIGS[name]
    return cls(in_channels=3, patch_size=c["patch"], emb_size=c["emb"], img_size=c["img"], depth=c["depth"],
               n_classes=1000, num_heads=c["heads"], scaling="paper")


def timm_model(name: str):
    """timm's VisionTransformer in configuration ``name``, random weights (never downloads)."""
    import timm

    c = CONFIGS[name]
    return timm.create_model(c["timm"], pretrained=False, img_size=c["img"], patch_size=c["patch"],
                             embed_dim=c["emb"], depth=c["depth"], num_heads=c["heads"])


def build_candidates(name: str, dtype: torch.dtype, device, compile_modes=()) -> dict:
    """{candidate: (model, the candidate it is checked against)}; all share one set of random weights."""
    import vit_kernels
    from vit_kernels import reference

    torch.manual_seed(0)
    ref = tutorial_model(reference.ViT, name).to(device, dtype).eval()
    ours = tutorial_model(vit_kernels.ViT, name).to(device, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    timm_eager = timm_model(name).to(device, dtype).eval()
    candidates = {
        "timm eager (SDPA)": (timm_eager, None),
        "ours (from_timm)": (vit_kernels.from_timm(timm_eager), "timm eager (SDPA)"),
        "reference eager": (ref, None),
        "ours (tutorial ViT)": (ours, "reference eager"),
    }
    for mode in compile_modes:
        compiled = torch.compile(timm_eager, mode=None if mode == "default" else mode, dynamic=False)
        candidates[f"timm torch.compile ({mode})"] = (compiled, "timm eager (SDPA)")
    return candidates
