"""The direct relaunch of compiled kernels (vit_kernels/ops/fast_launch.py), without a GPU: Triton's launch and
its CompiledKernel are faked (a toy kernel that computes with PyTorch, its direct launcher resolving pointers
back to tensors), so the tests show what is cached under which key, what a direct launch passes, the check
against Triton's launch until validated, and that the library's real launch sites are cacheable."""
import importlib

import pytest
import torch
import triton.language as tl

from vit_kernels import ops
from vit_kernels.ops import fast_launch, guard, launch

linear_module = importlib.import_module("vit_kernels.ops.linear")


def toy(x_ptr, out_ptr, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr = 4):
    """The toy kernel's signature: out = x * scale (+ 1 with FLAG)."""


class FakeCompiled:
    """A CompiledKernel: ``run`` is the positional launcher protocol, recorded; ``wrong`` corrupts its output."""

    def __init__(self, tensors, wrong=False):
        self.tensors, self.wrong, self.direct = tensors, wrong, []
        self.function, self.packed_metadata = 0xF00D, ("packed",)

    @property
    def run(self):
        return self._run

    def _run(self, g0, g1, g2, stream, function, packed, launch_meta, enter, exit_, *params):
        self.direct.append(((g0, g1, g2), stream, function, packed, (launch_meta, enter, exit_), params))
        x, out, _n, scale, flag_slot, block_slot = params
        assert (flag_slot, block_slot) == (None, None)  # constexpr slots: present, ignored
        src, dst = self.tensors[x], self.tensors[out]
        dst.copy_(src * scale + (7.0 if self.wrong else 0.0))


class FakeJit:
    """``kernel[grid](*args, **kwargs)``: Triton's launch of the toy kernel, returning its CompiledKernel."""

    fn = staticmethod(toy)

    def __init__(self, compiled):
        self.compiled, self.calls = compiled, []

    def __getitem__(self, grid):
        def call(x, out, n, scale, FLAG, **options):
            self.calls.append((grid, options))
            out.copy_(x * scale + (1.0 if FLAG else 0.0) * 0)
            return self.compiled
        return call


@pytest.fixture
def gpu_like(monkeypatch):
    """The GPU branch of the launchers on CPU tensors (the fakes stand in for Triton's runtime)."""
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(fast_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(fast_launch, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(fast_launch, "ENABLED", True)


def toy_kernel(tensors, wrong=False, monkeypatch=None):
    """The toy launcher; its fake launcher resolves addresses through ``tensors`` (and, with ``monkeypatch``,
    through the private copies the checked launch makes)."""
    if monkeypatch is not None:
        twin_memory = fast_launch._twin_memory

        def known_twins(args):
            twins, addresses = twin_memory(args)
            tensors.update(zip(addresses, twins))
            return twins, addresses
        monkeypatch.setattr(fast_launch, "_twin_memory", known_twins)
    compiled = FakeCompiled(tensors, wrong)
    jit = FakeJit(compiled)
    return launch.Kernel("toy", jit), jit, compiled


def run_toy(kernel, x, out, scale=2.0, flag=False, block=4):
    kernel.launch(lambda meta: (3 * meta["BLOCK"],), x, out, x.numel(), scale, FLAG=flag,
                  config=launch.config(4, 2, BLOCK=block))


def test_a_problem_is_launched_directly_after_its_first_launch(gpu_like, monkeypatch):
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({fast_launch.NAME}))
    x, out = torch.randn(16), torch.empty(16)
    kernel, jit, compiled = toy_kernel({x.data_ptr(): x, out.data_ptr(): out})
    run_toy(kernel, x, out)
    assert len(jit.calls) == 1 and not compiled.direct  # the first: Triton's
    run_toy(kernel, x, out, scale=-3.0)  # a float's value is not specialized: the same kernel
    assert len(jit.calls) == 1 and len(compiled.direct) == 1
    grid, stream, function, packed, hooks, params = compiled.direct[0]
    assert grid == (12, 1, 1) and stream == 1234 and (function, packed) == (0xF00D, ("packed",))
    assert hooks == (None, None, None) and params == (x.data_ptr(), out.data_ptr(), 16, -3.0, None, None)
    torch.testing.assert_close(out, -3.0 * x)


@pytest.mark.parametrize("change", ["dtype", "misaligned", "size", "size_one", "flag", "config"])
def test_what_triton_specializes_is_in_the_key(gpu_like, monkeypatch, change):
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({fast_launch.NAME}))
    base = torch.randn(40)
    x, out = base[:16], torch.empty(16)
    tensors = {t.data_ptr(): t for t in (x, out, base[1:17], base.double()[:16], base[:1])}
    kernel, jit, compiled = toy_kernel(tensors)
    run_toy(kernel, x, out)
    other = dict(dtype=lambda: run_toy(kernel, base.double()[:16], out.double()),
                 misaligned=lambda: run_toy(kernel, base[1:17], out),  # 4 bytes off a 16-byte boundary
                 size=lambda: run_toy(kernel, x[:8], out[:8]),
                 size_one=lambda: run_toy(kernel, base[:1], out[:1]),  # Triton makes an int == 1 a constant
                 flag=lambda: run_toy(kernel, x, out, flag=True),
                 config=lambda: run_toy(kernel, x, out, block=8))
    other[change]()
    assert len(jit.calls) == 2 and not compiled.direct


