"""Timing and result helpers shared by the benchmark scripts."""
from __future__ import annotations

import datetime
import json
import os
import pathlib

import torch
import triton

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def do_bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench, L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def cuda_graph_ms(fn, replays: int = 50) -> float:
    """Median milliseconds of a CUDA-graph replay of ``fn`` (launch overhead removed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=replays, return_mode="median")


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(gpu=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def save_results(kind: str, payload: dict, out: str | None = None) -> pathlib.Path:
    info = device_info()
    card = info["gpu"].replace(" ", "_").replace("/", "_")
    path = pathlib.Path(out) if out else RESULTS / f"{kind}_{card}_{info['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(device=info, **payload), indent=2))
    print(f"saved {path}")
    if os.environ.get("OUT"):  # the device tool brings $OUT back
        (pathlib.Path(os.environ["OUT"]) / path.name).write_text(path.read_text())
    return path
