"""The vit-kernels command: --version, --help, the default verify table, bad options."""
import re
import subprocess
import sys

import pytest
import torch

from vit_kernels import __version__, cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "vit_kernels.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    assert run("--version").stdout.strip() == f"vit_kernels {__version__}"
    help_text = run("--help").stdout
    assert "verify" in help_text and "compile-check" in help_text


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_verify_prints_a_passing_table_without_timm(capsys, monkeypatch):
    """timm is optional: without it the default command skips the from_timm rows, says so, and passes."""
    monkeypatch.setattr(cli, "timm_installed", lambda: False)
    assert cli.main(["--batch", "1"]) == 0  # options alone select the default command
    out = capsys.readouterr().out
    assert "timm is not installed" in out and "timm ViT" not in out
    assert "ViT (tutorial scaling)" in out and "ViT (paper scaling)" in out
    assert "FAIL" not in out and re.search(r"^\d+ passed, 0 failed$", out, re.M)


@pytest.mark.slow  # a minute or more in the interpreter: full tier (CI's fast tier: README, Test)
def test_verify_with_timm_compares_against_timms_own_model():
    """The timm rows compare the accelerated model with a separate, unpatched copy in fp64 (from_timm patches in
    place; the fused model itself refuses float64) and report the kernels as the backend."""
    pytest.importorskip("timm")
    from vit_kernels import verify

    rows = verify.run("tiny", batch=1, dtypes=[torch.float32], device="cpu", timm_models=True)
    timm_rows = [r for r in rows if r.model.startswith("timm ViT")]
    assert [r.model for r in timm_rows] == ["timm ViT (token pool)", "timm ViT (avg pool)"]
    assert all(r.ok and r.backend == "triton" and r.error > 0 for r in rows), verify.format_table(rows)


@pytest.mark.parametrize("args,message", [
    (("verify", "--config", "huge"), "invalid choice"),
    (("verify", "--batch", "0"), "must be a positive integer"),
    (("verify", "--batch", "two"), "invalid positive_int value"),
    (("verify", "--dtype", "float64"), "invalid choice"),
    (("compile-check", "--workers", "-1"), "must be a positive integer"),
])
def test_bad_options_exit_nonzero(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_entry_point_is_installed():
    from importlib.metadata import PackageNotFoundError, distribution, entry_points

    try:
        distribution("vit_kernels")
    except PackageNotFoundError:
        pytest.skip("vit_kernels is not pip-installed here (run from a checkout with PYTHONPATH)")

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("vit-kernels") == "vit_kernels.cli:main"
