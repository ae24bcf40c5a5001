"""Study storage: where trials live, and recovery of trials cut off by a crash.

The default is ``sqlite:///<output-dir>/study.db``, a real file that survives kill -9.
Any Optuna RDB URL works (PostgreSQL for searchers on several machines). Trials carry the
host and process that ran them, so ``--resume`` can tell a trial whose process died
(mark it failed, run its parameters again) from one that another live searcher is running.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import List

import optuna
from optuna.trial import TrialState

from pocketflow.errors import UserError

log = logging.getLogger(__name__)

WORKER_ATTRIBUTE = "worker"
RETRY_OF_ATTRIBUTE = "retry_of"


def default_storage_url(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage (SQLite waits up to a minute for a lock held by another searcher)."""
    try:
        return optuna.storages.RDBStorage(
            url=url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
    except Exception as error:  # noqa: BLE001 - any failure here is an unusable URL
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"cannot open the study storage '{url}' ({reason}); check --storage "
                        f"(e.g. sqlite:///runs/study.db or postgresql://user:password@host:5432/db)") from None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study) -> List[int]:
    """Mark RUNNING trials whose process on this host is gone as FAILED and queue their parameters again.

    Trials of live processes (other searchers sharing the study) are left alone.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTRIBUTE, "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        storage = study._storage  # noqa: SLF001 - Optuna has no public call to fail another process's trial
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted: its process died; "
                                                                    "retried on resume")
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTRIBUTE: trial.number},
                                skip_if_exists=False)
        recovered.append(trial.number)
    if recovered:
        log.info("resume: trials %s were cut off by the interruption; they are marked failed and run again",
                 recovered)
    return recovered


def counts(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    return {
        "completed": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "waiting": sum(t.state == TrialState.WAITING for t in trials),
    }


def load_or_create(storage: optuna.storages.BaseStorage, study_name: str, sampler: optuna.samplers.BaseSampler,
                   resume: bool, shared: bool) -> optuna.Study:
    """Open the study. Without --resume a private study must be new; a shared one may already exist."""
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name in existing and not (resume or shared):
        raise UserError(f"study '{study_name}' already exists in the storage; pass --resume to continue it "
                        f"or choose another --study-name")
    return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, direction="maximize",
                               load_if_exists=True)
