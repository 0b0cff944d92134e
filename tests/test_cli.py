"""The `quietstar` console command: parsing, and `convert` on a GGUF file written here (no download)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from quietstar.cli import build_parser, main


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fly"])
    assert "invalid choice" in capsys.readouterr().err


def test_convert_reports_a_missing_gguf_file(tmp_path, capsys):
    """A user error is one argparse-style line and exit status 2; --debug raises it with its traceback."""
    assert main(["convert", str(tmp_path / "absent.gguf"), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("quietstar convert: error: no GGUF file") and "Traceback" not in error
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        main(["convert", str(tmp_path / "absent.gguf"), "--debug"])


def test_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "quietstar.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists its packages by hand: a subpackage left out (quietstar.tasks once was) installs nowhere but
    in an editable checkout, and `quietstar train multihop` fails on a user's machine."""
    root = Path(__file__).resolve().parents[1]
    line = re.search(r"^packages = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M).group(1)  # no tomllib on 3.10
    listed = set(re.findall(r'"([\w.]+)"', line))
    found = {".".join(p.parent.relative_to(root).parts) for p in root.glob("quietstar/**/__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
