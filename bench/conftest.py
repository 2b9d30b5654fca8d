"""Shared pieces of the benchmarks: markers, the STREAM triad, a summary table.

The benchmarks run against the installed package, from the repository root::

    python -P -m pytest bench/bench_kernels.py -p no:cacheprovider            # full grid, 4-10 min
    python -P -m pytest bench/bench_kernels.py -m "not big" -p no:cacheprovider  # N <= 10^5, about 1 min

Every timing is a median; bandwidth is reported as a fraction of a STREAM
triad ``a = b + s c`` measured in the same run (see :class:`Machine`).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "big: N >= 10^6 agents (skip with -m 'not big' for a short run)")
    # A benchmark times one process alone: the test suite's two xdist workers (pyproject's addopts "-n 2") are
    # turned off here, before xdist starts them and before pytest-benchmark would disable every benchmark for them.
    if getattr(config.option, "dist", "no") != "no":
        config.option.dist, config.option.numprocesses, config.option.tx = "no", 0, []


def pytest_addoption(parser):
    group = parser.getgroup("memoa-bench")
    group.addoption("--bench-summary", default=None, metavar="PATH",
                    help="write the kernel benchmark summary (medians, speedups, bandwidth) to this JSON file")


# --------------------------------------------------------------------------- STREAM triad
TRIAD_DOUBLES = 16_000_000  # three arrays of 128 MB: 384 MB, far beyond L2 and most of the shared L3

_triad = {}


def _triad_kernels():
    if not _triad:
        from numba import njit, prange

        @njit(cache=False, nogil=True, boundscheck=False)
        def serial(a, b, c, scalar):
            for i in range(a.shape[0]):
                a[i] = b[i] + scalar * c[i]

        @njit(parallel=True, cache=False, nogil=True, boundscheck=False)
        def parallel(a, b, c, scalar):
            for i in prange(a.shape[0]):
                a[i] = b[i] + scalar * c[i]

        _triad.update(serial=serial, parallel=parallel)
    return _triad


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def triad_bandwidth(n_doubles: int, threads: int, repeats: int = 9) -> float:
    """Median STREAM-triad bandwidth in GB/s (24 bytes per element: two reads, one write)."""
    from memoa_fast.kernels._threads import Threads

    kern = _triad_kernels()["serial" if threads == 1 else "parallel"]
    a, b, c = np.zeros(n_doubles), np.ones(n_doubles), np.full(n_doubles, 2.0)
    with Threads(threads):
        seconds = median_seconds(lambda: kern(a, b, c, 3.0), repeats, warmup=2)
    return 24.0 * n_doubles / seconds / 1e9


class Machine:
    """The memory bandwidth this run got: STREAM triad at 384 MB, one and two threads.

    ``triad[threads]`` is measured when the session starts and again when it
    ends (``triad_end``); fractions of bandwidth use the mean of the two, so
    that a load change during a long run shows as a gap between them.
    ``matched(n_doubles, threads)`` is a triad over arrays of the kernel's
    own size (at N = 10^6 the arrays partly fit the shared L3, and a kernel
    should be compared with what the machine does at that footprint too).
    """

    TRIAD_DOUBLES = TRIAD_DOUBLES
    median_seconds = staticmethod(median_seconds)

    def __init__(self):
        self.threads = (1, 2) if (os.cpu_count() or 1) >= 2 else (1,)
        self.triad = {t: triad_bandwidth(TRIAD_DOUBLES, t) for t in self.threads}
        self.triad_end: dict[int, float] = {}
        self._matched: dict[tuple[int, int], float] = {}

    def reference(self, threads: int) -> float:
        start = self.triad[threads]
        end = self.triad_end.get(threads, start)
        return 0.5 * (start + end)

    def matched(self, n_doubles: int, threads: int) -> float:
        n_doubles = max(int(n_doubles), 1024)
        key = (n_doubles, threads)
        if key not in self._matched:
            self._matched[key] = triad_bandwidth(n_doubles, threads, repeats=9 if n_doubles < 10**7 else 5)
        return self._matched[key]

    def triad_kernel(self, threads):
        """The jitted triad ``a[i] = b[i] + s c[i]``; the parallel one runs on Numba's current thread count."""
        return _triad_kernels()["serial" if threads == 1 else "parallel"]

    def finish(self):
        self.triad_end = {t: triad_bandwidth(TRIAD_DOUBLES, t) for t in self.threads}


