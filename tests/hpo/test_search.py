"""The optimizer on a stub learner whose 'speedup' is a hyperparameter: budget, target, resume, outputs."""

from __future__ import annotations

import csv
import dataclasses
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import tensorflow as tf

from hpo.search import run_search
from hpo.storage import WORKER_ATTRIBUTE, counts, default_storage_url, open_storage
from learners.base import Candidate, Learner, LearnerContext
from nets import NETS
from pocketflow.config import DataConfig, HpoConfig, RunConfig, TargetConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import SingleProcess
from pocketflow.errors import UserError
from pocketflow.metrics import count_macs
from pocketflow.training import TrainSchedule


@dataclass(frozen=True)
class StubConfig:
    ratio: float | None = None


class StubLearner(Learner):
    """'Compresses' by declaring a speedup of 1/ratio; the model itself is unchanged."""

    name = "stub"
    Config = StubConfig
    targets = ("speedup",)

    def search_space(self, trial):
        return StubConfig(ratio=trial.suggest_float("ratio", 0.1, 1.0))

    def compress(self, hparams):
        return Candidate(self.baseline, hparams, state=hparams.ratio)

    def candidate_metrics(self, candidate):
        return {"macs": 1.0, "speedup": 1.0 / candidate.state}

    def reference_params(self):
        return {"ratio": 0.5}

    def reachable(self):
        return {"speedup": 10.0}


class RatioLearner(StubLearner):
    pass


@pytest.fixture(scope="module")
def setting():
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    model = NETS.get("digits_cnn").make(dataset.input_shape, dataset.num_classes)
    return dataset, model


def make_learner(dataset, model, target=2.0):
    schedule = TrainSchedule(1, 32, 0.01, "constant", "sgd", 0.0, False)
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(speedup=target),
                             distributed=SingleProcess(), baseline_macs=count_macs(model))
    return RatioLearner(StubConfig(), context)


def config_for(tmp_path: Path, trials: int, **hpo) -> RunConfig:
    return RunConfig(learner="stub", net="digits_cnn", output_dir=str(tmp_path),
                     target=TargetConfig(speedup=2.0), hpo=HpoConfig(trials=trials, **hpo))


def test_search_runs_the_budget_and_keeps_only_feasible_winners(tmp_path, setting):
    dataset, model = setting
    outcome = run_search(make_learner(dataset, model), model, config_for(tmp_path, 6, sampler="random"), tmp_path,
                         resume=False, distributed=SingleProcess())
    assert outcome.trials["completed"] == 6
    assert outcome.candidate is not None
    assert outcome.hyperparameters["ratio"] <= 0.5  # speedup >= 2 means ratio <= 0.5
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert len(rows) == 6
    assert {"number", "state", "validation_accuracy", "speedup", "seconds", "params"} <= set(rows[0])
    assert rows[0]["reference"] == "True" and '"ratio": 0.5' in rows[0]["params"]
    for row in rows:
        assert (row["feasible"] == "True") == (float(row["speedup"]) >= 2.0 - 1e-9)
    assert (tmp_path / "search_history.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_speedup.png").stat().st_size > 1000
    assert outcome.details["reference_validation_accuracy"] is not None
    stored = optuna.load_study(study_name=outcome.details["study_name"],
                               storage=default_storage_url(tmp_path))
    assert stored.metric_names == ["validation_accuracy"]  # what optuna-dashboard labels the objective
    seconds = [float(row["seconds"]) for row in rows if row["state"] == "COMPLETE"]  # rounded to 0.01 s
    assert outcome.details["median_trial_seconds"] == pytest.approx(statistics.median(seconds), abs=0.02)


def test_unreachable_target_stops_before_any_trial(tmp_path, setting):
    dataset, model = setting
    learner = make_learner(dataset, model, target=50.0)
    config = dataclasses.replace(config_for(tmp_path, 3), target=TargetConfig(speedup=50.0))
    outcome = run_search(learner, model, config, tmp_path, resume=False, distributed=SingleProcess())
    assert outcome.candidate is None
    assert "speedup 50 requested, best reached 10" in outcome.reason
    assert outcome.details["largest_reached"] == {"speedup": 10.0}


