"""The width cost curve: its arithmetic, its cache, and whether it predicts what a file measures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from learners.channel_pruning.graph import analyze
from pocketflow import width_cost
from pocketflow.export import compare_latency, convert, write_atomic
from pocketflow.width_cost import WidthCost


def test_a_width_costs_what_the_next_probe_up_costs_and_whole_periods_add_up():
    cost = WidthCost((4, 8, 16), (1.0, 1.0, 2.0))
    assert cost(0) == 0.0
    assert cost(3) == cost(4) == cost(8) == 8.0  # half the widest probe's time: 8 of its 16 channels
    assert cost(9) == cost(16) == 16.0
    assert cost(20) == 16.0 + 8.0 and cost(32) == 32.0
    assert width_cost.linear()(44) == 44.0 and width_cost.linear()(200) == 200.0


def test_the_curve_is_measured_once_per_machine_and_read_back(tmp_path, monkeypatch):
    calls = []

    def fake_measure(**kwargs):
        calls.append(kwargs)
        return WidthCost((4, 8), (1.0, 3.0), "fake runtime")

    monkeypatch.setattr(width_cost, "measure", fake_measure)
    first = width_cost.cached(tmp_path)
    second = width_cost.cached(tmp_path)
    assert first == second and len(calls) == 1
    stored = list((tmp_path / "width_cost").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["milliseconds"] == [1.0, 3.0]
    assert width_cost.machine_key(2) != width_cost.machine_key(1)  # another thread count, another curve
    stored[0].write_text("{not json")  # a damaged cache is measured again, not trusted
    assert width_cost.cached(tmp_path) == first and len(calls) == 2


def test_a_run_plans_with_the_curve_its_directory_recorded(tmp_path, monkeypatch):
    """--resume must project every trial as the first run did: the run directory's curve wins over the
    cache, and a new run records the cache's curve there."""
    recorded = WidthCost((4, 8), (1.0, 2.0), "recorded")
    width_cost.save(recorded, tmp_path / "run" / width_cost.RUN_FILE)

    def no_cache(*args, **kwargs):
        raise AssertionError("the recorded curve should have been used")

    monkeypatch.setattr(width_cost, "cached", no_cache)
    assert width_cost.for_run(tmp_path / "run", tmp_path / "cache") == recorded
    fresh = WidthCost((4, 8), (1.0, 1.5), "this machine")
    monkeypatch.setattr(width_cost, "cached", lambda *args, **kwargs: fresh)
    assert width_cost.for_run(tmp_path / "new-run", tmp_path / "cache") == fresh
    assert width_cost.load(tmp_path / "new-run" / width_cost.RUN_FILE) == fresh
    assert width_cost.for_run(None, tmp_path / "cache") == fresh  # no run directory: nothing recorded


def test_the_linear_curve_gives_the_mac_count():
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(24, 3, padding="same", activation="relu")(inputs)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = tf.keras.layers.Conv2D(40, 1)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    analysis = analyze(tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x)))
    for counts in ({}, {name: max(1, group.channels // 3) for name, group in analysis.groups.items()}):
        assert analysis.latency_for(counts, width_cost.linear()) == analysis.macs_for(counts)
    # the depthwise layer is not tiled: with a curve where every width costs a whole probe, only the
    # convolutions and the dense layer grow
    flat = WidthCost((64,), (1.0,))
    assert analysis.latency_for({}, flat) > analysis.macs_for({})


def _stack(width: int) -> tf.keras.Model:
    inputs = tf.keras.Input((16, 16, 32))
    x = inputs
    for _ in range(3):
        x = tf.keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    return tf.keras.Model(inputs, x)


@pytest.mark.exclusive
def test_the_prediction_follows_the_files_this_runtime_measures(tmp_path):
    """The curve measured here predicts, within 20%, the latency ratio of real files whose widths
    fall on and between tiles, on whatever CPU runs this test. It runs while no other test does
    (`exclusive`): with the suite's other worker on the cores, all three sittings of a CI run missed
    (an AVX2 machine: width 24 timed as slow as 32, 2.63x measured against 3.83x predicted). A
    background process can still swing one sitting, so the curve and the files are measured up to
    three times; one sitting must fit within 20% at every width."""
    full = _stack(64)
    analysis = analyze(full)
    paths = []
    for width in (64, 40, 32, 24):
        path = tmp_path / f"w{width}.tflite"
        write_atomic(path, convert(_stack(width), "float"))
        paths.append(path)
    misses = []
    for _ in range(3):
        cost = width_cost.measure(widths=(8, 16, 24, 32, 40, 48, 56, 64), rounds=2, min_seconds=0.1)
        assert all(ms > 0 for ms in cost.milliseconds)
        predicted = {}
        for width in (64, 40, 32, 24):
            counts = {name: width for name, g in analysis.groups.items() if g.channels == 64}
            predicted[width] = analysis.latency_for({}, cost) / analysis.latency_for(counts, cost)
        assert np.isfinite(list(predicted.values())).all()
        measured = compare_latency(paths, rounds=3, min_seconds=0.2)
        base = measured[str(paths[0])]
        ratios = {width: base / measured[str(path)] for width, path in zip((64, 40, 32, 24), paths)}
        off = {width: (ratios[width], predicted[width]) for width in ratios
               if ratios[width] != pytest.approx(predicted[width], rel=0.2)}
        if not off:
            return
        misses.append((off, cost.as_dict()))
    pytest.fail(f"three sittings missed the 20% band (width: (measured, predicted)): {misses}")
