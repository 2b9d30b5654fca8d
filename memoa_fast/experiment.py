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
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ._validation import check_choice, check_int
from .forecasters import ClientForecasters, load_kernels
from .game import POLICIES, Game
from .population import Population
from .server import RULES, Server


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


@dataclass
class ExperimentResult:
    """Everything one run measured.

    ``scores`` maps policy -> :class:`PolicyScores`; ``client_rmse`` maps
    policy -> per-client RMSE array; ``round_errors`` maps policy -> a dict of
    per-round squared errors (keys ``"uniform"``, each server rule, and
    ``"clients"``: the mean over clients), over all ``n_rounds`` rounds
    including the burn-in; ``signal_rmse`` is the per-client RMSE of the raw
    forecasts ``s_i`` (no game) as a reference.
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

    def to_dict(self) -> dict:
        """A JSON-ready summary (no per-client or per-round arrays)."""
        return {
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
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """The scores as a Markdown table (readable as plain text), with a one-line heading."""
        c = self.config
        rules = list(c["rules"])
        head = ["policy", *(f"mixture {r}" for r in rules), "uniform mean", "worst client", "average client", "max_i J_i"]
        rows = []
        for name, s in self.scores.items():
            rows.append(
                [name, *(f"{s.mixture_rmse[r]:.4f}" for r in rules), f"{s.uniform_rmse:.4f}",
                 f"{s.worst_client_rmse:.4f}", f"{s.average_client_rmse:.4f}", _fmt_cost(s.max_cost)]
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda cells: "| " + " | ".join(  # noqa: E731
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ) + " |"
        rule = "| " + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths)) + " |"
        noise = c["noise_range"]
        title = (
            f"RMSE on stream {self.stream}: {c['n_clients']} clients, {self.n_rounds} rounds "
            f"({self.n_scored} scored after a burn-in of {c['burn_in']}), seed {c['seed']}; "
            f"q={c['q']:g} kappa={c['kappa']:g} r={c['r']:g} gamma={c['gamma']:g}, "
            f"eta={c['eta']:g} alpha={c['alpha']:g}; client noise {noise[0]:g}..{noise[1]:g}, lags {c['lags']}"
        )
        foot = (
            f"raw client forecasts s_i (no game): worst client {self.signal_rmse.max():.4f}, "
            f"average client {self.signal_rmse.mean():.4f}; {self.elapsed_s:.1f} s"
        )
        return "\n".join([title, "", line(head), rule, *map(line, rows), "", foot])


def _fmt_cost(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def run_experiment(
    series,
    *,
    stream: str = "custom",
    n_clients: int = 1000,
    q: float = 1.0,
    kappa: float = 1.0,
    r: float = 0.1,
    gamma: float = 0.9,
    policies=POLICIES,
    rules=RULES,
    eta: float = 0.5,
    alpha: float = 0.01,
    seed: int = 0,
    lags: int = 2,
    noise_range: tuple[float, float] = (0.02, 1.0),
    mu: float = 0.1,
    burn_in: int | None = None,
    backend: str = "numba",
    threads: int | None = None,
    progress: bool = False,
) -> ExperimentResult:
    """Run every policy on one stream with the same clients and score them.

    Parameters
    ----------
    series : array_like, shape (T,) or (T, d)
        The stream ``y(0..T-1)``, finite, ``T >= 2`` (z-scored streams from
        :mod:`memoa_fast.streams` are the intended input).
    stream : str
        A name for the tables.
    n_clients : int
        Clients N.
    q, kappa, r, gamma : float
        Weights of the game (see :class:`~memoa_fast.Game`).
    policies : sequence of str
        Subset of ``("memoa", "greedy", "local", "consensus")``, in table order.
    rules : sequence of str
        Server rules to score, subset of ``("eg", "hedge")``.
    eta, alpha : float
        Server learning rate and fixed share (see :class:`~memoa_fast.Server`).
    seed : int
        Seeds the clients' noise scales and noise (:class:`ClientForecasters`).
    lags, noise_range, mu
        The clients' forecasters (see :class:`ClientForecasters`).
    burn_in : int, optional
        Rounds left out of the RMSEs; default ``min(500, (T-1) // 5)``.
    backend : {"numba", "cython", "numpy"}
        Kernels of the populations and servers; the forecasters run the Numba
        kernel unless ``"numpy"`` (there is no Cython forecaster).
    threads : int, optional
        Threads for every kernel (default: every core).
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    ExperimentResult
        RMSE of each server rule's mixture, of the uniform mean, of the worst
        and the average client, and ``max_i J_i``, for each policy.
    """
    y = np.asarray(series, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] < 2:
        raise ValueError(f"series must have shape (T,) or (T, d) with T >= 2, got shape {np.shape(series)}")
    if not np.isfinite(y).all():
        raise ValueError(f"series must be finite; first bad value at round {int(np.argwhere(~np.isfinite(y))[0, 0])}")
    y = np.ascontiguousarray(y)
    T, d = y.shape
    n_rounds = T - 1
    policies = tuple(check_choice("policy", p, POLICIES) for p in policies)
    rules = tuple(check_choice("rule", rr, RULES) for rr in rules)
    if not policies or not rules:
        raise ValueError("give at least one policy and one server rule")
    if len(set(policies)) != len(policies) or len(set(rules)) != len(rules):
        raise ValueError(f"policies and rules must not repeat, got {policies!r} and {rules!r}")
    burn_in = min(500, n_rounds // 5) if burn_in is None else check_int("burn_in", burn_in, low=0)
    if burn_in >= n_rounds:
        raise ValueError(f"burn_in must be smaller than the number of rounds {n_rounds} (series length - 1), got {burn_in}")
    n_clients = check_int("n_clients", n_clients, low=1)

    game = Game(q, kappa, r, gamma)
    forecasters = ClientForecasters(
        n_clients, d, lags=lags, noise_range=noise_range, mu=mu, seed=seed, backend=backend, threads=threads
    )
    kern = load_kernels(backend)
    pops = {p: Population(game.with_policy(p), n_clients, d, backend=backend, threads=threads) for p in policies}
    servers = {
        p: {rr: Server(n_clients, d, rule=rr, eta=eta, alpha=alpha, backend=backend, threads=threads) for rr in rules}
        for p in policies
    }
    score_threads = forecasters._threads_used
    work = np.zeros(kern.score_work_shape(n_clients, d))
    mean_buf = np.zeros(d)
    sq_err = {p: np.zeros(n_clients) for p in policies}
    sq_sig = np.zeros(n_clients)
    errs = {p: {k: np.zeros(n_rounds) for k in ("uniform", *rules, "clients")} for p in policies}

    from tqdm.auto import tqdm

    bar = tqdm(total=n_rounds, desc=f"memoa {stream}", unit="round", file=sys.stderr, disable=not progress,
               mininterval=0.5, dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    try:
        for t in range(n_rounds):
            s = forecasters.observe(y[t])
            target = y[t + 1]
            record = t >= burn_in
            kern.score_step(s, target, record, sq_sig, work, mean_buf, score_threads)
            for p in policies:
                x = pops[p].step(s)
                e = errs[p]
                for rr, server in servers[p].items():
                    diff = server.predict(x) - target
                    e[rr][t] = float(diff @ diff)
                e["clients"][t] = kern.score_step(x, target, record, sq_err[p], work, mean_buf, score_threads) / n_clients
                diff = mean_buf - target
                e["uniform"][t] = float(diff @ diff)
                for server in servers[p].values():
                    server.update(x, target)
            bar.update(1)
    finally:
        bar.close()
        forecasters.close()
    elapsed = time.perf_counter() - start

    n_scored = n_rounds - burn_in
    scored = slice(burn_in, n_rounds)
    scores, client_rmse = {}, {}
    for p in policies:
        rmse_i = np.sqrt(sq_err[p] / n_scored)
        client_rmse[p] = rmse_i
        worst = int(np.argmax(rmse_i))
        e = errs[p]
        scores[p] = PolicyScores(
            policy=p,
            mixture_rmse={rr: _rmse(e[rr][scored]) for rr in rules},
            uniform_rmse=_rmse(e["uniform"][scored]),
            worst_client_rmse=float(rmse_i[worst]),
            worst_client=worst,
            average_client_rmse=float(rmse_i.mean()),
            max_cost=pops[p].regret,
            max_cost_client=pops[p].worst_agent,
            client_rmse_quantiles={str(qq): float(v) for qq, v in zip((0, 0.1, 0.5, 0.9, 1), np.quantile(rmse_i, [0, 0.1, 0.5, 0.9, 1]))},
        )
    config = {
        "n_clients": n_clients, "dim": d, "q": game.q, "kappa": game.kappa, "r": game.r, "gamma": game.gamma,
        "policies": list(policies), "rules": list(rules), "eta": float(eta), "alpha": float(alpha), "seed": seed,
        "lags": lags, "noise_range": [float(v) for v in forecasters.noise_range], "mu": float(mu), "burn_in": burn_in,
        "backend": backend, "threads": forecasters.threads,
    }
    return ExperimentResult(
        stream=stream, config=config, n_rounds=n_rounds, n_scored=n_scored, scores=scores, client_rmse=client_rmse,
        round_errors=errs, signal_rmse=np.sqrt(sq_sig / n_scored), elapsed_s=elapsed,
    )


def _rmse(sq: np.ndarray) -> float:
    return math.sqrt(float(sq.mean()))


def plot_result(result: ExperimentResult, path, *, window: int | None = None) -> None:
    """Write a PNG: per-client RMSE distribution per policy, and rolling errors over time.

    Left: the empirical distribution (CDF) of the per-client RMSE of each
    policy, log-scaled, with the raw forecasts for reference. Right: rolling
    RMSE over ``window`` rounds (default ``n_rounds // 50``, at least 10) of
    each policy's hedge (else eg) mixture and of MEMOA's uniform mean; the
    burn-in is shaded.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

    window = window or max(10, result.n_rounds // 50)
    rule = "hedge" if "hedge" in result.config["rules"] else result.config["rules"][0]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    n = result.config["n_clients"]
    frac = (np.arange(n) + 1) / n
    for p, rmse_i in result.client_rmse.items():
        ax1.plot(np.sort(rmse_i), frac, label=f"{p} (worst {rmse_i.max():.3f})")
    ax1.plot(np.sort(result.signal_rmse), frac, "k:", label=f"raw forecasts (worst {result.signal_rmse.max():.3f})")
    ax1.set_xscale("log")
    ax1.set_xlabel("per-client RMSE")
    ax1.set_ylabel("fraction of clients")
    ax1.set_title("per-client RMSE distribution")
    ax1.legend(fontsize=8)
    kernel = np.ones(window) / window
    rounds = np.arange(window - 1, result.n_rounds) + 1
    for p, e in result.round_errors.items():
        ax2.plot(rounds, np.sqrt(np.convolve(e[rule], kernel, mode="valid")), lw=1, label=f"{p}: mixture {rule}")
    first = next(iter(result.round_errors))
    ax2.plot(rounds, np.sqrt(np.convolve(result.round_errors[first]["uniform"], kernel, mode="valid")), "k--", lw=1,
             label=f"{first}: uniform mean")
    ax2.axvspan(0, result.config["burn_in"], color="0.9", label="burn-in")
    ax2.set_yscale("log")
    ax2.set_xlabel("round")
    ax2.set_ylabel(f"rolling RMSE ({window} rounds)")
    ax2.set_title(f"stream {result.stream}, {n} clients")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
