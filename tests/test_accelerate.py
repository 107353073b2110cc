"""accelerate(): the tutorial's ViT, reference.ViT, timm, torchvision and Hugging Face ViTs patched in place
onto the fused kernels. The framework's own output comes from an unpatched deep copy of the same model; the
launch counts prove the kernels computed ours. Tiny fp32 models (tests/frameworks.py); the module-scoped pairs
are not changed by the tests that use them."""
import copy
import inspect
import subprocess
import sys

import pytest
import torch
from frameworks import BUILDERS, HF, TOL, TUTORIAL, TV, first, hf_model, timm_model, torchvision_model, tutorial_model
from torch import nn
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer
from transformers import ViTConfig, ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

import vit_kernels
from vit_kernels import ops
from vit_kernels.models import hf_vit, torchvision_vit

BLOCK_KERNELS = {"layer_norm_linear": 2, "linear": 2, "attention": 1}  # per encoder block: five launches


@pytest.fixture(scope="module")
def pairs():
    """framework -> (the framework's own model, the same model accelerated in place: a different object)."""
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        reference = copy.deepcopy(model)
        assert vit_kernels.accelerate(model) is model
        out[name] = (reference, model)
    return out


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run_counted(fn, *args, **kwargs):
    """fn(*args, **kwargs) and the kernel launches it made."""
    ops.reset_launch_counts()
    out = fn(*args, **kwargs)
    return out, ops.launch_counts()


def assert_blocks_fused(counts, depth=2):
    """Every encoder block ran on the kernels (the dispatch guard: a PyTorch path launches nothing)."""
    for kernel, per_block in BLOCK_KERNELS.items():
        assert counts.get(kernel, 0) >= per_block * depth, (kernel, counts)
    assert counts.get("patch_embed") == 1, counts


# --- one model: the same object, keys, parameters --------------------------------------------------------------
@pytest.mark.parametrize("framework", list(BUILDERS))
def test_accelerate_patches_the_model_itself(framework, images):
    model = BUILDERS[framework]()
    keys, params = list(model.state_dict()), list(model.parameters())
    assert not vit_kernels.is_accelerated(model)
    assert vit_kernels.accelerate(model) is model
    assert vit_kernels.is_accelerated(model) and vit_kernels.accelerate(model) is model  # twice = once
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params, strict=True))
    with torch.no_grad():
        fused, counts = run_counted(model, images)
    assert_blocks_fused(counts)
    assert vit_kernels.restore(model) is model and not vit_kernels.is_accelerated(model)
    with torch.no_grad():
        restored, counts = run_counted(model, images)
    assert counts == {}, "restore must give back the framework's own forward"
    torch.testing.assert_close(first(fused), first(restored), **TOL)


def test_vit_kernels_vit_is_the_reference_patched():
    fused = vit_kernels.ViT(**TUTORIAL)
    assert vit_kernels.accelerate(fused) is fused and vit_kernels.is_accelerated(fused)
    assert fused[1][0][0].fn[1].scaling == "tutorial"


@pytest.mark.parametrize("framework", list(BUILDERS))
def test_load_state_dict_round_trips(framework):
    build = BUILDERS[framework]
    model, donor, fresh = build(seed=1), build(seed=2), build(seed=3)
    vit_kernels.accelerate(model)
    model.load_state_dict(donor.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), donor.state_dict().values()))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), donor.state_dict().values()))


# --- the same outputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", list(BUILDERS))
def test_outputs_match_the_framework(framework, pairs, images):
    reference, model = pairs[framework]
    with torch.no_grad():
        expected = first(reference(images))
        got, counts = run_counted(model, images)
    assert_blocks_fused(counts)
    torch.testing.assert_close(first(got), expected, **TOL)


def test_vit_kernels_vit_reports_its_backend(images):
    fused = vit_kernels.ViT(**TUTORIAL).eval()
    with torch.no_grad():
        fused(images)
    assert fused.last_backend == "triton"


# --- one model: what the user does to it afterwards -----------------------------------------------------------
def _new_head(framework, model, classes=7):
    """Replace the classifier as the framework's own API does (timm: reset_classifier)."""
    if framework == "timm":
        model.reset_classifier(classes)
    elif framework == "torchvision":
        model.heads.head = nn.Linear(48, classes)
    elif framework == "hf_classifier":
        model.classifier = nn.Linear(48, classes)
    elif framework in ("tutorial", "reference"):
        model[2][2] = nn.Linear(48, classes)
    else:
        return
    torch.manual_seed(11)  # the same new head on both copies
    head = {"timm": lambda m: m.head, "torchvision": lambda m: m.heads.head,
            "hf_classifier": lambda m: m.classifier}.get(framework, lambda m: m[2][2])(model)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()


