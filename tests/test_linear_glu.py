"""The GEMM's modern-ViT activations against PyTorch: quick-GELU (OpenAI CLIP) and SiLU epilogues, and SwiGLU in
one GEMM over the gate and up weight blocks (EVA-02, DINOv2-giant / DINOv3, timm SwiGLU / SwiGLUPacked, Hugging
Face Dinov2SwiGLUFFN): values, dropout, gradients, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.dropout import dropout_launch, new_seed
from vit_kernels.ops.launch import config
from vit_kernels.ops.linear import linear_launch, linear_torch

from helpers import DTYPES, assert_matches, randn

ELEMENTWISE = ["quick_gelu", "silu"]
# [..., M], K, H: none a multiple of the interpreter's 32x32x32 tile (or of a GPU tile)
GLU_SHAPES = [((37,), 50, 45), ((2, 13), 24, 40), ((1,), 1, 1), ((70,), 33, 70)]


def d(t):
    return None if t is None else t.double()


# --- quick_gelu and silu: elementwise epilogues ------------------------------------------------------------------
def test_activations_are_the_frameworks_definitions():
    from timm.layers import QuickGELU

    y = randn(7, 30, scale=3.0)
    torch.testing.assert_close(linear_torch(y, torch.eye(30), None, "quick_gelu"), QuickGELU()(y))
    torch.testing.assert_close(linear_torch(y, torch.eye(30), None, "silu"), F.silu(y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ELEMENTWISE)
@pytest.mark.parametrize("shape", [(37, 70, 50), (2, 26, 40, 24)])  # [..., M, N, K]
def test_elementwise_activation_values(shape, activation, dtype, device):
    *lead, n, k = shape
    x = randn(*lead, k, dtype=dtype, device=device)
    w, b = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5), randn(n, dtype=dtype, device=device)
    s, r = randn(n, dtype=dtype, device=device), randn(*lead, n, dtype=dtype, device=device)
    for args in ((b, None, None), (b, s, r), (None, None, r)):
        ops.reset_launch_counts()
        got = ops.linear(x, w, args[0], activation=activation, scale=args[1], residual=args[2])
        assert ops.launch_counts() == {"linear": 1}
        assert got.dtype == dtype
        assert_matches(got, linear_torch(x, w, *args[:1], activation, *args[1:]),
                       linear_torch(d(x), d(w), d(args[0]), activation, d(args[1]), d(args[2])))


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_elementwise_activation_gradients(activation, device):
    x = randn(2, 9, 40, device=device, grad=True)
    w, b = randn(45, 40, device=device, scale=40 ** -0.5, grad=True), randn(45, device=device, grad=True)
    s, r = randn(45, device=device, grad=True), randn(2, 9, 45, device=device, grad=True)
    g = randn(2, 9, 45, device=device)
    inputs = [x, w, b, s, r]
    got = torch.autograd.grad((ops.linear(x, w, b, activation=activation, scale=s, residual=r) * g).sum(), inputs)
    expected = torch.autograd.grad((linear_torch(*map(d, inputs[:3]), activation, d(s), d(r)) * d(g)).sum(),
                                   inputs)
    for i, (a, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, e.float(), rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"input {i}: {m}")


# --- SwiGLU ----------------------------------------------------------------------------------------------------
def swiglu_ref(x, wg, wu, bg=None, bu=None):
    """silu(x wg^T + bg) * (x wu^T + bu), written out (not through linear_torch)."""
    return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


def glu_operands(lead, k, h, dtype, device, bias=True, layout="separate", grad=False):
    """x, (w_gate, w_up), (b_gate, b_up) or None, and the tensors that own them (requires_grad when ``grad``).
    layout: "separate" (timm SwiGLU's fc1_g / fc1_x), "packed" (chunk(2) views of one [2H, K] weight and [2H]
    bias: timm SwiGLUPacked), "strided" (column slices: row stride K + 5, the up block's bias a stride-2 view)."""
    x = randn(*lead, k, dtype=dtype, device=device, grad=grad)
    scale = max(k, 1) ** -0.5
    if layout == "packed":
        w = randn(2 * h, k, dtype=dtype, device=device, scale=scale, grad=grad)
        b = randn(2 * h, dtype=dtype, device=device, grad=grad) if bias else None
        return x, w.chunk(2), None if b is None else b.chunk(2), [x, w] + ([b] if bias else [])
    if layout == "strided":
        owners = [randn(h, k + 5, dtype=dtype, device=device, scale=scale, grad=grad) for _ in range(2)]
        ws = tuple(t[:, 2:k + 2] for t in owners)
        owners_b = [randn(h, dtype=dtype, device=device, grad=grad), randn(2 * h, dtype=dtype, device=device,
                                                                         grad=grad)] if bias else []
        bs = (owners_b[0], owners_b[1][1::2]) if bias else None
        return x, ws, bs, [x, *owners, *owners_b]
    ws = tuple(randn(h, k, dtype=dtype, device=device, scale=scale, grad=grad) for _ in range(2))
    bs = tuple(randn(h, dtype=dtype, device=device, grad=grad) for _ in range(2)) if bias else None
    return x, ws, bs, [x, *ws, *(bs or ())]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["separate", "packed", "strided"])
