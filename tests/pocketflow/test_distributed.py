"""The distributed context without a launcher: which context is picked, a clear error when
Horovod is missing, the baseline-cache decision taken by rank 0, and the lock that keeps
several searchers of one study from overshooting its budget. The real two-process runs are
in tests/integration/test_horovod.py."""

from __future__ import annotations

import fcntl
import sys
import threading
import time

import numpy as np
import optuna
import pytest
import tensorflow as tf

from hpo.search import Search
from hpo.storage import claim_study, display_url, study_lock
from nets import NETS
from pocketflow import baseline as baseline_module
from pocketflow.baseline import cache_directory, cache_key, train_baseline
from pocketflow.config import DataConfig, HpoConfig, RunConfig, TargetConfig, TrainConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import _LAUNCHER_VARIABLES, SingleProcess, launched_by_horovod, make_context
from pocketflow.errors import UserError
from pocketflow.model_io import save_model
from pocketflow.training import resolve_schedule


@pytest.fixture
def no_launcher(monkeypatch):
    for variable in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_a_plain_process_gets_the_single_process_context(no_launcher):
    context = make_context()
    assert type(context) is SingleProcess and not launched_by_horovod()
    assert (context.rank, context.size, context.is_chief, context.shard()) == (0, 1, True, (0, 1))
    assert context.broadcast_object(None) is None
    assert context.broadcast_object({"a": 1}) == {"a": 1}
    assert context.average(0.25) == 0.25
    variable = tf.Variable(3.0)
    context.average_variables([variable])
    context.broadcast_variables([variable])
    context.barrier()
    assert float(variable.numpy()) == 3.0


@pytest.mark.parametrize("variable", ["HOROVOD_RANK", "OMPI_COMM_WORLD_RANK"])
def test_a_launched_process_without_horovod_gets_an_error_that_says_how_to_install_it(no_launcher, monkeypatch,
                                                                                      variable):
    monkeypatch.setenv(variable, "0")
    monkeypatch.setitem(sys.modules, "horovod", None)  # import horovod... raises ImportError
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)
    with pytest.raises(UserError, match=r"started by horovodrun/mpirun but Horovod is not importable.*"
                                        r"scripts/install\.sh.*horovod==0\.28\.1"):
        make_context()


# ---------------------------------------------------------------------------- baseline cache under Horovod


class Follower(SingleProcess):
    """Rank 1 of 2: receives what rank 0 broadcasts (given in advance), records what it is asked."""

    rank, size, local_rank, is_chief = 1, 2, 1, False

    def __init__(self, chief_objects, chief_weights=None) -> None:
        self.chief_objects = list(chief_objects)
        self.chief_weights = chief_weights
        self.sent = []

    def broadcast_object(self, value, root_rank=0):
        self.sent.append(value)
        return self.chief_objects.pop(0)

    def broadcast_variables(self, variables):
        for variable, value in zip(variables, self.chief_weights, strict=True):
            variable.assign(value)


@pytest.fixture(scope="module")
def digits():
    data_config = DataConfig(name="digits")
    net = NETS.get("digits_cnn")
    schedule = resolve_schedule(net.schedule, TrainConfig(epochs=1), data_config)
    return net, data_config, load_dataset(data_config, 0), schedule


