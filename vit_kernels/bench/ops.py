"""Per-op benchmarks at real ViT shapes against their natural PyTorch baselines (and torch.compile of them)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.attention import split_qkv
from .models import CONFIGS
from .timing import device_info, measured_peaks, on_gpu, time_ms


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    ours: object
    baselines: dict
    flops: float | None = None  # compute-bound ops report TFLOP/s ...
    nbytes: float | None = None  # ... memory-bound ones GB/s


def _rand(*shape, dtype, device, scale=1.0):
    return torch.randn(*shape, device=device, dtype=dtype) * scale


def patch_embed_cases(name, batch, dtype, device):
    c = CONFIGS[name]
    e, p, img = c["emb"], c["patch"], c["img"]
    x = _rand(batch, 3, img, img, dtype=dtype, device=device)
    w, b = _rand(e, 3, p, p, dtype=dtype, device=device, scale=0.05), _rand(e, dtype=dtype, device=device)
    cls, pos = _rand(1, e, dtype=dtype, device=device), _rand((img // p) ** 2 + 1, e, dtype=dtype, device=device)

    def eager():
        tokens = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)
        return torch.cat([cls.expand(batch, 1, e), tokens], dim=1) + pos

    n = (img // p) ** 2
    yield Case("patch_embed", f"{name} B={batch}", lambda: ops.patch_embed(x, w, b, cls, pos),
               {"conv2d+cat+add": eager}, flops=2 * batch * n * e * 3 * p * p,
               nbytes=(x.numel() + batch * (n + 1) * e) * x.element_size())


def layer_norm_cases(name, batch, dtype, device):
    e = CONFIGS[name]["emb"]
    n = (CONFIGS[name]["img"] // CONFIGS[name]["patch"]) ** 2 + 1
    x = _rand(batch, n, e, dtype=dtype, device=device)
    w, b = _rand(e, dtype=dtype, device=device), _rand(e, dtype=dtype, device=device)
    yield Case("layer_norm", f"{name} B={batch}", lambda: ops.layer_norm(x, w, b, 1e-6),
               {"F.layer_norm": lambda: F.layer_norm(x, (e,), w, b, 1e-6)}, nbytes=2 * x.numel() * x.element_size())


def linear_cases(name, batch, dtype, device):
    e = CONFIGS[name]["emb"]
    m = batch * ((CONFIGS[name]["img"] // CONFIGS[name]["patch"]) ** 2 + 1)
    for label, n, k, act, residual in [("qkv", 3 * e, e, None, False), ("proj+residual", e, e, None, True),
                                       ("fc1+gelu", 4 * e, e, "gelu", False), ("fc2+residual", e, 4 * e, None, True)]:
        x = _rand(m, k, dtype=dtype, device=device)
        w, b = _rand(n, k, dtype=dtype, device=device, scale=k ** -0.5), _rand(n, dtype=dtype, device=device)
        r = _rand(m, n, dtype=dtype, device=device) if residual else None

        def eager(x=x, w=w, b=b, r=r, act=act):
            y = F.linear(x, w, b)
            y = F.gelu(y) if act else y
            return y if r is None else y + r

        yield Case(f"linear {label}", f"{name} B={batch}",
                   lambda x=x, w=w, b=b, r=r, act=act: ops.linear(x, w, b, activation=act, residual=r),
                   {"F.linear+epilogue": eager}, flops=2 * m * n * k)


def attention_cases(name, batch, dtype, device):
    c = CONFIGS[name]
    n, h, d = (c["img"] // c["patch"]) ** 2 + 1, c["heads"], c["emb"] // c["heads"]
    qkv = _rand(batch, n, 3 * h * d, dtype=dtype, device=device)
    q, k, v = split_qkv(qkv, h, "qkv h d")

    def merge(o):
        return o.transpose(1, 2).reshape(batch, n, h * d)

    def einsum():  # the tutorial's formulation, paper scaling
        att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d), dim=-1)
        return merge(torch.einsum("bhqk,bhkd->bhqd", att, v))

    baselines = {"einsum (tutorial)": einsum}
    if on_gpu():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, backend in [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient",
                               SDPBackend.EFFICIENT_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("sdpa math", SDPBackend.MATH)]:
            def pinned(backend=backend):
                with sdpa_kernel(backend):
                    return merge(F.scaled_dot_product_attention(q, k, v))
            baselines[label] = pinned
    else:
        baselines["sdpa"] = lambda: merge(F.scaled_dot_product_attention(q, k, v))
    yield Case("attention", f"{name} B={batch}", lambda: ops.attention(qkv, h, "qkv h d", "paper"), baselines,
               flops=4 * batch * h * n * n * d)


def mlp_cases(name, batch, dtype, device):
    """The MLP half-block: x + fc2(GELU(fc1(LN(x))))."""
    e = CONFIGS[name]["emb"]
    n = (CONFIGS[name]["img"] // CONFIGS[name]["patch"]) ** 2 + 1
    x = _rand(batch, n, e, dtype=dtype, device=device)
    norm = torch.nn.LayerNorm(e, eps=1e-6).to(device, dtype)
    fc1, fc2 = torch.nn.Linear(e, 4 * e).to(device, dtype), torch.nn.Linear(4 * e, e).to(device, dtype)

    def ours():
        h = ops.layer_norm(x, norm.weight, norm.bias, 1e-6)
        h = ops.linear(h, fc1.weight, fc1.bias, activation="gelu")
        return ops.linear(h, fc2.weight, fc2.bias, residual=x)

    def eager():
        return x + fc2(F.gelu(fc1(norm(x))))

    yield Case("mlp half-block", f"{name} B={batch}", ours, {"eager nn.Module": eager},
               flops=2 * 2 * batch * n * e * 4 * e)


OP_SUITES = {"patch_embed": patch_embed_cases, "layer_norm": layer_norm_cases, "linear": linear_cases,
             "attention": attention_cases, "mlp": mlp_cases}


def run_ops(op_names=tuple(OP_SUITES), models=("vit_b_16",), batches=(256,), dtype=torch.bfloat16,
            compile_baselines=False, progress=print) -> dict:
    """Time each op and its baselines (checked against ours first: relative max error <= 5% in 16-bit)."""
    unknown = set(op_names) - set(OP_SUITES)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {sorted(OP_SUITES)}")
    device = "cuda" if on_gpu() else "cpu"
    peaks = measured_peaks(dtype)
    rows = []
    with torch.no_grad():
        for op in op_names:
            for name in models:
                for batch in batches:
                    for case in OP_SUITES[op](name, batch, dtype, device):
                        rows += _run_case(case, compile_baselines and on_gpu(), peaks, progress)
    return dict(device=device_info(), benchmark="ops", dtype=str(dtype).replace("torch.", ""), peaks=peaks,
                rows=rows)


def _run_case(case: Case, compile_baselines: bool, peaks: dict, progress) -> list:
    reference = case.ours()
    baselines = dict(case.baselines)
    if compile_baselines:
        for label, fn in case.baselines.items():
            if not label.startswith("sdpa"):  # SDPA backends are already fused kernels
                baselines[f"torch.compile({label})"] = torch.compile(fn, dynamic=False)
    timings = {"ours": time_ms(case.ours)}
    errors = {}
    for label, fn in baselines.items():
        try:
            out = fn()
        except RuntimeError as exc:  # an SDPA backend that does not take this shape or dtype
            progress(f"  {case.op} {case.shape}: {label} unavailable ({str(exc).splitlines()[0][:70]})")
            continue
        scale = max(1.0, out.float().abs().max().item())
        errors[label] = (reference.float() - out.float()).abs().max().item()
        limit = (1e-3 if reference.dtype == torch.float32 else 5e-2) * scale
        if not errors[label] <= limit:
            raise AssertionError(f"{case.op} {case.shape}: ours differs from {label} by {errors[label]:.3g}")
        timings[label] = time_ms(fn)
    rows = []
    best = min((ms for label, ms in timings.items() if label != "ours"), default=None)
    for label, ms in timings.items():
        tflops = case.flops / ms / 1e9 if case.flops and on_gpu() else None
        gbps = case.nbytes / ms / 1e6 if case.nbytes and on_gpu() else None
        rows.append(dict(op=case.op, shape=case.shape, impl=label, ms=ms, tflops=tflops, gbps=gbps,
                         frac_of_peak=(tflops / peaks["gemm_tflops"] if tflops and peaks["gemm_tflops"] else
                                       gbps / peaks["copy_gbps"] if gbps and peaks["copy_gbps"] else None),
                         ours_speedup=ms / timings["ours"], max_error_vs_ours=errors.get(label, 0.0)))
        progress(f"  {case.op:<22} {case.shape:<16} {label:<34} {ms:9.4f} ms"
                 + (f" {tflops:6.1f} TFLOP/s" if tflops else "") + (f" {gbps:7.0f} GB/s" if gbps else "")
                 + ("" if on_gpu() else "  (CPU)"))
    if best:
        for r in rows:
            r["speedup_ours_vs_best_baseline"] = best / timings["ours"]
    return rows
