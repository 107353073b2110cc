"""End-to-end inference benchmark: ours vs the reference, timm eager and torch.compile'd timm, with MFU, CUDA-graph
batch-1 latency and the headline object (see `vit-kernels bench --help`).

    PYTHONPATH=$PWD python benchmarks/bench_vit.py [--model vit_b_16] [--batch 1 256] [--compile none]
"""
import sys

from vit_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "none", *sys.argv[1:]]))
