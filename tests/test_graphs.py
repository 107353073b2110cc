"""The CUDA-graph runner (vit_kernels/models/graphs.py): buckets, padding, output ownership, keys, recapture,
refusals, on/off/restore/copies. On CPU a fake graph stands in for torch.cuda.CUDAGraph: it captures by
running the forward on the static inputs and replays by recomputing into the same static outputs, so every
aliasing mistake a real graph would expose shows here too. The GPU-marked tests capture real graphs."""
import contextlib
import copy
import pickle
import threading

import pytest
import torch
from frameworks import BUILDERS, TOL, timm_model
from torch import nn
from torch.utils import _pytree as pytree

import vit_kernels
from vit_kernels import ops
from vit_kernels.models import graphs


class FakeGraph:
    """torch.cuda.CUDAGraph's contract without CUDA: static outputs, overwritten in place by each replay."""

    captures = 0
    runs = 0

    def __init__(self, forward, inputs, spec, pool):
        self.forward, self.inputs, self.spec = forward, inputs, spec
        self.pdl = ops.pdl.enabled()  # captured as the PDL candidate
        for _ in range(graphs.WARMUP_RUNS):
            self.run()
        self.outputs = self.run()
        FakeGraph.captures += 1

    @staticmethod
    def new_pool():
        return object()

    def run(self):  # a replay runs what was captured: with PDL where the capture had it
        FakeGraph.runs += 1
        with ops.pdl.launches() if self.pdl else contextlib.nullcontext():
            return self.forward(*pytree.tree_unflatten(self.inputs, self.spec))

    def replay(self):
        pytree.tree_map(lambda static, new: static.copy_(new) if isinstance(static, torch.Tensor) else None,
                        self.outputs, self.run())
        return self.outputs


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors pass the runner's device check, and graphs are FakeGraphs."""
    monkeypatch.setattr(graphs, "_Graph", FakeGraph)
    monkeypatch.setattr(graphs, "_on_cuda", lambda t: True)
    monkeypatch.setattr(graphs, "WARMUP_RUNS", 1)
    FakeGraph.captures = 0
    return FakeGraph


