"""The one module of test helpers: backend discovery, population and weight generators, tolerant comparison.

Import it from a test module as ``from helpers import ...`` (``pyproject.toml``
puts ``tests/`` on ``sys.path``: pytest's ``importlib`` import mode does not).

Tolerance
---------
:func:`assert_close` checks ``|actual - expected| <= rtol (|expected| + scale)``
elementwise, where ``rtol`` depends on the dtype (:data:`RTOL`: ``1e-12`` for
float64, about 4500 ulps) and ``scale`` is the magnitude of the terms that
were summed to make the value (for example ``mean |x_i|`` for a mean). The
backends sum in other orders than NumPy (chunks, lanes, BLAS), so a sum that
cancels can only be compared relative to its terms; no real bug hides under
4500 ulps of the terms.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys

import numpy as np

import memoa_fast
import memoa_fast.kernels
from memoa_fast.kernels import CHUNK, N_COEF, SIGNAL_LIMIT, SIZE, layout, work_shape

# Relative tolerance per dtype of the expected value.
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}

# Entries that make a signal row invalid: non-finite, or finite but larger than SIGNAL_LIMIT.
INVALID_VALUES = (np.nan, np.inf, -np.inf, 2 * SIGNAL_LIMIT, -1e200, 1e308)

# Population sizes at the chunk boundaries, and one large population.
EDGE_N = (1, 2, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 1)
LARGE_N = 100_003
DIMS = (1, 3, 4, 16)
CLASSES = (1, 3, 16)


# --------------------------------------------------------------------------- backends
def kernel_backends(names=("numba", "cython")):
    """``{name: module}`` of the compiled kernel modules that implement the current contract.

    A module qualifies when it imports and has ``signal_pass`` (the two-pass
    API of :mod:`memoa_fast.kernels._reference`); an older module, or a
    missing extension, is left out.
    """
    found = {}
    for name in names:
        try:
            mod = importlib.import_module(f"memoa_fast.kernels._{name}")
        except ImportError:
            continue
        if hasattr(mod, "signal_pass"):
            found[name] = mod
    return found


def available_backends():
    """Backend names a public class accepts here: ``"numpy"`` (the reference) and the compiled ones of :func:`kernel_backends`."""
    return ["numpy", *kernel_backends()]


def thread_counts(name, mod):
    """Thread counts a test may ask of a backend: ``(1, 2)``, or ``(1,)`` where 2 cannot run.

    Numba refuses more threads than it was started with; an OpenMP region
    (Cython) accepts an explicit ``num_threads`` above the default.
    """
    return (1, 2) if name == "cython" or mod.max_threads() >= 2 else (1,)


# --------------------------------------------------------------------------- comparison
def assert_close(actual, expected, scale=0.0, what="value", rtol=None):
    """``|actual - expected| <= rtol (|expected| + scale)`` elementwise; equal values (and infinities, NaN) pass.

    ``rtol`` defaults to :data:`RTOL` of ``expected``'s dtype. ``scale`` (a
    scalar or an array broadcast against ``expected``) is the magnitude of the
    terms that were summed. The message names the worst entry.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    if rtol is None:
        rtol = RTOL[expected.dtype]
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(actual - expected)
        tol = rtol * (np.abs(expected) + scale)
        ok = (actual == expected) | (err <= tol) | (np.isnan(actual) & np.isnan(expected))
    if not ok.all():
        with np.errstate(all="ignore"):
            ratio = np.where(ok, 0.0, np.nan_to_num(err / np.maximum(tol, 1e-300), nan=np.inf))
        worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.ndim else ()
        raise AssertionError(
            f"{what}: {np.count_nonzero(~ok)} of {ok.size} entries off; worst at {worst}: "
            f"actual={actual[worst]!r} expected={expected[worst]!r} tol={np.broadcast_to(tol, ok.shape)[worst]!r}"
        )


