"""Typed configuration: YAML, overrides, validation messages that name the key, the value and the fix."""

from __future__ import annotations

import pytest
import yaml

from pocketflow.config import (RunConfig, apply_override, build_run_config, load_yaml_file, parse_override)
from pocketflow.errors import ConfigError

LEARNERS = ["full-prec", "channel"]


def build(data):
    return build_run_config(data, LEARNERS, "'test.yaml'")


def test_defaults_and_sections():
    config = build({"learner": "channel", "data": {"name": "digits", "mean": [0.5], "std": [0.25]},
                    "train": {"epochs": 3}, "target": {"speedup": 2.5}, "channel": {"criterion": "l1"}})
    assert config.data.mean == (0.5,) and config.train.epochs == 3.0
    assert config.target.requested() == {"speedup": 2.5}
    assert config.learner_section("channel") == {"criterion": "l1"}
    assert config.hpo.sampler == "tpe" and config.export.quantize == "none"


@pytest.mark.parametrize("data, message", [
    ({"learnr": "channel"}, "unknown key 'learnr' in 'test.yaml'"),
    ({"train": {"epoch": 3}}, "unknown key 'train.epoch'"),
    ({"train": {"epochs": "ten"}}, "train.epochs = 'ten' in 'test.yaml' must be a number"),
    ({"hpo": {"trials": 2.5}}, "hpo.trials = 2.5 in 'test.yaml' must be a whole number"),
    ({"target": {"speedup": 0.5}}, "target.speedup = 0.5 is out of range"),
    ({"target": {"sparsity": 1.2}}, "target.sparsity = 1.2 is out of range"),
    ({"target": {"bits": 0}}, "target.bits = 0.0 is out of range"),
    ({"hpo": {"sampler": "grid"}}, "choose one of: tpe, random, gp, cmaes"),
    ({"data": {"std": [0.1, 0.0, 0.2]}}, "data.std"),
    ({"data": "cifar10"}, "'data' in 'test.yaml' must be a section"),
    ({"export": {"tflite": "yes"}}, "must be true or false"),
    ({"data": {"mean": [0.5, 0.5], "std": [0.5]}}, "as many entries as data.mean"),
])
def test_bad_values_name_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=None) as caught:
        build(data)
    assert message in str(caught.value)


def test_yaml_round_trip(tmp_path):
    config = build({"learner": "channel", "net": "resnet20", "seed": 3, "data": {"name": "cifar10", "dir": "/d"},
                    "target": {"speedup": 2.0}, "channel": {"criterion": "lasso"}})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    again = build(load_yaml_file(str(path)))
    assert again == config


def test_overrides_parse_yaml_values():
    data = {"train": {"epochs": 1}}
    for text in ["train.epochs=5", "data.mean=[0.485,0.456,0.406]", "hpo.storage=null", "channel.criterion=l1"]:
        apply_override(data, *parse_override(text))
    config = build(data)
    assert config.train.epochs == 5 and config.data.mean == (0.485, 0.456, 0.406)
    assert config.hpo.storage is None and config.learner_section("channel") == {"criterion": "l1"}


def test_an_exponent_without_a_dot_is_a_number_in_set_and_in_config_files(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string, and the run refused it as "must be a number"; a quoted
    value stays a string, and a word that only starts like a number is not read as one."""
    data = {}
    for text in ["train.weight_decay=1e-4", "train.learning_rate=2E-2", "hpo.study_name='1e3'"]:
        apply_override(data, *parse_override(text))
    config = build(data)
    assert config.train.weight_decay == pytest.approx(1e-4) and config.train.learning_rate == pytest.approx(0.02)
    assert data["hpo"]["study_name"] == "1e3"
    assert parse_override("a.b=12e3x")[1] == "12e3x" and parse_override("a.b=[1e-4, 5]")[1] == [1e-4, 5]
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  weight_decay: 5e-5\n")
    assert build(load_yaml_file(str(path))).train.weight_decay == pytest.approx(5e-5)


@pytest.mark.parametrize("text", ["train.epochs", "=3", "a.b=[1,"])
def test_bad_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_bad_yaml_file_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner: channel\ntrain: {epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"'.*bad.yaml' is not valid YAML at line \d+"):
        load_yaml_file(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml_file(str(tmp_path / "list.yaml"))


def test_shipped_configs_are_valid():
    from pathlib import Path

    from learners import LEARNERS

    files = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert files, "configs/ ships at least one YAML file"
    for file in files:
        config = build_run_config(load_yaml_file(str(file)), LEARNERS.names(), str(file))
        assert isinstance(config, RunConfig)
        LEARNERS.get(config.learner).parse_options(config.learner_section(config.learner), str(file))
        yaml.safe_load(config.to_yaml())


def test_the_target_is_rechecked_on_what_ships():
    """The runner's final check reads the shipped figures (file bytes, saved MACs, written zeros and
    bits); a kind the result does not report is left unchecked rather than failed."""
    from pocketflow.runner import check_shipped

    best = {"speedup": 2.4, "compression": 3.1, "average_bits": 4.2, "bits": 4.0}
    check, missed = check_shipped({"speedup": 2.5}, best)
    assert check == {"speedup": {"target": 2.5, "shipped": 2.4, "met": False}}
    assert missed == "the shipped result misses the target: speedup 2.5 requested, the shipped result reaches 2.4"
    check, missed = check_shipped({"compression": 3.0, "bits": 4.5}, best)
    assert missed is None and check["compression"]["met"] and check["bits"] == {"target": 4.5, "shipped": 4.2, "met": True}
    check, missed = check_shipped({"bits": 4.0}, best)  # average bits, not the nominal ones, are what ships
    assert check["bits"]["met"] is False and "bits 4 requested" in missed
    check, missed = check_shipped({"sparsity": 0.5}, best)
    assert check["sparsity"]["met"] is None and missed is None
