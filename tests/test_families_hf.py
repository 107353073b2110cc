"""Hugging Face CLIP, SigLIP and DINOv2 (with registers, SwiGLU, classifiers) patched in place by accelerate():
tiny random models (head_dim 24 or 18, odd token counts) against an unpatched deep copy — HF's own forward,
gradients, dropout places, position interpolation, masked patches, attention maps — with launch counts and the
dispatch guard proving the kernels computed ours. GPU-marked: real-size configs in bf16 by the 2x error rule."""
import copy
import inspect
import warnings

import pytest
import torch
from frameworks import TOL, first, perturbed
from test_accelerate import run_counted
from test_models import BANNED_ATEN, AtenRecorder
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import vit_kernels
from vit_kernels import ops
from vit_kernels.models import hf_clip, hf_dinov2

from helpers import assert_matches

CLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=24,
            patch_size=8, projection_dim=20)  # head_dim 24, 1 + 9 tokens, quick_gelu
SIGLIP = dict(hidden_size=54, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=24,
              patch_size=8)  # head_dim 18, 9 tokens, gelu_pytorch_tanh, MAP head
DINO = dict(hidden_size=54, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=42,
            patch_size=14)  # head_dim 18, 1 + 9 tokens (+ 2 registers)
SIDE = {"clip": 24, "siglip": 24, "dinov2": 42}


def _clip_classifier(**kw):
    return CLIPForImageClassification(CLIPConfig(vision_config=dict(CLIP, **kw), num_labels=5))


def _siglip_classifier(**kw):
    return SiglipForImageClassification(SiglipConfig(vision_config=dict(SIGLIP, **kw), num_labels=5))


MODELS = {  # name -> builder(**config overrides)
    "clip": lambda **kw: CLIPVisionModel(CLIPVisionConfig(**dict(CLIP, **kw))),
    "clip_projection": lambda **kw: CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(CLIP, **kw))),
    "clip_classifier": _clip_classifier,
    "siglip": lambda **kw: SiglipVisionModel(SiglipVisionConfig(**dict(SIGLIP, **kw))),
    "siglip_classifier": _siglip_classifier,
    "dinov2": lambda **kw: Dinov2Model(Dinov2Config(**dict(DINO, **kw))),
    "dinov2_classifier": lambda **kw: Dinov2ForImageClassification(Dinov2Config(**dict(DINO, num_labels=5, **kw))),
    "dinov2_swiglu": lambda **kw: Dinov2Model(Dinov2Config(**dict(DINO, use_swiglu_ffn=True, **kw))),
    "dinov2_registers": lambda **kw: Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(**dict(DINO, num_register_tokens=2, **kw))),
    "dinov2_registers_classifier": lambda **kw: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**dict(DINO, num_register_tokens=2, num_labels=5, **kw))),
}
# eval launches: patch embedding; per layer LN1 + qkv and LN2 + fc1 folded (layer_norm_linear), proj and fc2;
# standalone LayerNorms (CLIP's pre / final, the final one elsewhere); one attention per layer; heads' GEMMs;
# SigLIP's pooling head: q, kv, out_proj, LN + fc1 folded, fc2, and 1 latent attention
LAUNCHES = {
    "clip": dict(patch_embed=1, layer_norm=2, layer_norm_linear=4, linear=4, attention=2),
    "clip_projection": dict(patch_embed=1, layer_norm=2, layer_norm_linear=4, linear=5, attention=2),
    "clip_classifier": dict(patch_embed=1, layer_norm=2, layer_norm_linear=4, linear=5, attention=2),
    "siglip": dict(patch_embed=1, layer_norm=1, layer_norm_linear=5, linear=8, attention=2, latent_attention=1),
    "siglip_classifier": dict(patch_embed=1, layer_norm=1, layer_norm_linear=5, linear=9, attention=2,
                              latent_attention=1),
    "dinov2": dict(patch_embed=1, layer_norm=1, layer_norm_linear=4, linear=4, attention=2),
    "dinov2_classifier": dict(patch_embed=1, layer_norm=1, layer_norm_linear=4, linear=5, attention=2),
}
for _name in ("dinov2_swiglu", "dinov2_registers"):
    LAUNCHES[_name] = LAUNCHES["dinov2"]
LAUNCHES["dinov2_registers_classifier"] = LAUNCHES["dinov2_classifier"]
TRAINED = ["clip_projection", "siglip_classifier", "dinov2_classifier", "dinov2_swiglu", "dinov2_registers"]
# the dispatch guard: no PyTorch compute of what the kernels do (HF's own glue, e.g. the DINOv2 classifier's cat
# of the cls token and the patch mean, is not ours to fuse)
BANNED = (*(n for n in BANNED_ATEN if n not in ("cat", "mean")), "silu", "sigmoid", "upsample",
          "_native_multi_head_attention")


