"""FSDP2 on an accelerated model (timm, torchvision, Hugging Face): two gloo processes on CPU, ``fully_shard`` per
block, the kernels in the interpreter; the sharded steps equal the framework's own model trained in one process on
the whole batch, and a sharded checkpoint (torch.distributed.checkpoint) loads back into a fresh sharded model
exactly. The adapters' shared-parameter wrappers see FSDP2's DTensor parameters replaced at every step."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("framework", ["timm", "torchvision", "hf_classifier"])
def test_fsdp2_per_block_trains_an_accelerated_model(tmp_path, framework):
    result = tmp_path / "result.json"
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, worker, str(free_port()), str(result), str(tmp_path / "checkpoint"),
                           framework], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(result.read_text())
    launches = out["launches"]  # 2 blocks x 2 steps on the kernels, forward and backward
    assert launches.get("attention") == 2 * 2 and launches.get("attention_backward"), launches
    assert out["min_param_change"] > 0  # every parameter was trained
    for got, expected in zip(out["losses"], out["expected"], strict=True):
        assert abs(got - expected) <= 1e-4 * abs(expected) + 1e-5, out
    assert out["max_param_diff"] <= 1e-4, out
    assert out["reloaded"] == dict(max_param_diff=0.0, same_forward=True), out  # the sharded checkpoint round trip
