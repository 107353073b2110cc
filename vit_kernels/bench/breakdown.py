"""Where the time goes: a per-category breakdown of one ViT forward from torch.profiler, ours vs timm eager.

On a GPU every CUDA kernel of a few profiled forwards is put into a category by its name (``CATEGORIES``): time
per forward, launches, share of the summed kernel time and, where the model config gives the work, TFLOP/s or
GB/s and the fraction of the card's measured peak. The summed kernel time is set against the wall time of an
unprofiled forward (``time_ms``): the gap is launch gaps and host overhead.

On a CPU (a labelled, tiny version) the "kernels" are the top-level CPU ops of the forward: timm's aten ops
(``aten::linear``, ``aten::scaled_dot_product_attention``, ...) and our Triton-interpreter launches, which the
profiler would not see at all (the interpreter runs a kernel as numpy code, not as an op): while profiling, each
interpreted launch is wrapped in a ``record_function`` named after its kernel (``_linear_kernel``, the name CUPTI
reports on a GPU), so both forms are classified by the same table. No rates and no peaks on a CPU.
"""
from __future__ import annotations

import collections
import contextlib
import re

import torch

from .e2e import cudnn_benchmark
from .models import CONFIGS, OURS, TIMM, build_candidates
from .report import _fmt, _markdown
from .timing import device_info, measured_peaks, on_gpu, time_ms

# {category: pattern}, searched (case-insensitive) in this order: the first match wins, "other" takes the rest.
# Attention comes first (cuDNN's SDPA kernels say "fprop", FlashAttention's cutlass), then the patch embedding
# (cuDNN's conv kernels say "implicit_gemm"), LayerNorm, and the GEMMs. Extend here; tests/test_bench.py lists
# real kernel names of both forms.
CATEGORIES = {
    "attention": r"attention|flash|fmha|sdpa|softmax",
    "patch_embed": r"_patch_embed|convolution|convolve|conv2d|conv_|fprop|implicit_gemm|im2col|nchwtonhwc|nhwctonchw",
    "layer_norm": r"layer_?norm|rowwisemoments",
    "gemm": r"_linear_kernel|gemm|gemv|nvjet|cublas|cutlass|xmma|splitkreduce"
            r"|^aten::(addmm|mm|bmm|baddbmm|matmul|linear|_addmm_activation)$",
}
OTHER = "other"  # elementwise (GELU, add, dropout), copies, cat, pooling (ours: _pool_norm_kernel), the rest
ORDER = (*CATEGORIES, OTHER)
_COMPILED = {cat: re.compile(pattern, re.IGNORECASE) for cat, pattern in CATEGORIES.items()}
TOP = 8  # kernel names kept per category in the JSON, by time


def classify(name: str) -> str:
    """The category of a kernel (GPU) or top-level op (CPU) name."""
    return next((cat for cat, pattern in _COMPILED.items() if pattern.search(name)), OTHER)