def family(name):
    return name.split("_")[0]


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(MODELS[name](**kw), seed)


def image(name, batch=2, seed=1, size=None):
    side = SIDE[family(name)]
    h, w = size or (side, side)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def tensors(out):
    """Every tensor of an HF output (hidden_states flattened), by field."""
    items = {}
    for key, value in out.items():
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(t, torch.Tensor):
                items[f"{key}[{i}]"] = t
    return items


def assert_outputs_equal(got, expected, **tol):
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    ours, theirs = tensors(got), tensors(expected)
    assert list(ours) == list(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], **(tol or TOL), msg=key)


def loss_of(name, model, x):
    if "classifier" in name:
        return model(x, labels=torch.tensor([1, 4])).loss
    out = model(x)
    return first(out).square().mean() + (out[1].square().mean() if out[1] is not None else 0.0)


# --- one model: patched in place, HF's outputs, restored -------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_forward_equals_hf_and_restore(name):
    model = build(name)
    reference = copy.deepcopy(model)
    keys, params = list(model.state_dict()), list(model.parameters())
    assert vit_kernels.accelerate(model) is model and vit_kernels.accelerate(model) is model  # twice = once
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params, strict=True))
    x = image(name)
    with torch.no_grad():
        got, counts = run_counted(model, x, output_hidden_states=True)
        expected = reference(x, output_hidden_states=True)
    assert counts == LAUNCHES[name]
    assert_outputs_equal(got, expected)
    assert vit_kernels.restore(model) is model and not vit_kernels.is_accelerated(model)
    with torch.no_grad():
        restored, counts = run_counted(model, x)
    assert counts == {}, "restore must give back HF's own forward"
    torch.testing.assert_close(first(restored), first(expected), **TOL)


def test_return_dict_false():
    model = build("clip_projection")
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image("clip")
    with torch.no_grad():
        got, expected = model(x, return_dict=False), reference(x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# --- training: the same forward, the same gradients of every parameter, only our kernels ---------------------
@pytest.mark.parametrize("name", TRAINED)
def test_training_forward_and_gradients_equal_hf(name):
    """Train mode (the configs' dropouts are 0): the loss and the gradient of every parameter equal HF's; with
    autograd the ops go through torch.library, so the dispatch guard sees every aten op of the forward."""
    model = build(name).train()
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image(name)
    ops.reset_launch_counts()
    with AtenRecorder() as recorder:
        loss = loss_of(name, model, x)
    banned = {op for space, op in recorder.ops if space == "aten" and op.lstrip("_").startswith(BANNED)}
    assert not banned, f"PyTorch computed part of the fused forward: {sorted(banned)}"
    ours = {op for space, op in recorder.ops if space == "vit_kernels"}
    # proj's op (launched as "linear"); the MLP one ops.mlp (launched as fc1's and fc2's GEMMs) but for swiglu (two
    # ops, fc1's pre-activation recomputed in backward); an op saving its pre-activation is launched as its plain op
    seen = {op.removesuffix("_saving_pre") for op in ours}
    assert ("mlp" in seen) == ("swiglu" not in name), ours
    in_mlp = {"linear", "layer_norm_linear"} if "mlp" in seen else set()
    assert seen - {"mlp"} <= set(LAUNCHES[name]) | {"linear_with_stats"} <= seen | in_mlp, ours
    expected = loss_of(name, reference, x)
    torch.testing.assert_close(loss, expected, **TOL)
    names = [n for n, _ in model.named_parameters()]
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(expected, list(reference.parameters()), allow_unused=True)
    for n, a, b in zip(names, got, want, strict=True):
        assert (a is None) == (b is None), n
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["clip_projection", "siglip", "dinov2_registers_classifier"])
def test_autocast_returns_hfs_dtypes(name):
    """fp16 autocast (the interpreter computes bf16 wrongly): every output has HF's dtype, within fp16 error."""
    model = build(name)
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        got, counts = run_counted(model, x)
        expected = reference(x)
    assert counts == LAUNCHES[name]
    ours, theirs = tensors(got), tensors(expected)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=2e-2, atol=2e-2, msg=key)


def test_meta_device_propagates_shapes():
    for name in ("clip_projection", "siglip_classifier", "dinov2_registers"):
        model = build(name).to("meta")
        reference = copy.deepcopy(model)
        vit_kernels.accelerate(model)
        x = image(name).to("meta")
        with torch.no_grad():
            got, expected = first(model(x)), first(reference(x))
        assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype


