"""Ctrl-C that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. Inside a
garbage-collection callback (SQLAlchemy registers weakref callbacks, and Optuna's storage calls run
them) the exception is printed as "Exception ignored" and dropped, and the run carried on to the end
(seen once in CI's Ctrl-C test). So while a run is on, SIGINT is also recorded, and the search checks
the record before each trial. The record is the process's, like the signal itself.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_received = threading.Event()


def _handler(signum, frame) -> None:  # noqa: ANN001 - the signal module's signature
    _received.set()
    raise KeyboardInterrupt


@contextmanager
def recorded() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt as usual and is remembered for ``check``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received.clear()


def check() -> None:
    """Raise the KeyboardInterrupt a Ctrl-C should have raised, if it was swallowed on the way."""
    if _received.is_set():
        raise KeyboardInterrupt
