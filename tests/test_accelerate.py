"""accelerate(): the tutorial's ViT, reference.ViT, timm, torchvision and Hugging Face ViTs on the fused kernels.

Tiny fp32 models (image 32, patch 8, width 48, 3 heads, 2 layers, MLP 96) with every parameter perturbed, so
no zero-initialized head or bias hides a mistake. The models are module-scoped; a test that changes weights
builds its own."""
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from torch import nn
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer
from transformers import ViTConfig, ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

import vit_kernels
from vit_kernels import ops
from vit_kernels import reference as R
from vit_kernels.models._fused import encoder_block

import tutorial_vit as tutorial

TOL = dict(rtol=1e-4, atol=1e-5)
TV = dict(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=5)
HF = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
          intermediate_size=96, num_labels=5)
TUTORIAL = dict(in_channels=3, patch_size=8, emb_size=48, img_size=32, depth=2, n_classes=5, num_heads=3,
                forward_expansion=2)
TIMM = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)


def perturbed(model, seed=0):
    """Random non-zero values everywhere (torchvision zero-inits its head, HF its biases), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def torchvision_model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(VisionTransformer(**dict(TV, **kw)), seed)


def hf_model(cls=ViTModel, seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(cls(ViTConfig(**dict(HF, **kw))), seed)


def timm_model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TIMM, **kw)), seed)


def tutorial_model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed(tutorial.ViT(**dict(TUTORIAL, **kw)), seed)


BUILDERS = {
    "tutorial": tutorial_model,
    "reference": lambda seed=0: perturbed(R.ViT(**TUTORIAL, scaling="paper"), seed),
    "timm": timm_model,
    "torchvision": torchvision_model,
    "hf_model": hf_model,
    "hf_classifier": lambda seed=0: hf_model(ViTForImageClassification, seed),
}
WRAPPERS = {"tutorial": vit_kernels.ViT, "reference": vit_kernels.ViT, "timm": vit_kernels.TimmViT,
            "torchvision": vit_kernels.TorchvisionViT, "hf_model": vit_kernels.HFViT,
            "hf_classifier": vit_kernels.HFViT}


@pytest.fixture(scope="module")
def pairs():
    """framework -> (original, accelerated), built once for the module (the tests below do not change them)."""
    return {name: (model, vit_kernels.accelerate(model)) for name, model in
            ((name, build()) for name, build in BUILDERS.items())}


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def first(out):
    """The tensor a user reads first: logits / last_hidden_state for HF, the output otherwise."""
    return out[0] if isinstance(out, (tuple, dict)) else out


# --- the same module: keys, values, shared parameters, checkpoints -------------------------------------------
@pytest.mark.parametrize("framework", list(BUILDERS))
def test_wraps_with_the_same_state_dict_and_shared_parameters(framework, pairs):
    model, fast = pairs[framework]
    assert type(fast) is WRAPPERS[framework]
    ours, theirs = fast.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ours_params, theirs_params = dict(fast.named_parameters()), dict(model.named_parameters())
    assert list(ours_params) == list(theirs_params)
    assert all(ours_params[k] is theirs_params[k] for k in theirs_params), "parameters must be shared, not copied"
    assert vit_kernels.accelerate(fast) is fast  # already accelerated: returned as is


@pytest.mark.parametrize("framework", list(BUILDERS))
def test_load_state_dict_round_trips(framework):
    build = BUILDERS[framework]
    model, donor, fresh = build(seed=1), build(seed=2), build(seed=3)
    fast = vit_kernels.accelerate(model)
    fast.load_state_dict(donor.state_dict(), strict=True)  # the original's checkpoint into the accelerated one
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), donor.state_dict().values()))
    fresh.load_state_dict(fast.state_dict(), strict=True)  # and the accelerated one's into a fresh original
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), donor.state_dict().values()))


# --- the same outputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["tutorial", "reference", "timm", "torchvision"])
def test_outputs_match_the_original(framework, pairs, images):
    model, fast = pairs[framework]
    with torch.no_grad():
        expected, got = model(images), fast(images)
    assert fast.last_backend == "triton"
    torch.testing.assert_close(got, expected, **TOL)


def test_tutorial_model_becomes_the_fused_vit_with_its_settings(pairs):
    _, fast = pairs["tutorial"]
    attn = fast[1][0][0].fn[1]
    assert (attn.scaling, attn.num_heads, fast[0].img_size, len(fast[1])) == ("tutorial", 3, 32, 2)
    assert pairs["reference"][1][1][0][0].fn[1].scaling == "paper"
    fused = vit_kernels.ViT(**TUTORIAL)
    assert vit_kernels.accelerate(fused) is fused


def test_hf_model_fields_match(pairs, images):
    model, fast = pairs["hf_model"]
    with torch.no_grad():
        expected, got = model(images, output_hidden_states=True), fast(images, output_hidden_states=True)
        expected_tuple, got_tuple = model(images, return_dict=False), fast(images, return_dict=False)
    assert fast.last_backend == "triton"
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, **TOL)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for ours, theirs in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(expected_tuple) == 2
    torch.testing.assert_close(got_tuple[1], expected_tuple[1], **TOL)


def test_hf_classifier_fields_and_loss_match(pairs, images):
    model, fast = pairs["hf_classifier"]
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        expected = model(images, labels=labels, output_hidden_states=True)
        got = fast(images, labels=labels, output_hidden_states=True)
        plain = fast(images)
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys()) == ["loss", "logits",
                                                                                          "hidden_states"]
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)
    for ours, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert plain.loss is None and plain.hidden_states is None
    torch.testing.assert_close(plain.logits, expected.logits, **TOL)


def test_hf_without_qkv_bias_and_with_tanh_gelu_matches(images):
    model = hf_model(ViTForImageClassification, qkv_bias=False, hidden_act="gelu_pytorch_tanh")
    fast = vit_kernels.accelerate(model)
    assert fast._activation == "gelu_tanh"
    with torch.no_grad():
        torch.testing.assert_close(fast(images).logits, model(images).logits, **TOL)


def test_hf_interpolate_pos_encoding_matches(pairs):
    model, fast = pairs["hf_model"]
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        expected = model(x, interpolate_pos_encoding=True).last_hidden_state
        got = fast(x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(got, expected, **TOL)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"), torch.no_grad():
        fast(x)


# --- the fused q|k|v weight of HF models -----------------------------------------------------------------------
def test_hf_fused_qkv_cache_follows_in_place_updates(images):
    model = hf_model(seed=4)
    fast = vit_kernels.accelerate(model)
    with torch.no_grad():
        fast(images)
        cached = fast._qkv_cache[0][1]
        fast(images)
        assert fast._qkv_cache[0][1] is cached, "inference must not re-concatenate q, k, v"
        model.layers[0].attention.k_proj.weight.mul_(1.5)  # an optimizer-style in-place update
        model.layers[1].attention.v_proj.bias.add_(0.5)
        torch.testing.assert_close(fast(images).last_hidden_state, model(images).last_hidden_state, **TOL)
        assert fast._qkv_cache[0][1] is not cached
        fast.load_state_dict(hf_model(seed=5).state_dict())
        torch.testing.assert_close(fast(images).pooler_output, model(images).pooler_output, **TOL)


def test_hf_gradients_reach_query_key_value(pairs, images):
    model, fast = pairs["hf_classifier"]
    labels = torch.tensor([0, 3])
    grads = []
    for net in (fast, model):
        net.zero_grad(set_to_none=True)
        net(images, labels=labels).loss.backward()
        assert net is model or fast.last_backend == "triton"
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    ours, theirs = grads
    assert list(ours) == list(theirs)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"vit.layers.0.attention.{proj}.weight" in ours
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_torchvision_gradients_match(pairs, images):
    model, fast = pairs["torchvision"]
    grads = []
    for net in (fast, model):
        net.zero_grad(set_to_none=True)
        net(images).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


# --- paths the kernels do not take -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification])
def test_hf_output_attentions_come_from_the_probabilities_kernel(cls, images):
    model = hf_model(cls, attn_implementation="eager")  # sdpa returns no attention maps
    fast = vit_kernels.accelerate(model)
    ops.reset_launch_counts()
    with torch.no_grad():
        got = fast(images, output_attentions=True)
        expected = model(images, output_attentions=True)
    assert fast.last_backend == "triton" and ops.launch_counts()["attention_probs"] == 2
    assert len(got.attentions) == len(expected.attentions) == 2
    for ours, theirs in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(first(got), first(expected), **TOL)


def reference_maps(framework, model, images):
    """Each layer's softmax probabilities as the original model computes them, caught by hooks."""
    maps, hooks = [], []
    if framework in ("tutorial", "reference"):
        for block in model[1]:
            attn = block[0].fn[1]
            scale = attn.emb_size ** 0.5 if getattr(attn, "scaling", "tutorial") == "tutorial" else 1.0
            hooks.append(attn.att_drop.register_forward_pre_hook(lambda m, args, s=scale: maps.append(args[0] * s)))
    elif framework == "timm":
        for blk in model.blocks:
            blk.attn.fused_attn = False  # timm's explicit path materializes softmax -> attn_drop
            hooks.append(blk.attn.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0])))
    else:  # torchvision: ask nn.MultiheadAttention for its per-head weights on the same input
        hooks += [blk.self_attention.register_forward_hook(lambda m, args, out: maps.append(
            nn.MultiheadAttention.forward(m, args[0], args[0], args[0], need_weights=True,
                                          average_attn_weights=False)[1]))  # .forward: no hook recursion
                  for blk in model.encoder.layers]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return maps


