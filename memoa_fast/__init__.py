"""memoa-fast: massive mixtures of online agents with compiled mean-field policies.

The public API is small:

- :class:`Game` holds the weights ``(q, kappa, r, gamma)``, the closed-form
  gains (:func:`solve_gains`) and the policy (``memoa`` or a baseline);
- :class:`Population` owns N agents' states and costs and steps them in place;
- :class:`Server` mixes the agents' predictions with online weights;
- :class:`ClientForecasters`, :func:`make_stream`, :func:`load_csv_series`,
  :func:`clip_outliers` and :func:`run_experiment` make the time-series job
  (``memoa run``);
- submodules :mod:`memoa_fast.certificates` (epsilon-Nash, exact Nash),
  :mod:`memoa_fast.checkpoint` and :mod:`memoa_fast.distributed` (Dask) are
  imported on demand.
"""
from ._version import __version__
from .game import POLICIES, Gains, Game, PolicyCoefficients, PolicyTable, solve_classes, solve_gains
from .population import Population
from .server import RULES, Server
from .timeseries.experiment import ExperimentResult, run_experiment
from .timeseries.forecasters import ClientForecasters, UncappedStateWarning
from .timeseries.pipeline import Pipeline
from .timeseries.streams import clip_outliers, load_csv_series, make_stream
from .timeseries.trust import TrustClasses, TrustPopulation

# Imported on first use: dask is optional and heavy, checkpoints need neither.
_LAZY = {
    "DaskPopulation": "distributed",
    "DaskServer": "distributed",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "restore_checkpoint": "checkpoint",
    "epsilon_nash": "certificates",
    "nash_equilibrium": "certificates",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'memoa_fast' has no attribute {name!r}")

__all__ = [
    "Game",
    "Gains",
    "PolicyCoefficients",
    "Population",
    "Server",
    "ClientForecasters",
    "UncappedStateWarning",
    "ExperimentResult",
    "run_experiment",
    "make_stream",
    "load_csv_series",
    "clip_outliers",
    "solve_gains",
    "solve_classes",
    "PolicyTable",
    "TrustClasses",
    "TrustPopulation",
    "Pipeline",
    "POLICIES",
    "RULES",
    "__version__",
    *_LAZY,
]
