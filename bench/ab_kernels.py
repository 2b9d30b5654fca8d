"""A kernel change against an older revision of the same kernel: the same bits, and new / old speed in one process.

Loads ``kernels/_pipeline_numba.py`` and ``kernels/_numba.py`` as they were at
``--rev`` (``git show``, compiled without the disk cache) beside the installed
ones, checks that both give the same results on the benchmarked cases, then
times them interleaved (old, new, old, new, ...), medians:

- ``pipeline``: ``Pipeline.run`` (the fused round of ``bench_fused_pipeline.py``:
  d = 1, hedge, recording, p = 2) at ``--clients`` on 1 and 2 threads;
- ``step``: ``fused_step`` (one population step, K = 1, as ``bench_kernels.py``
  drives it) at N = 10^6, d = 1 and 4, and N = 10^5, d = 1, on 1 and 2 threads.

Ratios taken in one process under the same load are what a shared machine
can compare; a run in two processes an hour apart is not. Run from the
repository root, package installed::

    python3 -P bench/ab_kernels.py                     # against HEAD (uncommitted kernel edits)
    python3 -P bench/ab_kernels.py --rev 3bf99ce --what step
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_fused_pipeline as fused  # noqa: E402  (bench/ is not a package)
import bench_kernels as kernels  # noqa: E402

from memoa_fast.kernels import _numba as new_numba  # noqa: E402


def old_module(rev: str, name: str):
    """``kernels/<name>.py`` at ``rev``, executed as a module of ``memoa_fast.kernels`` (no disk cache, no seal)."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:kernels/{name}.py"], capture_output=True,
                         text=True, check=True).stdout
    for old, new in (("_jit = dict(cache=CACHE,", "_jit = dict(cache=False,"), ("\nseal(globals())\n", "\n")):
        if src.count(old) != 1:
            raise RuntimeError(f"{rev}:kernels/{name}.py no longer has {old!r} exactly once")
        src = src.replace(old, new)
    full = f"memoa_fast.kernels._ab_{name.strip('_')}"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(full, loader=None))
    mod.__package__ = "memoa_fast.kernels"
    exec(compile(src, f"<{rev}:kernels/{name}.py>", "exec"), mod.__dict__)
    sys.modules[full] = mod
    return mod


def ab_pipeline(rev: str, n: int, rounds: int, reps: int) -> None:
    old = old_module(rev, "_pipeline_numba")
    y = fused.make_stream("logistic", rounds + 1, seed=0)[:, None]
    for threads in (1, 2):
        pipes = {"old": fused.Fused(n, threads, batch=True).pipe, "new": fused.Fused(n, threads, batch=True).pipe}
        pipes["old"]._kern = old
        outs = [p.run(y[:50]) for p in pipes.values()]
        if not np.array_equal(outs[0], outs[1]):
            raise AssertionError(f"pipeline, {threads} thread(s): the old and new kernels give other bits")
        t = fused._interleaved_run_times(pipes, y, reps)
        print(f"pipeline {n} clients, {threads} thread(s): old {t['old']:.2f} ns, new {t['new']:.2f} ns per client-step; "
              f"new is {t['old'] / t['new']:.3f}x as fast (same bits)")


def ab_step(rev: str, reps: int) -> None:
    old = old_module(rev, "_numba")
    for n, d in ((10**6, 1), (10**6, 4), (10**5, 1)):
        data = kernels.Data(n, d)
        for threads in (1, 2):
            no_labels = np.empty(0, dtype=np.int64)
            calls = {k: kernels.KernelStep(m, data, kernels.GAME, no_labels, threads) for k, m in (("old", old), ("new", new_numba))}
            for c in calls.values():
                c()
            if not (np.array_equal(calls["old"].x, calls["new"].x) and np.array_equal(calls["old"].work, calls["new"].work)):
                raise AssertionError(f"step N={n} d={d}: the old and new kernels give other results")
            times = {k: [] for k in calls}
            for _ in range(reps):
                for k, c in calls.items():
                    t0 = time.perf_counter()
                    c()
                    times[k].append(time.perf_counter() - t0)
            m = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(f"step N={n} d={d}, {threads} thread(s): old {m['old']:.3f} ms, new {m['new']:.3f} ms; "
                  f"new is {m['old'] / m['new']:.3f}x as fast (same results)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision of the old kernels (default HEAD)")
    parser.add_argument("--what", choices=("pipeline", "step", "both"), default="both")
    parser.add_argument("--clients", type=int, default=100_000, help="the pipeline's clients (default 10^5)")
    parser.add_argument("--rounds", type=int, default=300, help="the pipeline's rounds per run (default 300)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved runs of the pipeline (default 7); the step makes 31")
    args = parser.parse_args(argv)
    if args.what in ("pipeline", "both"):
        ab_pipeline(args.rev, args.clients, args.rounds, args.reps)
    if args.what in ("step", "both"):
        ab_step(args.rev, 31)


if __name__ == "__main__":
    main()
