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


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
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
                                                     "timm eager (SDPA, cudnn.benchmark off)", "ours (tutorial ViT)",
                                                     "ours (from_timm, LayerNorm unfused)"}
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
        assert {"patch_embed", "layer_norm_linear", "linear", "attention"} <= set(ops.launch_counts())
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


@pytest.mark.slow  # minutes of interpreted benchmarking on CPU: full tier
def test_cpu_train_step_bench(tmp_path, capsys):
    assert cli.main(["bench", "--train", "--no-e2e", "--ops", "none", "--out", str(tmp_path)]) == 0
    assert "| tiny | 2 | ours (from_timm) |" in capsys.readouterr().out
    train = json.loads(next(tmp_path.glob("train_tiny_cpu_*.json")).read_text())
    assert {r["candidate"] for r in train["rows"]} == {
        "ours (from_timm)", "timm eager (SDPA)", "reference eager", "ours (tutorial ViT)",
        "ours (from_timm, activation checkpointing)", "ours (from_timm, FSDP2 fully_shard, 1 GPU)",
        "ours (from_timm, fc1 pre-activation recomputed)"}
    assert all(r["peak_mib"] is None and r["first_loss"] > 0 for r in train["rows"])
    assert train["repeats"] == 1 and all(r["rounds"] == [r["ms"]] and r["ms_min"] == r["ms_max"] == r["ms"]
                                         for r in train["rows"])
    assert set(train["headline"].values()) == {None}


@pytest.mark.slow  # minutes of interpreted benchmarking on CPU: full tier
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
            row(64, e2e.OURS, 6.0), row(64, e2e.TIMM, 6.6), row(1, e2e.OURS, 2.0, 0.5), row(1, e2e.TIMM, 1.0, 0.7),
            row(1, e2e.OURS_GRAPHS, 0.6)]
    head, missing = e2e.headline(rows, torch.bfloat16, peak_gemm_tflops=700.0)
    assert head["gpu"] == "Test GPU" and head["clock_mhz"] == 1755 and head["peak_gemm_tflops"] == 700.0
    assert head["bs256_vs_timm_eager"] == pytest.approx(1.25)
    assert head["bs256_vs_compile_max_autotune"] == pytest.approx(1.1)
    assert head["bs64_eager_vs_timm_eager"] == pytest.approx(1.1)
    assert (head["bs1_eager_ms"], head["bs1_latency_ms"]) == (2.0, 0.5)
    assert head["bs1_eager_vs_timm_eager"] == pytest.approx(0.5)
    assert head["bs1_graph_vs_timm_graph"] == pytest.approx(1.4)
    assert head["bs1_graph_runner_ms"] == 0.6
    assert set(missing) == {"bs1_graph_vs_compile_cudagraphs", "bs1_graph_runner_vs_compile_cudagraphs",
                            "attention_n197_vs_best_sdpa",
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


@pytest.mark.slow  # minutes of interpreted benchmarking on CPU: full tier
def test_cpu_breakdown_attributes_interpreted_kernels_and_aten_ops(tmp_path, capsys):
    """`bench --breakdown` on a CPU: ours (Triton-interpreter launches, named after their kernels while profiled)
    and timm eager (top-level aten ops) split into the same categories; times only, no rates or peaks."""
    from vit_kernels.bench.breakdown import ORDER

    assert cli.main(["bench", "--breakdown", "--no-e2e", "--ops", "none", "--batch", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("real numbers need a GPU") == 2
    assert "| tiny | 2 | ours (from_timm) | gemm |" in out and "| tiny | 2 | timm eager (SDPA) | attention |" in out
    assert "gap ms (wall - kernels)" in out
    result = json.loads(next(tmp_path.glob("breakdown_tiny_cpu_*.json")).read_text())
    assert result["benchmark"] == "breakdown" and result["device"]["gpu"] is None
    assert result["peaks"] == dict(gemm_tflops=None, copy_gbps=None)
    rows = {r["candidate"]: r for r in result["rows"]}
    assert set(rows) == {"ours (from_timm)", "timm eager (SDPA)"}
    depth = CONFIGS["tiny"]["depth"]
    expected = {  # top kernel / op, launches per forward (4 GEMMs per block + the head)
        # ours: the LayerNorms are folded into the qkv / fc1 GEMMs (the final one: in the pooling kernel)
        "ours (from_timm)": dict(gemm=("_linear_kernel", 4 * depth + 1), attention=("_attention_fwd_kernel", depth),
                                 patch_embed=("_patch_embed_kernel", 1)),
        "timm eager (SDPA)": dict(gemm=("aten::linear", 4 * depth + 1),
                                  attention=("aten::scaled_dot_product_attention", depth),
                                  layer_norm=("aten::layer_norm", 2 * depth + 1), patch_embed=("aten::conv2d", 1)),
    }
    for cand, r in rows.items():
        assert (r["model"], r["batch"], r["dtype"], r["forwards"]) == ("tiny", 2, "float32", 1)
        assert tuple(r["categories"]) == ORDER
        assert r["wall_ms"] > 0 and r["kernel_ms"] > 0
        assert r["gap_ms"] == pytest.approx(r["wall_ms"] - r["kernel_ms"])
        assert sum(c["share"] for c in r["categories"].values()) == pytest.approx(1.0)
        for cat, (top, launches) in expected[cand].items():
            c = r["categories"][cat]
            assert c["ms"] > 0 and c["launches"] == launches and c["top"][0]["name"] == top, (cand, cat, c)
            assert sum(k["launches"] for k in c["top"]) == launches
        assert all(c["tflops"] is None and c["gbps"] is None and c["frac_of_peak"] is None
                   for c in r["categories"].values())
    assert "_pool_norm_kernel" in {k["name"] for k in rows["ours (from_timm)"]["categories"]["other"]["top"]}
    assert rows["ours (from_timm)"]["categories"]["layer_norm"]["launches"] == 0
    # ours in the interpreter: the launches are nearly all of the forward (the rest: Python between them)
    assert rows["ours (from_timm)"]["categories"]["gemm"]["ms"] > rows["ours (from_timm)"]["categories"]["other"]["ms"]


def test_breakdown_classifies_real_kernel_names():
    """Kernel names as CUPTI reports them on an H100 (ours, cuBLAS, cuDNN, FlashAttention, PyTorch) and the CPU
    form's aten ops."""
    from vit_kernels.bench.breakdown import classify

    names = {
        "gemm": ["_linear_kernel",
                 ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off"
                  "_kernel__5x_cublas"), "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN",
                 ("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_256x128x64_1x2x1_0_tnn_align8_warpspecialized"
                  "_cooperative_epi_tma"), "ampere_fp16_s16816gemm_fp16_64x64_ldg8_f2f_stages_64x5_tn",
                 "void gemv2T_kernel_val<int, int, __half, __half, float, float, 128, 16, 4, 4, false, false>()",
                 "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>()",
                 "aten::linear", "aten::addmm", "aten::mm"],
        "attention": ["_attention_fwd_kernel", "_attention_probs_kernel",
                      ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
                       "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false>("
                       "pytorch_flash::Flash_fwd_params)"),
                      ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::"
                       "bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)"),
                      "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
                      "aten::scaled_dot_product_attention"],
        "layer_norm": ["_layer_norm_fwd_kernel",
                       ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>("
                        "int, float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, "
                        "float*, c10::BFloat16*)"), "aten::layer_norm"],
        "patch_embed": ["_patch_embed_kernel",
                        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_"
                         "warpgroupsize1x1x1_g1_execute_segment_k_off_kernel__5x_cudnn"),
                        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, "
                         "false, true, (cudnnKernelDataType_t)2>(cudnn::engines_precompiled::nchw2nhwc_params_t<"
                         "float>, __nv_bfloat16 const*, __nv_bfloat16*)"), "aten::conv2d"],
        "other": ["_pool_norm_kernel", "_dropout_kernel",
                  ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::"
                   "TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::"
                   "operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, ...)"),
                  ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
                   "CUDAFunctor_add<c10::BFloat16> >(at::TensorIteratorBase&, ...)::{lambda(int)#1}>(int, ...)"),
                  ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::"
                   "OpaqueType<2u>, unsigned int, 3, 64, 64>(...)"), "Memcpy DtoD (Device -> Device)",
                  "aten::gelu", "aten::add", "aten::empty"],
    }
    assert {name: classify(name) for cat in names for name in names[cat]} == {
        name: cat for cat in names for name in names[cat]}


