"""The vit-kernels command: --version, --help, the default verify table, bad options."""
import re
import subprocess
import sys

import pytest

from vit_kernels import __version__, cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "vit_kernels.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    assert run("--version").stdout.strip() == f"vit_kernels {__version__}"
    help_text = run("--help").stdout
    assert "verify" in help_text and "compile-check" in help_text


def test_verify_prints_a_passing_table_without_timm(capsys, monkeypatch):
    """timm is optional: without it the default command skips the from_timm rows, says so, and passes."""
    monkeypatch.setattr(cli, "timm_installed", lambda: False)
    assert cli.main(["--batch", "1"]) == 0  # options alone select the default command
    out = capsys.readouterr().out
    assert "timm is not installed" in out and "timm ViT" not in out
    assert "ViT (tutorial scaling)" in out and "ViT (paper scaling)" in out
    assert "FAIL" not in out and re.search(r"^\d+ passed, 0 failed$", out, re.M)


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
