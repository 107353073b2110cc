"""Patch embedding in one kernel: image [B, C, H, W] -> tokens [B, P + L, E].

The conv with kernel = stride = patch is a GEMM whose A rows are patches read straight from the image by
strides (no unfold copy). Output rows 0..P-1 of each image are the prefix tokens (cls, registers); the
GEMM rows past them are the patches, with conv bias added. The position embedding is added to every row
(``pos_on_prefix=True``, the tutorial and most timm models) or only to the patch rows (timm's
``no_embed_class``). Pixels past the last whole patch are ignored, as the strided conv does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..validate import check_device, check_tensor
from .dispatch import dispatch
from .launch import Tuned, cdiv, config, dot_precision, launch_grid, new_output
from .plans import planned
from .registry import BenchCase, GradCase, KernelGrid, OpSpec, randn, register


@triton.jit
def _patch_embed_kernel(img_ptr, w_ptr, bias_ptr, prefix_ptr, pos_ptr, out_ptr,
                        M, T, E, K, P, grid_w,
                        stride_ib, stride_ic, stride_ih, stride_iw, stride_wn,
                        PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, POS_ON_PREFIX: tl.constexpr,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows over [B * T]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    n_mask = offs_n < E
    token = rows % T
    is_patch = row_ok & (token >= P)
    patch_idx = tl.where(is_patch, token - P, 0)
    # top-left pixel of each row's patch
    row_off = ((rows // T).to(tl.int64) * stride_ib + (patch_idx // grid_w * PATCH).to(tl.int64) * stride_ih
               + (patch_idx % grid_w * PATCH).to(tl.int64) * stride_iw)
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k  # conv weight order (c, i, j); a constexpr PATCH keeps j runs contiguous
        k_ok = ks < K
        c = ks // (PATCH * PATCH)
        i = (ks // PATCH) % PATCH
        j = ks % PATCH
        k_off = c.to(tl.int64) * stride_ic + i * stride_ih + j * stride_iw
        a = tl.load(img_ptr + row_off[:, None] + k_off[None, :], mask=is_patch[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        w_ptrs += BLOCK_K

    mask = row_ok[:, None] & n_mask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    is_prefix = row_ok & (token < P)
    prefix = tl.load(prefix_ptr + tl.where(is_prefix, token, 0)[:, None] * E + offs_n[None, :],
                     mask=is_prefix[:, None] & n_mask[None, :], other=0.0)
    acc += prefix.to(tl.float32)
    if HAS_POS:
        if POS_ON_PREFIX:
            pos_row = token
            pos_ok = row_ok
        else:
            pos_row = patch_idx
            pos_ok = is_patch
        # int64: a huge image's position table can itself pass 2**31 elements
        acc += tl.load(pos_ptr + pos_row.to(tl.int64)[:, None] * E + offs_n[None, :],
                       mask=pos_ok[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * E + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


PATCH_EMBED = Tuned(
    "patch_embed", _patch_embed_kernel,
    configs=[  # 4-warp 128x128 and any 128x256 tile spill registers on sm_80/sm_90 (compile check)
        config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
        config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
        config(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
        config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    ],
    key=["M", "E", "K", "PATCH"],
    interpret_config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
    aligned=("stride_wn", "E", "K"),
)


def patch_embed_launch(img, weight, bias, prefix, pos, pos_on_prefix):
    B, C, H, W = img.shape
    E, _, p, _ = weight.shape
    gh, gw = H // p, W // p
    P = prefix.shape[0]
    T = P + gh * gw
    M, K = B * T, C * p * p
    out = new_output((B, T, E), img.device, img.dtype)
    if M == 0:
        return out
    w2 = weight.reshape(E, K)  # a view of the conv weight: (c, i, j) order
    PATCH_EMBED.launch(
        lambda meta: launch_grid(cdiv(M, meta["BLOCK_M"]), cdiv(E, meta["BLOCK_N"])),
        img, w2, img if bias is None else bias, prefix if P else img, img if pos is None else pos, out,
        M, T, E, K, P, gw, *img.stride(), w2.stride(0), PATCH=p,
        HAS_BIAS=bias is not None, HAS_POS=pos is not None, POS_ON_PREFIX=pos_on_prefix,
        DOT_PRECISION=dot_precision(img.dtype))
    return out


def patch_embed_backward(dy, img, weight, prefix_rows, pos_on_prefix, needs):
    """(dimg, dweight, dbias, dprefix, dpos). The conv gradients are cuBLAS/cuDNN through torch (the plain
    GEMMs of backward); the rest are sums over the batch of dy's rows."""
    B, _, H, W = img.shape
    E, _, p, _ = weight.shape
    dpatch = dy[:, prefix_rows:]  # [B, L, E]
    dconv = dpatch.transpose(1, 2).reshape(B, E, H // p, W // p)
    dimg = torch.nn.grad.conv2d_input(img.shape, weight, dconv, stride=p) if needs[0] else None
    dweight = torch.nn.grad.conv2d_weight(img, weight.shape, dconv, stride=p) if needs[1] else None
    dbias = dpatch.float().sum((0, 1)).to(weight.dtype) if needs[2] else None
    dprefix = dy[:, :prefix_rows].float().sum(0).to(weight.dtype) if needs[3] else None
    dpos = None
    if needs[4]:
        dpos = (dy if pos_on_prefix else dpatch).float().sum(0).to(weight.dtype)
    return dimg, dweight, dbias, dprefix, dpos


@torch.library.custom_op("vit_kernels::patch_embed", mutates_args=())
def patch_embed_op(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: torch.Tensor,
                   pos: torch.Tensor | None, pos_on_prefix: bool) -> torch.Tensor:
    return patch_embed_launch(img, weight, bias, prefix, pos, pos_on_prefix)


@patch_embed_op.register_fake
def _(img, weight, bias, prefix, pos, pos_on_prefix):
    p = weight.shape[-1]
    tokens = prefix.shape[0] + (img.shape[2] // p) * (img.shape[3] // p)
    return img.new_empty((img.shape[0], tokens, weight.shape[0]))


def _patch_embed_setup(ctx, inputs, output):
    img, weight, _bias, prefix, _pos, pos_on_prefix = inputs
    ctx.save_for_backward(img, weight)
    ctx.prefix_rows, ctx.pos_on_prefix = prefix.shape[0], pos_on_prefix


def _patch_embed_grad(ctx, dy):
    img, weight = ctx.saved_tensors
    grads = patch_embed_backward(dy, img, weight, ctx.prefix_rows, ctx.pos_on_prefix, ctx.needs_input_grad)
    return (*grads, None)


patch_embed_op.register_autograd(_patch_embed_grad, setup_context=_patch_embed_setup)


def patch_embed_torch(img, weight, bias, prefix, pos, pos_on_prefix):
    """The PyTorch fallback, same semantics."""
    B = img.shape[0]
    x = F.conv2d(img, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if pos is not None and not pos_on_prefix:
        x = x + pos
    x = torch.cat([prefix.unsqueeze(0).expand(B, -1, -1), x], dim=1)
    if pos is not None and pos_on_prefix:
        x = x + pos
    return x


def check_patch_embed(img, weight, bias, prefix, pos, pos_on_prefix):
    check_tensor("image", img, dims=4)
    check_tensor("weight", weight, dims=4, dtype=img.dtype)
    check_device("weight", weight, img.device)
    E, C, p, q = weight.shape
    if p != q:
        raise ValueError(f"patch must be square, weight has kernel {p}x{q}")
    if img.shape[1] != C:
        raise ValueError(f"image has {img.shape[1]} channels but the patch weight expects {C}")
    if img.shape[2] < p or img.shape[3] < p:
        raise ValueError(f"image {tuple(img.shape[2:])} is smaller than one {p}x{p} patch")
    for name, t in (("bias", bias), ("prefix", prefix), ("pos", pos)):
        if t is not None:
            check_tensor(name, t, dtype=img.dtype)
            check_device(name, t, img.device)
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({E},)")
    if prefix.dim() != 2 or prefix.shape[1] != E:
        raise ValueError(f"prefix tokens must be [P, {E}], got {tuple(prefix.shape)}")
    rows = (img.shape[2] // p) * (img.shape[3] // p) + (prefix.shape[0] if pos_on_prefix else 0)
    if pos is not None and tuple(pos.shape) != (rows, E):
        raise ValueError(f"position embedding has shape {tuple(pos.shape)}, expected {(rows, E)} for a "
                         f"{img.shape[2]}x{img.shape[3]} image with patch {p}")


@planned
def patch_embed(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: torch.Tensor,
                pos: torch.Tensor | None, pos_on_prefix: bool = True) -> torch.Tensor:
    """Conv patch projection + prefix tokens + position embedding.

    img [B, C, H, W]; weight [E, C, p, p] (the Conv2d weight); bias [E] or None; prefix [P, E] (cls then
    registers; P may be 0); pos [P + L, E] if ``pos_on_prefix`` else [L, E], or None. Returns [B, P + L, E].
    """
    check_patch_embed(img, weight, bias, prefix, pos, pos_on_prefix)
    return dispatch((img,), lambda: patch_embed_torch(img, weight, bias, prefix, pos, pos_on_prefix), patch_embed_op,
                    patch_embed_launch, lambda: (img, weight.contiguous(), bias, prefix.contiguous(),
                                                 None if pos is None else pos.contiguous(), pos_on_prefix))


# --- registry entry ----------------------------------------------------------------------------------------
def _inputs(device, dtype=torch.float32, batch=2, grad=False):
    """A 16 x 24 image (2 x 3 patches of 8), 3 channels, 8 features, one cls token, positions on every row."""
    def r(*shape, scale=1.0):
        return randn(*shape, device=device, dtype=dtype, scale=scale, grad=grad)

    return r(batch, 3, 16, 24), r(8, 3, 8, 8, scale=0.2), r(8), r(1, 8), r(7, 8)


def _bench(size, batch, dtype, device):
    e, p, img = size["emb"], size["patch"], size["img"]
    x = randn(batch, 3, img, img, dtype=dtype, device=device)
    w, b = randn(e, 3, p, p, dtype=dtype, device=device, scale=0.05), randn(e, dtype=dtype, device=device)
    cls, pos = randn(1, e, dtype=dtype, device=device), randn((img // p) ** 2 + 1, e, dtype=dtype, device=device)

    def eager():
        tokens = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)
        return torch.cat([cls.expand(batch, 1, e), tokens], dim=1) + pos

    n = (img // p) ** 2
    yield BenchCase(lambda: patch_embed(x, w, b, cls, pos), {"conv2d+cat+add": eager},
                    flops=2 * batch * n * e * 3 * p * p, nbytes=(x.numel() + batch * (n + 1) * e) * x.element_size())


register(OpSpec(
    name="patch_embed",
    fn=patch_embed,
    summary="conv-as-GEMM reading patches straight from the NCHW image by strides + bias + cls/register tokens "
            "+ position embedding",
    kernels=(KernelGrid(PATCH_EMBED, tuple(
        dict(PATCH=patch, HAS_BIAS=True, HAS_POS=True, POS_ON_PREFIX=on, DOT_PRECISION="tf32")
        for patch in (8, 14, 16, 32) for on in (True, False) if on or patch == 16)),),
    custom_ops=(patch_embed_op,),
    opcheck_samples=lambda device: [(patch_embed_op, (*_inputs(device, grad=True), True))],
    grad_cases=lambda device: [GradCase("cls + positions", lambda *args: patch_embed_op(*args, True),
                                        _inputs(device, batch=1, grad=True))],
    examples=lambda device, dtype, batch: [
        (_inputs(device, dtype, batch), {}),
        ((*_inputs(device, dtype, batch)[:3], randn(0, 8, device=device, dtype=dtype),
          randn(6, 8, device=device, dtype=dtype)), dict(pos_on_prefix=False))],
    bench=_bench,
))