# numpy.longdouble carries a 64-bit significand on x86-64 (x87 extended): the reference for a float64 result
EXTENDED = np.finfo(np.longdouble).nmant >= 63


# The files in tests/data were written under NumPy 2 (main 99c2a56). NumPy 1.26 (pyproject's lowest) has other
# exp/log, which ClientForecasters' numpy backend uses for its noise scales: a run recomputed there differs from
# the saved one in the last bits (measured: 2.8e-17 at most on the weights of tests/data/old_sources).
SAVED_UNDER_THIS_NUMPY = int(np.__version__.split(".")[0]) >= 2


def assert_as_saved(actual, saved, err_msg=""):
    """``actual`` (recomputed here) against ``saved`` (from a file in tests/data): bitwise under NumPy 2, else to rounding."""
    if SAVED_UNDER_THIS_NUMPY:
        np.testing.assert_array_equal(actual, saved, err_msg=err_msg)
    else:
        np.testing.assert_allclose(actual, saved, rtol=1e-13, atol=1e-15, err_msg=err_msg)


def ulps_from_exact(actual, exact):
    """Distance of float64 ``actual`` from ``exact``, elementwise, in units in the last place of ``exact`` rounded to float64.

    ``exact`` is the function computed in ``numpy.longdouble`` (11 more bits than float64 where :data:`EXTENDED`):
    a version-independent reference, unlike ``numpy.exp``/``numpy.log`` themselves (NumPy 1.26's are up to 1.5 and
    1.7 ulp off on x86-64, NumPy 2.4's 0.7 and 0.6).
    """
    exact = np.asarray(exact, np.longdouble)
    gap = np.abs(np.asarray(actual, np.float64).astype(np.longdouble) - exact)
    return (gap / np.spacing(np.abs(exact.astype(np.float64))).astype(np.longdouble)).astype(np.float64)


# --------------------------------------------------------------------------- generators
def new_work(n, lay):
    """A ``work`` array full of NaN: a kernel that reads a cell it did not write fails loudly."""
    return np.full(work_shape(n, lay), np.nan)


def invalidate_rows(rng, s, fraction, values=INVALID_VALUES):
    """Make about ``fraction`` of the rows of ``s`` invalid, in place: one entry each, drawn from ``values``."""
    n, d = s.shape
    bad = np.flatnonzero(rng.random(n) < fraction) if fraction < 1.0 else np.arange(n)
    s[bad, rng.integers(0, d, bad.size)] = rng.choice(np.array(values), bad.size)
    return bad


def population(seed, n, d, K, bad_fraction, empty_labels=False):
    """A random K-class population: a dict of every argument of the population kernels.

    States around a per-coordinate centre at a scale ``10^U(-3, 3)``, signals
    near the states with ``bad_fraction`` invalid rows, costs (with exact ties
    in about a third of the draws), labels (an empty array when
    ``empty_labels`` or K = 1 half the time), per-class coefficients with the
    true class sizes, a mixing matrix, and a ``field`` of sentinel values.
    """
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3)
    x = rng.normal(rng.normal(size=d) * scale, scale, size=(n, d))
    s = x + rng.normal(0.0, scale, size=(n, d))
    invalidate_rows(rng, s, bad_fraction)
    if rng.random() < 0.3:
        J = rng.integers(0, 4, n).astype(np.float64)  # many agents share the largest cost
    else:
        J = rng.exponential(scale * scale, n)
    if empty_labels or (K == 1 and rng.random() < 0.5):
        labels = np.empty(0, np.int64)
        sizes = np.zeros(K)
        sizes[0] = n
    else:
        labels = rng.integers(0, K, n).astype(np.int64)
        sizes = np.bincount(labels, minlength=K).astype(np.float64)
    coef = np.empty((K, N_COEF))
    coef[:, :SIZE] = rng.uniform(0.0, 1.0, (K, SIZE))
    coef[:, 1] = rng.uniform(-1.0, 1.0, K)  # the signal weight may be negative
    coef[:, SIZE] = sizes
    mix = rng.normal(0.0, 0.5, (2, K, K + 1))  # column K: the weights on the means over all agents
    lay = layout(K, d)
    field = np.full((lay.field_rows, d), 123.25)
    field[lay.class_state:lay.class_state + K] = rng.normal(size=(K, d)) * scale
    field[lay.field_state] = rng.normal(size=d) * scale
    field[lay.field_signal] = rng.normal(size=d) * scale  # kept when no signal is valid
    log_p = rng.normal(0.0, 3.0, n)
    log_p -= np.log(np.exp(log_p - log_p.max()).sum()) + log_p.max()
    return dict(rng=rng, x=x, s=s, J=J, labels=labels, coef=coef, mix=mix, lay=lay, field=field, log_p=log_p,
                scale=scale)