TRAIN_KW = {"tutorial": dict(dropout=0.2, drop_p=0.1), "reference": dict(),
            "timm": dict(attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.2),
            "torchvision": dict(dropout=0.1, attention_dropout=0.2),
            "hf_model": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2),
            "hf_classifier": dict(hidden_dropout_prob=0.1)}


def _build(framework, seed=0, **kw):
    if framework in ("hf_model", "hf_classifier"):
        return hf_model(ViTForImageClassification if framework == "hf_classifier" else ViTModel, seed, **kw)
    if framework == "reference":
        return BUILDERS["reference"](seed)
    return {"tutorial": tutorial_model, "timm": timm_model, "torchvision": torchvision_model}[framework](seed, **kw)


@pytest.mark.parametrize("framework", list(BUILDERS))
def test_one_model_follows_mode_structure_state_dict_and_data_writes(framework, images):
    """After accelerate: .train()/.eval(), a new classifier, load_state_dict(assign=True) and an EMA-style .data
    update all give the framework's own output (its unpatched twin treated the same), computed by the kernels."""
    model = _build(framework, **TRAIN_KW[framework]).train()  # built in train mode, as timm.create_model does
    twin = copy.deepcopy(model)
    vit_kernels.accelerate(model)

    def check(what):
        with torch.no_grad():
            expected = first(twin(images))
            got, counts = run_counted(model, images)
        assert_blocks_fused(counts)
        torch.testing.assert_close(first(got), expected, **TOL, msg=what)

    if TRAIN_KW[framework]:
        with torch.no_grad():
            a, b = first(model(images)), first(model(images))
        assert not torch.equal(a, b), "train mode must apply the model's dropout"
    model.eval(), twin.eval()
    check("after .eval()")
    for net in (model, twin):
        _new_head(framework, net)
    check("after replacing the classifier")
    donor = _build(framework, seed=5, **TRAIN_KW[framework])
    _new_head(framework, donor)
    for net in (model, twin):
        net.load_state_dict(copy.deepcopy(donor.state_dict()), assign=True)
    check("after load_state_dict(assign=True)")
    ema = _build(framework, seed=6, **TRAIN_KW[framework])
    _new_head(framework, ema)
    for net in (model, twin):
        for p, q in zip(net.parameters(), ema.parameters(), strict=True):
            p.data.lerp_(q.data, 0.5)  # weight averaging writes through .data: no version bump
    check("after an EMA update through .data")


def test_hf_data_write_to_one_projection_is_seen(pairs, images):
    """q, k, v are read in place by the GEMM: a .data write to k_proj alone changes the next output."""
    _, model = pairs["hf_model"]
    model, twin = copy.deepcopy(model), copy.deepcopy(pairs["hf_model"][0])
    for net in (model, twin):
        net.layers[0].attention.k_proj.weight.data.mul_(-2)
    with torch.no_grad():
        torch.testing.assert_close(model(images).last_hidden_state, twin(images).last_hidden_state, **TOL)


def test_deepcopy_of_an_accelerated_model_is_accelerated_and_independent(pairs, images):
    _, model = pairs["timm"]
    clone = copy.deepcopy(model)
    assert vit_kernels.is_accelerated(clone)
    with torch.no_grad():
        clone.head.weight.mul_(2)
        _, counts = run_counted(clone, images)
        assert not torch.equal(clone(images), model(images))
    assert_blocks_fused(counts)
    restored = vit_kernels.restore(clone)  # the copy's record of what each instance held restores it too
    with torch.no_grad():
        got, counts = run_counted(restored, images)
    assert counts == {} and not vit_kernels.is_accelerated(restored) and got.shape == (2, 5)


