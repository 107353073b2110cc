"""ops.mlp: a block's MLP whose backward applies fc1's activation gradient inside fc2's dgrad GEMM
(``_activation_dgrad_kernel``). Values and every gradient against fp64 (fp16: within 2x PyTorch's own error) on
odd shapes, every activation, with and without the LayerNorm; dropout masks against the two ops' own; launch
counts; the fused models' training path; bad inputs."""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops import guard
from vit_kernels.ops.dropout import new_seed

from helpers import DTYPES, assert_matches

M = importlib.import_module("vit_kernels.ops.mlp")
L = importlib.import_module("vit_kernels.ops.linear")
LNL = importlib.import_module("vit_kernels.ops.layer_norm_linear")
E, H = 20, 36


@pytest.fixture(autouse=True)
def new_paths_win(monkeypatch):
    """On a GPU guard.choose times the new path first: this timer makes it the faster, so the tests (their launch
    counts included) exercise the fused kernels whatever the card's timing says (off the GPU they always run)."""
    ticks = itertools.count()
    monkeypatch.setattr(guard, "time_ms", lambda fn: (fn(), next(ticks))[1])
    guard.reset()
    yield
    guard.reset()


def leaves(device, dtype, norm=True, bias=True, scale=True, samples=2):
    g = torch.Generator().manual_seed(7)

    def r(*shape, std=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * std + shift).to(device, dtype).requires_grad_()

    t = dict(x=r(samples, 7, E, std=2.0, shift=1.0), fc1_weight=r(H, E, std=E ** -0.5),
             fc1_bias=r(H) if bias else None, fc2_weight=r(E, H, std=H ** -0.5), fc2_bias=r(E) if bias else None,
             scale=r(E) if scale else None, residual=r(samples, 7, E))
    if norm:
        t.update(norm_weight=r(E, shift=1.0), norm_bias=r(E))
    return t


def reference(t, activation, eps, branch_scale=None):
    """The MLP in PyTorch ops on t's tensors (whatever their dtype)."""
    x = t["x"] if eps is None else F.layer_norm(t["x"], (E,), t.get("norm_weight"), t.get("norm_bias"), eps)
    h = L.activate(F.linear(x, t["fc1_weight"], t["fc1_bias"]), activation)
    y = F.linear(h, t["fc2_weight"], t["fc2_bias"])
    if t["scale"] is not None:
        y = y * t["scale"]
    if branch_scale is not None:
        y = y * branch_scale[:, None, None].to(y.dtype)
    return y + t["residual"]


def grads(y, t, dy):
    names = [k for k, v in t.items() if v is not None]
    return dict(zip(names, torch.autograd.grad(y, [t[k] for k in names], dy)))


def as_double(t):
    return {k: None if v is None else v.detach().double().requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, norm, stats, bias, scale", [
    ("gelu", True, True, True, True), ("gelu_tanh", True, False, True, False),
    ("quick_gelu", False, False, False, True), ("silu", True, False, False, False)])
def test_values_and_gradients_match_fp64(device, dtype, activation, norm, stats, bias, scale):
    t = leaves(device, dtype, norm, bias, scale)
    eps = 1e-5 if norm else None
    branch = torch.tensor([0.0, 1.6], device=device)  # stochastic depth: one sample dropped, one kept
    kw = dict(activation=activation, scale=t["scale"], residual=t["residual"], branch_scale=branch)
    if norm:
        x2 = t["x"].detach().reshape(-1, E)
        kw.update(norm_weight=t["norm_weight"], norm_bias=t["norm_bias"], eps=eps,
                  stats=L.chunk_stats(x2) if stats else None)
    ops.reset_launch_counts()
    y = ops.mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], **kw)
    assert ops.launch_counts() == ({"layer_norm_linear": 1, "linear": 1} if norm else {"linear": 2})
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    ops.reset_launch_counts()
    ours = grads(y, t, dy)
    launched = ops.launch_counts()
    # fc2's stochastic-depth pass, and no separate pass for fc1's activation gradient
    assert launched.get("mlp_dgrad") == 1 and launched.get("linear_grad") == 1
    t64 = as_double(t)
    y64 = reference(t64, activation, eps, branch.double())
    expected = grads(y64, t64, dy.double())
    lowp = grads(y_lowp := reference(t, activation, eps, branch), t, dy)
    assert_matches(y, y_lowp, y64, name="output")
    for k in expected:
        assert_matches(ours[k], lowp[k], expected[k], name=f"d{k}")


