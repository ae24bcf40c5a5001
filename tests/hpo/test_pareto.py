"""--objective pareto: dominance, front selection, picking by budget, the checks, and
`main.py --objective pareto` end to end on digits (>= 3 non-dominated models, each exported and measured)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from hpo.pareto import check_run, dominates, fronts, non_dominated, pick, select_front, spread
from learners.base import LEARNERS
from pocketflow.config import build_run_config
from pocketflow.errors import ConfigError
from tests.conftest import ROOT
from tests.learners.test_distillation import E2E_BASELINE_EPOCHS, shared_cache
from tests.loading import check_load_line

# --------------------------------------------------------------------------- dominance and selection


def test_dominance_is_strict_in_one_objective():
    assert dominates((0.9, 10), (0.8, 20)) and dominates((0.9, 10), (0.9, 20)) and dominates((0.9, 10), (0.8, 10))
    assert not dominates((0.9, 10), (0.9, 10))  # equal points do not dominate each other
    assert not dominates((0.9, 20), (0.8, 10))  # a trade-off


def test_non_dominated_and_fronts():
    points = [(0.95, 100), (0.90, 50), (0.90, 60), (0.80, 10), (0.70, 20), (0.95, 100)]
    assert non_dominated(points) == [0, 1, 3]  # the duplicate of point 0 is not listed twice
    assert fronts(points) == [[0, 1, 3], [2, 4]]


def test_select_front_spreads_along_the_cost_axis_and_keeps_reserves():
    costs = [1, 2, 3, 4, 5, 6, 7, 8]
    points = [(0.5 + 0.05 * i, c) for i, c in enumerate(costs)]  # all on one front
    chosen, reserves = select_front(points, max_models=4, min_models=3)
    assert chosen == [0, 1, 3, 7]  # the leader of each of 4 log-spaced cost bands
    assert reserves == [2, 4, 5, 6]
    assert spread([3, 1, 2], [0, 5, 1, 9], 2) == [2, 3]
    # Before fine-tuning an easy task's accuracies are squeezed together: the search front crowds the
    # cheap end, and an expensive trial it dominates is still finished (fine-tuning may lift it).
    points = [(0.98, 80), (0.98, 90), (0.97, 70), (0.98, 120), (0.98, 900), (0.96, 60)]
    chosen, _ = select_front(points, max_models=3, min_models=3)
    assert 4 in chosen and len(chosen) == 3
    # Few bands filled: topped up from the fronts to min_models.
    points = [(0.9, 10), (0.8, 9.9), (0.85, 10.1), (0.7, 9.8), (0.6, 9.7)]
    chosen, reserves = select_front(points, max_models=1, min_models=3)
    assert chosen == [4, 1, 0] and reserves == [3]  # at most max_models reserves, the first front first


@pytest.mark.parametrize("name", ["tpe", "nsga2", "random"])
def test_multi_objective_samplers_run_a_two_objective_study(name):
    import optuna

    from hpo.samplers import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(name, 0))
    study.optimize(lambda t: (t.suggest_float("keep", 0.1, 1.0), t.params["keep"] ** 2 + 0.1), n_trials=12)
    assert len(study.best_trials) >= 3  # a true trade-off: every trial is on the front


ROWS = [
    {"trial": 1, "validation_accuracy": 0.80, "bytes": 20 * 1024, "tflite_latency_ms": 0.01},
    {"trial": 2, "validation_accuracy": 0.90, "bytes": 40 * 1024, "tflite_latency_ms": 0.02},
    {"trial": 3, "validation_accuracy": 0.95, "bytes": 80 * 1024, "tflite_latency_ms": 0.05},
]


def test_pick_by_size_and_latency_budgets():
    assert pick(ROWS, size_kb=50)[0]["trial"] == 2
    assert pick(ROWS, size_kb=40)[0]["trial"] == 2  # the budget is inclusive
    assert pick(ROWS, size_kb=1000)[0]["trial"] == 3
    assert pick(ROWS, latency_ms=0.015)[0]["trial"] == 1
    assert pick(ROWS, latency_ms=0.1, size_kb=30)[0]["trial"] == 1
    assert pick(ROWS)[0]["trial"] == 3
    chosen, why = pick(ROWS, size_kb=10)
    assert chosen is None and "the smallest is 20.0 KB" in why
    text_rows = [{k: str(v) for k, v in row.items()} for row in ROWS]  # as read back from pareto.csv
    assert pick(text_rows, size_kb=50)[0]["trial"] == "2"


def test_checks_name_the_problem_and_the_fix():
    pareto = {"hpo": {"objective": "pareto"}}
    check_run(LEARNERS.get("channel"), build_run_config({"learner": "channel", **pareto}, LEARNERS.names()))
    with pytest.raises(ConfigError, match="learner 'full-prec' has none.*channel"):
        check_run(LEARNERS.get("full-prec"), build_run_config(pareto, LEARNERS.names()))
    with pytest.raises(ConfigError, match="--sampler cmaes optimizes one objective"):
        check_run(LEARNERS.get("channel"), build_run_config(
            {"learner": "channel", "hpo": {"objective": "pareto", "sampler": "cmaes"}}, LEARNERS.names()))
    with pytest.raises(ConfigError, match="add --objective pareto"):
        build_run_config({"pareto": {"pick_size_kb": 50}}, LEARNERS.names())
    with pytest.raises(ConfigError, match="pareto.pick_size_kb = -1"):
        build_run_config({"hpo": {"objective": "pareto"}, "pareto": {"pick_size_kb": -1}}, LEARNERS.names())


def test_the_picked_model_is_rechecked_against_the_target(tmp_path, monkeypatch):
    """What ships from a front is re-checked like a plain run's best: a pick that misses the
    requested speedup makes the run 'target_not_met' (exit 3), with the check in the report."""
    import time

    import hpo.pareto
    from pocketflow.distributed import SingleProcess
    from pocketflow.errors import TargetNotMetError
    from pocketflow.runner import Runner

    config = build_run_config({"learner": "channel", "target": {"speedup": 2.0}, "hpo": {"objective": "pareto"},
                               "output_dir": str(tmp_path)}, LEARNERS.names())
    picked = {"trial": 3, "speedup": 1.8, "accuracy": 0.9}
    monkeypatch.setattr(hpo.pareto, "finish_front", lambda *args, **options: {"pareto": {}, "best": dict(picked),
                                                                               "reason": None})
    runner = Runner(config, distributed=SingleProcess())
    runner.output_dir = tmp_path
    report = {"status": "completed"}
    with pytest.raises(TargetNotMetError, match="speedup 2 requested, the shipped result reaches 1.8"):
        runner._finish_front(None, None, None, None, None, report, 0.0, time.time())
    assert report["status"] == "target_not_met"
    assert report["best"]["target_check"] == {"speedup": {"target": 2.0, "shipped": 1.8, "met": False}}
    assert json.loads((tmp_path / "report.json").read_text())["best"]["target_check"]["speedup"]["met"] is False
    picked["speedup"] = 2.1
    report = {"status": "completed"}
    runner._finish_front(None, None, None, None, None, report, 0.0, time.time())
    assert report["status"] == "completed" and report["best"]["target_check"]["speedup"]["met"] is True


# --------------------------------------------------------------------------- end to end

PICK_SIZE_KB = 70.0


@pytest.fixture(scope="module")
def pareto_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto") / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner=channel", "--objective", "pareto",
               "--trials", "8", "--epochs", E2E_BASELINE_EPOCHS, "--finetune-epochs", "0.3", "--latency-runs", "5",
               "--distill", "--pick-size-kb", str(PICK_SIZE_KB), "--output-dir", str(out)]
    env = dict(os.environ, POCKETFLOW_CACHE_DIR=shared_cache(tmp_path_factory))
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode in (0, 3), result.stderr[-3000:]
    return out, result


def _rows(out: Path):
    return list(csv.DictReader(open(out / "pareto.csv")))


def test_pareto_front_has_three_exported_non_dominated_models(pareto_run):
    out, _ = pareto_run
    rows = _rows(out)
    assert len(rows) >= 3
    for column in ("accuracy", "macs", "bytes", "tflite_path", "tflite_latency_ms", "validation_accuracy",
                   "validation_loss"):
        assert all(row[column] not in ("", None) for row in rows), column
    for row in rows:
        assert Path(row["tflite_path"]).is_file() and Path(row["model_path"]).exists()
        assert Path(row["tflite_path"]).stat().st_size == int(row["bytes"])
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["tflite_latency_ms"]) > 0
        assert json.loads(row["distillation"]) == {"temperature": 4.0, "alpha": 0.9}
    first = rows[0]["model_path"]  # front models load like model.keras, with identical outputs
    check_load_line(first, tf.keras.models.load_model(first, compile=False))
    # The table is a front: no model dominated by another on what chooses (validation accuracy, equal
    # accuracies ranked by validation loss) and MACs.
    points = [((float(row["validation_accuracy"]), -float(row["validation_loss"])), float(row["macs"]))
              for row in rows]
    for i, a in enumerate(points):
        assert not any(dominates(b, a) for j, b in enumerate(points) if j != i), (a, points)
    assert [float(row["macs"]) for row in rows] == sorted(float(row["macs"]) for row in rows)
    assert (out / "pareto.png").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert [r["trial"] for r in report["pareto"]["rows"]] == [int(row["trial"]) for row in rows]
    assert "## Pareto front" in (out / "report.md").read_text()


def test_pick_size_kb_ships_the_most_accurate_model_that_fits(pareto_run):
    out, result = pareto_run
    rows = _rows(out)
    report = json.loads((out / "report.json").read_text())
    expected, _ = pick(rows, size_kb=PICK_SIZE_KB)
    if expected is None:  # nothing fits: exit 3, with the table written
        assert result.returncode == 3 and report["best"] is None and "no model on the Pareto front" in report["reason"]
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert report["best"]["trial"] == int(expected["trial"]) and report["best"]["bytes"] <= PICK_SIZE_KB * 1024
        fitting = [r for r in rows if int(r["bytes"]) <= PICK_SIZE_KB * 1024]
        assert float(expected["validation_accuracy"]) == max(float(r["validation_accuracy"]) for r in fitting)
        assert report["status"] == "completed" and report["pareto"]["pick"]["trial"] == int(expected["trial"])
    # Later, from the table: a budget that only the two smallest files meet.
    sizes = sorted(int(row["bytes"]) for row in rows)
    budget = (sizes[1] + 0.5) / 1024
    two = [row for row in rows if int(row["bytes"]) <= sizes[1]]
    best_of_two = max(two, key=lambda r: (float(r["validation_accuracy"]), -float(r["validation_loss"]),
                                          -int(r["bytes"])))
    picked = subprocess.run([sys.executable, "-m", "hpo.pareto", str(out), "--pick-size-kb", f"{budget:.4f}"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert picked.returncode == 0, picked.stderr[-2000:]
    assert picked.stdout.startswith(f"trial {best_of_two['trial']}:")
    assert picked.stdout.strip().endswith(best_of_two["tflite_path"])
    too_small = subprocess.run([sys.executable, "-m", "hpo.pareto", str(out), "--pick-size-kb", "0.5"],
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert too_small.returncode == 3 and "no model on the Pareto front fits file <= 0.5 KB" in too_small.stderr