def test_a_saved_whole_model_loads_back_accelerated(pairs, images, tmp_path):
    reference, model = pairs["timm"]
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert vit_kernels.is_accelerated(loaded)
    with torch.no_grad():
        got, counts = run_counted(loaded, images)
        torch.testing.assert_close(got, reference(images), **TOL)
    assert_blocks_fused(counts)
    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(model.forward) == params(reference.forward)  # what Trainer-style introspection reads
    vit_kernels.restore(loaded)
    with torch.no_grad():
        got, counts = run_counted(loaded, images)
        torch.testing.assert_close(got, reference(images), **TOL)
    assert counts == {}


def test_forward_hooks_on_blocks_still_fire(pairs, images):
    _, model = pairs["timm"]
    seen = []
    handles = [blk.register_forward_hook(lambda m, args, out: seen.append(out.shape)) for blk in model.blocks]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    assert seen == [(2, 17, 48)] * 2


# --- autocast and the meta device -------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", list(BUILDERS))
def test_autocast_returns_the_frameworks_dtype(framework, pairs, images):
    """Under autocast (fp16 on CPU: the interpreter computes bf16 wrongly) the kernels run in fp16 and each output
    has the dtype the framework returns; values within fp16 error of the framework's own autocast output."""
    reference, model = pairs[framework]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        expected = reference(images)
        got, counts = run_counted(model, images)
    assert_blocks_fused(counts)
    exp = expected.values() if isinstance(expected, dict) else [expected]
    out = got.values() if isinstance(got, dict) else [got]
    for a, b in zip(out, exp, strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("framework", list(BUILDERS))
def test_meta_device_propagates_shapes(framework, images):
    model = _build(framework).to("meta")
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = images.to("meta")
    with torch.no_grad():
        expected, got = first(reference(x)), first(model(x))
    assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype


# --- timm: the framework's own API on the accelerated model -----------------------------------------------------
def test_timm_api_works_on_the_accelerated_model(pairs, images):
    import timm.data

    reference, model = pairs["timm"]
    assert model.num_classes == 5 and model.num_features == 48
    assert timm.data.resolve_model_data_config(model) == timm.data.resolve_model_data_config(reference)
    with torch.no_grad():
        expected = reference.forward_intermediates(images, indices=2)
        got, counts = run_counted(model.forward_intermediates, images, indices=2)
        assert counts.get("attention") == 2 and counts.get("patch_embed") == 1
        torch.testing.assert_close(got[0], expected[0], **TOL)
        for a, b in zip(got[1], expected[1], strict=True):
            torch.testing.assert_close(a, b, **TOL)
        layers = model.get_intermediate_layers(images, n=2, norm=True)
        for a, b in zip(layers, reference.get_intermediate_layers(images, n=2, norm=True), strict=True):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(model.forward_head(model.forward_features(images), pre_logits=True),
                                   reference.forward_head(reference.forward_features(images), pre_logits=True), **TOL)


def test_timm_attn_mask_and_is_causal(pairs, images):
    reference, model = pairs["timm"]
    mask = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[..., 0] = True  # every query keeps a key
    with torch.no_grad():
        for kw in (dict(attn_mask=mask), dict(is_causal=True)):
            got, counts = run_counted(model, images, **kw)
            assert counts.get("attention") == 2
            torch.testing.assert_close(got, reference(images, **kw), **TOL)
        with pytest.raises(NotImplementedError, match="float"):
            model(images, attn_mask=torch.zeros(2, 1, 17, 17))


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_reset_classifier_with_another_pool(pool, images):
    model = timm_model(class_token=True)
    twin = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    for net in (model, twin):
        net.reset_classifier(3, global_pool=pool)
    twin.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images), twin(images), **TOL)
    model.reset_classifier(3, global_pool="max")
    with pytest.raises(NotImplementedError, match="global_pool='max'"), torch.no_grad():
        model(images)


def test_timm_gradient_checkpointing_trains_the_same(images):
    model = timm_model()
    twin = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    grads = []
    for net in (model, twin):
        net.set_grad_checkpointing(True)
        net.train()
        net(images).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_timm_dynamic_size_position_table_follows_data_writes():
    model = timm_model(dynamic_img_size=True)
    twin = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), **TOL)
        for net in (model, twin):
            net.pos_embed.data.mul_(-1.5)  # no version bump: a cache keyed on _version would miss it
        torch.testing.assert_close(model(x), twin(x), **TOL)