def test_the_first_direct_launch_is_checked_against_triton_until_validated(gpu_like, monkeypatch):
    x, out = torch.randn(16), torch.empty(16)
    kernel, jit, compiled = toy_kernel({x.data_ptr(): x, out.data_ptr(): out}, monkeypatch=monkeypatch)
    run_toy(kernel, x, out)
    run_toy(kernel, x, out)  # checked: the direct launch, then Triton's from the same inputs
    assert len(jit.calls) == 2 and len(compiled.direct) == 1
    run_toy(kernel, x, out)  # agreed: direct from now on
    assert len(jit.calls) == 2 and len(compiled.direct) == 2


def test_a_direct_launch_that_disagrees_is_dropped_with_a_warning(gpu_like, monkeypatch):
    x, out = torch.randn(16), torch.empty(16)
    kernel, jit, compiled = toy_kernel({x.data_ptr(): x, out.data_ptr(): out}, wrong=True, monkeypatch=monkeypatch)
    run_toy(kernel, x, out)
    with pytest.warns(RuntimeWarning, match="direct launch disagreed"):
        run_toy(kernel, x, out)
    torch.testing.assert_close(out, 2.0 * x)  # Triton's result stands
    run_toy(kernel, x, out)
    assert len(jit.calls) == 3 and len(compiled.direct) == 1


def test_profiler_hooks_and_the_switch_keep_tritons_path(gpu_like, monkeypatch):
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({fast_launch.NAME}))
    x, out = torch.randn(16), torch.empty(16)
    kernel, jit, compiled = toy_kernel({x.data_ptr(): x, out.data_ptr(): out})
    run_toy(kernel, x, out)
    monkeypatch.setattr(fast_launch, "_hooks_active", lambda: True)
    run_toy(kernel, x, out)
    monkeypatch.setattr(fast_launch, "_hooks_active", lambda: False)
    monkeypatch.setattr(fast_launch, "ENABLED", False)
    run_toy(kernel, x, out)
    assert len(jit.calls) == 3 and not compiled.direct


def test_launches_it_cannot_reproduce_are_not_cached(gpu_like):
    cache = fast_launch.LaunchCache("toy", toy)
    x = torch.randn(4)
    compiled = FakeCompiled({})
    for args, kwargs in (((x, x, 4, 1.0), dict(FLAG=True, scale=2.0)),  # a runtime value by keyword
                         ((x, x, 4, 1.0, True), {}),  # a constexpr by position
                         ((x, x, 4), dict(FLAG=True))):  # a runtime parameter left out
        prepared = (("key", len(args), tuple(kwargs)), [], 0)
        cache.remember(prepared, compiled, args, kwargs, {})
    cache.remember((("hooked",), [], 0), compiled, (x, x, 4, 1.0), dict(FLAG=True), {}, pre_hook=print)
    assert cache.entries == {}
    assert cache.prepare((x, "text"), {}) is None  # a type Triton specializes otherwise


class AnyJit:
    """A launcher's ``kernel`` (and, with ``best_config``, its ``tuned``): Triton's launch of any kernel, returning
    a CompiledKernel whose direct launcher checks one slot per parameter, constexpr slots empty."""

    def __init__(self, kernel, best_config=None):
        self.compiled = SlotChecker(kernel.fast)
        self.best_config = best_config
        self.calls = 0

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls += 1
            return self.compiled
        return call


