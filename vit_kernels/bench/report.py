"""Markdown tables and matplotlib plots of benchmark results (plots only where matplotlib is installed)."""
from __future__ import annotations

import pathlib


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _markdown(header: list, rows) -> list:
    """Markdown table lines: the header, its separator, one line per row of cell strings."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def e2e_table(result: dict) -> str:
    lines = _markdown(["model", "batch", "candidate", "ms", "img/s", "MFU", "CUDA graph ms", "vs timm eager"], (
        (r["model"], r["batch"], r["candidate"], f"{r['ms']:.3f}", f"{r['img_per_s']:.0f}", _fmt(r["mfu"], ".1%"),
         _fmt(r["graph_ms"], ".3f"), f"{r['speedup_vs_timm_eager']:.2f}x") for r in result["rows"]))
    head = result.get("headline") or {}
    measured = {k: v for k, v in head.items() if v is not None and k not in ("torch", "triton")}
    if measured:
        lines += ["", "headline (ViT-B/16, bf16, from_timm vs timm): " + ", ".join(
            f"{k}={_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in measured.items())]
    missing = result.get("headline_missing") or {}
    by_reason: dict = {}
    for key, why in missing.items():
        by_reason.setdefault(why, []).append(key)
    lines += [f"headline not measured, {why}: {', '.join(keys)}" for why, keys in by_reason.items()]
    return "\n".join(lines)


def train_table(result: dict) -> str:
    return "\n".join(_markdown(["model", "batch", "candidate", "ms/step", "img/s", "peak MiB", "vs timm eager"], (
        (r["model"], r["batch"], r["candidate"], f"{r['ms']:.2f}", f"{r['img_per_s']:.0f}", _fmt(r["peak_mib"], ".0f"),
         f"{r['speedup_vs_timm_eager']:.2f}x") for r in result["rows"])))


def ops_table(result: dict) -> str:
    return "\n".join(_markdown(
        ["op", "shape", "implementation", "ms", "TFLOP/s", "GB/s", "% of peak", "ours is faster by"],
        ((r["op"], r["shape"], r["impl"], f"{r['ms']:.4f}", _fmt(r["tflops"], ".1f"), _fmt(r["gbps"], ".0f"),
          _fmt(r["frac_of_peak"], ".0%"), f"{r['ours_speedup']:.2f}x") for r in result["rows"])))


NO_MATPLOTLIB = "matplotlib is not installed: no plot (pip install matplotlib, or pip install -e '.[bench]')"


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_e2e(result: dict, path) -> pathlib.Path:
    """img/s against batch size, one panel per model, one line per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == model]
        for cand in dict.fromkeys(r["candidate"] for r in rows):
            pts = sorted((r["batch"], r["img_per_s"]) for r in rows if r["candidate"] == cand)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cand)
        ax.set(xscale="log", xlabel="batch", ylabel="images / s", title=model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(result))
    return _save(fig, path)


def plot_ops(result: dict, path) -> pathlib.Path:
    """Our speed-up over the best baseline, one bar per op and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in result["rows"] if r["impl"] == "ours" and r.get("speedup_ours_vs_best_baseline")]
    labels = [f"{r['op']}\n{r['shape']}" for r in ours]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ours)), 4.5))
    ax.bar(range(len(ours)), [r["speedup_ours_vs_best_baseline"] for r in ours])
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(ours)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speed-up of ours over the best baseline")
    ax.set_title(_title(result))
    fig.tight_layout()
    return _save(fig, path)


def _title(result: dict) -> str:
    dev = result["device"]
    where = dev["gpu"] or "CPU (Triton interpreter): not GPU performance"
    return f"{where} | torch {dev['torch']} | triton {dev['triton']} | {dev['date'][:10]}"


def _save(fig, path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
