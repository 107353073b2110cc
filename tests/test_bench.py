"""`vit-kernels bench` in its CPU form: labelled, never GPU-looking, and it writes JSON, plots and tables."""
import json
import pathlib
import sys

import pytest
import torch

import vit_kernels
from vit_kernels import cli, ops
from vit_kernels.bench import HEADLINE_KEYS, on_gpu, run_ops, timing
from vit_kernels.bench.models import CONFIGS, build_candidates, gflop_per_image
from vit_kernels.bench.ops import ops_headline as run_ops_headline

pytestmark = pytest.mark.skipif(on_gpu(), reason="the CPU version of the benchmarks; GPU runs are the campaign's")


def test_cpu_bench_writes_labelled_results(tmp_path, capsys):
    assert cli.main(["bench", "--batch", "1", "--ops", "layer_norm", "attention", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("real numbers need a GPU") == 2  # before and after the tables
    assert "| tiny | 1 | ours (from_timm) |" in out and "| attention | tiny B=1 | sdpa |" in out
    e2e = json.loads(next(tmp_path.glob("e2e_tiny_cpu_*.json")).read_text())
    head, missing = e2e["headline"], e2e["headline_missing"]
    assert tuple(head) == HEADLINE_KEYS and "bs1_vs_timm_eager" not in head
    assert head["torch"] == torch.__version__ and head["triton"]  # versions always; figures never on a CPU
    assert {k for k, v in head.items() if v is None} == set(missing) == set(HEADLINE_KEYS) - {"torch", "triton"}
    assert set(missing.values()) == {"CPU run: no GPU timings"}
    assert "headline not measured, CPU run: no GPU timings: gpu, clock_mhz" in out
    assert e2e["device"]["gpu"] is None and "not GPU performance" in e2e["device"]["note"]
    assert {r["candidate"] for r in e2e["rows"]} == {"ours (from_timm)", "timm eager (SDPA)", "reference eager",
                                                     "timm eager (SDPA, cudnn.benchmark off)", "ours (tutorial ViT)"}
    assert e2e["repeats"] == 1 and all(len(r["rounds"]) == 1 and r["ms_min"] == r["ms"] == r["ms_max"]
                                       for r in e2e["rows"])
    assert all(r["tflops"] is None and r["mfu"] is None and r["graph_ms"] is None for r in e2e["rows"])
    ops = json.loads(next(tmp_path.glob("ops_tiny_cpu_*.json")).read_text())
    assert {r["op"] for r in ops["rows"]} == {"layer_norm", "attention"}
    assert all(r["gbps"] is None and r["tflops"] is None for r in ops["rows"])
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_timm_baseline_is_not_the_accelerated_model():
    """from_timm patches in place: the benchmark's accelerated candidate is a copy, so the timm baseline (eager
    and, on a GPU, compiled) still runs timm's own forward and the comparison is ours vs timm, not ours vs ours."""
    candidates = build_candidates("tiny", torch.float32, "cpu")
    timm_eager, ours = candidates["timm eager (SDPA)"].model, candidates["ours (from_timm)"].model
    assert candidates["ours (from_timm)"].twin == "timm eager (SDPA)" and ours is not timm_eager
    off = candidates["timm eager (SDPA, cudnn.benchmark off)"]
    assert off.model is timm_eager and not off.cudnn_benchmark and candidates["timm eager (SDPA)"].cudnn_benchmark
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


def test_bench_without_matplotlib_still_writes_json_and_tables(tmp_path, capsys, monkeypatch):
    """A plain `pip install -e .` has no matplotlib: the results are saved and printed, and the message says how
    to get plots (it used to end in a ModuleNotFoundError after all the work)."""
    from vit_kernels.bench import report

    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now fails, as when not installed
    assert cli.main(["bench", "--batch", "1", "--ops", "layer_norm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed: no plot (pip install matplotlib") == 2
    assert len(list(tmp_path.glob("*.json"))) == 2 and not list(tmp_path.glob("*.png"))
    assert "| tiny | 1 | ours (from_timm) |" in out and "| layer_norm | tiny B=1 |" in out


def test_headline_fills_every_figure_it_has_and_names_the_rest(monkeypatch):
    """The headline logic on made-up GPU rows: ratios are baseline time over ours; figures from the op and training
    benchmarks of the same run are merged; what no benchmark measured stays None with its reason."""
    from vit_kernels.bench import e2e

    monkeypatch.setattr(e2e, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Test GPU")
    monkeypatch.setattr(timing, "clock_mhz", lambda: 1755)

    def row(batch, cand, ms, graph=None):
        return dict(model="vit_b_16", batch=batch, candidate=cand, ms=ms, img_per_s=batch / ms * 1e3, mfu=0.5,
                    graph_ms=graph)

    rows = [row(256, e2e.OURS, 20.0), row(256, e2e.TIMM, 25.0), row(256, "timm torch.compile (max-autotune)", 22.0),
            row(64, e2e.OURS, 6.0), row(64, e2e.TIMM, 6.6), row(1, e2e.OURS, 2.0, 0.5), row(1, e2e.TIMM, 1.0, 0.7)]
    head, missing = e2e.headline(rows, torch.bfloat16, peak_gemm_tflops=700.0)
    assert head["gpu"] == "Test GPU" and head["clock_mhz"] == 1755 and head["peak_gemm_tflops"] == 700.0
    assert head["bs256_vs_timm_eager"] == pytest.approx(1.25)
    assert head["bs256_vs_compile_max_autotune"] == pytest.approx(1.1)
    assert head["bs64_eager_vs_timm_eager"] == pytest.approx(1.1)
    assert (head["bs1_eager_ms"], head["bs1_latency_ms"]) == (2.0, 0.5)
    assert head["bs1_eager_vs_timm_eager"] == pytest.approx(0.5)
    assert head["bs1_graph_vs_timm_graph"] == pytest.approx(1.4)
    assert set(missing) == {"bs1_graph_vs_compile_cudagraphs", "attention_n197_vs_best_sdpa",
                            "train_bs128_vs_compile", "train_bs128_vs_timm_eager", "train_bs128_peak_vs_timm_eager"}
    result = dict(headline=head, headline_missing=missing)
    e2e.merge_headline(result, {"attention_n197_vs_best_sdpa": 0.9, "train_bs128_vs_compile": None})
    assert head["attention_n197_vs_best_sdpa"] == 0.9 and "attention_n197_vs_best_sdpa" not in missing
    assert head["train_bs128_vs_compile"] is None  # a None figure does not overwrite
    assert "--train" in missing["train_bs128_vs_compile"]
    ops_result = dict(device=dict(gpu="Test GPU"), dtype="bfloat16", rows=[
        dict(op="attention", shape="vit_b_16 B=256", impl=impl, ms=ms)
        for impl, ms in (("ours", 0.2), ("sdpa flash", 0.25), ("sdpa cudnn", 0.18), ("sdpa math", 2.0))])
    assert run_ops_headline(ops_result) == {"attention_n197_vs_best_sdpa": pytest.approx(0.9)}


def test_readme_benchmark_tables_are_generated_from_their_json():
    from vit_kernels.bench import readme

    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    source = readme.source_of(text)
    assert source and (root / source).is_file(), "README's benchmark block must name its JSON"
    block = readme.tables(json.loads((root / source).read_text()), source)
    assert block in text, f"stale: python -m vit_kernels.bench.readme {source} --write README.md"
    assert readme.rewrite(text, block) == text
    with pytest.raises(ValueError, match="no generated benchmark block"):
        readme.rewrite("# a README without the markers", block)


def test_readme_tables_put_like_for_like_first(tmp_path):
    from vit_kernels.bench import readme

    def row(batch, cand, ms, graph=None):
        return dict(model="vit_b_16", batch=batch, candidate=cand, dtype="bfloat16", ms=ms, img_per_s=batch / ms * 1e3,
                    graph_ms=graph)

    result = dict(device=dict(gpu="Test GPU", torch="2.11", triton="3.6", date="2026-11-26T00:00:00"), repeats=3,
                  rows=[row(1, "timm eager (SDPA)", 2.0, 0.8), row(1, "ours (from_timm)", 1.0, 0.4),
                        row(1, "timm eager (SDPA, cudnn.benchmark off)", 2.5, 0.9)])
    block = readme.tables(result, "x.json")
    like = block.index("like for like")
    assert like < block.index("every candidate") and "over 3 interleaved rounds" in block
    assert "| 1 | 1.000 ms | 2.000 ms | 2.00x | 0.400 ms | 0.800 ms | 2.00x |" in block
    assert "predates the cudnn.benchmark rows" not in block
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    readme_path = tmp_path / "README.md"
    readme_path.write_text("intro\n" + readme.BEGIN.format("`old`") + "\nold\n" + readme.END + "\noutro\n")
    assert readme.main([str(path), "--write", str(readme_path)]) == 0
    assert readme_path.read_text() == "intro\n" + readme.tables(result, str(path)) + "\noutro\n"
