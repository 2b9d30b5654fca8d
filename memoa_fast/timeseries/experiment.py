"""The time-series experiment: MEMOA against greedy decentralized baselines on one stream.

MODEL.md section 6. One round ``t`` (for ``t = 0 .. T-2`` on a series of
length ``T``):

1. the clients observe ``y(t)`` with their own noise, learn, and forecast
   ``y(t+1)``: the signals ``s(t)`` (:class:`~memoa_fast.forecasters.ClientForecasters`);
2. for every policy, ``x(t+1) = Population.step(s(t))`` is each client's
   published forecast of ``y(t+1)``, and each server rule publishes its
   mixture ``Server.predict(x(t+1))``;
3. ``y(t+1)`` arrives: every forecast is scored against it (from round
   ``burn_in`` on), and every server updates its weights on it.

Every policy sees the very same signals (one set of forecasters drives all
populations), so the comparison is on the same stream, the same clients and
the same noise.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from .._validation import as_float64, check_bool, check_choice, check_int, check_real, real_array
from ..game import POLICIES as GAME_POLICIES
from ..game import Game
from ..population import Population
from ..server import RULES, Server
from .forecasters import TARGET_LIMIT, ClientForecasters, SquaredErrors
from .streams import OUTLIER_BOUND, ROUNDING_SPREAD, _hold, fit_on_differences, spread, unit_scale
from .trust import TRUST_RULES, TrustPopulation


@dataclass
class PolicyScores:
    """Scores of one policy over the scored rounds.

    Attributes
    ----------
    policy : str
    mixture_rmse : dict
        Server rule -> RMSE of the server's mixture forecast.
    uniform_rmse : float
        RMSE of the plain mean of the clients' forecasts.
    worst_client_rmse : float
        ``max_i RMSE_i``, the worst client's RMSE.
    worst_client : int
        Its index.
    average_client_rmse : float
        ``mean_i RMSE_i``.
    max_cost : float
        Under-performer regret ``max_i J_i`` (the population's discounted
        online cost, counted from round 0 as in MODEL.md section 1).
    max_cost_client : int
        The client with that cost.
    client_rmse_quantiles : dict
        Quantiles (0, 0.1, 0.5, 0.9, 1) of the per-client RMSE.
    """

    policy: str
    mixture_rmse: dict
    uniform_rmse: float
    worst_client_rmse: float
    worst_client: int
    average_client_rmse: float
    max_cost: float
    max_cost_client: int
    client_rmse_quantiles: dict = field(default_factory=dict)


@dataclass(repr=False)
class ExperimentResult:
    """Everything one run measured.

    ``scores`` maps policy -> :class:`PolicyScores`; ``client_rmse`` maps
    policy -> per-client RMSE array; ``round_errors`` maps policy -> a dict of
    per-round arrays over all ``n_rounds`` rounds including the burn-in:

    - ``"uniform"``, and each server rule: the squared error of that forecast
      of ``y(t+1)``;
    - ``"clients"``: the mean over clients of the clients' squared errors;
    - ``"worst_client"``: the worst client's RMSE over the scored rounds so
      far, ``max_i sqrt(E_i(t) / (t + 1 - burn_in))`` (NaN during the
      burn-in); its last value is ``scores[policy].worst_client_rmse``;
    - ``"max_cost"``: ``max_i J_i`` after the round (the population's
      :attr:`~memoa_fast.Population.regret`); its last value is
      ``scores[policy].max_cost``.

    ``signal_rmse`` is the per-client RMSE of the raw forecasts ``s_i`` (no
    game) as a reference. ``outliers_held`` counts the values of the series
    that what learns was fed held (``run_experiment``'s ``outlier_bound``).

    Non-finite numbers: every score is finite for the documented option
    ranges. Should one overflow (for example a server learning rate so large
    that the weights degenerate), :meth:`table` prints it as ``n/a`` and
    :meth:`to_dict`/:meth:`to_json` give ``null``: JSON output is always
    strict JSON (no ``NaN`` or ``Infinity`` tokens).
    """

    stream: str
    config: dict
    n_rounds: int
    n_scored: int
    scores: dict
    client_rmse: dict
    round_errors: dict
    signal_rmse: np.ndarray
    elapsed_s: float
    outliers_held: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready summary (no per-client or per-round arrays); non-finite numbers become ``None``."""
        return _finite_or_none({
            "stream": self.stream,
            "config": dict(self.config),
            "n_rounds": self.n_rounds,
            "n_scored": self.n_scored,
            "policies": {name: asdict(s) for name, s in self.scores.items()},
            "signals": {
                "worst_client_rmse": float(self.signal_rmse.max()),
                "average_client_rmse": float(self.signal_rmse.mean()),
            },
            "elapsed_s": self.elapsed_s,
            "outliers_held": self.outliers_held,
        })

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON (``allow_nan=False``: non-finite numbers are ``null``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def best(self) -> dict:
        """The best policy per column.

        ``{"mixture": (policy, rule, rmse), "worst_client": (policy, rmse),
        "max_cost": (policy, J)}``; non-finite values are never best, and a
        column with none is left out.
        """
        out = {}
        mix = [(v, p, r) for p, s in self.scores.items() for r, v in s.mixture_rmse.items() if math.isfinite(v)]
        if mix:
            v, p, r = min(mix)
            out["mixture"] = (p, r, v)
        for key, attr in (("worst_client", "worst_client_rmse"), ("max_cost", "max_cost")):
            vals = [(getattr(s, attr), p) for p, s in self.scores.items() if math.isfinite(getattr(s, attr))]
            if vals:
                v, p = min(vals)
                out[key] = (p, v)
        return out

    def __repr__(self) -> str:
        c = self.config
        best = self.best()
        parts = []
        if "mixture" in best:
            p, r, v = best["mixture"]
            parts.append(f"mixture {_fmt(v)} ({p}, {r})")
        if "worst_client" in best:
            p, v = best["worst_client"]
            parts.append(f"worst client {_fmt(v)} ({p})")
        if "max_cost" in best:
            p, v = best["max_cost"]
            parts.append(f"max_i J_i {_fmt_cost(v)} ({p})")
        return (
            f"ExperimentResult(stream={self.stream!r}, n_clients={c['n_clients']}, n_rounds={self.n_rounds} "
            f"({self.n_scored} scored), policies={', '.join(self.scores)},\n"
            f"    best: {'; '.join(parts) or 'none finite'};\n"
            f"    elapsed {self.elapsed_s:.3g} s; .table() for every score)"
        )

    def table(self) -> str:
        """The scores as a Markdown table (readable as plain text), with a one-line heading."""
        c = self.config
        rules = list(c["rules"])
        head = ["policy", *(f"mixture {r}" for r in rules), "uniform mean", "worst client", "average client", "max_i J_i"]
        rows = []
        for name, s in self.scores.items():
            rows.append(
                [name, *(_fmt(s.mixture_rmse[r]) for r in rules), _fmt(s.uniform_rmse),
                 _fmt(s.worst_client_rmse), _fmt(s.average_client_rmse), _fmt_cost(s.max_cost)]
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda cells: "| " + " | ".join(  # noqa: E731
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ) + " |"
        rule = "| " + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths)) + " |"
        title = f"RMSE on stream {self.stream}: " + describe_config(c, self.n_rounds, self.n_scored)
        foot = (
            f"raw client forecasts s_i (no game): worst client {_fmt(float(self.signal_rmse.max()))}, "
            f"average client {_fmt(float(self.signal_rmse.mean()))}; {self.elapsed_s:.1f} s"
        )
        lines = [title, "", line(head), rule, *map(line, rows), "", foot]
        if self.outliers_held:
            lines.append(f"outliers: {self.outliers_held} value(s) of the series lay more than {c['outlier_bound']:g} burn-in "
                         "standard deviations beyond the range before them; the clients and servers learned from them held "
                         "there, every score is against the series as it is")
        if "memoa-trust" in c["policies"] and c["reclass"] >= self.n_rounds:
            lines.append(f"note: {never_reformed(c['reclass'], self.n_rounds)}")
        if any("n/a" in cell for row in rows for cell in row):
            lines.append("n/a: not a finite number (the score overflowed float64; lower --eta or check the stream)"
                         + (f"; with scale='burn-in' the costs are in the series' units squared (sigma_B = {c['scale_fit'][1]:.4g})"
                            if "scale_fit" in c else ""))
        return "\n".join(lines)


def describe_config(c: dict, n_rounds: int, n_scored: int) -> str:
    """One line with the run's size and parameters (numbers in %g style)."""
    noise = c["noise_range"]
    return (
        f"{c['n_clients']} clients, {n_rounds} rounds ({n_scored} scored after a burn-in of {c['burn_in']}), "
        f"seed {c['seed']}; q={c['q']:g} kappa={c['kappa']:g} r={c['r']:g} gamma={c['gamma']:g}, "
        f"eta={c['eta']:g} alpha={c['alpha']:g}; client noise {noise[0]:g}..{noise[1]:g}, lags {c['lags']}, mu={c['mu']:g}"
        + (f"; memoa-trust K={c['classes']} R={c['reclass']} rule {c['trust_rule']}" if "memoa-trust" in c["policies"] else "")
    )


def _fmt(v: float) -> str:
    """An RMSE for the table: 4 decimals in [1e-3, 1e5), else 4 significant digits; ``n/a`` if not finite."""
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.4g}"


