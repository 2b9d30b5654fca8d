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
(``bench/trust_study.py``, results in ``bench/trust_study.txt``): 1.5 and 2 tie
on the mean of the three, and 1.5 has the lower worst client. The K-class game is then re-solved for the new weights and shares
(:meth:`memoa_fast.Game.with_weights`), which costs microseconds, nothing
per agent.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np

from .._copies import CopiesAreDeep
from .._exclusive import Exclusive
from .._validation import as_float_array, as_target_array, check_choice, check_int, check_real, check_sizes, readonly_view
from ..game import Game
from ..kernels import SIZE
from ..population import Population, first_max

# TrustClasses and TrustPopulation have no load_state_dict: after an interrupted call, a copy taken before is the way back.
_RECOVER = "continue from a copy or pickle taken before"


def _state_copy(obj) -> dict:
    """The state a pickle or copy of ``obj`` takes: every attribute but its lock, the arrays copied (a checked read of it)."""
    return {name: value.copy() if isinstance(value, np.ndarray) else value
            for name, value in obj.__dict__.items() if name != "_exclusive"}


class TrustClasses(CopiesAreDeep):
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
    An invalid forecast (NaN, infinite, or beyond ``1e50`` in magnitude) counts
    as the worst valid forecast of its round: its squared error is the round's
    largest valid one, so a client that never forecasts validly ranks with the
    least accurate, never (at its starting ``v_i = 0``) as the most accurate.
    A round with no valid forecast leaves every ``v_i`` as it was.

    The ratio ``median / mean_j`` may lie beyond float64 (errors a few
    hundred decades apart: a near-exact forecaster and a poor one) while its
    power does not (``beta < 1``, or a wide ``q_range``): such a power is taken
    from logarithms, so ``q_j`` follows the formula, clipped to ``q_range``,
    for every positive class error (it was clipped as if infinite, or 0).

    A class whose clients have all forecast exactly (``mean_{i in j} v_i = 0``)
    below a median error above 0 gets ``q`` times the top of ``q_range``, the
    limit of a class error tending to 0 (it got ``q``, below the weights of
    less accurate classes); when the median error is 0 as well, such a class
    is the median client's and keeps ``q``. Likewise at the other end (errors
    that :meth:`observe` never makes, written into :attr:`errors`): a class
    of an infinite error gets the bottom of ``q_range`` (it got ``q``), one
    beside a median of inf keeps ``q``; a NaN error keeps ``q``. Finite
    errors whose sum overflows give their finite mean and median.
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
        if isinstance(q_range, (str, bytes)) or np.ndim(q_range) != 1 or len(q_range) != 2:
            raise TypeError(f"q_range must be a pair (low, high) of positive numbers with low <= 1 <= high, got {q_range!r}")
        low, high = (check_real("q_range[0]", q_range[0], low=0.0, low_open=True),
                     check_real("q_range[1]", q_range[1], low=0.0, low_open=True))
        if low > 1.0 or high < 1.0:
            raise ValueError(f"q_range must contain 1 (the median client keeps q), got {q_range!r}")
        self.q_range = (low, high)
        self.power = check_real("power", power, low=0.0)
        # errors, the squared errors, the rows' largest |forecast| and their validity (1 byte, counted as 8)
        check_sizes(self.n_clients, 1, per_agent_vectors=0, per_agent_scalars=4, what="trust classes", names=("n_clients", "dim"))
        self.weight = 1.0 - 2.0 ** (-1.0 / self.half_life)
        #: Each client's discounted squared error ``v_i``: the live array :meth:`observe` updates in place (copy it to
        #: keep it, between calls: read while another thread observes, it is not a snapshot).
        self.errors = np.zeros(self.n_clients)
        self._sq = np.empty(self.n_clients)
        self._top = np.empty(self.n_clients)
        self._ok = np.empty(self.n_clients, dtype=bool)
        self._diff = np.empty((self.n_clients, 0))  # the (N, d) scratch of observe, allocated at its first d
        self.n_observed = 0
        self._exclusive = Exclusive("TrustClasses", recover=_RECOVER)

    def observe(self, forecasts, target) -> None:
        """Fold in each client's squared error ``|forecast_i - target|^2`` (forecasts shape (N, d), target (d,)).

        ``target`` must be finite with ``|target| <= 1e30`` (a scalar when d = 1), else ``ValueError``
        (``TypeError`` for a non-number) and nothing changes. Invalid forecasts are allowed (see the class).

        One caller at a time (as every object of the package that owns state): a call made while another
        thread's call of this object runs raises ``RuntimeError`` at once, and so does every call after one
        cut short between its first and last write (``KeyboardInterrupt``); a copy or pickle taken before is
        the way back.
        """
        try:
            shape = np.shape(forecasts)
        except ValueError:  # ragged: as_float_array names it below
            shape = ()
        if len(shape) in (1, 2) and shape[0] == self.n_clients:  # forecasts of N clients set d: a target of
            target = as_target_array("target", target, shape[1:] or (1,))  # another size is the target's error
        else:  # the forecasts' shape is wrong: the error names them, with d from the target
            target = _check_target(target)
        f = as_float_array("forecasts", forecasts, (self.n_clients, target.shape[0]), allow_nonfinite=True)
        ex = self._exclusive
        with ex:
            ex.interrupted = "observe"  # until the errors and the count are both updated: an interrupt between is refused later
            if self._diff.shape != f.shape:
                self._diff = np.empty(f.shape)
            self._fold(f, target, self._diff)
            ex.interrupted = None

    def _fold(self, f: np.ndarray, target: np.ndarray, diff: np.ndarray) -> None:
        """:meth:`observe` on checked arguments: forecasts ``f`` (N, d), ``target`` (d,), a scratch ``diff`` (N, d).

        Takes no lock: the caller holds this object's (:meth:`observe`, or :meth:`TrustPopulation.observe` with its own).

        Every temporary is one of this object's buffers or ``diff`` (no allocation per round).
        ``sq_i = sum_k (f_ik - y_k)^2``; a row is valid when ``max_k |f_ik| <= 1e50`` (NaN fails), and then
        ``sq_i`` is finite (``|y| <= 1e30``). ``v <- v + w (sq - v)``.
        """
        sq, top, ok = self._sq, self._top, self._ok
        np.abs(f, out=diff)
        np.maximum.reduce(diff, axis=1, out=top)  # NaN propagates: a row with a NaN is invalid
        np.less_equal(top, 1e50, out=ok)
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(f, target, out=diff)
            np.square(diff, out=diff)
            np.add.reduce(diff, axis=1, out=sq)
        n_valid = int(np.count_nonzero(ok))
        if n_valid < self.n_clients:
            if n_valid == 0:
                self.n_observed += 1
                return
            # an invalid forecast is as bad as the round's worst valid one (see the class)
            worst = np.maximum.reduce(sq, where=ok, initial=-np.inf)
            np.logical_not(ok, out=ok)
            np.copyto(sq, worst, where=ok)
        np.subtract(sq, self.errors, out=sq)
        sq *= self.weight
        self.errors += sq
        self.n_observed += 1

    def due(self, t: int) -> bool:
        """Whether round ``t`` (counted from 0) re-forms the classes: every ``reclass`` rounds, from ``reclass`` on."""
        t = check_int("t", t, low=0)
        return t > 0 and t % self.reclass == 0

    def classes(self, power: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(labels, q, shares)``: each client's class (0 = most accurate), the class weights ``q_j`` and shares.

        ``power`` overrides :attr:`power` (the exponent ``beta``) for this
        call. Ties are broken by client index (a stable sort), so the classes
        are a deterministic function of the errors.
        """
        labels, (q,), shares = self.classes_for((self.power if power is None else power,))
        return labels, q, shares

    def classes_for(self, powers) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """``(labels, [q for each power], shares)``: :meth:`classes` for several exponents, ranking the clients once.

        Refused (``RuntimeError``) while another thread's :meth:`observe` runs and after an interrupted one: the
        errors it ranks would be those of no round.
        """
        powers = [check_real("power", p, low=0.0) for p in powers]
        return self._exclusive.read(self._classes_for, powers)

    def _classes_for(self, powers: list[float]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """:meth:`classes_for` on checked exponents, unchecked: the caller holds the lock or checks it (``Exclusive.read``)."""
        K, n = self.n_classes, self.n_clients
        order = np.argsort(self.errors, kind="stable")
        labels = np.empty(n, dtype=np.int64)
        bounds = [(j * n) // K for j in range(K + 1)]
        means = np.empty(K)
        with np.errstate(over="ignore"):  # errors near float64's top (never made by observe): their sum may overflow
            for j in range(K):
                members = order[bounds[j]:bounds[j + 1]]
                labels[members] = j
                means[j] = _mean(self.errors[members])
            median = float(np.median(self.errors))
            if median == math.inf and n % 2 == 0 and self.errors[order[n // 2]] < math.inf:
                median = float(self.errors[order[n // 2 - 1]] / 2 + self.errors[order[n // 2]] / 2)  # finite middle two
        low, high = self.q_range
        weights = []
        for power in powers:
            q = np.empty(K)
            for j, mean in enumerate(means):
                with np.errstate(over="ignore", divide="ignore"):  # a ratio beyond float64 is clipped below, not warned
                    if 0 < mean < math.inf and 0 < median < math.inf:
                        ratio = median / mean
                        if not _NORMAL_MIN <= ratio < math.inf:
                            # the quotient left float64's normal range (overflowed to inf, or lost bits as a subnormal
                            # or 0), not necessarily its power: (1/5e-324)**0.005 is 41, not inf
                            ratio = _power_from_logs(median, mean, power)
                        else:
                            ratio = ratio ** power
                    elif mean == median or math.isnan(mean) or math.isnan(median):
                        # both 0 (no error measured, or the median client exact as well) or both inf: this class is
                        # the median's (also a NaN error, which observe never makes)
                        ratio = 1.0
                    else:
                        # one of them at an end of [0, inf]: the limit of the ratio, to the power beta (1 at beta = 0).
                        # An exact class (every v_i = 0) below a median that is not gets the top of q_range for every
                        # beta > 0 (not q, a more accurate class's weight below a less accurate one's); a class mean of
                        # inf (errors near float64's top, never made by observe) the bottom, not q.
                        ratio = float(median / mean) ** power
                q[j] = self.q * min(max(ratio, low), high)
            weights.append(q)
        shares = np.diff(bounds) / n
        return labels, weights, shares

    def __getstate__(self) -> dict:
        """Pickle and copies: every attribute but the lock (a copy gets its own), the arrays copied in a checked read of it.

        Refused (``RuntimeError``) if another thread's :meth:`observe` overlapped it (that observe is served, never
        refused because of this read) and after an interrupted one.
        """
        return self._exclusive.read(_state_copy, self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._exclusive = Exclusive("TrustClasses", recover=_RECOVER)  # also for a pickle made before the lock existed

    def __repr__(self) -> str:
        return (f"TrustClasses(n_clients={self.n_clients}, n_classes={self.n_classes}, reclass={self.reclass}, "
                f"half_life={self.half_life!r}, q={self.q!r})")


#: memoa-trust's rules for the class weights: ``"error"`` (one exponent ``beta``) and ``"minimax"`` (``beta`` chosen online).
TRUST_RULES = ("error", "minimax")
#: The exponents the ``"minimax"`` rule chooses among.
MINIMAX_POWERS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class TrustPopulation(CopiesAreDeep):
    """The ``memoa-trust`` policy: a K-class MEMOA population whose classes follow the clients' measured error.

    Every round: :meth:`step` moves the clients on their signals (each
    client's own forecast of the next value); when the target arrives,
    :meth:`observe` folds each client's squared forecast error into its
    :class:`TrustClasses` record, and every ``reclass`` rounds re-forms the K
    quantile classes, gives class ``j`` the weight ``q_j`` and re-solves the
    exact K-class equilibrium (:meth:`memoa_fast.Game.with_weights`).

    Two rules set the class weights ``q_j = q (median v / mean_j v)^beta``:

    ``rule="error"``
        one exponent, ``beta = power``;
    ``rule="minimax"``
        ``beta`` is tuned online to lower the worst class's measured cost,
        the paper's minimax reading. One K-class population runs for each
        exponent in ``powers`` (the same clients, signals and classes; only
        the class weights differ), and each measures the largest class mean
        of its clients' squared errors ``max_j mean_{i in j} |x_i - y|^2``,
        exponentially weighted with half-life ``cost_half_life`` rounds.
        Every ``reclass`` rounds the population with the lowest such cost
        becomes the one whose states :meth:`step` publishes (follow the
        leader; it starts at ``power``). It costs one population step per
        exponent.

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
        The exponent ``beta`` of :class:`TrustClasses` (see the module
        docstring); with ``rule="minimax"`` the first leader, and it must be
        one of ``powers``.
    rule : {"minimax", "error"}, default "minimax"
        ``"minimax"`` is the time-series job's default: on the mean over 20
        series its worst client, average client and hedge mixture were all
        lower than with the one exponent 1.5, and its worst client lower than
        with any of 1, 1.5 and 2 (``bench/trust_study.txt``; beta = 2's
        mixture was lower); ``"error"`` runs one population instead of
        ``len(powers)``.
    powers : sequence of float, default :data:`MINIMAX_POWERS`
        The exponents ``"minimax"`` chooses among (distinct, ``>= 0``).
    cost_half_life : float, default 200.0
        Half-life in rounds of ``"minimax"``'s measured class costs.
    backend, threads
        As for :class:`~memoa_fast.Population`.
    """

    def __init__(self, n_clients: int, dim: int = 1, *, n_classes: int = 8, reclass: int = 50,
                 half_life: float = 35.0, q: float = 1.0, kappa: float = 1.0, r: float = 0.1, gamma: float = 0.9,
                 feedforward: bool = True, power: float = 1.5, rule: str = "minimax", powers=MINIMAX_POWERS,
                 cost_half_life: float = 200.0, backend: str = "numba", threads: int | None = None):
        self.rule = check_choice("rule", rule, TRUST_RULES)
        candidates = _check_powers(powers)  # checked whatever the rule: an argument is never accepted unchecked
        n_pops = 1 if self.rule == "error" else len(candidates)
        # every population's states, costs and labels, the signals and a scratch (N, d), the trust classes' and the
        # published path's (N,) arrays: all together, before any is allocated (each population alone would fit)
        check_sizes(check_int("n_clients", n_clients, low=1), check_int("dim", dim, low=1), per_agent_vectors=n_pops + 2,
                    per_agent_scalars=2 * n_pops + 8, what="trust population", names=("n_clients", "dim"),
                    detail=f", {n_pops} exponent{'s' if n_pops > 1 else ''}")
        self.trust = TrustClasses(n_clients, n_classes, reclass=reclass, half_life=half_life, q=q, power=power)
        if self.rule == "error":
            self.powers = (self.trust.power,)
        else:
            self.powers = candidates
            if self.trust.power not in self.powers:
                raise ValueError(f"power must be one of powers={self.powers} with rule='minimax', got {power!r}")
        self.cost_half_life = check_real("cost_half_life", cost_half_life, low=0.0, low_open=True)
        self._cost_weight = 1.0 - 2.0 ** (-1.0 / self.cost_half_life)
        K = self.trust.n_classes
        labels, q_j, shares = self.trust.classes()  # no error measured yet: every class at q, whatever beta
        game = Game(q=q_j, kappa=[kappa] * K, r=[r] * K, gamma=gamma, shares=shares, feedforward=feedforward)
        if max(self.powers) > 0:  # beta = 0 keeps every class at q: nothing else is reachable
            _check_reachable_weights(game, self.trust)
        self.games = [game] * len(self.powers)
        self.populations = [Population(game, n_clients, dim, labels=labels, backend=backend, threads=threads)
                            for _ in self.powers]
        #: Each candidate's exponentially weighted worst-class cost (``"minimax"``; zeros for ``"error"``): the live
        #: array :meth:`observe` updates in place (copy it to keep it; not a snapshot while another thread observes).
        self.class_costs = np.zeros(len(self.powers))
        self.leader = self.powers.index(self.trust.power)
        self._signals = np.zeros((n_clients, dim))
        self._diff = np.empty((n_clients, dim))  # scratch of step, observe and the class costs: no allocation per round
        self._sq = np.empty(n_clients)
        self._published_costs = np.zeros(n_clients)  # "minimax": J_i along the published path
        self._round_cost = np.empty(n_clients)
        self._zeros = np.zeros(n_clients if K == 1 and self.rule == "minimax" else 0, dtype=np.int64)  # K = 1's labels
        self.t = 0
        self.n_reclassed = 0
        #: Re-formings whose games the solver could not solve, so the previous classes were kept (see :meth:`observe`).
        self.n_reforms_kept = 0
        self._exclusive = Exclusive("TrustPopulation", recover=_RECOVER)

    # The reads of the published path (the leader, its game, its costs) are checked against the lock (Exclusive.read,
    # no hold taken): RuntimeError while another thread's step or observe runs (observe replaces the games, then may
    # change the leader: a read in between named a game no round published) and after an interrupted one. This
    # object's own calls, which hold the lock, read self.populations[self.leader] directly.
    @property
    def population(self) -> Population:
        """The population whose states :meth:`step` publishes (the leader's, for ``"minimax"``).

        ``RuntimeError`` during another thread's call, as every read of this object's state.
        """
        return self._exclusive.read(lambda: self.populations[self.leader])

    @property
    def game(self) -> Game:
        """The published population's K-class game (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(lambda: self.games[self.leader])

    @property
    def power(self) -> float:
        """The exponent ``beta`` of the published population (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(lambda: self.powers[self.leader])

    def step(self, signals) -> np.ndarray:
        """Move every client one round; returns the published live read-only states (see :meth:`Population.step`).

        That is the leader's :attr:`Population.states` (:attr:`population`): with ``rule="minimax"`` a
        re-forming in :meth:`observe` may change the leader, after which an array returned before is the
        states of a population no longer published (still stepped, so still live). Take the states from each
        call's return (or :attr:`population`), not from an array kept across rounds.

        ``signals`` (shape (N, d), or (N,) when d = 1) is checked and copied once, before any population
        moves: every population steps on the same private copy, also when ``signals`` is a view of this
        object's own states (``step(tp.population.states)``), and a refused argument changes nothing.
        """
        n, d = self._signals.shape
        s = as_float_array("signals", signals, (n, d), allow_nonfinite=True)
        ex = self._exclusive
        with ex:
            ex.interrupted = "step"  # until the last population and array moved: an interrupt in between is refused later
            incoming = self._diff  # the scratch becomes this round's signals; the last round's become the scratch
            np.copyto(incoming, s)
            leader = self.populations[self.leader]
            if self.rule == "minimax":
                np.copyto(self._round_cost, leader.costs)
                overflowed = leader.regret == math.inf  # a leader's cost is inf already (O(1): the step tracks it)
            for pop in self.populations:
                pop.step(incoming)
            if self.rule == "minimax":  # the published path's cost: this round's loss in the leader's game
                after = leader.costs
                with np.errstate(invalid="ignore"):  # inf - inf: only where the leader's cost was inf already
                    np.subtract(after, self._round_cost, out=self._round_cost)
                if overflowed:
                    # The leader's cost was already inf (past float64), so its growth is unknown (inf - inf), but it
                    # is >= 0: a published cost that is inf stays inf (it only grows), as the leader's own does. NaN
                    # is left only where the leader's is NaN (0 * inf once gamma^t underflows) or the published
                    # cost is still finite.
                    self._round_cost[np.isnan(self._round_cost) & (after == np.inf) & (self._published_costs == np.inf)] = 0.0
                self._published_costs += self._round_cost
            self._diff, self._signals = self._signals, incoming
            ex.interrupted = None
        return leader.states

    def observe(self, target) -> None:
        """The target of the last step's forecasts arrived: measure, and re-form the classes when due.

        ``target`` has shape (d,) (a scalar when d = 1) and must be finite with ``|target| <= 1e30``;
        otherwise ``ValueError`` (``TypeError`` for a non-number) and nothing changes: one NaN would
        otherwise disqualify every ``"minimax"`` candidate for good. A re-classing builds every new
        game before anything changes. When the K-class solver cannot solve one of them (its
        ``ValueError``: no representable or no stable equilibrium found, e.g. classes whose gains tie in
        float64 while the anchor ``sum_j pi_j q_j/w_j`` is near 1e-17), the round is measured as any
        other and the classes and games stay as they were: ``n_reforms_kept`` counts such re-formings
        and a ``RuntimeWarning`` names the weights (a run never stops half-way for it; the weights
        whose games at both ends of ``q_range`` fail are refused when the object is made). Any other
        exception there leaves this object as it was (errors, round counter, class costs and every
        population), so the call may be repeated.

        It holds the lock of :attr:`trust` too: a call of ``tp.trust`` (``observe``, ``classes``, a copy) from
        another thread meanwhile raises ``RuntimeError``, and after an interrupted call both objects refuse.
        """
        target = as_target_array("target", target, (self._signals.shape[1],))
        # Both locks: this object's, and that of its TrustClasses (``tp.trust``), whose errors this call folds and
        # ranks, so that a call of ``tp.trust`` from another thread meanwhile is refused instead of racing with it.
        ex, trust_ex = self._exclusive, self.trust._exclusive
        with ex, trust_ex:
            # until the last write below: an interrupt in between is refused later, by both objects
            ex.interrupted = trust_ex.interrupted = "observe"
            due = self.trust.due(self.t + 1)
            if due:  # the new games are solved from the new errors: keep the old ones until every game is built
                kept = (self.trust.errors.copy(), self.trust.n_observed, self.class_costs.copy())
            self.trust._fold(self._signals, target, self._diff)  # both checked: the signals are ours
            if self.rule == "minimax":
                self._measure_class_costs(target)
            games = None
            if due:
                try:
                    # one ranking for every candidate (the lock-free ranking: this call holds the lock of self.trust)
                    labels, weights, shares = self.trust._classes_for(list(self.powers))
                    try:
                        games = [game.with_weights(q=q_j, shares=shares) for game, q_j in zip(self.games, weights)]
                    except ValueError as exc:
                        # The solver found no equilibrium for a re-formed game: keep the classes that play a solved
                        # one (a failure is a property of the new weights, not of this round's data).
                        warnings.warn(f"memoa-trust: the classes re-formed at round {self.t + 1} are not used, their "
                                      f"game could not be solved ({exc}); the previous classes are kept "
                                      f"({self.n_reforms_kept + 1} re-forming(s) kept so far)", RuntimeWarning, stacklevel=2)
                        self.n_reforms_kept += 1
                except BaseException:
                    # anything else: the round is refused whole, not half folded (its errors counted, the classes
                    # not re-formed, the round counter past the re-classing), so the call may be repeated
                    self.trust.errors[...], self.trust.n_observed, self.class_costs[...] = kept
                    trust_ex.interrupted = None  # restored whole: as before the call (the inner mark first)
                    ex.interrupted = None
                    raise
            self.t += 1
            if games is not None:
                for pop, game in zip(self.populations, games):
                    pop.set_game(game)
                    pop.set_labels(labels)
                self.games = games
                self.n_reclassed += 1
            # Follow the leader at every re-forming, kept or not; ties keep the lower index (np.argmin); an
            # infinite cost never leads.
            if due and self.rule == "minimax" and np.isfinite(self.class_costs).any():
                self.leader = int(np.argmin(self.class_costs))
            trust_ex.interrupted = None  # the inner mark first: an interrupt between the two leaves this object refusing
            ex.interrupted = None

    def _measure_class_costs(self, target) -> None:
        """Fold ``max_j mean_{i in j} |x_i - y|^2`` of every candidate into its exponentially weighted cost (``target`` checked)."""
        K = self.trust.n_classes
        # The same classes in every candidate. The population's own (writeable) labels: np.bincount copies a
        # read-only array (an (N,) allocation per round); one class keeps no labels, so zeros of our own.
        leader = self.populations[self.leader]  # the caller holds the lock
        labels = leader._labels if K > 1 else self._zeros
        sizes = np.maximum(leader._coef[:, SIZE], 1.0)  # the class sizes the population keeps (labels set)
        for c, pop in enumerate(self.populations):
            with np.errstate(over="ignore", invalid="ignore"):
                np.subtract(pop.states, target, out=self._diff)
                np.square(self._diff, out=self._diff).sum(axis=1, out=self._sq)
                worst_class = float((np.bincount(labels, weights=self._sq, minlength=K) / sizes).max())
            # A non-finite cost (an overflowed forecast) disqualifies the candidate for good.
            cost = self.class_costs[c] + self._cost_weight * (worst_class - self.class_costs[c])
            self.class_costs[c] = cost if math.isfinite(cost) else math.inf

    @property
    def costs(self) -> np.ndarray:
        """Each client's discounted online cost ``J_i`` along the published path (read-only).

        For ``"error"`` this is the population's :attr:`~memoa_fast.Population.costs`.
        For ``"minimax"`` each round adds that round's discounted loss of the
        leader of that round (in the leader's game), so ``J_i`` only grows:
        an ``inf`` stays ``inf`` while the leader's cost is ``inf`` (its growth
        ``inf - inf`` is unknown but not negative), NaN as the leader's once
        ``gamma^t`` underflows (``0 * inf``).

        A view of the live buffer: read while another thread steps it is not a snapshot (:attr:`regret` and
        :attr:`worst_agent` refuse then instead).
        """
        if self.rule == "error":
            return self.populations[self.leader].costs
        return readonly_view(self._published_costs)

    @property
    def regret(self) -> float:
        """``max_i J_i`` along the published path (the under-performer regret); ``RuntimeError`` during another thread's call."""
        if self.rule == "error":
            return self._exclusive.read(lambda: self.populations[self.leader].regret)  # a read of that population's too
        return self._exclusive.read(lambda: float(self._published_costs[first_max(self._published_costs)]))

    @property
    def worst_agent(self) -> int:
        """The client with the largest online cost along the published path (first on ties, a NaN never larger, as Population).

        ``RuntimeError`` during another thread's call.
        """
        if self.rule == "error":
            return self._exclusive.read(lambda: self.populations[self.leader].worst_agent)
        return self._exclusive.read(first_max, self._published_costs)

    def __getstate__(self) -> dict:
        """Pickle and copies: every attribute but the lock (a copy gets its own), as a snapshot of one round (a checked read).

        The arrays, the populations and the trust classes are copied in one checked read of the lock (no hold), so
        the snapshot is of one round even if another thread calls this object right after (the pickler writes the
        state after this returns). Refused (``RuntimeError``) if another thread's call of this object (or of
        ``self.trust``) overlapped it, and after an interrupted one: a copy taken then would mix two rounds (the
        populations step one after the other). That call is served, never refused because of this read.
        """
        def take():
            state = _state_copy(self)
            state["trust"] = copy.copy(self.trust)  # a checked read of its own lock too
            state["populations"] = [copy.copy(pop) for pop in self.populations]  # each from its state_dict
            state["games"] = list(self.games)
            return state

        return self._exclusive.read(take)

    def __setstate__(self, state: dict) -> None:
        state.setdefault("n_reforms_kept", 0)  # pickled before the count existed
        self.__dict__.update(state)
        self._exclusive = Exclusive("TrustPopulation", recover=_RECOVER)

    def __repr__(self) -> str:
        # the attributes, not the locked reads: a repr (a debugger's, an error message's) never raises
        rule = "" if self.rule == "error" else f", rule='minimax', powers={self.powers}, leader beta={self.powers[self.leader]:g}"
        return f"TrustPopulation({self.trust!r}, {self.games[self.leader]!r}{rule})"


def _mean(values: np.ndarray) -> float:
    """``values.mean()``, also where their sum overflows but their mean is a float64 (the largest times a mean <= 1)."""
    mean = values.mean()
    if mean == math.inf and np.isfinite(values).all():
        top = values.max()
        mean = top * (values / top).mean()  # each ratio <= 1, so is their mean (rounding is monotone): never above top
    return float(mean)


#: float64's smallest normal number: a quotient below it has lost bits.
_NORMAL_MIN = float(np.finfo(np.float64).tiny)


def _power_from_logs(median: float, mean: float, power: float) -> float:
    """``(median / mean) ** power`` for positive finite ``median`` and ``mean`` whose quotient leaves float64's normal range.

    From ``power (log median - log mean)``: the quotient itself would be inf or lose its bits, though its power may be
    an ordinary number (``beta < 1``, or a wide ``q_range``). ``inf`` beyond float64, to be clipped as any ratio.
    """
    try:
        return math.exp(power * (math.log(median) - math.log(mean)))
    except OverflowError:
        return math.inf


def _check_reachable_weights(game: Game, trust: TrustClasses) -> None:
    """Refuse, up front, weights whose K-class game a later re-forming of the classes could not solve.

    A re-forming gives class ``j`` a weight ``q_j`` anywhere in ``[q low, q high]`` (``q_range``), the other
    weights shared. Whether a class's gains are representable (``P_j``, ``k_j``, ``1 - k_j``, ``a_j`` normal
    floats, ``1 - k_j < 1``) depends on its own weights only, monotonically in ``(q_j + kappa)/r``, so the
    games with every class at either end decide it for every reachable game. Without this check such weights
    ran until the first re-forming that reached them (after any number of rounds) and stopped there.
    """
    K = trust.n_classes
    for bound in trust.q_range:
        q_j = trust.q * bound
        try:
            game.with_weights(q=[q_j] * K)
        except ValueError as exc:
            raise ValueError(
                f"memoa-trust: q={trust.q!r} with these weights cannot be run: a re-forming of the classes may give a "
                f"class any weight q_j in [{trust.q * trust.q_range[0]:g}, {trust.q * trust.q_range[1]:g}] (q times "
                f"q_range={trust.q_range!r}), and at q_j = {q_j:g} {exc}"
            ) from None


def _check_powers(powers) -> tuple[float, ...]:
    """``powers`` as a tuple of distinct finite floats ``>= 0``, at least one.

    Each element is read as every number of the package is (:func:`check_real`): a string (also a numeric one, and
    a string is not read as a sequence of its characters), a bool or a complex number is a ``TypeError``, never cast.
    """
    try:
        items = None if isinstance(powers, (str, bytes)) else list(powers)
    except TypeError:  # not iterable (a number, a 0-d array)
        items = None
    if items is None:
        raise ValueError(f"powers must be a sequence of numbers >= 0, got {powers!r}")
    values = []
    for v in items:
        try:
            values.append(check_real("powers", v))
        except TypeError:
            raise TypeError(f"powers must be a sequence of real numbers >= 0, got {v!r} of type {type(v).__name__} in "
                            f"{powers!r}") from None
        except ValueError:
            values.append(math.nan)  # named with the whole sequence below
    values = tuple(values)
    if not values or len(set(values)) != len(values) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"powers must be distinct finite numbers >= 0, at least one; got {powers!r}")
    return values


def _check_target(target) -> np.ndarray:
    """``target`` as a 1-D float64 array (a scalar for d = 1), finite with ``|target| <= 1e30``."""
    shape = np.shape(target) if not isinstance(target, (str, bytes)) else ()
    return as_target_array("target", target, (shape[0],) if len(shape) == 1 else (1,))