@pytest.mark.parametrize("lead,k,h", GLU_SHAPES)
def test_swiglu_values(lead, k, h, layout, dtype, device):
    for bias in (True, False):
        x, ws, bs, _ = glu_operands(lead, k, h, dtype, device, bias, layout)
        ops.reset_launch_counts()
        got = ops.linear(x, ws, bs, activation="swiglu")
        assert ops.launch_counts() == {"linear": 1}  # one GEMM over both blocks, no copy, no second pass
        assert got.dtype == dtype and got.shape == (*lead, h)
        expected = swiglu_ref(d(x), *map(d, ws), *(map(d, bs) if bias else ()))
        assert_matches(got, linear_torch(x, ws, bs, "swiglu"), expected)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("block_n", [16, 32])
def test_swiglu_both_epilogue_paths_and_tiles(split, block_n, device):
    """Pinned configs: whole-tile and split epilogue, column tiles that straddle H (= 45)."""
    x, (wg, wu), (bg, bu), _ = glu_operands((70,), 40, 45, torch.float32, device)
    cfg = config(4, 2, BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=16, GROUP_M=2, SPLIT_EPILOGUE=split)
    got = linear_launch(x, wg, bg, "swiglu", weight2=wu, bias2=bu, config=cfg)
    torch.testing.assert_close(got, swiglu_ref(x, wg, wu, bg, bu), rtol=1e-5, atol=1e-5)


def test_swiglu_matches_timm_and_hugging_face_modules(device):
    """fc1 of timm SwiGLU (fc1_g / fc1_x), timm SwiGLUPacked (gate = first half of fc1) and Hugging Face
    Dinov2SwiGLUFFN (gate_proj / up_proj), each followed by its own fc2."""
    from timm.layers import SwiGLU, SwiGLUPacked
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2SwiGLUFFN

    x = randn(2, 11, 24, device=device)
    with torch.no_grad():
        m = SwiGLU(24, 40).to(device)
        ours = m.fc2(ops.linear(x, (m.fc1_g.weight, m.fc1_x.weight), (m.fc1_g.bias, m.fc1_x.bias), "swiglu"))
        torch.testing.assert_close(ours, m(x), rtol=1e-5, atol=1e-5)
        m = SwiGLUPacked(24, 80).to(device)
        ours = m.fc2(ops.linear(x, m.fc1.weight.chunk(2), m.fc1.bias.chunk(2), "swiglu"))
        torch.testing.assert_close(ours, m(x), rtol=1e-5, atol=1e-5)
        m = Dinov2SwiGLUFFN(Dinov2Config(hidden_size=24, mlp_ratio=4)).to(device)
        ours = m.down_proj(ops.linear(x, (m.gate_proj.weight, m.up_proj.weight), (m.gate_proj.bias, m.up_proj.bias),
                                      "swiglu"))
        torch.testing.assert_close(ours, m(x), rtol=1e-5, atol=1e-5)


