"""memoa-trust against the four policies on every stream and real series we have (issue 10).

For each series: the same N clients (forecasters, noise), every policy of
``memoa run`` plus memoa-trust variants (kappa, feed-forward on or off), the
hedge server mixture; RMSE of the worst client, the average client and the
mixture after the burn-in, and ``max_i J_i``. Defaults are chosen by the mean
over all series of each column's ratio to the best of the four baselines.

    python3 bench/trust_study.py                      # every series, about 5 minutes on 2 cores
    python3 bench/trust_study.py --quick              # the four synthetic streams, shorter
    python3 bench/trust_study.py --json bench/trust_study.json

Real series are read from ``../shared/datasets`` (skipped where absent). FRED
columns have empty cells (holidays, later starts): those rows are dropped
(``load_csv_series(..., missing="drop")``, ``memoa run --missing drop``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from memoa_fast import ClientForecasters, Game, Population, Server, load_csv_series, make_stream
from memoa_fast.timeseries.trust import TrustPopulation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BASELINES = ("memoa", "greedy", "local", "consensus")
COLUMNS = ("worst", "average", "hedge")


def all_series(quick: bool, rounds: int) -> dict[str, np.ndarray]:
    out = {name: make_stream(name, rounds + 1, seed=0) for name in ("logistic", "periodic", "concept", "concept-drift")}
    if quick or not DATA.is_dir():
        return out
    for name in ("ETTh1", "ETTh2", "ETTm1"):
        out[f"{name}/OT"] = load_csv_series(DATA / "ett" / f"{name}.csv", "OT", max_rows=20_000)
    for col in ("AUD", "GBP", "CAD", "CHF", "CNY", "JPY", "NZD", "SGD"):
        out[f"exchange/{col}"] = load_csv_series(DATA / "exchange_rate" / "exchange_rate.csv", col)
    out["airline"] = load_csv_series(DATA / "airline_passengers" / "airline-passengers.csv", "Passengers", warmup=24)
    for col in ("Canada", "Japan", "United Kingdom", "Switzerland"):
        out[f"FRED/{col}"] = load_csv_series(DATA / "exchange_rate" / "fred_h10_daily_1971_2017.csv", col, missing="drop")
    return out


def run_one(y: np.ndarray, variants: dict, n_clients: int, eta: float, alpha: float, seed: int = 0) -> dict:
    y = np.ascontiguousarray(y, dtype=np.float64).reshape(len(y), -1)
    T, d = y.shape[0] - 1, y.shape[1]
    burn = min(500, T // 5)
    fc = ClientForecasters(n_clients, d, seed=seed, lags=2, noise_range=(0.02, 1.0), threads=1)
    pops = {name: make() for name, make in variants.items()}
    servers = {name: Server(n_clients, d, rule="hedge", eta=eta, alpha=alpha, threads=1) for name in pops}
    sq = {name: np.zeros(n_clients) for name in pops}
    mix = {name: 0.0 for name in pops}
    yhat = np.empty(d)
    for t in range(T):
        s = fc.observe(y[t])
        target = y[t + 1]
        for name, pop in pops.items():
            x = pop.step(s)
            servers[name].predict(x, out=yhat)
            if t >= burn:
                e = x - target
                sq[name] += np.einsum("ij,ij->i", e, e)
                mix[name] += float((yhat - target) @ (yhat - target))
            servers[name].update(x, target)
            if hasattr(pop, "observe"):
                pop.observe(target)
    n = T - burn
    res = {}
    for name, pop in pops.items():
        rmse = np.sqrt(sq[name] / n)
        res[name] = {"worst": float(rmse.max()), "average": float(rmse.mean()), "hedge": math.sqrt(mix[name] / n),
                     "max_cost": float(pop.regret)}
    return res


def variants(kappa: float, q: float, r: float, gamma: float, n_clients: int, classes: int, reclass: int,
             trust_kappas=(1.0, 3.0), feedforwards=(True, False), powers=(1.0,), minimax: bool = False) -> dict:
    out = {p: (lambda p=p: Population(Game(q, kappa, r, gamma, p), n_clients, 1, threads=1)) for p in BASELINES}
    for tk in trust_kappas:
        for ff in feedforwards:
            for pw in powers:
                out[f"trust k{tk:g} {'ff' if ff else 'noff'} p{pw:g}"] = (
                    lambda tk=tk, ff=ff, pw=pw: TrustPopulation(
                        n_clients, 1, n_classes=classes, reclass=reclass, q=q, kappa=tk, r=r, gamma=gamma,
                        feedforward=ff, power=pw, rule="error", threads=1))
            if minimax:  # the second rule: beta tuned online to lower the worst class's measured cost
                out[f"trust k{tk:g} {'ff' if ff else 'noff'} minimax"] = (
                    lambda tk=tk, ff=ff: TrustPopulation(
                        n_clients, 1, n_classes=classes, reclass=reclass, q=q, kappa=tk, r=r, gamma=gamma,
                        feedforward=ff, power=1.5, rule="minimax", threads=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3000, help="rounds of the synthetic streams")
    ap.add_argument("--eta", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--reclass", type=int, default=50)
    ap.add_argument("--kappa", type=float, default=1.0, help="kappa of the four baselines")
    ap.add_argument("--trust-kappas", default="1,3", help="kappas of the memoa-trust variants")
    ap.add_argument("--feedforward", default="on,off", help="memoa-trust variants: on, off or both")
    ap.add_argument("--powers", default="1", help="memoa-trust variants: exponents of median(v)/mean_j(v)")
    ap.add_argument("--minimax", action="store_true", help="add memoa-trust with rule='minimax' (beta chosen online)")
    ap.add_argument("--json")
    args = ap.parse_args()
    series = all_series(args.quick, args.rounds)
    table = {}
    for name, y in series.items():
        t0 = time.perf_counter()
        made = variants(args.kappa, 1.0, 0.1, 0.9, args.clients, args.classes, args.reclass,
                        tuple(float(k) for k in args.trust_kappas.split(",")),
                        tuple({"on": True, "off": False}[f] for f in args.feedforward.split(",")),
                        tuple(float(p) for p in args.powers.split(",")), args.minimax)
        table[name] = run_one(y, made, args.clients, args.eta, args.alpha)
        best = {c: min(table[name][p][c] for p in BASELINES) for c in COLUMNS}
        row = "  ".join(f"{v}: " + "/".join(f"{table[name][v][c]:.3f}" for c in COLUMNS) for v in table[name])
        print(f"{name} ({len(y)} rows, {time.perf_counter() - t0:.1f} s) best baseline "
              + "/".join(f"{best[c]:.3f}" for c in COLUMNS) + "\n   " + row, flush=True)
    print("\nmean over series of (variant / best baseline), columns worst / average / hedge; and worst vs memoa:")
    names = list(next(iter(table.values())))
    summary = {}
    for v in names:
        ratios = {c: float(np.mean([table[s][v][c] / min(table[s][p][c] for p in BASELINES) for s in table]))
                  for c in COLUMNS}
        vs_memoa = float(np.mean([table[s][v]["worst"] / table[s]["memoa"]["worst"] for s in table]))
        within = {c: sum(table[s][v][c] <= 1.1 * min(table[s][p][c] for p in BASELINES) for s in table) for c in COLUMNS}
        summary[v] = {"mean_ratio": ratios, "worst_vs_memoa": vs_memoa, "within_10pct": within}
        print(f"  {v:18s} " + "  ".join(f"{c} {ratios[c]:.3f}" for c in COLUMNS)
              + f"  worst/memoa {vs_memoa:.3f}  within 10% of best on " + "/".join(str(within[c]) for c in COLUMNS)
              + f" of {len(table)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