class RowNet(nn.Module):
    """Rows never mix (as in a ViT): out[i] depends on x[i] only; a scale argument and a dict output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x, scale=1.0, as_dict=False):
        y = torch.tanh(self.fc(x.flatten(1))) * scale
        return {"logits": y, "sum": y.sum(-1)} if as_dict else y


def row_net():
    torch.manual_seed(0)
    return RowNet().eval()


def test_buckets_are_checked():
    assert graphs.check_buckets([8, 1, 8, 4]) == (1, 4, 8)
    for bad, error in ((4, TypeError), ("14", TypeError), ([1.5], TypeError), ([True], TypeError), ([], ValueError),
                       ([0, 4], ValueError)):
        with pytest.raises(error, match="buckets"):
            graphs.check_buckets(bad)
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        graphs.use_cuda_graphs(row_net(), "yes")


@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (64, 64), (65, 64), (1000, 64)])
def test_bucket_for(batch, bucket):
    assert graphs.bucket_for(batch, graphs.DEFAULT_BUCKETS) == bucket


def test_padded_batches_equal_eager_and_share_the_bucket_graph(fake_cuda):
    model = row_net()
    graphs.use_cuda_graphs(model, buckets=(1, 4, 16))
    with torch.no_grad():
        for batch in (3, 4, 2):  # one graph of bucket 4 serves all three
            x = torch.randn(batch, 5)
            out = model(x)
            assert out.shape == (batch, 3)
            torch.testing.assert_close(out, model.fc(x).tanh(), **TOL)
    assert fake_cuda.captures == 1
    assert next(iter(graphs.graph_runner(model).graphs))[0] == 4


def test_outputs_belong_to_the_caller(fake_cuda):
    model = graphs.use_cuda_graphs(row_net(), buckets=(4,))
    with torch.no_grad():
        first = model(torch.randn(4, 5))
        kept = first.clone()
        second = model(torch.randn(4, 5))  # a replay rewrites the graph's static output
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    (static,) = graphs.graph_runner(model).graphs.values()
    assert first.data_ptr() != static.outputs.data_ptr() and second.data_ptr() != static.outputs.data_ptr()


def test_a_batch_above_the_largest_bucket_runs_in_chunks(fake_cuda):
    model = graphs.use_cuda_graphs(row_net(), buckets=(1, 8, 64))
    x = torch.randn(70, 5)
    with torch.no_grad():
        out = model(x, as_dict=True)
    torch.testing.assert_close(out["logits"], model.fc(x).tanh(), **TOL)
    torch.testing.assert_close(out["sum"], model.fc(x).tanh().sum(-1), **TOL)
    assert sorted(key[0] for key in graphs.graph_runner(model).graphs) == [8, 64]  # 64 rows, then 6 in bucket 8


def test_the_key_holds_shapes_dtypes_and_arguments(fake_cuda):
    model = graphs.use_cuda_graphs(row_net(), buckets=(4,))
    x = torch.randn(2, 5)
    with torch.no_grad():
        model(x)
        model(torch.randn(3, 5))  # same key
        assert fake_cuda.captures == 1
        torch.testing.assert_close(model(x, scale=-3.0), -3.0 * model.fc(x).tanh(), **TOL)  # another argument
        torch.testing.assert_close(model(x.view(2, 1, 5)), model.fc(x).tanh(), **TOL)  # another shape
        assert fake_cuda.captures == 3
        model.double()  # parameters moved: every graph dropped; then another dtype
        torch.testing.assert_close(model(x.double()), model.fc(x.double()).tanh(), **TOL)
        assert fake_cuda.captures == 4 and len(graphs.graph_runner(model).graphs) == 1
        with pytest.raises(TypeError, match="hashable"):
            model(x.double(), scale={1.0})  # a set: not a pytree node, not hashable


def test_the_key_holds_inference_mode_backend_and_folding(fake_cuda):
    """Static buffers made under inference_mode cannot be written outside it, and the backend pin or LayerNorm
    folding change what a forward launches: each is its own graph."""
    model = graphs.use_cuda_graphs(row_net(), buckets=(4,))
    x = torch.randn(3, 5)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(x).tanh(), **TOL)
        with ops.use_backend("torch"):
            model(x)
        with vit_kernels.layer_norm_folding(False):
            model(x)
    assert fake_cuda.captures == 4


def test_attention_maps_run_the_forward_eagerly(fake_cuda):
    model = vit_kernels.accelerate(BUILDERS["tutorial"](), cuda_graphs=True, graph_buckets=(4,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ops.use_backend("torch"):
        out, maps = vit_kernels.attention_maps(model, x)
    assert out.shape[0] == 2 and len(maps) == 2 and maps[0].shape[0] == 2 and fake_cuda.captures == 0


def test_replaced_parameters_recapture_in_place_writes_do_not(fake_cuda):
    model = graphs.use_cuda_graphs(row_net(), buckets=(4,))
    x = torch.randn(3, 5)
    with torch.no_grad():
        model(x)
        model.fc.weight.mul_(2)  # same storage: the graph sees it
        torch.testing.assert_close(model(x), model.fc(x).tanh(), **TOL)
        assert fake_cuda.captures == 1
        model.fc.weight = nn.Parameter(torch.randn(3, 5))  # new storage: graphs dropped, captured again
        torch.testing.assert_close(model(x), model.fc(x).tanh(), **TOL)
        assert fake_cuda.captures == 2 and len(graphs.graph_runner(model).graphs) == 1


def test_refusals_name_the_fix(fake_cuda, monkeypatch):
    model = graphs.use_cuda_graphs(row_net())
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"autograd.*no_grad"):
        model(x)  # parameters require grad and grad mode is on
    with torch.no_grad():
        with pytest.raises(ValueError, match="leading batch axis"):
            model(x, scale=torch.randn(3))
        with pytest.raises(ValueError, match="at least one tensor"):
            model.forward(scale=2.0, x=None)
        model.train()
        with pytest.raises(RuntimeError, match=r"model\.eval"):
            model(x)
        model.eval()
        monkeypatch.setattr(graphs, "_on_cuda", lambda t: False)
        with pytest.raises(RuntimeError, match="CUDA device"):
            model(x)
    assert fake_cuda.captures == 0


def test_on_off_restore_and_copies(fake_cuda):
    """The runner's plumbing on an accelerated model (its math in PyTorch here: the kernels are tested elsewhere)."""
    model = BUILDERS["tutorial"]()
    eager = copy.deepcopy(model)
    vit_kernels.accelerate(model, cuda_graphs=True, graph_buckets=(4,))
    vit_kernels.accelerate(eager)
    runner = graphs.graph_runner(model)
    assert runner.buckets == (4,) and vit_kernels.is_accelerated(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode(), ops.use_backend("torch"):
        torch.testing.assert_close(model(x), eager(x), **TOL)
    assert fake_cuda.captures == 1
    clone = copy.deepcopy(model)
    assert graphs.graph_runner(clone).buckets == (4,) and not graphs.graph_runner(clone).graphs
    assert graphs.graph_runner(pickle.loads(pickle.dumps(model))).buckets == (4,)
    assert clone.forward.module is clone  # the copy's graphed forward serves the copy
    vit_kernels.accelerate(model)  # cuda_graphs=False: off, still fused
    assert graphs.graph_runner(model) is None and vit_kernels.is_accelerated(model)
    vit_kernels.accelerate(model, cuda_graphs=True)
    vit_kernels.restore(model)
    assert graphs.graph_runner(model) is None and "forward" not in model.__dict__
    assert not vit_kernels.is_accelerated(model)


@pytest.mark.parametrize("framework", ["timm", "hf_classifier"])
def test_framework_models_through_the_runner(fake_cuda, framework):
    """timm's tensor output and Hugging Face's ModelOutput come back with the real batch, equal to eager."""
    model = timm_model() if framework == "timm" else BUILDERS[framework]()
    eager = vit_kernels.accelerate(copy.deepcopy(model))
    if framework == "timm":
        vit_kernels.from_timm(model, cuda_graphs=True, graph_buckets=(2, 4))
    else:
        vit_kernels.accelerate(model, cuda_graphs=True, graph_buckets=(2, 4))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), ops.use_backend("torch"):
        ours, theirs = model(x), eager(x)
    if framework == "hf_classifier":
        ours, theirs = ours.logits, theirs.logits
    assert ours.shape[0] == 3
    torch.testing.assert_close(ours, theirs, **TOL)


