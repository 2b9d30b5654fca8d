"""Whole time-series pipeline: memoa_fast against an idiomatic NumPy-only pipeline, same run.

One round of the deployed pipeline (MODEL.md section 6), for N clients, d = 1:

1. forecasters: every client observes ``y(t)`` with its own noise, updates its
   normalised-LMS forecaster and forecasts ``y(t+1)`` (its signal);
2. step: the MEMOA population step on those signals;
3. server: the hedge mixture's prediction of the new states, then its
   update on ``y(t+1)`` (eta 0.5, fixed share 0.01).

``memoa`` runs the public API only (``ClientForecasters(n).observe(y)``,
``Population.step``, ``Server.predict``/``update``) with the default Numba
backend, on 1 thread and on 2 (``threads=2``; the default thread choice picks
1 thread at N = 10^5, d = 1). ``numpy`` runs ``peers.NumpyPipeline``: the same
rounds written in NumPy only, in place (one ``numpy.random.Generator`` for
the noise, ``einsum`` for the NLMS, ``scipy.special.logsumexp`` for the
server). ``peers.check_pipeline`` (run by ``test_peer_pipeline_agrees``)
shows both compute the same forecasts, states and mixture to 1e-10 when the
noise is switched off; with noise they draw from different generators, and
do the same amount of work.

Throughput is client-steps per second (``N * rounds / seconds``). Sizes:
``short`` 10^5 clients x 100 rounds (seconds), ``full`` 10^5 x 1000 (the
issue's benchmark; the NumPy pipeline takes about 20-60 s; marked ``big``).

Run from the repository root, against the installed package::

    python -P bench/bench_pipeline.py --size short        # a table with the stage breakdown, ~30 s
    python -P bench/bench_pipeline.py --size full         # 10^5 x 1000, a few minutes under load
    python -P -m pytest bench/bench_pipeline.py -m "not big" -p no:cacheprovider

On a shared machine compare the pipelines by their ratio in the same run
(the script interleaves them: memoa, numpy, memoa, numpy, ... and reports
medians), never by absolute times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from memoa_fast import Game, Population, Server
from memoa_fast.timeseries.forecasters import ClientForecasters
from memoa_fast.timeseries.streams import make_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # bench/ is not a package: found through sys.path

SIZES = {"ci": (10_000, 100), "short": (100_000, 100), "full": (100_000, 1_000)}
STAGES = ("forecast", "step", "server")
GAME = Game(q=1.0, kappa=1.0, r=0.1, gamma=0.9)
ETA, ALPHA = 0.5, 0.01


class MemoaPipeline(peers.StagedPipeline):
    """Forecasters + population + hedge server of ``n`` clients through memoa_fast's public API."""

    def __init__(self, n: int, *, threads: int | None = None, seed: int = 0):
        self.n = n
        self.forecasters = ClientForecasters(n, seed=seed, threads=threads)
        self.population = Population(GAME, n, 1, threads=threads)
        self.server = Server(n, 1, rule="hedge", eta=ETA, alpha=ALPHA, threads=threads)
        self.yhat = np.zeros(1)
        self.stage_s = dict.fromkeys(STAGES, 0.0)

    def server_round(self, x, y):
        """Predict (into the preallocated ``yhat``), then update on ``y``; returns the prediction."""
        self.server.predict(x, out=self.yhat)
        self.server.update(x, y)
        return self.yhat


def make_pipeline(kind: str, n: int):
    """``memoa-1``, ``memoa-2`` (threads) or ``numpy`` (peers.NumpyPipeline)."""
    if kind == "numpy":
        return peers.NumpyPipeline(n, GAME, eta=ETA, alpha=ALPHA)
    return MemoaPipeline(n, threads=int(kind.split("-")[1]))


def warm():
    """Compile (or load from Numba's cache) every kernel, serial and parallel, before any timing."""
    y = make_stream("logistic", 4, seed=0)
    for n in (10, 40_000):
        for threads in (1, 2):
            MemoaPipeline(n, threads=threads).run(y)


