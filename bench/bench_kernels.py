"""The population step and the server round against the best peers, same run (pytest-benchmark).

Contenders (``bench/peers.py`` holds the peers and their self check):

================ =========================================================================
``reference``    the package's NumPy reference (``kernels/_reference.py``): the
                 *specification*, timed at N <= 10^5 only, never used for a speed-up
``numpy``        idiomatic in-place NumPy (``peers.NumpyPopulation`` / ``NumpyServer``)
``jax``          the same as ``jax.jit`` functions in float64 (when JAX is installed)
``numba-1/2``    ``memoa_fast``'s Numba kernels on one and two threads
``cython-1/2``   the Cython kernels, once ``_cython`` has the new API (``signal_pass``)
``old-numba-1/2`` the single-class kernel before K classes (commit ``61dd50b``, loaded
                 from git into a temporary folder), for the ``step`` only
================ =========================================================================

Kernels (bytes = the least memory traffic the math allows, doubles read plus
written; bandwidth is that over the median, as a fraction of the same run's
STREAM triad on the same thread count):

============ ============================================================== ================
``step``     one population step, K = 1: ``fused_step`` (policy, cost,       32 d + 16
             next mean field, worst client)
``step_k16`` the same with K = 16 trust classes (random int64 labels)        32 d + 32
``server``   one server round: ``mixture_predict`` + ``mixture_update``       16 d + 40
             (hedge, eta 0.5, fixed share 0.01)
============ ============================================================== ================

Sizes N in {10^4, 10^5, 10^6} and d in {1, 4, 16}; N = 10^7 (d = 1, 4) is
marked ``big`` (run with ``-m big``; skip it with ``-m "not big"``). The
NumPy and JAX peers get every thread they want (NumPy's ``dot`` may use BLAS
threads; XLA its own pool): they are what a user would run.

``test_interleaved`` gives the headline figures at N = 10^6: every contender
and the STREAM triad called in turn (A, B, C, ..., A, B, C, ...), medians,
which is more robust on a loaded machine than separate cases; it also gives
the two ratios of issue 10 (K = 16 over K = 1 at d = 4, and the new K = 1
step over the old kernel).

The session ends with a table (medians in ms; every speed-up is over the
*best peer of the same run*, the faster of ``numpy`` and ``jax``), and
``--bench-summary PATH`` writes it as JSON.

Run (repository root, package installed; a few minutes)::

    python -P -m pytest bench/bench_kernels.py -m "not big" -p no:cacheprovider
    python -P -m pytest bench/bench_kernels.py -k "interleaved or self_check or drivers" -p no:cacheprovider  # headline, ~3 min
    python -P -m pytest bench/bench_kernels.py -m big -p no:cacheprovider   # N = 10^7 only
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from memoa_fast import Game
from memoa_fast.kernels import RULE_HEDGE, SIZE, layout, work_shape
from memoa_fast.kernels._threads import Threads

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # bench/ is not a package: found through sys.path

SIZES = [10**4, 10**5, 10**6, 10**7]
DIMS = [1, 4, 16]
KERNELS = ["step", "step_k16", "server"]
TWO = 2 if (os.cpu_count() or 1) >= 2 else 1
CONTENDERS = ["reference", "numpy", "jax", "numba-1", f"numba-{TWO}", "cython-1", f"cython-{TWO}", "old-numba-1",
              f"old-numba-{TWO}"]
CONTENDERS = list(dict.fromkeys(CONTENDERS))
PEERS = ("numpy", "jax")
GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
K16 = 16
GAME16 = Game(q=list(np.geomspace(0.1, 4.0, K16)), kappa=2.0, r=0.5, gamma=0.95)
ETA, ALPHA = 0.5, 0.01
TARGET_SECONDS = 0.25
OLD_COMMIT = "61dd50b"
RESULTS: list[dict] = []


def bytes_per_call(kernel: str, n: int, d: int) -> int:
    return n * {"step": 32 * d + 16, "step_k16": 32 * d + 32, "server": 16 * d + 40}[kernel]


def _cases():
    cases = []
    for n in SIZES:
        for d in DIMS:
            if n >= 10**7 and d > 4:
                continue  # 1.3 GB per (N, d) array
            for kernel in KERNELS:
                for who in CONTENDERS:
                    if who == "reference" and n > 10**5:
                        continue  # the specification: seconds per call at 10^6 with 16 classes
                    if who.startswith("old") and kernel != "step":
                        continue
                    marks = [pytest.mark.big] if n >= 10**7 else []
                    cases.append(pytest.param(kernel, n, d, who, marks=marks, id=f"{kernel}-N{n:.0e}-d{d}-{who}"))
    return cases


# --------------------------------------------------------------------------- backends
def numba_kernels():
    from memoa_fast.kernels import _numba

    return _numba


def cython_kernels():
    try:
        from memoa_fast.kernels import _cython
    except ImportError:
        return None
    return _cython if hasattr(_cython, "signal_pass") else None  # the old API has no signal_pass


_old = {}


def old_kernels():
    """The single-class Numba kernel of commit ``61dd50b`` (the step before K classes), or None."""
    if "mod" in _old:
        return _old["mod"]
    mod = None
    root = HERE.parent
    try:
        # A fixed folder, rewritten only when the text differs, so Numba's disk cache survives between runs.
        folder = Path(tempfile.gettempdir()) / f"memoa_old_kernels_{OLD_COMMIT}" / "memoa_old_kernels"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("_config.py", "_numba.py", "__init__.py"):
            src = "" if name == "__init__.py" else subprocess.run(
                ["git", "-C", str(root), "show", f"{OLD_COMMIT}:kernels/{name}"], check=True, capture_output=True,
                text=True).stdout
            path = folder / name
            if not path.exists() or path.read_text() != src:
                path.write_text(src)
        spec = importlib.util.spec_from_file_location("memoa_old_kernels", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["memoa_old_kernels"] = pkg
        spec.loader.exec_module(pkg)
        import importlib as _il

        mod = _il.import_module("memoa_old_kernels._numba")
    except (OSError, subprocess.CalledProcessError, ImportError, SyntaxError):
        mod = None
    _old["mod"] = mod
    return mod


def old_work_shape(n, d):
    dp = -(-d // 8) * 8
    return -(-n // 4096), 2 * dp + 8


# --------------------------------------------------------------------------- data
class Data:
    """One population's inputs for every contender of a given (N, d); contenders keep their own state."""

    def __init__(self, n, d):
        rng = np.random.default_rng(n + d)
        self.n, self.d = n, d
        self.x0 = rng.standard_normal((n, d))
        self.s = rng.standard_normal((n, d))
        self.labels = rng.integers(0, K16, n).astype(np.int64)
        self.y = rng.standard_normal(d)
        self.state: dict = {}

    def get(self, key, make):
        if key not in self.state:
            self.state[key] = make()
        return self.state[key]


