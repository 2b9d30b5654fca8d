"""The fused pipeline round (``memoa_fast.timeseries.pipeline``) against its NumPy reference and the unfused objects.

- the Numba kernel against ``_pipeline_reference`` to ``RTOL = 1e-12`` (relative
  to each array's largest entry) over N around ``CHUNK``, d in {1, 3},
  p in {1, 2, 3}, both rules, alpha 0 (log-domain weights) and > 0 (linear weights), 1 and 2 threads;
- bitwise the same on 1 and 2 threads;
- the noise: a function of (seed, client, round, coordinate) only (any slice
  of clients reproduces those rows bitwise), standard normal, and the very
  draws the forecasters see;
- one fused round is ``observe``, ``Population.step``, ``Server.predict`` and
  ``Server.update`` on the same signals, to ``1e-12``;
- the accuracy of the kernel's vectorised ``exp``, ``log`` and ``sin``/``cos``.
"""
import math

import numba
import numpy as np
import pytest
from helpers import EXTENDED, assert_server_step, call_from_two_threads, ulps_from_exact
from scipy import stats

from memoa_fast import Game, Population, Server, _memory
from memoa_fast.kernels import CHUNK, _forecast_reference
from memoa_fast.kernels import _pipeline_numba as kern
from memoa_fast.kernels import _pipeline_reference as ref
from memoa_fast.timeseries.pipeline import Pipeline

RTOL = 1e-12
TWO_THREADS = 2 if numba.config.NUMBA_NUM_THREADS >= 2 else 1
GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
ARRAYS = ("states", "costs", "log_weights", "signals", "squared_errors", "signal_squared_errors", "mixture")


def series(T, d, seed=0):
    t = np.arange(T)[:, None]
    phase = np.arange(d)[None, :]
    noise = np.random.default_rng(seed).normal(scale=0.1, size=(T, d))
    return np.sin(0.3 * t + phase) + 0.5 * np.cos(0.11 * t * (1 + phase)) + noise


def close(a, b, rtol=RTOL, floor=1e-300):
    scale = max(float(np.max(np.abs(b))), floor) if np.size(b) else 1.0
    return float(np.max(np.abs(a - b))) <= rtol * scale if np.size(b) else True


def close_array(name, a, b):
    """``close``; log-weights on a scale of at least 1 (an error of ``log p`` is ``p``'s relative error, so
    one client's ``log p = 0`` may come out as ``-1.1e-16``: the weight 1 to an ulp).
    """
    return close(a, b, floor=1.0 if name == "log_weights" else 1e-300)


def run_pair(n, d, p, rule, alpha, threads, rounds=6, **kw):
    y = series(rounds, d)
    args = dict(game=GAME, rule=rule, eta=0.7, alpha=alpha, lags=p, seed=3, **kw)
    fast = Pipeline(n, d, backend="numba", threads=threads, parallel_threshold=1, **args)
    slow = Pipeline(n, d, backend="numpy", **args)
    for t in range(rounds):
        a = fast.round(y[t], record=t != 2).copy()
        b = slow.round(y[t], record=t != 2).copy()
        assert close(a, b), (t, a, b)
    return fast, slow


# --------------------------------------------------------------------------- against the reference
CASES = [
    # n, d, p, rule, alpha, threads
    (1, 1, 2, "hedge", 0.01, 1),
    (CHUNK - 1, 1, 2, "hedge", 0.0, 1),
    (CHUNK + 1, 3, 2, "eg", 0.05, TWO_THREADS),
    (2 * CHUNK + 7, 1, 1, "eg", 0.0, TWO_THREADS),
    (CHUNK, 3, 3, "hedge", 0.05, 1),
    (CHUNK + 513, 1, 3, "hedge", 1.0, TWO_THREADS),
    (700, 1, 1, "eg", 0.01, 1),  # d = 1 with linear weights: pass B's one-loop blocks (eg's centred sum after them)
]


