"""Error of the three ways to run LayerNorm -> Linear in 16-bit, against fp64, on ViT-like residual streams
(CPU, no GPU needed; benchmarks/NOTES.md item 12):

- unfused: PyTorch's own F.layer_norm then F.linear in the 16-bit dtype (the project's error yardstick);
- prologue fold (ops.layer_norm_linear): normalize each x tile in fp32, round to 16 bits, GEMM;
- epilogue fold (the alternative not built): x @ W'^T with W' = W diag(gamma) rounded once, fp32
  accumulation, then rstd * (acc - mean * colsum(W')) + (b + W beta), rounded once.

Both are emulated step by step (each rounding where a kernel rounds; fp32 GEMMs on the CPU), and in fp16 the
real kernel runs in the Triton interpreter on a slice of the rows. Streams: per-token means of
several std, a few channels 40x larger than the rest, and 2% of tokens with one massive activation
(|x| ~ 500, as DINOv2/CLIP have: arXiv 2309.16588 / 2402.17762).

    TRITON_INTERPRET=1 python benchmarks/fold_numerics.py  # writes benchmarks/results/fold_numerics_cpu_<date>.json
"""
import datetime
import json
import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from vit_kernels import ops

M, K, N = 197 * 4, 768, 2304  # ViT-B/16 qkv, 4 images
KERNEL_ROWS = 64  # the interpreter is slow: the real kernel runs on the first rows only


def stream(mean_std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) + mean_std * torch.randn(M, 1, generator=g)
    x[:, [17, 301]] *= 40.0
    massive = torch.rand(M, generator=g) < 0.02
    x[massive, 42] = 500.0
    return x


def params(dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    gamma = (1.0 + 0.5 * torch.randn(K, generator=g)).to(dtype)
    beta = (0.1 * torch.randn(K, generator=g)).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(dtype)
    return gamma, beta, w, b


def errors(x32: torch.Tensor, dtype) -> dict:
    gamma, beta, w, b = params(dtype)
    x = x32.to(dtype)  # the stored residual stream: every method reads these values
    ref = F.linear(F.layer_norm(x.double(), (K,), gamma.double(), beta.double(), 1e-6), w.double(), b.double())
    unfused = F.linear(F.layer_norm(x, (K,), gamma, beta, 1e-6), w, b)
    normed = F.layer_norm(x.float(), (K,), gamma.float(), beta.float(), 1e-6).to(dtype)
    prologue = (normed.float() @ w.float().t() + b.float()).to(dtype)
    folded_w = (w.float() * gamma.float()).to(dtype)  # W' rounded once; colsum from the rounded values
    colsum, shift = folded_w.float().sum(1), b.float() + w.float() @ beta.float()
    xf = x.float()
    mean, var = xf.mean(1, keepdim=True), xf.var(1, unbiased=False, keepdim=True)
    acc = xf @ folded_w.float().t()
    epilogue = ((acc - mean * colsum) * torch.rsqrt(var + 1e-6) + shift).to(dtype)
    scale = ref.abs().max().item()
    out = {name: (y.double() - ref).abs().max().item() for name, y in
           (("unfused (PyTorch)", unfused), ("prologue fold", prologue), ("epilogue fold", epilogue))}
    if dtype == torch.float16:  # the interpreter computes fp16 dots correctly (bf16 wrongly)
        rows = slice(0, KERNEL_ROWS)
        kernel = ops.layer_norm_linear(x[rows], gamma, beta, w, b, eps=1e-6)
        out[f"kernel (interpreter, first {KERNEL_ROWS} rows)"] = (kernel.double() - ref[rows]).abs().max().item()
        out[f"unfused (PyTorch, first {KERNEL_ROWS} rows)"] = (unfused[rows].double() - ref[rows]).abs().max().item()
    return dict(max_abs_error=out, output_max_abs=scale)


def main() -> None:
    rows = []
    for mean_std in (0.0, 5.0, 50.0):
        x = stream(mean_std)
        for dtype in (torch.bfloat16, torch.float16):
            rows.append(dict(row_mean_std=mean_std, dtype=str(dtype).replace("torch.", ""), **errors(x, dtype)))
            print(json.dumps(rows[-1]))
    out = pathlib.Path(__file__).parent / "results" / f"fold_numerics_cpu_{datetime.date.today()}.json"
    out.write_text(json.dumps(dict(benchmark="fold_numerics", shape=dict(M=M, K=K, N=N), torch=torch.__version__,
                                   rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
