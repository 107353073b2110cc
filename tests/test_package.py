"""The public API surface."""
import vit_kernels


def test_public_api():
    assert {"ViT", "from_timm", "ops", "reference", "__version__"} <= set(dir(vit_kernels))
    assert issubclass(vit_kernels.ViT, vit_kernels.reference.ViT)
    assert callable(vit_kernels.ops.attention)


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vit_kernels.nope