def test_swiglu_torch_fallback(device):
    x, ws, bs, _ = glu_operands((2, 9), 24, 40, torch.float32, device, layout="packed")
    with ops.use_backend("torch"):
        got = ops.linear(x, ws, bs, activation="swiglu")
    torch.testing.assert_close(got, swiglu_ref(x, *ws, *bs))


def test_swiglu_empty_batch(device):
    x, ws, bs, _ = glu_operands((0,), 8, 4, torch.float32, device)
    assert ops.linear(x, ws, bs, activation="swiglu").shape == (0, 4)


# --- SwiGLU with dropout: the mask is Philox on (seed, row, column) of the H-wide output -------------------------
def test_swiglu_dropout_is_the_mask_on_the_product(device):
    x, (wg, wu), (bg, bu), _ = glu_operands((70,), 40, 45, torch.float32, device)
    seed, p = new_seed(), 0.3
    got = linear_launch(x, wg, bg, "swiglu", dropout=p, seed=seed, weight2=wu, bias2=bu)
    dense = linear_launch(x, wg, bg, "swiglu", weight2=wu, bias2=bu)
    torch.testing.assert_close(got, dropout_launch(dense, seed, p), rtol=1e-6, atol=1e-6)
    assert 0.2 < (got == 0).float().mean() < 0.4
    # the public call draws its seed from torch's generator: the same manual_seed gives the same mask
    torch.manual_seed(5)
    first = ops.linear(x, (wg, wu), (bg, bu), "swiglu", dropout=p)
    torch.manual_seed(5)
    torch.testing.assert_close(ops.linear(x, (wg, wu), (bg, bu), "swiglu", dropout=p), first, rtol=0, atol=0)


def public_mask(seed_state, m, h, p, device):
    """The keep mask scaled by 1 / (1 - p) that a public call made after torch.manual_seed(seed_state) used."""
    torch.manual_seed(seed_state)
    return dropout_launch(torch.ones(m, h, device=device), new_seed(), p)


# --- SwiGLU gradients: x, both weights, both biases; through views into the packed parameter ---------------------
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("layout", ["separate", "packed", "strided"])
def test_swiglu_gradients(layout, p, device):
    lead, k, h = (2, 13), 40, 45
    x, ws, bs, owners = glu_operands(lead, k, h, torch.float32, device, layout=layout, grad=True)
    g = randn(*lead, h, device=device)
    torch.manual_seed(11)
    ops.reset_launch_counts()
    got = ops.linear(x, ws, bs, activation="swiglu", dropout=p)
    grads = torch.autograd.grad((got * g).sum(), owners)
    # forward 1; backward: the pre-activation recompute over both blocks (1), the regenerated mask (dropout)
    assert ops.launch_counts() == ({"linear": 2, "dropout": 1} if p else {"linear": 2})
    mask = public_mask(11, 26, h, p, device).view(*lead, h) if p else 1.0
    expected = swiglu_ref(d(x), *map(d, ws), *map(d, bs)) * (mask.double() if p else 1.0)
    expected_grads = torch.autograd.grad((expected * d(g)).sum(), owners)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    for owner, a, e in zip(owners, grads, expected_grads):
        assert a.shape == owner.shape  # packed / sliced: the gradient lands in the owning tensor
        torch.testing.assert_close(a, e.float(), rtol=1e-4, atol=1e-4)


