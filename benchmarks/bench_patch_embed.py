"""Per-op benchmark: patch_embed at ViT shapes vs its PyTorch baselines (see `vit-kernels bench --help`).

    PYTHONPATH=$PWD python benchmarks/bench_patch_embed.py [--model vit_b_16 vit_l_16] [--batch 64 256]
"""
import sys

from vit_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--no-e2e", "--ops", "patch_embed", *sys.argv[1:]]))