def test_threads_get_their_own_results(fake_cuda):
    model = graphs.use_cuda_graphs(row_net(), buckets=(2, 8))
    inputs = [torch.randn(1 + i % 5, 5) for i in range(12)]
    results = [None] * len(inputs)

    def serve(i):
        with torch.no_grad():
            results[i] = model(inputs[i])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, out in zip(inputs, results):
        torch.testing.assert_close(out, model.fc(x).tanh(), **TOL)


class PdlSensitiveNet(RowNet):
    """A forward whose PDL capture computes something else: what a wrong PDL kernel would look like."""

    def forward(self, x, scale=1.0, as_dict=False):
        return super().forward(x, scale, as_dict) + (1.0 if ops.pdl.enabled() else 0.0)


class StaleWhenPdl(RowNet):
    """A PDL forward returning the previous call's result: what a kernel reading its input before the previous
    kernel wrote it would see."""

    last = None

    def forward(self, x, scale=1.0, as_dict=False):
        y = super().forward(x, scale, as_dict)
        if not ops.pdl.enabled():
            return y
        previous, self.last = self.last, y.clone()
        return y if previous is None else previous


class FailsWithPdl(RowNet):
    def forward(self, x, scale=1.0, as_dict=False):
        if ops.pdl.enabled():
            raise RuntimeError("operation not permitted when stream is capturing")
        return super().forward(x, scale, as_dict)


@pytest.fixture
def pdl_candidates(fake_cuda, monkeypatch):
    """PDL "available" (the fake graphs' forwards hold no GEMM launches) and a timer that reads each graph's
    ``ms`` (set by the test per kind: PDL or plain)."""
    ms = {True: 1.0, False: 2.0}
    monkeypatch.setattr(ops.pdl, "available", lambda device: True)
    monkeypatch.setattr(ops.guard, "time_ms", lambda replay: ms[replay.__self__.pdl])
    return ms


@pytest.mark.parametrize("pdl_faster", [True, False])
def test_the_faster_of_the_pdl_and_plain_graphs_is_kept(pdl_candidates, pdl_faster):
    pdl_candidates[True] = 1.0 if pdl_faster else 3.0
    model = graphs.use_cuda_graphs(row_net(), buckets=(4,))
    x = torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(x).tanh(), **TOL)
        model(x)
    runner = graphs.graph_runner(model)
    assert FakeGraph.captures == 2  # plain + PDL, once per key
    ((key, graph),) = runner.graphs.items()
    assert graph.pdl == pdl_faster
    assert runner.pdl_verdicts == {key: (pdl_faster, 2.0, pdl_candidates[True])}
    model.double()  # recapture: the verdicts go with the graphs
    with torch.no_grad():
        model(x.double())
    assert len(runner.pdl_verdicts) == 1 and FakeGraph.captures == 4


