"""Seeded random models and op shapes against the reference. A failure names its seed: replay one case with
``pytest tests/test_random_equivalence.py -k seed20261142``; run more with ``--random-cases 1000``."""
import copy
import random

import timm
import torch

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.ops.attention import attention_torch
from vit_kernels.ops.linear import linear_torch
from vit_kernels.ops.patch_embed import patch_embed_torch

from helpers import assert_matches

BASE_SEED = 20261125
HEAD_DIMS = [8, 12, 16, 20, 24, 32, 40, 48, 64, 80]
WORK_BUDGET = 4e6  # batch x tokens x width^2 x expansion x depth: keeps an interpreter case around 1 s


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        seeds = [BASE_SEED + i for i in range(metafunc.config.getoption("random_cases"))]
        metafunc.parametrize("seed", seeds, ids=[f"seed{s}" for s in seeds])


def model_config(seed: int) -> dict:
    rng = random.Random(seed)
    while True:
        heads = rng.randint(1, 4)
        head_dim = rng.choice(HEAD_DIMS)
        if 16 <= heads * head_dim <= 256:
            break
    cfg = dict(kind=rng.choice(["tutorial", "timm"]), patch=rng.randint(4, 16), grid=rng.randint(1, 14),
               heads=heads, emb=heads * head_dim, depth=rng.randint(1, 3), channels=rng.randint(1, 4),
               batch=rng.randint(1, 5), expansion=rng.randint(1, 4))
    while cfg["grid"] > 1 and (cfg["batch"] * (cfg["grid"] ** 2 + 1) * cfg["emb"] ** 2 * cfg["expansion"]
                               * cfg["depth"] > WORK_BUDGET):
        cfg["grid"] -= 1
    if cfg["kind"] == "tutorial":
        cfg.update(scaling=rng.choice(["tutorial", "paper"]), leftover=rng.randint(0, cfg["patch"] - 1),
                   masked=rng.random() < 0.3)
    else:
        pool = rng.choice(["token", "avg"])
        cfg.update(pool=pool, class_token=pool == "token" or rng.random() < 0.5, reg_tokens=rng.choice([0, 0, 1, 2]),
                   no_embed_class=rng.random() < 0.3, qkv_bias=rng.random() < 0.8,
                   init_values=rng.choice([None, None, 0.5]), fc_norm=rng.choice([None, False]) if pool == "avg"
                   else None)
    return cfg


def build(cfg):
    if cfg["kind"] == "tutorial":
        img = cfg["grid"] * cfg["patch"] + cfg["leftover"]  # pixels past the last whole patch are ignored
        kwargs = dict(in_channels=cfg["channels"], patch_size=cfg["patch"], emb_size=cfg["emb"], img_size=img,
                      depth=cfg["depth"], n_classes=7, num_heads=cfg["heads"], forward_expansion=cfg["expansion"],
                      scaling=cfg["scaling"])
        ref = R.ViT(**kwargs).eval()
        fast = vit_kernels.ViT(**kwargs).eval()
        fast.load_state_dict(ref.state_dict())
        return ref, fast, img
    img = cfg["grid"] * cfg["patch"]
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=cfg["patch"], in_chans=cfg["channels"],
        embed_dim=cfg["emb"], depth=cfg["depth"], num_heads=cfg["heads"], mlp_ratio=cfg["expansion"],
        num_classes=7, global_pool=cfg["pool"], class_token=cfg["class_token"], reg_tokens=cfg["reg_tokens"],
        no_embed_class=cfg["no_embed_class"], qkv_bias=cfg["qkv_bias"], init_values=cfg["init_values"],
        fc_norm=cfg["fc_norm"]).eval()
    ref = copy.deepcopy(model)  # timm's own forward: from_timm patches `model` in place and returns it
    return ref, vit_kernels.from_timm(model), img


