"""Timers, the card's measured peaks, device info and result files."""
from __future__ import annotations

import contextlib
import datetime
import json
import pathlib
import statistics
import subprocess
import time

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


MIN_MS, MIN_SAMPLES = 1000.0, 50  # every GPU figure: at least 1 s of samples and at least 50 of them


def _bench(fn, warmup_ms: float = 100.0) -> float:
    """Median ms of ``fn`` by triton.testing.do_bench over max(1 s, 50 runs)."""
    import triton

    estimate = triton.testing.do_bench(fn, warmup=warmup_ms, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=max(MIN_MS, 1.2 * MIN_SAMPLES * estimate),
                                   return_mode="median")


def time_ms(fn) -> float:
    """Median milliseconds of ``fn``: on a GPU triton.testing.do_bench over at least 1 s and 50 samples; on a CPU
    (labelled, tiny) three perf_counter repeats."""
    if on_gpu():
        return _bench(fn)
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def rounds_summary(base: list, ours: list) -> dict:
    """Per-round speed-ups ``base[i] / ours[i]`` of two interleaved timing series: their range, and whether it
    crosses 1.0 (a comparison the noise could flip)."""
    ratios = [b / o for b, o in zip(base, ours, strict=True)]
    return dict(ratio_min=min(ratios), ratio_max=max(ratios), ratio_spread_crosses_1=min(ratios) < 1.0 < max(ratios))


def clock_mhz() -> int | None:
    """The GPU's current SM clock (nvidia-smi), or None where it cannot be read."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return int(out[0]) if out else None
    return None


def cuda_graph_ms(fn) -> float | None:
    """Median milliseconds of a CUDA-graph replay of ``fn`` (launch overhead removed); None on a CPU or if the
    function cannot be captured."""
    if not on_gpu():
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # a function that cannot be captured (host syncs, its own graphs): no graph figure
        torch.cuda.synchronize()
        return None
    return _bench(graph.replay)


_peaks: dict = {}


def measured_peaks(dtype: torch.dtype) -> dict:
    """The card's measured dense GEMM TFLOP/s (8192^3 torch.mm in ``dtype``) and copy GB/s (read + write)."""
    if not on_gpu():
        return dict(gemm_tflops=None, copy_gbps=None)
    if dtype not in _peaks:
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        gemm_ms = time_ms(lambda: torch.mm(a, b))
        src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src))
        _peaks[dtype] = dict(gemm_tflops=2 * 8192**3 / gemm_ms / 1e9, copy_gbps=2 * src.numel() / copy_ms / 1e6)
    return _peaks[dtype]


def device_info() -> dict:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        driver = None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or None
        info.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda, driver=driver)
    else:
        info.update(gpu=None, note="CPU run (Triton interpreter / PyTorch fallback): not GPU performance")
    return info


def save_json(out_dir, kind: str, payload: dict, tag: str = "") -> pathlib.Path:
    """``<kind>[_<tag>]_<card>_<date>.json`` under out_dir (the tag keeps runs of one day apart)."""
    info = payload["device"]
    card = (info["gpu"] or "cpu").replace(" ", "_").replace("/", "_")
    path = pathlib.Path(out_dir) / f"{kind}{'_' + tag if tag else ''}_{card}_{info['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
