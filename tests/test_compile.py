"""Every kernel x autotune config x {fp16, bf16} compiles for sm_80 and sm_90 without spills and within the
card's shared memory: what the interpreter cannot check before a real GPU sees the code. The cases are the
registered ops' kernel grids (``OpSpec.kernels``)."""
import pytest

from vit_kernels import compile_check
from vit_kernels.ops.registry import registered_ops


@pytest.fixture(scope="module")
def results():
    return compile_check.run_in_subprocess(workers=2)


def test_every_case_was_compiled(results):
    launchers = {grid.launcher.name for spec in registered_ops() for grid in spec.kernels}
    assert {r["case"].split("[")[0] for r in results} == launchers
    assert {r["arch"] for r in results} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in results} == {"fp16", "bf16"}
    assert len(results) == 4 * len(compile_check.cases()) > 200


def test_no_compile_error_spill_or_shared_memory_overflow(results):
    failures = [f"{r['arch']} {r['dtype']} {r['case']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)


def test_resources_were_read(results):
    assert all(r["registers"] and r["registers"] <= 255 for r in results)
    assert all(r["shared"] is not None for r in results)