def test_a_pdl_graph_that_disagrees_is_dropped_until_validated(pdl_candidates, monkeypatch):
    torch.manual_seed(0)
    model = graphs.use_cuda_graphs(PdlSensitiveNet().eval(), buckets=(4,))
    x = torch.randn(2, 5)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="programmatic dependent launch disagreed"):
        out = model(x)
    torch.testing.assert_close(out, model.fc(x).tanh(), **TOL)  # the plain graph, though PDL "is faster"
    assert list(graphs.graph_runner(model).pdl_verdicts.values()) == [(False, None, None)]
    monkeypatch.setattr(ops.guard, "VALIDATED_ON_GPU", frozenset({ops.pdl.NAME}))
    model = graphs.use_cuda_graphs(PdlSensitiveNet().eval(), buckets=(4,))
    with torch.no_grad():  # validated: timed only, so this (wrong) candidate would win: the check is what guards
        torch.testing.assert_close(model(x), model.fc(x).tanh() + 1.0, **TOL)


def test_a_pdl_graph_reading_stale_inputs_is_caught(pdl_candidates):
    """Its outputs are compared after a replay on other inputs: the same inputs twice would hide a stale read."""
    torch.manual_seed(0)
    model = graphs.use_cuda_graphs(StaleWhenPdl().eval(), buckets=(4,))
    x = torch.randn(3, 5)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="disagreed"):
        torch.testing.assert_close(model(x), model.fc(x).tanh(), **TOL)


def test_a_failing_pdl_capture_leaves_the_plain_graph(pdl_candidates):
    torch.manual_seed(0)
    model = graphs.use_cuda_graphs(FailsWithPdl().eval(), buckets=(4,))
    x = torch.randn(3, 5)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="failed .*RuntimeError: operation not permitted"):
            model(x)
        torch.testing.assert_close(model(x), model.fc(x).tanh(), **TOL)  # served, without another capture
    assert FakeGraph.captures == 1 and list(graphs.graph_runner(model).pdl_verdicts.values()) == [(False, None, None)]


def test_the_plain_graph_is_plain_inside_a_callers_pdl_block(pdl_candidates):
    model = graphs.use_cuda_graphs(row_net(), buckets=(4,))
    pdl_candidates[True] = 1.99  # faster, but not by the margin
    with torch.no_grad(), ops.pdl.launches():
        model(torch.randn(2, 5))
    runner = graphs.graph_runner(model)
    ((graph, verdict),) = zip(runner.graphs.values(), runner.pdl_verdicts.values())
    assert not graph.pdl and verdict == (False, 2.0, 1.99)


def test_no_pdl_candidate_where_it_is_unavailable(fake_cuda, monkeypatch):
    monkeypatch.setattr(ops.pdl, "available", lambda device: False)
    model = graphs.use_cuda_graphs(PdlSensitiveNet().eval(), buckets=(4,))
    with torch.no_grad():
        model(torch.randn(2, 5))
    assert FakeGraph.captures == 1 and not graphs.graph_runner(model).pdl_verdicts


LOW_TOL = dict(rtol=2e-2, atol=2e-2)  # another batch may pick other tiles: 16-bit rounding differs, not the math


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_graphs_replay_the_eager_forward(dtype):
    model = timm_model().to("cuda", dtype)
    eager = vit_kernels.accelerate(copy.deepcopy(model))
    vit_kernels.from_timm(model, cuda_graphs=True, graph_buckets=(1, 4, 8))
    tol = TOL if dtype == torch.float32 else LOW_TOL
    with torch.inference_mode():
        for batch in (1, 3, 8, 11):  # 11: a replay of bucket 8, then one of bucket 4
            x = torch.randn(batch, 3, 32, 32, device="cuda", dtype=dtype)
            torch.testing.assert_close(model(x), eager(x), **tol)
        assert sorted(key[0] for key in graphs.graph_runner(model).graphs) == [1, 4, 8]
        x, y = (torch.randn(2, 3, 32, 32, device="cuda", dtype=dtype) for _ in range(2))
        first = model(x)
        kept = first.clone()
        model(y)
        torch.testing.assert_close(first, kept, rtol=0, atol=0)  # the caller's output, not the static buffer
        for m in (model, eager):
            m.head.weight.mul_(-1.5)  # in place: seen by the next replay without a capture
        torch.testing.assert_close(model(x), eager(x), **tol)
        for m in (model, eager):
            m.half()  # moved: captured again
        torch.testing.assert_close(model(x.half()), eager(x.half()), **LOW_TOL)
        assert len(graphs.graph_runner(model).graphs) == 1
        with pytest.raises(RuntimeError, match="CUDA device"):
            model(x.cpu())
    with pytest.raises(RuntimeError, match="autograd"):
        model(x.half())


@pytest.mark.gpu
def test_real_graphs_of_a_hugging_face_model():
    model = BUILDERS["hf_classifier"]().cuda()
    eager = vit_kernels.accelerate(copy.deepcopy(model))
    vit_kernels.accelerate(model, cuda_graphs=True)
    x = torch.randn(5, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, eager(pixel_values=x).logits, **TOL)
