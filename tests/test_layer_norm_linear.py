"""LayerNorm inside the next GEMM (ops.layer_norm_linear) against F.layer_norm + the unfused GEMM: values on
residual-stream-like inputs (large per-row means, a few large channels), every epilogue, odd widths, eps values,
dtypes, statistics from the producing GEMM (ops.linear(..., norm_stats=True)) or from the kernel's own pass;
dropout masks; gradients of every input; bad inputs; the fused models' five launches per block."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.configs import tutorial_kwargs
from vit_kernels.ops.dropout import new_seed
from vit_kernels.ops.layer_norm_linear import layer_norm_linear_launch, layer_norm_linear_torch
from vit_kernels.ops.linear import STATS_CHUNK, chunk_stats, linear_launch

from helpers import DTYPES, assert_matches, max_err, randn


def stream(*shape, dtype=torch.float32, device="cpu", mean_scale=8.0, big_channels=(3,), big=30.0):
    """A residual stream: per-row means far from 0, unit spread, a few channels much larger than the rest (as
    real ViTs have: arXiv 2309.16588)."""
    x = torch.randn(*shape) + mean_scale * torch.randn(*shape[:-1], 1)
    x[..., list(big_channels)] *= big
    return x.to(device, dtype)


def d(t):
    """t in fp64 (tuples element-wise); anything that is not a tensor as it is."""
    if isinstance(t, tuple):
        return tuple(u.double() for u in t)
    return t.double() if isinstance(t, torch.Tensor) else t


CASES = {  # name: (N rows of weight, kwargs); weight blocks / swiglu build their weights in `params`
    "qkv": (45, dict()),
    "qkv deinterleave=3": (45, dict(deinterleave=3)),
    "fc1 gelu": (70, dict(activation="gelu")),
    "fc1 gelu_tanh eps=1e-6": (70, dict(activation="gelu_tanh", eps=1e-6)),
    "quick_gelu + scale + residual": (33, dict(activation="quick_gelu", scale=True, residual=True)),
    "silu, no norm weight/bias": (33, dict(activation="silu", norm_affine=False)),
    "q/k/v blocks": (15, dict(blocks=3)),
    "swiglu": (26, dict(activation="swiglu", blocks=2)),
    "swiglu no bias": (26, dict(activation="swiglu", blocks=2, bias=False)),
}


def params(case, k, dtype, device, lead):
    n, kw = CASES[case]
    kw = dict(kw)
    blocks, affine, has_bias = kw.pop("blocks", 1), kw.pop("norm_affine", True), kw.pop("bias", True)
    nw = randn(k, dtype=dtype, device=device) if affine else None
    nb = randn(k, dtype=dtype, device=device) if affine else None
    if blocks == 1:
        w = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
        b = randn(n, dtype=dtype, device=device) if has_bias else None
    else:
        w = tuple(randn(n, k, dtype=dtype, device=device, scale=k ** -0.5) for _ in range(blocks))
        b = tuple(randn(n, dtype=dtype, device=device) for _ in range(blocks)) if has_bias else None
    out = n * (1 if kw.get("activation") == "swiglu" else blocks)
    if kw.pop("scale", False):
        kw["scale"] = randn(out, dtype=dtype, device=device)
    if kw.pop("residual", False):
        kw["residual"] = randn(*lead, out, dtype=dtype, device=device)
    return nw, nb, w, b, kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lead,k", [((37,), 50), ((2, 13), 24), ((1,), 1), ((70,), 96)])
@pytest.mark.parametrize("given_stats", [False, True])
def test_values(given_stats, lead, k, case, dtype, device):
    x = stream(*lead, k, dtype=dtype, device=device, big_channels=(0,) if k > 1 else ())
    nw, nb, w, b, kw = params(case, k, dtype, device, lead)
    stats = chunk_stats(x.reshape(-1, k)) if given_stats else None
    ops.reset_launch_counts()
    got = ops.layer_norm_linear(x, nw, nb, w, b, stats=stats, **kw)
    assert ops.launch_counts() == {"layer_norm_linear": 1}
    assert got.dtype == dtype
    expected = layer_norm_linear_torch(d(x), d(nw), d(nb), d(w), d(b), **{k: d(v) for k, v in kw.items()})
    lowp = layer_norm_linear_torch(x, nw, nb, w, b, **kw)
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("mean_scale,big", [(0.0, 1.0), (8.0, 30.0), (100.0, 1.0), (1000.0, 50.0)])
def test_fp32_rows_with_large_means(mean_scale, big, device):
    """Statistics merged per chunk (Chan) stay exact where E[x^2] - E[x]^2 would cancel: error of the order of
    PyTorch's own fp32 error even at mean / std = 1000, from the kernel's pass and from a producer's chunks."""
    x = stream(64, 192, device=device, mean_scale=mean_scale, big=big)
    nw, nb = randn(192, device=device), randn(192, device=device)
    w, b = randn(96, 192, device=device, scale=192 ** -0.5), randn(96, device=device)
    expected = layer_norm_linear_torch(d(x), d(nw), d(nb), d(w), d(b))
    torch_fp32 = max_err(layer_norm_linear_torch(x, nw, nb, w, b), expected)
    for stats in (None, chunk_stats(x)):
        got = ops.layer_norm_linear(x, nw, nb, w, b, stats=stats)
        assert max_err(got, expected) <= 4 * torch_fp32 + 1e-6