# --- dropout, stochastic depth: at HF's places, in the kernels ----------------------------------------------
DROPOUTS = {  # name -> (config, the block's (attn_drop, proj_drop, hidden_drop, out_drop), embedding dropouts)
    "clip": (dict(attention_dropout=0.2), (0.2, 0.0, 0.0, 0.0), 0),
    "siglip": (dict(attention_dropout=0.2), (0.2, 0.0, 0.0, 0.0), 0),
    "dinov2": (dict(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1), None, 1),
}


@pytest.mark.parametrize("name", list(DROPOUTS))
def test_train_mode_dropout_runs_in_the_kernels(name, monkeypatch):
    config, rates, embedding_drops = DROPOUTS[name]
    model = vit_kernels.accelerate(build(name, **config)).train()
    if rates is None:  # DINOv2: hidden dropout after the attention projection only in layouts that have it
        attn = model.encoder.layer[0].attention
        rates = (0.2, 0.1 if hasattr(attn, "output") else 0.0, 0.0, 0.0)
    module = hf_dinov2 if name == "dinov2" else hf_clip
    seen = []

    def recording_block(*args, **kwargs):
        seen.append(tuple(kwargs.get(k, 0.0) for k in ("attn_drop", "proj_drop", "hidden_drop", "out_drop")))
        return module_block(*args, **kwargs)

    module_block = module.encoder_block
    monkeypatch.setattr(module, "encoder_block", recording_block)
    x = image(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vit_kernels")  # no fallback
        torch.manual_seed(7)
        a, counts = run_counted(model, x)
    assert seen == [rates] * 2
    assert counts.get("dropout", 0) == embedding_drops
    torch.manual_seed(7)
    assert torch.equal(first(a), first(model(x)))
    assert not torch.equal(first(a), first(model(x))), "another seed must draw other masks"
    first(a).square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_dinov2_stochastic_depth_equals_hf():
    """Dinov2DropPath's per-sample factors are drawn as HF draws them (floor(rand + keep) / keep, in HF's order),
    so with the same seed the fused forward and the gradients equal HF's own."""
    model = build("dinov2_registers", drop_path_rate=0.5).train()
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image("dinov2", batch=6)
    torch.manual_seed(7)
    got, counts = run_counted(model, x)
    torch.manual_seed(7)
    expected = reference(x)
    assert counts["attention"] == 2
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    ours = torch.autograd.grad(got.pooler_output.square().mean(), list(model.parameters()), allow_unused=True)
    theirs = torch.autograd.grad(expected.pooler_output.square().mean(), list(reference.parameters()),
                                 allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- positions at other image sizes, masked patches, attention maps -------------------------------------------
@pytest.mark.parametrize("name,kw", [("dinov2", {}), ("dinov2_registers", {}),
                                     ("clip", dict(interpolate_pos_encoding=True)),
                                     ("siglip", dict(interpolate_pos_encoding=True))])
def test_other_image_sizes_resample_positions_as_hf(name, kw):
    """HF's own interpolate_pos_encoding (DINOv2 always: bicubic in fp32, antialiased with registers; CLIP and
    SigLIP when asked), on every forward: a .data write to the table is seen."""
    model = build(name)
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image(name, size=(SIDE[family(name)] + 14 if name.startswith("dinov2") else 40, SIDE[family(name)]))
    with torch.no_grad():
        got, counts = run_counted(model, x, **kw)
        assert counts["patch_embed"] == 1
        torch.testing.assert_close(first(got), first(reference(x, **kw)), **TOL)
        for net in (model, reference):
            table = net.embeddings.position_embeddings if name.startswith("dinov2") else \
                net.embeddings.position_embedding.weight
            table.data.mul_(-1.5)
        torch.testing.assert_close(first(model(x, **kw)), first(reference(x, **kw)), **TOL)
    if name == "clip":
        with pytest.raises(ValueError, match="doesn't match model"), torch.no_grad():
            model(x)


@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers"])
def test_dinov2_bool_masked_pos_equals_hf(name):
    model = build(name)
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image(name)
    masked = torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        got, counts = run_counted(model, x, bool_masked_pos=masked)
        torch.testing.assert_close(got.last_hidden_state, reference(x, bool_masked_pos=masked).last_hidden_state,
                                   **TOL)
    assert counts["patch_embed"] == 1 and counts["attention"] == 2


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_output_attentions_come_from_the_probabilities_kernel(name):
    model = build(name, attn_implementation="eager")  # sdpa returns no attention maps
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = image(name)
    with torch.no_grad():
        got, counts = run_counted(model, x, output_attentions=True)
        expected = reference(x, output_attentions=True)
    assert counts["attention_probs"] == 2
    assert len(got.attentions) == len(expected.attentions) == 2
    for ours, theirs in zip(got.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(first(got), first(expected), **TOL)


# --- what raises -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_unsupported_activation_and_head_dim_are_named_when_patching(name):
    with pytest.raises(NotImplementedError, match="hidden_act='relu'"):
        vit_kernels.accelerate(MODELS[name](hidden_act="relu"))
    wide = dict(hidden_size=600, num_attention_heads=2)
    model = MODELS[name](**wide, **({} if name == "dinov2" else dict(intermediate_size=16)))
    with pytest.raises(NotImplementedError, match="head_dim 300 exceeds the attention kernel's maximum of 256"):
        vit_kernels.accelerate(model)
    assert not vit_kernels.is_accelerated(model)


def test_dinov2_unsupported_pieces_are_named():
    model = build("dinov2")
    model.encoder.layer[1].mlp = torch.nn.Sequential(torch.nn.Linear(54, 54))
    with pytest.raises(NotImplementedError, match=r"encoder\.layer\.1\.mlp of type Sequential"):
        vit_kernels.accelerate(model)
    model = build("dinov2")
    model.encoder.layer[0].norm2 = torch.nn.GroupNorm(1, 54)
    with pytest.raises(NotImplementedError, match=r"encoder\.layer\.0\.norm2 of type GroupNorm"):
        vit_kernels.accelerate(model)


def test_siglip_head_with_attention_dropout_is_named():
    model = build("siglip")
    model.head.attention.dropout = 0.1
    with pytest.raises(NotImplementedError, match=r"head\.attention dropout=0\.1"):
        vit_kernels.accelerate(model)


def test_other_hf_models_are_refused_by_name():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    tiny = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(NotImplementedError, match=r"Siglip2VisionModel.*NaFlex"):
        vit_kernels.accelerate(Siglip2VisionModel(Siglip2VisionConfig(**tiny)))
    with pytest.raises(TypeError, match=r"CLIPModel.*supported: .*CLIPVisionModel"):
        vit_kernels.accelerate(CLIPModel(CLIPConfig(vision_config=dict(CLIP), text_config=dict(
            tiny, vocab_size=32, max_position_embeddings=8))))


def test_dinov2_attention_mask_runs_in_the_attention_kernel():
    model = build("dinov2")
    if "attention_mask" not in inspect.signature(type(model).forward).parameters:
        pytest.skip("this transformers' Dinov2Model takes no attention_mask")
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, -1] = False
    x = image("dinov2")
    with torch.no_grad():
        got, counts = run_counted(model, x, attention_mask=mask)
        torch.testing.assert_close(got.last_hidden_state, reference(x, attention_mask=mask).last_hidden_state, **TOL)
    assert counts["attention"] == 2


@pytest.mark.parametrize("name", ["siglip", "dinov2_registers"])
def test_compiles_fullgraph_in_eval_under_no_grad(name):
    model = build(name)
    reference = copy.deepcopy(model)
    compiled = torch.compile(vit_kernels.accelerate(model), fullgraph=True, backend="aot_eager")
    x = image(name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).last_hidden_state, reference(x).last_hidden_state, **TOL)
    torch._dynamo.reset()


# --- real sizes on a GPU: bf16 within twice HF's own bf16 error -------------------------------------------------
REAL = {  # reduced depth where the brief allows; widths, heads, patch and image sizes as released
    "clip_vit_l14": (lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768)), 224),
    "siglip_so400m": (lambda: SiglipVisionModel(SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16, image_size=384,
        patch_size=14)), 384),
    "dinov2_l14": (lambda: Dinov2Model(Dinov2Config(
        hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, mlp_ratio=4, image_size=518, patch_size=14)),
        518),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(REAL))
def test_real_size_bf16_within_twice_hf_error(name):
    make, side = REAL[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = make().eval()
    for p in model.parameters():  # no zero biases, layer scales of 1 (checkpoint-like, not init-like)
        p.data.add_(0.02 * torch.randn_like(p))
    reference = copy.deepcopy(model).double()
    lowp = copy.deepcopy(model).to(torch.bfloat16)
    fast = vit_kernels.accelerate(copy.deepcopy(model).to(torch.bfloat16))
    x = torch.randn(2, 3, side, side, device="cuda")
    with torch.no_grad():
        expected, theirs = reference(x.double()), lowp(x.to(torch.bfloat16))
        got, counts = run_counted(fast, x.to(torch.bfloat16))
    assert counts["attention"] == model.config.num_hidden_layers and counts["patch_embed"] == 1
    for key, ref in tensors(expected).items():
        assert_matches(tensors(got)[key], tensors(theirs)[key], ref, name=key)