_data: dict = {}


def dataset(n, d) -> Data:
    if (n, d) not in _data:
        _data.clear()  # one population in memory at a time
        _data[n, d] = Data(n, d)
    return _data[n, d]


class KernelStep:
    """What ``Population.step`` does per call: ``fused_step`` then m(t+1) -> m(t); own copies of x and J."""

    def __init__(self, kern, data: Data, game, labels, threads):
        n, d = data.n, data.d
        K = game.n_classes
        self.kern, self.threads = kern, threads
        self.x, self.s, self.J = data.x0.copy(), data.s, np.zeros(n)
        self.labels = labels
        self.lay = layout(K, d)
        self.coef = np.array(game.table.coef)
        self.coef[:, SIZE] = np.bincount(labels, minlength=K) if K > 1 else n
        self.mix = np.ascontiguousarray(game.table.mix)
        self.field = np.zeros((self.lay.field_rows, d))
        self.work = np.zeros(work_shape(n, self.lay))
        self.yhat = np.zeros(d)
        self.no_weights = np.empty(0)
        self.have_mean = False
        self.discount = 1.0

    def __call__(self):
        lay, K = self.lay, self.lay.n_classes
        out = self.kern.fused_step(self.x, self.s, self.labels, self.J, self.work, lay, self.coef, self.mix, self.field,
                                   self.have_mean, self.discount, self.no_weights, self.yhat, self.threads)
        self.field[lay.class_state:lay.class_state + K] = self.field[lay.class_next:lay.class_next + K]
        self.field[lay.field_state] = self.field[lay.field_next]
        self.have_mean = True
        self.discount *= 0.95
        return out


