"""Programmatic dependent launch (vit_kernels/ops/pdl.py): when the GEMMs ask for it, with which variant, where
it is never used; on an sm_90 GPU, PDL launches (eager and captured) equal the plain ones bit for bit. The
graph runner's choice between the PDL and plain graphs is tested in test_graphs.py; that the PDL variants
compile for sm_90 only, wait with griddepcontrol and prefetch into L2, in test_compile.py."""
import copy
import importlib
import threading

import pytest
import torch
from frameworks import timm_model

import vit_kernels
from vit_kernels import ops
from vit_kernels.models import graphs
from vit_kernels.ops import pdl, plans

linear_module = importlib.import_module("vit_kernels.ops.linear")


def test_gemm_options_only_inside_launches(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setattr(pdl, "available", lambda device: True)
    assert pdl.gemm_options(x, prefetch=True) == {}
    with pdl.launches():
        assert pdl.gemm_options(x, prefetch=True) == {"PDL": 2, "launch_pdl": True}
        assert pdl.gemm_options(x, prefetch=False) == {"PDL": 1, "launch_pdl": True}
        with pdl.launches():
            pass
        assert pdl.enabled()  # a nested block leaves it on
        seen = []
        thread = threading.Thread(target=lambda: seen.append(pdl.enabled()))
        thread.start()
        thread.join()
        assert seen == [False]  # another thread's launches are its own
    assert not pdl.enabled()


def test_never_available_off_sm90_in_the_interpreter_or_turned_off(monkeypatch):
    assert not pdl.available(torch.device("cpu"))
    monkeypatch.setattr(pdl, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert not pdl.available(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert pdl.available(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.available(torch.device("cuda", 0))


def test_pdl_configs_exist_only_from_sm90():
    for launcher in (linear_module.LINEAR, linear_module.LINEAR_TMA, linear_module.LINEAR_GLU):
        assert launcher.configs_for({"PDL": 1}, arch=80) == []
        assert launcher.configs_for({"PDL": 1}, arch=90) == launcher.configs_for({}, arch=90)


@pytest.fixture
def launched(monkeypatch):
    """The PDL arguments each GEMM launch got (then launched without them: the interpreter has no PDL)."""
    monkeypatch.setattr(pdl, "available", lambda device: True)
    calls = []
    for name in ("LINEAR", "LINEAR_TMA", "LINEAR_GLU"):
        launcher = getattr(linear_module, name)

        def launch(grid, *args, original=launcher.launch, **kwargs):
            calls.append({k: kwargs.pop(k) for k in ("PDL", "launch_pdl") if k in kwargs})
            return original(grid, *args, **kwargs)
        monkeypatch.setattr(launcher, "launch", launch)
    return calls


def test_gemms_ask_for_pdl_inside_launches_only(launched):
    x, w, b = torch.randn(5, 16), torch.randn(24, 16), torch.randn(24)
    blocks = [torch.randn(8, 16) for _ in range(3)]
    with torch.no_grad():
        expected = ops.linear(x, w, b, activation="gelu")
        with pdl.launches():
            got = ops.linear(x, w, b, activation="gelu")  # one weight block: the weight prefetch
            ops.linear(x, blocks, [torch.randn(8) for _ in blocks])  # Hugging Face's q/k/v: wait only
            ops.linear(x, blocks[:2], activation="swiglu")
    assert launched == [{}, {"PDL": 2, "launch_pdl": True}, {"PDL": 1, "launch_pdl": True},
                        {"PDL": 1, "launch_pdl": True}]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_launch_plans_key_on_pdl(monkeypatch):
    monkeypatch.setattr(plans.fast_launch, "_current_device", lambda: 0)
    x = torch.randn(2, 3)
    outside = plans.call_key((x,), {}, [])
    with pdl.launches():
        assert plans.call_key((x,), {}, []) != outside


def sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [197, 64 * 197])
def test_pdl_gemms_equal_plain_ones_bit_for_bit(tokens):
    if not sm90():
        pytest.skip("programmatic dependent launch needs sm_90")
    torch.manual_seed(0)
    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x, w1, b1, w2, b2, scale = r(tokens, 768), r(3072, 768), r(3072), r(768, 3072), r(768), r(768)
    qkv = [r(768, 768) for _ in range(3)]

    def block():  # fc1 -> fc2 with layer scale and residual -> q/k/v blocks -> swiglu: each kind of PDL GEMM
        h = ops.linear(x, w1, b1, activation="gelu")
        y = ops.linear(h, w2, b2, scale=scale, residual=x)
        return h, y, ops.linear(y, qkv, [b2] * 3), ops.linear(y, qkv[:2], activation="swiglu")

    with torch.inference_mode():
        expected = block()
        with pdl.launches():
            eager = block()
            block()  # warm: the captured launches are the direct ones
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = block()
        graph.replay()
        torch.cuda.synchronize()
    for e, got, replayed in zip(expected, eager, captured):
        torch.testing.assert_close(got, e, rtol=0, atol=0)
        torch.testing.assert_close(replayed, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_the_graph_runner_times_pdl_on_sm90(monkeypatch):
    if not sm90():
        pytest.skip("programmatic dependent launch needs sm_90")
    asked = []
    options = pdl.gemm_options
    monkeypatch.setattr(pdl, "gemm_options", lambda *a, **k: asked.append(options(*a, **k)) or asked[-1])
    model = timm_model().to("cuda", torch.bfloat16)
    eager = vit_kernels.accelerate(copy.deepcopy(model))
    vit_kernels.from_timm(model, cuda_graphs=True, graph_buckets=(2,))
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager(x), rtol=2e-2, atol=2e-2)
    ((kept, without, with_),) = graphs.graph_runner(model).pdl_verdicts.values()
    assert without > 0 and with_ > 0 and kept == (with_ < graphs.PDL_MARGIN * without)
    # the candidate's GEMMs were PDL launches (with the prefetch: timm's blocks are one weight block each)
    assert {"PDL": 2, "launch_pdl": True} in asked and {} in asked
