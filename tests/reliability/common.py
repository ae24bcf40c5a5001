"""Helpers of the reliability tests: run the CLI in-process or as main.py, and check what an error
leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from pocketflow.cli import main
from tests.conftest import ROOT

# What a failed start may leave in its output directory: its log and the (released) lock file.
# Anything else (config.yaml, report.json, models, TFLite files, a study) would make the directory
# look like it holds a run, or look like a result.
ALLOWED_AFTER_FAILED_START = {"run.log", ".lock"}


def expect_user_error(capsys, args: Sequence[str], *fragments: str) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one stderr line ``error: ...``
    that contains every fragment, print nothing on stdout and show no traceback."""
    code = main([*args, "-q"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert captured.out == ""
    return lines[0]


def assert_no_run_left(directory: Path) -> None:
    """Nothing half-written, nothing that makes a corrected rerun refuse the directory."""
    if not directory.exists():
        return
    left = {entry.name for entry in directory.iterdir()}
    assert left <= ALLOWED_AFTER_FAILED_START, f"a failed start left {sorted(left - ALLOWED_AFTER_FAILED_START)}"


def subprocess_env(cache_dir: Optional[Path] = None) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    if cache_dir is not None:
        env["POCKETFLOW_CACHE_DIR"] = str(cache_dir)
    return env


def main_command(*args: str) -> List[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def run_main(*args: str, cache_dir: Optional[Path] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=subprocess_env(cache_dir))