def test_random_model(seed, device):
    cfg = model_config(seed)
    ref, fast, img = build(cfg)
    ref, fast = ref.to(device), fast.to(device)
    x = torch.randn(cfg["batch"], cfg["channels"], img, img, device=device)
    args = ()
    if cfg.get("masked"):
        tokens = cfg["grid"] ** 2 + 1
        args = (torch.rand(cfg["batch"], 1, tokens, tokens, device=device) > 0.3,)
    with torch.no_grad():
        ops.reset_launch_counts()
        got = fast(x, *args)
        launched = ops.launch_counts()
        expected = ref.double()(x.double(), *args)
    assert bool(launched) == (ops.backend_for(x) == "triton"), launched
    scale = max(1.0, expected.abs().max().item())
    err = (got.double() - expected).abs().max().item()
    assert err <= 2e-4 * scale, f"seed {seed} config {cfg}: max error {err:.3g} (scale {scale:.3g})"


def op_case(seed: int, device):
    """One random op call: (name, our result, PyTorch fp64 result, PyTorch low-precision result)."""
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float16])
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    def as64(*ts):
        return [None if t is None else t.double() for t in ts]

    op = rng.choice(["linear", "attention", "layer_norm", "patch_embed"])
    if op == "linear":
        m, n, k = rng.randint(1, 300), rng.randint(1, 200), rng.randint(1, 200)
        x, w = rand(m, k), rand(n, k, scale=k ** -0.5)
        b = rand(n) if rng.random() < 0.7 else None
        act = rng.choice([None, "gelu", "gelu_tanh"])
        res = rand(m, n) if rng.random() < 0.5 else None
        got = ops.linear(x, w, b, activation=act, residual=res)
        return op, got, linear_torch(*as64(x, w, b), act, None, *as64(res)), linear_torch(x, w, b, act, None, res)
    if op == "attention":
        heads, head_dim = rng.randint(1, 4), rng.choice(HEAD_DIMS)
        qkv = rand(rng.randint(1, 4), rng.randint(1, 200), 3 * heads * head_dim)
        layout, scaling = rng.choice(["h d qkv", "qkv h d"]), rng.choice(["tutorial", "paper"])
        n = qkv.shape[1]
        mask = torch.rand(n, n, generator=gen).to(device) > 0.3 if rng.random() < 0.3 else None
        got = ops.attention(qkv, heads, layout, scaling, mask)
        return (op, got, attention_torch(qkv.double(), heads, layout, scaling, mask),
                attention_torch(qkv, heads, layout, scaling, mask))
    if op == "layer_norm":
        width = rng.randint(1, 2000)
        x, w, b = rand(rng.randint(1, 50), width, scale=3.0), rand(width), rand(width)
        eps = rng.choice([1e-5, 1e-6])
        got = ops.layer_norm(x, w, b, eps)
        return (op, got, torch.nn.functional.layer_norm(x.double(), (width,), *as64(w, b), eps),
                torch.nn.functional.layer_norm(x, (width,), w, b, eps))
    p, c, e = rng.randint(2, 16), rng.randint(1, 4), rng.randint(8, 100)
    h, wd = p * rng.randint(1, 6) + rng.randint(0, p - 1), p * rng.randint(1, 6)
    img, weight = rand(rng.randint(1, 3), c, h, wd), rand(e, c, p, p, scale=(c * p * p) ** -0.5)
    prefix = rand(rng.randint(0, 3), e)
    on_prefix = rng.random() < 0.7
    pos = rand((h // p) * (wd // p) + (prefix.shape[0] if on_prefix else 0), e)
    bias = rand(e)
    got = ops.patch_embed(img, weight, bias, prefix, pos, on_prefix)
    return (op, got, patch_embed_torch(*as64(img, weight, bias, prefix, pos), on_prefix),
            patch_embed_torch(img, weight, bias, prefix, pos, on_prefix))


def test_random_op(seed, device):
    name, got, expected, lowp = op_case(seed, device)
    try:
        assert_matches(got, lowp, expected, name=name)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed} ({name}, {got.dtype}, shape {tuple(got.shape)}): {exc}") from None
