"""Trust classes from measured error (``MODEL.md`` section 7, the time-series use).

Each client measures the squared error of its own forecast online, once the
target arrives, as an exponentially weighted mean ``v_i``. Every ``reclass``
rounds the clients are ranked by ``v_i`` into ``K`` quantile classes (class 0
holds the most accurate clients) and class ``j`` gets the tracking weight

.. math:: q_j = q \\left(\\frac{\\operatorname{median}_i v_i}{\\operatorname{mean}_{i \\in j} v_i}\\right)^\\beta,

so a poor client leans on the population and a good one keeps its own
forecast. ``MODEL.md`` states the rule with ``beta = 1``; the time-series job
uses ``beta = 1.5`` (:class:`TrustPopulation`'s default), chosen by the mean
over 20 series of the worst-client, average-client and mixture RMSE
(``bench/trust_study.py``, results in ``bench/trust_study.txt``). The K-class game is then re-solved for the new weights and shares
(:meth:`memoa_fast.Game.with_weights`), which costs microseconds, nothing
per agent.
"""
from __future__ import annotations

import math

import numpy as np

from .._validation import as_float_array, check_int, check_real
from ..game import Game
from ..population import Population


class TrustClasses:
    """Online error of every client and its quantile trust class.

    Parameters
    ----------
    n_clients : int
        Clients N >= 1.
    n_classes : int, default 8
        Classes K, ``1 <= K <= N``.
    reclass : int, default 50
        Rounds between two re-rankings, ``>= 1``.
    half_life : float, default 35.0
        Half-life in rounds of the exponentially weighted squared error
        (weight ``1 - 2**(-1/half_life)`` on the newest error).
    q : float, default 1.0
        The tracking weight of a client of median error.
    q_range : (float, float), default (1e-3, 1e3)
        ``q_j / q`` is clipped to this range, so that no class is given an
        infinite or a vanishing weight by a single lucky or unlucky round.
    power : float, default 1.0
        The exponent ``beta`` of the error ratio (``MODEL.md``: 1).

    Notes
    -----
    An invalid forecast (NaN, infinite, or beyond ``1e50`` in magnitude) leaves
    that client's ``v_i`` as it was; the next valid one updates it as usual.
    """

    def __init__(self, n_clients: int, n_classes: int = 8, *, reclass: int = 50, half_life: float = 35.0,
                 q: float = 1.0, q_range: tuple[float, float] = (1e-3, 1e3), power: float = 1.0):
        self.n_clients = check_int("n_clients", n_clients, low=1)
        self.n_classes = check_int("n_classes", n_classes, low=1)
        if self.n_classes > self.n_clients:
            raise ValueError(f"n_classes must be at most n_clients={self.n_clients}, got {n_classes}")
        self.reclass = check_int("reclass", reclass, low=1)
        self.half_life = check_real("half_life", half_life, low=0.0, low_open=True)
        self.q = check_real("q", q, low=0.0, low_open=True)
        low, high = (check_real("q_range[0]", q_range[0], low=0.0, low_open=True),
                     check_real("q_range[1]", q_range[1], low=0.0, low_open=True))
        if low > 1.0 or high < 1.0:
            raise ValueError(f"q_range must contain 1 (the median client keeps q), got {q_range!r}")
        self.q_range = (low, high)
        self.power = check_real("power", power, low=0.0)
        self.weight = 1.0 - 2.0 ** (-1.0 / self.half_life)
        self.errors = np.zeros(self.n_clients)
        self._sq = np.empty(self.n_clients)
        self.n_observed = 0

    def observe(self, forecasts, target) -> None:
        """Fold in each client's squared error ``|forecast_i - target|^2`` (forecasts shape (N, d), target (d,))."""
        target = np.atleast_1d(np.asarray(target, dtype=np.float64))
        f = as_float_array("forecasts", forecasts, (self.n_clients, target.shape[0]), allow_nonfinite=True)
        with np.errstate(over="ignore", invalid="ignore"):
            sq = ((f - target) ** 2).sum(axis=1)
        ok = np.isfinite(sq) & (np.abs(f) <= 1e50).all(axis=1)
        w = self.weight
        self.errors[ok] += w * (sq[ok] - self.errors[ok])
        self.n_observed += 1

    def due(self, t: int) -> bool:
        """Whether round ``t`` (counted from 0) re-forms the classes: every ``reclass`` rounds, from ``reclass`` on."""
        return t > 0 and t % self.reclass == 0

    def classes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(labels, q, shares)``: each client's class (0 = most accurate), the class weights ``q_j`` and shares.

        Ties are broken by client index (a stable sort), so the classes are a
        deterministic function of the errors.
        """
        K, n = self.n_classes, self.n_clients
        order = np.argsort(self.errors, kind="stable")
        labels = np.empty(n, dtype=np.int64)
        bounds = [(j * n) // K for j in range(K + 1)]
        q = np.empty(K)
        median = float(np.median(self.errors))
        low, high = self.q_range
        for j in range(K):
            members = order[bounds[j]:bounds[j + 1]]
            labels[members] = j
            mean = float(self.errors[members].mean())
            ratio = (median / mean) ** self.power if mean > 0 and math.isfinite(mean) else 1.0
            q[j] = self.q * min(max(ratio, low), high)
        shares = np.diff(bounds) / n
        return labels, q, shares

    def __repr__(self) -> str:
        return (f"TrustClasses(n_clients={self.n_clients}, n_classes={self.n_classes}, reclass={self.reclass}, "
                f"half_life={self.half_life!r}, q={self.q!r})")


class TrustPopulation:
    """The ``memoa-trust`` policy: a K-class MEMOA population whose classes follow the clients' measured error.

    Every round: :meth:`step` moves the clients on their signals (each
    client's own forecast of the next value); when the target arrives,
    :meth:`observe` folds each client's squared forecast error into its
    :class:`TrustClasses` record, and every ``reclass`` rounds re-forms the K
    quantile classes, gives class ``j`` the weight ``q_j`` and re-solves the
    exact K-class equilibrium (:meth:`memoa_fast.Game.with_weights`).

    Parameters
    ----------
    n_clients, dim : int
        Clients N and the dimension d of the stream.
    n_classes, reclass, half_life : int, int, float
        See :class:`TrustClasses`.
    q, kappa, r, gamma : float
        The game's weights; ``q`` is the weight of a client of median error.
    feedforward : bool
        Keep the K-class feed-forward term ``C (m_l - m_l*)`` (``MODEL.md``
        section 7); see the README for which variant the time-series job uses.
    power : float, default 1.5
        The exponent ``beta`` of :class:`TrustClasses` (see the module docstring).
    backend, threads
        As for :class:`~memoa_fast.Population`.
    """

    def __init__(self, n_clients: int, dim: int = 1, *, n_classes: int = 8, reclass: int = 50,
                 half_life: float = 35.0, q: float = 1.0, kappa: float = 1.0, r: float = 0.1, gamma: float = 0.9,
                 feedforward: bool = True, power: float = 1.5, backend: str = "numba", threads: int | None = None):
        self.trust = TrustClasses(n_clients, n_classes, reclass=reclass, half_life=half_life, q=q, power=power)
        K = self.trust.n_classes
        labels, q_j, shares = self.trust.classes()  # no error measured yet: every class at q
        self.game = Game(q=q_j, kappa=[kappa] * K, r=[r] * K, gamma=gamma, shares=shares, feedforward=feedforward)
        self.population = Population(self.game, n_clients, dim, labels=labels, backend=backend, threads=threads)
        self._signals = np.zeros((n_clients, dim))
        self.t = 0
        self.n_reclassed = 0

    def step(self, signals) -> np.ndarray:
        """Move every client one round; returns the live read-only states (see :meth:`Population.step`)."""
        states = self.population.step(signals)
        self._signals[...] = signals if np.ndim(signals) == 2 else np.reshape(signals, self._signals.shape)
        return states

    def observe(self, target) -> None:
        """The target of the last step's forecasts arrived: measure, and re-form the classes when due."""
        self.trust.observe(self._signals, target)
        self.t += 1
        if self.trust.due(self.t):
            labels, q_j, shares = self.trust.classes()
            self.game = self.game.with_weights(q=q_j, shares=shares)
            self.population.set_game(self.game)
            self.population.set_labels(labels)
            self.n_reclassed += 1

    @property
    def regret(self) -> float:
        """``max_i J_i`` of the population."""
        return self.population.regret

    @property
    def worst_agent(self) -> int:
        """The client with the largest online cost."""
        return self.population.worst_agent

    def __repr__(self) -> str:
        return f"TrustPopulation({self.trust!r}, {self.game!r})"
