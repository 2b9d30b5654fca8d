"""Whole time-series pipeline throughput: compiled against NumPy-only, in the same run.

One round of the deployed pipeline (MODEL.md section 6), for N clients:

1. ``ClientForecasters.observe(y(t))``: noise draws (NumPy generators, per
   4096-client block), NLMS update and forecast of every client;
2. ``Population.step(s(t))``: mean fields and the MEMOA policy;
3. ``Server.predict(x(t+1))``, then ``Server.update(x(t+1), y(t+1))`` (hedge).

``compiled`` runs the Numba kernels; ``numpy`` runs ``backend="numpy"`` and the
forecaster's NumPy reference. Throughput is reported in client-steps per
second (``N * rounds / seconds``) in ``extra_info``; JIT compilation is done
before timing. Sizes: ``ci`` (10^4 clients x 100 rounds, seconds) and
``full`` (10^5 clients x 1000 rounds, the issue's benchmark: minutes, the NumPy pipeline most).

Run from the repository root, against the installed package::

    python -P -m pytest bench/bench_pipeline.py -m "not slow"  # CI size only, seconds
    python -P -m pytest bench/bench_pipeline.py                # both sizes
    python -P bench/bench_pipeline.py [--size full] [--threads 2]  # a plain table with a stage breakdown

On a shared, noisy machine compare the two pipelines by their ratio in the
same run (``test_compiled_beats_numpy``), never by absolute times.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pytest

from memoa_fast import Game, Population, Server
from memoa_fast.timeseries.forecasters import ClientForecasters
from memoa_fast.timeseries.streams import make_stream

SIZES = {"ci": (10_000, 100), "full": (100_000, 1_000)}
PIPELINES = ("compiled", "numpy")
STAGES = ("forecast", "step", "server")


class Pipeline:
    """Forecasters + MEMOA population + hedge server of ``n`` clients on one backend."""

    def __init__(self, n: int, pipeline: str, *, threads: int | None = None, seed: int = 0):
        backend = "numba" if pipeline == "compiled" else "numpy"
        self.n = n
        self.forecasters = ClientForecasters(n, seed=seed, backend=backend, threads=threads)
        self.population = Population(Game(q=1.0, kappa=1.0, r=0.1, gamma=0.9), n, 1, backend=backend, threads=threads)
        self.server = Server(n, 1, rule="hedge", eta=0.5, alpha=0.01, backend=backend, threads=threads)
        self.stage_s = dict.fromkeys(STAGES, 0.0)

    def run(self, y: np.ndarray, *, timed_stages: bool = False) -> float:
        """Run ``len(y) - 1`` rounds; returns the last mixture forecast (so nothing is optimised away)."""
        fc, pop, server = self.forecasters, self.population, self.server
        yhat = 0.0
        if not timed_stages:
            for t in range(len(y) - 1):
                x = pop.step(fc.observe(y[t]))
                yhat = server.predict(x)[0]
                server.update(x, y[t + 1])
            return float(yhat)
        clock = time.perf_counter
        acc = self.stage_s
        for t in range(len(y) - 1):
            t0 = clock()
            s = fc.observe(y[t])
            t1 = clock()
            x = pop.step(s)
            t2 = clock()
            yhat = server.predict(x)[0]
            server.update(x, y[t + 1])
            t3 = clock()
            acc["forecast"] += t1 - t0
            acc["step"] += t2 - t1
            acc["server"] += t3 - t2
        return float(yhat)


def _warm(threads=None):
    """Compile (or load from the cache) every kernel, serial and parallel, before any timing."""
    y = make_stream("logistic", 4, seed=0)
    for n in (10, 40_000):
        Pipeline(n, "compiled", threads=threads).run(y)


@pytest.fixture(scope="module")
def warmed():
    _warm()


# (pipeline, threads): the compiled pipeline on one thread and on every core, and the NumPy pipeline on one
# thread (NumPy itself is single-threaded here; one thread also keeps the forecasters' noise draws serial),
# so that compiled-1thread / numpy-1thread compares like with like.
VARIANTS = [("compiled", 1), ("compiled", None), ("numpy", 1)]


@pytest.mark.parametrize("pipeline,threads", VARIANTS, ids=["compiled-1thread", "compiled-allthreads", "numpy-1thread"])
@pytest.mark.parametrize("size", ["ci", pytest.param("full", marks=pytest.mark.slow)])
def test_pipeline(benchmark, warmed, size, pipeline, threads):
    n, rounds = SIZES[size]
    y = make_stream("logistic", rounds + 1, seed=0)
    holder = {}

    def setup():
        holder["p"] = Pipeline(n, pipeline, threads=threads)
        return (y,), {}

    def target(series):
        return holder["p"].run(series)

    benchmark.group = f"pipeline {size}: {n} clients x {rounds} rounds"
    benchmark.pedantic(target, setup=setup, rounds=3 if size == "ci" else 1, iterations=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(n_clients=n, rounds=rounds, threads=holder["p"].population.threads,
                                client_steps_per_s=n * rounds / best)
    assert np.isfinite(holder["p"].server.predict(holder["p"].population.states)).all()


def test_compiled_beats_numpy(warmed):
    """Guard by the ratio of the two pipelines measured here, at the CI size, on one thread each."""
    n, rounds = SIZES["ci"]
    y = make_stream("logistic", rounds + 1, seed=0)
    times = {}
    for pipeline in PIPELINES:
        best = np.inf
        for _ in range(3):
            p = Pipeline(n, pipeline, threads=1)
            t0 = time.perf_counter()
            p.run(y)
            best = min(best, time.perf_counter() - t0)
        times[pipeline] = best
    ratio = times["numpy"] / times["compiled"]
    print(f"\ncompiled {n * rounds / times['compiled']:.3g} client-steps/s, numpy {n * rounds / times['numpy']:.3g}, ratio {ratio:.2f}")
    assert ratio > 1.5, times


def main(argv=None):
    parser = argparse.ArgumentParser(description="Whole-pipeline throughput with a per-stage breakdown.")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: every core)")
    args = parser.parse_args(argv)
    n, rounds = SIZES[args.size]
    _warm(args.threads)
    y = make_stream("logistic", rounds + 1, seed=0)
    print(f"{n} clients x {rounds} rounds, threads={args.threads or os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print(f"{'pipeline':<9} {'seconds':>8} {'client-steps/s':>15}   " + "  ".join(f"{s:>8}" for s in STAGES))
    rates = {}
    for pipeline in PIPELINES:
        p = Pipeline(n, pipeline, threads=args.threads)
        t0 = time.perf_counter()
        p.run(y, timed_stages=True)
        sec = time.perf_counter() - t0
        rates[pipeline] = n * rounds / sec
        shares = "  ".join(f"{100 * p.stage_s[s] / sec:7.1f}%" for s in STAGES)
        print(f"{pipeline:<9} {sec:8.2f} {rates[pipeline]:15.3g}   {shares}")
    print(f"speed-up compiled / numpy: {rates['compiled'] / rates['numpy']:.2f}x")


if __name__ == "__main__":
    main()
