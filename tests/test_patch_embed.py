"""Patch embedding in one kernel: conv GEMM read from the image by strides + bias + prefix + positions."""
import pytest
import torch
import torch.nn.functional as F

from vit_kernels import ops
from vit_kernels.ops.patch_embed import patch_embed_torch

from helpers import DTYPES, assert_matches, randn

# (C, patch, H, W, E): patch 8/14/16/32, non-square images, C = 1..4, E not a multiple of the block
CASES = [(3, 8, 40, 32, 48), (1, 14, 28, 42, 40), (4, 16, 32, 48, 72), (3, 32, 64, 32, 24), (2, 8, 36, 20, 33)]


def operands(C, p, H, W, E, dtype, device, prefix=1, bias=True, pos=True, pos_on_prefix=True):
    img = randn(2, C, H, W, dtype=dtype, device=device)
    weight = randn(E, C, p, p, dtype=dtype, device=device, scale=(C * p * p) ** -0.5)
    L = (H // p) * (W // p)
    return (img, weight, randn(E, dtype=dtype, device=device) if bias else None,
            randn(prefix, E, dtype=dtype, device=device),
            randn(L + (prefix if pos_on_prefix else 0), E, dtype=dtype, device=device) if pos else None,
            pos_on_prefix)


def check(args):
    got = ops.patch_embed(*args)
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in args]
    expected = patch_embed_torch(*as64)
    lowp = patch_embed_torch(*args)
    assert got.dtype == args[0].dtype
    assert_matches(got, lowp, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_conv_cat_add(case, dtype, device):
    check(operands(*case, dtype, device))


@pytest.mark.parametrize("prefix,pos_on_prefix,bias,pos", [
    (0, True, True, True),    # timm class_token=False
    (3, True, True, True),    # cls + 2 registers, positions on all rows
    (3, False, True, True),   # timm no_embed_class: positions on patches only
    (1, True, False, False),  # no conv bias, no position embedding
])
def test_prefix_and_position_variants(prefix, pos_on_prefix, bias, pos, device):
    check(operands(3, 8, 40, 32, 48, torch.float32, device, prefix, bias, pos, pos_on_prefix))


def test_matches_tutorial_formula(device):
    img, weight, bias, cls, pos, _ = operands(3, 8, 32, 32, 48, torch.float32, device)
    conv = F.conv2d(img, weight, bias, stride=8).flatten(2).transpose(1, 2)
    expected = torch.cat([cls.expand(2, 1, 48), conv], dim=1) + pos
    torch.testing.assert_close(ops.patch_embed(img, weight, bias, cls, pos), expected, rtol=1e-4, atol=1e-4)


def test_channels_last_and_strided_images(device):
    img, weight, bias, cls, pos, on = operands(3, 8, 40, 32, 48, torch.float32, device)
    expected = ops.patch_embed(img, weight, bias, cls, pos, on)
    cl = img.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.patch_embed(cl, weight, bias, cls, pos, on), expected)
    wide = torch.cat([img, img], dim=-1)[..., :32]  # a column slice: row stride 64
    torch.testing.assert_close(ops.patch_embed(wide, weight, bias, cls, pos, on), expected)


@pytest.mark.parametrize("call,error,match", [
    (lambda a: ops.patch_embed(a[0][0], *a[1:]), ValueError, "image must have 4 dimensions"),
    (lambda a: ops.patch_embed(a[0][:, :2], *a[1:]), ValueError, "channels but the patch weight expects"),
    (lambda a: ops.patch_embed(a[0][..., :4, :4], *a[1:]), ValueError, "smaller than one"),
    (lambda a: ops.patch_embed(a[0].half(), *a[1:]), TypeError, "must match the input"),
    (lambda a: ops.patch_embed(a[0], a[1][..., :4], *a[2:]), ValueError, "patch must be square"),
    (lambda a: ops.patch_embed(*a[:3], a[3][:, :5], *a[4:]), ValueError, "prefix tokens must be"),
    (lambda a: ops.patch_embed(*a[:4], a[4][:-1], a[5]), ValueError, "position embedding has shape"),
    (lambda a: ops.patch_embed(a[0], a[1], a[2][:3], *a[3:]), ValueError, "bias has shape"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(operands(3, 8, 40, 32, 48, torch.float32, "cpu"))