def test_breakdown_rates_and_table_from_kernel_times(monkeypatch):
    """The GPU form's arithmetic on made-up kernel times (2 forwards of ViT-B/16 at batch 2): per-forward times
    and launches, shares, the gap to the wall, TFLOP/s and GB/s from the config's work and the peak fractions."""
    from vit_kernels.bench import breakdown

    monkeypatch.setattr(breakdown, "on_gpu", lambda: True)
    config = CONFIGS["vit_b_16"]
    work = breakdown.work(config, 2, torch.bfloat16)
    assert sum(work[cat][0] for cat in ("gemm", "attention", "patch_embed")) == pytest.approx(
        2 * gflop_per_image("vit_b_16") * 1e9)
    one = ([("_linear_kernel", 100.0)] * 49 + [("_attention_fwd_kernel", 50.0)] * 12
           + [("_layer_norm_fwd_kernel", 10.0)] * 24 + [("_patch_embed_kernel", 20.0), ("_pool_norm_kernel", 5.0),
                                                        ("void at::native::vectorized_elementwise_kernel<4>", 1.0)])
    row = breakdown._summarize(one * 2, 2, wall_ms=8.0)
    breakdown._rates(row, config, 2, torch.bfloat16, dict(gemm_tflops=500.0, copy_gbps=3000.0))
    cats = row["categories"]
    assert row["kernel_ms"] == pytest.approx(4.9 + 0.6 + 0.24 + 0.02 + 0.005 + 0.001)
    assert row["gap_ms"] == pytest.approx(8.0 - row["kernel_ms"]) and 0 < row["gap_share"] < 1
    assert (cats["gemm"]["ms"], cats["gemm"]["launches"]) == (pytest.approx(4.9), 49)
    assert cats["other"]["launches"] == 2 and cats["other"]["top"][0]["name"] == "_pool_norm_kernel"
    assert cats["gemm"]["share"] == pytest.approx(4.9 / row["kernel_ms"])
    assert cats["gemm"]["tflops"] == pytest.approx(work["gemm"][0] / 4.9e-3 / 1e12)
    assert cats["gemm"]["frac_of_peak"] == pytest.approx(cats["gemm"]["tflops"] / 500)
    assert cats["attention"]["tflops"] == pytest.approx(4 * 2 * 197**2 * 768 * 12 / 0.6e-3 / 1e12)
    assert cats["layer_norm"]["gbps"] == pytest.approx(24 * 2 * 2 * 197 * 768 * 2 / 0.24e-3 / 1e9)
    assert cats["layer_norm"]["frac_of_peak"] == pytest.approx(cats["layer_norm"]["gbps"] / 3000)
    assert cats["other"]["tflops"] is None and cats["other"]["frac_of_peak"] is None
    row.update(model="vit_b_16", batch=2, candidate="ours (from_timm)", wall_ms=8.0)
    table = breakdown.breakdown_table(dict(rows=[row], source="test"))
    gemm = cats["gemm"]
    assert (f"| vit_b_16 | 2 | ours (from_timm) | gemm | 4.900 | 49 | {gemm['share']:.1%} | {gemm['tflops']:.1f} | - "
            f"| {gemm['frac_of_peak']:.0%} | `_linear_kernel` |") in table
    assert "| vit_b_16 | 2 | ours (from_timm) | 8.000 | 5.766 | 2.234 | 28% |" in table