# --- Hugging Face: outputs, API, checkpoints --------------------------------------------------------------------
def test_hf_model_fields_match(pairs, images):
    reference, model = pairs["hf_model"]
    with torch.no_grad():
        expected, got = reference(images, output_hidden_states=True), model(images, output_hidden_states=True)
        expected_tuple, got_tuple = reference(images, return_dict=False), model(images, return_dict=False)
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, **TOL)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for ours, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(expected_tuple) == 2
    torch.testing.assert_close(got_tuple[1], expected_tuple[1], **TOL)


def test_hf_classifier_fields_and_loss_match(pairs, images):
    reference, model = pairs["hf_classifier"]
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        expected = reference(images, labels=labels, output_hidden_states=True)
        got = model(images, labels=labels, output_hidden_states=True)
        plain = model(images)
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys()) == ["loss", "logits",
                                                                                          "hidden_states"]
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)
    for ours, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert plain.loss is None and plain.hidden_states is None


def test_hf_without_qkv_bias_and_with_tanh_gelu_matches(images):
    model = hf_model(ViTForImageClassification, qkv_bias=False, hidden_act="gelu_pytorch_tanh")
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    with torch.no_grad():
        got, counts = run_counted(model, images)
        torch.testing.assert_close(got.logits, reference(images).logits, **TOL)
    assert_blocks_fused(counts)


def test_hf_interpolate_pos_encoding_matches(pairs):
    reference, model = pairs["hf_model"]
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        expected = reference(x, interpolate_pos_encoding=True).last_hidden_state
        got = model(x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(got, expected, **TOL)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"), torch.no_grad():
        model(x)


def test_hf_accelerated_model_is_a_pretrained_model_that_round_trips(pairs, images, tmp_path):
    from transformers import PreTrainedModel

    reference, model = pairs["hf_classifier"]
    assert isinstance(model, PreTrainedModel)
    model.save_pretrained(tmp_path)
    loaded = vit_kernels.accelerate(ViTForImageClassification.from_pretrained(tmp_path).eval())
    with torch.no_grad():
        got, counts = run_counted(loaded, images)
        torch.testing.assert_close(got.logits, reference(images).logits, **TOL)
    assert_blocks_fused(counts)


def test_hf_compiles_fullgraph_in_eval_under_no_grad(pairs, images):
    reference, model = pairs["hf_model"]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(images).last_hidden_state
        torch.testing.assert_close(got, reference(images).last_hidden_state, **TOL)
    torch._dynamo.reset()


def test_hf_gradients_reach_query_key_value(pairs, images):
    reference, model = pairs["hf_classifier"]
    labels = torch.tensor([0, 3])
    grads = []
    for net in (model, reference):
        net.zero_grad(set_to_none=True)
        net(images, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
        net.zero_grad(set_to_none=True)
    ours, theirs = grads
    assert list(ours) == list(theirs)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"vit.layers.0.attention.{proj}.weight" in ours
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_torchvision_classifier_replaced_after_patching_runs_as_the_users_module(images):
    """A new multi-layer ``heads`` set after accelerate: the fused trunk and final LayerNorm, then the user's
    own head module (the fused head kernel computes only torchvision's single Linear)."""
    fast = vit_kernels.accelerate(torchvision_model())
    heads = nn.Sequential(nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 3))
    fast.heads = heads
    reference = vit_kernels.restore(copy.deepcopy(fast))
    with torch.no_grad():
        got, counts = run_counted(fast, images)
        torch.testing.assert_close(got, reference(images), **TOL)
    assert got.shape == (2, 3)
    assert_blocks_fused(counts)


def test_torchvision_gradients_match(pairs, images):
    reference, model = pairs["torchvision"]
    grads = []
    for net in (model, reference):
        net.zero_grad(set_to_none=True)
        net(images).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
        net.zero_grad(set_to_none=True)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification])
