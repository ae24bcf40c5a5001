"""Shared test fixtures: fixed seeds, quiet TensorFlow, tiny models, paths to ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT_FOR_IMPORTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT_FOR_IMPORTS))
import pocketflow  # noqa: E402,F401  (picks the process's Keras before any test touches tf.keras)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


# Seconds per file (setup, call and teardown summed from --durations=0) in a clean-clone run on a 2-core
# AVX2 machine (2026-12-06, commit e2adfc9, 13.8 minutes). With two workers taking whole files, the longest
# go first so that no worker is left alone with a long file at the end (pytest-xdist's own order, by number
# of tests, left the end-to-end files for last: 34.1 minutes, against 29.6 in this order, on 2026-12-05).
LONGEST_FILES = (
    "tests/learners/test_chain_targets.py",  # 248
    "tests/integration/test_horovod.py",  # 146
    "tests/reliability/test_interrupt_and_resume.py",  # 133
    "tests/learners/test_lifecycle.py",  # 96
    "tests/learners/test_distillation.py",  # 93
    "tests/integration/test_channel_search.py",  # 83
    "tests/learners/test_nonuniform_quantization.py",  # 73
    "tests/learners/test_weight_sparsification.py",  # 73
    "tests/learners/test_chain.py",  # 69
    "tests/integration/test_cli.py",  # 61
    "tests/learners/test_product_quantization.py",  # 57
    "tests/hpo/test_pareto.py",  # 52
    "tests/nets/test_nets.py",  # 49
    "tests/learners/test_uniform_quantization.py",  # 47
    "tests/learners/test_channel_learner.py",  # 41
    "tests/learners/test_mixed_precision.py",  # 35
    "tests/learners/test_channel_on_builtin_nets.py",  # 33
)


def pytest_collection_modifyitems(session, config, items):
    """The longest files first, then the rest in their order, and files with an `exclusive` test last:
    by then the other worker is in short files, so the wait for the cores is seconds, not a whole
    end-to-end run (first in line, one such test waited 113 s), and the default baseline is warm.
    Every worker sorts the same collection the same way, as pytest-xdist requires."""
    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    exclusive_files = {file_of(item) for item in items if item.get_closest_marker("exclusive")}
    order = {name: rank for rank, name in enumerate(LONGEST_FILES)}

    def rank(indexed):
        position, item = indexed
        name = file_of(item)
        return (name in exclusive_files, order.get(name, len(order)), position)

    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]


def _run_directory(tmp_path_factory) -> Path:
    """The temporary directory of this whole pytest run, which every xdist worker sees."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's basetemp is popen-gwN inside the run's own directory
    return root


def cpu_share_lock_path(config) -> Path:
    """The lock file of the suite's CPU share, in the run's own temporary directory (every xdist worker
    sees it; pytest removes it with the run's other old directories)."""
    return _run_directory(config._tmp_path_factory) / "cpu-share.lock"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Tests marked `exclusive` time things (a latency ratio, a width-cost curve against real files), and
    the suite's other worker sharing the 2 cores swings one sitting's timings past their bands (CI, an
    AVX2 machine: a curve measured with width 24 as slow as 32, predictions 30% off). A file lock: every
    test holds it shared, an exclusive test holds it alone, so it waits for the other worker's test in
    progress to end and that worker waits for it. Held over the test's whole protocol, so a module's
    fixtures (reference runs) set up or torn down with a test count as that test's work."""
    import fcntl

    exclusive = item.get_closest_marker("exclusive") is not None
    with open(cpu_share_lock_path(item.config), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@pytest.fixture(scope="session")
def _default_baseline_file() -> str:
    """The cache file name of the default job's baseline (the digits CNN, 30 epochs, seed 0), as the runner
    resolves it on this machine (the key holds the schedule, whose precision depends on the CPU)."""
    from learners import LEARNERS
    from nets import NETS
    from pocketflow.baseline import cache_key
    from pocketflow.config import build_run_config
    from pocketflow.runner import Runner

    runner = Runner(build_run_config({"learner": "channel"}, LEARNERS.names()))
    runner._resolve()  # decides from the configuration alone: nothing read or written
    return f"{cache_key(NETS.get(runner.config.net), runner.config.data, runner.schedule, runner.config.seed)}.keras"


@pytest.fixture(autouse=True)
def _seeds(tmp_path_factory, monkeypatch, _default_baseline_file):
    """Fixed seeds, and a baseline cache of the test's own. About 20 end-to-end tests run the default job
    (or a variant with the same baseline: 19 per-test caches held it after a clean-clone run), and each
    would train the digits baseline again (35-45 s on a 2-core AVX2 machine): the first test that
    trains it leaves a copy for the whole run (both workers), and later tests start with that one file in
    their cache.
    Only that key is shared; every other cached file (other baselines, width-cost curves) stays the
    test's own."""
    import shutil

    import tensorflow as tf

    tf.keras.utils.set_random_seed(1234)
    # Beside the test's tmp_path, not in it: tests list what their tmp_path holds.
    cache = tmp_path_factory.mktemp("cache")
    warm = _run_directory(tmp_path_factory) / "warm-baseline" / _default_baseline_file
    if warm.exists():
        shutil.copyfile(warm, cache / _default_baseline_file)
    monkeypatch.setenv("POCKETFLOW_CACHE_DIR", str(cache))
    yield
    trained = cache / _default_baseline_file
    if trained.exists() and not warm.exists():
        warm.parent.mkdir(parents=True, exist_ok=True)
        partial = warm.with_suffix(f".{os.getpid()}.partial")  # both workers may write it at once
        shutil.copyfile(trained, partial)
        os.replace(partial, warm)
    tf.keras.backend.clear_session()


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with a message when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