@pytest.mark.parametrize("hidden_dropout, dropout", [(0.3, 0.0), (0.0, 0.25), (0.2, 0.4)])
def test_dropout_masks_are_the_two_ops_own(device, hidden_dropout, dropout):
    """With the same seeds, ops.mlp's output is the two ops' (fc1 saving its pre-activation, then fc2), bit for
    bit, and its gradients theirs: backward regenerated both masks."""
    t = leaves(device, torch.float32, norm=True)
    hidden_seed, seed = new_seed(), new_seed()
    args = (t["x"], t["norm_weight"], t["norm_bias"], 1e-6, None, t["fc1_weight"], t["fc1_bias"], "gelu",
            hidden_dropout, hidden_seed if hidden_dropout else None, t["fc2_weight"], t["fc2_bias"], t["scale"],
            t["residual"], dropout, seed if dropout else None, None)
    y = M.mlp_op(*args)[0]
    h = LNL.layer_norm_linear_saving_pre_op(t["x"], t["norm_weight"], t["norm_bias"], 1e-6, None, t["fc1_weight"],
                                            t["fc1_bias"], "gelu", None, None, 1, hidden_dropout,
                                            hidden_seed if hidden_dropout else None, None, None, None, None, None)[0]
    y2 = L.linear_op(h, t["fc2_weight"], t["fc2_bias"], None, t["scale"], t["residual"], 1, dropout,
                     seed if dropout else None)
    assert torch.equal(y, y2)
    dy = torch.randn_like(y)
    ours, theirs = grads(y, t, dy), grads(y2, t, dy)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", M.MLP_ACTIVATIONS)
@pytest.mark.parametrize("rows, k, n, dropout, needs_dbias", [
    (37, 24, 50, 0.0, True), (70, 40, 33, 0.3, True), (5, 16, 8, 0.5, False), (16, 100, 64, 0.0, True)])
def test_dgrad_kernel_equals_the_composition(device, dtype, activation, rows, k, n, dropout, needs_dbias):
    """(g @ W) * mask * act'(pre) and its column sums: the kernel against cuBLAS's GEMM + the gradient epilogue
    (the path guard.choose times it against), across tile and partial-row edges; fp16 against fp64."""
    gen = torch.Generator().manual_seed(rows + k + n)
    g, w, pre = (torch.randn(*s, generator=gen).to(device, dtype) for s in ((rows, k), (k, n), (rows, n)))
    seed = new_seed()
    got = M.activation_dgrad_launch(g, w, pre, activation, dropout, seed, needs_dbias, dtype)
    expected = M.activation_dgrad_torch(g, w, pre, activation, dropout, seed, needs_dbias, dtype)
    assert got[0].dtype == dtype and got[0].shape == (rows, n) and (got[1] is None) == (not needs_dbias)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        if needs_dbias:
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-4)
        return
    exact = M.activation_dgrad_torch(g.double(), w.double(), pre.double(), activation, dropout, seed, needs_dbias,
                                     torch.float64)
    assert_matches(got[0], expected[0], exact[0], name="g1")
    if needs_dbias:  # ours sums the unrounded products, the composition sums dh rounded to fp16
        assert_matches(got[1].to(dtype), expected[1].to(dtype), exact[1], name="dbias")


def test_dgrad_kernel_on_empty_rows(device):
    g, w, pre = torch.randn(0, 8, device=device), torch.randn(8, 12, device=device), torch.randn(0, 12, device=device)
    out, dbias = M.activation_dgrad_launch(g, w, pre, "gelu", 0.0, None, True, torch.float32)
    assert out.shape == (0, 12) and dbias.shape == (12,) and not dbias.any()


