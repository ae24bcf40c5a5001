"""Re-derive a run's reported figures from the files it wrote: what we hand the user is what we measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from learners import LEARNERS
from pocketflow.config import build_run_config
from pocketflow.data import load_dataset
from pocketflow.export import TFLiteModel, delegation_of_file, runtime_name, tflite_accuracy
from pocketflow.metrics import count_macs, count_params
from pocketflow.training import accuracy


def assert_report_matches_files(run_dir: Path) -> dict:
    """Every figure of ``best`` that a file backs: measured again from that file and compared."""
    report = json.loads((run_dir / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    config = build_run_config(yaml.safe_load((run_dir / "config.yaml").read_text()), LEARNERS.names(), "config.yaml")
    dataset = load_dataset(config.data, config.seed)
    images, labels = dataset.test_arrays()

    model = tf.keras.models.load_model(best["model_path"], compile=False)
    assert count_macs(model) == best["macs"] and count_params(model) == best["params"]
    assert accuracy(model, dataset.test(256)) == pytest.approx(best["accuracy"], abs=1e-9)
    assert best["speedup"] == pytest.approx(baseline["macs"] / count_macs(model))
    comparison = best.get("latency_comparison")
    if comparison:  # the reported ratio is the one timed in turn, not two timings minutes apart
        assert best["latency_speedup"] == comparison["ratio"] == comparison["baseline_ms"] / comparison["shipped_ms"]

    assert report["environment"]["tflite_runtime"] == runtime_name()
    for mode, measured in best.get("exports", {}).items():
        path = Path(measured["path"])
        assert path.stat().st_size == measured["bytes"], mode
        assert measured["runtime"] == runtime_name()
        assert tflite_accuracy(TFLiteModel(path), images, labels) == pytest.approx(measured["accuracy"], abs=1e-9)
    shipped = run_dir / (best.get("artifact_path") or best["tflite_path"])  # relative to the run, or absolute
    shipped_bytes = best.get("artifact_bytes", best["bytes"])
    assert shipped.stat().st_size == shipped_bytes
    assert Path(baseline["tflite_path"]).stat().st_size == baseline["bytes"]
    assert best["compression"] == pytest.approx(baseline["bytes"] / shipped_bytes)
    if shipped.suffix == ".tflite":
        if comparison:  # the latency ratio is the shipped file's, not another export's
            assert (run_dir / comparison["shipped_file"]).resolve() == shipped.resolve()
        shipped_accuracy = best.get("artifact_accuracy", best.get("tflite_accuracy"))
        assert tflite_accuracy(TFLiteModel(shipped), images, labels) == pytest.approx(shipped_accuracy, abs=1e-9)
    # Every TFLite file the result names has its delegation measured from the file itself.
    for name, measured in best["delegation"].items():
        assert delegation_of_file(run_dir / name).as_dict() == measured, name
    if shipped.suffix == ".tflite":
        assert str(shipped.resolve().relative_to(run_dir.resolve())) in best["delegation"]
    assert baseline["delegation"] == delegation_of_file(baseline["tflite_path"]).as_dict()
    if "sparsity" in best and best.get("sparsity") is not None:
        kernels = [w.numpy() for layer in model.layers for w in layer.weights if "kernel" in w.name]
        zeros = sum(int((k == 0).sum()) for k in kernels)
        assert zeros >= best["sparsity"] * best.get("prunable_weights", 0) - 1
    assert_ship_directory(run_dir, report, dataset)
    # The target is re-checked on what ships; a completed run meets every requested kind it can check.
    check = best["target_check"]
    assert set(check) == set(report["target"])
    for kind, entry in check.items():
        assert entry["target"] == report["target"][kind]
        if report["status"] == "completed":
            assert entry["met"] in (True, None), (kind, entry)
    return report


def assert_search_summary_matches_trials(run_dir: Path) -> None:
    """report.json's search summary re-derived from trials.csv: the reference trial ran first and the
    best accuracy is the best feasible trial's (not "best >= reference", which holds by construction)."""
    import csv

    search = json.loads((run_dir / "report.json").read_text())["search"]
    rows = list(csv.DictReader(open(run_dir / "trials.csv")))
    assert rows[0]["reference"] == "True" and not any(row["reference"] == "True" for row in rows[1:])
    assert search["reference_validation_accuracy"] == pytest.approx(float(rows[0]["validation_accuracy"]))
    feasible = [float(row["validation_accuracy"]) for row in rows
                if row["state"] == "COMPLETE" and row["feasible"] == "True"]
    assert search["feasible_trials"] == len(feasible)
    assert search["best_validation_accuracy"] == pytest.approx(max(feasible))
    assert 0.0 < search["baseline_validation_accuracy"] <= 1.0  # the line the plots draw


def assert_ship_directory(run_dir: Path, report: dict, dataset) -> None:
    """ship/ holds the measured file byte for byte, and its predict.py, run in a fresh process on the
    raw test images, scores what our evaluator scores on that TFLite file."""
    import filecmp
    import subprocess
    import sys
    import tempfile

    from pocketflow.runs import shipped_file
    from pocketflow.shipping import runtime_path

    best, ship = report["best"], report["ship"]
    assert all((run_dir / name).exists() for name in ship["files"]), ship
    measured = Path(shipped_file(best)["path"])
    measured = measured if measured.is_absolute() else run_dir / measured
    assert filecmp.cmp(run_dir / ship["file"], measured, shallow=False)
    if not ship["runtime_file"] or not hasattr(dataset, "_x_test"):
        return
    runtime = Path(runtime_path(best))
    runtime = runtime if runtime.is_absolute() else run_dir / runtime
    assert filecmp.cmp(run_dir / ship["runtime_file"], runtime, shallow=False)
    images, labels = dataset.test_arrays()
    expected = tflite_accuracy(TFLiteModel(runtime), images, labels)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "raw.npy", dataset._x_test)  # noqa: SLF001 - the raw pixels a user has
        script = (f"import sys, numpy as np; sys.path.insert(0, {str(run_dir / 'ship')!r})\n"
                  f"from predict import predict\n"
                  f"np.save({str(Path(tmp) / 'scores.npy')!r}, predict(np.load({str(Path(tmp) / 'raw.npy')!r})))\n")
        # ship/README.md's LiteRT lines, as written, then the scores from predict.py
        readme = (run_dir / "ship" / "README.md").read_text()
        load_lines = readme.split("or with LiteRT directly", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        script = f"import os; os.chdir({str(run_dir / 'ship')!r})\n{load_lines}os.chdir({tmp!r})\n{script}"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=tmp)
        assert done.returncode == 0, done.stderr[-2000:]
        scores = np.load(Path(tmp) / "scores.npy")
    assert float(np.mean(np.argmax(scores, axis=-1) == labels)) == pytest.approx(expected, abs=1e-9)