class SlotChecker(FakeCompiled):
    def __init__(self, cache):
        super().__init__({})
        self.cache = cache

    def _run(self, *launch_args):
        params = launch_args[9:]
        assert launch_args[6:9] == (None, None, None)
        assert len(params) == len(self.cache.param_names)
        for name, value in zip(self.cache.param_names, params):
            assert (value is None) if name in self.cache.constexpr else not isinstance(value, torch.Tensor), name
        self.direct.append(launch_args)


@pytest.mark.parametrize("op", ["linear", "linear_tma", "layer_norm", "attention", "layer_norm_linear"])
def test_the_library_launch_sites_are_cacheable(gpu_like, monkeypatch, op):
    """The real launch calls keep runtime values positional and constexprs by keyword, so each is relaunched
    directly with one slot per kernel parameter (the launcher protocol of triton 3.6 and 3.8)."""
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({fast_launch.NAME, "linear_tma", "attention_short"}))
    monkeypatch.setattr(linear_module, "use_descriptor_scratch", lambda: None)
    x = torch.randn(37, 64)
    w, b, g = torch.randn(48, 64), torch.randn(48), torch.randn(64)
    qkv = torch.randn(2, 37, 3 * 64)
    calls = dict(linear=lambda: linear_module.linear_launch(x, w, b, weight2=w, bias2=b),  # pointer engine: 2 blocks
                 linear_tma=lambda: linear_module.linear_launch(x, w, b),
                 layer_norm=lambda: ops.layer_norm(x, g, g, 1e-5),
                 attention=lambda: ops.attention(qkv, num_heads=4, layout="qkv h d", scaling="paper"),
                 layer_norm_linear=lambda: ops.layer_norm_linear(x, g, g, w, b, eps=1e-5))
    launchers = []
    for module_name in ("linear", "layer_norm", "attention", "layer_norm_linear"):
        module = importlib.import_module(f"vit_kernels.ops.{module_name}")
        launchers += [v for v in vars(module).values() if isinstance(v, launch.Kernel) and v not in launchers]
    fakes = []  # one per launcher (LINEAR and LINEAR_TMA share a name and a kernel)
    for kernel in launchers:
        monkeypatch.setattr(kernel, "fast", fast_launch.LaunchCache(kernel.name, kernel.kernel.fn))
        fakes.append(AnyJit(kernel, kernel.configs[0] if isinstance(kernel, launch.Tuned) else None))
        monkeypatch.setattr(kernel, "kernel", fakes[-1])
        if isinstance(kernel, launch.Tuned):
            monkeypatch.setattr(kernel, "tuned", fakes[-1])
    with torch.no_grad():
        calls[op]()
        assert not any(f.compiled.direct for f in fakes) and any(f.calls for f in fakes)
        calls[op]()
    assert any(f.compiled.direct for f in fakes), "the second launch was not direct"
    assert all(f.calls <= 1 for f in fakes), "a launch site went through Triton twice"


def test_the_check_leaves_the_callers_tensors_alone(gpu_like, monkeypatch):
    """The checked launch runs on private copies: an expanded input, an inference tensor and a tensor saved for
    backward are read, never written back (no in-place restore, no version bump)."""
    with torch.inference_mode():
        frozen = torch.randn(16)
    expanded = torch.randn(1).expand(16)
    for x in (expanded, frozen):
        out = torch.empty(16)
        kernel, _, compiled = toy_kernel({x.data_ptr(): x, out.data_ptr(): out}, monkeypatch=monkeypatch)
        version = None if x.is_inference() else x._version
        with torch.no_grad():
            for _ in range(3):
                run_toy(kernel, x, out)
        assert len(compiled.direct) == 2 and (x.is_inference() or x._version == version)
        torch.testing.assert_close(out, 2.0 * x)


def test_unspecialized_ints_are_keyed_by_their_type_only(gpu_like):
    class Param:
        def __init__(self, name, do_not_specialize=False):
            self.name, self.do_not_specialize = name, do_not_specialize

    class Jit:
        params = (Param("x_ptr"), Param("out_ptr"), Param("n", do_not_specialize=True), Param("scale"))

    cache = fast_launch.LaunchCache("toy", toy, Jit())
    x = torch.randn(4)
    key = [cache.prepare((x, x, seed, 1.0), dict(FLAG=True))[0] for seed in (5, 123456, 2**40, 2**63)]
    assert key[0] == key[1] and len(set(key)) == 3
    typed = [cache.prepare((x, x, 5, 1.0), dict(FLAG=flag))[0] for flag in (True, 1, 1.0)]
    assert len(set(typed)) == 3  # Triton compiles constexpr True, 1 and 1.0 apart
