"""Sampler registry: --sampler name -> Optuna sampler factory.

Samplers are re-created for every trial with a seed drawn from (run seed, the trial's index)
(trials cut off by an interruption and queued trials not counted: ``Search._trial_index``), so a
search that is interrupted and resumed proposes the same parameters as one that ran straight
through (given the same finished trials). ``trial_seed`` mixes the two rather than adding them:
with ``seed + index``, run seed 1 would repeat run seed 0's proposals one trial later, and a
spread over seeds would measure far less than it claims.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import optuna

from pocketflow.errors import ConfigError
from pocketflow.registry import Registry

SamplerFactory = Callable[[int], optuna.samplers.BaseSampler]

SAMPLERS: Registry[SamplerFactory] = Registry("sampler", flag="--sampler")


def trial_seed(run_seed: int, trial_index: int) -> int:
    """An independent 32-bit sampler seed for each (run seed, trial index) pair."""
    return int(np.random.SeedSequence([run_seed, trial_index]).generate_state(1)[0])


@SAMPLERS.register("tpe")
def tpe(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                      n_startup_trials=5)


@SAMPLERS.register("random")
def random(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("gp")
def gaussian_process(seed: int) -> optuna.samplers.BaseSampler:
    try:
        import torch  # noqa: F401  (Optuna's GP sampler runs on PyTorch)
    except ImportError:
        raise ConfigError("--sampler gp needs PyTorch (pip install torch==2.13.0, CPU build); "
                          "or use --sampler tpe") from None
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)


@SAMPLERS.register("cmaes")
def cma_es(seed: int) -> optuna.samplers.BaseSampler:
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise ConfigError("--sampler cmaes needs the cmaes package (pip install cmaes); "
                          "or use --sampler tpe") from None
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=3, warn_independent_sampling=False)


NSGA2_POPULATION = 8  # small generations: our budgets are tens of trials


@SAMPLERS.register("nsga2")
def nsga2(seed: int) -> optuna.samplers.BaseSampler:
    """NSGA-II, for --objective pareto (multi-objective TPE, the default, works there too)."""
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Constraint-aware samplers (TPE, GP) read the constraints each trial sets with set_constraint."""
    return SAMPLERS.get(name)(seed)
