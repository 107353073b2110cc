"""Regression benchmarks (pytest-benchmark) need a GPU: without one every test here is skipped cleanly."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="regression benchmarks time CUDA kernels; no GPU here")
    for item in items:
        item.add_marker(skip)
