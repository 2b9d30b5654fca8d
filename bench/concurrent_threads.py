"""Two runs at once on one machine: the default thread choice must never lose to ``threads=1``.

A parameter sweep runs several ``memoa`` processes side by side. Each process
here times the population step (N agents, dimension d) and the fused
pipeline's round (``Pipeline.round``, N clients, d = 1: its default goes
parallel from far fewer values, see ``memoa_fast/_backends.py``) with the
default thread choice and with ``threads=1`` (and ``threads=2``),
interleaved, medians of many calls; the script runs one such process alone,
then two at once, and prints the ratio default / threads=1 for each case
(lower is better; the guard fails above ``LIMIT``).

    python3 bench/concurrent_threads.py            # alone, then two at once
    python3 bench/concurrent_threads.py --json out.json

Each worker process is this file with ``--worker``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = [(10_000, 1), (10_000, 4), (100_000, 1), (100_000, 4)]
PIPELINE_CASES = [32_768, 100_000]  # clients, d = 1: at and above the pipeline's default parallel work
MODES = ("default", 1, 2)
LIMIT = 1.5
MIN_CALLS = 30  # per mode, however long it takes: a median of fewer calls says little on a slow or loaded machine


def _time_modes(calls: dict, seconds: float) -> dict:
    """Median seconds of each mode's call, interleaved for ``seconds`` and at least :data:`MIN_CALLS` calls each (after 3 warm calls)."""
    import numpy as np

    for call in calls.values():  # compile (or load) and warm
        for _ in range(3):
            call()
    times = {m: [] for m in calls}
    modes = list(calls)
    # Interleaved, in a new random order each cycle: a call right after a two-thread call runs beside that region's
    # OpenMP thread, still spinning (10000x1: 10-20% slower). A fixed order (default, 1, 2) put that cost on the default
    # every cycle, which measured 1.18x threads=1 while both ran the same one-thread kernel (1.52x in one CI run).
    rng = np.random.default_rng(0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[1]) < MIN_CALLS:
        for i in rng.permutation(len(modes)):
            t0 = time.perf_counter()
            calls[modes[i]]()
            times[modes[i]].append(time.perf_counter() - t0)
    return {str(m): float(np.median(v)) for m, v in times.items()}, len(times[1])


def worker(seconds: float) -> dict:
    import numpy as np

    from memoa_fast import Game, Pipeline, Population

    out = {}
    rng = np.random.default_rng(0)
    for n, d in CASES:
        signals = rng.normal(size=(n, d))
        pops = {m: Population(Game(), n, d, threads=None if m == "default" else m) for m in MODES}
        med, count = _time_modes({m: (lambda pop=pop: pop.step(signals)) for m, pop in pops.items()}, seconds)
        out[f"{n}x{d}"] = {"median_s": med, "threads_used": pops["default"]._threads_used,
                           "default_over_one": med["default"] / med["1"], "steps": count}
    for n in PIPELINE_CASES:
        pipes = {m: Pipeline(n, threads=None if m == "default" else m) for m in MODES}
        med, count = _time_modes({m: (lambda pipe=pipe: pipe.round(0.5)) for m, pipe in pipes.items()}, seconds)
        out[f"pipeline {n}x1"] = {"median_s": med, "threads_used": pipes["default"]._threads_used,
                                  "default_over_one": med["default"] / med["1"], "steps": count}
    return out


def run(n_procs: int, seconds: float) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n_procs)]
    return [json.loads(p.communicate()[0]) for p in procs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per case per process")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.seconds)))
        return 0
    results = {"alone": run(1, args.seconds), "two at once": run(2, args.seconds),
               "load_before": os.getloadavg()[0]}
    worst = 0.0
    for label in ("alone", "two at once"):
        for k, res in enumerate(results[label]):
            for case, r in res.items():
                ms = {m: f"{v * 1e3:.3f}" for m, v in r["median_s"].items()}
                print(f"{label:12s} proc {k} {case:>18s}: default uses {r['threads_used']} thread(s); "
                      f"median ms {ms}; default / threads=1 = {r['default_over_one']:.2f}")
                worst = max(worst, r["default_over_one"])
    print(f"worst default / threads=1: {worst:.2f} (limit {LIMIT})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
