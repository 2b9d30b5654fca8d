"""Compiled kernels (Numba and Cython) against the NumPy reference.

Every kernel of both compiled backends is compared with
``memoa_fast.kernels._reference`` on random populations (sizes at and around
the chunk boundaries, up to 10^5 agents; dimensions 1, 3, 16; one and two
threads; signals with NaN/+inf/-inf rows; both server rules; fixed share
alpha in {0, 0.01, 1}; learning rates up to 50). Arrays are drawn from
``np.random.default_rng(seed)`` with a hypothesis-drawn seed: hypothesis
explores the structure (sizes, rates, rules), NumPy fills the arrays.

Tolerance: float64 results must agree to ``RTOL = 1e-12`` relative, plus an
absolute term ``RTOL * scale`` where ``scale`` is the magnitude of the terms
that were summed (e.g. ``mean |x_i|`` for a mean, ``sum_i p_i |x_i|`` for the
prediction): the reference sums in a different order (NumPy pairwise, BLAS),
so a cancelling sum can only be compared relative to its terms.

The compiled backends must also be bitwise reproducible: the same input gives
the same bytes on one thread, on two threads, and on one versus two threads.
"""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from memoa_fast.kernels import CHUNK, _cython, _numba, _reference, work_shape

RTOL = 1e-12  # about 4500 float64 ulps: room for reordered sums, far below any real bug
BACKENDS = {"numba": _numba, "cython": _cython}

# Numba refuses more threads than it was started with; Cython has no such limit.
NUMBA_THREADS = numba.config.NUMBA_NUM_THREADS
THREADS = {"numba": (1, 2) if NUMBA_THREADS >= 2 else (1,), "cython": (1, 2)}
needs_two_numba_threads = pytest.mark.skipif(NUMBA_THREADS < 2, reason="Numba was started with one thread")

# Sizes at the chunk boundaries, one big population; None lets hypothesis draw any size.
EDGE_N = [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 1, 100_000]
SIZES = [*EDGE_N, None]
DIMS = (1, 3, 16)

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AT_EDGE = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)
bad_fractions = st.sampled_from([0.0, 0.05, 0.5, 1.0])


def _settings_for(n):
    return PROPERTY if n is None else AT_EDGE


def draw_n(data, n):
    return data.draw(st.integers(1, 3 * CHUNK + 2), label="n") if n is None else n


def draw_threads(data, backend):
    return data.draw(st.sampled_from(THREADS[backend]), label="threads")


# --------------------------------------------------------------------------- helpers
def assert_close(actual, expected, scale, what):
    """``|actual - expected| <= RTOL * (|expected| + scale)`` elementwise (equal infinities pass)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float64 and actual.shape == expected.shape, what
    err = np.abs(actual - expected)
    tol = RTOL * (np.abs(expected) + scale)
    ok = (actual == expected) | (err <= tol)
    if not ok.all():
        with np.errstate(all="ignore"):
            worst = np.unravel_index(np.argmax(np.where(ok, 0.0, err / np.maximum(tol, 1e-300))), err.shape)
        raise AssertionError(
            f"{what}: {np.count_nonzero(~ok)} entries off; worst at {worst}: "
            f"actual={actual[worst]!r} expected={expected[worst]!r} tol={tol[worst]!r}"
        )


def new_work(n, d):
    """Work array full of NaN: a kernel that reads a cell it did not write fails loudly."""
    return np.full(work_shape(n, d), np.nan)


def population(seed, n, d, bad_fraction):
    """States, signals with non-finite rows, and costs (with ties in about a third of the draws)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3)
    x = rng.normal(rng.normal(size=d) * scale, scale, size=(n, d))
    s = x + rng.normal(0.0, scale, size=(n, d))
    bad = np.flatnonzero(rng.random(n) < bad_fraction)
    s[bad, rng.integers(0, d, bad.size)] = rng.choice([np.nan, np.inf, -np.inf], bad.size)
    if rng.random() < 0.3:
        J = rng.integers(0, 4, n).astype(np.float64)  # many agents share the largest cost
    else:
        J = rng.exponential(scale * scale, n)
    return rng, x, s, J


def log_weights(rng, n, spread):
    """Normalised log-weights, spread over ``spread`` nats."""
    log_p = rng.normal(0.0, spread, n)
    return log_p - logsumexp(log_p)


def reference_update(log_p, x, y, yhat, rule, eta, alpha):
    # The reference computes log1p(-1) = -inf on purpose when alpha == 1.
    with np.errstate(divide="ignore"):
        _reference.mixture_update(log_p, x, y, yhat, rule, eta, alpha, None, 1)