def test_no_feasible_trial_gives_no_candidate(tmp_path, setting):
    dataset, model = setting

    class Never(RatioLearner):
        def candidate_metrics(self, candidate):
            return {"macs": 1.0, "speedup": 1.5}

    learner = Never(StubConfig(), make_learner(dataset, model).context)
    outcome = run_search(learner, model, config_for(tmp_path, 3), tmp_path, resume=False,
                         distributed=SingleProcess())
    assert outcome.candidate is None
    assert outcome.trials["completed"] == 3
    assert "best reached 1.5" in outcome.reason


def test_resume_reruns_trials_of_dead_processes_and_reaches_the_budget(tmp_path, setting):
    dataset, model = setting
    config = config_for(tmp_path, 4, sampler="tpe")
    run_search(make_learner(dataset, model), model, dataclasses.replace(config, hpo=HpoConfig(trials=2)), tmp_path,
               resume=False, distributed=SingleProcess())
    # A trial left RUNNING by a process that no longer exists (as after kill -9).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage = open_storage(default_storage_url(tmp_path))
    study = optuna.load_study(study_name="stub-digits_cnn", storage=storage)
    orphan = study.ask({"ratio": optuna.distributions.FloatDistribution(0.1, 1.0)})
    import socket

    orphan.set_user_attr(WORKER_ATTRIBUTE, f"{socket.gethostname()}:{dead.stdout.strip()}")
    orphan_params = dict(orphan.params)
    outcome = run_search(make_learner(dataset, model), model, config, tmp_path, resume=True,
                         distributed=SingleProcess())
    state = counts(optuna.load_study(study_name="stub-digits_cnn", storage=storage))
    assert outcome.trials["completed"] == 4 and state["completed"] == 4
    assert state["running"] == 0 and state["failed"] == 1
    retried = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == orphan.number]
    assert retried and retried[0].params == orphan_params and retried[0].state.name == "COMPLETE"


def test_existing_private_study_without_resume_is_refused(tmp_path, setting):
    dataset, model = setting
    config = config_for(tmp_path, 1)
    run_search(make_learner(dataset, model), model, config, tmp_path, resume=False, distributed=SingleProcess())
    with pytest.raises(UserError, match="already exists"):
        run_search(make_learner(dataset, model), model, config, tmp_path, resume=False,
                   distributed=SingleProcess())


def test_unreachable_storage_is_a_user_error(tmp_path, setting):
    dataset, model = setting
    config = dataclasses.replace(config_for(tmp_path, 1),
                                 hpo=HpoConfig(trials=1, storage="postgresql://nobody@127.0.0.1:1/none"))
    with pytest.raises(UserError, match="cannot open the study storage"):
        run_search(make_learner(dataset, model), model, config, tmp_path, resume=False,
                   distributed=SingleProcess())


def test_same_seed_same_proposals(tmp_path, setting):
    dataset, model = setting
    proposals = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        run_search(make_learner(dataset, model), model, config_for(directory, 7, sampler="tpe"), directory,
                   resume=False, distributed=SingleProcess())
        rows = list(csv.DictReader(open(directory / "trials.csv")))
        proposals.append([r["params"] for r in rows])
    assert proposals[0] == proposals[1]


def test_different_seeds_do_not_share_proposals(tmp_path, setting):
    """Run seed 1 must not replay run seed 0's proposals shifted by one trial (seed + index did)."""
    dataset, model = setting
    proposals = []
    for seed in (0, 1):
        directory = tmp_path / f"seed{seed}"
        directory.mkdir()
        config = dataclasses.replace(config_for(directory, 6, sampler="random"), seed=seed)
        run_search(make_learner(dataset, model), model, config, directory, resume=False,
                   distributed=SingleProcess())
        rows = list(csv.DictReader(open(directory / "trials.csv")))
        proposals.append({r["params"] for r in rows if r["reference"] != "True"})
    assert len(proposals[0]) == len(proposals[1]) == 5
    assert not proposals[0] & proposals[1]
