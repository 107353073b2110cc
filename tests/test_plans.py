"""Launch plans (vit_kernels/ops/plans.py) without a GPU: the launchers take their GPU branch with Triton's runtime
faked (tests/test_fast_launch.py's fakes: every direct launch recorded, one slot per kernel parameter). A
replayed call must make exactly the launches the op itself makes for the same new inputs — same kernels, same
grids, same values, the same input addresses and its own fresh outputs — and return the same views."""
import importlib

import pytest
import torch
from frameworks import timm_model
from test_fast_launch import AnyJit

import vit_kernels
from vit_kernels import ops
from vit_kernels.ops import fast_launch, guard, launch, plans

linear_module = importlib.import_module("vit_kernels.ops.linear")
OP_MODULES = ("linear", "layer_norm", "attention", "layer_norm_linear", "patch_embed", "head", "latent_attention")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every launcher on its GPU branch, Triton faked; returns the list of direct launches (in order)."""
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(fast_launch, "ENABLED", True)
    monkeypatch.setattr(fast_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(fast_launch, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({fast_launch.NAME, "linear_tma", "attention_short"}))
    monkeypatch.setattr(linear_module, "use_descriptor_scratch", lambda: None)
    direct = []
    seen = []
    for name in OP_MODULES:
        module = importlib.import_module(f"vit_kernels.ops.{name}")
        for value in vars(module).values():
            if isinstance(value, launch.Kernel) and value not in seen:
                seen.append(value)
                monkeypatch.setattr(value, "fast", fast_launch.LaunchCache(value.name, value.kernel.fn))
                fake = AnyJit(value, value.configs[0] if isinstance(value, launch.Tuned) else None)
                fake.compiled.direct = direct
                monkeypatch.setattr(value, "kernel", fake)
                if isinstance(value, launch.Tuned):
                    monkeypatch.setattr(value, "tuned", fake)
    planned = [getattr(ops, name) for name in dir(ops) if hasattr(getattr(ops, name), "plans")]
    for op in planned:
        op.plans.clear()
    yield direct
    for op in planned:  # their kernels were fakes
        op.plans.clear()


def normalized(launches, inputs):
    """Each launch with its addresses named: (input i, byte offset) or the k-th new address of the call."""
    fresh: dict = {}
    out = []
    for launch_args in launches:
        values = []
        for v in launch_args[9:]:
            if type(v) is int and v > 1 << 20:  # an address (sizes and strides are small here)
                owner = next(((i, v - t.data_ptr()) for i, t in enumerate(inputs)
                              if t.data_ptr() <= v < t.data_ptr() + max(t.numel() * t.element_size(), 1)), None)
                v = ("in", *owner) if owner else ("new", fresh.setdefault(v, len(fresh)))
            values.append(v)
        out.append((launch_args[:3], tuple(values)))
    return out


def run(direct, fn, inputs):
    start = len(direct)
    result = fn(*inputs)
    return result, normalized(direct[start:], inputs)


def structure(result):
    if isinstance(result, tuple):
        return tuple(structure(r) for r in result)
    return None if result is None else (tuple(result.shape), result.stride(), result.dtype)


def randn(*shapes):
    return lambda: tuple(torch.randn(*shape) for shape in shapes)


CALLS = {  # name: (the op, a call of it, its inputs)
    "linear": ("linear", lambda x, w, b: ops.linear(x, w, b, activation="gelu"), randn((2, 37, 64), (48, 64), (48,))),
    "linear_residual_stats": ("linear", lambda x, w, b, r: ops.linear(x, w, b, residual=r, norm_stats=True),
                              randn((37, 48), (48, 48), (48,), (37, 48))),
    "qkv_blocks": ("linear", lambda x, a, b, c: ops.linear(x, (a, b, c)),
                   randn((37, 64), (16, 64), (16, 64), (16, 64))),
    "layer_norm": ("layer_norm", lambda x, g, b: ops.layer_norm(x, g, b, 1e-6), randn((5, 37, 48), (48,), (48,))),
    "layer_norm_linear": ("layer_norm_linear", lambda x, g, b, w, c: ops.layer_norm_linear(x, g, b, w, c, eps=1e-6),
                          randn((37, 64), (64,), (64,), (48, 64), (48,))),
    "attention": ("attention", lambda qkv: ops.attention(qkv, num_heads=4, layout="qkv h d", scaling="paper"),
                  randn((2, 37, 3 * 64))),
    "patch_embed": ("patch_embed", lambda img, w, b, cls, pos: ops.patch_embed(img, w, b, cls, pos),
                    randn((2, 3, 32, 32), (48, 3, 8, 8), (48,), (1, 48), (17, 48))),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_replayed_call_makes_the_ops_own_launches(fake_gpu, name, monkeypatch):
    op, fn, make = CALLS[name]
    first = make()
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS):
            fn(*first)
        (plan,) = getattr(ops, op).plans.values()
        assert isinstance(plan, plans.Plan), plan
        new = make()
        replayed, replay_launches = run(fake_gpu, fn, new)
        monkeypatch.setattr(plans, "ENABLED", False)
        expected, own_launches = run(fake_gpu, fn, new)
    assert replay_launches == own_launches and replay_launches
    assert structure(replayed) == structure(expected)


def test_the_key_holds_shapes_aliasing_and_grad(fake_gpu):
    x, w, b, r = torch.randn(37, 48), torch.randn(48, 48), torch.randn(48), torch.randn(37, 48)
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS):
            ops.linear(x, w, b, residual=x)  # the residual is x itself
        assert sum(isinstance(p, plans.Plan) for p in ops.linear.plans.values()) == 1
        _, own = run(fake_gpu, lambda *t: ops.linear(t[0], t[1], t[2], residual=t[3]), (x, w, b, r))
    assert own[0][1].count(("in", 3, 0)) == 1  # another residual: another key, its own address
    x.requires_grad_(True)
    before = dict(ops.linear.plans)
    ops.linear(x, w, b, residual=r)  # autograd: the custom op, never a plan
    assert ops.linear.plans == before


def test_equal_values_of_other_types_are_other_keys(fake_gpu):
    """norm_stats=1 is not norm_stats=True: the op's own check must see it (a TypeError), not a replay."""
    x, w, b = torch.randn(37, 48), torch.randn(48, 48), torch.randn(48)
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS + 1):
            ops.linear(x, w, b, norm_stats=True)
        with pytest.raises(TypeError, match="norm_stats must be a bool"):
            ops.linear(x, w, b, norm_stats=1)


