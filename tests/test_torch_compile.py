"""torch.library registration: opcheck per op, and torch.compile(fullgraph=True) of the fused models."""
import pytest
import timm
import torch

import vit_kernels
from vit_kernels.ops.attention import attention_backward_op, attention_op, contiguous_key_mask
from vit_kernels.ops.dropout import dropout_op, new_seed
from vit_kernels.ops.head import pool_norm_op
from vit_kernels.ops.layer_norm import layer_norm_backward_op, layer_norm_op
from vit_kernels.ops.linear import linear_op
from vit_kernels.ops.patch_embed import patch_embed_op

from helpers import randn

ODD = dict(in_channels=3, patch_size=8, emb_size=72, img_size=48, depth=2, n_classes=10, num_heads=3)


def op_samples(device):
    def r(*shape, grad=True):
        return randn(*shape, device=device).requires_grad_(grad)

    mask = contiguous_key_mask(torch.rand(2, 1, 9, 9, device=device) > 0.3, 9)
    qkv = r(2, 9, 3 * 2 * 16)
    out, lse = attention_op(qkv.detach(), None, 2, "qkv h d", "paper")
    x, w = r(7, 24), r(24)
    _, mean, rstd = layer_norm_op(x.detach(), w.detach(), None, 1e-5)
    return [
        (layer_norm_op, (x, w, r(24), 1e-5)),
        (layer_norm_op, (r(5, 33), None, None, 1e-6)),
        (layer_norm_backward_op, (r(7, 24, grad=False), x.detach(), w.detach(), mean, rstd)),
        (linear_op, (r(9, 20), r(30, 20), r(30), "gelu", r(30), r(9, 30), 3)),
        (linear_op, (r(4, 8), r(6, 8), None, None, None, None, 1)),
        (attention_op, (qkv, None, 2, "qkv h d", "paper")),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "h d qkv", "seed")),
        (attention_backward_op, (randn(2, 9, 32, device=device), qkv.detach(), out, lse, None, 2, "qkv h d", "paper")),
        (patch_embed_op, (r(2, 3, 16, 24), r(8, 3, 8, 8), r(8), r(1, 8), r(7, 8), True)),
        (pool_norm_op, (r(2, 9, 24), "mean", 1, r(24), r(24), 1e-5, True)),
        (pool_norm_op, (r(2, 9, 24), "token", 0, None, None, 1e-5, False)),
        (linear_op, (r(9, 20), r(30, 20), r(30), "gelu", None, None, 1, 0.25, new_seed())),
        (linear_op, (r(9, 20), r(30, 20), r(30), None, r(30), r(9, 30), 1, 0.25, new_seed())),
        (attention_op, (r(2, 9, 3 * 2 * 16), mask, 2, "h d qkv", "seed", 0.3, new_seed())),
        (dropout_op, (r(6, 40), new_seed(), 0.4)),
        (linear_op, (r(9, 20), r(30, 20), r(30), None, r(30), r(9, 30), 1, 0.0, None,
                     torch.tensor([0.0, 1.5, 1.5], device=device))),
    ]


@pytest.mark.parametrize("index", range(16))
def test_opcheck(index, device):
    op, args = op_samples(device)[index]
    torch.library.opcheck(op, args)


def test_compiled_tutorial_vit_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = vit_kernels.ViT(**ODD).to(device)
    x = randn(2, 3, 48, 48, device=device)
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_tutorial_vit_with_dropout_fullgraph_trains(device):
    """Train mode with all three dropouts: no graph break, and the seeds are traced like any random op."""
    torch._dynamo.reset()
    model = vit_kernels.ViT(**ODD, dropout=0.1, drop_p=0.1, forward_drop_p=0.1).to(device).train()
    compiled = torch.compile(model, fullgraph=True)
    x = randn(2, 3, 48, 48, device=device)
    compiled(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_compiled_from_timm_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=1, num_heads=2, num_classes=7).to(device).eval()
    fast = vit_kernels.from_timm(model)
    x = randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fast, fullgraph=True)(x), fast(x), rtol=1e-5, atol=1e-6)