# --------------------------------------------------------------------------- mean field
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_mean_field_matches_reference(backend, n):
    @_settings_for(n)
    @given(data=st.data(), seed=seeds, d=st.sampled_from(DIMS), bad_fraction=bad_fractions)
    def check(data, seed, d, bad_fraction):
        m = draw_n(data, n)
        threads = draw_threads(data, backend)
        _, x, s, J = population(seed, m, d, bad_fraction)
        sentinel = 123.25
        ref_x, ref_s = np.full(d, sentinel), np.full(d, sentinel)
        expected = _reference.mean_field(x, s, J, None, ref_x, ref_s, 1)
        out_x, out_s = np.full(d, sentinel), np.full(d, sentinel)
        got = BACKENDS[backend].mean_field(x, s, J, new_work(m, d), out_x, out_s, threads)

        n_finite, max_J, argmax_J = got
        assert type(n_finite) is int and type(max_J) is float and type(argmax_J) is int
        assert got == expected  # count, max and first argmax are exact
        assert_close(out_x, ref_x, np.abs(x).mean(axis=0), "mean state")
        ok = np.isfinite(s).all(axis=1)
        if ok.any():
            assert_close(out_s, ref_s, np.abs(s[ok]).mean(axis=0), "mean signal")
        else:
            assert (out_s == sentinel).all(), "no finite signal: out_mean_s must be left as it was"
        assert np.isfinite(out_x).all() and np.isfinite(out_s).all(), "non-finite signals leaked into the mean field"

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_mean_field_nan_signals_never_leak(backend, threads):
    if backend == "numba" and threads > NUMBA_THREADS:
        pytest.skip("Numba was started with one thread")
    n, d = 3 * CHUNK + 1, 3
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, d))
    s = rng.normal(size=(n, d))
    s[::2, 0] = np.nan  # a NaN in every chunk
    s[1::4, 2] = -np.inf
    kern = BACKENDS[backend]
    out_x, out_s = np.empty(d), np.empty(d)
    n_finite, _, _ = kern.mean_field(x, s, np.zeros(n), new_work(n, d), out_x, out_s, threads)
    ok = np.isfinite(s).all(axis=1)
    assert n_finite == ok.sum()
    assert np.isfinite(out_s).all()
    assert_close(out_s, s[ok].mean(axis=0), np.abs(s[ok]).mean(axis=0), "mean signal")

    s[:] = np.nan  # nothing finite: out_mean_s untouched, bit for bit
    before = out_s.copy()
    n_finite, _, _ = kern.mean_field(x, s, np.zeros(n), new_work(n, d), out_x, out_s, threads)
    assert n_finite == 0
    assert out_s.tobytes() == before.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_field_argmax_tie_goes_to_first_index(backend):
    n, d = 3 * CHUNK + 1, 1
    J = np.zeros(n)
    J[[5, CHUNK + 3, 2 * CHUNK, n - 1]] = 2.0  # ties within and across chunks
    x = np.ones((n, d))
    for threads in THREADS[backend]:
        got = BACKENDS[backend].mean_field(x, x, J, new_work(n, d), np.empty(d), np.empty(d), threads)
        assert got == (n, 2.0, 5)


