"""configs/: every recipe loads into a valid run configuration, and the template lists every key
with its default, regenerated from the config classes (it cannot drift)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from learners import LEARNERS
from pocketflow.config import RunConfig, build_run_config, load_yaml_file
from pocketflow.config_template import learner_configs, render

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_file_is_a_valid_run(path):
    config = build_run_config(load_yaml_file(str(path)), LEARNERS.names(), str(path))
    for name, section in config.learners.items():
        LEARNERS.get(name).parse_options(section, str(path))
    if path.name != "template.yaml":
        LEARNERS.get(config.learner).check_target(config.target)
        assert path.read_text().startswith("#")  # says what it is for


@pytest.mark.parametrize("learner, target", [("full-prec", []), ("channel+uniform", ["--target-speedup", "2"]),
                                             ("weight-sparse+uniform", ["--target-sparsity", "0.8"])])
def test_the_template_runs_as_it_is_for_any_learner(learner, target, tmp_path, capsys):
    """Every section at its default, whichever learner is chosen: nothing 'would be ignored' (a chain's
    section parsed to its defaults too; it crashed with a traceback before)."""
    from pocketflow.cli import main

    assert main(["--config", str(CONFIGS / "template.yaml"), "--learner", learner, *target, "--dry-run",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert f"learner:    {learner}" in capsys.readouterr().out


def test_the_template_is_generated_from_the_config_classes():
    assert (CONFIGS / "template.yaml").read_text() == render(learner_configs()), \
        "run: python scripts/config_template.py"


def test_the_template_holds_every_key_at_its_default():
    data = yaml.safe_load((CONFIGS / "template.yaml").read_text())
    config = build_run_config(data, LEARNERS.names(), "template")
    assert dataclasses.replace(config, learners={}) == RunConfig()  # every run key, at its default
    assert set(config.learners) == set(LEARNERS.names())
    for name in LEARNERS.names():
        options = LEARNERS.get(name).parse_options(data[name] or {}, "template")
        assert options == LEARNERS.get(name).parse_options({}, "no keys")  # a chain's options add its stages'
    assert "# uniform: every kernel at the target bits" in (CONFIGS / "template.yaml").read_text()  # comments carried