def test_swiglu_gradients_accumulate_into_packed_parameter(device):
    """A packed nn.Parameter [2H, K] used through chunk(2): .grad after backward equals autograd's."""
    fc1 = torch.nn.Linear(24, 2 * 40).to(device)
    x = randn(2, 9, 24, device=device)
    ops.linear(x, fc1.weight.chunk(2), fc1.bias.chunk(2), activation="swiglu").square().sum().backward()
    got = fc1.weight.grad.clone(), fc1.bias.grad.clone()
    fc1.zero_grad()
    gate, up = fc1(x).chunk(2, dim=-1)
    (F.silu(gate) * up).square().sum().backward()
    torch.testing.assert_close(got[0], fc1.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], fc1.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_swiglu_low_precision_gradients(dtype, device):
    """fp16 / bf16: each gradient within the FlashAttention rule of PyTorch's own low-precision autograd."""
    lead, k, h = (2, 13), 40, 45
    x, ws, bs, owners = glu_operands(lead, k, h, dtype, device, layout="packed", grad=True)
    g = randn(*lead, h, dtype=dtype, device=device)
    grads = torch.autograd.grad((ops.linear(x, ws, bs, activation="swiglu") * g).sum(), owners)
    lowp = torch.autograd.grad((swiglu_ref(x, *ws, *bs) * g).sum(), owners)
    ref = torch.autograd.grad((swiglu_ref(d(x), *map(d, ws), *map(d, bs)) * d(g)).sum(), owners)
    for name, a, lp, e in zip(("x", "weight", "bias"), grads, lowp, ref):
        assert a.dtype == dtype
        assert_matches(a, lp, e, name=f"d{name}")


def test_swiglu_only_up_block_requires_grad(device):
    x, (wg, wu), (bg, bu), _ = glu_operands((9,), 24, 20, torch.float32, device)
    wu.requires_grad_()
    out = ops.linear(x, (wg, wu), (bg, bu), activation="swiglu")
    assert out.requires_grad
    (dwu,) = torch.autograd.grad(out.sum(), [wu])
    ref_wu = wu.detach().clone().requires_grad_()
    swiglu_ref(x, wg, ref_wu, bg, bu).sum().backward()
    torch.testing.assert_close(dwu, ref_wu.grad, rtol=1e-4, atol=1e-4)


def test_swiglu_compile_fullgraph(device):
    torch._dynamo.reset()
    fc1 = torch.nn.Linear(24, 2 * 20).to(device)
    x = randn(2, 9, 24, device=device)

    def glu(x):
        return ops.linear(x, fc1.weight.chunk(2), fc1.bias.chunk(2), activation="swiglu")

    eager = glu(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [fc1.weight, fc1.bias])
    compiled = torch.compile(glu, fullgraph=True)(x)
    grads = torch.autograd.grad(compiled.square().sum(), [fc1.weight, fc1.bias])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# --- bad inputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,error,match", [
    (lambda x, ws, bs: ops.linear(x, ws[0], activation="swiglu"), ValueError, "exactly two blocks.*got 1 block$"),
    (lambda x, ws, bs: ops.linear(x, [ws[0]], activation="swiglu"), ValueError, "exactly two blocks"),
    (lambda x, ws, bs: ops.linear(x, [*ws, ws[0]], activation="swiglu"), ValueError, "exactly two blocks.*got 3"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1][:4]], activation="swiglu"), ValueError,
     r"same shape, got weight\[0\] \(6, 10\) and weight\[1\] \(4, 10\)"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1][:, :5]], activation="swiglu"), ValueError,
     r"weight\[1\] expects 5"),
    (lambda x, ws, bs: ops.linear(x, [ws[0], ws[1].half()], activation="swiglu"), TypeError, r"weight\[1\] has dtype"),
    (lambda x, ws, bs: ops.linear(x, ws, [bs[0]], activation="swiglu"), ValueError, "bias has 1 blocks but weight"),
    (lambda x, ws, bs: ops.linear(x, ws, [bs[0], bs[1][:3]], activation="swiglu"), ValueError,
     r"bias\[1\] has 3 elements"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, activation="swiglu", residual=torch.ones(2, 4, 6)), ValueError,
     "swiglu' does not combine with residual"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, activation="swiglu", scale=torch.ones(6)), ValueError,
     "does not combine with scale"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, activation="swiglu", branch_scale=torch.ones(2)), ValueError,
     "does not combine with branch_scale"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, activation="swiglu", deinterleave=2), ValueError,
     "does not combine with deinterleave=2"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, activation="swiglu", dropout=1.5), ValueError, "dropout"),
    (lambda x, ws, bs: ops.linear(x, ws, bs, activation="SwiGLU"), ValueError,
     r"activation must be one of \(None, 'gelu', 'gelu_tanh', 'quick_gelu', 'silu', 'swiglu'\)"),
    (lambda x, ws, bs: ops.linear(x, ws[0], activation="relu"), ValueError, "quick_gelu', 'silu', 'swiglu'"),
])
def test_bad_input(call, error, match):
    x = torch.randn(2, 4, 10)
    ws, bs = [torch.randn(6, 10) for _ in range(2)], [torch.randn(6) for _ in range(2)]
    with pytest.raises(error, match=match):
        call(x, ws, bs)