def test_producer_statistics_are_the_stored_outputs_chunks(device):
    """ops.linear(..., norm_stats=True): per row and STATS_CHUNK-column chunk, the mean and sum of squared
    deviations of the values it stored (fp16: of the rounded values); odd widths, split epilogue halves."""
    for dtype, n in ((torch.float32, 70), (torch.float16, 45), (torch.float32, 16)):
        x, w, b = (randn(2, 19, 40, device=device, dtype=dtype), randn(n, 40, device=device, dtype=dtype, scale=0.2),
                   randn(n, device=device, dtype=dtype))
        r = stream(2, 19, n, device=device, dtype=dtype)
        ops.reset_launch_counts()
        y, stats = ops.linear(x, w, b, residual=r, norm_stats=True)
        assert ops.launch_counts() == {"linear": 1}
        torch.testing.assert_close(y, ops.linear(x, w, b, residual=r))
        assert stats.shape == (38, -(-n // STATS_CHUNK), 2) and stats.dtype == torch.float32
        torch.testing.assert_close(stats, chunk_stats(y.reshape(-1, n)), rtol=1e-5, atol=1e-3)
    with pytest.raises(TypeError, match="norm_stats must be a bool"):
        ops.linear(x, w, b, norm_stats=1)


def test_block_chain_with_handed_over_statistics(device):
    """proj + residual hands its statistics to LN2 + fc1, as in a fused block, forward and backward."""
    h, x = randn(3, 11, 48, device=device), stream(3, 11, 48, device=device, mean_scale=4.0, big=5.0)
    wp, bp = randn(48, 48, device=device, scale=0.2), randn(48, device=device)
    nw, nb = randn(48, device=device), randn(48, device=device)
    w1, b1 = randn(96, 48, device=device, scale=0.2), randn(96, device=device)
    leaves = [t.requires_grad_() for t in (h, x, wp, bp, nw, nb, w1, b1)]
    x2, stats = ops.linear(h, wp, bp, residual=x, norm_stats=True)
    out = ops.layer_norm_linear(x2, nw, nb, w1, b1, stats=stats, activation="gelu")
    g = randn(*out.shape, device=device)
    got = torch.autograd.grad((out * g).sum(), leaves)
    dl = [t.detach().double().requires_grad_() for t in leaves]
    ref = layer_norm_linear_torch(F.linear(dl[0], dl[2], dl[3]) + dl[1], dl[4], dl[5], dl[6], dl[7], activation="gelu")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for a, e in zip(got, torch.autograd.grad((ref * g.double()).sum(), dl)):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


def test_same_dropout_mask_as_the_unfused_gemm(device):
    x = stream(41, 40, device=device)
    nw, nb = randn(40, device=device), randn(40, device=device)
    w, b = randn(72, 40, device=device), randn(72, device=device)
    seed = new_seed()
    normed = layer_norm_linear_launch(x, nw, nb, 1e-5, None, w, b, "gelu", None, None, 1, 0.3, seed, None, None,
                                      None, None, None)
    unfused = linear_launch(F.layer_norm(x, (40,), nw, nb), w, b, "gelu", dropout=0.3, seed=seed)
    assert torch.equal(normed == 0, unfused == 0)
    torch.testing.assert_close(normed, unfused, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["qkv deinterleave=3", "quick_gelu + scale + residual", "q/k/v blocks", "swiglu"])
def test_gradients_of_every_input(case, device):
    lead, k = (2, 9), 40
    x = stream(*lead, k, device=device, mean_scale=3.0, big=5.0).requires_grad_()
    nw, nb, w, b, kw = params(case, k, torch.float32, device, lead)
    leaves = [t for t in (x, nw, nb, *(w if isinstance(w, tuple) else (w,)), *(b if isinstance(b, tuple) else (b,)),
                          kw.get("scale"), kw.get("residual")) if t is not None]
    for t in leaves:
        t.requires_grad_()
    out = ops.layer_norm_linear(x, nw, nb, w, b, **kw)
    g = randn(*out.shape, device=device)
    got = torch.autograd.grad((out * g).sum(), leaves)
    dleaves = [t.detach().double().requires_grad_() for t in leaves]
    lookup = dict(zip(map(id, leaves), dleaves))

    def swap(t):
        if isinstance(t, tuple):
            return tuple(lookup[id(u)] for u in t)
        return None if t is None else lookup[id(t)]

    expected = layer_norm_linear_torch(swap(x), swap(nw), swap(nb), swap(w), swap(b),
                                       **{name: swap(v) if isinstance(v, (torch.Tensor, tuple)) else v
                                          for name, v in kw.items()})
    expected_grads = torch.autograd.grad((expected * g.double()).sum(), dleaves)
    for i, (a, e) in enumerate(zip(got, expected_grads)):
        assert a.shape == e.shape and a.dtype == leaves[i].dtype
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()),
                                   msg=f"gradient {i} of {case}")