@pytest.mark.slow  # minutes of interpreted benchmarking on CPU: full tier
def test_op_bench_interleaves_rounds_and_reports_the_ratio_spread():
    result = run_ops(["layer_norm"], ["tiny"], [2], torch.float32, repeats=2, progress=lambda *_: None)
    assert result["repeats"] == 2
    rows = {r["impl"]: r for r in result["rows"]}
    for r in rows.values():
        assert len(r["rounds"]) == 2 and r["ms_min"] <= r["ms"] <= r["ms_max"]
        per_round = [b / o for b, o in zip(r["rounds"], rows["ours"]["rounds"], strict=True)]
        assert (r["ratio_min"], r["ratio_max"]) == (min(per_round), max(per_round))
    assert rows["ours"]["ratio_min"] == rows["ours"]["ratio_max"] == 1.0


def test_rounds_summary_flags_a_spread_across_one():
    assert timing.rounds_summary([2.0, 2.0], [1.0, 1.6]) == dict(ratio_min=1.25, ratio_max=2.0,
                                                                 ratio_spread_crosses_1=False)
    assert timing.rounds_summary([1.0, 1.0], [0.9, 1.1])["ratio_spread_crosses_1"]
    with pytest.raises(ValueError):
        timing.rounds_summary([1.0], [1.0, 2.0])  # rounds must pair up


def test_family_sizes_compare_with_timm_only():
    """CLIP / SigLIP / DINOv2 / EVA-02 sizes are the timm models of their names, benchmarked against timm (no
    tutorial twin), with a FLOP count read off the model."""
    from vit_kernels.bench.models import (
        OURS,
        OURS_UNFUSED_NORM,
        TIMM,
        TIMM_NO_CUDNN_BENCHMARK,
        build_candidates,
        gflop_per_image,
    )
    from vit_kernels.cli import bench_models

    assert {"clip_l_14", "siglip_b_16", "siglip_so400m_14", "dinov2_b_14_518", "eva02_b_14"} <= set(bench_models())
    candidates = build_candidates("siglip_b_16", torch.float32, "meta")
    assert set(candidates) == {TIMM, TIMM_NO_CUDNN_BENCHMARK, OURS, OURS_UNFUSED_NORM}
    assert candidates[OURS_UNFUSED_NORM].model.model is candidates[OURS].model
    assert candidates[TIMM].model.attn_pool is not None and vit_kernels.is_accelerated(candidates[OURS].model)
    assert 150 < gflop_per_image("clip_l_14") < 175 and 290 < gflop_per_image("dinov2_b_14_518") < 320


@pytest.mark.slow  # minutes of interpreted benchmarking on CPU: full tier
def test_e2e_hands_each_finished_batch_to_partial():
    """A GPU round cut short keeps its finished batches: after each batch the rows so far reach ``partial`` (the
    CLI saves them as e2e_partial_*.json and removes that file once the full result is saved)."""
    from vit_kernels.bench import run_e2e

    seen = []
    result = run_e2e(["tiny"], [1, 2], torch.float32, repeats=1, progress=lambda *_: None,
                     partial=lambda r: seen.append((r["complete"], len(r["rows"]))))
    per_batch = len(result["rows"]) // 2
    assert seen == [(False, per_batch), (False, 2 * per_batch)]
