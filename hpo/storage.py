"""Study storage: where trials live, and recovery of trials cut off by a crash.

The default is ``sqlite:///<output-dir>/study.db``, a real file that survives kill -9.
Any Optuna RDB URL works (PostgreSQL for searchers on several machines). Trials carry the
host and process that ran them, so ``--resume`` can tell a trial whose process died
(mark it failed, run its parameters again) from one that another live searcher is running.

Several searchers may share one study (same ``--storage`` and ``--study-name``). Their
check-then-act steps (create the study, queue the reference trial, "is the budget reached?
then ask for a trial") run under ``study_lock``, so two searchers never both take the last
trial of the budget or both queue the reference trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import optuna
import sqlalchemy
from optuna.trial import TrialState

from pocketflow.errors import UserError

log = logging.getLogger(__name__)

WORKER_ATTRIBUTE = "worker"
RETRY_OF_ATTRIBUTE = "retry_of"
# True from the ask until every parameter is suggested: a trial cut off in between has partial
# params, which are not queued again (the resumed search draws the same ones: samplers are
# seeded by the trial's index, and cut-off trials do not count).
PARAMS_PENDING_ATTRIBUTE = "params_pending"


def study_name(config: Any) -> str:
    """The study a run searches in: ``--study-name``, else learner and subject (and ``-pareto`` for a
    two-objective study, which cannot share a study with a one-objective search)."""
    hpo = config.hpo
    if hpo.study_name:
        return hpo.study_name
    subject = config.net or Path(config.model).stem
    return f"{config.learner}-{subject}" + ("-pareto" if hpo.objective == "pareto" else "")


def default_storage_url(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


def display_url(url: str) -> str:
    """The storage URL without its password, for logs and reports."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy understands: shown as given
        return url


