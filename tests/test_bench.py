"""`vit-kernels bench` in its CPU form: labelled, never GPU-looking, and it writes JSON, plots and tables."""
import json

import pytest
import torch

import vit_kernels
from vit_kernels import cli, ops
from vit_kernels.bench import HEADLINE_KEYS, on_gpu, run_ops
from vit_kernels.bench.models import CONFIGS, build_candidates, gflop_per_image

pytestmark = pytest.mark.skipif(on_gpu(), reason="the CPU version of the benchmarks; GPU runs are the campaign's")


def test_cpu_bench_writes_labelled_results(tmp_path, capsys):
    assert cli.main(["bench", "--batch", "1", "--ops", "layer_norm", "attention", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("real numbers need a GPU") == 2  # before and after the tables
    assert "| tiny | 1 | ours (from_timm) |" in out and "| attention | tiny B=1 | sdpa |" in out
    e2e = json.loads(next(tmp_path.glob("e2e_tiny_cpu_*.json")).read_text())
    assert tuple(e2e["headline"]) == HEADLINE_KEYS and set(e2e["headline"].values()) == {None}
    assert e2e["device"]["gpu"] is None and "not GPU performance" in e2e["device"]["note"]
    assert {r["candidate"] for r in e2e["rows"]} == {"ours (from_timm)", "timm eager (SDPA)", "reference eager",
                                                     "ours (tutorial ViT)"}
    assert all(r["tflops"] is None and r["mfu"] is None and r["graph_ms"] is None for r in e2e["rows"])
    ops = json.loads(next(tmp_path.glob("ops_tiny_cpu_*.json")).read_text())
    assert {r["op"] for r in ops["rows"]} == {"layer_norm", "attention"}
    assert all(r["gbps"] is None and r["tflops"] is None for r in ops["rows"])
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_timm_baseline_is_not_the_accelerated_model():
    """from_timm patches in place: the benchmark's accelerated candidate is a copy, so the timm baseline (eager
    and, on a GPU, compiled) still runs timm's own forward and the comparison is ours vs timm, not ours vs ours."""
    candidates = build_candidates("tiny", torch.float32, "cpu")
    timm_eager, (ours, twin) = candidates["timm eager (SDPA)"][0], candidates["ours (from_timm)"]
    assert twin == "timm eager (SDPA)" and ours is not timm_eager
    assert vit_kernels.is_accelerated(ours) and not vit_kernels.is_accelerated(timm_eager)
    img = CONFIGS["tiny"]["img"]
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        ops.reset_launch_counts()
        expected = timm_eager(x)
        assert ops.launch_counts() == {}  # timm's own forward: no kernel
        got = ours(x)
        assert {"patch_embed", "layer_norm", "linear", "attention"} <= set(ops.launch_counts())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_on_cpu_is_refused(capsys):
    assert cli.main(["bench", "--dtype", "bfloat16"]) == 2
    assert "interpreter" in capsys.readouterr().err


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ops"):
        run_ops(["softmax"], ["tiny"], [1])


def test_flop_model():
    assert gflop_per_image("vit_b_16") == pytest.approx(35.2, abs=0.15)  # the GPU rounds' 35.2 GFLOP/image
    assert gflop_per_image("vit_l_16") > 3 * gflop_per_image("vit_b_16")


def test_cpu_train_step_bench(tmp_path, capsys):
    assert cli.main(["bench", "--train", "--no-e2e", "--ops", "none", "--out", str(tmp_path)]) == 0
    assert "| tiny | 2 | ours (from_timm) |" in capsys.readouterr().out
    train = json.loads(next(tmp_path.glob("train_tiny_cpu_*.json")).read_text())
    assert {r["candidate"] for r in train["rows"]} == {"ours (from_timm)", "timm eager (SDPA)", "reference eager",
                                                       "ours (tutorial ViT)"}
    assert all(r["peak_mib"] is None and r["first_loss"] > 0 for r in train["rows"])
    assert set(train["headline"].values()) == {None}
