"""Convergence, in the style of Liger-Kernel's: a small ViT trained with our kernels and the same model trained in
plain PyTorch, from the same weights and batches, for STEPS AdamW steps (fp32, dropout and stochastic depth off):
the loss at every step, every final parameter and the eval logits on held-out images agree. A wrong gradient
anywhere (a missed bias sum, a scale applied twice, a wrong GELU derivative) moves the two apart within a few
steps; agreeing for 20 steps with the loss falling is what "training works" means here. The bf16 variant runs
on a GPU (its tolerance: ``BF16``)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from frameworks import TIMM, TUTORIAL, timm_model

import vit_kernels
from vit_kernels import reference as R

STEPS, LR = 20, 1e-3
BATCH, BATCHES, CLASSES = 2, 3, 5
DEPTH = 1  # the interpreter runs ~1 s per launch here: one block keeps 2 x 20 steps near a minute
# fp32: the kernels' sums run in another order than PyTorch's, ~1e-7 per op; over 20 AdamW steps the parameters
# drift apart by ~1e-5 at most (measured ~2e-6); a wrong gradient moves them by ~lr = 1e-3 per step
FP32 = dict(loss=dict(rtol=1e-5, atol=1e-6), params=dict(rtol=1e-4, atol=2e-5), logits=dict(rtol=1e-4, atol=2e-5))
BF16 = dict(loss=dict(rtol=2e-2, atol=2e-2), params=dict(rtol=2e-2, atol=5e-3), logits=dict(rtol=5e-2, atol=5e-2))


def batches(device, img=32, seed=7):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(BATCH, 3, img, img, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(BATCHES + 1)]
    return [(x.to(device), y.to(device)) for x, y in data]


def train(model, data, steps=STEPS, amp_dtype=None):
    """AdamW on the cycled training batches; the loss of every step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    losses = []
    for step in range(steps):
        x, y = data[step % BATCHES]
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def pair(flavour, device):
    """(ours, PyTorch's) with equal weights: the tutorial's fused ViT and the reference it reproduces, or a timm
    ViT accelerated in place and a copy left as timm built it."""
    if flavour == "tutorial":
        torch.manual_seed(0)
        ours = vit_kernels.ViT(**dict(TUTORIAL, depth=DEPTH), scaling="paper")
        plain = R.ViT(**dict(TUTORIAL, depth=DEPTH), scaling="paper")
        plain.load_state_dict(ours.state_dict())
    else:
        plain = timm_model(depth=DEPTH)
        ours = vit_kernels.accelerate(copy.deepcopy(plain))
    return ours.to(device), plain.to(device)


def key_bias_mask(flavour, name, p):
    """The key bias's entries in a qkv bias (else none). Its gradient is zero in exact arithmetic (softmax ignores
    a shift shared by all of a query's scores), so each side's is rounding noise (~1e-9) that Adam scales to
    steps of ~lr and random sign: compared only within that bound, the rest of the tensor tightly."""
    mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    if name.endswith("qkv.bias"):
        if flavour == "tutorial":
            mask[1::3] = True  # the tutorial's (h d qkv) row order
        else:
            third = p.shape[0] // 3
            mask[third:2 * third] = True  # timm's (qkv h d)
    return mask


def check_convergence(flavour, device, dtype, tol):
    ours, plain = pair(flavour, device)
    data = batches(device)
    amp = None if dtype == torch.float32 else dtype
    got, expected = train(ours, data, amp_dtype=amp), train(plain, data, amp_dtype=amp)
    assert expected[-1] < 0.5 * expected[0]  # it learns (the batches are few enough to memorize)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g == pytest.approx(e, rel=tol["loss"]["rtol"], abs=tol["loss"]["atol"]), (step, got, expected)
    plain_params = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        key_bias = key_bias_mask(flavour, name, p)
        torch.testing.assert_close(p[~key_bias], plain_params[name][~key_bias], **tol["params"], msg=name)
        # Adam moves any parameter by at most ~lr a step, whatever its gradient
        torch.testing.assert_close(p[key_bias], plain_params[name][key_bias], rtol=0, atol=2 * STEPS * LR, msg=name)
    held_out = data[BATCHES][0]
    with torch.no_grad(), torch.autocast(device, dtype=amp, enabled=amp is not None):
        torch.testing.assert_close(ours.eval()(held_out).float(), plain.eval()(held_out).float(), **tol["logits"])
    return ours


@pytest.mark.parametrize("flavour", ["tutorial", "timm"])
def test_training_through_the_kernels_follows_pytorch(flavour):
    ours = check_convergence(flavour, "cpu", torch.float32, FP32)
    assert ours.last_backend == "triton" if flavour == "tutorial" else True


@pytest.mark.gpu
@pytest.mark.parametrize("flavour", ["tutorial", "timm"])
def test_bf16_training_through_the_kernels_follows_pytorch(flavour):
    check_convergence(flavour, "cuda", torch.bfloat16, BF16)


def test_the_sizes_are_the_shared_tiny_ones():
    assert TUTORIAL["img_size"] == TIMM["img_size"] == 32 and TUTORIAL["n_classes"] == TIMM["num_classes"] == CLASSES
