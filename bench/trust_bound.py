"""How low can memoa-trust's worst client go? An in-hindsight floor for its whole policy family.

memoa-trust (no feed-forward, the time-series default) moves client ``i`` of
class ``j`` by ``u_i = -k_j (x_i - (q_j s_i + kappa_j m*)/w_j)``, with the
anchor ``m*`` a trust-weighted mean of the class signal means (``MODEL.md``
section 7). So every published forecast follows

.. math:: x_i(t+1) = a\\, x_i(t) + b\\, s_i(t) + \\sum_l c_l\\, \\bar s_l(t),
          \\qquad 0 \\le a < 1,\\ b \\ge 0,\\ c_l \\ge 0,

whatever the weights ``q_j, kappa_j, r_j``, the number of classes or the trust
rule: ``a = 1 - k_j``, ``b = k_j q_j / w_j``, and the ``c_l`` spread
``k_j kappa_j / w_j`` over the classes in proportion to their weight in ``m*``.
Relaxing the classes to the means of 32 noise-ranked groups (any class built
from a ranking by error is close to a union of them) and ``a, b, c`` to any
static values chosen *in hindsight* (``a`` on a grid, ``b, c`` by
non-negative least squares on the scored rounds), the RMSE of a client's best
such forecast is a floor for that client under every static setting of the
policy. The worst client is at least as bad as each of the five noisiest, so
the largest of their floors bounds memoa-trust's worst client from below
(up to the re-classing every R rounds, which makes the real policy piecewise
static).

For each series (the README's tables: ``memoa run`` defaults, 1000 clients)
this prints MEMOA's and memoa-trust's worst client, the floor, and the ratios
to MEMOA's worst: where ``floor / memoa > 0.75`` the issue's target "memoa-trust's
worst client at most 0.75x MEMOA's" cannot be met by this policy family.

    python3 bench/trust_bound.py                  # every series, about 6 minutes on 2 cores
    python3 bench/trust_bound.py --only periodic  # one
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from results_tables import series_list
from scipy.optimize import nnls
from scipy.signal import lfilter

from memoa_fast.timeseries.experiment import run_experiment
from memoa_fast.timeseries.forecasters import ClientForecasters

N_CLIENTS, GROUPS, NOISIEST = 1000, 32, 5
A_GRID = np.concatenate([np.linspace(0.0, 0.9, 46), np.linspace(0.91, 0.995, 18)])


def family_floor(y: np.ndarray, burn_in: int) -> float:
    """The largest, over the five noisiest clients, of their best in-hindsight forecast in the policy family."""
    y = y.reshape(len(y), -1)[:, 0]
    T = len(y) - 1
    f = ClientForecasters(N_CLIENTS, 1, seed=0, threads=1)  # the experiment's forecasters (same defaults, same seed)
    order = np.argsort(np.asarray(f.noise_scales))
    group = np.empty(N_CLIENTS, dtype=np.int64)
    group[order] = np.arange(N_CLIENTS) * GROUPS // N_CLIENTS
    size = np.bincount(group, minlength=GROUPS)
    noisiest = order[-NOISIEST:]
    means, own = np.empty((T, GROUPS)), np.empty((T, NOISIEST))
    for t in range(T):
        s = f.observe(y[t : t + 1])[:, 0]
        means[t] = np.bincount(group, weights=s, minlength=GROUPS) / size
        own[t] = s[noisiest]
    f.close()
    target = y[1 + burn_in :]
    floors = []
    for k in range(NOISIEST):
        inputs = np.column_stack([own[:, k], means])
        best = np.inf
        for a in A_GRID:
            X = lfilter([1.0], [1.0, -a], inputs, axis=0)[burn_in:]  # x(t+1) = a x(t) + input(t), x(0) = 0
            _, residual = nnls(X, target)
            best = min(best, residual / np.sqrt(len(target)))
        floors.append(best)
    return float(max(floors))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated series names")
    args = ap.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    print("| series | memoa worst | memoa-trust worst | floor | trust / memoa | floor / memoa | 0.75x reachable |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, _, load in series_list():
        if only and name not in only:
            continue
        y = np.asarray(load(), dtype=np.float64)
        res = run_experiment(y, stream=name, n_clients=N_CLIENTS, policies=("memoa", "memoa-trust"), rules=("hedge",))
        memoa, trust = res.scores["memoa"].worst_client_rmse, res.scores["memoa-trust"].worst_client_rmse
        floor = family_floor(y, res.config["burn_in"])
        print(f"| {name} | {memoa:.4f} | {trust:.4f} | {floor:.4f} | {trust / memoa:.3f} | {floor / memoa:.3f} | "
              f"{'yes' if floor / memoa <= 0.75 else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