def test_hf_output_attentions_come_from_the_probabilities_kernel(cls, images):
    model = hf_model(cls, attn_implementation="eager")  # sdpa returns no attention maps
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    with torch.no_grad():
        got, counts = run_counted(model, images, output_attentions=True)
        expected = reference(images, output_attentions=True)
    assert counts["attention_probs"] == 2
    assert len(got.attentions) == len(expected.attentions) == 2
    for ours, theirs in zip(got.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(first(got), first(expected), **TOL)


# --- paths the kernels do not take -----------------------------------------------------------------------------
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
    reference, model = pairs[framework]
    with torch.no_grad():
        out, maps = vit_kernels.attention_maps(model, images)
        torch.testing.assert_close(out, model(images), **TOL)
    expected = reference_maps(framework, copy.deepcopy(reference), images)
    assert len(maps) == len(expected) == 2
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_attention_maps_accelerates_a_model_and_refuses_unfused_blocks(images):
    model = timm_model()
    with torch.no_grad():
        _, maps = vit_kernels.attention_maps(model, images)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17) and vit_kernels.is_accelerated(model)
    vit_kernels.restore(model.blocks[1])  # a block running timm's own forward gives no map
    with pytest.raises(RuntimeError, match="1 of 2 fused blocks"), torch.no_grad():
        vit_kernels.attention_maps(model, images)


@pytest.mark.parametrize("framework,kw,rates", [
    ("torchvision", dict(dropout=0.1, attention_dropout=0.2), (0.2, 0.1, 0.1, 0.1)),
    ("hf_model", dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2), (0.2, 0.1, 0.0, 0.1)),
    ("timm", dict(attn_drop_rate=0.2, proj_drop_rate=0.1, pos_drop_rate=0.1), (0.2, 0.1, 0.1, 0.1)),
])
@pytest.mark.slow  # 20 s a framework in the interpreter: full tier
def test_train_mode_dropout_runs_in_the_kernels(framework, kw, rates, images, monkeypatch):
    """Every framework's dropout reaches the kernels at its own place (attention probabilities, after the
    attention projection, after the MLP activation, after the MLP), plus the embedding dropout."""
    make = {"torchvision": torchvision_model, "hf_model": hf_model, "timm": timm_model}[framework]
    fast = vit_kernels.accelerate(make(**kw)).train()
    events = []  # (op, dropout rate) of every attention and GEMM call, in order

    def recording(name, op):
        def call(*args, **kwargs):
            events.append((name, kwargs.get("dropout", 0.0)))
            return op(*args, **kwargs)
        return call

    for name in ("attention", "linear", "layer_norm_linear"):  # a GEMM with its LayerNorm inside counts as a GEMM
        monkeypatch.setattr(ops, name, recording("attention" if name == "attention" else "linear", getattr(ops, name)))

    def recording_mlp(op):  # the MLP in training: fc1's and fc2's GEMMs in one op
        def call(*args, **kwargs):
            events.extend([("linear", kwargs.get("hidden_dropout", 0.0)), ("linear", kwargs.get("dropout", 0.0))])
            return op(*args, **kwargs)
        return call

    monkeypatch.setattr(ops, "mlp", recording_mlp(ops.mlp))

    def block_rates():  # per block: attention's rate, then those of the proj, fc1 and fc2 GEMMs that follow it
        rates = [(p, *(r for _, r in events[i + 1:i + 4])) for i, (op, p) in enumerate(events) if op == "attention"]
        events.clear()
        return rates

    ops.reset_launch_counts()
    torch.manual_seed(7)
    a = first(fast(images))
    assert block_rates() == [rates] * 2
    assert ops.launch_counts().get("dropout") == 1  # the embedding dropout
    torch.manual_seed(7)
    assert torch.equal(a, first(fast(images)))
    a.square().mean().backward()
    used = [(n, p) for n, p in fast.named_parameters() if "pooler" not in n]  # the pooler feeds another output
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in used), \
        [n for n, p in used if p.grad is None]
    events.clear()
    with torch.no_grad():
        fast.eval()(images)
    assert block_rates() == [(0.0, 0.0, 0.0, 0.0)] * 2


