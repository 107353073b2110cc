"""Flash attention from the fused qkv buffer: both layouts, both scalings, odd N, odd head_dim, masks."""
import math

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.attention import attention_torch, split_qkv

from helpers import DTYPES, assert_matches, randn

LAYOUTS = ["h d qkv", "qkv h d"]
SHAPES = [(2, 26, 2, 16), (2, 65, 3, 24), (1, 197, 2, 64), (2, 37, 1, 80), (3, 1, 2, 16)]  # B, N, heads, head_dim


def qkv_buffer(B, N, H, D, dtype, device):
    return randn(B, N, 3 * H * D, dtype=dtype, device=device)


def check(qkv, H, layout, scaling, mask=None):
    got = ops.attention(qkv, H, layout, scaling, mask)
    expected = attention_torch(qkv.double(), H, layout, scaling, mask)
    lowp = attention_torch(qkv, H, layout, scaling, mask)
    assert got.dtype == qkv.dtype
    assert_matches(got, lowp, expected)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, layout, scaling, dtype, device):
    check(qkv_buffer(*shape, dtype, device), shape[2], layout, scaling)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paper_scaling_equals_sdpa(dtype, device):
    B, N, H, D = 2, 65, 3, 24
    qkv = qkv_buffer(B, N, H, D, dtype, device)
    q, k, v = split_qkv(qkv.float(), H, "qkv h d")
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    got = ops.attention(qkv, H, "qkv h d", "paper")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(65, 65), (2, 1, 65, 65), (1, 3, 65, 65), (2, 3, 65, 65), (2, 1, 1, 65)])
@pytest.mark.parametrize("scaling", ["tutorial", "paper"])
def test_masks(mask_shape, scaling, dtype, device):
    qkv = qkv_buffer(2, 65, 3, 24, dtype, device)
    mask = torch.rand(*mask_shape, device=device) > 0.3
    check(qkv, 3, "h d qkv", scaling, mask)


def test_fully_masked_rows_are_zero(device):
    qkv = qkv_buffer(2, 26, 2, 16, torch.float32, device)
    mask = torch.rand(2, 2, 26, 26, device=device) > 0.5
    mask[1, 0, 7] = False
    mask[0, :, :, 20:] = False  # whole key blocks masked for everyone
    got = check(qkv, 2, "qkv h d", "paper", mask)
    assert torch.count_nonzero(got[1, 7, :16]) == 0  # head 0 of query 7: nothing to attend to
    assert torch.isfinite(got).all()


def test_tutorial_scaling_divides_after_softmax(device):
    qkv = qkv_buffer(1, 26, 2, 16, torch.float32, device)
    tutorial = ops.attention(qkv, 2, "qkv h d", "tutorial")
    q, k, v = split_qkv(qkv, 2, "qkv h d")
    unscaled = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(1, 26, 32)
    torch.testing.assert_close(tutorial, unscaled / math.sqrt(32), rtol=1e-4, atol=1e-5)


def test_strided_qkv_view(device):
    big = qkv_buffer(2, 26, 2, 16, torch.float32, device)
    padded = torch.cat([big, big[..., :5]], dim=-1)[..., :96]  # row stride 101, not 96
    assert not padded.is_contiguous()
    torch.testing.assert_close(ops.attention(padded, 2), ops.attention(big, 2))


@pytest.mark.parametrize("call,error,match", [
    (lambda q: ops.attention(q[0], 2), ValueError, "must have 3 dimensions"),
    (lambda q: ops.attention(q[..., :95], 2), ValueError, "3 \\* num_heads \\* head_dim"),
    (lambda q: ops.attention(q, 0), ValueError, "num_heads must be a positive"),
    (lambda q: ops.attention(q, 2, layout="b n d"), ValueError, "layout must be one of"),
    (lambda q: ops.attention(q, 2, scaling="none"), ValueError, "scaling must be"),
    (lambda q: ops.attention(q, 2, mask=torch.ones(26, 26)), TypeError, "torch.bool"),
    (lambda q: ops.attention(q, 2, mask=torch.ones(3, 26, dtype=torch.bool)), ValueError, "does not broadcast"),
    (lambda q: ops.attention(q.long(), 2), TypeError, "supported: float32"),
    (lambda q: ops.attention(torch.randn(1, 4, 3 * 300), 1), ValueError, "exceeds the kernel's maximum"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 26, 96))
