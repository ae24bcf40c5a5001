"""The suite's CPU share (tests/conftest.py): an `exclusive` test holds the lock alone, others share it."""

from __future__ import annotations

import fcntl

import pytest

from tests.conftest import cpu_share_lock_path


def _can_take(path, kind) -> bool:
    """Whether another open of the lock file (as another worker would) gets `kind` now, without waiting."""
    with open(path, "a") as other:
        try:
            fcntl.flock(other, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(other, fcntl.LOCK_UN)
        return True


def test_an_ordinary_test_shares_the_cores_but_keeps_an_exclusive_one_waiting(pytestconfig):
    assert _can_take(cpu_share_lock_path(pytestconfig), fcntl.LOCK_SH)
    assert not _can_take(cpu_share_lock_path(pytestconfig), fcntl.LOCK_EX)


@pytest.mark.exclusive
def test_an_exclusive_test_keeps_every_other_test_waiting(pytestconfig):
    assert not _can_take(cpu_share_lock_path(pytestconfig), fcntl.LOCK_SH)