def _storage_error(url: str, error: BaseException) -> UserError:
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    if isinstance(error, ImportError):
        reason += "; install the database driver: pip install 'psycopg[binary]' for PostgreSQL, pymysql for MySQL"
    return UserError(f"cannot open the study storage '{display_url(url)}' ({reason}); check --storage "
                     f"(e.g. sqlite:///runs/study.db or postgresql://user:password@host:5432/db)")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage (SQLite waits up to a minute for a lock held by another searcher)."""
    try:
        return optuna.storages.RDBStorage(
            url=url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
    except Exception as error:  # noqa: BLE001 - any failure here is an unusable URL
        raise _storage_error(url, error) from None


_LOCK_ENGINES: Dict[str, Any] = {}
_UNLOCKED_WARNED: set = set()


def _lock_key(study_name: str) -> int:
    """A signed 64-bit number for PostgreSQL's advisory locks, stable across processes."""
    digest = hashlib.sha256(f"pocketflow-study:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_engine(url: str) -> Any:
    if url not in _LOCK_ENGINES:
        _LOCK_ENGINES[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    return _LOCK_ENGINES[url]


@contextlib.contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    try:
        database = sqlalchemy.engine.make_url(url).database
    except Exception:  # noqa: BLE001 - a malformed URL fails in open_storage with the fix
        database = None
    if not database or database == ":memory:" or not Path(database).parent.is_dir():
        yield  # an in-memory study has one process; a missing folder fails in open_storage
        return
    with open(f"{database}.lock", "a") as handle:  # one machine: an flock beside the database
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _server_lock(url: str, study_name: str, dialect: str) -> Iterator[None]:
    if dialect == "postgresql":
        take, release = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
        parameters: Dict[str, Any] = {"key": _lock_key(study_name)}
    else:  # mysql / mariadb
        take, release = "SELECT GET_LOCK(:key, 3600)", "SELECT RELEASE_LOCK(:key)"
        parameters = {"key": f"pocketflow:{study_name}"[:64]}
    try:
        connection = _lock_engine(url).connect()
        connection.execute(sqlalchemy.text(take), parameters)
    except Exception as error:  # noqa: BLE001 - an unreachable server or a bad URL
        raise _storage_error(url, error) from None
    try:
        yield
    finally:
        try:
            connection.execute(sqlalchemy.text(release), parameters)
        finally:
            connection.close()


def study_lock(url: str, study_name: str) -> contextlib.AbstractContextManager:
    """A lock shared by every searcher of ``study_name`` in ``url``, held around check-then-act steps.

    SQLite: an flock on ``<database>.lock`` (searchers on one machine); PostgreSQL: an
    advisory lock; MySQL: GET_LOCK. Other back ends get no lock: each extra searcher may then
    start one trial more than the budget.
    """
    try:
        dialect = sqlalchemy.engine.make_url(url).get_backend_name()
    except Exception as error:  # noqa: BLE001 - a malformed URL: say so before warning about its "dialect"
        raise _storage_error(url, error) from None
    if dialect == "sqlite":
        return _sqlite_lock(url)
    if dialect in ("postgresql", "mysql", "mariadb"):
        return _server_lock(url, study_name, "postgresql" if dialect == "postgresql" else "mysql")
    if dialect not in _UNLOCKED_WARNED:
        _UNLOCKED_WARNED.add(dialect)
        log.warning("storage '%s': no lock between searchers for this database; each extra searcher may run "
                    "one trial more than --trials", dialect)
    return contextlib.nullcontext()


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


def is_interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial cut off by Ctrl-C or by its process dying (failed, and queued again to be rerun)."""
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get("fail_reason", "")).startswith("interrupted")


def retry_params(trial: optuna.trial.FrozenTrial) -> Dict[str, Any]:
    """The parameters to queue again for a cut-off trial: all of them; or, if it was cut off while
    they were being suggested, only those that were fixed when it was queued (the reference trial)."""
    if trial.user_attrs.get(PARAMS_PENDING_ATTRIBUTE):
        return dict(trial.system_attrs.get("fixed_params") or {})
    return dict(trial.params)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a cut-off trial again (it keeps its 'reference' mark, and says which trial it retries)."""
    params = retry_params(trial)
    if not params:
        return
    attributes: Dict[str, Any] = {RETRY_OF_ATTRIBUTE: trial.number}
    if trial.user_attrs.get("reference"):
        attributes["reference"] = True
    study.enqueue_trial(params, user_attrs=attributes, skip_if_exists=False)


def recover_dead_trials(study: optuna.Study) -> List[int]:
    """Mark RUNNING trials whose process on this host is gone as FAILED and queue their parameters again.

    Trials of live processes (other searchers sharing the study) are left alone. Called under the
    study's lock, like the ask that creates a trial and names its worker, so a RUNNING trial
    without a worker is one whose process died between the two (kill -9 at that instant).
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTRIBUTE)
        worker_host, _, pid = (worker or "").rpartition(":")
        if worker is not None and (worker_host != host or not pid.isdigit() or _process_alive(int(pid))):
            continue
        storage = study._storage  # noqa: SLF001 - Optuna has no public call to fail another process's trial
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted: its process died; "
                                                                    "retried on resume")
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        requeue(study, trial)
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
                   resume: bool, shared: bool, directions: Optional[List[str]] = None) -> optuna.Study:
    """Open the study. Without --resume a private study must be new; a shared one may already exist."""
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name in existing and not (resume or shared):
        raise UserError(f"study '{study_name}' already exists in the storage; pass --resume to continue it "
                        f"or choose another --study-name")
    if directions:  # several objectives (--objective pareto)
        return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, directions=directions,
                                   load_if_exists=True)
    return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, direction="maximize",
                               load_if_exists=True)


def claim_study(study: optuna.Study, attributes: Dict[str, Any]) -> None:
    """Record what this study searches for; a searcher that joins it must search for the same thing."""
    for key, value in attributes.items():
        wanted = json.loads(json.dumps(value))
        existing: Optional[Any] = study.user_attrs.get(key)
        if existing is None:
            study.set_user_attr(key, wanted)
        elif existing != wanted:
            raise UserError(f"study '{study.study_name}' was started with {key} {existing}, this run asks for "
                            f"{wanted}; use the same {key}, or another --study-name")