def run_breakdown(models=("vit_b_16",), batches=(1, 64, 256), dtype=torch.bfloat16, forwards=None,
                  progress=print) -> dict:
    """Rows for every model x batch x candidate (ours ``from_timm`` and timm eager with cudnn.benchmark on).

    Each candidate is run once (warm-up: autotuning, cudnn.benchmark), timed unprofiled (``time_ms``), then
    ``forwards`` forwards (default 5 on a GPU, 1 on a CPU) are profiled and every figure is per forward."""
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    forwards = forwards or (5 if gpu else 1)
    peaks = measured_peaks(dtype)
    rows, total, done = [], len(models) * len(batches) * 2, 0
    for name in models:
        built = build_candidates(name, dtype, device)
        candidates = {cand: built[cand] for cand in (OURS, TIMM)}
        for batch in batches:
            x = torch.randn(batch, 3, CONFIGS[name]["img"], CONFIGS[name]["img"], device=device, dtype=dtype)
            for cand, c in candidates.items():
                done += 1

                def forward(model=c.model, x=x):
                    return model(x)

                with torch.no_grad(), cudnn_benchmark(c.cudnn_benchmark):
                    forward()
                    wall = time_ms(forward)
                    events = _profile(forward, forwards, gpu)
                row = dict(model=name, batch=batch, dtype=str(dtype).replace("torch.", ""), candidate=cand,
                           forwards=forwards, wall_ms=wall, **_summarize(events, forwards, wall))
                _rates(row, CONFIGS[name], batch, dtype, peaks)
                rows.append(row)
                progress(f"[{done}/{total}] {name} batch {batch} {cand:<20} wall {wall:9.3f} ms, kernels "
                         f"{row['kernel_ms']:9.3f} ms, " + ", ".join(
                             f"{cat} {row['categories'][cat]['share']:.0%}" for cat in ORDER)
                         + ("" if gpu else "  (CPU)"))
    return dict(device=device_info(), benchmark="breakdown", dtype=str(dtype).replace("torch.", ""), peaks=peaks,
                categories=dict(CATEGORIES, other="everything else"),
                source=("CUDA kernel durations (torch.profiler / CUPTI)" if gpu else
                        "CPU times of the top-level ops: aten ops, and the Triton interpreter's launches labelled "
                        "with their kernel names (not GPU performance)"), rows=rows)


