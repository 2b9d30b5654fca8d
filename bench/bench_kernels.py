"""Every hot loop and the fused step, per backend, N and d (pytest-benchmark).

Backends: the NumPy reference (``kernels._reference``), Numba on one and two
threads, Cython on one and two threads (Cython has no fused step unless its
module defines ``fused_step``). Sizes: N in {10^3, ..., 10^7}, d in {1, 4,
16}; N = 10^7 runs d = 1 and 4 only (at d = 16 the NumPy reference alone
would hold about 8 GB of temporaries), and the NumPy reference only for the
fused step there (seconds per call). N >= 10^6 is marked ``big``.

Kernels (bytes = the least memory traffic the math allows, in doubles read
plus written, which is what the bandwidth figures count):

==================== ======================================= ================
kernel               what                                    bytes per agent
==================== ======================================= ================
mean_field           sums of x, finite s, max J              16 d + 8
policy_update        move x, pay J                           24 d + 16
unfused_step         mean_field + policy_update (2 kernels)  40 d + 24
fused_step           the whole step (2 passes)               32 d + 16
fused_step+mixture   ... and the server's mixture            32 d + 24
mixture_predict      yhat = sum_i p_i x_i                    8 d + 8
mixture_update       hedge + fixed share (2 passes)          8 d + 32
==================== ======================================= ================

Signals are all finite here (steady state); the JIT is warmed before timing.
Each timing is a median over enough rounds to fill about 0.4 s (at least 3).
At the end of the session a table prints the medians, the speedup of Numba
(two threads) over NumPy, and the achieved bandwidth as a fraction of the
same run's STREAM triad on two threads (``%triad2``) and of a triad over
arrays of the kernel's own size (``%match``).

Run (from the repository root, package installed)::

    python -P -m pytest bench/bench_kernels.py -p no:cacheprovider               # 4 min (quiet) to 10 (loaded)
    python -P -m pytest bench/bench_kernels.py -m "not big" -p no:cacheprovider  # N <= 10^5, about a minute
    python -P -m pytest bench/bench_kernels.py -k "fused and N1e+06" --bench-summary out.json
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from memoa_fast import Game
from memoa_fast.kernels import _reference, work_shape

SIZES = [10**3, 10**4, 10**5, 10**6, 10**7]
DIMS = [1, 4, 16]
KERNELS = ["mean_field", "policy_update", "unfused_step", "fused_step", "fused_step+mixture", "mixture_predict", "mixture_update"]
TWO = 2 if (os.cpu_count() or 1) >= 2 else 1
BACKENDS = [("numpy", 1), ("numba", 1), ("numba", TWO), ("cython", 1), ("cython", TWO)]
BACKENDS = list(dict.fromkeys(BACKENDS))
GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
TARGET_SECONDS = 0.4


def bytes_per_step(kernel: str, n: int, d: int) -> int:
    per_agent = {
        "mean_field": 16 * d + 8,
        "policy_update": 24 * d + 16,
        "unfused_step": 40 * d + 24,
        "fused_step": 32 * d + 16,
        "fused_step+mixture": 32 * d + 24,
        "mixture_predict": 8 * d + 8,
        "mixture_update": 8 * d + 32,
    }[kernel]
    return per_agent * n


def _cases():
    cases = []
    for n in SIZES:
        for d in DIMS:
            if n >= 10**7 and d > 4:
                continue
            for kernel in KERNELS:
                for backend, threads in BACKENDS:
                    if n >= 10**7 and backend == "numpy" and kernel != "fused_step":
                        continue  # seconds per call: the fused step alone gives the ratio at 10^7
                    marks = [pytest.mark.big] if n >= 10**6 else []
                    cases.append(pytest.param(kernel, n, d, backend, threads, marks=marks,
                                              id=f"{kernel}-N{n:.0e}-d{d}-{backend}{threads}"))
    return cases


def load_backend(backend: str):
    if backend == "numpy":
        return _reference
    if backend == "numba":
        from memoa_fast.kernels import _numba

        return _numba
    try:
        from memoa_fast.kernels import _cython
    except ImportError:
        pytest.skip("the Cython extension is not built")
    return _cython


class Data:
    """One population's buffers, shared by every backend and kernel of a given (N, d)."""

    def __init__(self, n, d):
        rng = np.random.default_rng(n + d)
        self.x = rng.standard_normal((n, d))
        self.s = rng.standard_normal((n, d))
        self.J = np.zeros(n)
        self.work = np.zeros(work_shape(n, d))
        self.mean_x = self.x.mean(axis=0)
        self.mean_s = np.zeros(d)
        self.next_mean_x = np.zeros(d)
        self.log_p = np.full(n, -math.log(n))
        self.yhat = np.zeros(d)
        self.y = rng.standard_normal(d)
        self.no_weights = np.empty(0)


