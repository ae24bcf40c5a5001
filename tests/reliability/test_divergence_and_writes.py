"""Divergence (a trial whose loss becomes NaN fails with the reason and the search goes on; a search
whose every trial diverges stops with one clear line), Ctrl-C outside the search, and the atomic
writers (a write that fails leaves the previous file, and no temporary, behind)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import tensorflow as tf

from pocketflow.cli import main
from pocketflow.export import write_atomic
from pocketflow.model_io import save_model
from tests.reliability.common import assert_no_run_left

pytestmark = pytest.mark.reliability

# An untrained baseline (--epochs 0) and a short recovery training inside every trial.
SEARCH = ["--learner", "channel", "--target-speedup", "2", "--sampler", "random", "--epochs", "0",
          "--finetune-epochs", "0", "--export", "none", "--set", "channel.recovery_epochs=0.1",
          "--set", "channel.criterion=l1"]


def test_a_trial_whose_loss_becomes_nan_fails_with_the_reason_and_the_search_goes_on(tmp_path, capsys,
                                                                                       monkeypatch):
    from learners.channel_pruning import learner as channel_module
    from pocketflow import training

    calls = []

    def second_recovery_diverges(model, data, schedule, **kwargs):
        calls.append(kwargs.get("description"))
        if len(calls) == 2:  # the second trial's recovery, at an absurd learning rate
            schedule = dataclasses.replace(schedule, learning_rate=1e12)
        return training.train(model, data, schedule, **kwargs)

    monkeypatch.setattr(channel_module, "train", second_recovery_diverges)
    out = tmp_path / "run"
    assert main([*SEARCH, "--trials", "3", "--output-dir", str(out), "-q"]) == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "trials.csv")))
    failed = [row for row in rows if row["state"] == "FAIL"]
    assert len(failed) == 1 and failed[0]["number"] == "1", rows
    assert failed[0]["reason"].startswith("DivergenceError: recovery: the loss became")
    assert "lower the learning rate" in failed[0]["reason"]
    assert sum(row["state"] == "COMPLETE" for row in rows) == 3  # another trial ran instead
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and report["best"] is not None
    assert report["trials"] == {"completed": 3, "failed": 1, "pruned": 0}


def test_a_search_whose_every_trial_diverges_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*SEARCH, "--learning-rate", "1e12", "--trials", "5", "--output-dir", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    # One warning line per failed trial (its traceback goes to run.log only), then the error.
    assert [line.split(" ", 1)[1].split(":")[0] for line in lines[:-1]] == \
        [f"trial {n} failed" for n in range(3)], lines
    assert lines[-1].startswith("error: the search stopped: its first 3 trials failed (the last: DivergenceError: "
                                "recovery: the loss became"), lines[-1]
    assert "lower the learning rate" in lines[-1] and "trials.csv" in lines[-1]
    # Nothing finished: no study, no config, so the corrected command runs in the same directory.
    assert_no_run_left(out)


def test_ctrl_c_before_the_search_writes_a_partial_report(tmp_path, capsys, monkeypatch):
    import pocketflow.baseline

    def interrupted_training(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pocketflow.baseline, "train", interrupted_training)
    out = tmp_path / "run"
    code = main(["--learner", "channel", "--target-speedup", "2", "--epochs", "1", "--output-dir", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 130
    assert captured.err.strip().splitlines()[-1].startswith(f"interrupted: partial report in {out / 'report.json'}")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted" and report["best"] is None and report["baseline"] is None
    assert report["trials"] == {"completed": 0, "failed": 0, "pruned": 0}
    # The lock is released: the same process (or another) may resume at once.
    from pocketflow.run_directory import lock_directory

    lock_directory(out).close()


def test_write_atomic_keeps_the_previous_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_atomic(target, b'{"old": true}')
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b'{"new": true}')
    assert target.read_bytes() == b'{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_save_model_keeps_the_previous_file_when_saving_fails(tmp_path, monkeypatch):
    inputs = tf.keras.Input((4,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))
    target = save_model(model, tmp_path / "model.keras")
    before = target.read_bytes()

    def crash(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a model")
        raise KeyboardInterrupt  # Ctrl-C in the middle of saving

    monkeypatch.setattr(tf.keras.Model, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_every_file_a_run_writes_goes_through_an_atomic_writer():
    """Reports, trials.csv, plots, models, TFLite files and artifacts: serialized to memory and
    handed to write_atomic, or (Keras models) saved into a temporary directory and renamed."""
    import re

    from tests.conftest import ROOT

    direct_write = re.compile(r"\.write_(text|bytes)\(|\bopen\([^)]*['\"][wax]b?\+?['\"]|savefig\((?!buffer)"
                              r"|np\.save(z|z_compressed)?\((?!buffer)|\bmodel\.save\(")
    allowed = {("pocketflow/export.py", "os.fdopen"),  # write_atomic itself
               ("pocketflow/run_directory.py", "probe.write_bytes"),  # the writability probe (removed at once)
               ("pocketflow/run_directory.py", '".lock"'),  # the directory lock
               ("hpo/storage.py", ".lock"),  # the study lock
               ("pocketflow/model_io.py", "model.save(temporary")}  # save_model: temporary dir + rename
    offenders = []
    for package in ("pocketflow", "hpo", "learners", "nets"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith("pocketflow/benchmarks/"):  # developer tooling, not a run's output
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if direct_write.search(code) and not code.strip().startswith(("f\"", "\"", "raise")) \
                        and not any(relative == file and marker in code for file, marker in allowed):
                    offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "write these through pocketflow.export.write_atomic:\n" + "\n".join(offenders)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
