"""create_model: name validation, every supported name, local checkpoints with timm and torchvision keys."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vit_kernels
from vit_kernels import ops
from vit_kernels.configs import timm_kwargs
from vit_kernels.models import factory

TINY = timm_kwargs("tiny_timm", num_classes=10)  # 32 x 32 images, patch 8, emb 48, depth 2, 2 heads
TOL = dict(rtol=1e-4, atol=1e-5)


def test_exported():
    assert vit_kernels.create_model is factory.create_model
    assert "create_model" in vit_kernels.__all__


def test_supported_names_are_the_plain_vits_and_the_deployed_families():
    names = set(factory.supported_models())
    assert {"vit_tiny_patch16_224", "vit_base_patch16_224", "vit_base_patch32_384", "vit_small_patch8_224",
            "vit_large_patch14_224", "vit_huge_patch14_224"} <= names
    assert {"vit_large_patch14_clip_224", "vit_large_patch14_clip_quickgelu_224", "vit_base_patch16_siglip_224",
            "vit_so400m_patch14_siglip_224", "vit_base_patch14_dinov2", "vit_large_patch14_reg4_dinov2",
            "vit_giant_patch14_dinov2", "eva02_base_patch14_224", "vit_base_patch16_dinov3"} <= names
    assert not any("relpos" in n or "miil" in n or "enormous" in n or n == "vit_giant_patch14_224" for n in names)


@pytest.mark.parametrize("name", ["resnet50", "vit_base_patch16_224_miil", "eva02_enormous_patch14_clip_224",
                                  "vit_base_patch16_256", "deit_base_patch16_224", 42])
def test_unknown_names_list_the_supported_ones(name):
    with pytest.raises(ValueError, match=r"unsupported model name.*vit_base_patch16_224.*vit_tiny_patch16_384"):
        vit_kernels.create_model(name)


def test_tags_are_accepted_and_checked():
    model = vit_kernels.create_model("vit_base_patch16_224.augreg_in21k", device="meta")
    assert model.head.out_features == 21843  # the tag's config, still no download
    with pytest.raises(ValueError, match="unknown tag 'nope'"):
        vit_kernels.create_model("vit_base_patch16_224.nope", device="meta")


def test_pretrained_is_refused():
    with pytest.raises(ValueError, match="never downloads"):
        vit_kernels.create_model("vit_tiny_patch16_224", pretrained=True, **TINY)


@pytest.mark.parametrize("name", factory.supported_models())
def test_every_supported_name_builds_on_meta(name):
    model = vit_kernels.create_model(name, device="meta")
    assert isinstance(model, (timm.models.vision_transformer.VisionTransformer, timm.models.eva.Eva))  # timm's own
    assert vit_kernels.is_accelerated(model)
    patch = int(name.split("_patch")[1].split("_")[0])
    assert model.patch_embed.patch_size == (patch, patch)
    if name.rsplit("_", 1)[1].isdigit():  # dinov2 / dinov3 names carry no image size
        size = int(name.rsplit("_", 1)[1])
        assert model.patch_embed.img_size == (size, size)
    assert next(model.parameters()).device.type == "meta"


def tiny_timm():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped", "bin_state_dict_wrapped"])
def test_timm_checkpoint_round_trip(tmp_path, fmt):
    source = tiny_timm()
    state = source.state_dict()
    path = tmp_path / f"ckpt.{fmt.split('_')[0]}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        wrapper = {"pth": lambda s: s, "pth_wrapped": lambda s: {"model": s, "epoch": 3},
                   "bin_state_dict_wrapped": lambda s: {"state_dict": s}}[fmt]
        torch.save(wrapper(state), path)
    model = vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=path, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), **TOL)


def tiny_torchvision():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48,
                                mlp_dim=96, num_classes=10).eval()


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_torchvision_checkpoint_matches_torchvision(tmp_path, suffix):
    source = tiny_torchvision()
    with torch.no_grad():  # torchvision initialises the head to zeros and pos_embedding small: liven them up
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"vit.{suffix}"
    state = source.state_dict()
    if suffix == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    model = vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=path, **TINY, mlp_ratio=2.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ops.reset_launch_counts()
        got = model(x)
        assert {"patch_embed", "layer_norm_linear", "linear", "attention"} <= set(ops.launch_counts())
        torch.testing.assert_close(got, source(x), **TOL)


def test_torchvision_key_conversion():
    state = tiny_torchvision().state_dict()
    converted = factory.torchvision_to_timm(state)
    assert set(converted) == set(tiny_timm().state_dict())
    qkv = state["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"]
    assert converted["blocks.1.attn.qkv.weight"] is qkv
    assert factory.is_torchvision_state_dict(state) and not factory.is_torchvision_state_dict(converted)


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    state = tiny_timm().state_dict()
    good = tmp_path / "good.pt"
    torch.save(state, good)
    with pytest.raises(ValueError, match=r"shape mismatches \(2\): head\.weight: \(10, 48\) in the checkpoint, "
                                         r"\(5, 48\) in the model"):
        vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=good, **dict(TINY, num_classes=5))
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.extra"] = torch.randn(3)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, bad)
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias; "
                                         r"unexpected keys \(1\): blocks\.1\.extra"):
        vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=bad, **TINY)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "none.pth", **TINY)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=odd, **TINY)
    listing = tmp_path / "list.pt"
    torch.save([torch.randn(2)], listing)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        vit_kernels.create_model("vit_tiny_patch16_224", checkpoint_path=listing, **TINY)