def test_backward_equals_the_unfused_path(device):
    """Training through layer_norm_linear gives the unfused ops' gradients (the same kernels compute them)."""
    x = stream(3, 11, 48, device=device, mean_scale=4.0, big=5.0)
    nw, nb, w, b = (randn(48, device=device), randn(48, device=device), randn(96, 48, device=device, scale=0.2),
                    randn(96, device=device))
    leaves = [t.requires_grad_() for t in (x, nw, nb, w, b)]
    g = randn(3, 11, 96, device=device)
    normed = torch.autograd.grad((ops.layer_norm_linear(x, nw, nb, w, b, activation="gelu") * g).sum(), leaves)
    unfused = torch.autograd.grad((ops.linear(ops.layer_norm(x, nw, nb), w, b, activation="gelu") * g).sum(), leaves)
    for a, e in zip(normed, unfused):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_statistics_are_checked(device):
    x = stream(7, 20, device=device)
    nw, w = randn(20, device=device), randn(30, 20, device=device)
    stats = chunk_stats(x)
    with pytest.raises(TypeError, match="stats must be the float32 tensor"):
        ops.layer_norm_linear(x, nw, None, w, stats=stats.double())
    with pytest.raises(ValueError, match="stats has shape"):
        ops.layer_norm_linear(x, nw, None, w, stats=stats[:5])
    with pytest.raises(ValueError, match="stats has shape"):
        ops.layer_norm_linear(x[:, :17], randn(17, device=device), None, randn(30, 17, device=device),
                              stats=chunk_stats(randn(7, 40, device=device)))


def test_empty_batch(device):
    x = torch.empty(0, 5, 20, device=device)
    out = ops.layer_norm_linear(x, randn(20, device=device), None, randn(30, 20, device=device))
    assert out.shape == (0, 5, 30)


def test_bad_inputs():
    x, nw, w = randn(4, 20), randn(20), randn(30, 20)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        ops.layer_norm_linear(x, nw, None, w, eps=0.0)
    with pytest.raises(ValueError, match="norm_weight has 19 elements"):
        ops.layer_norm_linear(x, randn(19), None, w)
    with pytest.raises(TypeError, match="norm_bias has dtype"):
        ops.layer_norm_linear(x, nw, randn(20).double(), w)
    with pytest.raises(ValueError, match="x has 20 features but weight expects 21"):
        ops.layer_norm_linear(x, nw, None, randn(30, 21))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.layer_norm_linear(x, nw, None, w, activation="relu")
    with pytest.raises(ValueError, match="dropout must be a probability"):
        ops.layer_norm_linear(x, nw, None, w, dropout=1.5)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ops.layer_norm_linear(randn(20), nw, None, w)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        ops.layer_norm_linear(x.numpy(), nw, None, w)


# --- the fused models ------------------------------------------------------------------------------------------
ODD = tutorial_kwargs("tiny")


