"""The op registry: what the compile check, opcheck, the gradient checks, the robustness sweeps, the
benchmarks and the CLI iterate over. Each op file ends with ``register(OpSpec(...))``; nothing else lists ops.

Run ``python -m vit_kernels.ops.registry`` to print the README's op table from the registered summaries.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch


@dataclasses.dataclass(frozen=True)
class KernelGrid:
    """A launcher (``launch.Tuned`` / ``launch.Sized``) and the constexpr variants the compile check builds
    for sm_80 and sm_90, each with every config the launcher may pick for it (``only``: those whose meta
    passes it, e.g. a launcher's new engine when another grid already builds its other configs)."""
    launcher: object
    variants: tuple
    only: Callable | None = None


@dataclasses.dataclass(frozen=True)
class GradCase:
    """``fn(*inputs)`` -> a tensor, deterministic (fixed seeds), every input requiring grad: checked against
    finite differences."""
    label: str
    fn: Callable
    inputs: tuple


@dataclasses.dataclass
class BenchCase:
    """One timed call of the op and its natural PyTorch baselines. ``exact=False`` (random ops such as
    dropout): the benchmark compares the fraction of zeros rather than values."""
    ours: Callable
    baselines: dict
    flops: float | None = None  # compute-bound ops report TFLOP/s ...
    nbytes: float | None = None  # ... memory-bound ones GB/s
    label: str = ""
    exact: bool = True


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything the shared suites need to know about one public op.

    name: its name in ``vit_kernels.ops``; fn: the public function; summary: one README table line;
    kernels: its KernelGrids; custom_ops: the torch.library ops it registers;
    opcheck_samples(device): [(custom_op, args)], small odd shapes, for ``torch.library.opcheck``;
    grad_cases(device): [GradCase] for the finite-difference check (empty only for ops without a gradient);
    examples(device, dtype, batch): [(args, kwargs)] public calls on random inputs with odd shapes, the
        leading (batch) size given (0 included);
    bench(size, batch, dtype, device): [BenchCase] at the real shapes of ``vit_kernels.configs`` ``size``
        (a dict with emb, heads, patch, img), or None for a visualization-only op;
    random: True when outputs depend on a fresh RNG draw (dropout): compared by statistics, not values;
    also_launches: the launch names of other ops' kernels its forward runs (``ops.mlp``: ``ops.linear``'s GEMMs;
    its own kernel serves backward)."""
    name: str
    fn: Callable
    summary: str
    kernels: tuple
    custom_ops: tuple
    opcheck_samples: Callable[[torch.device], list]
    grad_cases: Callable[[torch.device], list]
    examples: Callable[[torch.device, torch.dtype, int], list]
    bench: Callable[..., Iterable[BenchCase]] | None = None
    random: bool = False
    also_launches: tuple = ()


_REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registered_ops() -> list[OpSpec]:
    """Every registered op, in registration order (importing ``vit_kernels.ops`` registers them all)."""
    import vit_kernels.ops  # noqa: F401  (each op module registers itself on import)

    return list(_REGISTRY.values())


def randn(*shape, device="cpu", dtype=torch.float32, scale=1.0, grad=False) -> torch.Tensor:
    """Sample inputs: normal values drawn in fp32 on the CPU (the same numbers on every device), never zero."""
    t = (torch.randn(*shape) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def op_table() -> str:
    """The README's op table, from the registered summaries."""
    lines = ["| op | one kernel does |", "|---|---|"]
    lines += [f"| `ops.{spec.name}` | {spec.summary} |" for spec in sorted(registered_ops(), key=lambda s: s.name)]
    return "\n".join(lines)


if __name__ == "__main__":
    from vit_kernels.ops.registry import op_table as registered_table  # the package's registry, not __main__'s

    print(registered_table())