@pytest.mark.parametrize("n,d,p,rule,alpha,threads", CASES)
def test_compiled_round_matches_reference(n, d, p, rule, alpha, threads):
    fast, slow = run_pair(n, d, p, rule, alpha, threads)
    for name in ARRAYS:
        assert close_array(name, getattr(fast, name), getattr(slow, name)), name
    assert close(fast.forecaster_weights, slow.forecaster_weights)
    assert close(fast.mean_state, slow.mean_state) and close(fast.mean_signal, slow.mean_signal)
    assert fast.worst_client == slow.worst_client == int(np.argmax(slow.costs))
    assert fast.n_valid_signals == slow.n_valid_signals == n
    assert math.isclose(fast.last_error_sum, slow.last_error_sum, rel_tol=RTOL)
    assert math.isclose(float(np.exp(fast.log_weights).sum()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("first,d", [(777, 1), (4096 + 3, 1), (12, 1), (5, 3)])
def test_a_shard_offset_draws_its_own_clients_noise(first, d):
    """``flags[F_FIRST]`` (a shard's first client; odd starts split a Box-Muller pair): kernel = reference."""
    n, T = CHUNK + 300, 4
    y = series(T, d)
    args = dict(game=GAME, rule="hedge", eta=0.7, alpha=0.01, lags=2, seed=5)
    fast = Pipeline(n, d, backend="numba", threads=TWO_THREADS, parallel_threshold=1, **args)
    slow = Pipeline(n, d, backend="numpy", **args)
    for pipe in (fast, slow):
        pipe._flags[pipe._kern.F_FIRST] = first
    for t in range(T):
        assert close(fast.round(y[t]).copy(), slow.round(y[t]).copy())
    for name in ARRAYS:
        assert close_array(name, getattr(fast, name), getattr(slow, name)), name
    # round 0's forecast is the first noisy value: the noise of clients first .. first + n - 1
    key, _ = kern.seed_keys(5)
    fresh = Pipeline(n, d, backend="numba", threads=1, **args)
    fresh._flags[fresh._kern.F_FIRST] = first
    fresh.round(y[0])
    assert close(fresh.signals, y[0] + fresh.noise_scales[:, None] * kern.normals(key, first, 0, n, d), rtol=4e-16)


@pytest.mark.parametrize("rule,alpha", [("hedge", 0.0), ("hedge", 0.01), ("eg", 0.01)])
def test_eta_zero_and_a_huge_step_keep_weights_normalised(rule, alpha):
    # targets near TARGET_LIMIT (1e30, the largest a Pipeline accepts) and eta = 1e300: eta * loss overflows
    # (the step is clipped: weights stay finite or -inf, never NaN); alpha > 0 runs the linear weights (steps
    # of +-1e300). Targets beyond 1e30 (which made the forecasts pass SIGNAL_LIMIT) are refused (test_a_target_beyond_the_limit_...).
    y = series(5, 1) * (0.5e30 / np.abs(series(5, 1)).max())
    for eta in (0.0, 1e300):
        a = Pipeline(CHUNK + 3, game=GAME, rule=rule, eta=eta, alpha=alpha, backend="numba", threads=1)
        b = Pipeline(CHUNK + 3, game=GAME, rule=rule, eta=eta, alpha=alpha, backend="numpy")
        assert a._linear == (alpha > 0)
        for v in y:
            a.round(v)
            b.round(v)
        assert not np.isnan(a.log_weights).any()
        assert np.array_equal(np.isneginf(a.log_weights), np.isneginf(b.log_weights))
        finite = np.isfinite(b.log_weights)
        assert close(a.log_weights[finite], b.log_weights[finite])
        assert math.isclose(float(a.weights.sum()), 1.0, rel_tol=1e-12)
        assert close(a.states, b.states) and close(a.costs, b.costs) and a.n_valid_signals == b.n_valid_signals


# the reference runs the same code for every d; the kernel has d = 1 loops of its own
BEYOND = [(b, t, rule, d) for b, t in [("numpy", 1), ("numba", 1), ("numba", TWO_THREADS)]
          for rule, d in [("hedge", 1), ("hedge", 2), ("eg", 1)] if b == "numba" or d == 1]


@pytest.mark.parametrize("backend,threads,rule,d", BEYOND)
@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_server_steps_beyond_1e300_keep_their_order(backend, threads, rule, d, alpha):
    # Client noise 1e22..1e26 on targets near 1e26 and eta = 1e250: every step in 4e300..1e304 (the 1e300 clip made
    # them tie), a few overflowing; eta = 1e255: steps 4e305..8e306, then every one overflowing. Each reweighting round is MODEL.md section 5's update
    # in exact arithmetic to the rounding of each step (helpers.assert_server_step): the log-domain path
    # (alpha = 0) and the linear weights (alpha > 0: exp(-step - top_c), with top_c near -1.8e308); on 2 threads
    # over two chunks (their merge: top_c - top).
    y = series(4, d) * 1e26
    for eta in (1e250, 1e255):
        pipe = Pipeline(CHUNK + 3 if threads > 1 else 300, d, game=GAME, rule=rule, eta=eta, alpha=alpha,
                        noise_range=(1e22, 1e26), seed=4, backend=backend, threads=threads, parallel_threshold=1)
        assert pipe._linear == (alpha > 0)
        for t, v in enumerate(y):
            x, lp, yhat = pipe.states.copy(), pipe.log_weights.copy(), pipe.mixture.copy()
            pipe.round(v)
            if t > 0:  # round 0 does not reweight
                assert_server_step(lp, x, v, yhat, rule, eta, alpha, pipe.log_weights)


@pytest.mark.parametrize("rule,d,alpha", [("eg", 2, 0.02), ("hedge", 1, 0.01), ("hedge", 1, 0.0)])
def test_thread_count_does_not_change_a_bit(rule, d, alpha):
    """Also for the fused loops of ``d = 1`` (hedge), with linear (alpha > 0) and log-domain weights."""
    if TWO_THREADS == 1:
        pytest.skip("Numba has one thread here")
    n = 3 * CHUNK + 11
    y = series(5, d)
    one = Pipeline(n, d, game=GAME, rule=rule, alpha=alpha, threads=1)
    two = Pipeline(n, d, game=GAME, rule=rule, alpha=alpha, threads=2, parallel_threshold=1)
    for v in y:
        a, b = one.round(v).copy(), two.round(v).copy()
        assert np.array_equal(a, b)
    for name in ARRAYS:
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert np.array_equal(one.mean_state, two.mean_state) and one.worst_client == two.worst_client


def test_parallel_chunk_order_is_a_permutation_with_the_short_chunk_in_the_middle():
    for chunks in range(1, 60):
        order = [kern._chunk_order(i, chunks) for i in range(chunks)]
        assert sorted(order) == list(range(chunks))
        assert order[(chunks + 1) // 2 - 1] == chunks - 1


# --------------------------------------------------------------------------- the noise
@pytest.mark.parametrize("d", [1, 3])
def test_noise_depends_on_client_round_coordinate_only(d):
    key, _ = kern.seed_keys(7)
    n = 2 * CHUNK + 5
    whole = kern.normals(key, 0, 4, n, d)
    for lo, hi in [(0, 1), (1, 2), (3, 4100), (CHUNK - 1, n), (777, 778)]:  # odd and even starts, any shard layout
        assert np.array_equal(kern.normals(key, lo, 4, hi - lo, d), whole[lo:hi])
    assert not np.array_equal(kern.normals(key, 0, 5, n, d), whole)  # another round, other draws
    # the reference's definition, evaluated with NumPy's sin/cos/log (a few ulps apart)
    assert np.max(np.abs(ref.normals(key, 0, 4, n, d) - whole)) <= 4e-15 * max(1.0, np.max(np.abs(whole)))


def test_the_forecasters_see_that_noise():
    """Round 0 with persistence weights: ``s_i(0) = z_i(0) = y(0) + sigma_i eps_i(0)``."""
    n, d = CHUNK + 9, 2
    pipe = Pipeline(n, d, game=GAME, seed=11, threads=TWO_THREADS, parallel_threshold=1)
    y0 = np.array([0.3, -1.2])
    pipe.round(y0)
    key, scale_key = kern.seed_keys(11)
    expected = y0 + pipe.noise_scales[:, None] * kern.normals(key, 0, 0, n, d)
    assert close(pipe.signals, expected, rtol=4e-16)  # the kernel may fuse y + sigma * eps into one FMA
    assert np.array_equal(pipe.noise_scales, ref.noise_scales(scale_key, 0, n, 0.02, 1.0))
    assert pipe.noise_scales.min() >= 0.02 and pipe.noise_scales.max() <= 1.0


@pytest.mark.parametrize("p", [2, 3])  # the p = 2 fast path and the general one
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_the_forecasters_squares_are_capped_beyond_8(backend, p):
    """The forecasters' features are ``(lags, min(lags**2, 64), 1)``, as ``ClientForecasters``': NLMS written out on the
    pipeline's own noise, for targets near 30 (the plain squares, 900, let the linear weights all but stop learning).
    """
    n, d, y = 3, 1, np.array([30.0, -12.0, 31.0, 7.0, 29.0])
    pipe = Pipeline(n, d, game=GAME, lags=p, seed=11, backend=backend, threads=1)
    key, _ = kern.seed_keys(11)
    w = np.zeros((n, 2 * p + 1))
    w[:, 0] = 1.0
    lags = np.zeros((n, p))
    phi = lambda v: np.concatenate([v, np.minimum(v * v, 64.0), np.ones((n, 1))], axis=1)  # noqa: E731
    for t, target in enumerate(y):
        z = target + pipe.noise_scales * kern.normals(key, 0, t, n, d)[:, 0]
        if t:
            f = phi(lags)
            w += (0.1 * (z - (w * f).sum(axis=1)) / (f * f).sum(axis=1))[:, None] * f
        lags = np.concatenate([z[:, None], lags[:, :-1]], axis=1)
        pipe.round(np.array([target]))
        assert close(pipe.signals[:, 0], (w * phi(lags)).sum(axis=1), rtol=1e-13), t
    assert close(pipe.forecaster_weights[:, 0], w, rtol=1e-13)


def test_noise_is_standard_normal():
    key, _ = kern.seed_keys(2026)
    z = kern.normals(key, 0, 3, 100_000, 2)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-4
    # the two outputs of one Box-Muller pair (coordinates 0 and 1) and consecutive rounds are uncorrelated
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 5 / math.sqrt(z.shape[0])
    z2 = kern.normals(key, 0, 4, 100_000, 2)
    assert abs(np.corrcoef(z.ravel(), z2.ravel())[0, 1]) < 5 / math.sqrt(n)
    assert abs(stats.kurtosis(z.ravel())) < 0.1


@pytest.mark.parametrize("rule,alpha,d", [("hedge", 0.01, 1), ("eg", 0.05, 2)])
def test_the_public_passes_are_a_round_bit_for_bit(rule, alpha, d):
    """``pass_a`` then ``pass_b`` (the compiled kernels' round in two calls, which ``bench_fused_pipeline.py --passes``
    times) on two threads give ``Pipeline.round``'s bits; each runs ``run``'s parallel sweep
    with one of its two passes, no parallel loop of its own.
    """
    n, T = 2 * CHUNK + 7, 5
    y = series(T, d, seed=2)
    args = dict(game=GAME, rule=rule, eta=0.6, alpha=alpha, lags=2, seed=4, threads=TWO_THREADS, parallel_threshold=1)
    whole, split = Pipeline(n, d, **args), Pipeline(n, d, **args)
    whole.round(y[0])
    split.round(y[0])
    for t in range(1, T):
        whole.round(y[t])
        split._y[...] = y[t]
        f = split._flags
        ref.round_flags(f, split.t, True)
        split._params[kern.P_HALF_DISCOUNT] = 0.5 * split._discount
        kern.pass_a(split._x, split._s, split._log_p, split._ebuf, split._sigma, split._weights, split._lag_buf,
                    split._sq_err, split._sq_sig, split._y, split._yhat, split._field, split._work, split._params,
                    split._key, f, split._stats, split._threads_used)
        kern.pass_b(split._x, split._s, split._J, split._log_p, split._ebuf, split._y, split._yhat, split._field,
                    split._work, split._params, f, split._stats, split._threads_used)
        split._field[kern.FIELD_STATE] = split._field[kern.FIELD_NEXT]
        split.t += 1
        split._discount *= GAME.gamma
        assert split._threads_used == TWO_THREADS
        for name in ("_x", "_s", "_J", "_log_p", "_weights", "_sq_err", "_sq_sig", "_yhat", "_field"):
            np.testing.assert_array_equal(getattr(split, name), getattr(whole, name), err_msg=f"{name}, round {t}")


# --------------------------------------------------------------------------- fused = unfused
@pytest.mark.parametrize("rule,alpha,d", [("hedge", 0.01, 1), ("eg", 0.0, 2), ("hedge", 0.0, 3)])
def test_fused_round_is_the_unfused_composition(rule, alpha, d):
    """The reference forecasters' signals fed to a Population and a Server give the fused round's numbers."""
    n, p, mu, eta, T = CHUNK + 100, 2, 0.1, 0.6, 6
    y = series(T, d, seed=5)
    pipe = Pipeline(n, d, game=GAME, rule=rule, eta=eta, alpha=alpha, lags=p, mu=mu, seed=9, threads=1)
    pop = Population(GAME, n, d, backend="numpy")
    server = Server(n, d, rule=rule, eta=eta, alpha=alpha, backend="numpy")
    key, _ = kern.seed_keys(9)
    sigma = pipe.noise_scales.copy()
    weights = np.zeros((n, d, 2 * p + 1))
    weights[:, :, 0] = 1.0
    lags = np.zeros((n, d, p))
    s = np.zeros((n, d))
    x = pop.states
    for t in range(T):
        yhat = pipe.round(y[t]).copy()
        eps = kern.normals(key, 0, t, n, d)
        _forecast_reference.forecast_step(y[t], eps, sigma, weights, lags, s, mu, t > 0, 1)
        if t > 0:
            server.update(x, y[t])
        x = pop.step(s)
        expected = server.predict(x)
        assert close(pipe.signals, s)
        assert close(pipe.states, pop.states)
        assert close(pipe.costs, pop.costs)
        assert close(pipe.log_weights, server.log_weights)
        assert close(yhat, expected), (t, yhat, expected)
    assert pipe.worst_client == pop.worst_agent
    assert close(pipe.mean_state, pop.states.mean(axis=0))


# --------------------------------------------------------------------------- vector math accuracy
@pytest.mark.skipif(not EXTENDED, reason="numpy.longdouble is no wider than float64 here: no exact reference")
def test_exp_within_one_ulp_of_the_exact_value(rng):
    """Against ``numpy.longdouble``, not ``numpy.exp`` (whose own error depends on NumPy's version: 1.5 ulp in 1.26)."""
    x = np.concatenate([rng.uniform(-745.0, 709.7, 200_000), rng.uniform(-1.0, 1.0, 50_000), [0.0, -745.0, 709.7]])
    got, exact = kern.exp(x), np.exp(x.astype(np.longdouble))
    normal = exact >= np.finfo(np.float64).tiny
    assert ulps_from_exact(got[normal], exact[normal]).max() < 1.0
    assert np.array_equal(kern.exp(np.array([-np.inf, -800.0, 800.0])), [0.0, 0.0, np.inf])


@pytest.mark.skipif(not EXTENDED, reason="numpy.longdouble is no wider than float64 here: no exact reference")
def test_log_within_one_ulp_of_the_exact_value(rng):
    """Against ``numpy.longdouble``, not ``numpy.log`` (1.7 ulp off in NumPy 1.26)."""
    x = np.concatenate([np.exp(rng.uniform(-708.0, 709.0, 200_000)), rng.uniform(0.5, 2.0, 50_000), [1.0, 2.0**-53]])
    got = kern.log(x)
    assert ulps_from_exact(got, np.log(x.astype(np.longdouble))).max() < 1.0
    assert got[-2] == 0.0


def test_sincos_2pi_within_two_ulps(rng):
    """Against ``numpy.longdouble`` on the exactly reduced argument (cos(2 pi u) = cos(2 pi r) etc., r = u - k/4)."""
    u = np.floor(rng.random(300_000) * 2.0**53) / 2.0**53  # the kernel's uniforms: multiples of 2^-53
    u = np.concatenate([u, np.arange(4096) / 4096, [2.0**-53, 0.25 - 2.0**-53, 0.25 + 2.0**-53, 1 - 2.0**-53]])
    c, s = kern.sincos_2pi(u)
    k = np.rint(4 * u)
    a = (u - k / 4).astype(np.longdouble) * np.longdouble("6.283185307179586476925286766559")
    ca, sa = np.cos(a), np.sin(a)
    quadrant = k.astype(np.int64) % 4
    true_c = np.choose(quadrant, [ca, -sa, -ca, sa])
    true_s = np.choose(quadrant, [sa, ca, -sa, -ca])
    exact = a == 0  # 4u an integer: the kernel returns exact 0 and +-1
    assert np.array_equal(c[exact], true_c[exact].astype(np.float64))
    assert np.array_equal(s[exact], true_s[exact].astype(np.float64))
    assert ulps_from_exact(c[~exact], true_c[~exact]).max() < 2.0
    assert ulps_from_exact(s[~exact], true_s[~exact]).max() < 2.0
    # against NumPy's own sin/cos of the rounded 2 pi u: a few 1e-16 apart in absolute terms
    assert np.max(np.abs(c - np.cos(2 * np.pi * u))) < 1e-15
    assert np.max(np.abs(s - np.sin(2 * np.pi * u))) < 1e-15


# --------------------------------------------------------------------------- the public class
@pytest.mark.parametrize("n,d", [(1, 1), (1, 2), (3, 1)])
def test_forecaster_weights_is_a_copy_at_every_shape(n, d):
    """``forecaster_weights`` is a new (N, d, 2p + 1) array, never the live buffer: writing to it changes nothing.

    On 4a54a28 it was ``np.ascontiguousarray`` of a transposed view, which is that view itself when the view is
    contiguous already (N = d = 1): a writeable view of the pipeline's weights (its checked read then proved nothing,
    and a write to it changed the next forecasts).
    """
    pipe, twin = Pipeline(n, d, game=GAME, backend="numpy"), Pipeline(n, d, game=GAME, backend="numpy")
    y = series(4, d)
    pipe.run(y[:3])
    twin.run(y[:3])
    w = pipe.forecaster_weights
    assert w.shape == (n, d, 5) and w.flags.c_contiguous
    w[...] = 7.0
    assert np.array_equal(pipe.forecaster_weights, twin.forecaster_weights)
    assert np.array_equal(pipe.round(y[3]), twin.round(y[3]))


def test_round_returns_a_live_read_only_buffer_and_run_steps_a_series():
    pipe = Pipeline(50, 2, game=GAME, backend="numpy")
    out = pipe.round([0.1, 0.2])
    assert out.shape == (2,) and not out.flags.writeable
    predictions = pipe.run(series(4, 2))
    assert predictions.shape == (4, 2) and np.array_equal(predictions[-1], pipe.mixture) and pipe.t == 5
    assert not pipe.states.flags.writeable and pipe.forecaster_weights.shape == (50, 2, 5)
    pipe.reset()
    assert pipe.t == 0 and not pipe.costs.any() and math.isclose(pipe.weights.sum(), 1.0)


def test_record_false_leaves_the_scores_alone():
    pipe = Pipeline(100, game=GAME, backend="numpy")
    for v in series(4, 1):
        pipe.round(v, record=False)
    assert not pipe.squared_errors.any() and pipe.n_recorded == 0
    pipe.round(0.5)
    assert pipe.squared_errors.any() and pipe.n_recorded == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_clients=0), "n_clients"),
    (dict(n_clients=10, dim=0), "dim"),
    (dict(n_clients=10, rule="sgd"), "rule"),
    (dict(n_clients=10, eta=-1.0), "eta"),
    (dict(n_clients=10, alpha=1.5), "alpha"),
    (dict(n_clients=10, lags=0), "lags"),
    (dict(n_clients=10, mu=2.0), "mu"),
    (dict(n_clients=10, noise_range=(1.0, 0.1)), "noise_range"),
    (dict(n_clients=10, noise_range=(0.0, 1.0)), "noise_range"),
    (dict(n_clients=10, seed=-1), "seed"),
    (dict(n_clients=10, backend="cython"), "backend"),
    (dict(n_clients=10, game=Game(shares=[0.5, 0.5])), "one class"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Pipeline(**kwargs)


RUN_CASES = [
    # n, d, p, rule, alpha, threads: hedge fuses pass B and the next pass A, eg cannot (its loss needs merge B)
    (3 * CHUNK + 11, 1, 2, "hedge", 0.01, 1),
    (3 * CHUNK + 11, 1, 2, "hedge", 0.01, TWO_THREADS),
    (2 * CHUNK + 5, 1, 2, "hedge", 0.0, TWO_THREADS),
    (CHUNK + 9, 3, 3, "hedge", 0.05, TWO_THREADS),
    (CHUNK + 9, 2, 1, "eg", 0.02, TWO_THREADS),
    (700, 1, 2, "eg", 0.0, 1),
    (5, 1, 2, "hedge", 1.0, 1),
]


@pytest.mark.parametrize("n,d,p,rule,alpha,threads", RUN_CASES)
def test_run_is_bitwise_a_round_per_target(n, d, p, rule, alpha, threads):
    """``run`` (one compiled call, pass B and the next pass A fused for hedge) = ``round`` on each target, bit for bit.

    Also split into calls of 0, 1 and several targets, across round 0 (which neither reweights nor
    records), with ``record=False`` on one call, and the predictions of every round.
    """
    y = series(13, d)
    args = dict(game=GAME, rule=rule, eta=0.7, alpha=alpha, lags=p, seed=3, threads=threads, parallel_threshold=1)
    one, batch = Pipeline(n, d, **args), Pipeline(n, d, **args)
    parts = [(0, 1, True), (1, 1, True), (1, 6, True), (6, 9, False), (9, 13, True)]
    expected, got = [], []
    for lo, hi, record in parts:
        expected += [one.round(v, record=record).copy() for v in y[lo:hi]]
        got.append(batch.run(y[lo:hi], record=record))
    assert np.array_equal(np.concatenate(got), np.array(expected))
    for name in ARRAYS + ("forecaster_weights", "mean_state", "mean_signal"):
        assert np.array_equal(getattr(one, name), getattr(batch, name)), name
    assert (one.t, one.n_recorded, one.worst_client, one.n_valid_signals, one.last_error_sum) == (
        batch.t, batch.n_recorded, batch.worst_client, batch.n_valid_signals, batch.last_error_sum)
    assert one._discount == batch._discount
    # and the next round after a batch is the next round
    assert np.array_equal(one.round(y[0]), batch.round(y[0]))


@pytest.mark.parametrize("rule,alpha,d", [("hedge", 0.01, 1), ("eg", 0.0, 2)])
def test_compiled_run_matches_reference_run(rule, alpha, d):
    y = series(7, d)
    args = dict(game=GAME, rule=rule, eta=0.7, alpha=alpha, lags=2, seed=4)
    fast = Pipeline(CHUNK + 33, d, backend="numba", threads=TWO_THREADS, parallel_threshold=1, **args)
    slow = Pipeline(CHUNK + 33, d, backend="numpy", **args)
    out = np.empty((7, d))
    assert fast.run(y, out=out) is out
    assert close(out, slow.run(y))
    for name in ARRAYS:
        assert close_array(name, getattr(fast, name), getattr(slow, name)), name
    assert fast.worst_client == slow.worst_client


def test_default_threads_start_at_the_pipelines_own_work_size():
    """A pipeline round is compute-bound: its default goes parallel from 2**15 values, a step's from 2**20."""
    from memoa_fast import _backends

    work = _backends.PIPELINE_PARALLEL_WORK
    assert work < _backends.DEFAULT_PARALLEL_WORK
    requested = _backends.resolve_threads(None, 10)[0]
    assert Pipeline(work, game=GAME)._threads_used == requested
    assert Pipeline(work // 4, 4, game=GAME)._threads_used == requested  # N x d counts
    assert Pipeline(work - 1, game=GAME)._threads_used == 1
    assert Pipeline(work - 1, game=GAME, threads=requested)._threads_used == requested  # explicit threads honoured
    assert Population(GAME, work, 1)._threads_used == 1  # the step keeps its own threshold


def test_rounds_from_two_threads_raise_instead_of_racing():
    """The kernel releases the GIL: two threads calling one Pipeline get RuntimeError, never a mixed state."""
    pipe = Pipeline(200_000, game=GAME, threads=1)
    pipe.round(0.1)
    errors, done = call_from_two_threads(lambda: pipe.run(np.full(3, 0.2)), 20)
    assert errors and "not thread-safe" in str(errors[0])
    # every refused call changed nothing: the rounds counted are those of the calls that ran
    assert pipe.t == 1 + 3 * done and pipe.n_recorded == 3 * done
    assert np.isfinite(pipe.states).all()


def test_bad_series_and_out_are_named():
    pipe = Pipeline(10, 2, game=GAME)
    before = pipe.states.copy()
    with pytest.raises(ValueError, match=r"series must have shape \(3, 2\)"):
        pipe.run(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="series must have shape"):
        pipe.run(1.5)
    with pytest.raises(ValueError, match="series must be finite; first non-finite entry at index \\(1, 0\\)"):
        pipe.run([[0.0, 1.0], [np.inf, 0.0]])
    with pytest.raises(TypeError, match="series"):
        pipe.run(np.zeros((2, 2), dtype=complex))
    read_only = np.zeros((2, 2))
    read_only.flags.writeable = False
    accepted = r"out must be a writeable C-contiguous float64 numpy array of shape \(2, 2\), got "
    for bad in (np.zeros((2, 3)), np.zeros((2, 4))[:, ::2], np.zeros((2, 2)).T.copy()[:1], read_only):
        with pytest.raises(ValueError, match=accepted):
            pipe.run(np.zeros((2, 2)), out=bad)
    for bad in (np.zeros((2, 2), dtype=np.float32), [[0.0, 0.0], [0.0, 0.0]]):
        with pytest.raises(TypeError, match=accepted):
            pipe.run(np.zeros((2, 2)), out=bad)
    shared = np.zeros((2, 2))
    with pytest.raises(ValueError, match="out must not share memory with series"):
        pipe.run(shared, out=shared)
    assert pipe.t == 0 and np.array_equal(pipe.states, before)  # nothing ran
    assert pipe.run(np.zeros((0, 2))).shape == (0, 2) and pipe.t == 0


def test_bad_targets_are_named():
    pipe = Pipeline(10, 2, game=GAME, backend="numpy")
    with pytest.raises(ValueError, match="y must have shape"):
        pipe.round([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="y must be finite"):
        pipe.round([1.0, np.nan])
    with pytest.raises(TypeError, match="game"):
        Pipeline(10, game="memoa")


# --------------------------------------------------------------------------- placement of the state
STATE = ("_x", "_s", "_J", "_log_p", "_ebuf", "_sigma", "_sq_err", "_sq_sig", "_weights", "_lag_buf")


def _page_lines(arrays):
    """The cache line of its page (0..63) at which each array starts."""
    return [a.ctypes.data % _memory.PAGE // _memory.LINE for a in arrays]


@pytest.mark.parametrize("shapes", [[(1,)], [(3, 2), (5,), (7, 1, 3)], [(4096,)] * 12, [(131072,)] * 6 + [(5, 131072, 1)],
                                    [(100_000, 4)] * 3 + [(1,)] * 70])
def test_staggered_zeros_are_disjoint_zeroed_and_start_on_distinct_lines(shapes):
    arrays = _memory.staggered_zeros(shapes)
    assert [a.shape for a in arrays] == [tuple(s) for s in shapes]
    for a in arrays:
        assert a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable and a.flags.aligned and not a.any()
        a[...] = 1.0  # each may be written whole without touching another
    assert all(a.all() for a in arrays)
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)
    lines = _page_lines(arrays)
    assert all(a.ctypes.data % _memory.LINE == 0 for a in arrays)
    assert lines[:64] == [(5 * i) % 64 for i in range(min(64, len(arrays)))]  # 64 distinct lines, then round again
    assert len(set(lines)) == min(64, len(arrays))


@pytest.mark.parametrize("n", [1, 4096, 100_000, 131072])
def test_pipeline_state_starts_on_distinct_lines_of_a_page_whatever_the_allocator(n):
    """The arrays a round streams through together never share a page offset (the allocator's placement did, at 2^17)."""
    pipe = Pipeline(n, 2, lags=3, threads=1)
    arrays = [getattr(pipe, name) for name in STATE]
    assert len(set(_page_lines(arrays))) == len(STATE)
    assert all(a.flags.c_contiguous for a in arrays)


def _pipeline_state(pipe):
    """Every array and counter a Pipeline round changes (copies)."""
    names = ("_x", "_s", "_J", "_log_p", "_ebuf", "_weights", "_lag_buf", "_sq_err", "_sq_sig", "_yhat", "_field", "_stats")
    return {name: getattr(pipe, name).copy() for name in names} | {"t": pipe.t, "n": pipe.n_recorded, "disc": pipe._discount}


def _assert_same_state(before, after):
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        else:
            assert after[key] == value, key


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("bad", [1e31, -1e200, 1e308])
def test_a_target_beyond_the_limit_is_refused_and_changes_nothing(backend, bad):
    """The forecasters' squared features overflow beyond TARGET_LIMIT = 1e30: one such target used to turn
    every client's NLMS weights into NaN for good (no valid signal ever again); it is refused, as
    ClientForecasters.observe refuses it, whether it comes through round() or run().
    """
    from memoa_fast.timeseries.forecasters import TARGET_LIMIT

    pipe = Pipeline(40, 2, seed=3, backend=backend, threads=1)
    pipe.run(np.sin(np.arange(10.0))[:, None] * [1.0, 0.5])
    before = _pipeline_state(pipe)
    with pytest.raises(ValueError, match=r"y must have \|y\| <= 1e\+30.*coordinate 1"):
        pipe.round([0.1, bad])
    _assert_same_state(before, _pipeline_state(pipe))
    series = np.zeros((5, 2))
    series[3, 0] = bad
    with pytest.raises(ValueError, match=r"series must have \|series\| <= 1e\+30.*index \(3, 0\)"):
        pipe.run(series)
    _assert_same_state(before, _pipeline_state(pipe))
    pipe.round([TARGET_LIMIT, -TARGET_LIMIT])  # the limit itself is accepted
    for _ in range(5):
        pipe.round([0.1, 0.2])
    assert pipe.n_valid_signals == 40 and np.isfinite(pipe.forecaster_weights).all()


@pytest.mark.parametrize("record", ["no", None, 0, 1, 1.0, np.array([True])])
def test_record_must_be_true_or_false(record):
    """record='no' used to be taken as True (any truthy value): now only bools, and nothing changes."""
    pipe = Pipeline(10, 1, seed=0, backend="numpy")
    pipe.round(0.5)
    before = _pipeline_state(pipe)
    with pytest.raises(TypeError, match="record must be True or False"):
        pipe.round(0.5, record=record)
    with pytest.raises(TypeError, match="record must be True or False"):
        pipe.run(np.zeros(3), record=record)
    _assert_same_state(before, _pipeline_state(pipe))
    pipe.round(0.5, record=np.bool_(False))  # NumPy's bool is a bool
    pipe.round(0.5, record=np.bool_(True))
    assert pipe.n_recorded == before["n"] + 1


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_copy_is_independent_and_continues_bitwise(backend, how):
    """Pickle and deepcopy used to fail with "cannot pickle 'module' object"; copy.copy shared every buffer
    with the original, so stepping the copy silently moved the original's states (its counters did not).
    """
    import copy
    import pickle

    clone_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "copy": copy.copy}[how]
    y = series(12, 2)
    pipe = Pipeline(30, 2, game=GAME, rule="eg", alpha=0.0, seed=4, backend=backend, threads=1)
    pipe.run(y[:5])
    before = _pipeline_state(pipe)
    clone = clone_of(pipe)
    _assert_same_state(before, _pipeline_state(clone))
    got = clone.run(y[5:])
    _assert_same_state(before, _pipeline_state(pipe))  # the original did not move
    np.testing.assert_array_equal(pipe.run(y[5:]), got)  # and it makes the same bits as the clone did
    _assert_same_state(_pipeline_state(pipe), _pipeline_state(clone))
    assert repr(clone) == repr(pipe)


def test_a_pickle_records_the_squared_features_cap_one_made_before_it_loads_with_a_warning():
    """A Pipeline's pickle records SQUARE_CAP: one with another cap is refused naming the key and both values, and one
    made before the cap (no record) loads with an UncappedStateWarning and continues as the pickled object does.
    """
    from memoa_fast.timeseries.forecasters import CAP_RECORD, SQUARE_CAP, UncappedStateWarning
    from memoa_fast.timeseries.pipeline import _rebuild_pipeline

    y = series(12, 1)
    pipe = Pipeline(30, 1, game=GAME, seed=4, threads=1)
    pipe.run(y[:5])
    rebuild, (n, d, config, *_), saved = pipe.__reduce__()
    arrays, counters = saved["state"]
    assert rebuild is _rebuild_pipeline and counters[CAP_RECORD] == SQUARE_CAP
    with pytest.raises(ValueError, match=rf"state\['pipeline/counters/{CAP_RECORD}'\] is 81\.0, but this memoa-fast caps "
                                         r"the squared features at SQUARE_CAP=64: the state"):
        _rebuild_pipeline(n, d, config, arrays, {**counters, CAP_RECORD: 81.0})
    old = {k: v for k, v in counters.items() if k != CAP_RECORD}
    with pytest.warns(UncappedStateWarning, match=rf"state\['pipeline/counters/{CAP_RECORD}'\] is missing"):
        clone = _rebuild_pipeline(n, d, config, arrays, old)
    np.testing.assert_array_equal(clone.run(y[5:]), pipe.run(y[5:]))


@pytest.mark.parametrize("kwargs, words", [
    ({"n_clients": 20_000}, r"n_clients=20000, dim=1, lags=2: the pipeline's arrays need [\d,]+ bytes"),
    ({"n_clients": 10, "dim": 20_000}, r"n_clients=10, dim=20000, lags=2: the pipeline's arrays need"),
    ({"n_clients": 10, "lags": 10**12}, r"n_clients=10, dim=1, lags=1000000000000: the pipeline's arrays need"),
])
def test_sizes_are_checked_against_memory_before_anything_is_allocated(monkeypatch, kwargs, words):
    """Pipeline checked n_clients, dim and lags only as integers: a size beyond memory raised NumPy's MemoryError
    (or, with overcommit, met the out-of-memory killer) instead of the ValueError a Population gives.
    """
    from memoa_fast import _validation

    monkeypatch.setattr(_validation, "available_memory", lambda: 2**20)  # 1 MiB
    with pytest.raises(ValueError, match=words):
        Pipeline(**kwargs, backend="numpy")
    Pipeline(10, 1, backend="numpy")  # ~1 kB fits


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_regret_is_the_worst_clients_cost_when_some_costs_are_nan(backend):
    """``worst_client`` never names a NaN cost (the kernels' ``>``); ``regret`` was ``J.max()``, NaN as soon as one cost
    is NaN (past the README's bound: ``gamma^t`` underflowed to 0 times an infinite cost), so the two disagreed.
    """
    pipe = Pipeline(3, 1, backend=backend)
    assert (pipe.worst_client, pipe.regret) == (-1, 0.0)
    pipe._J[:] = [np.nan, 5.0, 1.0]  # no cheap public way to a partly NaN state (every cost overflows alike)
    pipe.run(np.zeros(3))
    costs = pipe.costs
    assert np.isnan(costs[0]) and pipe.worst_client == 1
    assert pipe.regret == costs[1]
    pipe._J[:] = np.nan
    pipe.run(np.zeros(2))
    assert pipe.worst_client == -1 and np.isnan(pipe.regret)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_the_discount_is_gamma_to_the_t_down_to_zero(backend):
    """The pipeline's discount is ``gamma**t`` also where that is subnormal, and reaches 0 (as Population's).

    ``run_rounds`` multiplied ``discount *= gamma``, which stalls at ``k 2**-1074`` once ``k (1 - gamma) < 1/2``
    (here at 5e-324 for ever), so every later round's cost kept a weight that ``gamma**t`` no longer has. One
    ``run`` and the same rounds one by one end with the same discount and costs.
    """
    gamma, T = 0.6, 1500  # 0.6**t is subnormal from t = 1387 and 0 from t = 1459
    y = np.sin(np.arange(T) * 0.3)
    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=gamma)
    whole = Pipeline(3, 1, game=game, seed=1, backend=backend)
    whole.run(y)
    pipe = Pipeline(3, 1, game=game, seed=1, backend=backend)
    pipe.run(y[:1380])
    for value in y[1380:]:
        before = pipe.costs.copy()
        pipe.round(value)
        if pipe._discount < 2.2250738585072014e-308:
            assert pipe._discount == math.pow(gamma, pipe.t), (pipe.t, pipe._discount)
        if pipe.t > 1460:  # the round's cost was weighed by gamma**(t-1) = 0
            np.testing.assert_array_equal(pipe.costs, before)
    assert pipe._discount == 0.0 == whole._discount
    np.testing.assert_array_equal(pipe.costs, whole.costs)


def test_the_benchmarks_probe_still_builds_from_the_kernel(monkeypatch):
    """``bench/bench_fused_pipeline.py``'s probe (this kernel's own source, its transcendental functions edited out:
    the bound that issue 9's argument rests on) still fits the kernel and executes, not compiled (the bench does that).

    The bench's own test of it is not part of CI, and the probe broke unseen once (``seal()`` needs a file).
    """
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench module puts bench/ first
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # and imports bench/conftest.py, peers.py, the probe
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_fused_pipeline.py"
    spec = importlib.util.spec_from_file_location("_bench_fused_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probe = bench.probe_kernel()
    assert probe is not kern and probe._rounds is not kern._rounds
    assert type(probe._rounds._cache).__name__ == "NullCache"  # never cached: it must not pass for the kernel


def test_a_pickle_made_before_the_cap_that_is_refused_gives_no_warning():
    """A pickle without the cap's record whose arrays are refused gets only the ValueError, not a warning that it loads."""
    from memoa_fast.timeseries.forecasters import CAP_RECORD
    from memoa_fast.timeseries.pipeline import _rebuild_pipeline

    pipe = Pipeline(30, 1, game=GAME, seed=4, threads=1)
    _, (n, d, config, *_), saved = pipe.__reduce__()
    arrays, counters = saved["state"]
    old = {k: v for k, v in counters.items() if k != CAP_RECORD}
    with pytest.raises(ValueError, match="a pickled Pipeline's _x must be float64 of shape"):
        _rebuild_pipeline(n, d, config, {**arrays, "_x": arrays["_x"][:1]}, old)


@pytest.mark.parametrize("backend,threads,d,alpha", [("numba", 1, 1, 0.01), ("numba", TWO_THREADS, 3, 0.0),
                                                     ("numba", TWO_THREADS, 1, 0.0), ("numpy", 1, 2, 0.01)])
def test_a_common_shift_of_states_and_targets_changes_no_eg_weight(backend, threads, d, alpha):
    """The eg loss from differences only (``Server``'s ``2 <e, x_i - y>``, ``e = sum_k p_k (x_k - y)``): shifting every
    state and target by ``b`` leaves the weights bitwise as they were, on inputs where the shift itself is exact.

    The Pipeline used ``2 <yhat - y, x_i>`` with the rounded ``yhat``: ``eps |b|`` per round (``log p`` 6e-10 to 3e-9
    apart at ``b = 2**20`` here, after 6 rounds). The forecasters are not shift-equivariant (squared lags), so the
    population's gain is 0: the states stay the grid values they start at, and only the targets move. ``run`` and
    ``round`` (linear and log weights, one and two threads, chunks of both kinds; the reference does not chunk: a few
    clients).
    """
    n, T = (CHUNK + 37 if backend == "numba" else 40), 6
    rng = np.random.default_rng(7)
    x0 = rng.integers(-4096, 4096, size=(n, d)) * 2.0**-10  # a 2**-10 grid: x + b exact up to b = 2**42
    ys = rng.integers(-2048, 2048, size=(T, d)) * 2.0**-10

    def weights(b):
        pipe = Pipeline(n, d, game=GAME, rule="eg", eta=0.3, alpha=alpha, seed=1, backend=backend, threads=threads,
                        parallel_threshold=1)
        pipe._params[pipe._kern.P_GAIN] = 0.0  # u = -0 (...): x(t+1) = x(t)
        pipe._x[...] = x0 + b
        assert np.array_equal(pipe._x - b, x0) and np.array_equal((ys + b) - b, ys)  # the shift is exact
        pipe.run(ys[:T // 2] + b)
        for v in ys[T // 2:]:
            pipe.round(v + b)
        assert np.array_equal(pipe.states, x0 + b)
        return pipe.log_weights.copy()

    base = weights(0.0)
    assert np.ptp(base) > 1.0  # the weights did move
    for b in (2.0**20, 2.0**40):
        np.testing.assert_array_equal(weights(b), base, err_msg=f"b = {b}")


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("rule", ["eg", "hedge"])
def test_a_pickle_made_before_egs_centred_mixture_loads_and_continues(rule, backend):
    """A pickle of 389e086 and earlier has a ``_field`` of 4 rows (no eg centre ``y(t-1)``, no centred mixture) and a
    narrower ``_work``: it loads with centre 0 and the centred mixture ``sum_i p_i (x_i - 0)``, the stored ``yhat(t)``
    itself. hedge reads neither and continues bitwise; eg's first step after it is measured from 0 (the same step in
    exact arithmetic), then from the last target.
    """
    from memoa_fast.kernels import PAD
    from memoa_fast.timeseries.pipeline import _rebuild_pipeline

    d = 2
    y = series(12, d)
    pipe = Pipeline(30, d, game=GAME, rule=rule, alpha=0.01, seed=4, backend=backend, threads=1)
    pipe.run(y[:5])
    _, (n, _, config, *_), saved = pipe.__reduce__()
    arrays, counters = saved["state"]
    k = pipe._kern
    before = {**arrays, "_field": arrays["_field"][:k.FIELD_ROWS_BEFORE_CENTRE], "_work": arrays["_work"][:, :3 * PAD + PAD]}
    clone = _rebuild_pipeline(n, d, config, before, counters)
    np.testing.assert_array_equal(clone._field[:k.FIELD_ROWS_BEFORE_CENTRE], arrays["_field"][:k.FIELD_ROWS_BEFORE_CENTRE])
    np.testing.assert_array_equal(clone._field[k.FIELD_DEV], pipe.mixture)
    assert not clone._field[k.FIELD_CENTRE].any()
    got, expected = clone.run(y[5:]), pipe.run(y[5:])
    if rule == "hedge":
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(clone.log_weights, pipe.log_weights)
    else:
        assert close(got, expected) and close_array("log_weights", clone.log_weights, pipe.log_weights)
        np.testing.assert_array_equal(clone._field[k.FIELD_CENTRE], y[-1])  # from then on, the last target