@pytest.mark.parametrize("framework", ["tutorial", "reference", "timm", "torchvision"])
def test_attention_maps_equal_the_models_softmax(framework, pairs, images):
    model, fast = pairs[framework]
    with torch.no_grad():
        out, maps = vit_kernels.attention_maps(fast, images)
        torch.testing.assert_close(out, fast(images), **TOL)
    expected = reference_maps(framework, model, images)
    assert len(maps) == len(expected) == 2
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_attention_maps_wraps_an_original_model_and_refuses_the_reference_path(images):
    model = timm_model()
    with torch.no_grad():
        _, maps = vit_kernels.attention_maps(model, images)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17)
    fast = vit_kernels.accelerate(timm_model(patch_drop_rate=0.25)).train()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="fused blocks"):
        warnings.simplefilter("ignore")
        vit_kernels.attention_maps(fast, images)


@pytest.mark.parametrize("framework,kw,rates", [
    ("torchvision", dict(dropout=0.1, attention_dropout=0.2), (0.2, 0.1, 0.1, 0.1)),
    ("hf_model", dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2), (0.2, 0.1, 0.0, 0.1)),
    ("timm", dict(attn_drop_rate=0.2, proj_drop_rate=0.1, pos_drop_rate=0.1), (0.2, 0.1, 0.1, 0.1)),
])
def test_train_mode_dropout_runs_in_the_kernels(framework, kw, rates, images, monkeypatch):
    """Every framework's dropout reaches the kernels at its own place (attention probabilities, after the
    attention projection, after the MLP activation, after the MLP), plus the embedding dropout."""
    make = {"torchvision": torchvision_model, "hf_model": hf_model, "timm": timm_model}[framework]
    model = make(**kw)
    fast = vit_kernels.accelerate(model).train()
    module = sys.modules[type(fast).__module__]
    seen = []

    def recording_block(*args, **kwargs):
        seen.append(tuple(kwargs.get(k, 0.0) for k in ("attn_drop", "proj_drop", "hidden_drop", "out_drop")))
        return encoder_block(*args, **kwargs)

    monkeypatch.setattr(module, "encoder_block", recording_block)
    ops.reset_launch_counts()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vit_kernels")  # no fallback
        torch.manual_seed(7)
        a = first(fast(images))
    assert fast.last_backend == "triton"
    assert seen == [rates] * 2
    assert ops.launch_counts().get("dropout") == 1  # the embedding dropout
    torch.manual_seed(7)
    assert torch.equal(a, first(fast(images)))
    a.square().mean().backward()
    used = [(n, p) for n, p in fast.named_parameters() if "pooler" not in n]  # the pooler feeds another output
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in used), \
        [n for n, p in used if p.grad is None]
    seen.clear()
    with torch.no_grad():
        fast.eval()(images)
    assert seen == [(0.0, 0.0, 0.0, 0.0)] * 2


