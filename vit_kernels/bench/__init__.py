"""Benchmarks behind ``vit-kernels bench`` and ``benchmarks/bench_*.py``.

On a GPU: ``triton.testing.do_bench`` medians (CUDA-graph replays for batch-1 latency), every baseline in the
same process, every result checked against its baseline before it is timed. Without a GPU the same code runs
a small, clearly labelled CPU version (Triton interpreter vs eager PyTorch) whose times mean nothing for GPUs.
"""
from .e2e import HEADLINE_KEYS, run_e2e
from .ops import op_suites, run_ops
from .timing import on_gpu
from .train import run_train

__all__ = ["HEADLINE_KEYS", "on_gpu", "op_suites", "run_e2e", "run_ops", "run_train"]