def log_weights(rng, n, spread):
    """Normalised log-weights spread over about ``spread`` nats."""
    log_p = rng.normal(0.0, spread, n)
    top = log_p.max()
    return log_p - (top + np.log(np.exp(log_p - top).sum()))


def classes(labels, n):
    """Every agent's class: ``labels``, or zeros when it is empty."""
    return np.zeros(n, np.int64) if labels.shape[0] == 0 else labels


def reap(proc) -> None:
    """Kill ``proc`` if it still runs, wait for it and close its pipes (the ``finally`` of a subprocess test)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def call_from_two_threads(call, times: int):
    """Run ``call()`` up to ``times`` times in each of two threads at once; returns ``(errors, completed calls)``.

    A thread stops at its first ``RuntimeError`` (kept in ``errors``): the objects that own compiled state raise
    one when a second thread calls them while the first is inside a call.
    """
    import threading

    errors, done = [], []

    def go():
        try:
            for _ in range(times):
                call()
                done.append(1)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors, len(done)


@contextlib.contextmanager
def held_by_another_thread(lock):
    """Another thread inside a call of an object, for the ``with`` block: it holds ``lock`` (the object's
    ``_exclusive``, an :class:`memoa_fast._exclusive.Exclusive`) and waits; it leaves when the block ends.

    Deterministic: every call of the object made in the block meets a hold of another thread, as a call made while
    that thread's step (or round, or update) runs would.
    """
    import threading

    inside, leave = threading.Event(), threading.Event()

    def hold():
        try:
            with lock:
                inside.set()
                leave.wait(30)
        finally:
            inside.set()

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert inside.wait(30)
        yield
    finally:
        leave.set()
        worker.join()


# --------------------------------------------------------------------------- the server step, exactly
def _step_interval(x_i, y, yhat, rule, eta):
    """Where a kernel's applied step ``eta g_i`` (an exact Fraction pair) lies, whatever its summation order.

    The exact step ``eta g_i`` with ``g_i = |x_i - y|^2`` (hedge) or ``2 <yhat - y, x_i - y>`` (eg: the
    kernels' form, the textbook ``2 <yhat - y, x_i>`` less a term common to every client), widened
    by ``2^-46 eta sum_j |term_j|`` (the rounding of every order of the sum), then clipped to the finite
    doubles as the kernels clip an overflow (STEP_LIMIT, the largest double). Where an intermediate may
    overflow (``eta sum |term| >= DBL_MAX / 4``) the kernel may give ``+-DBL_MAX`` (inf, or NaN from
    inf - inf, which counts as ``+DBL_MAX``): the interval then reaches that end.
    """
    from fractions import Fraction
    big = Fraction(np.finfo(np.float64).max)
    fy = [Fraction(float(v)) for v in y]
    if rule == "eg":
        terms = [2 * (Fraction(float(a)) - b) * (Fraction(float(h)) - b) for a, h, b in zip(x_i, yhat, fy)]
    else:
        terms = [(Fraction(float(a)) - b) ** 2 for a, b in zip(x_i, fy)]
    fe = Fraction(float(eta))
    step = fe * sum(terms)
    size = fe * sum(abs(t) for t in terms)
    lo, hi = step - size / 2**46, step + size / 2**46
    if size >= big / 4 or max(abs(t) for t in terms) * max(fe, 1) >= big / 4:
        if all(t >= 0 for t in terms):
            hi = big
        elif all(t <= 0 for t in terms):
            lo = -big
        else:
            lo, hi = -big, big
    return max(min(lo, big), -big), max(min(hi, big), -big)


#: Clients above which :func:`assert_server_step` checks a sample of them (see there).
SERVER_STEP_SAMPLE = 512


def assert_server_step(lp, x, y, yhat, rule, eta, alpha, new_lp):
    """One server update ``lp -> new_lp`` against MODEL.md section 5 in exact arithmetic, to the rounding of each step.

    ``p_i <- p_i exp(-eta g_i)``, normalised, then fixed share; a step whose
    computation overflows counts as ``+-DBL_MAX`` (the only clip). With
    ``v_i = log p_i - eta g_i`` known to lie in ``[lo_i, hi_i]`` (exact,
    :func:`_step_interval`, widened by the rounding of the subtraction):

    - the new weights are a law (no NaN, no +inf log-weight, sum 1 within 1e-12);
    - order: ``lo_i > hi_j + 1e-6`` (i's score beats j's beyond rounding) implies ``p_i >= p_j``;
    - far behind: ``hi_j < max_i lo_i - 800`` implies ``p_j = alpha / N`` (exactly 0 when ``alpha = 0``):
      however large every step is, only the differences count (a common shift changes nothing);
    - ratios (``alpha = 0``): where both scores are known to 1e-3 and within 600 of the best,
      ``log p_i - log p_j = v_i - v_j`` to the rounding of the scores' magnitudes.
    """
    from fractions import Fraction
    n = len(lp)
    assert not np.isnan(new_lp).any() and not (new_lp == np.inf).any(), new_lp
    p = np.exp(new_lp)
    assert abs(p.sum() - 1.0) <= 1e-12, p.sum()
    # The exact intervals cost ~0.5 ms a client: above SERVER_STEP_SAMPLE clients the properties are checked on a
    # sample (both ends, an even spread, and the heaviest new weights, so the best score is in it). Each property
    # below only compares clients of the sample with one another, so a sample can miss a failure, never invent one.
    checked = range(n)
    if n > SERVER_STEP_SAMPLE:
        spread = np.linspace(0, n - 1, SERVER_STEP_SAMPLE // 2).astype(int)
        heaviest = np.argsort(new_lp)[-SERVER_STEP_SAMPLE // 8:]
        checked = sorted({*range(SERVER_STEP_SAMPLE // 8), *range(n - SERVER_STEP_SAMPLE // 8, n), *spread.tolist(),
                          *heaviest.tolist()})
    lo, hi, mid = {}, {}, {}
    for i in checked:
        if lp[i] == -np.inf:
            lo[i] = hi[i] = mid[i] = None
            continue
        slo, shi = _step_interval(x[i], y, yhat, rule, eta)
        a, b = Fraction(float(lp[i])) - shi, Fraction(float(lp[i])) - slo
        lo[i], hi[i], mid[i] = a - abs(a) / 2**51, b + abs(b) / 2**51, (a + b) / 2
    live = [i for i in checked if lo[i] is not None]
    best = max(lo[i] for i in live)
    floor = alpha / n
    for j in checked:
        if lo[j] is None or hi[j] < best - 800:
            assert p[j] <= floor * (1 + 1e-12), (j, p[j], "a client far behind the best must get only the fixed share")
    by_lo = sorted(live, key=lambda i: lo[i], reverse=True)  # order, in O(N log N): the least weight of every client
    least, k = np.inf, 0                                        # whose score beats hi_j + 1e-6 is >= p_j
    for j in sorted(live, key=lambda i: hi[i], reverse=True):
        while k < len(by_lo) and lo[by_lo[k]] > hi[j] + Fraction(1, 10**6):
            least = min(least, p[by_lo[k]])
            k += 1
        assert least >= p[j], (j, p[j], least, "a better score got a smaller weight")
    if alpha == 0.0:
        sure = [i for i in live if hi[i] - lo[i] < Fraction(1, 1000) and hi[i] > best - 600]
        for i in sure:  # against the first of them (every pair follows)
            j = sure[0]
            want = float(mid[i] - mid[j])
            tol = float(hi[i] - lo[i] + hi[j] - lo[j]) + 1e-12 * (1.0 + abs(want)) + 2**-50 * float(abs(mid[i]) + abs(best))
            assert abs((new_lp[i] - new_lp[j]) - want) <= tol, (i, j, new_lp[i] - new_lp[j], want)


# --------------------------------------------------------------------------- asynchronous exceptions at any bytecode
_PACKAGE_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (memoa_fast, memoa_fast.kernels))
_KERNEL_DIR = os.path.dirname(memoa_fast.kernels.__file__) + os.sep


def _trace_package(call, on_opcode):
    """Run ``call()`` with ``on_opcode(frame)`` at every bytecode run in the package's files; returns what it returns."""
    def opcode(frame, event, arg):
        if event == "opcode":
            on_opcode(frame)
        return opcode

    def enter(frame, event, arg):
        if frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
            # f_trace first. Python 3.13 sends opcode events to a code object instrumented for them, and setting
            # f_trace_opcodes instruments it only if the frame already has f_trace (which the interpreter sets from
            # our return value, after this call). It also removes that instrumentation when a frame runs a bytecode
            # after the tracer raised (a `with` block's __exit__, a `finally`): without f_trace here, the next call
            # of that code object got no opcode event at all, and an interrupt at its k-th bytecode never came.
            frame.f_trace = opcode
            frame.f_trace_opcodes = True
            return opcode
        return None

    # No garbage collection while tracing: a collection runs whatever package __del__ is due (ClientForecasters') inside
    # the traced call, so the bytecodes counted, and where an interrupt lands, depended on the heap's history (a full
    # suite failed test_the_tracer_sees_every_bytecode_of_a_call_after_an_interrupt_inside_a_with_block once that way).
    collecting = gc.isenabled()
    gc.disable()
    sys.settrace(enter)
    try:
        return call()
    finally:
        sys.settrace(None)
        if collecting:
            gc.enable()


def _interrupt_at(k, call, where=None, classify=None):
    """Run ``call()`` with ``KeyboardInterrupt`` raised at the ``k``-th bytecode run in the package's files.

    Returns True if it was raised (``call`` ran at least ``k`` of them), False if ``call`` completed first.
    ``where``, a list, receives for every bytecode run ``classify(frame)``: by default whether it is in a
    kernel module's frame.
    """
    count = 0

    def on_opcode(frame):
        nonlocal count
        count += 1
        if where is not None:
            where.append(frame.f_code.co_filename.startswith(_KERNEL_DIR) if classify is None else classify(frame))
        if count == k:
            raise KeyboardInterrupt

    try:
        _trace_package(call, on_opcode)
    except KeyboardInterrupt:
        return True
    return False


def _bytecodes(make, call, classify=None):
    """For every bytecode ``call(make())`` runs in the package's files, whether it is in a kernel module's frame (or ``classify(frame)``).

    Counted on the second of two runs: Python 3.12.1 sends no opcode events to a frame of a code object that had
    never been traced for them before (it sends them from the next call on).
    """
    for _ in range(2):
        where, obj = [], make()
        _interrupt_at(0, lambda: call(obj), where, classify)
    assert where, "the tracer saw none of the call's bytecodes"
    return where