def test_a_planned_op_inside_a_recorded_one_records_its_launches(fake_gpu, monkeypatch):
    x, g, b = torch.randn(37, 48), torch.randn(48), torch.randn(48)
    twice = plans.planned(lambda x, g, b: ops.layer_norm(ops.layer_norm(x, g, b, 1e-6), g, b, 1e-6))
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS + 1):
            ops.layer_norm(x, g, b, 1e-6)  # the inner op has its plan before the outer one records
        for _ in range(plans.ATTEMPTS):
            twice(x, g, b)
        assert any(isinstance(p, plans.Plan) for p in twice.plans.values())
        _, replayed = run(fake_gpu, twice, (x, g, b))
        monkeypatch.setattr(plans, "ENABLED", False)
        _, own = run(fake_gpu, twice, (x, g, b))
    assert len(replayed) == len(own) == 2 and [grid for grid, _ in replayed] == [grid for grid, _ in own]


class Marked(torch.Tensor):
    """A tensor subclass (as DTensor or a fake tensor would be): never keyed, always the op's own path."""


def test_tensor_subclasses_are_never_planned(fake_gpu):
    x = torch.randn(37, 48).as_subclass(Marked)
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS + 1):
            ops.layer_norm(x, None, None, 1e-6)
    assert not ops.layer_norm.plans


def test_calls_that_do_other_tensor_work_are_never_planned(fake_gpu):
    """attention with a mask pads it with PyTorch first: that call cannot be a plan of launches alone."""
    qkv, mask = torch.randn(2, 37, 3 * 64), torch.rand(2, 1, 37, 37) > 0.3
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS + 2):
            ops.attention(qkv, num_heads=4, layout="qkv h d", scaling="paper", mask=mask)
    assert list(ops.attention.plans.values()) == [plans._UNPLANNED]


def test_a_whole_forward_replays_the_same_launches(fake_gpu, monkeypatch):
    """The same kernels, grids, sizes, input and parameter addresses as the model's own forward (addresses of
    memory the forward allocates are not compared here: the caching allocator places them differently when a
    plan allocates an op's outputs together; the per-op tests above map them exactly)."""
    model = vit_kernels.accelerate(timm_model())
    x = torch.randn(2, 3, 32, 32)
    named = (x, *model.parameters())

    def run_forward():
        start = len(fake_gpu)
        model(x)
        return [(grid, tuple(("new",) if isinstance(v, tuple) and v[0] == "new" else v for v in values))
                for grid, values in normalized(fake_gpu[start:], named)]

    with torch.no_grad():
        for _ in range(plans.ATTEMPTS + 1):
            model(x)
        ops.reset_launch_counts()
        replayed = run_forward()
        counts = ops.launch_counts()
        monkeypatch.setattr(plans, "ENABLED", False)
        ops.reset_launch_counts()
        own = run_forward()
    assert replayed == own and counts == ops.launch_counts()
    planned = {op for op in ("layer_norm_linear", "attention", "linear", "patch_embed", "layer_norm", "pool_tokens")
               if any(isinstance(p, plans.Plan) for p in getattr(ops, op).plans.values())}
    assert {"layer_norm_linear", "attention", "linear", "patch_embed"} <= planned


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_forwards_equal_tritons_own_launches_on_gpu(dtype, monkeypatch):
    """Plans and direct launches against Triton's launch path: the same kernels, so the same bits."""
    model = vit_kernels.accelerate(timm_model().to("cuda", dtype))
    xs = [torch.randn(3, 3, 32, 32, device="cuda", dtype=dtype) for _ in range(3)]
    with torch.no_grad():
        for _ in range(plans.ATTEMPTS + 1):
            model(xs[0])
        replayed = [model(x) for x in xs]
        assert any(isinstance(p, plans.Plan) for p in ops.linear.plans.values())
        monkeypatch.setattr(plans, "ENABLED", False)
        monkeypatch.setattr(fast_launch, "ENABLED", False)
        own = [model(x) for x in xs]
    for ours, theirs in zip(replayed, own):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
