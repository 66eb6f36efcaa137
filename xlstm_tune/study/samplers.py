"""Optuna samplers by name, with the study's fidelity constraint wired in where the sampler supports it.

    tpe     TPESampler (default): multivariate, grouped (conditional knobs), constraint-aware
    ga      NSGAIISampler (the seed system's `--mode ga`): population-based, constraint-aware
    random  RandomSampler (the seed system's `--mode random`)
    grid    GridSampler over every searched knob value (exhaustive; stops when the grid is done)
    gp      GPSampler: Gaussian-process Bayesian optimisation, constraint-aware
    cmaes   CmaEsSampler: one objective; categorical knobs fall back to random sampling; needs `cmaes`

The constraint is `rel_err - rel_tol` of the trial's fidelity check, set on the trial with Optuna 5's
`Trial.set_constraint("fidelity", value)` (> 0: infeasible) before it is told; TPE, NSGA-II, GP and CMA-ES
read it from there. Samplers without constraint support (random, grid) still never make an infeasible
trial best: choosing the best is the study's job, not the sampler's.
"""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping
from typing import Any

from xlstm_tune.errors import UserError

CONSTRAINT_NAME = "fidelity"


def set_constraint(trial: Any, value: float) -> None:
    """Record the fidelity constraint on a running trial (once; <= 0 is feasible)."""
    if CONSTRAINT_NAME in trial.constraints:
        return
    trial.set_constraint(CONSTRAINT_NAME, float(value))


def check_sampler(name: str, n_objectives: int) -> None:
    """Whether `name` can run this study here; UserError naming the fix otherwise."""
    if name == "cmaes":
        if n_objectives > 1:
            raise UserError("the cmaes sampler optimises one objective: set one objective "
                            "(e.g. --objective prefill_tok_s) or use tpe, ga or gp")
        if importlib.util.find_spec("cmaes") is None:
            raise UserError("the cmaes sampler needs the `cmaes` package: pip install cmaes (or use tpe, gp, ga)")
    if name == "gp" and importlib.util.find_spec("scipy") is None:
        raise UserError("the gp sampler needs scipy: pip install scipy (or use tpe)")


def default_startup_trials(name: str, n_trials: int) -> int:
    """Trials a model-based sampler draws at random before it models (the queued first trials count too).

    TPE: 4 up to 49-trial studies, then a tenth, at most 10. Replayed on the recorded grids (docs/STUDY.md
    §10, "TPE's start-up phase"), 4 reached the target in the least time on three of four, and has the
    lowest mean time relative to random search over all four (on the fourth, 4, 6 and 10 are within the
    seeds' spread); the default and the shipped configuration, measured first, already give the model
    its first points. GP and CMA-ES keep a third of the study (4 to 10): GP got worse with fewer."""
    if name == "tpe":
        return min(10, max(4, n_trials // 10))
    return min(10, max(4, n_trials // 3))


def make_sampler(name: str, *, seed: int, n_objectives: int, n_trials: int, grid: Mapping[str, list[Any]] | None = None,
                 options: Mapping[str, Any] | None = None) -> Any:
    """A configured Optuna sampler (see the module docstring)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    check_sampler(name, n_objectives)
    options = dict(options or {})
    n_startup = options.get("n_startup_trials")
    if n_startup is None:
        n_startup = default_startup_trials(name, n_trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=n_startup)
        if name == "ga":
            population = options.get("population_size") or max(4, min(20, n_trials // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            if not grid:
                raise UserError("the grid sampler needs at least one searched knob in [space]")
            return optuna.samplers.GridSampler(dict(grid), seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup,
                                             independent_sampler=optuna.samplers.RandomSampler(seed=seed))
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False,
                                                independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    raise UserError(f"unknown sampler {name!r}")
