"""Real sizes on a real GPU: ViT-B/16 at 224 (N = 197, head_dim 64), fp16/bf16 within 2x PyTorch's error.

``from_timm`` patches the timm model in place: each timm reference is a ``copy.deepcopy`` taken before."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.configs import tutorial_kwargs
from vit_kernels.ops.attention import attention_torch
from vit_kernels.ops.patch_embed import patch_embed_torch

from helpers import assert_matches, randn

pytestmark = pytest.mark.gpu
VIT_B16 = tutorial_kwargs("vit_b_16")
LOWP = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def tutorial_pair():
    torch.manual_seed(0)
    ref = R.ViT(**VIT_B16).cuda().eval()
    fast = vit_kernels.ViT(**VIT_B16).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_vit_b16_tutorial(tutorial_pair, batch, dtype):
    ref, fast = tutorial_pair
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expected = ref.double()(x.double())
        lowp = ref.to(dtype)(x.to(dtype))
        ref.float()
        got = fast.to(dtype)(x.to(dtype))
        fast.float()
    assert fast.last_backend == "triton"
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_b16_timm(pool, dtype):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool=pool).cuda().eval()
    ref = copy.deepcopy(model)  # timm's own forward
    fast = vit_kernels.from_timm(model)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expected = ref.double()(x.double())
        lowp = ref.to(dtype)(x.to(dtype))
        ops.reset_launch_counts()
        got = fast.to(dtype)(x.to(dtype))
    assert {"patch_embed", "layer_norm_linear", "linear", "attention"} <= set(ops.launch_counts())
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)
    else:
        assert_matches(got, lowp, expected)


def test_autocast_bf16(tutorial_pair):
    ref, fast = tutorial_pair
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got, lowp = fast(x), ref(x)
    with torch.no_grad():
        expected = ref.double()(x.double())
        ref.float()
    assert got.dtype == torch.bfloat16
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("layout", ["h d qkv", "qkv h d"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_attention_real_size(layout, head_dim, dtype):
    heads = 12 if head_dim == 64 else 16
    qkv = randn(64, 197, 3 * heads * head_dim, dtype=dtype, device="cuda")
    for scaling in ("tutorial", "paper"):
        got = ops.attention(qkv, heads, layout, scaling)
        assert_matches(got, attention_torch(qkv, heads, layout, scaling),
                       attention_torch(qkv.double(), heads, layout, scaling))


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("n,k,epilogue", [(2304, 768, {}), (768, 768, {"residual": True}),
                                          (3072, 768, {"activation": "gelu"}), (768, 3072, {"residual": True})])
def test_linear_real_size(n, k, epilogue, dtype):
    m = 64 * 197
    x = randn(m, k, dtype=dtype, device="cuda")
    w = randn(n, k, dtype=dtype, device="cuda", scale=k ** -0.5)
    b = randn(n, dtype=dtype, device="cuda")
    r = randn(m, n, dtype=dtype, device="cuda") if epilogue.get("residual") else None
    act = epilogue.get("activation")
    from vit_kernels.ops.linear import linear_torch
    got = ops.linear(x, w, b, activation=act, residual=r)
    expected = linear_torch(x.double(), w.double(), b.double(), act, None, None if r is None else r.double())
    assert_matches(got, linear_torch(x, w, b, act, None, r), expected)


def test_more_heads_than_grid_axis_limit():
    """batch x heads beyond 65,535: the 1-D grid has no such limit."""
    qkv = randn(5462, 5, 3 * 12 * 16, dtype=torch.float16, device="cuda")  # 65,544 (batch, head) pairs
    got = ops.attention(qkv, 12, "qkv h d", "paper")
    assert_matches(got, attention_torch(qkv, 12, "qkv h d", "paper"),
                   attention_torch(qkv.double(), 12, "qkv h d", "paper"))


BIG = 2**31 + 2**20  # elements: past int32 offsets


def test_activations_past_2_to_31_elements():
    """Real >2**31-element activations through LayerNorm and the GEMM (input, residual and output)."""
    rows = BIG // 768 + 1
    x = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(768, device="cuda", dtype=torch.bfloat16), torch.randn(768, device="cuda", dtype=torch.bfloat16)
    tail = slice(rows - 300, rows)
    y = ops.layer_norm(x, w, b, 1e-6)
    torch.testing.assert_close(y[tail].float(), F.layer_norm(x[tail].float(), (768,), w.float(), b.float(), 1e-6),
                               rtol=2e-2, atol=2e-2)
    del y
    wl = torch.randn(768, 768, device="cuda", dtype=torch.bfloat16) * 768 ** -0.5
    out = ops.linear(x, wl, b, residual=x)
    expected = x[tail].float() @ wl.float().t() + b.float() + x[tail].float()
    torch.testing.assert_close(out[tail].float(), expected, rtol=3e-2, atol=3e-2)


def test_attention_and_patch_embed_past_2_to_31_elements():
    batch = BIG // (197 * 2304) + 1
    qkv = torch.randn(batch, 197, 2304, device="cuda", dtype=torch.bfloat16)
    out = ops.attention(qkv, 12, "qkv h d", "paper")
    tail = slice(batch - 4, batch)
    torch.testing.assert_close(out[tail].float(), attention_torch(qkv[tail].float(), 12, "qkv h d", "paper"),
                               rtol=2e-2, atol=2e-2)
    del qkv, out
    images = BIG // (3 * 224 * 224) + 1
    img = torch.randn(images, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(768, 3, 16, 16, device="cuda", dtype=torch.bfloat16) * 0.03
    cls, pos = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16), torch.randn(197, 768, device="cuda",
                                                                                      dtype=torch.bfloat16)
    tokens = ops.patch_embed(img, weight, None, cls, pos)
    assert tokens.numel() > 2**31
    tail = slice(images - 4, images)
    expected = patch_embed_torch(img[tail].float(), weight.float(), None, cls.float(), pos.float(), True)
    torch.testing.assert_close(tokens[tail].float(), expected, rtol=3e-2, atol=3e-2)


# --- the training-only and visualization kernels at ViT-B/16 sizes ------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP)
def test_attention_dropout_real_size(dtype):
    """N = 197 with head_dim 256 lets one-hot value rows recover the kernel's mask (in fp32); then the 16-bit
    kernel, same seed, must match the formula under that mask by the 2x rule; keep rate within 5 sigma."""
    from test_dropout import assert_keep_rate, attention_keep_mask, attention_under_mask

    B, H, N, D, p = 4, 2, 197, 256, 0.1
    keep = attention_keep_mask(B, H, N, D, p, 11, "qkv h d", "cuda")
    assert_keep_rate(keep, p)
    qkv = randn(B, N, 3 * H * D, device="cuda", dtype=dtype)
    torch.manual_seed(11)
    got = ops.attention(qkv, H, "qkv h d", "paper", dropout=p)
    assert_matches(got, attention_under_mask(qkv, H, "qkv h d", "paper", None, keep, p),
                   attention_under_mask(qkv.double(), H, "qkv h d", "paper", None, keep, p))


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("width,out", [(768, 3072), (3072, 768)])  # fc1 (GELU + dropout), fc2 (+ residual)
def test_linear_dropout_and_stochastic_depth_real_size(width, out, dtype):
    from vit_kernels.ops.linear import linear_torch

    B, T, p = 8, 197, 0.1
    x, w, b = randn(B, T, width, device="cuda", dtype=dtype), randn(out, width, device="cuda", dtype=dtype,
                                                                    scale=width ** -0.5), randn(out, device="cuda",
                                                                                               dtype=dtype)
    act, res = ("gelu", None) if out > width else (None, randn(B, T, out, device="cuda", dtype=dtype))
    factors = torch.tensor([1.25, 0.0] * 4, device="cuda")
    torch.manual_seed(5)
    kept = ops.linear(x.float(), w.float(), b.float(), act, dropout=p) != 0
    torch.manual_seed(5)
    got = ops.linear(x, w, b, act, residual=res, dropout=p, branch_scale=factors)

    def formula(*t):
        y = torch.where(kept, linear_torch(*t[:3], act) / (1 - p), 0.0) * factors[:, None, None].to(t[0].dtype)
        return (y if t[3] is None else t[3] + y).to(t[0].dtype)

    assert_matches(got, formula(x, w, b, res),
                   formula(x.double(), w.double(), b.double(), None if res is None else res.double()))


@pytest.mark.parametrize("dtype", LOWP)
def test_attention_probabilities_real_size(dtype):
    from vit_kernels.ops.attention import attention_torch_probabilities

    qkv = randn(8, 197, 3 * 768, device="cuda", dtype=dtype)
    mask = torch.rand(8, 1, 197, 197, device="cuda") > 0.2
    assert_matches(ops.attention_probabilities(qkv, 12, "qkv h d", "paper", mask),
                   attention_torch_probabilities(qkv, 12, "qkv h d", "paper", mask).to(dtype),
                   attention_torch_probabilities(qkv.double(), 12, "qkv h d", "paper", mask))


def test_vit_b16_training_step_with_dropout_and_stochastic_depth():
    """One bf16-autocast training step of a timm ViT-B/16 with every dropout and drop_path on the kernels:
    finite loss and gradients, and reproducible per seed (same masks; cuDNN's conv weight gradient may
    reduce in another order, hence a tolerance instead of bitwise equality)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, drop_rate=0.1, attn_drop_rate=0.1,
                              proj_drop_rate=0.1, drop_path_rate=0.1).cuda().train()
    fast = vit_kernels.from_timm(model)
    x, y = torch.randn(16, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (16,), device="cuda")
    grads = []
    for _ in range(2):
        fast.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        ops.reset_launch_counts()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(fast(x), y)
        loss.backward()
        assert {"patch_embed", "layer_norm_linear", "linear", "attention"} <= set(ops.launch_counts())
        assert torch.isfinite(loss)
        grads.append([p.grad.clone() for p in fast.parameters()])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_e2e_bench_times_every_baseline():
    """The end-to-end harness on a real card: every baseline row (cudnn.benchmark on and off, compiled timm in
    default and CUDA-graph modes, ours compiled), CUDA-graph replays of the eager candidates, interleaved rounds,
    and a headline whose missing figures carry reasons (a tiny fp16 run: not the bf16 ViT-B/16 headline)."""
    from vit_kernels.bench import run_e2e

    result = run_e2e(["tiny"], [1], torch.float16, compile_modes=("default", "reduce-overhead"), repeats=2,
                     progress=lambda *_: None)
    rows = {r["candidate"]: r for r in result["rows"]}
    assert {"timm eager (SDPA)", "timm eager (SDPA, cudnn.benchmark off)", "ours (from_timm)", "reference eager",
            "ours (tutorial ViT)", "timm torch.compile (default)", "timm torch.compile (reduce-overhead)",
            "ours (from_timm) torch.compile (default)"} == set(rows)
    assert all(len(r["rounds"]) == 2 and r["ms_min"] <= r["ms"] <= r["ms_max"] for r in rows.values())
    assert all(rows[c]["graph_ms"] for c in ("timm eager (SDPA)", "ours (from_timm)", "reference eager"))
    assert rows["timm torch.compile (default)"]["graph_ms"] is None
    head, missing = result["headline"], result["headline_missing"]
    assert head["gpu"] and head["torch"] and head["peak_gemm_tflops"] > 0
    assert set(missing) == {k for k, v in head.items() if v is None} and "bs256_img_s" in missing


