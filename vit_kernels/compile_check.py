"""Compile every kernel x autotune config x dtype for real GPUs (sm_80, sm_90) on any machine, no GPU needed.

The interpreter accepts things a GPU compiler rejects (dot tiles under 16, bad casts) and says nothing about
registers or shared memory. This builds PTX and cubin with Triton's own toolchain and reads the resource
usage back with the bundled ``cuobjdump``; a case fails on a compile error, any spill (local memory) or
shared memory over the card's limit. Must run with ``TRITON_INTERPRET`` unset (``python -m
vit_kernels.compile_check`` takes care of that by running in a fresh process).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

ARCHS = {90: 232448, 80: 166912}  # compute capability -> max dynamic shared memory per block (bytes)
DTYPES = ("fp16", "bf16")
FLOAT_ARGS = {"eps", "qk_scale", "out_scale", "score_scale", "dropout_p", "keep_scale", "p"}
POINTER_TYPES = {"mask_ptr": "*i1", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                 "dw_part_ptr": "*fp32", "branch_ptr": "*fp32", "db_part_ptr": "*fp32"}
# int arguments that are multiples of 16 in real ViT runs (Triton specializes those the same way)
ALIGNED_INTS = {"stride_am", "stride_wn", "stride_rm", "stride_om", "stride_xm", "stride_ym", "stride_b",
                "stride_n", "stride_ob", "stride_on", "stride_yb", "K", "E"}


def _cases():
    """(name, jit kernel, constexprs, num_warps, num_stages) for every kernel, config and variant."""
    from importlib import import_module

    attention, attention_probs, dropout, head, layer_norm, linear, patch_embed = (
        import_module(f"vit_kernels.ops.{name}") for name in ("attention", "attention_probs", "dropout", "head",
                                                              "layer_norm", "linear", "patch_embed"))

    def tuned(name, t, variants):
        for variant in variants:
            for cfg in t.configs_for(variant):
                label = f"{name}[{' '.join(f'{k}={v}' for k, v in {**cfg.kwargs, **variant}.items())}]"
                yield label, t.kernel, {**cfg.kwargs, **variant}, cfg.num_warps, cfg.num_stages

    plain = dict(HAS_BIAS=True, ACTIVATION=None, DROPOUT=False, HAS_SCALE=False, HAS_BRANCH_SCALE=False,
                 HAS_RESIDUAL=False, DEINTERLEAVE=1, DOT_PRECISION="tf32")
    yield from tuned("linear", linear.LINEAR, [
        # proj / fc2: layer scale + residual, with dropout and stochastic depth on or off
        {**plain, "DROPOUT": drop, "HAS_SCALE": True, "HAS_BRANCH_SCALE": branch, "HAS_RESIDUAL": True}
        for drop in (False, True) for branch in (False, True)] + [
        {**plain, "ACTIVATION": act, "DROPOUT": drop} for act in ("gelu", "gelu_tanh") for drop in (False, True)] + [
        {**plain, "DEINTERLEAVE": 3}, {**plain, "HAS_BIAS": False}])
    # dropout variants at head_dim 64, both layouts
    yield from tuned("attention", attention.ATTENTION, [
        dict(HAS_MASK=mask, D=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), INTERLEAVED=inter,
             STORE_LSE=lse, DROPOUT=drop, DOT_PRECISION="tf32")
        for d in (16, 24, 64, 80, 128) for mask in (False, True) for inter in (False, True) for lse in (False, True)
        for drop in (False, True)
        if (d == 64 or not (mask or inter)) and (not lse or d in (64, 80)) and (not drop or (d == 64 and lse))])
    yield from tuned("attention_backward", attention.ATTENTION_BACKWARD, [
        dict(HAS_MASK=mask, D=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), INTERLEAVED=inter, DQ=dq,
             DROPOUT=drop, DOT_PRECISION="tf32")
        for d in (24, 64, 80, 128) for mask in (False, True) for inter in (False, True) for dq in (False, True)
        for drop in (False, True)
        if (d == 64 or not (mask or inter)) and (not drop or (d == 64 and not mask))])
    yield from tuned("dropout", dropout.DROPOUT, [{}])
    yield from tuned("attention_probs", attention_probs.ATTENTION_PROBS, [
        dict(HAS_MASK=mask, D=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), INTERLEAVED=inter, DOT_PRECISION="tf32")
        for d in (64, 80) for mask in (False, True) for inter in (False, True) if d == 64 or not inter])
    yield from tuned("patch_embed", patch_embed.PATCH_EMBED, [
        dict(PATCH=patch, HAS_BIAS=True, HAS_POS=True, POS_ON_PREFIX=on, DOT_PRECISION="tf32")
        for patch in (8, 14, 16, 32) for on in (True, False) if on or patch == 16])
    for width in (192, 384, 768, 1024, 1280):
        block = 1 << (width - 1).bit_length()
        yield (f"layer_norm_backward[E={width}]", layer_norm._layer_norm_bwd_kernel,
               dict(HAS_WEIGHT=True, BLOCK_E=block), min(16, max(1, block // 256)), 1)
        meta = layer_norm.layer_norm_meta(width)
        warps = meta.pop("num_warps")
        yield (f"layer_norm[E={width}]", layer_norm._layer_norm_fwd_kernel,
               dict(HAS_WEIGHT=True, HAS_BIAS=True, **meta), warps, 1)
        block_e = meta["BLOCK_E"]
        for mean in (True, False):
            yield (f"pool_norm[E={width} MEAN={mean}]", head._pool_norm_kernel,
                   dict(MEAN=mean, NORM=True, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=max(1, min(64, 8192 // block_e)),
                        BLOCK_E=block_e), 4 if block_e <= 2048 else 8, 1)


def _signature(kernel, constexprs, dtype):
    sig, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"no value for constexpr {missing} of {kernel.__name__}")
    return sig, attrs


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/vit_kernels_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    usage = {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    return usage


_case_list = None


def cases() -> list:
    global _case_list
    if _case_list is None:
        _case_list = list(_cases())
    return _case_list


def check_case(job) -> dict:
    """job = (index into cases(), dtype, arch): indices, since jit kernels do not pickle."""
    index, dtype, arch = job
    label, kernel, constexprs, warps, stages = cases()[index]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(case=label, dtype=dtype, arch=f"sm_{arch}", num_warps=warps, num_stages=stages)
    try:
        sig, attrs = _signature(kernel, constexprs, dtype)
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        usage = _resource_usage(compiled.asm["cubin"])
        shared = compiled.metadata.shared
        result.update(shared=shared, registers=usage.get("reg"), spill_bytes=usage.get("local", 0) +
                      usage.get("stack", 0))
        problems = []
        if result["spill_bytes"]:
            problems.append(f"spills {result['spill_bytes']} bytes to local memory")
        if shared > ARCHS[arch]:
            problems.append(f"needs {shared} bytes of shared memory, limit {ARCHS[arch]}")
        result["ok"], result["error"] = not problems, "; ".join(problems) or None
    except Exception as exc:  # a compile error is a result to report, not a crash
        result["ok"], result["error"] = False, f"{type(exc).__name__}: {str(exc)[:400]}"
    return result


def run_all(workers: int = 2) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset; run `python -m vit_kernels.compile_check`")
    jobs = [(i, dtype, arch) for i in range(len(cases())) for dtype in DTYPES for arch in ARCHS]
    if workers <= 1:
        return [check_case(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check_case, jobs, chunksize=4))


def run_in_subprocess(workers: int = 2) -> list:
    """Run the check in a fresh interpreter with TRITON_INTERPRET unset (tests set it for themselves)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vit_kernels.compile_check", "--json", "--workers", str(workers)],
                          capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"compile check crashed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vit_kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    results = run_all(args.workers)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            status = "ok  " if r["ok"] else "FAIL"
            print(f"{status} {r['arch']} {r['dtype']} warps={r['num_warps']} stages={r['num_stages']} "
                  f"regs={r.get('registers')} smem={r.get('shared')} {r['case']} {r['error'] or ''}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