class OldStep:
    """The pre-K-class ``fused_step`` (commit 61dd50b) driven as the old Population did."""

    def __init__(self, kern, data: Data, threads):
        c, g = GAME.coefficients, GAME
        n, d = data.n, data.d
        self.kern, self.threads = kern, threads
        self.x, self.s, self.J = data.x0.copy(), data.s, np.zeros(n)
        self.work = np.zeros(old_work_shape(n, d))
        self.mean_x, self.mean_s, self.next_mean_x = self.x.mean(axis=0), np.zeros(d), np.zeros(d)
        self.args = (c.gain, c.signal, c.signal_mean, c.state_mean, g.q, g.kappa, g.r)
        self.no_weights, self.yhat = np.empty(0), np.zeros(d)
        self.discount = 1.0

    def __call__(self):
        out = self.kern.fused_step(self.x, self.s, self.J, self.work, *self.args, self.discount, self.mean_x,
                                   self.mean_s, self.next_mean_x, True, self.no_weights, self.yhat, self.threads)
        self.mean_x[:] = self.next_mean_x
        self.discount *= 0.95
        return out


class KernelServer:
    """One server round through the kernels: ``mixture_predict`` + ``mixture_update`` (hedge, fixed share)."""

    def __init__(self, kern, data: Data, threads):
        n, d = data.n, data.d
        self.kern, self.threads = kern, threads
        self.x, self.y = data.x0, data.y
        self.lay = layout(1, d)
        self.log_p = np.full(n, -math.log(n))
        self.work = np.zeros(work_shape(n, self.lay))
        self.yhat = np.zeros(d)

    def __call__(self):
        k, lay, t = self.kern, self.lay, self.threads
        k.mixture_predict(self.log_p, self.x, self.work, lay, self.yhat, t)
        k.mixture_update(self.log_p, self.x, self.y, self.yhat, RULE_HEDGE, ETA, ALPHA, self.work, lay, t)
        return self.yhat


def make_call(kernel, who, data: Data):
    """A no-argument callable doing one ``kernel`` call for contender ``who`` (state kept between calls)."""
    k16 = kernel == "step_k16"
    game = GAME16 if k16 else GAME
    labels = data.labels if k16 else np.empty(0, dtype=np.int64)
    if who in ("reference", "numba-1", f"numba-{TWO}", "cython-1", f"cython-{TWO}"):
        if who == "reference":
            from memoa_fast.kernels import _reference as kern

            threads = 1
        else:
            name, threads = who.split("-")
            threads = int(threads)
            kern = numba_kernels() if name == "numba" else cython_kernels()
            if kern is None:
                pytest.skip("the Cython extension is missing or still has the old kernel API (no signal_pass)")
        if kernel == "server":
            return KernelServer(kern, data, threads)
        return KernelStep(kern, data, game, labels, threads)
    if who.startswith("old-numba"):
        kern = old_kernels()
        if kern is None:
            pytest.skip(f"the old kernel (git show {OLD_COMMIT}:kernels/_numba.py) is not available")
        return OldStep(kern, data, int(who.rsplit("-", 1)[1]))
    if who == "numpy":
        if k16:
            pytest.skip("the peers play one class (K = 16 is memoa_fast's own extension)")
        if kernel == "server":
            srv = peers.NumpyServer(data.n, data.d, eta=ETA, alpha=ALPHA)
            return lambda: srv.round(data.x0, data.y)
        pop = peers.NumpyPopulation(data.x0, **peers.coefficients(GAME))
        return lambda: pop.step(data.s)
    if who == "jax":
        if not peers.have_jax():
            pytest.skip("JAX is not installed (pip install jax: benchmark-only)")
        if k16:
            pytest.skip("the peers play one class (K = 16 is memoa_fast's own extension)")
        import jax.numpy as jnp

        peers._jax()
        if kernel == "server":
            srv = peers.jax_server(data.n, data.d, eta=ETA, alpha=ALPHA)
            x, y = jnp.asarray(data.x0), jnp.asarray(data.y)
            return lambda: srv.round(x, y)
        pop = peers.jax_population(data.x0, **peers.coefficients(GAME))
        s = jnp.asarray(data.s)
        return lambda: pop.step(s)
    raise ValueError(who)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("peer", PEERS)
def test_peer_self_check(peer):
    """Each peer computes what memoa_fast computes (to 1e-10), invalid signal rows included."""
    if peer == "jax" and not peers.have_jax():
        pytest.skip("JAX is not installed")
    assert peers.check_population(peer) <= peers.TOLERANCE
    assert peers.check_server(peer) <= peers.TOLERANCE


