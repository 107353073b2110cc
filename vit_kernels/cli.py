"""The ``vit-kernels`` command: verify the fused kernels on this machine, check GPU compilation."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ._version import __version__


def _prepare_backend() -> str:
    """Without CUDA the kernels can only run in Triton's interpreter: switch it on before they are defined."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu (Triton interpreter)"


def cmd_verify(args) -> int:
    where = _prepare_backend()
    import torch

    from . import verify

    config = args.config or ("vit_b_16" if torch.cuda.is_available() else "tiny")
    torch.manual_seed(args.seed)
    dtypes = None if not args.dtype else [getattr(torch, d) for d in args.dtype]
    print(f"vit_kernels {__version__}: fused models vs the PyTorch reference on {where}, config {config}, "
          f"batch {args.batch}")
    with_timm = not args.no_timm and timm_installed()
    if not args.no_timm and not with_timm:
        print("timm is not installed: the from_timm rows are skipped (pip install timm, or --no-timm)")
    rows = verify.run(config, args.batch, dtypes, timm_models=with_timm)
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def timm_installed() -> bool:
    """timm is optional (needed only for timm models): ``vit-kernels`` runs without it."""
    return importlib.util.find_spec("timm") is not None


CPU_NOTICE = ("CPU version: Triton interpreter and eager PyTorch on a tiny model. These times say nothing "
              "about GPU performance; real numbers need a GPU.")


def cmd_bench(args) -> int:
    where = _prepare_backend()
    import torch

    from .bench import on_gpu, run_e2e, run_ops, run_train
    from .bench.breakdown import breakdown_table, run_breakdown
    from .bench.e2e import merge_headline
    from .bench.ops import ops_headline
    from .bench.report import NO_MATPLOTLIB, e2e_table, have_matplotlib, ops_table, plot_e2e, plot_ops, train_table
    from .bench.timing import save_json

    gpu = on_gpu()
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if not gpu and dtype == torch.bfloat16:
        print("bfloat16 is computed wrongly by Triton's interpreter: use --dtype float32 or float16 on a CPU",
              file=sys.stderr)
        return 2
    models = args.model or (["vit_s_16", "vit_b_16", "vit_l_16"] if gpu else ["tiny"])
    batches = args.batch or ([1, 8, 32, 64, 128, 256] if gpu else [2])
    op_names = [] if args.ops == ["none"] else (args.ops or op_choices())
    compile_modes = [] if args.compile == ["none"] else (args.compile or ["default", "max-autotune", "reduce-overhead"])
    print(f"vit_kernels {__version__} benchmarks on {where}")
    if not gpu:
        print(CPU_NOTICE)
    repeats = args.repeats or (3 if gpu else 1)
    out = args.out
    results = {}  # kind -> (result, tag, table writer, plot writer); saved once every headline figure is in
    if args.train:
        train_models = args.model or (["vit_b_16"] if gpu else ["tiny"])
        result = run_train(train_models, args.train_batch or ([64, 128] if gpu else [2]), dtype, compile_modes[:1],
                           repeats=repeats)
        results["train"] = (result, "-".join(train_models), train_table, None)
    if op_names:
        op_models = args.model or (["vit_b_16"] if gpu else ["tiny"])
        result = run_ops(op_names, op_models, args.batch or ([256] if gpu else [2]), dtype,
                         compile_baselines=bool(compile_modes), repeats=repeats)
        results["ops"] = (result, "-".join(op_models), ops_table, plot_ops)
    if not args.no_e2e:
        def partial(result):  # the finished batches on disk, replaced by the full file at the end
            partial.path = save_json(out, "e2e_partial", result, tag="-".join(models))

        result = run_e2e(models, batches, dtype, compile_modes, compile_batches=args.compile_batches,
                         repeats=repeats, partial=partial)
        if getattr(partial, "path", None) is not None:
            partial.path.unlink(missing_ok=True)
        merge_headline(result, results["train"][0]["headline"] if "train" in results else {})
        merge_headline(result, ops_headline(results["ops"][0]) if "ops" in results else {})
        results["e2e"] = (result, "-".join(models), e2e_table, plot_e2e)
    if args.breakdown:
        breakdown_models = args.model or (["vit_b_16"] if gpu else ["tiny"])
        result = run_breakdown(breakdown_models, args.batch or ([1, 64, 256] if gpu else [2]), dtype)
        results["breakdown"] = (result, "-".join(breakdown_models), breakdown_table, None)
    tables = []
    for kind in ("train", "e2e", "ops", "breakdown"):
        if kind not in results:
            continue
        result, tag, table, plot = results[kind]
        path = save_json(out, kind, result, tag=tag)
        tables.append(table(result))
        if plot is not None and have_matplotlib():
            print(f"saved {path} and {plot(result, path.with_suffix('.png'))}")
        else:
            print(f"saved {path}" + ("" if plot is None else f" ({NO_MATPLOTLIB})"))
    print()
    print("\n\n".join(tables))
    if not gpu:
        print()
        print(CPU_NOTICE)
    return 0


