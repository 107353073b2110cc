"""The op registry is the only list of ops: every registered op reaches every shared suite (compile check,
opcheck, finite-difference gradients, robustness sweeps, benchmarks, CLI, README), and every kernel and custom
op defined under vit_kernels/ops belongs to a registered op."""
import importlib
import pkgutil
from pathlib import Path

import pytest
import test_gradcheck
import test_robustness
import test_torch_compile
import torch

import vit_kernels.ops
from vit_kernels import cli, compile_check
from vit_kernels.bench.ops import op_suites
from vit_kernels.ops.registry import OpSpec, op_table, register, registered_ops

# the infrastructure modules of vit_kernels/ops/README.md
INFRASTRUCTURE = {"dispatch", "fast_launch", "guard", "launch", "pdl", "plans", "registry", "tl_helpers"}
SPECS = registered_ops()


def op_modules():
    return [importlib.import_module(f"vit_kernels.ops.{info.name}") for info in pkgutil.iter_modules(
        vit_kernels.ops.__path__) if info.name not in INFRASTRUCTURE]


def test_every_op_module_registers_its_public_function():
    registered = {spec.fn for spec in SPECS}
    for module in op_modules():
        assert any(fn.__module__ == module.__name__ for fn in registered), f"{module.__name__} registers no op"
    for spec in SPECS:
        assert getattr(vit_kernels.ops, spec.name) is spec.fn, f"vit_kernels.ops.{spec.name} is not exported"


def test_every_kernel_and_custom_op_belongs_to_a_registered_op():
    launched = {grid.launcher.kernel for spec in SPECS for grid in spec.kernels}
    custom = {op for spec in SPECS for op in spec.custom_ops}
    for module in op_modules():
        for name, value in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel"):
                assert value in launched, f"{module.__name__}.{name} is in no OpSpec.kernels"
            if isinstance(value, torch._library.custom_ops.CustomOpDef):
                assert value in custom, f"{module.__name__}.{name} is in no OpSpec.custom_ops"


def test_every_registered_op_is_in_every_suite():
    compiled = {case[5] for case in compile_check.cases()}
    for spec in SPECS:
        assert spec.kernels and all(grid.launcher in compiled for grid in spec.kernels), f"{spec.name}: compile check"
        assert spec.name in test_robustness.SPECS, f"{spec.name}: robustness sweeps"
        if spec.custom_ops:
            assert spec.name in test_torch_compile.OPS, f"{spec.name}: opcheck"
            assert spec.name in test_gradcheck.DIFFERENTIABLE, f"{spec.name}: gradient check"
        if spec.bench is not None:
            assert spec.name in op_suites() and spec.name in cli.op_choices(), f"{spec.name}: benchmarks / CLI"


def test_readme_op_table_is_generated_from_the_registry():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert op_table() in readme, "README's op table is stale: paste `python -m vit_kernels.ops.registry`"


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register(OpSpec(SPECS[0].name, SPECS[0].fn, "", (), (), list, list, list))
