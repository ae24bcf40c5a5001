"""The search: propose -> compress -> cheap validation score -> target check -> tell, until the
study holds ``--trials`` completed trials; then hand back the best candidate that met the target.

Rank 0 owns the Optuna study; other Horovod ranks receive each trial's parameters by
broadcast and compress identically (their training steps are collective); rank 0 alone
scores, records and writes. Trials are scored on the validation split carved from the
training data, never on the test split.

Several searchers (processes or Horovod jobs) may share one study through ``--storage`` and
``--study-name``: ``--trials`` is the study's total, and each searcher stops asking when
completed + running trials reach it. The check and the ask happen under the study's lock
(``hpo.storage.study_lock``), so the budget is never overshot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import optuna
import tensorflow as tf
from optuna.trial import TrialState

from hpo import pareto, results
from hpo.results import BASELINE_ACCURACY_ATTRIBUTE, SearchOutcome
from hpo.samplers import make_sampler, trial_seed
from hpo.storage import (PARAMS_PENDING_ATTRIBUTE, WORKER_ATTRIBUTE, claim_study, counts,
                         default_storage_url, display_url, is_interrupted, load_or_create, open_storage,
                         recover_dead_trials, requeue, study_lock, study_name, worker_id)
from hpo.targets import describe_shortfall, meets, violations
from learners.base import Learner
from learners.distillation import make_distiller, reference_values, searched, suggest
from pocketflow import interrupts
from pocketflow.config import RunConfig
from pocketflow.data.files import one_line
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError, RunInterrupted, SearchFailedError
from pocketflow.training import accuracy

log = logging.getLogger(__name__)

MAX_FAILURES_WITHOUT_SUCCESS = 3


def hyperparameters_dict(hparams: Any) -> Dict[str, Any]:
    if is_dataclass(hparams):
        return json.loads(json.dumps(asdict(hparams), default=str))
    return dict(hparams)


class Search:
    """One searcher process (or one Horovod job) working on a study."""

    def __init__(self, learner: Learner, baseline: tf.keras.Model, config: RunConfig, output_dir: Path,
                 *, resume: bool, distributed: SingleProcess, teacher: Optional[tf.keras.Model] = None) -> None:
        self.learner = learner
        self.baseline = baseline
        self.config = config
        self.output_dir = output_dir
        self.resume = resume
        self.distributed = distributed
        self.requested = learner.searched_targets(config.target)  # a chain's later stages: checked when shipped
        self.study: Optional[optuna.Study] = None
        self.storage_url = self.study_name = ""
        self.started = time.time()
        self.trial_seconds: List[float] = []
        self._best_shown: Optional[int] = None  # the best trial the console last named
        self.consecutive_failures = 0
        self._current_trial: Optional[optuna.Trial] = None  # asked and not yet told (for Ctrl-C)
        distinct = learner.max_trials()
        self.budget = min(config.hpo.trials, distinct) if distinct else config.hpo.trials
        # --objective pareto: a second objective, the learner's cost (MACs, bytes), minimized.
        self.cost_key = learner.pareto_cost if config.hpo.objective == "pareto" else None
        if self.cost_key and distinct is not None and distinct < 2:
            raise ConfigError(f"--objective pareto: learner '{config.learner}' has {distinct} candidate with these "
                              f"options, so there is no front to search; use --objective accuracy")
        # Searched distillation T/alpha: every trial is fine-tuned briefly with its own values.
        self.distillation = config.distillation
        self.distiller = (make_distiller(config.distillation, baseline if teacher is None else teacher,
                                         precision=learner.context.schedule.precision)
                          if searched(config.distillation) else None)

    # ------------------------------------------------------------------ study
    def _open_study(self) -> optuna.Study:
        """Open (or join) the study and queue its reference trial, under the study's lock."""
        hpo = self.config.hpo
        url = hpo.storage or default_storage_url(self.output_dir)
        name = study_name(self.config)
        self.storage_url, self.study_name = url, name
        with self._lock():
            study = load_or_create(open_storage(url), name, self._sampler(0), self.resume,
                                   shared=hpo.storage is not None,
                                   directions=["maximize", "minimize"] if self.cost_key else None)
            subject = self.config.net or Path(self.config.model).stem
            claim_study(study, {"learner": self.config.learner, "model": subject, "target": self.requested,
                                "objective": hpo.objective})
            # Named objectives: optuna-dashboard shows "validation_accuracy", not "Objective 0".
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2; nothing a user can act on
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["validation_accuracy"] + ([self.cost_key] if self.cost_key else []))
            if self.resume or hpo.storage is not None:
                recover_dead_trials(study)
            self.study = study
            self._enqueue_reference()
        log.info("study '%s' in %s: %s", name, display_url(url), _format_counts(counts(study)))
        return study

    def _record_baseline_accuracy(self) -> None:
        """The baseline's validation accuracy, once per study: the line every trial is read against
        (the trials are scored on the same images)."""
        if BASELINE_ACCURACY_ATTRIBUTE not in self.study.user_attrs:
            self.study.set_user_attr(BASELINE_ACCURACY_ATTRIBUTE, self._validation_accuracy(self.baseline))

    def _validation_accuracy(self, model: tf.keras.Model) -> float:
        """A trial's score, and the baseline's line on the plots: the same images, the same evaluation."""
        return accuracy(model, self.learner.context.dataset.validation(256))

    def _validation_images(self) -> Optional[int]:
        return getattr(self.learner.context.dataset, "num_validation", None)

    def _lock(self) -> contextlib.AbstractContextManager:
        return study_lock(self.storage_url, self.study_name)

    def _sampler(self, trial_number: int) -> optuna.samplers.BaseSampler:
        return make_sampler(self.config.hpo.sampler, trial_seed(self.config.seed, trial_number))

    def _enough(self) -> bool:
        """Stop asking when completed + running trials reach the study's budget (shared by all searchers)."""
        state = counts(self.study)
        if state["completed"] + state["running"] >= self.budget:
            return True
        timeout = self.config.hpo.timeout
        return timeout is not None and time.time() - self.started >= timeout

    # ------------------------------------------------------------------ one trial
    def _ask(self) -> Tuple[Optional[optuna.Trial], Optional[Dict[str, Any]]]:
        """Chief: a new trial and its parameters (None when the budget is reached); others: broadcast."""
        decision = None
        trial = None
        if self.distributed.is_chief:
            with self._lock():  # other searchers of the study check and ask in turn
                if not self._enough():
                    study = self.study
                    study.sampler = self._sampler(self._trial_index())
                    trial = study.ask()
                    self._current_trial = trial
                    trial.set_user_attr(WORKER_ATTRIBUTE, worker_id())
                    trial.set_user_attr(PARAMS_PENDING_ATTRIBUTE, True)
            if trial is not None:
                hparams = self.learner.search_space(trial)
                hyperparameters = hyperparameters_dict(hparams)
                if self.distiller is not None:
                    hyperparameters["distillation"] = suggest(trial, self.distillation)
                trial.set_user_attr(PARAMS_PENDING_ATTRIBUTE, False)  # a cut-off trial's params may be rerun
                decision = {"params": dict(trial.params), "number": trial.number,
                            "hyperparameters": hyperparameters}
        decision = self.distributed.broadcast_object(decision)
        return trial, decision

    def _evaluate(self, params: Dict[str, Any]) -> Tuple[float, Dict[str, float]]:
        hparams = self.learner.search_space(optuna.trial.FixedTrial(params))
        candidate = self.learner.compress(hparams)  # every rank: its training is collective
        if self.distiller is not None:  # searched T/alpha: measured by a short fine-tuning distilled with them
            chosen = suggest(optuna.trial.FixedTrial(params), self.distillation)
            candidate = self.learner.finetune(candidate, self.distillation.search_epochs,
                                              teacher=self.distiller.with_values(**chosen))
        if not self.distributed.is_chief:
            return math.nan, {}  # only rank 0 scores and records
        achieved = self.learner.candidate_metrics(candidate)
        score = self._validation_accuracy(candidate.model)
        del candidate
        return score, achieved

    def _record(self, trial: optuna.Trial, score: float, achieved: Dict[str, float], seconds: float,
                hyperparameters: Dict[str, Any]) -> None:
        for name, violation in zip(self.requested, violations(self.requested, achieved)):
            trial.set_constraint(name, violation)  # constraint-aware samplers steer away from misses
        trial.set_user_attr("feasible", meets(self.requested, achieved))
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("hyperparameters", hyperparameters)
        for key, value in achieved.items():
            trial.set_user_attr(key, value)
        if not math.isfinite(score):
            trial.set_user_attr("fail_reason", f"the validation accuracy is {score}")
            self.study.tell(trial, state=TrialState.FAIL)
            return
        if self.cost_key:  # --objective pareto: (validation accuracy, cost)
            cost = achieved.get(self.cost_key)
            if cost is None or not math.isfinite(cost):
                self._fail(trial, f"the learner did not measure '{self.cost_key}', the Pareto cost")
                return
            self.study.tell(trial, [score, float(cost)])
            return
        self.study.tell(trial, score)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason[:500])
        self.study.tell(trial, state=TrialState.FAIL)

    # ------------------------------------------------------------------ loop
    def run(self) -> SearchOutcome:
        self.learner.prepare(self.baseline)  # the runner did already; free when it did
        reachable = self.learner.reachable()
        unreachable = {k: v for k, v in self.requested.items() if k in reachable and not meets({k: v}, reachable)}
        if unreachable:
            hint = self.learner.unreachable_hint()
            reason = (f"no candidate can meet the target: {describe_shortfall(unreachable, reachable)} "
                      f"(every prunable part at its minimum){'; ' + hint if hint else ''}")
            return SearchOutcome(None, {}, {"completed": 0, "failed": 0, "pruned": 0}, reason,
                                 {"largest_reached": reachable})
        if self.distributed.is_chief:
            self._open_study()
            self._record_baseline_accuracy()
        try:
            self._run_trials()
        except KeyboardInterrupt:
            raise self._interrupted() from None
        return self._outcome()

    def _run_trials(self) -> None:
        """Ask, compress, score, tell, until the study's budget is reached."""
        while True:
            interrupts.check()  # a Ctrl-C that Python dropped (it can land in a GC callback) still stops here
            trial, decision = self._ask()
            if decision is None:
                break
            begin = time.time()
            error: Optional[Exception] = None
            try:
                score, achieved = self._evaluate(decision["params"])
            except Exception as caught:  # noqa: BLE001 - a failed trial must not stop the search
                error = caught
                reason = f"{type(error).__name__}: {error}"
                log.warning("trial %d failed: %s", decision["number"], reason, exc_info=True)
                if trial is not None:
                    self._fail(trial, reason)
            verdict = self.distributed.broadcast_object(self._verdict(error))  # rank 0's verdict binds all
            if verdict == "give up":
                last = f"the last: {type(error).__name__}: {one_line(error, 300)}" if error else "on rank 0"
                raise SearchFailedError(f"the search stopped: its first {MAX_FAILURES_WITHOUT_SUCCESS} trials "
                                        f"failed ({last}); see trials.csv and run.log in the run directory")
            if verdict == "failed" or trial is None:
                self._current_trial = None
                continue
            seconds = time.time() - begin
            self.trial_seconds.append(seconds)
            self._record(trial, score, achieved, seconds, decision["hyperparameters"])
            self._current_trial = None
            self._progress(decision["number"], score, achieved, seconds)
            results.write_trials(self.study, self.output_dir, self.requested)

    def _trial_index(self) -> int:
        """The next trial's sampler seed offset: the study's trials, not counting those cut off by an
        interruption (they are run again) nor queued ones, so a search that is killed and resumed
        draws the same parameters as one that ran straight through."""
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if t.state != TrialState.WAITING and not is_interrupted(t))

    def _interrupted(self) -> RunInterrupted:
        """Ctrl-C: the trial in progress is marked failed ('interrupted') and --resume runs it again (its
        parameters are queued, or drawn again with the same seed if it was cut off while they were
        suggested); the study (already in its database) and trials.csv are saved; the counts go to the
        partial report."""
        if self.study is None:
            return RunInterrupted({"completed": 0, "failed": 0, "pruned": 0}, {})
        trial, self._current_trial = self._current_trial, None
        try:
            running = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if trial is not None and t.number == trial.number]
            if running:
                self._fail(trial, "interrupted: stopped by the user (SIGINT); --resume runs it again")
                requeue(self.study, running[0])
                log.warning("trial %d interrupted: marked failed; --resume runs it again", trial.number)
            results.write_trials(self.study, self.output_dir, self.requested)
            details = results.summary(self.study, self.requested, display_url(self.storage_url))
        except Exception as error:  # noqa: BLE001 - saving what we can must not hide the interruption
            log.warning("after the interruption, the study could not be fully saved: %s", error)
            details = {}
        full = counts(self.study)
        return RunInterrupted({k: full[k] for k in ("completed", "failed", "pruned")}, details)

    def _verdict(self, error: Optional[Exception]) -> str:
        """After a trial: "ok", "failed" (go on), or "give up" (the first trials all failed)."""
        if error is None:
            self.consecutive_failures = 0
            return "ok"
        self.consecutive_failures += 1
        if self.consecutive_failures >= MAX_FAILURES_WITHOUT_SUCCESS and not self._any_completed():
            return "give up"
        return "failed"

    def _any_completed(self) -> bool:
        return self.study is None or counts(self.study)["completed"] > 0

    def _enqueue_reference(self) -> None:
        """Queue the learner's reference point (e.g. uniform ratios) as the study's first trial
        (under the study's lock: two searchers starting together queue it once)."""
        reference = self.learner.reference_params()
        if reference and self.distiller is not None:
            reference = {**reference, **reference_values(self.distillation)}
        if reference and not self.study.get_trials(deepcopy=False):
            self.study.enqueue_trial(reference, user_attrs={"reference": True})

    def _progress(self, number: int, score: float, achieved: Dict[str, float], seconds: float) -> None:
        state = counts(self.study)
        best = self._best_trial()
        best_text = f"best {results.accuracy_of(best):.4f} (#{best.number})" if best else \
            "best: none meets the target yet"
        if self.cost_key:
            best_text = f"front {len(pareto.front_trials(self.study))} models"
        remaining = max(0, self.budget - state["completed"])
        mean = sum(self.trial_seconds) / len(self.trial_seconds)
        metrics = "  ".join(f"{k} {v:.3f}" for k, v in achieved.items() if k in self.requested or k == "speedup")
        log.info("trial %3d  [%d/%d]  val_acc %.4f  %s  %s  %.1fs  elapsed %s  eta %s", number,
                 state["completed"], self.budget, score, metrics, best_text, seconds,
                 _clock(time.time() - self.started), _clock(mean * remaining),
                 extra={"console": self._on_console(state["completed"], best)})

    def _on_console(self, completed: int, best: Optional[optuna.trial.FrozenTrial]) -> bool:
        """Whether a trial's line goes to the console (run.log has every one): the first and the last,
        a new best, and every fifth of the budget in between, so the console stays short at any budget."""
        new_best = best is not None and not self.cost_key and best.number != self._best_shown
        if best is not None:
            self._best_shown = best.number
        stride = max(1, self.budget // 5)
        return completed in (1, self.budget) or new_best or completed % stride == 0

    def _best_trial(self) -> Optional[optuna.trial.FrozenTrial]:
        return results.best_feasible(self.study)

    def _outcome(self) -> SearchOutcome:
        if self.cost_key:
            return self._front_outcome()
        decision = None
        details: Dict[str, Any] = {}
        state = {"completed": 0, "failed": 0, "pruned": 0}
        if self.distributed.is_chief:
            full = counts(self.study)
            state = {k: full[k] for k in ("completed", "failed", "pruned")}
            best = self._best_trial()
            results.write_trials(self.study, self.output_dir, self.requested)
            plots = results.write_plots(self.study, self.output_dir, self.requested, self._validation_images())
            details = results.summary(self.study, self.requested, display_url(self.storage_url),
                                      self._validation_images(), plots)
            if best is not None:
                decision = {"params": best.params, "number": best.number,
                            "hyperparameters": best.user_attrs.get("hyperparameters", {})}
        decision = self.distributed.broadcast_object(decision)
        details = self.distributed.broadcast_object(details)
        if decision is None:
            reached = details.get("largest_reached", {})
            reason = ("no completed trial met the target: " + describe_shortfall(self.requested, reached)
                      if state["completed"] else "no trial completed (see run.log and trials.csv for the errors)")
            return SearchOutcome(None, {}, state, reason, details)
        log.info("best trial #%d: validation accuracy %.4f; rebuilding it", decision["number"],
                 details.get("best_validation_accuracy", float("nan")))
        hparams = self.learner.search_space(optuna.trial.FixedTrial(decision["params"]))
        candidate = self.learner.compress(hparams)
        return SearchOutcome(candidate, decision["hyperparameters"], state, None, details)

    def _front_outcome(self) -> SearchOutcome:
        """--objective pareto: the non-dominated feasible trials, for the runner to finish (hpo/pareto.py)."""
        front: List[Dict[str, Any]] = []
        details: Dict[str, Any] = {}
        state = {"completed": 0, "failed": 0, "pruned": 0}
        if self.distributed.is_chief:
            full = counts(self.study)
            state = {k: full[k] for k in ("completed", "failed", "pruned")}
            results.write_trials(self.study, self.output_dir, self.requested)
            plots = results.write_plots(self.study, self.output_dir, self.requested, self._validation_images())
            details = results.summary(self.study, self.requested, display_url(self.storage_url),
                                      self._validation_images(), plots)
            front, points = pareto.front_decisions(self.study, self.config.pareto)
            details.update(pareto_points=points,
                           pareto_candidates=[member["number"] for member in front if not member.get("reserve")])
        front = self.distributed.broadcast_object(front)
        details = self.distributed.broadcast_object(details)
        if not front:
            reason = ("no completed trial met the target: " + describe_shortfall(self.requested,
                                                                                 details.get("largest_reached", {}))
                      if state["completed"] else "no trial completed (see run.log and trials.csv for the errors)")
            return SearchOutcome(None, {}, state, reason, details)
        log.info("search done: finishing trials %s (the most accurate of each %s band; the fine-tuned models "
                 "decide the front)", details.get("pareto_candidates"), self.cost_key)
        return SearchOutcome(None, {}, state, None, details, front=front)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _format_counts(state: Dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in state.items() if v) or "new"


def run_search(learner: Learner, baseline: tf.keras.Model, config: RunConfig, output_dir: Path, *,
               resume: bool, distributed: SingleProcess, teacher: Optional[tf.keras.Model] = None) -> SearchOutcome:
    """``teacher``: the model searched distillation distils from (default: the baseline)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Search(learner, baseline, config, output_dir, resume=resume, distributed=distributed,
                  teacher=teacher).run()