def _profile(forward, count: int, gpu: bool) -> list:
    """[(name, microseconds)] of every kernel (GPU) or top-level op (CPU) of ``count`` forwards."""
    from torch.profiler import ProfilerActivity, profile

    # on a GPU only the CUDA events are read (the CPU ops only add host time, which the wall time has anyway)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with contextlib.ExitStack() as stack:
        if not gpu:
            stack.enter_context(_label_interpreter_launches())
        prof = stack.enter_context(profile(activities=activities))
        for _ in range(count):
            forward()
        if gpu:
            torch.cuda.synchronize()
    events = [e for e in prof.events() if not e.is_async]
    if gpu:  # a record_function range also shows on the GPU timeline (gpu_user_annotation): not a kernel
        return [(e.name, e.time_range.elapsed_us()) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return _top_level([e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None])


def _top_level(events) -> list:
    """The CPU form: each top-level op with its total time, attributed to the first category on its way down
    (a classified op takes its children along; an unclassified one keeps its self time as "other" and its
    classified descendants go to their own categories). The forward's op time is thus split, never counted
    twice."""
    out = []
    for e in events:
        if classify(e.name) != OTHER or not e.cpu_children:
            out.append((e.name, e.cpu_time_total))
        else:
            out.append((e.name, e.self_cpu_time_total))
            out += _top_level(e.cpu_children)
    return out


@contextlib.contextmanager
def _label_interpreter_launches():
    """While profiling on a CPU: each Triton-interpreter launch in a ``record_function`` named after its kernel.
    Nothing of vit_kernels is changed; without the interpreter's ``InterpretedFunction.run`` (another Triton)
    our launches stay unlabelled and their time shows up only in the gap."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None
    cls = getattr(interpreter, "InterpretedFunction", None)
    original = getattr(cls, "run", None)
    if original is None:
        yield
        return

    def run(self, *args, **kwargs):
        with torch.profiler.record_function(getattr(self.fn, "__name__", "triton_kernel")):
            return original(self, *args, **kwargs)

    cls.run = run
    try:
        yield
    finally:
        cls.run = original


def _summarize(events, forwards: int, wall_ms: float) -> dict:
    """Per-forward totals per category with their top kernels, the summed kernel time and the gap to the wall."""
    per_name: dict = collections.defaultdict(lambda: [0.0, 0])
    for name, us in events:
        per_name[name][0] += us / 1e3 / forwards
        per_name[name][1] += 1
    kernel_ms = sum(ms for ms, _ in per_name.values())
    categories = {cat: dict(ms=0.0, launches=0.0, share=0.0, top=[]) for cat in ORDER}
    for name, (ms, n) in sorted(per_name.items(), key=lambda item: -item[1][0]):
        cat = categories[classify(name)]
        cat["ms"] += ms
        cat["launches"] += n / forwards
        if len(cat["top"]) < TOP:
            cat["top"].append(dict(name=name[:300], ms=ms, launches=n / forwards))
    for cat in categories.values():
        cat["share"] = cat["ms"] / kernel_ms if kernel_ms else 0.0
    return dict(kernel_ms=kernel_ms, gap_ms=wall_ms - kernel_ms,
                gap_share=(wall_ms - kernel_ms) / wall_ms if wall_ms else None, categories=categories)


def work(config: dict, batch: int, dtype: torch.dtype) -> dict:
    """{category: (flop, bytes)} of one forward from the model config (None where not modelled): the four block
    GEMMs x depth + the head; attention 4 B N^2 E per block (QK^T and PV: 4 B H N N d); the patch GEMM; each
    full-size LayerNorm reads and writes B N E elements."""
    e, depth, patch = config["emb"], config["depth"], config["patch"]
    mlp = config.get("mlp_ratio", 4)
    patches = (config["img"] // patch) ** 2
    m = batch * (patches + 1)
    block = 2 * m * e * 3 * e + 2 * m * e * e + 2 * 2 * m * e * mlp * e
    return dict(gemm=(depth * block + 2 * batch * e * config["classes"], None),
                attention=(4 * batch * (patches + 1) ** 2 * e * depth, None),
                patch_embed=(2 * batch * patches * e * 3 * patch**2, None),
                layer_norm=(None, 2 * m * e * dtype.itemsize))


def _rates(row: dict, config: dict, batch: int, dtype: torch.dtype, peaks: dict) -> None:
    """TFLOP/s or GB/s and the fraction of the measured peak per category; None on a CPU and where the
    category has no time or no model. LayerNorm bytes count the category's launches, at most 2 x depth + 1 (ours
    fuses the final norm into the pooling kernel: one fewer full-size LayerNorm)."""
    gpu = on_gpu()
    for cat, entry in row["categories"].items():
        flop, per_norm = work(config, batch, dtype).get(cat, (None, None))
        entry.update(tflops=None, gbps=None, frac_of_peak=None)
        if not gpu or entry["ms"] <= 0:
            continue
        if flop is not None:
            entry["tflops"] = flop / entry["ms"] / 1e9
            entry["frac_of_peak"] = entry["tflops"] / peaks["gemm_tflops"] if peaks["gemm_tflops"] else None
        if per_norm is not None:
            norms = min(round(entry["launches"]), 2 * config["depth"] + 1)
            entry["gbps"] = norms * per_norm / entry["ms"] / 1e6
            entry["frac_of_peak"] = entry["gbps"] / peaks["copy_gbps"] if peaks["copy_gbps"] else None


def breakdown_table(result: dict) -> str:
    """Per category, then the totals: summed kernel time, wall time, and the gap between them."""
    lines = _markdown(["model", "batch", "candidate", "category", "ms / forward", "launches", "share of kernels",
                       "TFLOP/s", "GB/s", "% of peak", "top kernel"], (
        (r["model"], r["batch"], r["candidate"], cat, f"{c['ms']:.3f}", f"{c['launches']:g}", f"{c['share']:.1%}",
         _fmt(c["tflops"], ".1f"), _fmt(c["gbps"], ".0f"), _fmt(c["frac_of_peak"], ".0%"),
         f"`{c['top'][0]['name'][:60]}`" if c["top"] else "-")
        for r in result["rows"] for cat, c in r["categories"].items()))
    lines += ["", *_markdown(["model", "batch", "candidate", "wall ms", "kernel ms", "gap ms (wall - kernels)",
                              "gap share"], (
        (r["model"], r["batch"], r["candidate"], f"{r['wall_ms']:.3f}", f"{r['kernel_ms']:.3f}", f"{r['gap_ms']:.3f}",
         _fmt(r["gap_share"], ".0%")) for r in result["rows"]))]
    lines += ["", f"source: {result['source']}"]
    return "\n".join(lines)
