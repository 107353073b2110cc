"""Check the fused models against the pure-PyTorch reference on the device at hand.

Each row: the fused model's max |error| against an fp64 reference, PyTorch's own error at the same precision,
and the bound (fp32: 1e-4 relative; fp16/bf16: 2x PyTorch's error + 1e-5, the FlashAttention rule).
"""
from __future__ import annotations

import dataclasses

import torch

CONFIGS = {
    # interpreter-sized: 37 tokens, head_dim 24
    "tiny": dict(in_channels=3, patch_size=8, emb_size=72, img_size=48, depth=2, n_classes=10, num_heads=3),
    "vit_b_16": dict(in_channels=3, patch_size=16, emb_size=768, img_size=224, depth=12, n_classes=1000,
                     num_heads=12),
}
TIMM_CONFIGS = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=7),
    "vit_b_16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000),
}


@dataclasses.dataclass
class Row:
    model: str
    dtype: str
    backend: str
    error: float
    torch_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _compare(name, fused, reference, x, dtype) -> Row:
    with torch.no_grad():
        expected = reference.double()(x.double())
        reference.to(dtype)
        torch_lowp = reference(x.to(dtype))
        reference.float()
        got = fused.to(dtype)(x.to(dtype))
        fused.float()
    if dtype == torch.float32:
        bound = 1e-4 * max(1.0, expected.abs().max().item())
    else:
        bound = 2 * _max_err(torch_lowp, expected) + 1e-5
    return Row(name, str(dtype).replace("torch.", ""), fused.last_backend, _max_err(got, expected),
               _max_err(torch_lowp, expected), bound)


def run(config: str = "tiny", batch: int = 2, dtypes=None, device=None, timm_models: bool = True) -> list:
    import vit_kernels
    from vit_kernels import reference

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    cfg = CONFIGS[config]
    x = torch.randn(batch, cfg["in_channels"], cfg["img_size"], cfg["img_size"], device=device)
    rows = []
    for scaling in ("seed", "paper"):
        ref = reference.ViT(**cfg, scaling=scaling).to(device).eval()
        fused = vit_kernels.ViT(**cfg, scaling=scaling).to(device).eval()
        fused.load_state_dict(ref.state_dict())
        rows += [_compare(f"ViT ({scaling} scaling)", fused, ref, x, dtype) for dtype in dtypes]
    if timm_models:
        import timm

        tcfg = TIMM_CONFIGS[config]
        x = torch.randn(batch, 3, tcfg["img_size"], tcfg["img_size"], device=device)
        for pool in ("token", "avg"):
            model = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool=pool, **tcfg)
            model = model.to(device).eval()
            fused = vit_kernels.from_timm(model)
            rows += [_compare(f"timm ViT ({pool} pool)", fused, model, x, dtype) for dtype in dtypes]
    return rows


def format_table(rows) -> str:
    lines = [f"{'model':<22} {'dtype':<9} {'backend':<8} {'max err':>10} {'torch err':>10} {'bound':>10}  result",
             "-" * 82]
    for r in rows:
        lines.append(f"{r.model:<22} {r.dtype:<9} {r.backend:<8} {r.error:>10.3g} {r.torch_error:>10.3g} "
                     f"{r.bound:>10.3g}  {'PASS' if r.ok else 'FAIL'}")
    return "\n".join(lines)
