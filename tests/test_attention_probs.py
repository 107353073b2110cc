"""Attention maps: the probabilities kernel against the reference softmax, and the models' opt-in path."""
import pytest
import torch

from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.ops.attention import attention_torch_probabilities, split_qkv

from helpers import assert_matches, randn


@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
def test_the_ops_softmax_is_the_oracles(scaling):
    """The ops compute their own masked softmax (they never import the oracle); in fp64 it equals
    reference.attention_probabilities, a row with no allowed key included, and its gradient stays finite."""
    qkv = randn(2, 9, 3 * 2 * 8, dtype=torch.float64).requires_grad_()
    mask = torch.rand(2, 1, 9, 9) > 0.5
    mask[0, 0, 3] = False  # query 3 of sample 0 may attend nothing: zeros, not NaN
    q, k, _ = split_qkv(qkv, 2, "qkv h d")
    energy = q @ k.transpose(-1, -2) / (8 ** 0.5 if scaling == "paper" else 1.0)
    expected = R.attention_probabilities(energy, mask)
    got = attention_torch_probabilities(qkv, 2, "qkv h d", scaling, mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert not got[0, :, 3].any()
    (grad,) = torch.autograd.grad((got * torch.randn_like(got)).sum(), qkv)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("layout", ["h d qkv", "qkv h d"])
@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
@pytest.mark.parametrize("shape", [(2, 37, 3, 24), (1, 65, 2, 16)])  # odd token counts, head_dim 24
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_softmax(layout, scaling, shape, masked, device):
    B, N, H, D = shape
    qkv = randn(B, N, 3 * H * D, device=device)
    mask = None
    if masked:
        mask = torch.rand(B, 1, N, N, device=device) > 0.4
        mask[0, 0, 3] = False  # a query with no key to attend to: a row of zeros
    ops.reset_launch_counts()
    got = ops.attention_probabilities(qkv, H, layout, scaling, mask)
    assert ops.launch_counts() == {"attention_probs": 1}
    expected = attention_torch_probabilities(qkv.double(), H, layout, scaling, mask)
    assert got.shape == (B, H, N, N) and got.dtype == qkv.dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    rows = got.sum(-1)
    if masked:
        assert torch.equal(got[0, :, 3], torch.zeros_like(got[0, :, 3]))
    else:
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_fp16_within_twice_pytorch_error(device):
    qkv = randn(2, 26, 3 * 2 * 32, device=device, dtype=torch.float16)
    assert_matches(ops.attention_probabilities(qkv, 2, "qkv h d", "paper"),
                   attention_torch_probabilities(qkv, 2, "qkv h d", "paper").half(),
                   attention_torch_probabilities(qkv.double(), 2, "qkv h d", "paper"))


def test_detached_and_torch_backend(device):
    qkv = randn(1, 9, 48, device=device).requires_grad_()
    got = ops.attention_probabilities(qkv, 2, "qkv h d", "paper")
    assert not got.requires_grad
    with ops.use_backend("torch"):
        torch.testing.assert_close(ops.attention_probabilities(qkv, 2, "qkv h d", "paper"), got)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_heads=5), ValueError, "must be 3 \\* num_heads"),
    (dict(layout="h qkv d"), ValueError, "layout must be one of"),
    (dict(scaling="none"), ValueError, "scaling must be"),
    (dict(mask=torch.ones(9, 9)), TypeError, "mask must be a torch.bool"),
])
def test_bad_input(kwargs, error, match):
    args = dict(qkv=torch.randn(1, 9, 48), num_heads=2, **kwargs) if "num_heads" not in kwargs else \
        dict(qkv=torch.randn(1, 9, 48), **kwargs)
    with pytest.raises(error, match=match):
        ops.attention_probabilities(**args)