def test_only_the_gradients_asked_for(device):
    """Frozen fc1 and input (a fine-tuned head side): no dgrad GEMM at all; frozen fc2: fc1's still right."""
    t = leaves(device, torch.float32, norm=False)
    for name in ("x", "fc1_weight", "fc1_bias"):
        t[name].requires_grad_(False)
    ops.reset_launch_counts()
    y = ops.mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], scale=t["scale"],
                residual=t["residual"])
    dy = torch.randn_like(y)
    ours = grads(y, {k: t[k] for k in ("fc2_weight", "fc2_bias", "scale", "residual")}, dy)
    assert "mlp_dgrad" not in ops.launch_counts()
    expected = grads(reference(t, "gelu", None), {k: t[k] for k in ours}, dy)
    for k in ours:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    t = leaves(device, torch.float32, norm=False, scale=False)
    t["fc2_weight"].requires_grad_(False)
    y = ops.mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"])
    dy = torch.randn_like(y)
    ours = grads(y, {k: t[k] for k in ("x", "fc1_weight", "fc1_bias")}, dy)
    expected = grads(reference({**t, "residual": 0.0}, "gelu", None), {k: t[k] for k in ours}, dy)
    for k in ours:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)


def test_layer_norm_without_affine_and_a_frozen_layer_scale(device):
    t = leaves(device, torch.float32, norm=False)
    t["scale"].requires_grad_(False)
    stats = L.chunk_stats(t["x"].detach().reshape(-1, E))
    y = ops.mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], eps=1e-6, stats=stats,
                activation="silu", scale=t["scale"], residual=t["residual"])
    dy = torch.randn_like(y)
    ours = grads(y, {k: v for k, v in t.items() if v is not None and v.requires_grad}, dy)
    expected = grads(reference(t, "silu", 1e-6), {k: t[k] for k in ours}, dy)
    for k in ours:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)


def test_empty_batch(device):
    t = leaves(device, torch.float32, samples=0)
    y = ops.mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], norm_weight=t["norm_weight"],
                norm_bias=t["norm_bias"], eps=1e-6, residual=t["residual"])
    assert y.shape == (0, 7, E)
    y.sum().backward()
    assert t["fc1_weight"].grad.shape == (H, E) and not t["fc1_weight"].grad.any()


@pytest.mark.parametrize("fold", [True, False])
def test_fused_model_trains_through_mlp(device, fold):
    """The fused tutorial ViT in training, its dropouts on: every block's MLP is one ops.mlp (one dgrad launch per
    block in backward; LayerNorm folded into fc1 or not, ``layer_norm_folding``), and its gradients are the two
    ops' (``save_pre_activations(False)``: the old path) from the same seeds (drawn in the same order)."""
    from vit_kernels import ViT, layer_norm_folding

    torch.manual_seed(0)
    model = ViT(in_channels=3, patch_size=4, emb_size=24, img_size=8, depth=2, n_classes=5, num_heads=2, drop_p=0.3,
                forward_drop_p=0.4).to(device)
    model.train()
    images = torch.randn(3, 3, 8, 8, device=device)
    with layer_norm_folding(fold):
        ops.reset_launch_counts()
        torch.manual_seed(1)
        model(images).square().sum().backward()
        launched = ops.launch_counts()
    assert launched.get("mlp_dgrad") == 2 and launched.get("layer_norm_linear", 0) == (4 if fold else 0)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with ops.save_pre_activations(False), layer_norm_folding(fold):
        ops.reset_launch_counts()
        torch.manual_seed(1)
        model(images).square().sum().backward()
        assert "mlp_dgrad" not in ops.launch_counts()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def bad_calls(t):
    base = dict(x=t["x"], fc1_weight=t["fc1_weight"], fc1_bias=t["fc1_bias"], fc2_weight=t["fc2_weight"],
                fc2_bias=t["fc2_bias"])
    return [
        (dict(activation="swiglu"), ValueError, "activation must be one of"),
        (dict(activation=None), ValueError, "activation must be one of"),
        (dict(fc2_weight=t["fc2_weight"][:, :-1]), ValueError, "fc2_weight has shape"),
        (dict(fc1_weight=t["fc1_weight"][None]), ValueError, "fc1_weight must be a 2-D tensor"),
        (dict(fc1_weight=[1.0]), TypeError, "fc1_weight must be a 2-D tensor"),
        (dict(fc1_bias=t["fc1_bias"][:-1]), ValueError, "fc1: bias"),
        (dict(fc2_bias=t["fc2_bias"].half()), TypeError, "fc2: bias"),
        (dict(residual=t["residual"][:, :-1]), ValueError, "fc2: residual"),
        (dict(scale=t["scale"][:-1]), ValueError, "fc2: scale"),
        (dict(dropout=1.5), ValueError, "fc2: dropout"),
        (dict(hidden_dropout=-0.1), ValueError, "hidden_dropout"),
        (dict(norm_weight=t["norm_weight"]), ValueError, "pass its eps"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=1e-6, norm_bias=t["norm_bias"][:-1]), ValueError, "norm_bias"),
        (dict(eps=1e-6, stats=torch.zeros(3, device=t["x"].device)), ValueError, "stats"),
        (dict(branch_scale=torch.ones(5, device=t["x"].device)), ValueError, r"branch_scale.*\(2, 7, 20\)"),
    ], base


