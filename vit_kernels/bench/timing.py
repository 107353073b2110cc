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


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on a GPU, perf_counter repeats on a CPU."""
    if on_gpu():
        import triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cuda_graph_ms(fn) -> float | None:
    """Median milliseconds of a CUDA-graph replay of ``fn`` (launch overhead removed); None on a CPU or if the
    function cannot be captured."""
    if not on_gpu():
        return None
    import triton

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
    return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")


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