def cmd_compile_check(args) -> int:
    from . import compile_check

    results = compile_check.run_in_subprocess(workers=args.workers)
    bad = [r for r in results if not r["ok"]]
    for r in bad if not args.verbose else results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['arch']} {r['dtype']} regs={r.get('registers')} "
              f"smem={r.get('shared')} {r['case']} {r['error'] or ''}")
    if args.sass:
        print(sass_table(results))
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def sass_table(results: list) -> str:
    """One row per sm_90 bf16 case: the SASS instruction counts that show which engine it is (TMA loads and
    stores, warpgroup MMAs for the TMA engine; cp.async loads for the pointer engine)."""
    from .compile_check import SASS_OPCODES

    rows = [r for r in results if r["arch"] == "sm_90" and r["dtype"] == "bf16" and r.get("sass")]
    lines = ["| " + " | ".join(SASS_OPCODES) + " | regs | case |", "|" + "---|" * (len(SASS_OPCODES) + 2)]
    lines += [f"| {' | '.join(str(r['sass'][op]) for op in SASS_OPCODES)} | {r.get('registers')} | {r['case']} |"
              for r in rows]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def bench_models() -> list:
    """Model sizes the benchmarks run (``vit_kernels.configs.SIZES``): the original ViTs, the deployed families
    (CLIP, SigLIP, DINOv2, EVA-02; timm only) and ``tiny`` for the interpreter."""
    from .configs import SIZES

    return [name for name in SIZES if name != "tiny_timm"]


def op_choices() -> list:
    """The registered ops with a benchmark, and the composites (``vit_kernels.bench.ops``). Importing them defines
    the kernels: callers switch the interpreter on first (``_prepare_backend``)."""
    from .bench.ops import op_suites

    return list(op_suites())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-kernels", description="Fused Triton kernels for Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vit_kernels {__version__}")
    sub = parser.add_subparsers(dest="command")
    verify = sub.add_parser("verify", help="check the fused ViT and from_timm models against the reference "
                                           "(the default command)")
    verify.add_argument("--config", choices=["tiny", "vit_b_16"], help="default: vit_b_16 on a GPU, tiny on CPU")
    verify.add_argument("--batch", type=positive_int, default=2)
    verify.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                        help="repeatable; default: float32, float16 (+ bfloat16 on a GPU)")
    verify.add_argument("--no-timm", action="store_true", help="skip the from_timm models")
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(func=cmd_verify)
    bench = sub.add_parser("bench", help="benchmark the fused models and ops against PyTorch/timm baselines "
                                         "(GPU; a labelled small CPU version elsewhere)")
    bench.add_argument("--model", nargs="+", choices=bench_models(),
                       help="default: vit_s_16 vit_b_16 vit_l_16 on a GPU, tiny on a CPU; the families (clip_l_14, "
                            "siglip_b_16, siglip_so400m_14, dinov2_b_14_518, eva02_b_14) compare with timm only")
    bench.add_argument("--batch", nargs="+", type=positive_int, help="default: 1 8 32 64 128 256 (GPU), 2 (CPU)")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="default: bfloat16 on a GPU, float32 on a CPU")
    bench.add_argument("--ops", nargs="+", choices=[*op_choices(), "none"],
                       help="per-op benchmarks to run (default: all; 'none' skips them)")
    bench.add_argument("--compile", nargs="+", choices=["default", "max-autotune", "reduce-overhead", "none"],
                       help="torch.compile baselines (GPU only; default: default max-autotune reduce-overhead; "
                            "reduce-overhead, CUDA graphs, runs at batch <= 64 only); 'default' also compiles ours")
    bench.add_argument("--repeats", type=positive_int,
                       help="interleaved rounds of every timing: end-to-end, per op, training "
                            "(default: 3 on a GPU, 1 on a CPU)")
    bench.add_argument("--compile-batches", nargs="+", type=positive_int,
                       help="batches at which the torch.compile baselines run (default: all; compiling is slow)")
    bench.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model benchmark")
    bench.add_argument("--train", action="store_true",
                       help="also time a training step (fwd + bwd + AdamW, autocast) with peak memory, vs timm "
                            "eager/compiled and the reference")
    bench.add_argument("--breakdown", action="store_true",
                       help="also profile a forward (torch.profiler) of ours and timm eager and split its kernel "
                            "time by category (GEMM, attention, LayerNorm, patch embedding, other) with rates and "
                            "the gap to the wall time; default: vit_b_16 at batch 1 64 256 (GPU), tiny at 2 (CPU)")
    bench.add_argument("--train-batch", nargs="+", type=positive_int, help="default: 64 128 (GPU), 2 (CPU)")
    bench.add_argument("--out", default="benchmarks/results", help="directory for JSON and PNG files")
    bench.set_defaults(func=cmd_bench)
    check = sub.add_parser("compile-check", help="compile every kernel/config for sm_80 and sm_90 (no GPU needed) "
                                                 "and report errors, register spills and shared memory")
    check.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    check.add_argument("-v", "--verbose", action="store_true", help="list every case, not only failures")
    check.add_argument("--sass", action="store_true", help="also print each sm_90 case's SASS instruction counts "
                                                            "(UTMALDG/UTMASTG: TMA, HGMMA: warpgroup MMA, LDGSTS: "
                                                            "cp.async)")
    check.set_defaults(func=cmd_compile_check)
    return parser


COMMANDS = ("verify", "bench", "compile-check")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv = ["verify", *argv]  # verify is the default command
    _prepare_backend()  # before the parser imports the op registry (kernels are defined on import)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