def measure(n: int, rounds: int, kinds=("memoa-1", "memoa-2", "numpy"), repeats: int = 3, seed: int = 0) -> dict:
    """Interleaved runs (each kind in turn, ``repeats`` times); medians, client-steps/s, stage shares."""
    y = make_stream("logistic", rounds + 1, seed=seed)
    seconds = {k: [] for k in kinds}
    stages = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            p = make_pipeline(kind, n)
            t0 = time.perf_counter()
            out = p.run(y, timed_stages=True)
            sec = time.perf_counter() - t0
            assert np.isfinite(np.asarray(out)).all()
            seconds[kind].append(sec)
            stages[kind].append({s: p.stage_s[s] / sec for s in STAGES})
    result = {"n": n, "rounds": rounds, "repeats": repeats, "load": os.getloadavg()[0], "kinds": {}}
    for kind in kinds:
        med = statistics.median(seconds[kind])
        result["kinds"][kind] = {
            "seconds": med, "client_steps_per_s": n * rounds / med,
            "shares": {s: statistics.median(x[s] for x in stages[kind]) for s in STAGES},
        }
    if "numpy" in kinds:
        for kind in kinds:
            result["kinds"][kind]["x_numpy"] = result["kinds"]["numpy"]["seconds"] / result["kinds"][kind]["seconds"]
    return result


def format_result(res: dict) -> str:
    lines = [(f"{res['n']} clients x {res['rounds']} rounds, medians of {res['repeats']} interleaved runs, "
              f"load average {res['load']:.2f}"),
             f"{'pipeline':<9} {'seconds':>8} {'client-steps/s':>15} {'x numpy':>8}   "
             + "  ".join(f"{s:>8}" for s in STAGES)]
    for kind, r in res["kinds"].items():
        shares = "  ".join(f"{100 * r['shares'][s]:7.1f}%" for s in STAGES)
        lines.append(f"{kind:<9} {r['seconds']:8.3f} {r['client_steps_per_s']:15.3g} {r.get('x_numpy', 1.0):7.2f}x   "
                     f"{shares}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def warmed():
    warm()


def test_peer_pipeline_agrees():
    """The NumPy pipeline computes what memoa_fast computes (noise off), to 1e-10."""
    assert peers.check_pipeline() <= peers.TOLERANCE


@pytest.mark.parametrize("kind", ["memoa-1", "memoa-2", "numpy"])
@pytest.mark.parametrize("size", ["ci", "short", pytest.param("full", marks=pytest.mark.big)])
def test_pipeline(benchmark, warmed, size, kind):
    n, rounds = SIZES[size]
    y = make_stream("logistic", rounds + 1, seed=0)
    holder = {}

    def setup():
        holder["p"] = make_pipeline(kind, n)
        return (y,), {}

    benchmark.group = f"pipeline {size}: {n} clients x {rounds} rounds"
    benchmark.pedantic(lambda series: holder["p"].run(series), setup=setup, rounds=3 if size != "full" else 1,
                       iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(n_clients=n, rounds=rounds, client_steps_per_s=n * rounds / median,
                                load=os.getloadavg()[0])


def test_memoa_beats_numpy(warmed):
    """The ratio of the two pipelines, interleaved, at the CI size on one thread each."""
    n, rounds = SIZES["ci"]
    res = measure(n, rounds, kinds=("memoa-1", "numpy"), repeats=3)
    print("\n" + format_result(res))
    # 1.47-1.53x measured at this size on 2026-11-30 (1.73x at 10^5 clients, the README's 1.7-1.8x): 1.5 failed half
    # the runs on a quiet machine; an A/B against the previous round's code measured the same ratio (no regression)
    assert res["kinds"]["memoa-1"]["x_numpy"] > 1.3, res


def main(argv=None):
    parser = argparse.ArgumentParser(description="Whole-pipeline throughput against NumPy only, with a stage breakdown.")
    parser.add_argument("--size", choices=list(SIZES), default="short")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="memoa-1,memoa-2,numpy")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    n, rounds = SIZES[args.size]
    errs = peers.check_pipeline()
    print(f"self check: the NumPy pipeline agrees with memoa_fast to {errs:.1e} (noise off)")
    warm()
    res = measure(n, rounds, kinds=tuple(args.kinds.split(",")), repeats=args.repeats)
    print(format_result(res))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
