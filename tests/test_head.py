"""Classification head: token mean / token select + LayerNorm in one kernel, then the GEMM."""
import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops

from helpers import DTYPES, assert_matches, randn


def torch_head(x, w, b, eps, hw, hb, pool, start, norm=True):
    pooled = x[:, start:].mean(1) if pool == "mean" else x[:, start]
    if norm:
        pooled = F.layer_norm(pooled, pooled.shape[-1:], w, b, eps)
    return F.linear(pooled, hw, hb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool,start", [("mean", 0), ("mean", 1), ("mean", 5), ("token", 0), ("token", 3)])
@pytest.mark.parametrize("shape", [(3, 26, 48), (2, 197, 50), (1, 1, 24)])
def test_matches_pytorch(shape, pool, start, dtype, device):
    B, N, E = shape
    start = min(start, N - 1)
    x = randn(B, N, E, dtype=dtype, device=device, scale=2.0) + 0.5
    w, b = randn(E, dtype=dtype, device=device), randn(E, dtype=dtype, device=device)
    hw, hb = randn(10, E, dtype=dtype, device=device, scale=E ** -0.5), randn(10, dtype=dtype, device=device)
    args = (w, b, 1e-5, hw, hb, pool, start)
    got = ops.classification_head(x, *args)
    expected = torch_head(x.double(), *[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    assert_matches(got, torch_head(x, *args), expected)


def test_pool_without_norm(device):
    x = randn(2, 26, 40, device=device)
    torch.testing.assert_close(ops.pool_tokens(x, "mean", 1, norm=False), x[:, 1:].mean(1))
    torch.testing.assert_close(ops.pool_tokens(x, "token", 0, norm=False), x[:, 0])


@pytest.mark.parametrize("call,error,match", [
    (lambda x: ops.pool_tokens(x[0]), ValueError, "must have 3 dimensions"),
    (lambda x: ops.pool_tokens(x, "max"), ValueError, "pool must be one of"),
    (lambda x: ops.pool_tokens(x, "mean", 26), ValueError, "outside the 26 tokens"),
    (lambda x: ops.pool_tokens(x, "mean", 0, torch.ones(3)), ValueError, "weight has 3 elements"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 26, 40))
