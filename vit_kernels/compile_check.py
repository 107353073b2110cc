"""Compile every kernel x autotune config x dtype for real GPUs (sm_80, sm_90) on any machine, no GPU needed.

The interpreter accepts things a GPU compiler rejects (dot tiles under 16, bad casts) and says nothing about
registers or shared memory. This builds PTX and cubin with Triton's own toolchain and reads the resource
usage back with the bundled ``cuobjdump``; a case fails on a compile error, any spill (local memory) or
shared memory over the card's limit. Must run with ``TRITON_INTERPRET`` unset (``python -m
vit_kernels.compile_check`` takes care of that by running in a fresh process).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

ARCHS = {90: 232448, 80: 166912}  # compute capability -> max dynamic shared memory per block (bytes)
DTYPES = ("fp16", "bf16")


def _cases():
    """(label, jit kernel, constexprs, num_warps, num_stages, launcher, archs that use it) for every
    registered op's kernels, variants and configs (``OpSpec.kernels``)."""
    from vit_kernels.ops.registry import registered_ops

    for spec in registered_ops():
        for grid in spec.kernels:
            cases = grid.launcher.compile_cases(grid.variants, tuple(ARCHS), grid.only)
            for label, constexprs, warps, stages, used_on in cases:
                yield label, grid.launcher.kernel, constexprs, warps, stages, grid.launcher, used_on


def _signature(launcher, constexprs, dtype):
    """Argument types by the naming convention (``*_ptr``: a pointer to the data dtype, others int32) unless
    the launcher's ``arg_types`` says otherwise; its ``aligned`` ints and every pointer get divisibility 16."""
    kernel = launcher.kernel
    sig, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
            continue
        default = "*" + dtype if name.endswith("_ptr") else "i32"
        sig[name] = launcher.arg_types.get(name, default)
        if sig[name].startswith("*") or name in launcher.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    defaults = {name: p.default for name, p in inspect.signature(kernel.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    constexprs.update({p.name: defaults[p.name] for p in kernel.params
                       if p.is_constexpr and p.name not in constexprs and p.name in defaults})
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"no value for constexpr {missing} of {kernel.__name__}")
    return sig, attrs


# SASS opcodes that show a design is real: TMA loads and stores, Hopper warpgroup MMAs, the cp.async loads and
# warp-level MMAs of the pointer engine; programmatic dependent launch's wait (griddepcontrol.wait), its
# early launch of the next kernel (griddepcontrol.launch_dependents) and L2 prefetches (prefetch.global.L2)
SASS_OPCODES = ("UTMALDG", "UTMASTG", "HGMMA", "LDGSTS", "HMMA", "ACQBULK", "PREEXIT", "CCTL.E.PF2")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/vit_kernels_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)


def _resource_usage(cubin: bytes) -> dict:
    text = _cuobjdump(cubin, "-res-usage")
    return {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}


# global-memory instructions: none may precede a dependent launch's wait (ACQBULK) in a PDL kernel
GLOBAL_MEMORY_OPCODES = frozenset({"LDG", "LDGSTS", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "UTMALDG", "UTMASTG",
                                   "UBLKCP", "UTMAPF"})


def sass_opcodes(cubin: bytes) -> list:
    """The kernel's SASS opcodes in code order, with their modifiers (e.g. HGMMA.64x128x16.F32.BF16)."""
    return re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", _cuobjdump(cubin, "-sass"), re.M)


def sass_counts(opcodes: list) -> dict:
    """How many instructions of each SASS_OPCODES opcode the code holds: an opcode named without modifiers
    counts it with any, one named with them (CCTL.E.PF2) counts exactly that."""
    return {op: sum(1 for found in opcodes if found == op or found.split(".")[0] == op) for op in SASS_OPCODES}


