"""`main.py --learner=channel --target-latency-speedup` on the default net: planned on this machine's width
curve, met by the shipped file timed against the baseline's. Its own file, so that it can run last:
its test holds the cores alone (`exclusive`), which costs the least once the long files are done."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.reliability.common import main_command
from tests.verify_run import assert_report_matches_files

pytestmark = pytest.mark.integration


@pytest.mark.exclusive
def test_a_latency_target_is_met_by_the_shipped_file_timed_against_the_baseline(tmp_path):
    """--target-latency-speedup on the default net: the search plans on this machine's measured width
    curve (measured once, cached), and the shipped file, timed in turn with the baseline's, meets it.

    The files are 0.1 ms each. With the suite's other worker on the cores one CI sitting (a 2-core AVX2
    machine) measured 1.20x where the plan said 1.38x, so the test runs while no other test does
    (`exclusive`); a miss of the latency target alone (exit 3) is still run again once, in a fresh
    directory with the width curve measured again (one exclusive sitting on 2026-12-05 measured a curve that
    was not even monotone, planned 1.40x and shipped 1.21x twice on the same curve), and the second sitting
    must meet it."""
    cache = Path(os.environ["POCKETFLOW_CACHE_DIR"])
    for attempt in ("latency", "latency-again"):
        if attempt == "latency-again":
            shutil.rmtree(cache / "width_cost", ignore_errors=True)
        out = tmp_path / attempt
        result = subprocess.run(main_command("--learner=channel", "--target-latency-speedup=1.3", "--trials", "4",
                                             "--finetune-epochs", "1", "--output-dir", str(out)),
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        if not (result.returncode == 3 and "latency_speedup 1.3 requested" in result.stderr):
            break
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    best = report["best"]
    assert best["target_check"]["latency_speedup"]["met"] is True
    assert best["latency_speedup"] >= 1.3 and best["latency_comparison"]["ratio"] == best["latency_speedup"]
    prediction = best["latency_prediction"]
    assert prediction["latency_speedup"] >= 1.3 * 1.05 - 1e-9 and len(prediction["width_cost"]["widths"]) >= 8
    assert report["trials"]["completed"] == 4
    assert_report_matches_files(out)
    assert list((cache / "width_cost").glob("*.json")), "the curve is cached for the next run"
    assert (out / "width_cost.json").exists(), "the run records the curve it planned with (for --resume)"