def test_the_chief_hit_the_cache_so_a_follower_receives_its_weights_without_training(digits, monkeypatch):
    net, data_config, dataset, schedule = digits
    tf.keras.utils.set_random_seed(7)
    chief_model = net.make(dataset.input_shape, dataset.num_classes)
    monkeypatch.setattr(baseline_module, "train", lambda *a, **k: pytest.fail("a follower must not train"))
    follower = Follower([True], [v.numpy() for v in chief_model.variables])
    model, source = train_baseline(net, data_config, dataset, schedule, seed=0, distributed=follower, use_cache=True)
    assert follower.sent == [False]  # a follower never decides (here it has no cache file at all)
    assert source.startswith("cache:")
    for got, want in zip(model.get_weights(), chief_model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_chief_missed_the_cache_so_a_follower_trains_with_it_even_when_it_has_a_file(digits, monkeypatch):
    net, data_config, dataset, schedule = digits
    stale = cache_directory() / f"{cache_key(net, data_config, schedule, 0, world_size=2)}.keras"
    save_model(net.make(dataset.input_shape, dataset.num_classes), stale)  # this rank's own (other) cache
    calls = []
    monkeypatch.setattr(baseline_module, "train", lambda *a, **k: calls.append(k["distributed"]))
    follower = Follower([False])
    model, source = train_baseline(net, data_config, dataset, schedule, seed=0, distributed=follower, use_cache=True)
    assert source == "trained" and calls == [follower]  # trained together with rank 0, not loaded
    assert follower.sent == [False]


def test_the_cache_key_tells_world_sizes_apart_and_keeps_single_process_keys(digits):
    net, data_config, _, schedule = digits
    single = cache_key(net, data_config, schedule, 0)
    assert cache_key(net, data_config, schedule, 0, world_size=1) == single
    assert cache_key(net, data_config, schedule, 0, world_size=2) != single
    assert cache_key(net, data_config, schedule, 0, world_size=4) != cache_key(net, data_config, schedule, 0, 2)


# ---------------------------------------------------------------------------- many searchers, one study


def test_the_sqlite_study_lock_is_exclusive_between_holders(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    order = []

    def other_searcher():
        with study_lock(url, "s"):
            order.append("other")

    with study_lock(url, "s"):
        with open(tmp_path / "study.db.lock", "a") as probe:  # another open file: as another process would
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        thread = threading.Thread(target=other_searcher)
        thread.start()
        time.sleep(0.3)
        order.append("holder")
    thread.join(5)
    assert order == ["holder", "other"]


def test_an_in_memory_study_needs_no_lock():
    with study_lock("sqlite:///:memory:", "s"):
        pass


def test_joining_a_study_that_searches_for_something_else_is_an_error(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="shared")
    claim_study(study, {"learner": "channel", "target": {"speedup": 2.5}})
    claim_study(study, {"learner": "channel", "target": {"speedup": 2.5}})  # the same: joins
    with pytest.raises(UserError, match=r"study 'shared' was started with target \{'speedup': 2\.5\}, this run "
                                        r"asks for \{'speedup': 3\.0\}"):
        claim_study(study, {"learner": "channel", "target": {"speedup": 3.0}})


def test_storage_urls_are_shown_without_their_password():
    shown = display_url("postgresql://pocketflow:secret@db:5432/studies")
    assert shown == "postgresql://pocketflow:***@db:5432/studies"
    assert display_url("sqlite:///runs/study.db") == "sqlite:///runs/study.db"


class RatioSearcher:
    """The part of a learner that the study sees (a float to search, a reference point)."""

    def max_trials(self):
        return None

    def reference_params(self):
        return {"ratio": 0.5}

    def search_space(self, trial):
        return {"ratio": trial.suggest_float("ratio", 0.1, 1.0)}

    def searched_targets(self, target):
        return target.requested()


def test_searchers_that_open_and_ask_at_once_never_overshoot_the_budget_or_queue_the_reference_twice(tmp_path):
    """Eight searchers of one SQLite study start together (a barrier), budget 5: exactly 5 trials."""
    budget, searchers = 5, 8
    config = RunConfig(learner="channel", net="digits_cnn", target=TargetConfig(speedup=2.0),
                       hpo=HpoConfig(trials=budget, storage=f"sqlite:///{tmp_path / 'study.db'}",
                                     study_name="race"))
    start = threading.Barrier(searchers)
    errors = []

    def searcher(index: int) -> None:
        try:
            search = Search(RatioSearcher(), None, config, tmp_path / f"searcher{index}", resume=False,
                            distributed=SingleProcess())
            start.wait()
            search._open_study()
            while True:
                trial, decision = search._ask()
                if decision is None:
                    return
                time.sleep(0.02)
                search.study.tell(trial, decision["params"]["ratio"])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=searcher, args=(index,)) for index in range(searchers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    trials = optuna.load_study(study_name="race", storage=config.hpo.storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * budget
    assert sum(bool(t.user_attrs.get("reference")) for t in trials) == 1
    assert len({t.params["ratio"] for t in trials}) == budget
