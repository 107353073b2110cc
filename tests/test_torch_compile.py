"""torch.library registration: opcheck of every registered op's custom ops, and torch.compile(fullgraph=True) of
the fused models."""
import copy

import pytest
import timm
import torch

import vit_kernels
from vit_kernels.ops.registry import registered_ops

from helpers import randn

ODD = dict(in_channels=3, patch_size=8, emb_size=72, img_size=48, depth=2, n_classes=10, num_heads=3)
OPS = [spec.name for spec in registered_ops() if spec.custom_ops]


def opcheck_samples(name, device):
    return next(spec for spec in registered_ops() if spec.name == name).opcheck_samples(device)


@pytest.mark.every_op
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, device):
    """Every sample (op, args) of the op's registry entry passes torch.library.opcheck (schema, fake tensors,
    autograd registration, aot dispatch)."""
    samples = opcheck_samples(name, device)
    assert samples, f"{name} registers custom ops but gives no opcheck samples"
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_opcheck_covers_every_custom_op(device):
    """Each custom op an entry registers appears in its own samples: backward ops included."""
    for spec in registered_ops():
        sampled = {op for op, _ in spec.opcheck_samples(device)}
        assert sampled == set(spec.custom_ops), f"{spec.name}: opcheck samples miss {set(spec.custom_ops) - sampled}"


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
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


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
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
    ref = copy.deepcopy(model)  # timm's own forward: from_timm patches `model` in place
    fast = vit_kernels.from_timm(model)
    x = randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        eager = fast(x)
        torch.testing.assert_close(eager, ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.compile(fast, fullgraph=True)(x), eager, rtol=1e-5, atol=1e-6)