def test_drivers_agree():
    """The kernel drivers timed below do the same work: Numba (1 and 2 threads), the old kernel and K = 16 match the reference."""
    from memoa_fast.kernels import _reference

    data = Data(3 * 4096 + 17, 4)
    none = np.empty(0, dtype=np.int64)
    steps = {"reference": KernelStep(_reference, data, GAME, none, 1),
             "reference-k16": KernelStep(_reference, data, GAME16, data.labels, 1)}
    for threads in sorted({1, TWO}):
        steps[f"numba-{threads}"] = KernelStep(numba_kernels(), data, GAME, none, threads)
        steps[f"numba-{threads}-k16"] = KernelStep(numba_kernels(), data, GAME16, data.labels, threads)
        if old_kernels() is not None:
            steps[f"old-numba-{threads}"] = OldStep(old_kernels(), data, threads)
        if cython_kernels() is not None:
            steps[f"cython-{threads}"] = KernelStep(cython_kernels(), data, GAME, none, threads)
            steps[f"cython-{threads}-k16"] = KernelStep(cython_kernels(), data, GAME16, data.labels, threads)
    servers = {"reference": KernelServer(_reference, data, 1), "numba": KernelServer(numba_kernels(), data, TWO)}
    for _ in range(3):
        for step in steps.values():
            step()
        for srv in servers.values():
            srv()
    for name, step in steps.items():
        want = steps["reference-k16" if name.endswith("k16") else "reference"]
        np.testing.assert_allclose(step.x, want.x, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(step.J, want.J, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(servers["numba"].log_p, servers["reference"].log_p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", sorted({1, TWO}))
def test_stream_triad(benchmark, machine, threads):
    """The run's reference bandwidth (also measured when the session ends; see conftest.Machine)."""
    kern = machine.triad_kernel(threads)
    n = machine.TRIAD_DOUBLES
    a, b, c = np.zeros(n), np.ones(n), np.ones(n)
    benchmark.group = "STREAM triad, 384 MB"
    benchmark.pedantic(kern, args=(a, b, c, 3.0), rounds=9, iterations=1, warmup_rounds=1)
    benchmark.extra_info["GBps"] = 24.0 * n / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("kernel,n,d,who", _cases())
def test_kernel(benchmark, machine, summary, kernel, n, d, who):
    data = dataset(n, d)
    call = data.get((kernel, who), lambda: make_call(kernel, who, data))
    estimate = machine.median_seconds(call, 1, warmup=2)  # JIT (Numba, XLA) compiles or loads its cache here
    if estimate < 0.2:
        estimate = machine.median_seconds(call, 3, warmup=0)
    rounds = int(min(500, max(3, TARGET_SECONDS / max(estimate, 1e-9))))
    benchmark.group = f"{kernel} N={n:.0e} d={d}"
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if estimate < 0.2 else 0)
    median = benchmark.stats.stats.median
    threads = int(who.rsplit("-", 1)[1]) if who[-1].isdigit() else 1
    gbs = bytes_per_call(kernel, n, d) / median / 1e9
    record = {"kernel": kernel, "n": n, "d": d, "who": who, "threads": threads, "median": median,
              "min": benchmark.stats.stats.min, "rounds": rounds, "gbs": gbs,
              "triad_fraction": gbs / machine.reference(threads), "load": os.getloadavg()[0]}
    RESULTS.append(record)
    benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("kernel", "n", "d", "who")})