def memory_before_wait(opcodes: list) -> list:
    """The global-memory instructions placed before the first griddepcontrol.wait (ACQBULK); all of them
    without one."""
    bases = [op.split(".")[0] for op in opcodes]
    wait = bases.index("ACQBULK") if "ACQBULK" in bases else len(bases)
    return [opcodes[i] for i in range(wait) if bases[i] in GLOBAL_MEMORY_OPCODES]


_case_list = None
# the sample (CI's fast tier): one case per kernel grid — the largest tile of its last variant (the most register
# pressure; the last variants are the newest, e.g. PDL's) — for sm_90 in bf16 and sm_80 in fp16
SAMPLE_JOBS = (("bf16", 90), ("fp16", 80))


def cases() -> list:
    global _case_list
    if _case_list is None:
        _case_list = list(_cases())
    return _case_list


def _tile(constexprs: dict) -> int:
    size = 1
    for key, value in constexprs.items():
        if key.startswith("BLOCK_") and isinstance(value, int):
            size *= value
    return size


def sample_indices() -> list:
    """Indices into cases() of the sample: per kernel grid (launcher and variant list), the last variant's case
    with the largest tile."""
    from vit_kernels.ops.registry import registered_ops

    chosen, start = [], 0
    for spec in registered_ops():
        for grid in spec.kernels:
            count = len(grid.launcher.compile_cases(grid.variants, tuple(ARCHS), grid.only))
            last = {k: v for k, v in grid.variants[-1].items() if k in grid.launcher.constexpr_names}
            mine = [i for i in range(start, start + count) if all(cases()[i][2].get(k) == v for k, v in last.items())]
            chosen.append(max(mine or range(start, start + count), key=lambda i: _tile(cases()[i][2])))
            start += count
    return chosen


def jobs(sample: bool = False) -> list:
    """(case index, dtype, arch) to check: every case x DTYPES x ARCHS, or the sample's."""
    if sample:
        return [(i, dtype, arch) for i in sample_indices() for dtype, arch in SAMPLE_JOBS]
    return [(i, dtype, arch) for i in range(len(cases())) for dtype in DTYPES for arch in ARCHS]


def check_case(job) -> dict:
    """job = (index into cases(), dtype, arch): indices, since jit kernels do not pickle."""
    index, dtype, arch = job
    label, kernel, constexprs, warps, stages, launcher, used_on = cases()[index]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(case=label, dtype=dtype, arch=f"sm_{arch}", num_warps=warps, num_stages=stages)
    if arch not in used_on:  # the launcher never picks this config on this arch (its arch_keep rule)
        result.update(ok=True, skipped=True, error=None)
        return result
    try:
        sig, attrs = _signature(launcher, constexprs, dtype)
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        usage = _resource_usage(compiled.asm["cubin"])
        if arch >= 90:
            opcodes = sass_opcodes(compiled.asm["cubin"])
            result["sass"] = sass_counts(opcodes)
            if constexprs.get("PDL"):
                result["memory_before_wait"] = memory_before_wait(opcodes)
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


def run_all(workers: int = 2, sample: bool = False) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset; run `python -m vit_kernels.compile_check`")
    todo = jobs(sample)
    if workers <= 1:
        return [check_case(job) for job in todo]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check_case, todo, chunksize=1 if sample else 4))


def run_in_subprocess(workers: int = 2, sample: bool = False) -> list:
    """Run the check in a fresh interpreter with TRITON_INTERPRET unset (tests set it for themselves)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vit_kernels.compile_check", "--json", "--workers", str(workers),
                           *(["--sample"] if sample else [])], capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"compile check crashed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vit_kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample", action="store_true", help="one case per kernel grid (SAMPLE_JOBS), not all")
    args = parser.parse_args(argv)
    results = run_all(args.workers, args.sample)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            status = "skip" if r.get("skipped") else "ok  " if r["ok"] else "FAIL"
            print(f"{status} {r['arch']} {r['dtype']} warps={r['num_warps']} stages={r['num_stages']} "
                  f"regs={r.get('registers')} smem={r.get('shared')} {r['case']} {r['error'] or ''}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
