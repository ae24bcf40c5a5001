"""The main job end to end: `main.py --learner=channel --target-speedup=2.5` on the default, an
impossible target, and kill -9 during the search followed by --resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import pytest
import tensorflow as tf
import yaml

from learners.channel_pruning.learner import ChannelConfig
from tests.conftest import ROOT
from tests.loading import check_load_line
from tests.reliability.common import main_command
from tests.verify_run import assert_report_matches_files, assert_search_summary_matches_trials

pytestmark = pytest.mark.integration


def channel_command(*args: str) -> list:
    return main_command("--learner=channel", *args)


def test_default_channel_job_meets_the_target_and_ships_a_smaller_faster_file(tmp_path):
    out = tmp_path / "run"
    begin = time.time()
    result = subprocess.run(channel_command("--target-speedup=2.5", "--output-dir", str(out)), capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    seconds = time.time() - begin
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 300, f"the default channel job took {seconds:.0f}s (must finish in under 5 minutes)"
    report = json.loads((out / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    assert 2.5 <= best["speedup"] <= 2.625
    assert best["accuracy"] >= baseline["accuracy"] - 0.02
    assert best["bytes"] < baseline["bytes"]
    assert best["tflite_latency_ms"] < baseline["tflite_latency_ms"]
    assert best["params"] < baseline["params"] and best["macs"] < baseline["macs"]
    assert report["trials"]["completed"] == 20
    # channel.criterion = auto: 6 fine-tuning epochs (20% of the digits recipe) select by L1, and the
    # report quotes the rank quality measured for that criterion's trial score.
    assert best["hyperparameters"]["criterion"] == "l1"
    assert best["hyperparameters"]["refit"] is False
    assert best["trial_score_rank_correlation"]["criterion"] == "l1"
    assert best["trial_score_rank_correlation"]["refit"] is False
    assert "Trial score:" in (out / "report.md").read_text()
    model = tf.keras.models.load_model(best["model_path"], compile=False)
    assert model.count_params() == best["params"]
    check_load_line(best["model_path"], model)
    check_load_line(str(out / "baseline.keras"), tf.keras.models.load_model(out / "baseline.keras", compile=False))
    assert_report_matches_files(out)
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 20 and all(row["state"] == "COMPLETE" for row in rows)
    assert (out / "search_history.png").exists() and (out / "accuracy_vs_speedup.png").exists()
    # A short console (the first and last trial, new bests, every fifth of the budget) with no
    # TensorFlow or runtime noise; run.log has a line for every trial.
    console = (result.stderr + result.stdout).strip().splitlines()
    assert len(console) <= 25, "\n".join(console)
    assert "trial  19  [20/20]" in result.stderr and "trial   0  [1/20]" in result.stderr
    assert not [line for line in console if "WARNING" in line or line.startswith(("INFO:", "W0", "I0", "E0"))], console
    run_log = (out / "run.log").read_text()
    assert len(re.findall(r"trial +\d+  \[\d+/20\]", run_log)) == 20
    # each candidate's functions are traced once, each counted apart: no "retracing" warning per trial
    assert "triggered tf.function retracing" not in run_log
    # The last line names the file to deploy, with its size and the accuracy measured on it.
    ship = result.stdout.strip().splitlines()[-1]
    assert ship.startswith(f"ship:     {out / 'ship' / 'model.tflite'} ({best['bytes'] / 1024:.1f} KB"), ship
    assert f"test accuracy {100 * best['tflite_accuracy']:.2f}% measured on this file" in ship
    assert_search_summary_matches_trials(out)
    reference = json.loads(rows[0]["params"])  # the uniform reference: every group proposed at one ratio
    assert len(set(reference.values())) == 1 and len(reference) > 1
    # config.yaml records what ran, every value resolved, so that --config repeats the run.
    ran = yaml.safe_load((out / "config.yaml").read_text())
    assert all(ran["train"][key] is not None for key in ("epochs", "finetune_epochs", "batch_size",
                                                         "learning_rate", "schedule", "optimizer", "weight_decay"))
    assert set(ran["channel"]) == {field.name for field in dataclasses.fields(ChannelConfig) if field.init}


def test_impossible_target_exits_3_with_a_report(tmp_path):
    out = tmp_path / "impossible"
    result = subprocess.run(channel_command("--target-speedup=1000", "--trials", "3", "--output-dir", str(out)),
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "no candidate can meet the target: speedup 1000 requested, best reached" in result.stderr
    assert "--set channel.min_channels=1 --set channel.channel_multiple=1" in result.stderr  # the way out
    report = json.loads((out / "report.json").read_text())
    assert report["best"] is None and report["status"] == "target_not_met"
    assert "speedup 1000 requested" in report["reason"]
    assert 1 < report["search"]["largest_reached"]["speedup"] < 1000


def _completed(database) -> int:
    if not database.exists():
        return 0
    try:
        with sqlite3.connect(database, timeout=1) as connection:
            return connection.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_during_the_search_then_resume_loses_nothing(tmp_path):
    out = tmp_path / "killed"
    arguments = ("--target-speedup=2.0", "--trials", "8", "--finetune-epochs", "1", "--output-dir", str(out))
    process = subprocess.Popen(channel_command(*arguments), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=ROOT)
    deadline = time.time() + 300
    while _completed(out / "study.db") < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the search ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = _completed(out / "study.db")
    assert 3 <= done_before < 8

    result = subprocess.run(channel_command(*arguments, "--resume"), capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(out / "study.db") as connection:
        rows = connection.execute("select trial_id, number, state from trials").fetchall()
        params = connection.execute("select trial_id, param_name, param_value from trial_params").fetchall()
    completed = [r for r in rows if r[2] == "COMPLETE"]
    assert len(completed) == 8
    assert len({r[1] for r in rows}) == len(rows)  # trial numbers unique
    by_trial = {}
    for trial_id, name, value in params:
        by_trial.setdefault(trial_id, []).append((name, value))
    signatures = [tuple(sorted(by_trial[r[0]])) for r in completed]
    assert len(set(signatures)) == len(signatures), "a finished trial was run again"
    report = json.loads((out / "report.json").read_text())
    assert report["trials"]["completed"] == 8
    assert report["best"]["speedup"] >= 2.0