def test_timm_stochastic_depth_in_the_kernels_equals_timm(images):
    """DropPath's per-sample factors are drawn from torch's generator in timm's order, so with the same seed the
    fused forward (proj / fc2 epilogues) equals timm's own, and so do the gradients."""
    model = timm_model(drop_path_rate=0.5)
    fast = vit_kernels.accelerate(model).train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    got = fast(x)
    assert fast.last_backend == "triton"
    torch.manual_seed(7)
    expected = model(x)
    torch.testing.assert_close(got, expected, **TOL)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(got.square().mean(), params)
    theirs = torch.autograd.grad(expected.square().mean(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_timm_patch_dropout_runs_timm_forward(images):
    model = timm_model(patch_drop_rate=0.25)
    fast = vit_kernels.accelerate(model).train()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        torch.manual_seed(7)
        got = fast(images)
    assert fast.last_backend == "reference"
    torch.manual_seed(7)
    torch.testing.assert_close(got, model(images))


# --- what raises -------------------------------------------------------------------------------------------------
def _no_in_proj(m):
    m.encoder.layers[0].self_attention = nn.MultiheadAttention(48, 3, kdim=40, vdim=40, batch_first=True)


def _set(path, value):
    def edit(m):
        *parents, last = path.split(".")
        obj = m
        for name in parents:
            obj = getattr(obj, name) if not name.isdigit() else obj[int(name)]
        if last.isdigit():
            obj[int(last)] = value
        else:
            setattr(obj, last, value)
    return edit


TV_UNSUPPORTED = [
    (dict(conv_stem_configs=[ConvStemConfig(out_channels=8, kernel_size=3, stride=8)]), None, "conv_stem_configs"),
    (dict(representation_size=16), None, "representation_size"),
    ({}, _no_in_proj, "without in_proj_weight"),
    ({}, _set("encoder.layers.0.self_attention", nn.MultiheadAttention(48, 3, add_bias_kv=True, batch_first=True)),
     "bias_k"),
    ({}, _set("encoder.layers.1.self_attention", nn.MultiheadAttention(48, 3, add_zero_attn=True, batch_first=True)),
     "add_zero_attn"),
    ({}, _set("encoder.layers.0.self_attention", nn.MultiheadAttention(48, 3, bias=False, batch_first=True)),
     "without bias"),
    ({}, _set("encoder.layers.0.mlp.1", nn.ReLU()), "activation ReLU"),
    ({}, _set("encoder.layers.1.ln_2", nn.GroupNorm(1, 48)), "ln_2 of type GroupNorm"),
    ({}, _set("encoder.ln", nn.Identity()), "encoder.ln of type Identity"),
]


@pytest.mark.parametrize("kw,edit,match", TV_UNSUPPORTED)
def test_torchvision_unsupported_features_are_named(kw, edit, match):
    model = VisionTransformer(**dict(TV, **kw))
    if edit is not None:
        edit(model)
    with pytest.raises(NotImplementedError, match=match):
        vit_kernels.accelerate(model)


def test_torchvision_bad_model_and_image(pairs):
    with pytest.raises(TypeError, match="expects a torchvision VisionTransformer"):
        vit_kernels.TorchvisionViT(nn.Linear(2, 2))
    fast = pairs["torchvision"][1]
    with pytest.raises(ValueError, match="differs from the model's image_size"), torch.no_grad():
        fast(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="input channels"), torch.no_grad():
        fast(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("act", ["relu", "quick_gelu"])
def test_hf_unsupported_activation_is_named(act):
    with pytest.raises(NotImplementedError, match=f"hidden_act='{act}'"):
        vit_kernels.accelerate(ViTModel(ViTConfig(**HF, hidden_act=act)))


@pytest.mark.parametrize("arg", ["bool_masked_pos", "head_mask", "attention_mask"])
def test_hf_unsupported_arguments_are_named(arg, pairs, images):
    fast = pairs["hf_model"][1]
    with pytest.raises(NotImplementedError, match=arg), torch.no_grad():
        fast(images, **{arg: torch.ones(2, 16, dtype=torch.bool)})


def test_hf_bad_model_and_arguments(pairs, images):
    with pytest.raises(TypeError, match="expects a transformers ViTModel"):
        vit_kernels.HFViT(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="labels are only accepted"):
        pairs["hf_model"][1](images, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="input channels"):
        pairs["hf_model"][1](torch.randn(1, 1, 32, 32))


def test_tutorial_tree_with_unsupported_pieces_is_named():
    model = tutorial_model()
    model[1][1][1].fn[1][1] = nn.ReLU()
    with pytest.raises(NotImplementedError, match="MLP activation ReLU"):
        vit_kernels.accelerate(model)


def test_other_models_raise_a_type_error_listing_the_supported_kinds():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*supported: .*timm.*torchvision.*"
                                        r"Hugging Face"):
        vit_kernels.accelerate(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling"):
        vit_kernels.accelerate(ViTForMaskedImageModeling(ViTConfig(**HF)))


def test_optional_frameworks_are_not_imported():
    code = ("import sys, vit_kernels; vit_kernels.accelerate; "
            "assert not {'torchvision', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