_machine: Machine | None = None
RESULTS: list[dict] = []


@pytest.fixture(scope="session")
def bench_results():
    """Where kernel benchmarks append their records for the summary table."""
    return RESULTS


@pytest.fixture(scope="session")
def machine():
    global _machine
    if _machine is None:
        _machine = Machine()
    return _machine


# --------------------------------------------------------------------------- summary
def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v * 1e3:.3g}" if v * 1e3 < 100 else f"{v * 1e3:.0f}"


def summary_rows(results):
    """One row per (kernel, N, d): medians per backend, speedups over NumPy, bandwidth."""
    table: dict[tuple, dict] = {}
    for r in results:
        key = (r["kernel"], r["n"], r["d"])
        row = table.setdefault(key, {"kernel": r["kernel"], "n": r["n"], "d": r["d"], "bytes": r["bytes"]})
        row[r["backend"]] = r["median"]
        if r["backend"] != "numpy":
            row[f"gbs_{r['backend']}"] = r["gbs"]
            row[f"triad_{r['backend']}"] = r["triad_fraction"]
            row[f"triad2_{r['backend']}"] = r["triad2_fraction"]
    return [table[k] for k in sorted(table, key=lambda k: (k[0], k[1], k[2]))]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    if _machine is not None:
        _machine.finish()
    tr = terminalreporter
    backends = ["numpy", "numba-1", "numba-2", "cython-1", "cython-2"]
    tr.write_sep("=", "memoa-fast kernels: medians (ms), speedup over NumPy, bandwidth")
    if _machine is not None:
        tr.write_line(
            "STREAM triad (384 MB), start / end of run: "
            + ", ".join(f"{t} thread{'s' if t > 1 else ''} {_machine.triad[t]:.1f} / "
                        f"{_machine.triad_end.get(t, float('nan')):.1f} GB/s" for t in _machine.threads)
        )
    head = f"{'kernel':<19}{'N':>9}{'d':>4} " + "".join(f"{b:>10}" for b in backends)
    head += f"{'x numba-2':>10}{'GB/s':>7}{'%triad2':>8}{'%match':>7}"
    tr.write_line(head)
    rows = summary_rows(RESULTS)
    for row in rows:
        line = f"{row['kernel']:<19}{row['n']:>9.0e}{row['d']:>4} "
        line += "".join(f"{_fmt_ms(row.get(b)):>10}" for b in backends)
        best = "numba-2" if "numba-2" in row else "numba-1"
        ratio = row["numpy"] / row[best] if "numpy" in row and best in row else None
        line += f"{ratio:>10.1f}" if ratio else f"{'-':>10}"
        gbs = row.get(f"gbs_{best}")
        line += f"{gbs:>7.1f}" if gbs else f"{'-':>7}"
        frac = row.get(f"triad2_{best}")
        line += f"{100 * frac:>7.0f}%" if frac else f"{'-':>8}"
        match = row.get(f"triad_{best}")
        line += f"{100 * match:>6.0f}%" if match else f"{'-':>7}"
        tr.write_line(line)
    path = config.getoption("--bench-summary")
    if path:
        payload = {
            "triad_start": _machine.triad if _machine else {},
            "triad_end": _machine.triad_end if _machine else {},
            "matched_triad": {f"{k[0]}:{k[1]}": v for k, v in (_machine._matched.items() if _machine else [])},
            "results": RESULTS,
            "rows": rows,
        }
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=1, default=float)
        tr.write_line(f"summary written to {path}")
