"""Check the fused models against the pure-PyTorch reference on the device at hand.

Each row: the fused model's max |error| against an fp64 reference, PyTorch's own error at the same precision,
and the bound (fp32: 1e-4 relative; fp16/bf16: 2x PyTorch's error + 1e-5, the FlashAttention rule).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .configs import timm_kwargs, tutorial_kwargs
from .tolerance import error_bound, max_error

CONFIGS = {name: tutorial_kwargs(name) for name in ("tiny", "vit_b_16")}  # tiny: 37 tokens, head_dim 24
TIMM_CONFIGS = {"tiny": timm_kwargs("tiny_timm"), "vit_b_16": timm_kwargs("vit_b_16")}


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


def _compare(name, fused, reference, x, dtype) -> Row:
    """``fused`` and ``reference`` must be two models (same weights): accelerating patches a model in place."""
    from . import ops

    if fused is reference:
        raise ValueError(f"{name}: the fused model and its reference are the same object")
    with torch.no_grad():
        expected = reference.double()(x.double())
        reference.to(dtype)
        torch_lowp = reference(x.to(dtype))
        reference.float()
        ops.reset_launch_counts()
        got = fused.to(dtype)(x.to(dtype))
        backend = "triton" if ops.launch_counts() else "torch"  # kernels launched, or the PyTorch fallback ran
        fused.float()
    return Row(name, str(dtype).replace("torch.", ""), backend, max_error(got, expected),
               max_error(torch_lowp, expected), error_bound(dtype, torch_lowp, expected))


def run(config: str = "tiny", batch: int = 2, dtypes=None, device=None, timm_models: bool = True) -> list:
    import vit_kernels
    from vit_kernels import reference

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    cfg = CONFIGS[config]
    x = torch.randn(batch, cfg["in_channels"], cfg["img_size"], cfg["img_size"], device=device)
    rows = []
    for scaling in ("tutorial", "paper"):
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
            reference_model = copy.deepcopy(model)  # timm's own forward: from_timm patches `model` in place
            fused = vit_kernels.from_timm(model)
            rows += [_compare(f"timm ViT ({pool} pool)", fused, reference_model, x, dtype) for dtype in dtypes]
    return rows


def format_table(rows) -> str:
    lines = [f"{'model':<22} {'dtype':<9} {'backend':<8} {'max err':>10} {'torch err':>10} {'bound':>10}  result",
             "-" * 82]
    lines += [f"{r.model:<22} {r.dtype:<9} {r.backend:<8} {r.error:>10.3g} {r.torch_error:>10.3g} "
              f"{r.bound:>10.3g}  {'PASS' if r.ok else 'FAIL'}" for r in rows]
    return "\n".join(lines)
