"""Test harness: the Triton interpreter on CPU machines, a device fixture, a gpu marker, seeded RNGs."""
import os
import random

import torch

if not torch.cuda.is_available():
    # must precede the first @triton.jit in vit_kernels.ops: kernels then run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VIT_KERNELS_POISON", "1")  # kernel outputs start as NaN: unwritten elements fail tests

import pytest

ON_GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--random-cases", type=int, default=50,
                     help="randomized model cases (and as many op cases) in test_random_equivalence.py; "
                          "the default suite runs 50, stress runs pass more")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (real sizes, bf16); skipped on CPU machines")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the Triton interpreter computes bf16 wrongly and is too "
                                   "slow for real ViT sizes")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture
def device():
    return torch.device("cuda" if ON_GPU else "cpu")


def pytest_runtest_logreport(report):
    """With VIT_KERNELS_FAIL_LOG=path, each failure's traceback is appended there as it happens (a GPU round
    cut short by its time limit still names what failed)."""
    path = os.environ.get("VIT_KERNELS_FAIL_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