# --------------------------------------------------------------------------- policy
coefficients = st.floats(-2.0, 2.0, allow_subnormal=False)
weights = st.floats(0.0, 5.0, allow_subnormal=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_policy_update_matches_reference(backend, n):
    @_settings_for(n)
    @given(
        data=st.data(),
        seed=seeds,
        d=st.sampled_from(DIMS),
        bad_fraction=bad_fractions,
        gain=st.floats(0.0, 1.0, allow_subnormal=False),
        c=st.tuples(coefficients, coefficients, coefficients),
        qkr=st.tuples(weights, weights, st.floats(1e-3, 5.0)),
        discount=st.floats(0.01, 1.0),
    )
    def check(data, seed, d, bad_fraction, gain, c, qkr, discount):
        m = draw_n(data, n)
        threads = draw_threads(data, backend)
        rng, x, s, J = population(seed, m, d, bad_fraction)
        mean_s, mean_x = rng.normal(size=d) * np.abs(x).mean(), rng.normal(size=d) * np.abs(x).mean()
        (c_signal, c_signal_mean, c_state_mean), (q, kappa, r) = c, qkr
        args = (gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, discount)

        ref_x, ref_J = x.copy(), J.copy()
        _reference.policy_update(ref_x, s, ref_J, *args, 1)
        got_x, got_J = x.copy(), J.copy()
        BACKENDS[backend].policy_update(got_x, s, got_J, *args, threads)

        # Magnitudes of the terms of u_i and of the stage cost, for the absolute tolerance.
        ok = np.isfinite(s).all(axis=1)
        s0, ax = np.where(ok[:, None], np.abs(s), 0.0), np.abs(x)
        mag_u = np.where(ok[:, None], gain * (ax + abs(c_signal) * s0 + abs(c_signal_mean) * np.abs(mean_s) + abs(c_state_mean) * np.abs(mean_x)), 0.0)
        mag_cost = (q * np.where(ok[:, None], (ax + s0) ** 2, 0.0) + kappa * (ax + np.abs(mean_x)) ** 2 + r * mag_u**2).sum(axis=1)
        assert_close(got_x, ref_x, ax + mag_u, "states")
        assert_close(got_J, ref_J, np.abs(J) + 0.5 * discount * mag_cost, "costs")
        assert got_x[~ok].tobytes() == x[~ok].tobytes(), "an agent with a non-finite signal must hold"
        assert np.isfinite(got_x).all() and np.isfinite(got_J).all()

    check()


# --------------------------------------------------------------------------- server
spreads = st.sampled_from([0.0, 1.0, 30.0, 300.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_mixture_predict_matches_reference(backend, n):
    @_settings_for(n)
    @given(data=st.data(), seed=seeds, d=st.sampled_from(DIMS), spread=spreads)
    def check(data, seed, d, spread):
        m = draw_n(data, n)
        threads = draw_threads(data, backend)
        rng, x, _, _ = population(seed, m, d, 0.0)
        log_p = log_weights(rng, m, spread)
        expected = np.empty(d)
        _reference.mixture_predict(log_p, x, None, expected, 1)
        out = np.full(d, np.nan)
        BACKENDS[backend].mixture_predict(log_p, x, new_work(m, d), out, threads)
        assert_close(out, expected, np.exp(log_p) @ np.abs(x), "prediction")

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_mixture_update_matches_reference(backend, n):
    @_settings_for(n)
    @given(
        data=st.data(),
        seed=seeds,
        d=st.sampled_from(DIMS),
        spread=spreads,
        rule=st.sampled_from([_reference.RULE_EG, _reference.RULE_HEDGE]),
        eta=st.one_of(st.sampled_from([0.0, 50.0]), st.floats(0.0, 50.0, allow_subnormal=False)),
        alpha=st.sampled_from([0.0, 0.01, 1.0]),
    )
    def check(data, seed, d, spread, rule, eta, alpha):
        m = draw_n(data, n)
        threads = draw_threads(data, backend)
        rng, x, _, _ = population(seed, m, d, 0.0)
        log_p = log_weights(rng, m, spread)
        y = rng.normal(size=d) * np.abs(x).mean()
        yhat = np.exp(log_p) @ x

        expected = log_p.copy()
        reference_update(expected, x, y, yhat, rule, eta, alpha)
        got = log_p.copy()
        BACKENDS[backend].mixture_update(got, x, y, yhat, rule, eta, alpha, new_work(m, d), threads)

        # A log-weight is the difference of numbers of the size of the stepped
        # log-weights v_i, so its absolute error scales with max |v|.
        if rule == _reference.RULE_EG:
            mag_loss = 2.0 * (np.abs(x) @ np.abs(yhat - y))
        else:
            mag_loss = ((np.abs(x) + np.abs(y)) ** 2).sum(axis=1)
        mag = np.max(np.abs(log_p) + eta * mag_loss)
        assert_close(got, expected, mag, "log-weights")
        assert np.isfinite(got).all()
        assert abs(logsumexp(got)) <= RTOL * (1.0 + mag), "weights are not normalised"

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", [_reference.RULE_EG, _reference.RULE_HEDGE])
@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
def test_mixture_weights_stay_normalised(backend, rule, alpha):
    n, d = 2 * CHUNK + 17, 3
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, d))
    kern = BACKENDS[backend]
    log_p = np.full(n, -np.log(n))
    work = new_work(n, d)
    yhat = np.empty(d)
    for t in range(20):
        threads = THREADS[backend][t % len(THREADS[backend])]
        kern.mixture_predict(log_p, x, work, yhat, threads)
        y = np.sin(0.3 * t + np.arange(d))
        kern.mixture_update(log_p, x, y, yhat, rule, 2.0, alpha, work, threads)
        assert abs(logsumexp(log_p)) <= 1e-12
        assert np.isfinite(log_p).all()
    if alpha == 1.0:
        assert (log_p == -np.log(n)).all()
    elif alpha > 0.0:
        assert log_p.min() >= np.log(alpha / n) - 1e-12  # fixed share keeps a floor


# --------------------------------------------------------------------------- determinism
def _run_all(kern, inputs, threads):
    """Every kernel once on copies of ``inputs``; returns the bytes of every output."""
    x, s, J, log_p, y, n, d = inputs
    out_x, out_s = np.full(d, np.nan), np.full(d, np.nan)
    stats = kern.mean_field(x, s, J, new_work(n, d), out_x, out_s, threads)
    x2, J2 = x.copy(), J.copy()
    kern.policy_update(x2, s, J2, 0.4, 0.3, 0.5, 0.2, out_s, 1.0, 2.0, 0.5, out_x, 0.95, threads)
    yhat = np.full(d, np.nan)
    kern.mixture_predict(log_p, x, new_work(n, d), yhat, threads)
    updated = {}
    for rule in (_reference.RULE_EG, _reference.RULE_HEDGE):
        for alpha in (0.0, 0.01):
            lp = log_p.copy()
            kern.mixture_update(lp, x, y, yhat, rule, 50.0, alpha, new_work(n, d), threads)
            updated[rule, alpha] = lp.tobytes()
    return {
        "mean_field": (stats, out_x.tobytes(), out_s.tobytes()),
        "policy_update": (x2.tobytes(), J2.tobytes()),
        "mixture_predict": yhat.tobytes(),
        "mixture_update": updated,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [3 * CHUNK + 1, 100_000])
def test_bitwise_deterministic(backend, n):
    if backend == "numba" and NUMBA_THREADS < 2:
        pytest.skip("Numba was started with one thread")
    d = 3
    rng, x, s, J = population(2024, n, d, 0.1)
    inputs = (x, s, J, log_weights(rng, n, 30.0), rng.normal(size=d), n, d)
    kern = BACKENDS[backend]
    one = _run_all(kern, inputs, 1)
    assert _run_all(kern, inputs, 1) == one, "threads=1: same input, different bytes"
    two = _run_all(kern, inputs, 2)
    assert _run_all(kern, inputs, 2) == two, "threads=2: same input, different bytes"
    for kernel in one:
        assert one[kernel] == two[kernel], f"{kernel}: threads=1 and threads=2 differ"


@needs_two_numba_threads
def test_numba_restores_global_thread_count():
    n, d = 2 * CHUNK + 1, 3
    rng, x, s, J = population(5, n, d, 0.1)
    inputs = (x, s, J, log_weights(rng, n, 1.0), rng.normal(size=d), n, d)
    before = numba.get_num_threads()
    _run_all(_numba, inputs, 2)
    assert numba.get_num_threads() == before
    numba.set_num_threads(1)
    try:
        _run_all(_numba, inputs, 2)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
    assert numba.get_num_threads() == before


def test_backends_expose_the_same_api():
    for name in ("mean_field", "policy_update", "mixture_predict", "mixture_update", "max_threads"):
        for kern in BACKENDS.values():
            assert callable(getattr(kern, name))
    assert _cython.RULE_EG == _numba.RULE_EG == _reference.RULE_EG == 0
    assert _cython.RULE_HEDGE == _numba.RULE_HEDGE == _reference.RULE_HEDGE == 1
    assert _cython.max_threads() >= 1


def test_numba_vectorised_log_matches_numpy():
    """``_numba._log_into`` (the fixed-share pass's log) within 1 ulp of ``numpy.log``, specials exactly."""
    rng = np.random.default_rng(12)
    x = np.concatenate([
        10.0 ** rng.uniform(-307, 308, 400_000),        # the whole normal range
        1.0 + rng.uniform(-0.3, 0.42, 200_000),         # around the [sqrt(1/2), sqrt(2)) reduction
        1.0 + rng.standard_normal(100_000) * 1e-9,      # near 1: tiny results, relative accuracy
        np.nextafter(np.sqrt([0.5, 2.0]), [0.0, 0.0]), np.sqrt([0.5, 2.0]), [1.0, 2.0, 0.5],
        [2.2250738585072014e-308, 1.7976931348623157e308],
    ])
    out = np.empty_like(x)
    _numba._log_into(x, out, np.empty(2 * x.size))
    ref = np.log(x)
    assert np.all(np.abs(out - ref) <= np.spacing(np.abs(ref))), "more than 1 ulp from numpy.log"
    # zero, subnormals, negatives, infinities, NaN take the scalar fix-up: same as numpy, and each
    # result depends on its own input only (a special value does not change its neighbours)
    special = np.array([0.0, -0.0, 5e-324, 1e-310, -1.0, -np.inf, np.inf, np.nan])
    mixed = np.concatenate([x[:1000], special, x[1000:2000]])
    out = np.empty_like(mixed)
    _numba._log_into(mixed, out, np.empty(2 * mixed.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.log(mixed)
    np.testing.assert_array_equal(out[1000:1008], ref[1000:1008])
    np.testing.assert_array_equal(out[:1000], _log_chunks(x[:1000], 7))
    np.testing.assert_array_equal(out[1008:], _log_chunks(x[1000:2000], 13))


def _log_chunks(x, step):
    out = np.empty_like(x)
    for lo in range(0, x.size, step):
        seg = np.ascontiguousarray(x[lo:lo + step])
        res = np.empty_like(seg)
        _numba._log_into(seg, res, np.empty(2 * seg.size))
        out[lo:lo + step] = res
    return out