def test_timm_stochastic_depth_in_the_kernels_equals_timm(images):
    """DropPath's per-sample factors are drawn from torch's generator in timm's order, so with the same seed the
    fused forward (proj / fc2 epilogues) equals timm's own, and so do the gradients."""
    fast = timm_model(drop_path_rate=0.5).train()
    model = copy.deepcopy(fast)
    vit_kernels.accelerate(fast)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    got, counts = run_counted(fast, x)
    assert_blocks_fused(counts)
    torch.manual_seed(7)
    expected = model(x)
    torch.testing.assert_close(got, expected, **TOL)
    ours = torch.autograd.grad(got.square().mean(), list(fast.parameters()))
    theirs = torch.autograd.grad(expected.square().mean(), list(model.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_timm_patch_dropout_runs_timms_module_between_fused_pieces(images):
    """Patch dropout (a token gather) is timm's own PatchDropout module; everything around it is fused."""
    fast = timm_model(patch_drop_rate=0.25).train()
    model = copy.deepcopy(fast)
    vit_kernels.accelerate(fast)
    torch.manual_seed(7)
    got, counts = run_counted(fast, images)
    assert_blocks_fused(counts)
    torch.manual_seed(7)
    torch.testing.assert_close(got, model(images), **TOL)


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
        torchvision_vit.patch_torchvision(nn.Linear(2, 2))
    fast = pairs["torchvision"][1]
    with pytest.raises(ValueError, match="differs from the model's image_size"), torch.no_grad():
        fast(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="input channels"), torch.no_grad():
        fast(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("act", ["relu", "swish"])
def test_hf_unsupported_activation_is_named(act):
    with pytest.raises(NotImplementedError, match=f"hidden_act='{act}'"):
        vit_kernels.accelerate(ViTModel(ViTConfig(**HF, hidden_act=act)))


def test_hf_bool_masked_pos_is_named(pairs, images):
    fast = pairs["hf_model"][1]
    with pytest.raises(NotImplementedError, match="bool_masked_pos"), torch.no_grad():
        fast(images, bool_masked_pos=torch.ones(2, 16, dtype=torch.bool))


def test_hf_attention_mask_runs_in_the_attention_kernel(pairs, images):
    """HF's sdpa mask (bool [B, 1, N, N], True = attend) goes to the attention kernel; eager's additive float mask
    is refused by name."""
    reference, fast = pairs["hf_model"]
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, -1] = False  # HF drops an attention mask that masks nothing
    with torch.no_grad():
        got, counts = run_counted(fast, images, attention_mask=mask)
        torch.testing.assert_close(got.last_hidden_state, reference(images, attention_mask=mask).last_hidden_state,
                                   **TOL)
    assert counts["attention"] == 2
    eager = vit_kernels.accelerate(hf_model(attn_implementation="eager"))
    with pytest.raises(NotImplementedError, match=r"attention_mask of torch\.float32"), torch.no_grad():
        eager(images, attention_mask=mask)


def test_hf_bad_model_and_arguments(pairs, images):
    with pytest.raises(TypeError, match="expects a transformers ViTModel"):
        hf_vit.patch_hf(nn.Linear(2, 2))
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


# --- refused when patching, not at the first forward ------------------------------------------------------------
HEAD_DIM_300 = {
    "tutorial": lambda: tutorial_model(emb_size=600, num_heads=2),
    "timm": lambda: timm_model(embed_dim=600, num_heads=2),
    "torchvision": lambda: VisionTransformer(**dict(TV, hidden_dim=600, num_heads=2)),
    "hf_model": lambda: ViTModel(ViTConfig(**dict(HF, hidden_size=600, num_attention_heads=2))),
}


@pytest.mark.parametrize("framework", list(HEAD_DIM_300))
def test_head_dim_over_the_kernel_limit_is_refused_when_patching(framework):
    model = HEAD_DIM_300[framework]()
    with pytest.raises(NotImplementedError, match="head_dim 300 exceeds the attention kernel's maximum of 256"):
        vit_kernels.accelerate(model)
    assert not vit_kernels.is_accelerated(model)


def test_tutorial_image_size_follows_its_positions():
    """The tutorial's conv floors the image sides, so an 18 px model (patch 4: a 4x4 grid, 17 positions) takes
    16..19 px images; the fused embedding accepts exactly those and names the grid otherwise."""
    model = tutorial_model(img_size=18, patch_size=4)
    reference = copy.deepcopy(model)
    vit_kernels.accelerate(model)
    for side in (16, 18, 19):
        x = torch.randn(2, 3, side, 17)
        with torch.no_grad():
            got, counts = run_counted(model, x)
            torch.testing.assert_close(got, reference(x), **TOL)
        assert counts.get("patch_embed") == 1
    with pytest.raises(ValueError, match="positions were built for 4x4 patches of 4 px"), torch.no_grad():
        model(torch.randn(2, 3, 20, 20))


def test_tutorial_positions_without_a_square_grid_are_refused():
    model = tutorial_model()
    model[0].positions = nn.Parameter(torch.randn(18, 48))
    with pytest.raises(NotImplementedError, match="18 position rows"):
        vit_kernels.accelerate(model)