@pytest.mark.gpu
def test_breakdown_attributes_kernels_on_a_gpu():
    """The per-category breakdown on a real card: CUPTI's kernel names of both candidates land in GEMM and
    attention (an unclassified kernel would show in "other"'s top list), the gap to the wall time is reported and
    every rate is a plausible fraction of the measured peak."""
    from vit_kernels.bench.breakdown import run_breakdown

    result = run_breakdown(["tiny"], [1], torch.float16, progress=lambda *_: None)
    rows = {r["candidate"]: r for r in result["rows"]}
    assert set(rows) == {"ours (from_timm)", "timm eager (SDPA)"}
    assert result["peaks"]["gemm_tflops"] > 0 and result["peaks"]["copy_gbps"] > 0
    for cand, r in rows.items():
        other = [k["name"][:80] for k in r["categories"]["other"]["top"]]
        for cat in ("gemm", "attention"):
            c = r["categories"][cat]
            assert c["launches"] > 0 and c["ms"] > 0, (cand, cat, other)
        assert r["kernel_ms"] > 0 and r["wall_ms"] > 0
        assert r["gap_ms"] == pytest.approx(r["wall_ms"] - r["kernel_ms"])
        fractions = [c["frac_of_peak"] for c in r["categories"].values() if c["frac_of_peak"] is not None]
        assert fractions and all(0 < f < 1.5 for f in fractions), (cand, fractions)
    ours = rows["ours (from_timm)"]["categories"]
    assert ours["gemm"]["top"][0]["name"].startswith("_linear_kernel")
    assert ours["attention"]["top"][0]["name"].startswith("_attention_fwd_kernel")
