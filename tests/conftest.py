"""Test harness: the Triton interpreter on CPU machines, a device fixture, a gpu marker, the fast and full tiers,
seeded RNGs."""
import os
import random

import torch

if not torch.cuda.is_available():
    # must precede the first @triton.jit in vit_kernels.ops: kernels then run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VIT_KERNELS_POISON", "1")  # kernel outputs start as NaN: unwritten elements fail tests

import pytest

ON_GPU = torch.cuda.is_available()


# On a CPU machine plain `pytest` (CI's run: under 10 minutes on 2 cores) is the fast tier: the first FAST_CASES
# parametrizations of each test function (every op's, for tests marked every_op), tests marked slow skipped.
# `pytest --full` (or VIT_KERNELS_FULL_TESTS=1) runs everything, as plain `pytest` does on a GPU machine (kernels
# compiled, not interpreted).
FAST_CASES = 1


def pytest_addoption(parser):
    parser.addoption("--random-cases", type=int, default=50,
                     help="randomized model cases (and as many op cases) in test_random_equivalence.py; "
                          "the default suite runs 50, stress runs pass more")
    parser.addoption("--full", action="store_true",
                     help="the full tier: every parametrization and the slow tests (without it: the fast tier, "
                          f"the first {FAST_CASES} runnable case(s) of each test function, slow tests skipped)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (real sizes, bf16); skipped on CPU machines")
    config.addinivalue_line("markers", "slow: long-running: full tier only (`pytest --full`)")
    config.addinivalue_line("markers", "every_op: a registry suite parametrized by op: the fast tier runs every op's "
                                       "case, not only the first (an op's case left out hid an opcheck failure)")


def full_tier(config) -> bool:
    return ON_GPU or config.getoption("--full") or os.environ.get("VIT_KERNELS_FULL_TESTS", "0") == "1"


def pytest_collection_modifyitems(config, items):
    gpu_skip = pytest.mark.skip(reason="needs a CUDA GPU; the Triton interpreter computes bf16 wrongly and is too "
                                       "slow for real ViT sizes")
    tier_skip = pytest.mark.skip(reason="full tier only: `pytest --full`")
    full, kept = full_tier(config), {}
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(gpu_skip)
            continue
        if full:
            continue
        function = item.nodeid.split("[")[0]
        kept[function] = kept.get(function, 0) + 1
        if "slow" in item.keywords or (kept[function] > FAST_CASES and "every_op" not in item.keywords):
            item.add_marker(tier_skip)


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
