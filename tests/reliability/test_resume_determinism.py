"""Resume determinism of the search itself, in this process, on a stub learner (no training):
wherever a trial is cut off (while its parameters are suggested, while it is evaluated, even
the reference trial) and however (Ctrl-C, or a kill -9 that leaves it RUNNING), the resumed
search runs the same trials with the same parameters as a search that was never interrupted."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import optuna
import pytest
from optuna.trial import TrialState

from hpo.search import run_search
from hpo.storage import WORKER_ATTRIBUTE, default_storage_url, open_storage
from learners.base import Candidate, Learner, LearnerContext
from nets import NETS
from pocketflow.config import DataConfig, HpoConfig, RunConfig, TargetConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import SingleProcess
from pocketflow.errors import RunInterrupted
from pocketflow.metrics import count_macs
from pocketflow.training import TrainSchedule

pytestmark = pytest.mark.reliability

TRIALS = 5
STUDY = "stub-digits_cnn"


class Killed(BaseException):
    """Stands for kill -9: nothing in the process gets to react."""


@dataclass(frozen=True)
class Ratios:
    first: Optional[float] = None
    second: Optional[float] = None


class TwoRatioLearner(Learner):
    """Two searched ratios; 'speedup' 1 / (first * second); the model is not changed."""

    name = "stub"
    Config = Ratios
    targets = ("speedup",)

    def __init__(self, options, context, cut: Optional[tuple] = None) -> None:
        super().__init__(options, context)
        self.cut = cut  # (trial number, "suggest" | "evaluate", KeyboardInterrupt | Killed)
        self.asked = -1

    def _maybe_cut(self, where: str) -> None:
        if self.cut and self.cut[0] == self.asked and self.cut[1] == where:
            cut, self.cut = self.cut, None
            raise cut[2]()

    def search_space(self, trial):
        if not isinstance(trial, optuna.trial.FixedTrial):
            self.asked = trial.number
        first = trial.suggest_float("first", 0.2, 1.0)
        if not isinstance(trial, optuna.trial.FixedTrial):
            self._maybe_cut("suggest")
        return Ratios(first, trial.suggest_float("second", 0.2, 1.0))

    def compress(self, hparams):
        self._maybe_cut("evaluate")
        return Candidate(self.baseline, hparams)

    def candidate_metrics(self, candidate):
        return {"macs": 1.0, "speedup": 1.0 / (candidate.hparams.first * candidate.hparams.second)}

    def reference_params(self):
        return {"first": 0.7, "second": 0.7}


@pytest.fixture(scope="module")
def setting():
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    model = NETS.get("digits_cnn").make(dataset.input_shape, dataset.num_classes)
    return dataset, model


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    import hpo.results

    monkeypatch.setattr(hpo.results, "write_plots", lambda *args: [])


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, setting):
    """The search of each sampler run straight through, once for the module."""
    runs = {}
    for sampler in ("random", "tpe"):
        directory = tmp_path_factory.mktemp(f"straight-{sampler}")
        import hpo.results

        saved, hpo.results.write_plots = hpo.results.write_plots, lambda *args: []
        try:
            outcome = _search(directory, setting, sampler, resume=False)
        finally:
            hpo.results.write_plots = saved
        runs[sampler] = (outcome, _completed(directory))
    return runs


def _search(directory: Path, setting, sampler: str, *, resume: bool, cut: Optional[tuple] = None):
    dataset, model = setting
    schedule = TrainSchedule(1, 32, 0.01, "constant", "sgd", 0.0, False)
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(speedup=1.5),
                             distributed=SingleProcess(), baseline_macs=count_macs(model))
    config = RunConfig(learner="stub", net="digits_cnn", output_dir=str(directory), seed=7,
                       target=TargetConfig(speedup=1.5), hpo=HpoConfig(trials=TRIALS, sampler=sampler))
    learner = TwoRatioLearner(Ratios(), context, cut)
    return run_search(learner, model, config, directory, resume=resume, distributed=SingleProcess())


def _study(directory: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=open_storage(default_storage_url(directory)))


def _completed(directory: Path) -> list:
    return [(t.params, t.value, bool(t.user_attrs.get("reference")))
            for t in _study(directory).get_trials(states=(TrialState.COMPLETE,))]


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.parametrize("how, cut, sampler", [
    (KeyboardInterrupt, (0, "suggest"), "random"),
    (KeyboardInterrupt, (2, "suggest"), "random"),
    (KeyboardInterrupt, (3, "evaluate"), "tpe"),
    (Killed, (2, "suggest"), "random"),
    (Killed, (0, "suggest"), "tpe"),
    (Killed, (3, "evaluate"), "tpe"),
], ids=["ctrl-c-reference-while-suggesting", "ctrl-c-while-suggesting", "ctrl-c-while-evaluating",
        "kill-9-while-suggesting", "kill-9-reference-while-suggesting", "kill-9-while-evaluating"])
def test_a_cut_off_search_resumes_to_the_same_trials(tmp_path, setting, straight_runs, sampler, cut, how):
    outcome, expected = straight_runs[sampler]
    assert len(expected) == TRIALS and expected[0][2]  # the reference trial first

    cut_off = tmp_path / "cut"
    cut_off.mkdir()
    with pytest.raises(RunInterrupted if how is KeyboardInterrupt else Killed):
        _search(cut_off, setting, sampler, resume=False, cut=(*cut, how))
    trials = _study(cut_off).get_trials()
    if how is KeyboardInterrupt:
        assert trials[cut[0]].state == TrialState.FAIL
        assert trials[cut[0]].user_attrs["fail_reason"].startswith("interrupted")
    else:  # as after kill -9: RUNNING, owned by a process that is gone
        assert trials[cut[0]].state == TrialState.RUNNING
        storage = _study(cut_off)._storage
        storage.set_trial_user_attr(trials[cut[0]]._trial_id, WORKER_ATTRIBUTE,
                                    f"{trials[cut[0]].user_attrs[WORKER_ATTRIBUTE].rpartition(':')[0]}:{_dead_pid()}")

    resumed = _search(cut_off, setting, sampler, resume=True)
    assert _completed(cut_off) == expected
    assert resumed.hyperparameters == outcome.hyperparameters
    assert resumed.details["reference_validation_accuracy"] == outcome.details["reference_validation_accuracy"]
    failed = _study(cut_off).get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [cut[0]] and failed[0].user_attrs["fail_reason"].startswith("interrupted")


def test_interrupted_trials_do_not_shift_the_sampler_seeds(tmp_path, setting, straight_runs):
    """Ctrl-C twice in a row (the second time in the trial that replaced the first), then resume."""
    cut_off = tmp_path / "cut"
    cut_off.mkdir()
    for cut in ((1, "suggest"), (2, "evaluate")):
        with pytest.raises(RunInterrupted):
            _search(cut_off, setting, "random", resume=True, cut=(*cut, KeyboardInterrupt))
    _search(cut_off, setting, "random", resume=True)
    assert _completed(cut_off) == straight_runs["random"][1]
    assert [t.number for t in _study(cut_off).get_trials(states=(TrialState.FAIL,))] == [1, 2]