_data: dict[tuple[int, int], Data] = {}


def dataset(n, d) -> Data:
    if (n, d) not in _data:
        _data.clear()  # one population in memory at a time (10^7 x 4 is 640 MB)
        _data[n, d] = Data(n, d)
    return _data[n, d]


def make_call(kernel, kern, data: Data, threads):
    c = GAME.coefficients
    g = GAME
    x, s, J, work = data.x, data.s, data.J, data.work
    mx, ms = data.mean_x, data.mean_s
    if kernel == "mean_field":
        return lambda: kern.mean_field(x, s, J, work, mx, ms, threads)
    if kernel == "policy_update":
        return lambda: kern.policy_update(x, s, J, c.gain, c.signal, c.signal_mean, c.state_mean, ms, g.q, g.kappa, g.r, mx, 0.5, threads)
    if kernel == "unfused_step":
        def unfused():
            kern.mean_field(x, s, J, work, mx, ms, threads)
            kern.policy_update(x, s, J, c.gain, c.signal, c.signal_mean, c.state_mean, ms, g.q, g.kappa, g.r, mx, 0.5, threads)
        return unfused
    if kernel.startswith("fused_step"):
        if not hasattr(kern, "fused_step"):
            pytest.skip("this backend has no fused_step")
        log_p = data.log_p if kernel.endswith("mixture") else data.no_weights
        nx, yhat = data.next_mean_x, data.yhat
        return lambda: kern.fused_step(x, s, J, work, c.gain, c.signal, c.signal_mean, c.state_mean, g.q, g.kappa, g.r,
                                       0.5, mx, ms, nx, True, log_p, yhat, threads)
    if kernel == "mixture_predict":
        return lambda: kern.mixture_predict(data.log_p, x, work, data.yhat, threads)
    if kernel == "mixture_update":
        return lambda: kern.mixture_update(data.log_p, x, data.y, data.yhat, 1, 0.5, 0.01, work, threads)
    raise ValueError(kernel)


@pytest.mark.parametrize("threads", sorted({1, TWO}))
def test_stream_triad(benchmark, machine, threads):
    """The run's reference bandwidth (also measured when the session ends; see conftest.Machine)."""
    kern = machine.triad_kernel(threads)
    n = machine.TRIAD_DOUBLES
    a, b, c = np.zeros(n), np.ones(n), np.ones(n)
    benchmark.group = "STREAM triad, 384 MB"
    benchmark.pedantic(kern, args=(a, b, c, 3.0), rounds=9, iterations=1, warmup_rounds=1)
    benchmark.extra_info["GBps"] = 24.0 * n / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("kernel,n,d,backend,threads", _cases())
def test_kernel(benchmark, machine, bench_results, kernel, n, d, backend, threads):
    kern = load_backend(backend)
    data = dataset(n, d)
    call = make_call(kernel, kern, data, threads)
    estimate = machine.median_seconds(call, 1, warmup=1)  # JIT warm-up (or cache load) happens here
    if estimate < 0.2:
        estimate = machine.median_seconds(call, 3, warmup=0)
    rounds = int(min(1000, max(3, TARGET_SECONDS / max(estimate, 1e-9))))
    benchmark.group = f"{kernel} N={n:.0e} d={d}"
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if estimate < 0.2 else 0)
    median = benchmark.stats.stats.median
    moved = bytes_per_step(kernel, n, d)
    gbs = moved / median / 1e9
    label = "numpy" if backend == "numpy" else f"{backend}-{threads}"
    record = {
        "kernel": kernel, "n": n, "d": d, "backend": label, "threads": threads,
        "median": median, "min": benchmark.stats.stats.min, "rounds": rounds,
        "bytes": moved, "gbs": gbs, "ns_per_agent": median / n * 1e9,
        "triad2_fraction": gbs / machine.reference(TWO),
        "triad_fraction": gbs / machine.matched(n * d, threads) if backend != "numpy" else None,
    }
    bench_results.append(record)
    benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("kernel", "n", "d")})
