"""Latent-query attention (MAP pooling): values and gradients vs fp64 SDPA on the split heads, shared (expanded)
queries, qk-norm, odd shapes, bad inputs, and the real SigLIP sizes on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.latent_attention import latent_attention_torch, split_latent_heads

from helpers import DTYPES, assert_matches, randn

# B, L, N, heads, head_dim
SHAPES = [(1, 1, 37, 2, 24), (3, 1, 19, 3, 18), (3, 3, 37, 1, 72), (1, 3, 19, 2, 24), (3, 1, 37, 2, 72)]


def sdpa_reference(q, kv, heads, norms=None, eps=1e-6):
    """softmax(q_h k_h^T / sqrt(D)) v_h per head with F.scaled_dot_product_attention, in the inputs' dtype (the
    fp64 reference)."""
    B, L, E = q.shape
    qh, k, v = split_latent_heads(q, kv, heads)
    if norms is not None:
        qh = F.layer_norm(qh, (E // heads,), norms[0], norms[1], eps)
        k = F.layer_norm(k, (E // heads,), norms[2], norms[3], eps)
    return F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(B, L, E)


def lowp(q, kv, heads, norms=None, eps=1e-6):
    """PyTorch's own low-precision result, rounding where the kernels do (latent_attention_torch: P is cast to
    the input dtype before P @ V), as the attention tests' torch_lowp."""
    return latent_attention_torch(q, kv, heads, "paper", *(norms if norms is not None else (None,) * 4), eps)


def inputs(B, L, N, H, D, dtype, device, shared=True, grad=False):
    """(latent [1 or B, L, E] leaf, q as the op sees it, kv)."""
    latent = randn(1 if shared else B, L, H * D, dtype=dtype, device=device, grad=grad)
    kv = randn(B, N, 2 * H * D, dtype=dtype, device=device, grad=grad)
    return latent, latent.expand(B, L, H * D), kv