def twin(device):
    ref = R.ViT(**ODD).to(device).eval()
    fast = vit_kernels.ViT(**ODD).to(device).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_five_launches_per_block_and_the_unfused_switch(device):
    ref, fast = twin(device)
    x = torch.randn(2, ODD["in_channels"], ODD["img_size"], ODD["img_size"], device=device)
    depth = ODD["depth"]
    with torch.no_grad():
        ops.reset_launch_counts()
        normed = fast(x)
        counts = ops.launch_counts()
        per_block = {k: v for k, v in counts.items() if k not in ("patch_embed", "pool_norm")}
        assert per_block == {"layer_norm_linear": 2 * depth, "attention": depth, "linear": 2 * depth + 1}  # + head
        assert sum(per_block.values()) - 1 == 5 * depth
        ops.reset_launch_counts()
        with vit_kernels.layer_norm_folding(False):
            unfused = fast(x)
        assert ops.launch_counts()["layer_norm"] == 2 * depth and "layer_norm_linear" not in ops.launch_counts()
        expected = ref(x)
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unfused, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="layer_norm_folding takes a bool"), vit_kernels.layer_norm_folding("no"):
        pass


def test_parameter_writes_through_data_are_seen(device):
    """Nothing is derived from the parameters ahead of time: a write through .data (no version bump) to a
    LayerNorm or the GEMM after it changes the very next forward."""
    ref, fast = twin(device)
    x = torch.randn(2, ODD["in_channels"], ODD["img_size"], ODD["img_size"], device=device)
    with torch.no_grad():
        fast(x)
        for model in (ref, fast):
            block = model[1][0]
            block[0].fn[0].weight.data.mul_(1.5)  # LN1
            block[1].fn[0].bias.data.add_(0.25)  # LN2
            block[1].fn[1][0].weight.data.mul_(-1.0)  # fc1
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)


def test_arch_rule_keeps_swiglus_128x128_tile_for_hopper():
    """SwiGLU's 128x128 tile fits sm_90's registers but spills on sm_80: its launchers (ops.linear's and this
    op's) drop it there only, and the compile check skips exactly those cases."""
    from vit_kernels.ops.launch import device_arch
    from vit_kernels.ops.layer_norm_linear import GLU_VARIANTS, LAYER_NORM_LINEAR_GLU
    from vit_kernels.ops.linear import LINEAR_GLU

    for launcher in (LINEAR_GLU, LAYER_NORM_LINEAR_GLU):
        tiles = {arch: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in launcher.configs_for(GLU_VARIANTS[0],
                                                                                               arch=arch)}
                 for arch in (80, 90)}
        assert (128, 128) in tiles[90] and (128, 128) not in tiles[80] and tiles[80] < tiles[90]
        used = {case[0]: case[4] for case in launcher.compile_cases([GLU_VARIANTS[0]])}
        assert all(archs == ((90,) if "BLOCK_M=128 BLOCK_N=128" in label else (80, 90))
                   for label, archs in used.items())
    assert device_arch({"x": torch.ones(1), "n": 3}) is None  # no CUDA tensor: not filtered by arch


@pytest.mark.gpu
@pytest.mark.parametrize("n,activation", [(2304, None), (3072, "gelu")])
def test_vit_b_sizes_bf16_on_gpu(n, activation):
    """ViT-B/16 qkv and fc1 at batch 8 in bf16 on the autotuned configs: within twice PyTorch's bf16 error, with
    the statistics handed over by proj's epilogue and from the kernel's own pass."""
    dev, dt, k = "cuda", torch.bfloat16, 768
    h, x = randn(8 * 197, k, device=dev, dtype=dt), stream(8 * 197, k, device=dev, dtype=dt)
    wp, bp = randn(k, k, device=dev, dtype=dt, scale=k ** -0.5), randn(k, device=dev, dtype=dt)
    nw, nb = randn(k, device=dev, dtype=dt), randn(k, device=dev, dtype=dt)
    w, b = randn(n, k, device=dev, dtype=dt, scale=k ** -0.5), randn(n, device=dev, dtype=dt)
    x2, stats = ops.linear(h, wp, bp, residual=x, norm_stats=True)
    expected = layer_norm_linear_torch(d(x2), d(nw), d(nb), d(w), d(b), eps=1e-6, activation=activation)
    lowp = layer_norm_linear_torch(x2, nw, nb, w, b, eps=1e-6, activation=activation)
    for given in (stats, None):
        got = ops.layer_norm_linear(x2, nw, nb, w, b, eps=1e-6, stats=given, activation=activation)
        assert_matches(got, lowp, expected)


