"""Benchmark regression guard: compiled kernels' speedup over the NumPy reference.

Fails (exit status 1) when a compiled kernel's speedup over the NumPy
reference, measured in this very run, falls below the floor stored in
``bench/floors.json``. Only ratios of medians are compared, never absolute
times, so the guard holds on a slow or shared machine: both sides of a ratio
are timed interleaved (reference, compiled, reference, ...), under the same
load.

Usage (from the repository root, with the package installed)::

    python -P bench/guard.py --short       # CI: N = 10^5, one thread, about 20 s
    python -P bench/guard.py               # + N = 10^6 and two threads, about 4 min
    python -P bench/guard.py --update-floors --repeat 3   # re-measure and store floors (both sizes)

``--update-floors`` stores ``margin`` (default 0.5) times each speedup's
smallest value over ``--repeat`` runs: a real regression (a kernel that stops vectorising, a lost fusion,
a per-step allocation) costs far more than the factor of two that load noise
can. Two-thread cases are only in the full guard: on a loaded CI runner a
parallel region may wait for a second core and its time means little.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# The reference runs on one thread, like its ufuncs: a multithreaded BLAS
# (the mixture's matrix-vector product) makes its time depend on the load.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

FLOORS = Path(__file__).with_name("floors.json")
KERNELS = ("mean_field", "policy_update", "fused_step", "fused_step+mixture", "mixture_predict", "mixture_update")
DIMS = (1, 4, 16)


def backends(threads_list):
    from memoa_fast.kernels import _numba

    out = [("numba", _numba, t) for t in threads_list]
    try:
        from memoa_fast.kernels import _cython

        out += [("cython", _cython, t) for t in threads_list]
    except ImportError:
        print("guard: the Cython extension is not built; checking Numba only", file=sys.stderr)
    return out


def make_call(kernel, kern, n, d, threads, seed=0):
    """A zero-argument call of ``kernel`` on its own fresh population (or None if the backend lacks it)."""
    from memoa_fast import Game
    from memoa_fast.kernels import work_shape

    if kernel.startswith("fused_step") and not hasattr(kern, "fused_step"):
        return None
    rng = np.random.default_rng(seed)
    x, s = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    J, work = np.zeros(n), np.zeros(work_shape(n, d))
    mx, ms, nx, yhat, y = x.mean(axis=0), np.zeros(d), np.zeros(d), np.zeros(d), rng.standard_normal(d)
    log_p, empty = np.full(n, -math.log(n)), np.empty(0)
    g = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    c = g.coefficients
    if kernel == "mean_field":
        return lambda: kern.mean_field(x, s, J, work, mx, ms, threads)
    if kernel == "policy_update":
        return lambda: kern.policy_update(x, s, J, c.gain, c.signal, c.signal_mean, c.state_mean, ms, g.q, g.kappa, g.r, mx, 0.5, threads)
    if kernel.startswith("fused_step"):
        lp = log_p if kernel.endswith("mixture") else empty
        return lambda: kern.fused_step(x, s, J, work, c.gain, c.signal, c.signal_mean, c.state_mean, g.q, g.kappa, g.r,
                                       0.5, mx, ms, nx, True, lp, yhat, threads)
    if kernel == "mixture_predict":
        return lambda: kern.mixture_predict(log_p, x, work, yhat, threads)
    if kernel == "mixture_update":
        return lambda: kern.mixture_update(log_p, x, y, yhat, 1, 0.5, 0.01, work, threads)
    raise ValueError(kernel)


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speedup(reference, compiled, rounds):
    """Median reference time over median compiled time, timed interleaved."""
    reference(), compiled(), compiled()  # warm: JIT or cache load, page faults
    ref_t, comp_t = [], []
    for _ in range(rounds):
        ref_t.append(_time(reference))
        # Several compiled calls per reference call keep the two sides' wall time comparable.
        k = int(min(50, max(1, ref_t[-1] / max(_time(compiled), 1e-7))))
        comp_t.extend(_time(compiled) for _ in range(k))
    return statistics.median(ref_t) / statistics.median(comp_t), statistics.median(ref_t), statistics.median(comp_t)


def cases(short: bool):
    two = 2 if (os.cpu_count() or 1) >= 2 else 1
    sizes = [(10**5, (1,))] if short else [(10**5, (1,)), (10**6, tuple(sorted({1, two})))]
    for n, threads_list in sizes:
        for d in DIMS:
            for kernel in KERNELS:
                for name, kern, threads in backends(threads_list):
                    yield kernel, n, d, name, kern, threads


def key(kernel, n, d, name, threads):
    return f"{kernel}/{name}-{threads}/N{n:.0e}/d{d}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI version: N = 10^5, one thread (< 60 s)")
    parser.add_argument("--update-floors", action="store_true", help="store margin x measured speedups as the new floors")
    parser.add_argument("--margin", type=float, default=0.5, help="floor = margin x measured speedup (with --update-floors)")
    parser.add_argument("--rounds", type=int, default=None, help="reference calls per case (default 7 short, 5 full)")
    parser.add_argument("--floors", type=Path, default=FLOORS, help="floors file (default bench/floors.json)")
    parser.add_argument("--repeat", type=int, default=1, help="with --update-floors: runs whose smallest speedups are kept")
    args = parser.parse_args(argv)
    from memoa_fast.kernels import _reference

    rounds = args.rounds or (7 if args.short else 5)
    floors = json.loads(args.floors.read_text()) if args.floors.exists() else {}
    started = time.perf_counter()
    measured, failures, missing = {}, [], []
    print(f"{'case':<46}{'numpy ms':>10}{'compiled ms':>13}{'speedup':>9}{'floor':>8}")
    todo = list(cases(args.short)) * (max(1, args.repeat) if args.update_floors else 1)
    for kernel, n, d, name, kern, threads in todo:
        compiled = make_call(kernel, kern, n, d, threads)
        if compiled is None:
            continue
        reference = make_call(kernel, _reference, n, d, 1)
        ratio, ref_med, comp_med = speedup(reference, compiled, rounds)
        k = key(kernel, n, d, name, threads)
        floor = floors.get(k)
        if floor is not None and ratio < floor:  # a load spike? measure once more, keep the better
            ratio, ref_med, comp_med = max((ratio, ref_med, comp_med), speedup(reference, compiled, rounds))
        measured[k] = min(ratio, measured.get(k, ratio))
        verdict = ""
        if floor is None:
            missing.append(k)
            verdict = "  (no floor)"
        elif ratio < floor:
            failures.append((k, ratio, floor))
            verdict = "  REGRESSION"
        print(f"{k:<46}{ref_med * 1e3:>10.3f}{comp_med * 1e3:>13.4f}{ratio:>8.1f}x{floor if floor else float('nan'):>8.1f}{verdict}")
    elapsed = time.perf_counter() - started
    if args.update_floors:
        floors.update({k: round(args.margin * v, 1) for k, v in measured.items()})
        args.floors.write_text(json.dumps(dict(sorted(floors.items())), indent=1) + "\n")
        print(f"guard: stored {len(measured)} floors (margin {args.margin}) in {args.floors}")
        return 0
    print(f"guard: {len(measured)} cases in {elapsed:.1f} s; {len(failures)} below their floor; {len(missing)} without a floor")
    for k, ratio, floor in failures:
        print(f"guard: REGRESSION {k}: {ratio:.2f}x the NumPy reference, floor {floor:.2f}x", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
