"""Error of the fused GEMM's fast GELU (the TMA engine's; erf from Abramowitz & Stegun 7.1.26, one exp2 and one
approximate reciprocal instead of libdevice's erff) against fp64, next to PyTorch's own (CPU, no GPU needed;
benchmarks/NOTES.md item 15):

- pointwise, fp32: max |gelu_fast(x) - gelu(x)| over x in [-12, 12] (the fp32 rule: 1e-4 relative);
- fc1 of ViT-B/16 (x @ W^T + b, K = 768), fp16 and bf16: the output of our formula rounded as the kernel
  rounds (fp32 accumulation from 16-bit operands, GELU in fp32, one rounding) vs PyTorch's 16-bit
  F.gelu(F.linear(...)), both against fp64 (the project's rule: ours <= 2 x PyTorch's + a floor);
- the real kernel in the Triton interpreter (fp16; fp32) on a slice of the rows, to check the emulation.

    TRITON_INTERPRET=1 python benchmarks/gelu_numerics.py  # writes benchmarks/results/gelu_numerics_cpu_<date>.json
"""
import datetime
import json
import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from vit_kernels.ops.launch import config
from vit_kernels.ops.linear import linear_launch

A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
P = 0.3275911
TMA = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_EPILOGUE=True, PERSISTENT=True)


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """The kernel's formula, step by step in x's dtype (fp32 here)."""
    z = x.abs() * 0.7071067811865476
    t = 1.0 / (1.0 + P * z)
    poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))))
    e = 1.0 - poly * torch.exp2(-z * z * 1.4426950408889634)
    return 0.5 * x * (1.0 + torch.where(x >= 0, e, -e))


def main() -> dict:
    grid = torch.linspace(-12, 12, 2_000_001, dtype=torch.float64)
    exact = F.gelu(grid)
    pointwise = (gelu_fast(grid.float()).double() - exact).abs()
    erf32 = (F.gelu(grid.float()).double() - exact).abs()
    g = torch.Generator().manual_seed(0)
    M, K, N = 197 * 2, 768, 3072
    x64 = torch.randn(M, K, generator=g, dtype=torch.float64)
    w64 = torch.randn(N, K, generator=g, dtype=torch.float64) * K ** -0.5
    b64 = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    results = {"pointwise_fp32": {"max_abs_error_fast": pointwise.max().item(),
                                  "max_abs_error_torch_fp32_erf": erf32.max().item()}}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
        ref = F.gelu(F.linear(x.double(), w.double(), b.double()))  # exact on the rounded operands
        pre = F.linear(x.float(), w.float(), b.float())  # fp32 accumulation, as the kernel
        ours = gelu_fast(pre).to(dtype)
        torch_lowp = F.gelu(F.linear(x, w, b))
        results[f"fc1_{name}"] = {"ours_fast_gelu": (ours.double() - ref).abs().max().item(),
                                  "ours_erf_gelu": (F.gelu(pre).to(dtype).double() - ref).abs().max().item(),
                                  "torch": (torch_lowp.double() - ref).abs().max().item()}
    rows = 64  # the interpreter is slow: the real kernel on the first rows
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        x, w, b = x64[:rows].to(dtype), w64.to(dtype), b64.to(dtype)
        got = linear_launch(x, w, b, "gelu", config=TMA)
        emulated = gelu_fast(F.linear(x.float(), w.float(), b.float())).to(dtype)
        ref = F.gelu(F.linear(x.double(), w.double(), b.double()))
        results[f"kernel_{name}"] = {"max_abs_vs_emulation": (got.double() - emulated.double()).abs().max().item(),
                                     "max_abs_vs_fp64": (got.double() - ref).abs().max().item()}
    return results


if __name__ == "__main__":
    out = {"machine": "CPU (Triton interpreter)", "torch": torch.__version__, "results": main()}
    print(json.dumps(out, indent=1))
    path = pathlib.Path(__file__).parent / "results" / f"gelu_numerics_cpu_{datetime.date.today()}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