def test_selector_compares_times_once_and_falls_back(monkeypatch):
    """On a GPU (forced here) each key's first call runs both paths without dropout: the new path serves the key
    only if it agrees with the proven one (until validated) and the timer (a fake here) says it is faster; a
    disagreement warns. Results are the same whichever path wins: both compute the same function."""
    from vit_kernels.ops import guard

    calls, times = [], {"new": 1.0, "proven": 2.0}
    monkeypatch.setattr(guard, "on_gpu", lambda x: True)
    monkeypatch.setattr(guard, "time_ms", lambda fn: (fn(), times[calls[-1][0]])[1])
    guard.reset()

    def make(tag, value):
        def run(p):
            calls.append((tag, p))
            return torch.full((3,), value)
        return run

    x = torch.zeros(1)
    assert torch.equal(guard.choose("good", lambda: "k", x, make("new", 1.0), make("proven", 1.0), 0.3), torch.ones(3))
    # compared and timed without dropout, then run with it
    assert calls == [("new", 0.0), ("proven", 0.0), ("new", 0.0), ("proven", 0.0), ("new", 0.3)]
    calls.clear()
    guard.choose("good", lambda: "k", x, make("new", 1.0), make("proven", 1.0), 0.3)
    assert calls == [("new", 0.3)]  # decided once per key
    times["new"] = 3.0  # slower: the proven path serves the key, with the same result
    calls.clear()
    assert torch.equal(guard.choose("good", lambda: "k2", x, make("new", 1.0), make("proven", 1.0)), torch.ones(3))
    assert calls[-1] == ("proven", 0.0) and guard.verdicts()[("good", "k2")] is False
    times["new"] = 1.0
    with pytest.warns(RuntimeWarning, match="bad path disagreed with the proven one"):
        assert torch.equal(guard.choose("bad", lambda: "k", x, make("new", 9.0), make("proven", 1.0)), torch.ones(3))
    assert guard.verdicts() == {("good", "k"): True, ("good", "k2"): False, ("bad", "k"): False}
    calls.clear()
    guard.choose("bad", lambda: "k", x, make("new", 9.0), make("proven", 1.0))
    assert calls == [("proven", 0.0)]
    nan = torch.full((3,), float("nan"))
    with pytest.warns(RuntimeWarning):
        guard.choose("nan", lambda: "k", x, lambda p: nan, make("proven", 1.0))
    monkeypatch.setattr(guard, "VALIDATED_ON_GPU", frozenset({"validated"}))
    calls.clear()
    guard.choose("validated", lambda: "k", x, make("new", 9.0), make("proven", 1.0))
    assert calls == [("new", 0.0), ("proven", 0.0), ("new", 0.0)]  # validated: timed, not compared
    monkeypatch.setattr(guard, "undecidable", lambda: True)  # tracing or capturing: the proven path, undecided
    calls.clear()
    guard.choose("good", lambda: "k3", x, make("new", 1.0), make("proven", 1.0))
    assert calls == [("proven", 0.0)] and ("good", "k3") not in guard.verdicts()
    guard.reset()


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_models_check_the_fused_path_against_the_unfused_ops(monkeypatch, device):
    """The fused models route each LayerNorm + GEMM through the guard: on agreement the fused launches run; a
    fused path that disagrees is dropped with a warning and the model still returns the reference's output."""
    from vit_kernels.ops import guard

    monkeypatch.setattr(guard, "on_gpu", lambda x: True)
    order = itertools.cycle([1.0, 2.0])  # the selector times the new path first: it wins
    monkeypatch.setattr(guard, "time_ms", lambda fn: next(order))
    guard.reset()
    ref, fast = twin(device)
    x = torch.randn(2, ODD["in_channels"], ODD["img_size"], ODD["img_size"], device=device)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
        assert guard.verdicts() and all(guard.verdicts().values())
        guard.reset()
        real = ops.layer_norm_linear
        monkeypatch.setattr(ops, "layer_norm_linear", lambda *a, **k: real(*a, **k) + 1.0)
        with pytest.warns(RuntimeWarning, match="layer_norm_linear path disagreed"):
            got = fast(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert guard.verdicts() and not any(guard.verdicts().values())
    guard.reset()


def test_choosing_launches_nothing_the_counts_see(monkeypatch):
    """The comparison and the timing of a first call are not the op's launches: only the chosen run is counted."""
    from vit_kernels.ops import guard
    from vit_kernels.ops.dispatch import record_launch

    monkeypatch.setattr(guard, "on_gpu", lambda x: True)
    monkeypatch.setattr(guard, "time_ms", lambda fn: (fn(), 1.0)[1])

    def path(p):
        record_launch("path")
        return torch.ones(2)

    guard.reset()
    ops.reset_launch_counts()
    guard.choose("counted", lambda: "k", torch.zeros(1), path, path)
    assert ops.launch_counts() == {"path": 1}
    guard.reset()