def _interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds of each callable, called in turn after a warm-up of each.

    The order is shuffled every round (seeded): a fixed order made whichever
    kernel ran right after the NumPy peer about 6% slower (measured at d = 1:
    new/old 1.17 in one order, 1.04 in the other), a bias of the position,
    not of the kernel.
    """
    for fn in calls.values():
        fn()
        fn()
    times = {k: [] for k in calls}
    names = list(calls)
    order_rng = np.random.default_rng(20261129)
    for _ in range(repeats):
        for k in order_rng.permutation(names):
            fn = calls[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


INTERLEAVED: dict = {}
INTERLEAVED_N = 10**6
_triad_arrays: dict = {}


def _triad_calls(machine):
    """The STREAM triad (384 MB) on 1 and 2 threads as contenders of an interleaved round."""
    if not _triad_arrays:
        n = machine.TRIAD_DOUBLES
        _triad_arrays.update(a=np.zeros(n), b=np.ones(n), c=np.ones(n))
    a, b, c = _triad_arrays["a"], _triad_arrays["b"], _triad_arrays["c"]
    calls = {}
    for threads in sorted({1, TWO}):
        kern = machine.triad_kernel(threads)

        def call(kern=kern, threads=threads):
            with Threads(threads):
                return kern(a, b, c, 3.0)

        calls[f"triad-{threads}"] = call
    return calls


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("group", ["step", "server"])
def test_interleaved(summary, machine, group, d):
    """Every contender at N = 10^6 called in turn (a, b, c, ..., a, b, c, ...), medians: the headline ratios.

    ``step``: the peers, Numba and Cython K = 1 and K = 16 (issue 10: K = 16 <= 1.5x K = 1
    at d = 4) and the old K = 1 kernel (issue 10: new <= 1.1x old), 1 and 2
    threads; ``server``: the peers and Numba. The STREAM triad is one more
    contender, so every %triad compares calls made under the same load.
    """
    n = INTERLEAVED_N
    data = Data(n, d)
    none = np.empty(0, dtype=np.int64)
    calls = {"numpy": make_call(group, "numpy", data)}
    if peers.have_jax():
        calls["jax"] = make_call(group, "jax", data)
    for threads in sorted({1, TWO}):
        if group == "server":
            calls[f"numba-{threads}"] = KernelServer(numba_kernels(), data, threads)
            if cython_kernels() is not None:
                calls[f"cython-{threads}"] = KernelServer(cython_kernels(), data, threads)
            continue
        calls[f"numba-{threads}"] = KernelStep(numba_kernels(), data, GAME, none, threads)
        calls[f"numba-k16-{threads}"] = KernelStep(numba_kernels(), data, GAME16, data.labels, threads)
        if cython_kernels() is not None:
            calls[f"cython-{threads}"] = KernelStep(cython_kernels(), data, GAME, none, threads)
            calls[f"cython-k16-{threads}"] = KernelStep(cython_kernels(), data, GAME16, data.labels, threads)
        if old_kernels() is not None:
            calls[f"old-numba-{threads}"] = OldStep(old_kernels(), data, threads)
    calls.update(_triad_calls(machine))
    probe = sum(machine.median_seconds(fn, 1, warmup=2) for fn in calls.values())  # warms every JIT too
    repeats = int(min(21, max(5, math.ceil(10.0 / probe))))
    load_before = os.getloadavg()[0]
    med = _interleaved(calls, repeats)
    row = {"group": group, "n": n, "d": d, "repeats": repeats, "load": 0.5 * (load_before + os.getloadavg()[0]),
           "median_s": med}
    triad_gbs = {t: 24.0 * machine.TRIAD_DOUBLES / med[f"triad-{t}"] / 1e9 for t in sorted({1, TWO})}
    row["triad_gbs"] = triad_gbs
    best = min((p for p in PEERS if p in med), key=med.get)
    row["best_peer"] = best
    row["x_best_peer"] = {k: med[best] / v for k, v in med.items() if not k.startswith("triad") and k not in PEERS}
    row["triad_fraction"] = {}
    for k, v in med.items():
        if k.startswith(("numba", "cython", "old")):
            kernel = "step_k16" if "k16" in k else group
            row["triad_fraction"][k] = bytes_per_call(kernel, n, d) / v / 1e9 / triad_gbs[int(k.rsplit("-", 1)[1])]
    for threads in sorted({1, TWO}):
        for backend in ("numba", "cython"):
            if f"{backend}-k16-{threads}" in med:
                row[f"{backend}_k16_over_k1-{threads}"] = med[f"{backend}-k16-{threads}"] / med[f"{backend}-{threads}"]
        if f"old-numba-{threads}" in med:
            row[f"new_over_old-{threads}"] = med[f"numba-{threads}"] / med[f"old-numba-{threads}"]
    INTERLEAVED[(group, d)] = row


# --------------------------------------------------------------------------- summary
def _fmt_ms(v):
    if v is None:
        return "-"
    ms = v * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def summary_rows(results):
    """One row per (kernel, N, d): medians per contender, the best peer, speed-ups over it, %triad."""
    table: dict = {}
    for r in results:
        row = table.setdefault((r["kernel"], r["n"], r["d"]), {"kernel": r["kernel"], "n": r["n"], "d": r["d"]})
        row[r["who"]] = r["median"]
        row[f"triad_{r['who']}"] = r["triad_fraction"]
    rows = []
    for key in sorted(table, key=lambda k: (KERNELS.index(k[0]), k[1], k[2])):
        row = table[key]
        peer_times = {p: row[p] for p in PEERS if p in row}
        if key[0] == "step_k16":  # the peers play one class: compare with their K = 1 step
            k1 = table.get(("step",) + key[1:], {})
            peer_times = {p: k1[p] for p in PEERS if p in k1}
        if peer_times:
            best = min(peer_times, key=peer_times.get)
            row["best_peer"], row["best_peer_s"] = best, peer_times[best]
            for who in CONTENDERS:
                if who in row and who not in PEERS and who != "reference":
                    row[f"x_{who}"] = peer_times[best] / row[who]
        rows.append(row)
    return rows


class _Summary:
    """Prints the table when the session ends (registered as a plugin by the ``summary`` fixture)."""

    def __init__(self, machine):
        self.machine = machine

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not RESULTS and not INTERLEAVED:
            return
        tr, m = terminalreporter, self.machine
        m.finish()
        tr.write_sep("=", "memoa-fast against the best peer of this run (medians, ms)")
        tr.write_line(f"load average {os.getloadavg()[0]:.2f} at the end; STREAM triad (384 MB) start / end: "
                      + ", ".join(f"{t}T {m.triad[t]:.1f} / {m.triad_end.get(t, float('nan')):.1f} GB/s"
                                  for t in m.threads))
        shown = [w for w in CONTENDERS if any(r["who"] == w for r in RESULTS)]
        if RESULTS:
            tr.write_line(f"{'kernel':<9}{'N':>7}{'d':>3} " + "".join(f"{w:>12}" for w in shown)
                          + f"{'best peer':>10}" + "".join(f"{'x ' + w:>14}" for w in shown if w not in PEERS + ('reference',))
                          + f"{'%triad n1':>10}{'%triad n' + str(TWO):>10}")
        rows = summary_rows(RESULTS)
        for row in rows:
            line = f"{row['kernel']:<9}{row['n']:>7.0e}{row['d']:>3} " + "".join(f"{_fmt_ms(row.get(w)):>12}" for w in shown)
            line += f"{row.get('best_peer', '-'):>10}"
            for w in shown:
                if w in PEERS + ("reference",):
                    continue
                v = row.get(f"x_{w}")
                line += f"{v:>13.1f}x" if v else f"{'-':>14}"
            for w in ("numba-1", f"numba-{TWO}"):
                v = row.get(f"triad_{w}")
                line += f"{100 * v:>9.0f}%" if v else f"{'-':>10}"
            tr.write_line(line)
        if INTERLEAVED:
            tr.write_sep("-", f"interleaved at N = {INTERLEAVED_N:.0e}: medians (ms), x = best peer / contender, "
                              "%triad = bandwidth / same-round triad")
        for (group, d), r in sorted(INTERLEAVED.items()):
            med = r["median_s"]
            tr.write_line(f"{group} d={d} ({r['repeats']} rounds, load {r['load']:.1f}, triad "
                          + ", ".join(f"{t}T {g:.1f} GB/s" for t, g in r["triad_gbs"].items()) + f"), best peer {r['best_peer']}:")
            parts = []
            for k, v in med.items():
                if k.startswith("triad"):
                    continue
                text = f"{k} {1e3 * v:.3g}"
                if k in r["x_best_peer"]:
                    text += f" ({r['x_best_peer'][k]:.1f}x, {100 * r['triad_fraction'][k]:.0f}%)"
                parts.append(text)
            tr.write_line("    " + "; ".join(parts))
            extra = [f"{k.split('_')[0]} K=16/K=1 {r[k]:.2f} ({k.rsplit('-', 1)[1]}T)" for k in r if "_k16_over_" in k]
            extra += [f"new/old {r[k]:.2f} ({k.rsplit('-', 1)[1]}T)" for k in r if k.startswith("new_over")]
            if extra:
                tr.write_line("    " + "; ".join(extra) + "   (issue 10: K=16/K=1 <= 1.5 at d = 4, new/old <= 1.10)")
        path = None
        try:
            path = config.getoption("--bench-summary")
        except ValueError:
            path = None
        if path:
            payload = {"triad_start": m.triad, "triad_end": m.triad_end, "results": RESULTS, "rows": rows,
                       "interleaved": [r for _, r in sorted(INTERLEAVED.items())],
                       "load_end": os.getloadavg()}
            Path(path).write_text(json.dumps(payload, indent=1, default=float))
            tr.write_line(f"summary written to {path}")


@pytest.fixture(scope="session")
def summary(request, machine):
    """Registers the end-of-session table once."""
    pm = request.config.pluginmanager
    if not pm.has_plugin("memoa-peer-summary"):
        pm.register(_Summary(machine), "memoa-peer-summary")
    return RESULTS