def test_launcher_rejects_bad_gate_and_up_blocks():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="swiglu needs two weight blocks"):
        linear_launch(x, w, activation="swiglu")
    with pytest.raises(ValueError, match="swiglu needs two weight blocks"):
        linear_launch(x, w, activation="swiglu", weight2=w[:3])
    with pytest.raises(ValueError, match="swiglu needs two weight blocks"):
        linear_launch(x, w, activation="swiglu", weight2=w, weight3=w)


# --- GPU: bf16 / fp16 at real widths ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("e,h", [(768, 2048), (1152, 4304)])  # EVA02-B; SigLIP so400m-like width
def test_swiglu_real_sizes_gpu(e, h, dtype, device):
    m = 197 * 4
    x, ws, bs, owners = glu_operands((4, 197), e, h, dtype, device, layout="packed", grad=True)
    g = randn(4, 197, h, dtype=dtype, device=device)
    got = ops.linear(x, ws, bs, activation="swiglu")
    grads = torch.autograd.grad((got * g).sum(), owners)
    lowp = swiglu_ref(x, *ws, *bs)
    lowp_grads = torch.autograd.grad((lowp * g).sum(), owners)
    ref = swiglu_ref(d(x), *map(d, ws), *map(d, bs))
    ref_grads = torch.autograd.grad((ref * d(g)).sum(), owners)
    assert_matches(got, lowp.detach(), ref.detach())
    for name, a, lp, r in zip(("x", "weight", "bias"), grads, lowp_grads, ref_grads):
        assert_matches(a, lp, r, name=f"d{name}")
    # dropout: the same Philox mask as the standalone dropout kernel applies to the dense product
    seed = new_seed()
    flat = [t.detach() for t in (x.view(m, e), *ws, *bs)]
    dropped = linear_launch(flat[0], flat[1], flat[3], "swiglu", dropout=0.1, seed=seed, weight2=flat[2],
                            bias2=flat[4])
    dense = linear_launch(flat[0], flat[1], flat[3], "swiglu", weight2=flat[2], bias2=flat[4])
    torch.testing.assert_close(dropped, dropout_launch(dense, seed, 0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_elementwise_activations_real_sizes_gpu(activation, device):
    x = randn(4 * 257, 1024, dtype=torch.bfloat16, device=device)  # CLIP ViT-L/14: E=1024, fc1 to 4096
    w, b = randn(4096, 1024, dtype=torch.bfloat16, device=device, scale=1024 ** -0.5), randn(
        4096, dtype=torch.bfloat16, device=device)
    assert_matches(ops.linear(x, w, b, activation=activation), linear_torch(x, w, b, activation),
                   linear_torch(d(x), d(w), d(b), activation))
