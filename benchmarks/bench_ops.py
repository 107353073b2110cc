"""Per-op benchmarks at ViT shapes vs their PyTorch baselines, for any registered op or composite (see
`vit-kernels bench --help`; without --no-e2e that command adds the end-to-end benchmark).

    PYTHONPATH=$PWD python benchmarks/bench_ops.py attention [mlp ...] [--model vit_b_16 vit_l_16] [--batch 64 256]
"""
import sys

from vit_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--no-e2e", "--ops", *sys.argv[1:]]))
