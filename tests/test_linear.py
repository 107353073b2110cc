"""The fused GEMM (bias, GELU erf/tanh, layer scale, residual, q/k/v de-interleave) against PyTorch."""
import pytest
import torch

from vit_kernels import ops
from vit_kernels.ops.linear import linear_torch

from helpers import DTYPES, assert_matches, randn

SHAPES = [(1, 1, 1), (37, 70, 50), (130, 96, 48), (5, 300, 33), (2, 26, 40, 24)]  # [..., M, N, K] odd sizes


def operands(shape, dtype, device, bias=True, scale=False, residual=False):
    *lead, n, k = shape
    x = randn(*lead, k, dtype=dtype, device=device)
    w = randn(n, k, dtype=dtype, device=device, scale=k ** -0.5)
    b = randn(n, dtype=dtype, device=device) if bias else None
    s = randn(n, dtype=dtype, device=device) if scale else None
    r = randn(*lead, n, dtype=dtype, device=device) if residual else None
    return x, w, b, s, r


def check(shape, dtype, device, activation=None, deinterleave=1, **flags):
    x, w, b, s, r = operands(shape, dtype, device, **flags)
    got = ops.linear(x, w, b, activation=activation, scale=s, residual=r, deinterleave=deinterleave)
    as64 = [None if t is None else t.double() for t in (x, w, b, s, r)]
    expected = linear_torch(*as64[:2], as64[2], activation, as64[3], as64[4], deinterleave)
    lowp = linear_torch(x, w, b, activation, s, r, deinterleave)
    assert got.dtype == dtype
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_and_bias(shape, dtype, device):
    check(shape, dtype, device, bias=False)
    check(shape, dtype, device, bias=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(37, 70, 50), (2, 26, 40, 24)])
def test_gelu_epilogues(shape, activation, dtype, device):
    check(shape, dtype, device, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 70, 50), (130, 96, 48)])
def test_scale_and_residual_epilogues(shape, dtype, device):
    check(shape, dtype, device, residual=True)
    check(shape, dtype, device, scale=True, residual=True)
    check(shape, dtype, device, activation="gelu", scale=True, residual=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deinterleave_writes_grouped_columns(dtype, device):
    check((2, 26, 72 * 3, 72), dtype, device, deinterleave=3)
    x, w, b, _, _ = operands((9, 3 * 24, 24), torch.float32, device)
    got = ops.linear(x, w, b, deinterleave=3)
    plain = ops.linear(x, w, b)
    torch.testing.assert_close(got, plain.view(9, 24, 3).transpose(1, 2).reshape(9, 72))


def test_non_contiguous_input(device):
    x = randn(40, 30, device=device).t()  # [30, 40], feature stride != 1
    w = randn(20, 40, device=device)
    torch.testing.assert_close(ops.linear(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_kernel_ran_and_poisoned_output_fully_written(device):
    ops.reset_launch_counts()
    x, w, b, _, _ = operands((65, 33, 17), torch.float32, device)
    y = ops.linear(x, w, b)
    assert ops.launch_counts() == {"linear": 1}
    assert torch.isfinite(y).all()


def test_empty_batch(device):
    x, w, b, _, _ = operands((0, 8, 4), torch.float32, device)
    assert ops.linear(x, w, b).shape == (0, 8)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: ops.linear(x[0, 0], w), ValueError, "at least 2 dimensions"),
    (lambda x, w: ops.linear(x, w[:, :5]), ValueError, "features but weight expects"),
    (lambda x, w: ops.linear(x, w.half()), TypeError, "must match the input"),
    (lambda x, w: ops.linear(x.long(), w), TypeError, "supported: float32"),
    (lambda x, w: ops.linear(x, w, torch.ones(3)), ValueError, "bias has 3 elements"),
    (lambda x, w: ops.linear(x, w, activation="relu"), ValueError, "activation must be one of"),
    (lambda x, w: ops.linear(x, w, residual=torch.ones(4, 6)), ValueError, "residual has shape"),
    (lambda x, w: ops.linear(x, w, scale=torch.ones(7, 1)), ValueError, "scale must have 1 dimensions"),
    (lambda x, w: ops.linear(x, w, deinterleave=4), ValueError, "deinterleave must be"),
    (lambda x, w: ops.linear(x, "w"), TypeError, "weight must be a torch.Tensor"),
])
def test_bad_input(call, error, match):
    x, w = torch.randn(2, 4, 10), torch.randn(6, 10)
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.parametrize("split", [False, True])
def test_both_epilogue_paths(split, device):
    """The split (two column halves) and the whole-tile epilogue, pinned instead of autotuned."""
    from vit_kernels.ops.launch import config
    from vit_kernels.ops.linear import linear_launch

    x, w, b, s, r = operands((70, 96, 40), torch.float32, device, scale=True, residual=True)
    cfg = config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, SPLIT_EPILOGUE=split)
    for activation in (None, "gelu"):
        got = linear_launch(x, w, b, activation, s, r, deinterleave=3, config=cfg)
        torch.testing.assert_close(got, linear_torch(x, w, b, activation, s, r, 3), rtol=1e-4, atol=1e-4)
