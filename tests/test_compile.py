"""Every kernel x autotune config x {fp16, bf16} compiles for sm_80 and sm_90 without spills and within the
card's shared memory: what the interpreter cannot check before a real GPU sees the code. The cases are the
registered ops' kernel grids (``OpSpec.kernels``). The fast tier (plain ``pytest`` on a CPU machine) checks the
sample (``compile_check.sample_indices``: one case per kernel grid, ~1 minute); ``pytest --full`` every case
(~3,000 compiles, ~40 minutes on 2 cores)."""
import pytest
from conftest import full_tier

from vit_kernels import compile_check
from vit_kernels.ops.registry import registered_ops


@pytest.fixture(scope="module")
def full(request):
    return full_tier(request.config)


@pytest.fixture(scope="module")
def results(full):
    return compile_check.run_in_subprocess(workers=2, sample=not full)


def test_every_case_was_compiled(results, full):
    launchers = {grid.launcher.name for spec in registered_ops() for grid in spec.kernels}
    assert {r["case"].split("[")[0] for r in results} == launchers
    assert {r["arch"] for r in results} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in results} == {"fp16", "bf16"}
    assert len(results) == len(compile_check.jobs(sample=not full))
    assert len(results) == (4 * len(compile_check.cases()) if full else 2 * len(compile_check.sample_indices()))


def test_no_compile_error_spill_or_shared_memory_overflow(results):
    failures = [f"{r['arch']} {r['dtype']} {r['case']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)


def test_resources_were_read(results):
    compiled = [r for r in results if not r.get("skipped")]
    assert all(r["registers"] and r["registers"] <= 255 for r in compiled)
    assert all(r["shared"] is not None for r in compiled)


def test_arch_rules_skip_a_config_only_where_its_launcher_never_uses_it(results, full):
    """A config is skipped on an arch only by its launcher's arch_keep rule, and every case compiles somewhere."""
    used_on = {case[0]: case[6] for case in compile_check.cases()}
    assert all(used_on.values())
    for r in results:
        assert bool(r.get("skipped")) == (int(r["arch"][3:]) not in used_on[r["case"]]), r
    if full:
        assert {r["case"] for r in results} == set(used_on)


def test_sass_shows_each_engine(results):
    """The TMA engine's sm_90 code loads through TMA (UTMALDG), stores through TMA (UTMASTG), multiplies with
    warpgroup MMAs (HGMMA) and issues no cp.async (LDGSTS); the pointer engine's is cp.async + HGMMA, or warp
    MMAs (HMMA) for the small-M tiles (a warpgroup MMA is 64 rows)."""
    sm90 = [r for r in results if r["arch"] == "sm_90" and not r.get("skipped") and r["case"].startswith("linear[")]
    tma = [r for r in sm90 if "PERSISTENT=True" in r["case"]]
    pointer = [r for r in sm90 if "PERSISTENT=True" not in r["case"] and "ACTIVATION=swiglu" not in r["case"]]
    assert tma and pointer
    for r in tma:
        assert r["sass"]["UTMALDG"] and r["sass"]["UTMASTG"] and r["sass"]["HGMMA"] and not r["sass"]["LDGSTS"], r
    for r in pointer:
        mma = "HGMMA" if "BLOCK_M=16 " not in r["case"] and "BLOCK_M=32 " not in r["case"] else "HMMA"
        assert r["sass"]["LDGSTS"] and r["sass"][mma] and not r["sass"]["UTMALDG"], r
    assert all("sass" not in r for r in results if r["arch"] == "sm_80")


def test_sass_shows_programmatic_dependent_launch(results):
    """PDL variants (sm_90 only) wait with griddepcontrol.wait (ACQBULK) before any global load or store — PDL=2
    after prefetching weight rows into L2 (CCTL.E.PF2), but for the 128x256 tiles — and the pointer engine lets
    the next kernel launch (PREEXIT); the other cases do neither."""
    compiled = [r for r in results if not r.get("skipped") and r["arch"] == "sm_90"]
    pdl = [r for r in compiled if "PDL=" in r["case"]]
    assert {r["case"].split("[")[0] for r in pdl} == {"linear", "layer_norm_linear"}
    assert not [r for r in results if "PDL=" in r["case"] and r["arch"] == "sm_80" and not r.get("skipped")]
    for r in pdl:
        assert r["memory_before_wait"] == [], r  # nothing is read or written before the previous kernel is done
        sass = r["sass"]
        prefetch = "PDL=2" in r["case"] and "SPLIT_EPILOGUE=True" not in r["case"]  # not in 128x256 tiles
        assert sass["ACQBULK"] == 1 and bool(sass["CCTL.E.PF2"]) == prefetch, r
        assert bool(sass["PREEXIT"]) == ("PERSISTENT=True" not in r["case"]), r
    assert all(not r["sass"]["ACQBULK"] and not r["sass"]["PREEXIT"] for r in compiled if "PDL=" not in r["case"])


def test_sass_table_lists_the_sm90_cases(results):
    from vit_kernels.cli import sass_table

    table = sass_table(results).splitlines()
    assert table[0].startswith("| UTMALDG | UTMASTG | HGMMA | LDGSTS | HMMA | ACQBULK | PREEXIT | CCTL.E.PF2 | regs "
                               "| case |")
    assert len(table) - 2 == sum(1 for r in results if r["arch"] == "sm_90" and r["dtype"] == "bf16" and r.get("sass"))