def _fmt_cost(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _finite_or_none(obj):
    """Copy of ``obj`` (dicts, lists, numbers) with every non-finite float replaced by ``None``."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# The policies of an experiment: the game's four, and memoa-trust (MODEL.md section 7, trust.py).
POLICIES = (*GAME_POLICIES, "memoa-trust")
#: memoa-trust's default number of classes K (fewer when there are fewer clients).
DEFAULT_CLASSES = 8
#: memoa-trust's default rounds between two re-formings of the classes.
DEFAULT_RECLASS = 50


def never_reformed(reclass: int, n_rounds: int) -> str:
    """What memoa-trust is when ``reclass >= n_rounds``: its first re-forming would follow round ``reclass``."""
    return (f"memoa-trust re-forms its classes every reclass rounds, the first time after round {reclass}, so with "
            f"reclass={reclass} and {n_rounds} rounds it never does: it runs as MEMOA with equal classes; "
            + reclass_range(n_rounds, "a reclass", " re-forms them"))


def reclass_range(n_rounds: int, name: str, tail: str) -> str:
    """``'{name} in [1, n_rounds - 1]{tail}'``; with one round that range is empty: say that re-forming needs 2 rounds."""
    if n_rounds < 2:  # the first re-forming follows round R >= 1, so it needs at least 2 rounds
        return f"with {n_rounds} round no {name.split()[-1]} re-forms the classes: that needs 2 rounds or more"
    return f"{name} in [1, {n_rounds - 1}]{tail}"


def default_burn_in(n_rounds: int) -> int:
    """The rounds :func:`run_experiment` leaves out of the scores by default: ``min(500, n_rounds // 5)``."""
    return min(500, n_rounds // 5)


def run_experiment(
    series,
    *,
    stream: str = "custom",
    n_clients: int = 1000,
    q: float = 1.0,
    kappa: float = 3.0,
    r: float = 0.1,
    gamma: float = 0.9,
    policies=POLICIES,
    classes: int | None = None,
    reclass: int | None = None,
    trust_feedforward: bool = False,
    trust_power: float = 1.5,
    trust_rule: str = "minimax",
    rules=RULES,
    eta: float = 0.5,
    alpha: float = 0.01,
    seed: int = 0,
    lags: int = 2,
    noise_range: tuple[float, float] = (0.02, 1.0),
    mu: float = 0.1,
    burn_in: int | None = None,
    scale: str | None = None,
    outlier_bound: float | None = OUTLIER_BOUND,
    backend: str = "numba",
    threads: int | None = None,
    progress: bool = False,
) -> ExperimentResult:
    """Run every policy on one stream with the same clients and score them.

    Parameters
    ----------
    series : array_like, shape (T,) or (T, d)
        The stream ``y(0..T-1)``: real numbers (an integer or floating
        dtype; bool, complex, strings and objects are refused, not cast),
        finite with ``|y| <= 1e30`` (with ``scale="burn-in"``: any finite
        values whose z-score on the burn-in is within 1e30), ``T >= 2``
        (z-scored streams from :mod:`memoa_fast.streams` are the intended
        input; see :data:`memoa_fast.forecasters.TARGET_LIMIT`).
    stream : str
        A name for the tables.
    n_clients : int
        Clients N.
    q, kappa, r, gamma : float
        Weights of the game (see :class:`~memoa_fast.Game`).
    policies : str or sequence of str
        One name, or a subset of ``("memoa", "greedy", "local", "consensus", "memoa-trust")``,
        in table order. ``memoa-trust`` is the K-class MEMOA policy whose
        classes follow each client's measured forecast error
        (:class:`~memoa_fast.timeseries.trust.TrustPopulation`).
    classes, reclass : int
        memoa-trust's number of quantile classes K (default
        ``min(8, n_clients)``; at most ``n_clients``) and the rounds between
        two re-formings R (default 50). The first re-forming follows round R,
        so memoa-trust needs ``R < T - 1`` to re-form at all: a ``reclass``
        given at ``T - 1`` or more warns (``UserWarning``, naming both), and
        the table says so below it whatever R.
    trust_feedforward : bool
        Keep memoa-trust's feed-forward term ``C (m_l - m_l*)``; off by default
        (lower worst, average and mixture RMSE on the mean over 20 series:
        ``bench/trust_study.py``).
    trust_power : float
        memoa-trust's exponent ``beta`` in ``q_j = q (median v / mean_j v)^beta``
        (default 1.5, chosen the same way; ``MODEL.md``'s rule is 1).
    trust_rule : {"minimax", "error"}
        memoa-trust's class weights: the exponent tuned online to lower the
        worst class's measured cost (default; lower worst, average and
        mixture RMSE than ``trust_power`` 1.5 on the mean over 20 series:
        ``bench/trust_study.txt``),
        or the one exponent ``trust_power``
        (:class:`~memoa_fast.timeseries.trust.TrustPopulation`).
    rules : str or sequence of str
        Server rule(s) to score: one name, or a subset of ``("eg", "hedge")``.
    eta, alpha : float
        Server learning rate and fixed share (see :class:`~memoa_fast.Server`).
    seed : int
        Seeds the clients' noise scales and noise (:class:`ClientForecasters`).
    lags, noise_range, mu
        The clients' forecasters (see :class:`ClientForecasters`).
    burn_in : int, optional
        Rounds left out of the RMSEs; default ``min(500, (T-1) // 5)``.
    scale : {None, "burn-in"}
        The unit of the run. ``None`` (default): the series as given; the
        clients' noise scales (``noise_range``), their forecasters' features
        (lags, their squares capped at 64, a constant) and the server's ``eta`` are in
        absolute units, so give a z-scored series (the streams of
        :mod:`~memoa_fast.timeseries.streams` are) or the scores depend on
        the series' scale and level. ``"burn-in"``: the run is made on
        ``(y - mu_B) / sigma_B``, with ``mu_B, sigma_B`` the mean and the
        (root-mean-square over coordinates) standard deviation of
        ``y(0), ..., y(burn_in)``, values no scored forecast is measured
        against, and the scores are given back in the series' units (RMSEs
        times ``sigma_B``, costs times ``sigma_B^2``): every score of
        ``a + c y`` is then ``c`` (or ``c^2``) times that of ``y`` for any
        ``a`` and ``c > 0`` (RMSEs wherever ``c`` times them is a float64;
        costs and the per-round squared errors are in squared units, so
        beyond ``c ~ 1e154`` they overflow: ``n/a`` in the table, ``null``
        in JSON). The mean and spread are taken on the differences from
        ``y(0)``, so a level ``a`` that the values hold exactly (integers
        within ``2**53``, binary fractions) gives the scores of ``y``, bit
        for bit, whatever ``a`` (on the values themselves, the mean's
        rounding ``eps |a|`` shifted the whole series: ``2**52 + y``, ``y``
        integers of spread 1000, scored 2.6e-4 away from ``y``). An integer
        series within ``2**53`` (where every integer is a float64) gives the
        scores of its float64 array, bit for bit; one beyond, where float64
        rounds integers (a counter near ``2**62``), is z-scored on its exact
        differences from ``y(0)``, so every such level ``a`` gives the same
        scores, bit for bit (unless some difference reaches ``2**62``: then
        on its rounded float64 casts, as floats). Needs ``burn_in >= 1`` and
        spread in that prefix: a coordinate of floats whose values there
        differ by rounding only (at most ``2**-46`` times their largest)
        counts as constant (so the floats ``2**52 + y``, ``y`` of spread
        below 64, do); the values of an integer series (or its differences)
        are exact, so only an equal burn-in is constant (the int64 ``2**52 +
        y`` scores as ``y``).
    outlier_bound : float or None
        What learns (the clients' forecasters, the servers, memoa-trust's
        classes) is fed the series with each value held at most
        ``outlier_bound`` standard deviations of the burn-in (per
        coordinate: of ``y(0..burn_in)``) beyond the range of the values fed
        before it (:func:`~memoa_fast.timeseries.streams.clip_outliers`);
        every score is still taken against the series itself; the reach
        doubles each row it holds (per coordinate) and is ``outlier_bound``
        again after a value within it. So a spike or a sentinel value
        reaches the forecasters, whose quadratic features amplify it, as a
        value at most that far beyond the range, and a real shift of the
        level by ``D`` is let in over about ``log2(D / outlier_bound)``
        rounds, a growth at its own pace. The
        first 20 values make the first range and are never held; a
        coordinate constant over the burn-in is never held, nor is anything
        with a burn-in of fewer than 20 values. ``None``: the series is fed
        as it is (MODEL.md section 6's feed). The default has the lowest
        mean ratio of the scores, held over unheld, over every series we
        have (``bench/outlier_study.py``; README, "Outliers are held").
    backend : {"numba", "cython", "numpy"}
        Kernels of the populations, servers, forecasters and scoring. The
        forecasters and the scoring have no Cython kernel: with ``"cython"``
        they run the NumPy reference, so the whole run never imports Numba.
    threads : int, optional
        Threads for every kernel (default: every core).
    progress : bool
        Show a tqdm progress bar on stderr (none if tqdm is not installed).

    Returns
    -------
    ExperimentResult
        RMSE of each server rule's mixture, of the uniform mean, of the worst
        and the average client, and ``max_i J_i``, for each policy.
    """
    # complex, bool, strings, objects, datetimes: refused, never cast; a masked entry refused, not read beneath its mask
    raw = real_array("series", series)
    y = as_float64(raw)
    if y.ndim == 1:
        y, raw = y[:, None], raw[:, None]
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise ValueError(f"series must have shape (T,) or (T, d) with T >= 2 and d >= 1, got shape {np.shape(series)}")
    if scale is not None and not (isinstance(scale, str) and scale == "burn-in"):
        raise ValueError(f"scale must be None or 'burn-in'; got {scale!r}")
    T, d = y.shape
    n_rounds = T - 1
    burn_in = default_burn_in(n_rounds) if burn_in is None else check_int("burn_in", burn_in, low=0)
    if burn_in >= n_rounds:
        raise ValueError(f"burn_in must be smaller than the number of rounds {n_rounds} (series length - 1), got {burn_in}")
    nonfinite = ~np.isfinite(y)
    if nonfinite.any():
        t_bad = int(np.argwhere(nonfinite)[0, 0])
        raise ValueError(
            f"series must be finite with |y| <= {TARGET_LIMIT:g} (z-score it first); first bad value at round {t_bad}: "
            f"{float(y[nonfinite][0]):g}"
        )
    if outlier_bound is not None:
        outlier_bound = check_real("outlier_bound", outlier_bound, low=0.0, low_open=True)
    scale_fit = None
    if scale == "burn-in":
        holds = _float64_holds(raw, y)
        fit, base = (y, None) if holds else _relative_integers(raw)
        # integers are exact where their float64 casts are (within 2**53) or as differences, not as rounded casts
        exact = raw.dtype.kind in "iu" and (holds or base is not None)
        y, scale_fit = _zscore_on_burn_in(fit, burn_in, base, exact=exact)
    bad = ~(np.abs(y) <= TARGET_LIMIT)
    if bad.any():
        t_bad = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"series must be finite with |y| <= {TARGET_LIMIT:g} (z-score it first); first bad value at round {t_bad}: "
            f"{float(y[bad][0]):g}"
            + (" after the burn-in z-score" if scale_fit is not None else " (or pass scale='burn-in')")
        )
    y = np.ascontiguousarray(y)
    # what learns is fed y held within the bound of the range before it; the scores are taken against y
    feed, n_held = held_feed(y, burn_in, outlier_bound)
    if not isinstance(stream, str):
        raise TypeError(f"stream must be a str (a name for the tables), got {stream!r} of type {type(stream).__name__}")
    trust_feedforward = check_bool("trust_feedforward", trust_feedforward)
    progress = check_bool("progress", progress)
    # A single name is one policy (rule), never its letters.
    policies = tuple(check_choice("policy", p, POLICIES) for p in ((policies,) if isinstance(policies, str) else policies))
    rules = tuple(check_choice("rule", rr, RULES) for rr in ((rules,) if isinstance(rules, str) else rules))
    trust_rule = check_choice("trust_rule", trust_rule, TRUST_RULES)
    trust_power = check_real("trust_power", trust_power, low=0.0)  # whatever the policies: it is in the config
    if not policies or not rules:
        raise ValueError("give at least one policy and one server rule")
    if len(set(policies)) != len(policies) or len(set(rules)) != len(rules):
        raise ValueError(f"policies and rules must not repeat, got {policies!r} and {rules!r}")
    n_clients = check_int("n_clients", n_clients, low=1)

    game = Game(q, kappa, r, gamma)
    forecasters = ClientForecasters(
        n_clients, d, lags=lags, noise_range=noise_range, mu=mu, seed=seed, backend=backend, threads=threads
    )
    classes = min(DEFAULT_CLASSES, n_clients) if classes is None else check_int("classes", classes, low=1)
    reclass_given = reclass is not None
    reclass = DEFAULT_RECLASS if reclass is None else check_int("reclass", reclass, low=1)
    if reclass_given and "memoa-trust" in policies and reclass >= n_rounds:
        warnings.warn(never_reformed(reclass, n_rounds), UserWarning, stacklevel=2)
    if "memoa-trust" in policies and classes > n_clients:
        raise ValueError(f"classes must be at most n_clients={n_clients}, got {classes}")

    def make(p):
        if p == "memoa-trust":
            return TrustPopulation(n_clients, d, n_classes=classes, reclass=reclass, q=q, kappa=kappa, r=r, gamma=gamma,
                                   feedforward=trust_feedforward, power=trust_power, rule=trust_rule,
                                   backend=backend, threads=threads)
        return Population(game.with_policy(p), n_clients, d, backend=backend, threads=threads)

    pops = {p: make(p) for p in policies}
    servers = {
        p: {rr: Server(n_clients, d, rule=rr, eta=eta, alpha=alpha, backend=backend, threads=threads) for rr in rules}
        for p in policies
    }
    score_signals = SquaredErrors(n_clients, d, backend=backend, threads=threads)
    scorers = {p: SquaredErrors(n_clients, d, backend=backend, threads=threads) for p in policies}
    errs = {p: {k: np.zeros(n_rounds) for k in ("uniform", *rules, "clients", "worst_client", "max_cost")}
            for p in policies}
    for p in policies:
        errs[p]["worst_client"][:burn_in] = np.nan

    bar = _progress_bar(n_rounds, f"memoa {stream}", progress)
    start = time.perf_counter()
    try:
        for t in range(n_rounds):
            s = forecasters.observe(feed[t])
            target = y[t + 1]
            fed = feed[t + 1]
            record = t >= burn_in
            score_signals.add(s, target, record)
            for p in policies:
                x = pops[p].step(s)
                e = errs[p]
                for rr, server in servers[p].items():
                    diff = server.predict(x) - target
                    e[rr][t] = float(diff @ diff)
                scorer = scorers[p]
                total, mean, _ = scorer.add(x, target, record)
                e["clients"][t] = total / n_clients
                diff = mean - target
                e["uniform"][t] = float(diff @ diff)
                if record:
                    e["worst_client"][t] = math.sqrt(scorer.max_total / (t + 1 - burn_in))
                e["max_cost"][t] = pops[p].regret
                for server in servers[p].values():
                    server.update(x, fed)
                if p == "memoa-trust":  # each client measures its own forecast error, classes re-formed every R rounds
                    pops[p].observe(fed)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        forecasters.close()
    elapsed = time.perf_counter() - start

    n_scored = n_rounds - burn_in
    scored = slice(burn_in, n_rounds)
    # The unit: RMSEs are given back times u, squared errors and costs times u^2 (exact when u = 1). Every RMSE is
    # taken in the run's unit and then scaled, so it is c times the one of y for a + c y wherever c times it is a
    # float64 (scaling the squared errors first overflowed to inf beyond u ~ 1e154 and underflowed to 0 below 1e-162).
    u = 1.0 if scale_fit is None else scale_fit[1]
    scores, client_rmse = {}, {}
    for p in policies:
        rmse_i = np.sqrt(scorers[p].totals / n_scored) * u
        client_rmse[p] = rmse_i
        worst = int(np.argmax(rmse_i))
        e = errs[p]
        scores[p] = PolicyScores(
            policy=p,
            mixture_rmse={rr: _rmse(e[rr][scored]) * u for rr in rules},
            uniform_rmse=_rmse(e["uniform"][scored]) * u,
            worst_client_rmse=float(rmse_i[worst]),
            worst_client=worst,
            average_client_rmse=float(rmse_i.mean()),
            max_cost=pops[p].regret * (u * u),
            max_cost_client=pops[p].worst_agent,
            client_rmse_quantiles={str(qq): float(v) for qq, v in zip(QUANTILES, np.quantile(rmse_i, QUANTILES))},
        )
    if scale_fit is not None:  # the per-round records in the series' units (squared: may leave float64's range)
        with np.errstate(over="ignore", under="ignore"):
            for p in policies:
                for k, v in errs[p].items():
                    v *= u
                    if k != "worst_client":
                        v *= u  # twice, not u * u: an error of 0 stays 0 when u * u overflows
    config = {
        "n_clients": n_clients, "dim": d, "q": game.q, "kappa": game.kappa, "r": game.r, "gamma": game.gamma,
        "policies": list(policies), "classes": classes, "reclass": reclass,
        "trust_feedforward": trust_feedforward, "trust_power": trust_power, "trust_rule": trust_rule,
        "rules": list(rules),
        "eta": float(eta), "alpha": float(alpha), "seed": forecasters.seed,  # as checked: an int (JSON), not a NumPy one
        "lags": forecasters.lags, "noise_range": [float(v) for v in forecasters.noise_range], "mu": float(mu), "burn_in": burn_in,
        "outlier_bound": outlier_bound, "backend": backend, "threads": forecasters.threads,
    }
    if scale_fit is not None:
        config["scale"] = scale
        config["scale_fit"] = list(scale_fit)  # [mu, sigma]: mu a float, or a list of d floats for a (T, d) series
    return ExperimentResult(
        stream=stream, config=config, n_rounds=n_rounds, n_scored=n_scored, scores=scores, client_rmse=client_rmse,
        round_errors=errs, signal_rmse=np.sqrt(score_signals.totals / n_scored) * u, elapsed_s=elapsed,
        outliers_held=n_held,
    )


QUANTILES = (0, 0.1, 0.5, 0.9, 1)
#: The fewest values ``y(0..burn_in)`` whose standard deviation sets ``outlier_bound``'s unit (fewer: nothing is held; from
#: 20 values a standard deviation is within about 16% of the true one, one standard error), and the rows that make the
#: first range (held from the row after them).
OUTLIER_MIN_VALUES = 20


def held_feed(y: np.ndarray, burn_in: int, outlier_bound: float | None) -> tuple[np.ndarray, int]:
    """``(feed, held)``: ``y`` (T, d) as what learns is fed it, and how many values were held (``y`` itself if none).

    Each coordinate ``j`` through :func:`~memoa_fast.timeseries.streams.clip_outliers`
    with ``b_j = outlier_bound * sd_j``, ``sd_j`` the standard deviation of
    ``y(0..burn_in, j)`` (:func:`~memoa_fast.timeseries.streams.spread`:
    0 for a constant, and then ``b_j = inf``). Each ``sd_j`` is taken on the
    coordinate's values divided by its own power of two (exact), so it can
    neither overflow nor underflow, whatever the magnitudes of the other
    coordinates; a ``b_j`` beyond float64's range is ``inf`` (nothing lies
    beyond it) and one below it the smallest float (a smaller bound never
    holds less). A burn-in of fewer than :data:`OUTLIER_MIN_VALUES` values
    measures no spread to trust: nothing is held; nor are the first
    ``OUTLIER_MIN_VALUES`` rows, which make the first range (the range of a
    few values is narrow). The copy is made only once a value is held: for a
    series with none, no (T, d) array is made.
    """
    if outlier_bound is None or burn_in + 1 < OUTLIER_MIN_VALUES:
        return y, 0
    head = y[: burn_in + 1]
    p2 = np.array([unit_scale(column) for column in head.T])  # the package's power-of-two scaling, per coordinate
    sd = spread(head / p2, axis=0)
    with np.errstate(over="ignore", under="ignore"):
        bound = outlier_bound * sd * p2
    bound = np.where(sd > 0.0, np.maximum(bound, np.nextafter(0.0, 1.0)), np.inf)  # constant (sd 0): never held
    feed, held, _ = _hold(y, bound, OUTLIER_MIN_VALUES, copy=True)
    return feed, held


def _float64_holds(raw: np.ndarray, y: np.ndarray) -> bool:
    """Whether ``raw`` is a float series, or an integer one within ``2**53`` in magnitude (``y``: its float64 cast).

    Up to ``2**53`` every integer is a float64: the series is then its float64 array, and gets that array's scores bit
    for bit (ordinary integers score as the same numbers read as floats, from a CSV file). Beyond, float64 rounds
    integers (to multiples of 1024 near ``2**62``), and the z-score is taken on exact differences instead
    (:func:`_relative_integers`), the same for every such level.
    """
    return raw.dtype.kind not in "iu" or bool((np.abs(y) <= 2.0**53).all())


def _relative_integers(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(y - y(0), y(0))`` for a (T, d) integer series: the differences exact (then float64), the first row as it is.

    A series of large integers (a counter, nanoseconds) has spread far below its magnitude: cast to float64 first, its
    values are rounded to a multiple of their spacing there (of 1024 near ``2**62``) and the level ``a`` in ``a + y``
    changes the result, or leaves the burn-in "constant up to rounding". Its differences are exact integers (taken
    modulo ``2**64``, exact while each is below ``2**63`` in magnitude), and so their float64 casts are as exact as
    those of ``y`` itself. Where a difference is that large: ``(y, None)``, the float64 casts of ``y``, rounded (so not
    exact: a burn-in of spread below their spacing is then constant up to rounding, as for floats).
    """
    approx = raw.astype(np.float64) - raw[:1].astype(np.float64)
    if not (np.abs(approx) < 2.0**62).all():  # a difference that may not fit an int64
        return raw.astype(np.float64), None
    diff = (raw.astype(np.uint64) - raw[:1].astype(np.uint64)).view(np.int64)  # modulo 2**64 (no overflow warning)
    return diff.astype(np.float64), raw[0]


def _zscore_on_burn_in(y: np.ndarray, burn_in: int, base: np.ndarray | None = None, exact: bool = False):
    """``((y - mu) / sigma, (mu, sigma))`` with ``mu, sigma`` of ``y(0..burn_in)`` (sigma: RMS over coordinates).

    ``y`` is a (T, d) float64 series; with ``base`` it is the differences of an integer series from its first row
    ``base`` (:func:`_relative_integers`), and the reported ``mu`` is ``base`` plus their mean.

    Computed on values divided by a power of two at least their largest
    magnitude (exact), so no square overflows, and on their differences from
    the first row (exact where the values are), so a level cancels
    (:func:`~memoa_fast.timeseries.streams.fit_on_differences`). A coordinate
    whose spread over the burn-in is rounding only
    (:func:`~memoa_fast.timeseries.streams.spread`) counts as constant,
    unless ``exact`` (an integer series: its values differ by no rounding).
    """
    if burn_in < 1:
        raise ValueError("scale='burn-in' fits the unit on y(0)..y(burn_in), the values no scored forecast is measured "
                         "against; with burn_in=0 there is only one: give burn_in >= 1, or scale=None")
    # mean and spread on the differences from y(0), each coordinate alone: a level held exactly cancels (2**52 + y, y
    # integers of spread 1000, scored 2.6e-4 away from y's when the mean was taken on the values)
    p2, origin_u, mean_u, sd_u = fit_on_differences(y[: burn_in + 1], exact)
    sigma_u = math.sqrt(float(np.mean(sd_u**2)))
    if not sigma_u > 0.0:
        raise ValueError(f"scale='burn-in': the series is constant over y(0)..y({burn_in}), the burn-in (up to rounding: "
                         f"every coordinate's spread there is at most {ROUNDING_SPREAD:.3g} times its largest value), so it "
                         "gives no unit; use a longer burn_in, or scale=None with a series you have z-scored")
    with np.errstate(over="ignore"):
        z = ((y / p2 - origin_u) - mean_u) / sigma_u
    mu = (origin_u + mean_u) * p2
    if base is not None:  # the level of an integer series: its first row plus the mean difference (a float64 to report)
        mu = base.astype(np.float64) + mu
    return z, (float(mu[0]) if mu.shape[0] == 1 else mu.tolist(), sigma_u * p2)


def _wrap_parts(text: str, width: int) -> str:
    """``text`` broken after its ``"; "`` separators into lines of at most ``width`` characters where the parts allow."""
    lines = [""]
    for part in text.split("; "):
        if lines[-1] and len(lines[-1]) + 2 + len(part) > width:
            lines[-1] += ";"
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]}; {part}" if lines[-1] else part
    return "\n".join(lines)


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, or ``None`` when disabled or when tqdm is not installed (it is optional)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="round", file=sys.stderr, mininterval=0.5, dynamic_ncols=True, leave=False)


def _rmse(sq: np.ndarray) -> float:
    return math.sqrt(float(sq.mean()))


#: File types :func:`plot_result` writes (matplotlib's Agg, PDF, PS and SVG canvases).
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "webp", "tif", "tiff")
PLOT_EXTRA_HINT = 'the plot needs matplotlib, an optional dependency: pip install "memoa-fast[plot]"'


def require_matplotlib():
    """Import matplotlib's ``Figure`` or raise ImportError naming the ``plot`` extra."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"{PLOT_EXTRA_HINT} ({exc})") from None
    return Figure


def plot_format(path) -> str:
    """The file type of ``path`` from its extension; ValueError naming the accepted ones."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ValueError(
            f"plot path must end in one of {', '.join('.' + f for f in PLOT_FORMATS)}; got {os.fspath(path)!r}"
        )
    return suffix


def plot_result(result: ExperimentResult, path, *, window: int | None = None, format: str | None = None) -> None:
    """Write a figure of one run (any :data:`PLOT_FORMATS` type, from ``path``'s extension or ``format``).

    Four panels, one colour per policy, one shared legend row below them,
    and the run's parameters above them:

    - the distribution (CDF) of the per-client RMSE, log-scaled, with the raw
      forecasts ``s_i`` (no game) for reference;
    - the rolling RMSE over ``window`` rounds (an integer >= 1, at most
      ``n_rounds`` used; default ``n_rounds // 50``, at least 10) of each
      policy's hedge (else eg) mixture, and of the first policy's uniform mean;
    - the worst client's RMSE over the scored rounds so far,
      ``max_i RMSE_i(t)`` (it ends at the table's "worst client");
    - the under-performer's cost ``max_i J_i`` after each round (it ends at
      the table's ``max_i J_i``).

    The burn-in is shaded. matplotlib is needed (the ``plot`` extra); no
    global pyplot state is touched.
    """
    fmt = plot_format(path) if format is None else plot_format(f"figure.{format}")
    Figure = require_matplotlib()

    c = result.config
    n, n_rounds, burn = c["n_clients"], result.n_rounds, c["burn_in"]
    window = max(10, n_rounds // 50) if window is None else check_int("window", window, low=1)
    window = min(window, n_rounds)
    rule = "hedge" if "hedge" in c["rules"] else c["rules"][0]
    colours = {p: f"C{i}" for i, p in enumerate(POLICIES)}

    fig = Figure(figsize=(12, 8.6), layout="constrained")
    # The parameters wrapped at their "; " (one line of about 230 characters ran past both edges of the figure:
    # "4000 clients," and the end of memoa-trust's "R=50 rule minimax" were cut off).
    fig.suptitle(f"MEMOA on stream {result.stream}\n" + _wrap_parts(describe_config(c, n_rounds, result.n_scored), 140),
                 fontsize=10)
    (ax_cdf, ax_mix), (ax_worst, ax_cost) = fig.subplots(2, 2)

    frac = (np.arange(n) + 1) / n
    for p, rmse_i in result.client_rmse.items():
        ax_cdf.plot(np.sort(rmse_i), frac, color=colours[p], label=p)
    ax_cdf.plot(np.sort(result.signal_rmse), frac, "k:", label="raw forecasts $s_i$ (no game)")
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("per-client RMSE (scored rounds)")
    ax_cdf.set_ylabel("fraction of clients")
    ax_cdf.set_title("per-client RMSE distribution")

    kernel = np.ones(window) / window
    rounds = np.arange(window - 1, n_rounds) + 1
    for p, e in result.round_errors.items():
        ax_mix.plot(rounds, np.sqrt(np.convolve(e[rule], kernel, mode="valid")), color=colours[p], lw=1)
    first = next(iter(result.round_errors))
    ax_mix.plot(rounds, np.sqrt(np.convolve(result.round_errors[first]["uniform"], kernel, mode="valid")), "k--", lw=1,
                label=f"uniform mean of {first}'s clients")
    ax_mix.set_yscale("log")
    ax_mix.set_ylabel(f"rolling RMSE ({window} rounds)")
    ax_mix.set_title(f"server's mixture ({rule}), rolling RMSE")

    t_axis = np.arange(1, n_rounds + 1)
    final = []
    for p, e in result.round_errors.items():
        ax_worst.plot(t_axis[burn:], e["worst_client"][burn:], color=colours[p], lw=1.2)
        final.append(e["worst_client"][-1])
    top = max((v for v in final if math.isfinite(v)), default=0.0)
    if top > 0:  # the first scored rounds are noisy: keep the settled values readable
        ax_worst.set_ylim(0, 2 * top)
    ax_worst.set_ylabel("max$_i$ RMSE$_i$ so far")
    ax_worst.set_title("worst client's RMSE over the scored rounds so far")

    for p, e in result.round_errors.items():
        ax_cost.plot(t_axis, e["max_cost"], color=colours[p], lw=1.2)
    ax_cost.set_xscale("log")  # the discounted cost is made in the first ~1 / (1 - gamma) rounds
    ax_cost.set_xlim(1, max(n_rounds, 2))  # one round: a log axis needs two distinct limits
    ax_cost.set_ylabel("max$_i$ J$_i$")
    ax_cost.set_title(f"under-performer cost max$_i$ J$_i$ (discount {c['gamma']:g}, from round 1)")

    for ax in (ax_mix, ax_worst, ax_cost):
        ax.set_xlabel("round")
    for ax in (ax_mix, ax_worst):
        ax.axvspan(0, burn, color="0.92", zorder=0, label="burn-in (not scored)" if ax is ax_mix else None)
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):  # label 2 and 5 of each decade only, so labels never overlap
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    for axis in (ax_cdf.xaxis, ax_mix.yaxis, ax_cost.xaxis):  # 0.2 rather than 2 x 10^-1 on the log axes
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(minor))
    if n_rounds > 300:  # many decades of rounds: decade labels only, or they collide
        ax_cost.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    handles, labels = ax_cdf.get_legend_handles_labels()
    h2, l2 = ax_mix.get_legend_handles_labels()
    n_items = len(labels) + len(l2)
    # At most 5 entries a row: with the five policies and the three reference lines, two rows that fit the width.
    fig.legend(handles + h2, labels + l2, loc="outside lower center", ncol=min(5, n_items), fontsize=9, frameon=False)
    fig.savefig(path, dpi=110, format=fmt)
