"""The run directory: claimed for one run at a time, and left clean when a run fails to start.

Kept apart from the loop (``pocketflow/runner.py``) because what may be written, removed or
resumed there is a contract of its own: a live run locks the directory; a finished or killed run
leaves ``config.yaml`` so only ``--resume`` continues it; a start that fails on bad input removes
what it wrote (``run.log`` stays, for the record) so the corrected command can run there again.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
from pathlib import Path
from typing import IO, Optional, Set

from pocketflow.errors import UserError

log = logging.getLogger(__name__)


def lock_directory(directory: Path) -> IO[str]:
    """Hold an exclusive lock on ``directory/.lock`` for the life of this process.

    The kernel drops the lock when the process dies (kill -9 included), so a dead run never
    blocks ``--resume``; a live one makes a second run on the same directory refuse.
    """
    import fcntl

    handle = open(directory / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"--output-dir '{directory}' is in use by a running job ({owner}); wait for it to "
                        f"finish, or choose another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{platform.node()}:{os.getpid()}\n")
    handle.flush()
    return handle


class RunDirectory:
    """The chief's hold on ``--output-dir`` for one run: lock, ``run.log``, and the failed-start clean-up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held_a_run = False  # it held a run before this one started (a resume): never clean it up
        self.claimed = False  # only a claimed directory is ever cleaned up or written to
        self._existing: Set[str] = set()
        self._lock: Optional[IO[str]] = None
        self._log_handler: Optional[logging.Handler] = None

    def claim(self, resume: bool) -> None:
        """Check the directory is writable and free, lock it; a finished run there needs ``resume``."""
        directory = self.path
        if directory.exists() and not directory.is_dir():
            raise UserError(f"--output-dir '{directory}' is a file; pass a directory path")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UserError(f"cannot write to --output-dir '{directory}' ({error.strerror or error}); "
                            f"choose a writable directory") from None
        self._lock = lock_directory(directory)  # a live run there: refuse, whatever the directory holds
        # A run leaves config.yaml from its start (a failed start removes it again: discard_failed_start).
        finished = (directory / "config.yaml").exists() or (directory / "report.json").exists()
        if finished and not resume:
            raise UserError(f"--output-dir '{directory}' already holds a run; pass --resume to continue it, "
                            f"or choose another --output-dir")
        if finished:  # resuming our run: a killed run's temporaries (write_atomic, save_model) go
            for stale in [*directory.glob(".*.tmp"), *directory.glob(".saving-*")]:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self._existing = set(os.listdir(directory))  # what this run must never remove
        self.held_a_run = finished
        self.claimed = True

    def open_log(self) -> None:
        """Everything logged from now on goes to ``run.log`` too."""
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self._log_handler = handler

    def discard_failed_start(self) -> None:
        """Bad input (or a diverging baseline) before any trial finished: remove what this run wrote
        (config.yaml, baseline files, an empty study), so the directory does not look like it holds a
        run and the corrected command can be run there again. run.log stays, for the record."""
        if not self.claimed or self.held_a_run:  # another run's directory, or a resumed run's files: kept
            return
        try:
            created = set(os.listdir(self.path)) - self._existing
        except OSError:
            return
        if created & {"trials.csv", "report.json"}:  # finished trials: --resume continues from them
            return
        for name in created - {"run.log", ".lock"}:
            path = self.path / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as error:
                log.warning("could not remove %s after the failed start (%s)", path, error)

    def release(self) -> None:
        """Close run.log and give the lock back (the process may go on: tests, notebooks)."""
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
