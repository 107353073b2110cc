"""Every kernel x autotune config x {fp16, bf16} compiles for sm_80 and sm_90 without spills and within the
card's shared memory: what the interpreter cannot check before a real GPU sees the code."""
import importlib
import pkgutil

import pytest

import vit_kernels.ops
from vit_kernels import compile_check


@pytest.fixture(scope="module")
def results():
    return compile_check.run_in_subprocess(workers=2)


def test_every_kernel_has_cases():
    """Each @triton.jit kernel defined in vit_kernels.ops (named ``_*_kernel``) is among the compiled cases."""
    defined = set()
    for info in pkgutil.iter_modules(vit_kernels.ops.__path__):
        module = importlib.import_module(f"vit_kernels.ops.{info.name}")
        defined |= {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}
    assert {case[1].__name__ for case in compile_check.cases()} == defined


def test_every_case_was_compiled(results):
    kernels = {r["case"].split("[")[0] for r in results}
    assert kernels == {"linear", "attention", "attention_backward", "attention_probs", "dropout", "patch_embed",
                       "layer_norm", "layer_norm_backward", "pool_norm"}
    assert {r["arch"] for r in results} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in results} == {"fp16", "bf16"}
    assert len(results) > 200


def test_no_compile_error_spill_or_shared_memory_overflow(results):
    failures = [f"{r['arch']} {r['dtype']} {r['case']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)


def test_resources_were_read(results):
    assert all(r["registers"] and r["registers"] <= 255 for r in results)
    assert all(r["shared"] is not None for r in results)
