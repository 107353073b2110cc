from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("vit_kernels/_version.py").read_text(), version)

setup(
    name="vit_kernels",
    version=version["__version__"],
    description="Fused Triton GPU kernels and a drop-in fast Vision Transformer",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vit_kernels", "vit_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.4", "einops>=0.7"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "timm>=1.0", "matplotlib", "torchvision", "transformers"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["vit-kernels=vit_kernels.cli:main"]},
)
