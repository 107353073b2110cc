"""LayerNorm: fp32 statistics, masked odd widths, any eps, optional affine, against F.layer_norm."""
import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.layer_norm import layer_norm_launch

from helpers import DTYPES, assert_matches, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 48), (3, 26, 50), (2, 197, 72), (5, 1000), (4, 1280)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_matches_pytorch(shape, eps, dtype, device):
    e = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, scale=3.0) + 2.0  # offset: the mean matters
    w, b = randn(e, dtype=dtype, device=device), randn(e, dtype=dtype, device=device)
    got = ops.layer_norm(x, w, b, eps)
    expected = F.layer_norm(x.double(), (e,), w.double(), b.double(), eps)
    lowp = F.layer_norm(x, (e,), w, b, eps)
    assert got.dtype == dtype
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("affine", [(False, False), (True, False)])
def test_without_weight_or_bias(affine, device):
    x = randn(6, 33, device=device)
    w = randn(33, device=device) if affine[0] else None
    torch.testing.assert_close(ops.layer_norm(x, w, None), F.layer_norm(x, (33,), w, None, 1e-5))


def test_statistics_are_fp32(device):
    x = randn(5, 40, dtype=torch.float16, device=device)
    _, mean, rstd = layer_norm_launch(x, None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean, x.float().mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().var(-1, unbiased=False) + 1e-5))


def test_large_offset_is_stable(device):
    x = randn(4, 64, device=device) + 1e4  # a naive E[x^2] - E[x]^2 would cancel badly
    expected = F.layer_norm(x.double(), (64,))
    err = (ops.layer_norm(x, None, None).double() - expected).abs().max()
    assert err <= 2 * (F.layer_norm(x, (64,)).double() - expected).abs().max() + 1e-5


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: ops.layer_norm(x, w[:5], None), ValueError, "weight has 5 elements"),
    (lambda x, w: ops.layer_norm(x, w.half(), None), TypeError, "must match the input"),
    (lambda x, w: ops.layer_norm(x, w, None, eps=0), ValueError, "eps must be a positive"),
    (lambda x, w: ops.layer_norm(x.int(), w, None), TypeError, "supported: float32"),
    (lambda x, w: ops.layer_norm(x[:, :0], None, None), ValueError, "non-empty last"),
])
def test_bad_input(call, error, match):
    x, w = torch.randn(3, 10), torch.randn(10)
    with pytest.raises(error, match=match):
        call(x, w)