def test_bad_inputs_name_the_problem(device):
    t = leaves(device, torch.float32)
    cases, base = bad_calls(t)
    for change, error, words in cases:
        kwargs = {**base, **change}
        args = [kwargs.pop(k) for k in ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
        with pytest.raises(error, match=words):
            ops.mlp(*args, **kwargs)


def test_the_dgrad_fusion_is_chosen_per_shape_by_timing(monkeypatch, device):
    """On a GPU (faked here) guard.choose keeps the fused dgrad where it times faster, else cuBLAS's GEMM and the
    gradient epilogue (itself timed against PyTorch's composition); the gradients are the same either way."""
    monkeypatch.setattr(guard, "on_gpu", lambda x: True)
    t = leaves(device, torch.float32, norm=False, scale=False)
    dy = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(5)).to(device)
    results = {}
    for fused_wins in (True, False):
        order = itertools.cycle([1.0, 2.0] if fused_wins else [2.0, 1.0])  # the new path is timed first
        monkeypatch.setattr(guard, "time_ms", lambda fn, order=order: next(order))
        guard.reset()
        y = ops.mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], residual=t["residual"])
        ops.reset_launch_counts()
        results[fused_wins] = grads(y, t, dy)
        assert ("mlp_dgrad" in ops.launch_counts()) == fused_wins
        assert [won for (name, _), won in guard.verdicts().items() if name == "mlp_dgrad"] == [fused_wins]
    for k in results[True]:
        torch.testing.assert_close(results[True][k], results[False][k], rtol=1e-4, atol=1e-5, msg=k)


def test_compiled_inference_keeps_nothing(device):
    """Without a gradient to compute, the op path (torch.compile's) runs the two GEMM ops: the same output, no
    pre-activation written for a backward that never comes."""
    t = {k: None if v is None else v.detach() for k, v in leaves(device, torch.float32).items()}
    args = (t["x"], t["norm_weight"], t["norm_bias"], 1e-6, None, t["fc1_weight"], t["fc1_bias"], "gelu", 0.0, None,
            t["fc2_weight"], t["fc2_bias"], t["scale"], t["residual"], 0.0, None, None)
    ops.reset_launch_counts()
    got = M.mlp_recorded(*args)
    assert ops.launch_counts() == {"layer_norm_linear": 1, "linear": 1}
    torch.testing.assert_close(got, M.mlp_op(*args)[0], rtol=0, atol=0)
    compiled = torch.compile(lambda x: ops.mlp(x, t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"],
                                               scale=t["scale"], residual=t["residual"]),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(t["x"]), reference(t, "gelu", None), rtol=1e-4, atol=1e-5)
