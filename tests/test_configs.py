"""The shared size table (vit_kernels.configs) and error measure (vit_kernels.tolerance)."""
import pytest
import torch

from vit_kernels.bench.models import CONFIGS
from vit_kernels.configs import SIZES, as_dict, timm_kwargs, tutorial_kwargs
from vit_kernels.tolerance import error_bound, max_error


def test_kwargs_and_overrides():
    assert tutorial_kwargs("tiny") == dict(in_channels=3, patch_size=8, emb_size=72, img_size=48, depth=2,
                                           n_classes=10, num_heads=3)
    assert timm_kwargs("tiny_timm") == dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                            num_classes=7)
    assert tutorial_kwargs("vit_b_16", depth=1, scaling="paper")["depth"] == 1
    assert timm_kwargs("vit_b_16", num_classes=0)["num_classes"] == 0
    assert SIZES["vit_b_16"].tokens == 197 and SIZES["tiny"].tokens == 37
    with pytest.raises(ValueError, match="unknown model size 'vit_x'"):
        tutorial_kwargs("vit_x")


def test_bench_configs_keep_their_shape():
    assert set(CONFIGS) == {"vit_s_16", "vit_b_16", "vit_l_16", "vit_h_14", "tiny", "clip_l_14", "siglip_b_16",
                            "siglip_so400m_14", "dinov2_b_14_518", "eva02_b_14"}
    assert CONFIGS["vit_h_14"] == dict(as_dict("vit_h_14"), timm="vit_huge_patch14_224", patch=14, emb=1280,
                                       depth=32, heads=16, img=224, family="vit")
    assert CONFIGS["dinov2_b_14_518"]["family"] == "dinov2" and CONFIGS["dinov2_b_14_518"]["img"] == 518


def test_max_error_and_bound():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])
    assert max_error(a, b) == 0.5 and max_error(a[:0], b[:0]) == 0.0
    ref = torch.tensor([4.0, -8.0])
    assert error_bound(torch.float32, None, ref) == pytest.approx(8e-4)
    assert error_bound(torch.float32, None, ref, fp32_rtol=1e-3) == pytest.approx(8e-3)
    assert error_bound(torch.float32, None, ref[:0]) == pytest.approx(1e-4)
    lowp = torch.tensor([4.0, -8.25])
    assert error_bound(torch.float16, lowp, ref) == pytest.approx(0.5 + 1e-5)
    assert error_bound(torch.bfloat16, lowp, ref, floor=0.0) == 0.5