def norm_vectors(D, dtype, device, grad=False):
    return [(randn(D, device=device, scale=0.3) + offset).to(dtype).requires_grad_(grad) for offset in (1, 0, 1, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_sdpa(shape, dtype, device):
    _, q, kv = inputs(*shape, dtype, device)
    assert q.stride(0) == 0 or shape[0] == 1  # the shared latent, expanded
    ops.reset_launch_counts()
    got = ops.latent_attention(q, kv, shape[3])
    assert ops.launch_counts() == {"latent_attention": 1}
    assert got.dtype == dtype and got.shape == q.shape
    assert_matches(got, lowp(q, kv, shape[3]), sdpa_reference(q.double(), kv.double(), shape[3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 37, 2, 24), (1, 3, 19, 1, 72)])
def test_gradients(shape, dtype, device):
    """q expanded from a shared [1, L, E] latent (autograd sums the batch) and kv, against fp64 SDPA."""
    B, L, _, H, D = shape
    latent, q, kv = inputs(*shape, dtype, device, grad=True)
    out = ops.latent_attention(q, kv, H)
    g = randn(*out.shape, dtype=dtype, device=device)
    dlatent, dkv = torch.autograd.grad((out * g).sum(), (latent, kv))
    assert dlatent.shape == latent.shape and dkv.shape == kv.shape
    ref_inputs = [t.detach().double().requires_grad_() for t in (latent, kv)]
    ref_out = sdpa_reference(ref_inputs[0].expand(B, L, H * D), ref_inputs[1], H)
    ref_grads = torch.autograd.grad((ref_out * g.double()).sum(), ref_inputs)
    low_inputs = [t.detach().requires_grad_() for t in (latent, kv)]
    low_out = lowp(low_inputs[0].expand(B, L, H * D), low_inputs[1], H)
    low_grads = torch.autograd.grad((low_out * g).sum(), low_inputs)
    for name, ours, low, ref in zip(("dlatent", "dkv"), (dlatent, dkv), low_grads, ref_grads):
        assert_matches(ours, low, ref, name=name)


def test_per_sample_queries_and_many_latents(device):
    """Unshared [B, L, E] queries, and L = 20 (two launches of 16 and 4 queries): forward and gradients."""
    B, L, N, H, D = 2, 20, 19, 2, 24
    _, q, kv = inputs(B, L, N, H, D, torch.float32, device, shared=False)
    q, kv = q.detach().requires_grad_(), kv.detach().requires_grad_()
    ops.reset_launch_counts()
    out = ops.latent_attention(q, kv, H)
    assert ops.launch_counts() == {"latent_attention": 2}
    ref_q, ref_kv = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    ref = sdpa_reference(ref_q, ref_kv, H)
    assert_matches(out, None, ref)
    g = randn(*out.shape, device=device)
    grads = torch.autograd.grad((out * g).sum(), (q, kv))
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (ref_q, ref_kv))
    for name, ours, expected in zip(("dq", "dkv"), grads, ref_grads):
        assert_matches(ours, None, expected, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("latents", [1, 3])
def test_qk_norm_matches_timm(latents, dtype, device):
    """timm AttentionPoolLatent(qk_norm=True): LayerNorm over head_dim on q and k; values and all gradients."""
    B, N, H, D = 3, 19, 2, 24
    latent, q, kv = inputs(B, latents, N, H, D, dtype, device, grad=True)
    norms = norm_vectors(D, dtype, device, grad=True)
    out = ops.latent_attention(q, kv, H, q_norm_weight=norms[0], q_norm_bias=norms[1], k_norm_weight=norms[2],
                               k_norm_bias=norms[3])
    g = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad((out * g).sum(), (latent, kv, *norms))

    def run(cast, fn):
        leaves = [cast(t.detach()).requires_grad_() for t in (latent, kv, *norms)]
        o = fn(leaves[0].expand(B, latents, H * D), leaves[1], H, leaves[2:])
        return o, torch.autograd.grad((o * cast(g)).sum(), leaves)

    ref_out, ref_grads = run(torch.Tensor.double, sdpa_reference)
    low_out, low_grads = run(lambda t: t, lowp)
    assert_matches(out, low_out, ref_out)
    names = ("dlatent", "dkv", "dq_norm_weight", "dq_norm_bias", "dk_norm_weight", "dk_norm_bias")
    for name, ours, low, ref in zip(names, grads, low_grads, ref_grads):
        assert ours.dtype == dtype
        assert_matches(ours, low, ref, name=name)


@pytest.mark.parametrize("which", ["both", "q", "k"])
def test_qk_norm_without_bias_or_on_one_side(which, device):
    """Weights only (no bias), on q, k or both: values and the gradients of what is given."""
    B, L, N, H, D = 2, 1, 19, 2, 24
    latent, q, kv = inputs(B, L, N, H, D, torch.float32, device, grad=True)
    qw, _, kw, _ = norm_vectors(D, torch.float32, device, grad=True)
    qw, kw = (qw if which != "k" else None), (kw if which != "q" else None)
    out = ops.latent_attention(q, kv, H, q_norm_weight=qw, k_norm_weight=kw, qk_norm_eps=1e-5)
    leaves = [t for t in (latent, kv, qw, kw) if t is not None]
    g = randn(*out.shape, device=device)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_qw = ref_leaves[2] if qw is not None else None
    ref_kw = ref_leaves[-1] if kw is not None else None
    expected = latent_attention_torch(ref_leaves[0].expand(B, L, H * D), ref_leaves[1], H, "paper", ref_qw, None,
                                      ref_kw, None, 1e-5)
    assert_matches(out, None, expected)
    for ours, ref in zip(grads, torch.autograd.grad((expected * g.double()).sum(), ref_leaves)):
        assert_matches(ours, None, ref, name="gradient")


def test_matches_timm_attention_pool_latent(device):
    """timm's own module (SDPA path): its attention computed by the op from its q and kv projections."""
    timm_pool = pytest.importorskip("timm.layers.attention_pool")
    E, H, N, B = 48, 2, 19, 3
    pool = timm_pool.AttentionPoolLatent(E, num_heads=H, qk_norm=True, out_features=0).to(device).eval()
    for p in pool.parameters():  # LayerNorm's init (ones, zeros) would not test the affine part
        torch.nn.init.normal_(p, std=0.5)
    x = randn(B, N, E, device=device)
    with torch.no_grad():
        expected = pool(x)  # pool_type "token": latent 0, no projection (out_features=0)
        q = pool.q(pool.latent)  # [1, L, E]: the shared projection, computed once
        got = ops.latent_attention(q.expand(B, -1, -1), pool.kv(x), H, q_norm_weight=pool.q_norm.weight,
                                   q_norm_bias=pool.q_norm.bias, k_norm_weight=pool.k_norm.weight,
                                   k_norm_bias=pool.k_norm.bias, qk_norm_eps=pool.q_norm.eps)[:, 0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_tutorial_scaling_and_fallback(device):
    B, L, N, H, D = 2, 3, 19, 2, 24
    _, q, kv = inputs(B, L, N, H, D, torch.float32, device)
    got = ops.latent_attention(q, kv, H, scaling="tutorial")
    qh, k, v = split_latent_heads(q.double(), kv.double(), H)
    expected = (torch.softmax(qh @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(B, L, H * D) / (H * D) ** 0.5
    assert_matches(got, None, expected)
    with ops.use_backend("torch"):
        assert_matches(ops.latent_attention(q, kv, H, scaling="tutorial"), None, expected)


def test_strided_kv_view(device):
    """kv as a column slice of a wider buffer (row stride 2E + 5) and a q that is a view, not expanded."""
    B, L, N, H, D = 2, 1, 19, 2, 24
    wide = randn(B, N, 2 * H * D + 5, device=device)
    kv = wide[..., 5:]
    q = randn(B, 2 * L, H * D, device=device)[:, ::2]
    assert not kv.is_contiguous() and not q.is_contiguous()
    torch.testing.assert_close(ops.latent_attention(q, kv, H), ops.latent_attention(q.contiguous(),
                                                                                    kv.contiguous(), H))


def test_deterministic_backward(device):
    latent, q, kv = inputs(3, 3, 37, 2, 24, torch.float32, device, grad=True)
    g = randn(3, 3, 48, device=device)
    first = torch.autograd.grad((ops.latent_attention(q, kv, 2) * g).sum(), (latent, kv))
    second = torch.autograd.grad((ops.latent_attention(q, kv, 2) * g).sum(), (latent, kv))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_latents_and_batch(device):
    kv = randn(2, 5, 48, device=device, grad=True)
    q = randn(2, 0, 24, device=device, grad=True)
    out = ops.latent_attention(q, kv, 2)
    assert out.shape == (2, 0, 24)
    (dkv,) = torch.autograd.grad(out.sum(), (kv,), allow_unused=True)
    assert dkv is None or torch.count_nonzero(dkv) == 0
    assert ops.latent_attention(randn(0, 1, 24, device=device), randn(0, 5, 48, device=device), 2).shape == (0, 1, 24)


def bad_calls():
    q, kv = torch.randn(2, 1, 48), torch.randn(2, 19, 96)
    w = torch.randn(24)
    return [
        (lambda: ops.latent_attention(q[0], kv, 2), ValueError, "q must have 3 dimensions"),
        (lambda: ops.latent_attention(q, kv[0], 2), ValueError, "kv must have 3 dimensions"),
        (lambda: ops.latent_attention(q, kv[..., :48], 2), ValueError, "kv feature size 48 must be 2 \\* E = 96"),
        (lambda: ops.latent_attention(q, kv[:1], 2), ValueError, "kv has batch 1 but q has batch 2"),
        (lambda: ops.latent_attention(q, kv, 5), ValueError, "E = 48 must be divisible by num_heads = 5"),
        (lambda: ops.latent_attention(q, kv, 0), ValueError, "num_heads must be a positive"),
        (lambda: ops.latent_attention(q, kv, 2.0), ValueError, "num_heads must be a positive"),
        (lambda: ops.latent_attention(torch.randn(1, 1, 300), torch.randn(1, 4, 600), 1), ValueError,
         "head_dim 300 exceeds the kernel's maximum of 256"),
        (lambda: ops.latent_attention(q, kv[:, :0], 2), ValueError, "kv has no tokens"),
        (lambda: ops.latent_attention(q, kv.half(), 2), TypeError, "kv has dtype torch.float16 but must match"),
        (lambda: ops.latent_attention(q.long(), kv, 2), TypeError, "q has dtype torch.int64; supported"),
        (lambda: ops.latent_attention(q, kv.double(), 2), TypeError, "kv has dtype torch.float64; supported"),
        (lambda: ops.latent_attention(q.tolist(), kv, 2), TypeError, "q must be a torch.Tensor"),
        (lambda: ops.latent_attention(q, kv.to("meta"), 2), ValueError, "kv is on meta but the input is on cpu"),
        (lambda: ops.latent_attention(q, kv, 2, scaling="none"), ValueError, "scaling must be one of"),
        (lambda: ops.latent_attention(q, kv, 2, q_norm_weight=w[:8]), ValueError,
         "q_norm_weight has 8 elements, expected 24"),
        (lambda: ops.latent_attention(q, kv, 2, k_norm_weight=w.half()), TypeError, "k_norm_weight has dtype"),
        (lambda: ops.latent_attention(q, kv, 2, k_norm_weight=w.to("meta")), ValueError,
         "k_norm_weight is on meta"),
        (lambda: ops.latent_attention(q, kv, 2, q_norm_bias=w), ValueError, "q_norm_bias needs q_norm_weight"),
        (lambda: ops.latent_attention(q, kv, 2, k_norm_weight=w, qk_norm_eps=0.0), ValueError,
         "qk_norm_eps must be a positive number"),
        (lambda: ops.latent_attention(q, kv, 2, mask=torch.ones(19, dtype=torch.bool)), TypeError, "mask"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input(index):
    call, error, match = bad_calls()[index]
    with pytest.raises(error, match=match):
        call()


# --- real SigLIP sizes: GPU only (the interpreter is too slow and computes bf16 wrongly) -----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,H,N,B", [(1152, 16, 729, 8), (768, 12, 196, 8)],
                         ids=["siglip_so400m", "siglip_b16"])
def test_siglip_sizes(E, H, N, B, dtype, device):
    """SigLIP so400m/14@384 (head_dim 72, 729 tokens) and SigLIP-B/16@224 (head_dim 64, 196 tokens), L = 1."""
    D = E // H
    latent, q, kv = inputs(B, 1, N, H, D, dtype, device, grad=True)
    out = ops.latent_attention(q, kv, H)
    assert_matches(out, lowp(q, kv, H), sdpa_reference(q.double(), kv.double(), H))
    g = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad((out * g).sum(), (latent, kv))

    def run(cast, fn):
        leaves = [cast(t.detach()).requires_grad_() for t in (latent, kv)]
        o = fn(leaves[0].expand(B, 1, E), leaves[1], H)
        return torch.autograd.grad((o * cast(g)).sum(), leaves)

    for name, ours, low, ref in zip(("dlatent", "dkv"), grads, run(lambda t: t, lowp),
                                    run(torch.Tensor.double, sdpa_reference)):
        assert_matches(ours, low, ref, name=name)
