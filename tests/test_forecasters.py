"""Client forecasters: kernel against its NumPy reference, shard reproducibility, learning, checks."""
import math
import re
import warnings

import numba
import numpy as np
import pytest
from helpers import assert_as_saved
from hypothesis import given, settings
from hypothesis import strategies as st

from memoa_fast.distributed.signals import NoisyLastValueSignals
from memoa_fast.kernels import CHUNK, _forecast_numba, _forecast_reference
from memoa_fast.timeseries.forecasters import (
    BLOCK_SIZE,
    CAP_RECORD,
    SQUARE_CAP,
    TARGET_LIMIT,
    ClientForecasters,
    ForecasterSignals,
    SquaredErrors,
    UncappedStateWarning,
)
from memoa_fast.timeseries.streams import make_stream

RTOL = 1e-12
TWO_THREADS = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba was started with one thread")


def _random_state(rng, n, d, p):
    w = rng.normal(0.0, 0.5, (n, d, 2 * p + 1))
    lags = rng.normal(0.0, 1.5, (n, d, p))
    eps = rng.standard_normal((n + 3, d))  # extra rows are ignored
    sigma = np.exp(rng.uniform(np.log(0.02), 0.0, n))
    return w, lags, eps, sigma


@pytest.mark.parametrize("n,d,p", [(1, 1, 1), (7, 1, 2), (CHUNK + 5, 1, 2), (300, 3, 3), (2 * CHUNK + 1, 2, 1)])
@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=TWO_THREADS)])
def test_forecast_kernel_matches_reference(n, d, p, threads):
    rng = np.random.default_rng(n * 31 + d * 7 + p)
    w, lags, eps, sigma = _random_state(rng, n, d, p)
    w_ref, lags_ref = w.copy(), lags.copy()
    out, out_ref = np.zeros((n, d)), np.zeros((n, d))
    for step in range(6):
        y = rng.normal(size=d)
        eps = rng.standard_normal((n + 3, d))
        update = step > 0
        _forecast_numba.forecast_step(y, eps, sigma, w, lags, out, 0.3, update, threads)
        _forecast_reference.forecast_step(y, eps, sigma, w_ref, lags_ref, out_ref, 0.3, update, threads)
        # z = y + sigma eps may be one fused multiply-add in the kernel: not bitwise, within a few ulps
        np.testing.assert_allclose(lags, lags_ref, rtol=RTOL, atol=RTOL * np.abs(lags_ref).max())
        np.testing.assert_allclose(w, w_ref, rtol=RTOL, atol=RTOL * np.abs(w_ref).max())
        np.testing.assert_allclose(out, out_ref, rtol=RTOL, atol=RTOL * np.abs(out_ref).max())
    assert not np.allclose(out, 0.0)


def test_forecast_reference_is_the_formula():
    """One client, one step, written out by hand."""
    y, eps, sigma = np.array([0.5]), np.array([[2.0]]), np.array([0.1])
    w = np.array([[[0.9, -0.2, 0.05, 0.1, 0.3]]])  # lags (z1, z2), squares, constant
    lags = np.array([[[0.4, -1.0]]])
    out = np.zeros((1, 1))
    z = 0.5 + 0.1 * 2.0
    phi = np.array([0.4, -1.0, 0.16, 1.0, 1.0])
    e = z - w[0, 0] @ phi
    w_new = w[0, 0] + 0.25 * e * phi / (phi @ phi)
    phi_new = np.array([z, 0.4, z * z, 0.16, 1.0])
    for kern in (_forecast_reference, _forecast_numba):
        ww, ll, oo = w.copy(), lags.copy(), out.copy()
        kern.forecast_step(y, eps, sigma, ww, ll, oo, 0.25, True, 1)
        np.testing.assert_allclose(ww[0, 0], w_new, rtol=1e-14)
        np.testing.assert_array_equal(ll[0, 0], [z, 0.4])
        assert oo[0, 0] == pytest.approx(w_new @ phi_new, rel=1e-14)


@pytest.mark.parametrize("p", [2, 3])  # the p = 2 fast path and the general one
def test_squares_are_capped_at_8_squared(p):
    """A lag beyond 8 in magnitude enters as ``min(v**2, 64)``; within 8 the feature is the plain square.

    Plain squares at |v| = 30 made |phi|^2 ~ v^4, so the linear weights all but stopped learning.
    """
    lags = np.array([[[30.0, -7.5, -12.0][:p]]])
    w = np.array([[[0.9, -0.2, 0.1][:p] + [0.05, 0.01, -0.02][:p] + [0.3]]])
    z = 40.0
    q = lambda v: np.minimum(np.square(v), 64.0)  # noqa: E731
    phi = np.concatenate([lags[0, 0], q(lags[0, 0]), [1.0]])
    np.testing.assert_array_equal(phi[p:2 * p], [64.0, 56.25, 64.0][:p])
    w_new = w[0, 0] + 0.25 * (z - w[0, 0] @ phi) * phi / (phi @ phi)
    new_lags = np.concatenate([[z], lags[0, 0, :-1]])
    phi_new = np.concatenate([new_lags, q(new_lags), [1.0]])
    for kern in (_forecast_reference, _forecast_numba):
        ww, ll, oo = w.copy(), lags.copy(), np.zeros((1, 1))
        kern.forecast_step(np.array([z]), np.zeros((1, 1)), np.array([0.1]), ww, ll, oo, 0.25, True, 1)
        np.testing.assert_allclose(ww[0, 0], w_new, rtol=1e-14)
        assert oo[0, 0] == pytest.approx(w_new @ phi_new, rel=1e-14)


@pytest.mark.parametrize("n,d", [(1, 1), (CHUNK + 3, 2), (2 * CHUNK + 1, 1)])
@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=TWO_THREADS)])
def test_score_kernel_matches_reference(n, d, threads):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=d)
    sq, sq_ref = rng.uniform(size=n), None
    sq_ref = sq.copy()
    mean, mean_ref = np.zeros(d), np.zeros(d)
    work = np.zeros(_forecast_numba.score_work_shape(n, d))
    total, top = _forecast_numba.score_step(x, y, True, sq, work, mean, threads)
    total_ref, top_ref = _forecast_reference.score_step(x, y, True, sq_ref, work, mean_ref, threads)
    assert total == pytest.approx(total_ref, rel=RTOL)
    assert top == top_ref == sq.max()
    np.testing.assert_allclose(sq, sq_ref, rtol=RTOL)
    np.testing.assert_allclose(mean, mean_ref, rtol=RTOL, atol=RTOL * np.abs(x).mean())
    before = sq.copy()
    _forecast_numba.score_step(x, y, False, sq, work, mean, threads)
    np.testing.assert_array_equal(sq, before)  # record=False leaves the errors alone


def _run(fc, ys):
    return np.stack([fc.observe(v).copy() for v in ys])


@pytest.mark.parametrize("block_size,n_total,lo,hi", [
    (64, 1000, 128, 1000 - 37),  # a shard ending inside a block
    (64, 1000, 0, 64),           # exactly the first block
    (100, 350, 300, 350),        # the last, partial block
    (BLOCK_SIZE, BLOCK_SIZE + 500, BLOCK_SIZE, BLOCK_SIZE + 500),  # the default block size
])
def test_shard_reproducibility(block_size, n_total, lo, hi):
    ys = make_stream("logistic", 60, seed=4)
    kw = dict(seed=11, block_size=block_size, lags=2, threads=1)
    full = ClientForecasters(n_total, **kw)
    shard = ClientForecasters(hi - lo, first_client=lo, **kw)
    np.testing.assert_array_equal(shard.noise_scales, full.noise_scales[lo:hi])
    s_full, s_shard = _run(full, ys), _run(shard, ys)
    np.testing.assert_array_equal(s_shard, s_full[:, lo:hi])
    np.testing.assert_array_equal(shard.weights, full.weights[lo:hi])


@TWO_THREADS
def test_threads_do_not_change_forecasts():
    ys = make_stream("concept", 30, seed=0)
    kw = dict(seed=5, block_size=512, parallel_threshold=1)
    one = ClientForecasters(3000, threads=1, **kw)
    two = ClientForecasters(3000, threads=2, **kw)
    np.testing.assert_array_equal(_run(one, ys), _run(two, ys))
    two.close()


def test_same_seed_same_forecasts_other_seed_other_noise():
    ys = make_stream("periodic", 40, seed=0)
    a, b, c = (ClientForecasters(500, seed=s) for s in (1, 1, 2))
    ra, rb, rc = _run(a, ys), _run(b, ys), _run(c, ys)
    np.testing.assert_array_equal(ra, rb)
    assert not np.allclose(ra, rc)
    a.reset()
    np.testing.assert_array_equal(_run(a, ys), ra)  # reset replays the same noise


def test_noise_scales_are_log_uniform_on_the_range():
    fc = ClientForecasters(20000, noise_range=(0.01, 1.0), seed=0)
    s = fc.noise_scales
    assert s.min() >= 0.01 and s.max() <= 1.0
    logs = np.log10(s)  # uniform on [-2, 0]: mean -1, quartiles -1.5 and -0.5
    assert abs(logs.mean() + 1.0) < 0.02
    np.testing.assert_allclose(np.quantile(logs, [0.25, 0.75]), [-1.5, -0.5], atol=0.03)
    with pytest.raises(ValueError):
        s[0] = 1.0  # read-only view


def test_noise_is_the_contract():
    """Client observations are y + sigma * eps with eps standard normal: check the forecaster's first step."""
    fc = ClientForecasters(5000, seed=3)
    s0 = fc.observe(0.7)  # persistence weights, empty lags: first forecast = first noisy observation
    noise = (s0[:, 0] - 0.7) / fc.noise_scales
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05


def test_forecasters_learn_the_logistic_map():
    y = make_stream("logistic", 3000, seed=1)
    fc = ClientForecasters(8, noise_range=(1e-4, 1e-4), mu=0.5, seed=0)
    s = _run(fc, y[:-1])[:, :, 0]
    err = s[-500:] - y[-500:, None]
    persistence = np.sqrt(np.mean(np.diff(y[-501:]) ** 2))
    assert np.sqrt(np.mean(err**2)) < 0.01 * persistence
    # the learned map is y' = a + b y + c y^2 with c != 0 (squares are needed)
    w = fc.weights[:, 0]
    assert np.all(np.abs(w[:, 2]) > 0.1)


def test_numpy_backend_matches_numba():
    ys = make_stream("concept-drift", 50, seed=2)
    a = ClientForecasters(300, dim=1, seed=9, backend="numba")
    b = ClientForecasters(300, dim=1, seed=9, backend="numpy")
    ra, rb = _run(a, ys), _run(b, ys)
    np.testing.assert_allclose(ra, rb, rtol=RTOL, atol=RTOL * np.abs(rb).max())


def test_vector_stream():
    fc = ClientForecasters(10, dim=3, seed=0)
    s = fc.observe([0.1, -0.2, 0.3])
    assert s.shape == (10, 3)
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        fc.observe([0.1, 0.2])
    with pytest.raises(ValueError, match="y must be finite"):
        fc.observe([0.1, np.nan, 0.3])


@pytest.mark.parametrize("kwargs,match", [
    (dict(first_client=100), "first_client must be a multiple of block_size=4096"),
    (dict(noise_range=(0.5, 0.1)), "low <= high"),
    (dict(noise_range=(0.0, 0.1)), "noise_range low must be in"),
    (dict(noise_range=0.3), "pair"),
    (dict(mu=2.0), "mu must be in"),
    (dict(lags=0), "lags must be an integer >= 1"),
    (dict(backend="fortran"), "backend must be one of"),
    (dict(seed=-1), re.escape("seed must be an integer in [0, 2**63 - 1]")),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ClientForecasters(10, **kwargs)


def test_state_dict_resumes_exactly():
    ys = make_stream("logistic", 40, seed=0)
    a = ClientForecasters(300, seed=2, block_size=128)
    _run(a, ys[:20])
    state = a.state_dict()
    rest_a = _run(a, ys[20:])
    b = ClientForecasters(300, seed=2, block_size=128)
    b.load_state_dict(state)
    assert b.t == 20
    np.testing.assert_array_equal(_run(b, ys[20:]), rest_a)
    # shards' per-client arrays are slices of the whole population's
    c = ClientForecasters(300 - 128, seed=2, block_size=128, first_client=128)
    c.load_state_dict({"agents": {k: v[128:] for k, v in state["agents"].items()}, "shared": state["shared"]})
    np.testing.assert_array_equal(_run(c, ys[20:]), rest_a[:, 128:])
    with pytest.raises(ValueError, match=r"state\['source/agents/lags'\] must have shape \(300, 1, 2\)"):
        b.load_state_dict({"agents": dict(state["agents"], lags=np.zeros((300, 1, 3))), "shared": state["shared"]})


# --------------------------------------------------------------------------- SquaredErrors
@pytest.mark.parametrize("backend", ["numba", "numpy", "cython"])
@pytest.mark.parametrize("n,d,threads", [(5, 1, 1), (CHUNK + 3, 2, 1), pytest.param(2 * CHUNK + 1, 1, 2, marks=TWO_THREADS)])
def test_squared_errors_is_the_formula(backend, n, d, threads):
    """add(): sum_i |x_i - y|^2, the mean state, and E_i += |x_i - y|^2 only when recording."""
    rng = np.random.default_rng(n + d)
    scorer = SquaredErrors(n, d, backend=backend, threads=threads, parallel_threshold=1)
    expected = np.zeros(n)
    for record in (False, True, True):
        x, y = rng.normal(size=(n, d)), rng.normal(size=d)
        e2 = ((x - y) ** 2).sum(axis=1)
        total, mean, totals = scorer.add(x, y, record)
        expected += e2 if record else 0.0
        assert total == pytest.approx(e2.sum(), rel=RTOL)
        np.testing.assert_allclose(mean, x.mean(axis=0), rtol=RTOL, atol=RTOL)
        np.testing.assert_allclose(totals, expected, rtol=RTOL)
        assert scorer.max_total == pytest.approx(expected.max(), rel=RTOL)
    with pytest.raises(ValueError, match=r"states must have shape"):
        scorer.add(np.zeros((n + 1, d)), np.zeros(d))
    with pytest.raises(ValueError, match="target must be finite"):
        scorer.add(np.zeros((n, d)), np.full(d, np.nan))
    bad = np.zeros((n, d))
    bad[0, 0] = np.nan
    before = scorer.totals.copy()
    scorer.add(bad, np.zeros(d), True)  # a non-finite state poisons only its own client's total
    assert np.isnan(scorer.totals[0]) and np.array_equal(scorer.totals[1:], before[1:])
    scorer.reset()
    assert scorer.max_total == 0.0 and not scorer.totals.any()


def test_squared_errors_score_any_states_alike_on_every_backend_and_silently():
    """States beyond float64's square (1e300, the largest double), NaN and inf are scores, on every backend alike.

    The reference (``numpy``, and ``cython``, which runs it) used to warn on the overflow, and with warnings as
    errors (this suite's setting) raise inside ``add`` after its first write: the scorer then refused every call.
    Its ``max_total`` was NaN once a total was, where the compiled kernel's is the largest total that is not NaN.
    """
    x = np.array([[1e300, 0.5], [1.7e308, -1.7e308], [np.nan, 1.0], [np.inf, 2.0], [-1.7e308, 0.25], [0.5, 0.5]])
    results = {}
    for backend in ("numba", "numpy", "cython"):
        scorer = SquaredErrors(6, 2, backend=backend)
        rounds = []
        for rows, y, record in ((x, [0.0, 1.0], True), (x[::-1], [1.0, 0.0], False), (x[[2, 5]], [0.0, 0.0], True)):
            scorer = scorer if len(rows) == 6 else SquaredErrors(2, 2, backend=backend)
            total, mean, totals = scorer.add(rows, y, record)
            rounds.append((total, mean.copy(), totals.copy(), scorer.max_total))
        results[backend] = rounds
        # the largest total that is not NaN: inf (rows 0, 1, 3, 4), then 0.5 (the NaN row beside [0.5, 0.5])
        assert [r[3] for r in rounds] == [math.inf, math.inf, 0.5]
    for backend in ("numpy", "cython"):
        for (total, mean, totals, _), (total_c, mean_c, totals_c, _) in zip(results[backend], results["numba"]):
            assert total == total_c or (math.isnan(total) and math.isnan(total_c))
            np.testing.assert_allclose(mean, mean_c, rtol=RTOL)  # summed in another order
            np.testing.assert_array_equal(totals, totals_c)


# --------------------------------------------------------------------------- magnitudes
MAGNITUDES = st.one_of(
    st.floats(min_value=-TARGET_LIMIT, max_value=TARGET_LIMIT, allow_nan=False),
    st.sampled_from([TARGET_LIMIT, -TARGET_LIMIT, 1e-300, 5e-324, 0.0, 1e15, -1e29]),
)
TOO_BIG = st.one_of(
    st.floats(min_value=TARGET_LIMIT, exclude_min=True, allow_infinity=True),
    st.floats(max_value=-TARGET_LIMIT, exclude_max=True, allow_infinity=True),
    st.just(float("nan")),
)


@settings(max_examples=40, deadline=None)
@given(ys=st.lists(MAGNITUDES, min_size=1, max_size=12), high=st.sampled_from([1.0, 1e10, 1e30]),
       backend=st.sampled_from(["numba", "numpy"]))
def test_any_target_within_the_limit_keeps_every_signal_finite(ys, high, backend):
    """Property: for every float64 sequence with |y| <= 1e30 (and noise up to 1e30) the forecasts stay finite."""
    fc = ClientForecasters(6, noise_range=(1e-3, high), seed=1, backend=backend, threads=1)
    scorer = SquaredErrors(6, backend=backend, threads=1)
    for y in ys:
        s = fc.observe(y)
        assert np.isfinite(s).all(), (y, s)
        total, mean, totals = scorer.add(s, np.array([y]))
        assert np.isfinite(total) and np.isfinite(mean).all() and np.isfinite(totals).all()
    assert np.isfinite(fc.weights).all()


@settings(max_examples=40, deadline=None)
@given(before=st.lists(MAGNITUDES, max_size=4), bad=TOO_BIG, where=st.integers(0, 2))
def test_a_target_beyond_the_limit_is_refused_and_changes_nothing(before, bad, where):
    """Property: a non-finite or |y| > 1e30 target raises ValueError naming y, and the forecasters are unchanged."""
    fc = ClientForecasters(5, dim=3, seed=2, threads=1)
    for y in before:
        fc.observe([y, 0.0, -y])
    state = fc.state_dict()
    y = [0.5, 0.5, 0.5]
    y[where] = bad
    with pytest.raises(ValueError, match=r"^y must"):
        fc.observe(y)
    after = fc.state_dict()
    assert fc.t == len(before)
    for part in ("agents", "shared"):
        for key in state[part]:
            np.testing.assert_array_equal(after[part][key], state[part][key])
    # and it goes on exactly as if the bad value had never been offered
    ref = ClientForecasters(5, dim=3, seed=2, threads=1)
    for v in before:
        ref.observe([v, 0.0, -v])
    np.testing.assert_array_equal(fc.observe([0.1, 0.2, 0.3]), ref.observe([0.1, 0.2, 0.3]))


def test_noise_scales_are_bounded():
    with pytest.raises(ValueError, match=r"noise_range high must be in \(0, 1e\+30\]"):
        ClientForecasters(3, noise_range=(0.1, 1e31))


def _bad_forecaster_states(state):
    agents, shared = state["agents"], state["shared"]
    return [
        ({"agents": agents, "shared": dict(shared, t=3.7)}, ValueError),       # used to be truncated to 3
        ({"agents": agents, "shared": dict(shared, t="5")}, ValueError),       # used to be read as 5
        ({"agents": agents, "shared": dict(shared, t=True)}, ValueError),      # used to be read as 1
        ({"agents": agents, "shared": dict(shared, t=-1)}, ValueError),
        ({"agents": agents, "shared": dict(shared, t=float("nan"))}, ValueError),
        ({"agents": agents}, ValueError),                                     # used to be KeyError
        (5, ValueError),                                                      # used to be "'int' object is not subscriptable"
        ({"agents": dict(agents, weights=agents["weights"][:, :, :-1]), "shared": shared}, ValueError),
        ({"agents": dict(agents, lags=np.full_like(agents["lags"], np.nan)), "shared": shared}, ValueError),
        ({"agents": dict(agents, extra=agents["signals"]), "shared": shared}, ValueError),
        ({"agents": agents, "shared": dict(shared, y=np.array(["a", "b"]))}, ValueError),
    ]


def _assert_unchanged(fc, before, *, t):
    """``fc`` holds the state ``before`` (every array bitwise) at round ``t``."""
    after = fc.state_dict()
    assert fc.t == t
    for part in ("agents", "shared"):
        for key in before[part]:
            np.testing.assert_array_equal(after[part][key], before[part][key])


@pytest.mark.parametrize("case", range(11))
def test_load_state_dict_refuses_a_malformed_state_and_changes_nothing(case):
    """ClientForecasters.load_state_dict checks with the same validator as a checkpoint's source state."""
    fc = ClientForecasters(5, 2, seed=1, backend="numpy")
    fc.observe([0.1, 0.2])
    good = fc.state_dict()
    fc.observe([0.3, 0.4])
    before = fc.state_dict()
    bad, error = _bad_forecaster_states(good)[case]
    with pytest.raises(error, match=r"state|source"):
        fc.load_state_dict(bad)
    _assert_unchanged(fc, before, t=2)
    fc.load_state_dict(good)  # a good state still loads: t as a 0-d array, a Python int or a NumPy int
    fc.load_state_dict(dict(good, shared=dict(good["shared"], t=np.int32(1))))
    fc.load_state_dict(dict(good, shared=dict(good["shared"], t=1)))
    assert fc.t == 1


@pytest.mark.parametrize("record", ["no", None, 1, 0.0])
def test_squared_errors_record_must_be_true_or_false(record):
    scorer = SquaredErrors(3, 1, backend="numpy")
    scorer.add(np.ones((3, 1)), [0.0])
    with pytest.raises(TypeError, match="record must be True or False"):
        scorer.add(np.ones((3, 1)), [0.0], record=record)
    np.testing.assert_array_equal(scorer.totals, np.ones(3))


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_forecasters_and_scores_copy_independently(how):
    """Pickle and deepcopy used to fail with "cannot pickle 'module' object"; copy.copy shared the buffers."""
    import copy
    import pickle

    clone_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "copy": copy.copy}[how]
    fc = ClientForecasters(7, 2, seed=3, block_size=4, threads=1)
    fc.observe([0.1, 0.2])
    fc.observe([0.3, 0.1])
    clone = clone_of(fc)
    a = clone.observe([0.2, 0.2]).copy()
    assert fc.t == 2
    np.testing.assert_array_equal(fc.observe([0.2, 0.2]), a)
    np.testing.assert_array_equal(fc.weights, clone.weights)
    assert repr(clone) == repr(fc)
    scorer = SquaredErrors(4, 2, backend="numpy", parallel_threshold=2)
    scorer.add(np.ones((4, 2)), [0.0, 0.5])
    twin = clone_of(scorer)
    twin.add(np.ones((4, 2)), [0.0, 0.0])
    np.testing.assert_array_equal(scorer.totals, np.full(4, 1.25))
    assert twin.max_total == 3.25 and scorer.max_total == 1.25 and twin.parallel_threshold == 2


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
@pytest.mark.parametrize("make", [lambda: NoisyLastValueSignals(4096, 4103, seed=3, dim=2, low=0.1, high=2.0),
                                  lambda: ForecasterSignals(4096, 4103, seed=3, dim=2, block_size=4, threads=1)],
                         ids=["NoisyLastValueSignals", "ForecasterSignals"])
def test_signal_sources_copy_independently(make, how):
    """The worker-side sources, as the forecasters above: NoisyLastValueSignals failed pickle and deepcopy ("cannot
    pickle 'module' object") and its copy.copy shared the last value (observing one changed the other's draws);
    ForecasterSignals' copy.copy shared the forecasters (observing one moved both). A clone continues bitwise.
    """
    import copy
    import pickle

    clone_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "copy": copy.copy}[how]
    source = make()
    source.observe([0.1, 0.2])
    source.next()
    clone = clone_of(source)
    clone.observe([0.3, 0.1])
    source.observe([5.0, -3.0])  # after the clone's: a shared buffer would now hold this value for both
    ahead = source.next().copy()
    mine = clone.next().copy()
    twin = make()
    for y in ([0.1, 0.2], [0.3, 0.1]):
        twin.observe(y)
        want = twin.next()
    np.testing.assert_array_equal(mine, want)  # the clone went on from its own round, untouched by the original's
    assert not np.array_equal(ahead, mine)
    np.testing.assert_array_equal(source.state_dict()["shared"]["t"], clone.state_dict()["shared"]["t"])


class _CountingSource(NoisyLastValueSignals):
    """A user's source: its own constructor arguments, its own state (a list), a bound method of itself, another next."""

    def __init__(self, lo, hi, seed=0, *, tag):
        super().__init__(lo, hi, seed, dim=2, low=0.1, high=2.0)
        self.tag, self.seen, self.draw = tag, [], self.next

    def next(self):
        self.seen.append(self.t)
        return super().next() * 2.0


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_subclassed_source_copies_as_itself(how):
    """A subclass's copy is of its class, with its own attributes, independent, and continues bitwise: bab6ac2's
    copies were plain NoisyLastValueSignals (no ``tag``, the base class's ``next``: other draws), where copy.copy had
    kept the class before it.
    """
    import copy
    import pickle

    clone_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "copy": copy.copy}[how]
    source = _CountingSource(4096, 4103, 3, tag="mine")
    source.observe([0.1, 0.2])
    source.next()
    clone = clone_of(source)
    assert type(clone) is _CountingSource and clone.tag == "mine" and clone.seen == [0]
    assert clone.draw.__self__ is clone  # the copy's own method, not the original's
    clone.observe([0.3, 0.1])
    source.observe([0.3, 0.1])
    np.testing.assert_array_equal(clone.draw(), source.next())
    source.next()
    assert clone.seen == [0, 1] and source.seen == [0, 1, 2]  # not shared
    from memoa_fast.distributed import signals

    # every attribute __init__ sets is built again, none is taken for a subclass's own
    assert set(vars(NoisyLastValueSignals(0, 1))) == signals._BUILT_BY_INIT


class _TaggedForecasters(ClientForecasters):
    """A user's forecasters: their own constructor, their own state (a list)."""

    def __init__(self, n_clients, *, tag, **kwargs):
        super().__init__(n_clients, 1, **kwargs)
        self.tag, self.fed = tag, []

    def observe(self, y):
        self.fed.append(float(np.asarray(y).ravel()[0]))
        return super().observe(y)


class _TaggedSignals(ForecasterSignals):
    """ForecasterSignals holding the forecasters above (its copy.copy is a deep copy since bab6ac2)."""

    def __init__(self, lo, hi, seed=0):
        self.forecasters = _TaggedForecasters(hi - lo, tag="mine", seed=seed, first_client=lo, block_size=4, threads=1)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_subclassed_forecasters_copy_as_themselves(how):
    """A ClientForecasters subclass's copy (and that of a ForecasterSignals holding one) is of its class, with its own
    attributes, independent: on 672db22 it was a plain ClientForecasters (no ``tag``, no ``fed``, the base class's
    ``observe``), which bab6ac2's copy.copy of ForecasterSignals now reached too.
    """
    import copy
    import pickle

    from memoa_fast.timeseries import forecasters

    clone_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "copy": copy.copy}[how]
    source = _TaggedSignals(0, 7, seed=3)
    source.observe([0.5])
    clone = clone_of(source)
    fc = clone.forecasters
    assert type(clone) is _TaggedSignals and type(fc) is _TaggedForecasters and fc.tag == "mine" and fc.fed == [0.5]
    clone.observe([0.25])
    source.observe([0.25])
    np.testing.assert_array_equal(clone.next(), source.next())
    source.observe([1.0])
    assert fc.fed == [0.5, 0.25] and source.forecasters.fed == [0.5, 0.25, 1.0] and fc.t == 2
    assert set(vars(ClientForecasters(5, 2, threads=1))) == forecasters._FORECASTERS_BUILT_BY_INIT


def test_a_source_pickled_before_subclasses_were_kept_loads():
    """672db22's pickles call the rebuild with the state and no class: a NoisyLastValueSignals, its state loaded."""
    from memoa_fast.distributed.signals import _rebuild_noisy_last_value

    source = NoisyLastValueSignals(5, 9, 2, dim=2)
    source.observe([1.0, -1.0])
    source.next()
    old = _rebuild_noisy_last_value(5, 9, 2, dict(dim=2, low=0.02, high=1.0, threads=1), source.state_dict())
    assert type(old) is NoisyLastValueSignals and old.t == 1
    np.testing.assert_array_equal(old.next(), source.next())


@pytest.mark.parametrize("make, words", [
    (lambda: ClientForecasters(20_000, backend="numpy"), r"n_clients=20000, dim=1, lags=2, block_size=4096: the forecasters' arrays need"),
    (lambda: ClientForecasters(10, lags=10**12, backend="numpy"), r"lags=1000000000000, block_size=4096: the forecasters' arrays need"),
    (lambda: ClientForecasters(10, block_size=10**12, backend="numpy"), r"block_size=1000000000000: the forecasters' arrays need"),
    (lambda: SquaredErrors(200_000, backend="numpy"), r"n_clients=200000, dim=1: the squared errors' arrays need"),
])
def test_sizes_are_checked_against_memory_before_anything_is_allocated(monkeypatch, make, words):
    """Only integer checks used to stand between a size and NumPy's MemoryError (or the out-of-memory killer)."""
    from memoa_fast import _validation

    monkeypatch.setattr(_validation, "available_memory", lambda: 2**20)  # 1 MiB
    with pytest.raises(ValueError, match=words):
        make()
    ClientForecasters(10, backend="numpy")
    SquaredErrors(10, backend="numpy")


@pytest.mark.parametrize("bad", [1e31, -1e200, 1e308])
def test_squared_errors_refuse_a_target_beyond_the_limit(bad):
    """A finite target of 1e200 used to overflow every |x_i - y|^2 to inf and leave the totals inf for good."""
    scorer = SquaredErrors(4, 2, backend="numpy")
    scorer.add(np.ones((4, 2)), [0.0, 0.5])
    with pytest.raises(ValueError, match=r"^target must have \|target\| <= 1e\+30"):
        scorer.add(np.ones((4, 2)), [0.0, bad])
    np.testing.assert_array_equal(scorer.totals, np.full(4, 1.25))
    assert scorer.max_total == 1.25


# ---- saved states: the magnitudes a forecaster can reach ----------------------------------------------------------------

def _extreme_run(backend, rounds=12, seed=3):
    """A forecaster driven to its largest reachable magnitudes: targets of +-1e30 and noise scales of 1e30."""
    fc = ClientForecasters(6, 2, lags=3, noise_range=(1e30, 1e30), mu=1.99, seed=seed, backend=backend)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(rounds, 2))
    for s in signs:
        fc.observe(s * TARGET_LIMIT)
    return fc


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_states_a_forecaster_reaches_load_and_the_limits_keep_it_finite(backend):
    from memoa_fast.timeseries.forecasters import LAG_LIMIT, signal_limit, weight_limit

    fc = _extreme_run(backend)
    state = fc.state_dict()
    fc.validate_state_dict(state)  # every reachable state is accepted
    assert np.abs(state["agents"]["lags"]).max() <= LAG_LIMIT
    for t in (fc.t, 2**40, 2**62):  # a state at every limit: the next rounds stay finite
        rng = np.random.default_rng(t % 1000)
        edge = {
            "agents": {
                # each weight vector (2p+1 entries) of norm the limit, up to rounding
                "weights": rng.choice([-1.0, 1.0], state["agents"]["weights"].shape) * (weight_limit(t) / (1 + 2**-40))
                / math.sqrt(2 * fc.lags + 1),
                "lags": rng.choice([-1.0, 1.0], state["agents"]["lags"].shape) * LAG_LIMIT,
                "signals": rng.choice([-1.0, 1.0], state["agents"]["signals"].shape) * signal_limit(t, fc.lags),
            },
            "shared": {"t": np.array(t), "y": np.array([TARGET_LIMIT, -TARGET_LIMIT]), CAP_RECORD: np.array(SQUARE_CAP)},
        }
        fc.load_state_dict(edge)
        scores = SquaredErrors(fc.n_clients, fc.dim)
        for y in ([TARGET_LIMIT, -TARGET_LIMIT], [-TARGET_LIMIT, TARGET_LIMIT], [TARGET_LIMIT, TARGET_LIMIT]):
            s = fc.observe(y)
            assert np.isfinite(s).all() and np.isfinite(fc.weights).all()
            assert np.isfinite(scores.add(s, y)[0])


@pytest.mark.parametrize("key", ["weights", "lags", "signals", "y"])
@pytest.mark.parametrize("t", [2, 7, 2**62])
def test_a_saved_state_beyond_the_reachable_magnitudes_is_refused_naming_the_key(key, t):
    from memoa_fast.timeseries.forecasters import LAG_LIMIT, signal_limit, weight_limit

    fc = ClientForecasters(4, 2, lags=2, seed=1, backend="numpy")
    fc.observe([0.1, 0.2])
    fc.observe([0.3, 0.4])
    before = fc.state_dict()
    limit = {"weights": weight_limit(t), "lags": LAG_LIMIT, "signals": signal_limit(t, 2), "y": TARGET_LIMIT}[key]
    for value in (np.nextafter(limit, np.inf), -np.nextafter(limit, np.inf), 1e300):
        bad = fc.state_dict()
        bad["shared"]["t"] = np.array(t)
        part = "shared" if key == "y" else "agents"
        bad[part][key] = bad[part][key].copy()
        bad[part][key].flat[-1] = value
        with pytest.raises(ValueError, match=re.escape(f"state['source/{part}/{key}']") + ".*" + re.escape(f"<= {limit:g}")):
            fc.load_state_dict(bad)
        _assert_unchanged(fc, before, t=2)
        bad[part][key].flat[-1] = np.sign(value) * limit  # at the limit: accepted
        fc.validate_state_dict(bad)


def _states_at_the_limits(fc, t, rng):
    """States of ``fc``'s shapes at round ``t``, at or beyond the weight limits in the ways a bound could be read:
    every weight entry at ``weight_limit(t)`` (mixed signs, the lags 1 so that every feature is 1: the NLMS step then
    pushes one entry to ``(1 + mu (2p-1)/(2p+1)) weight_limit(t)``), and each weight vector of norm just below it (random
    directions, and the same mixed-sign direction).
    """
    from memoa_fast.timeseries.forecasters import LAG_LIMIT, signal_limit, weight_limit

    n, d, p = fc.n_clients, fc.dim, fc.lags
    limit, f = weight_limit(t), 2 * p + 1
    mixed = np.ones((n, d, f))
    mixed[..., -1] = -1.0
    random = rng.normal(size=(n, d, f))
    random /= np.sqrt((random**2).sum(axis=-1, keepdims=True))
    shrink = 1.0 - 2.0**-40
    cases = [
        (mixed * limit, np.ones((n, d, p))),
        (mixed * limit * shrink / math.sqrt(f), np.ones((n, d, p))),
        (random * limit * shrink, rng.uniform(-LAG_LIMIT, LAG_LIMIT, (n, d, p))),
    ]
    for weights, lags in cases:
        yield {"agents": {"weights": weights, "lags": lags, "signals": np.full((n, d), signal_limit(t, p))},
               "shared": {"t": np.array(t), "y": np.zeros(d), CAP_RECORD: np.array(SQUARE_CAP)}}


@pytest.mark.parametrize("noise, target", [((0.02, 0.02), 0.0), ((1e30, 1e30), TARGET_LIMIT)])
@pytest.mark.parametrize("p", [1, 3])
def test_a_loaded_state_stays_loadable_round_after_round(noise, target, p):
    """The accepted states are closed under the forecaster's own rounds: whatever load_state_dict takes, the states
    the forecaster then reaches load again (a copy, a pickle, a checkpoint restore all validate). A bound on each weight
    entry was not: weights at the limit with mixed signs, lags of 1, and one round later an entry was 1.66 times the
    next round's limit, so the forecaster could no longer be copied ("This state was not saved by a ClientForecasters").
    """
    accepted = 0
    for t in (10, 10**6, 10**12):
        fc = ClientForecasters(3, 2, lags=p, noise_range=noise, mu=1.99, seed=t % 97, backend="numpy")
        for state in _states_at_the_limits(fc, t, np.random.default_rng(t % 89)):
            before, t_before = fc.state_dict(), fc.t
            try:
                fc.load_state_dict(state)
            except ValueError as exc:  # only the mixed-sign entries at the limit are beyond it: their norm is
                assert re.match(re.escape("state['source/agents/weights'] must have a Euclidean norm <= "), str(exc))
                _assert_unchanged(fc, before, t=t_before)
                continue
            accepted += 1
            for sign in (1.0, -1.0, 1.0, 1.0):
                fc.observe([sign * target, -sign * target])
                fc.validate_state_dict(fc.state_dict())
                assert np.isfinite(fc.signals).all()
    assert accepted >= 6  # the states of norm at the limit are accepted: the check above is not vacuous


def test_the_round_counter_stops_at_the_largest_savable_round():
    """``t`` is saved as an int64: a forecaster at round 2**63 - 1 (a loaded state) refuses the next round, changing
    nothing, instead of reaching a round no state_dict, copy or checkpoint can hold (OverflowError).
    """
    fc = ClientForecasters(3, 1, lags=2, seed=4, backend="numpy")
    fc.observe(0.3)
    state = fc.state_dict()
    state["shared"]["t"] = np.array(2**63 - 2)
    fc.load_state_dict(state)
    fc.observe(0.1)  # the last round: 2**63 - 1 is still an int64
    fc.validate_state_dict(fc.state_dict())
    before = fc.state_dict()
    with pytest.raises(ValueError, match=re.escape("round 2**63 - 1")):
        fc.observe(0.2)
    _assert_unchanged(fc, before, t=2**63 - 1)


# --------------------------------------------------------------------------- the settings a saved state records
_BASE = dict(lags=2, noise_range=(0.1, 2.0), mu=0.3, seed=2**63 - 1, block_size=4, backend="numpy", threads=1)
_OTHER = {"seed": (2**63 - 2, "9223372036854775806"), "noise_range": ((0.1, 2.5), r"\(0.1, 2.5\)"),
          "mu": (0.35, "0.35"), "block_size": (2, "2")}
_YS = np.sin(0.7 * np.arange(12.0))[:, None] * np.array([1.0, -0.5])  # the targets of tests/data/old_sources


def _forecast(fc, ys):
    return np.array([fc.observe(y).copy() for y in ys])


@pytest.mark.parametrize("name", sorted(_OTHER))
def test_a_state_of_forecasters_with_another_setting_is_refused_naming_it_and_changes_nothing(name):
    """A state saved with another seed, noise range, mu or block size would continue with other noise or other
    updates than the run that saved it: load_state_dict, validate_state_dict and the unpickler refuse it, naming the
    key, the saved value and this object's, and change nothing (they accepted it silently).
    """
    from memoa_fast.timeseries.forecasters import _rebuild_forecasters

    saved = ClientForecasters(6, 2, **_BASE)
    _forecast(saved, _YS[:3])
    state = saved.state_dict()
    value, shown = _OTHER[name]
    other = ClientForecasters(6, 2, **dict(_BASE, **{name: value}))
    other.observe(_YS[0])
    before = other.state_dict()
    mine = re.escape(repr(tuple(_BASE[name]) if name == "noise_range" else _BASE[name]))
    match = rf"state\['source/shared/{name}'\] is {mine}, but this source has {name}={shown}"
    for load in (other.load_state_dict, other.validate_state_dict):
        with pytest.raises(ValueError, match=match):
            load(state)
        _assert_unchanged(other, before, t=1)
    with pytest.raises(ValueError, match=match):  # what pickle.loads calls, given another configuration
        _rebuild_forecasters(6, 2, dict(_BASE, **{name: value}), state)


def test_the_settings_are_saved_exactly_and_the_same_settings_restore_bitwise_on_any_shard():
    """The largest seed is saved as an int64 (a float would round it to 2**63); the same settings restore bitwise, by
    load_state_dict, pickle and copy, also onto other shards (another first_client: the draws depend on the global
    client index, so first_client is rightly not a setting).
    """
    import copy
    import pickle

    whole = ClientForecasters(6, 2, **_BASE)
    _forecast(whole, _YS[:3])
    state = whole.state_dict()
    shared = state["shared"]
    assert shared["seed"].dtype == np.int64 and int(shared["seed"]) == 2**63 - 1
    assert shared["block_size"].dtype == np.int64 and int(shared["block_size"]) == 4
    assert float(shared["mu"]) == 0.3 and tuple(shared["noise_range"]) == (0.1, 2.0)
    rest = _forecast(whole, _YS[3:])
    twin = ClientForecasters(6, 2, **_BASE)
    twin.load_state_dict(state)
    np.testing.assert_array_equal(_forecast(twin, _YS[3:]), rest)
    shard = ClientForecasters(2, 2, first_client=4, **_BASE)  # clients [4, 6): the second block
    shard.load_state_dict({"agents": {k: v[4:] for k, v in state["agents"].items()}, "shared": shared})
    np.testing.assert_array_equal(_forecast(shard, _YS[3:]), rest[:, 4:])
    for clone in (pickle.loads(pickle.dumps(twin)), copy.deepcopy(twin), copy.copy(twin)):
        np.testing.assert_array_equal(clone.state_dict()["shared"]["seed"], shared["seed"])


def test_a_state_saved_before_the_settings_were_recorded_loads_and_continues_as_before():
    """Nothing a user saved is lost: a state without the settings (the form of every state saved before, here by
    deleting them, and a real pickle written by main 99c2a56) loads and continues bitwise; such a state cannot tell
    its settings, so it is taken on trust as before.
    """
    import importlib.util
    import pickle
    from pathlib import Path

    whole = ClientForecasters(6, 2, **_BASE)
    _forecast(whole, _YS[:3])
    state = whole.state_dict()
    rest = _forecast(whole, _YS[3:])
    old = {"agents": state["agents"], "shared": {"t": state["shared"]["t"], "y": state["shared"]["y"]}}
    twin = ClientForecasters(6, 2, **_BASE)
    with pytest.warns(UncappedStateWarning):  # saved before the cap too (the lags here are within 8: the same bits)
        twin.load_state_dict(old)
    np.testing.assert_array_equal(_forecast(twin, _YS[3:]), rest)
    with pytest.warns(UncappedStateWarning):
        ClientForecasters(6, 2, **dict(_BASE, seed=1)).load_state_dict(old)  # as before: nothing to compare with
    if importlib.util.find_spec("numpy._core") is None:  # NumPy 1.x cannot read NumPy 2's pickles of arrays at all
        return
    with pytest.warns(UncappedStateWarning):
        unpickled = pickle.loads((Path(__file__).parent / "data" / "old_sources" / "forecasters.pkl").read_bytes())
    assert unpickled.t == 3 and repr(unpickled) == repr(twin).replace("t=12", "t=3")
    for key, value in state["agents"].items():
        assert_as_saved(value, unpickled.state_dict()["agents"][key], err_msg=key)  # NumPy 1.26: to rounding
    assert_as_saved(_forecast(unpickled, _YS[3:]), rest)


# --------------------------------------------------------------------------- the squared features' cap in saved states
def _loud_state():
    """A state whose lags reach beyond sqrt(SQUARE_CAP) = 8 (targets of 30): capped and plain features differ there."""
    fc = ClientForecasters(4, 1, lags=2, noise_range=(0.1, 0.2), seed=5, backend="numpy")
    for y in (30.0, -25.0, 28.0):
        fc.observe(y)
    assert np.abs(fc.state_dict()["agents"]["lags"]).max() > math.sqrt(SQUARE_CAP)
    return fc


def test_a_state_records_the_cap_of_the_squared_features_and_another_cap_is_refused():
    """state_dict records SQUARE_CAP; a state recorded with another cap (or a cap that is not a real number) is
    refused by load_state_dict, validate_state_dict and pickle's rebuild, naming the key and both values, and the
    forecaster is unchanged: its later rounds would differ from the run that saved it.
    """
    from memoa_fast.timeseries.forecasters import _rebuild_forecasters

    fc = _loud_state()
    state = fc.state_dict()
    assert float(state["shared"][CAP_RECORD]) == SQUARE_CAP
    for bad, match in ((np.array(100.0), r"is 100\.0, but this memoa-fast caps the squared features at SQUARE_CAP=64: the state"),
                       (np.array(np.inf), "must be finite"), (True, "must be a finite real number"),
                       ("64", "must be a finite real number, got '64' of type str")):
        other = {"agents": state["agents"], "shared": {**state["shared"], CAP_RECORD: bad}}
        target = ClientForecasters(4, 1, lags=2, noise_range=(0.1, 0.2), seed=5, backend="numpy")
        target.observe(1.0)
        before = target.state_dict()
        for load in (target.load_state_dict, target.validate_state_dict):
            with pytest.raises(ValueError, match=rf"state\['source/shared/{CAP_RECORD}'\] {match}"):
                load(other)
            _assert_unchanged(target, before, t=1)
        with pytest.raises(ValueError, match=match):
            _rebuild_forecasters(4, 1, dict(lags=2, noise_range=(0.1, 0.2), seed=5, backend="numpy"), other)


def test_a_state_saved_before_the_cap_loads_with_a_warning_and_continues_with_capped_features():
    """Nothing a user saved is lost: a state without the cap's record (the form of every state saved before the cap)
    loads with an UncappedStateWarning that names the key and the cap, continues exactly as a forecaster of today
    would from the same arrays, and its next state_dict records the cap (loads again without a warning).
    """
    fc = _loud_state()
    state = fc.state_dict()
    old = {"agents": state["agents"], "shared": {k: v for k, v in state["shared"].items() if k != CAP_RECORD}}
    twin = ClientForecasters(4, 1, lags=2, noise_range=(0.1, 0.2), seed=5, backend="numpy")
    with pytest.warns(UncappedStateWarning, match=rf"state\['source/shared/{CAP_RECORD}'\] is missing: this state was "
                      r"saved before memoa-fast capped the squared features at SQUARE_CAP=64 \(its.*exceeds 8 in magnitude"):
        twin.load_state_dict(old)
    for y in (29.0, -31.0, 27.0):
        np.testing.assert_array_equal(twin.observe(y), fc.observe(y))
    again = ClientForecasters(4, 1, lags=2, noise_range=(0.1, 0.2), seed=5, backend="numpy")
    again.load_state_dict(twin.state_dict())  # filterwarnings = error: no warning here
    import warnings

    import memoa_fast

    with warnings.catch_warnings():  # a user silences it by its public name
        warnings.simplefilter("ignore", memoa_fast.UncappedStateWarning)
        again.load_state_dict(old)
    assert float(twin.state_dict()["shared"][CAP_RECORD]) == SQUARE_CAP


def test_a_state_saved_before_the_cap_that_is_refused_gives_no_warning():
    """The UncappedStateWarning says the state loads: a state without the record that is refused for another
    reason (a lag beyond LAG_LIMIT) gets only the ValueError (under filterwarnings=error the warning took its place).
    """
    from memoa_fast.timeseries.forecasters import LAG_LIMIT

    fc = _loud_state()
    state = fc.state_dict()
    lags = state["agents"]["lags"].copy()
    lags[0, 0, 0] = 2 * LAG_LIMIT
    old = {"agents": {**state["agents"], "lags": lags}, "shared": {k: v for k, v in state["shared"].items() if k != CAP_RECORD}}
    for load in (fc.validate_state_dict, fc.load_state_dict):
        with pytest.raises(ValueError, match=r"state\['source/agents/lags'\]"):
            load(old)


def test_the_uncapped_state_warning_points_at_the_callers_line():
    """The warning's location is the line that loads (load_state_dict, validate_state_dict, an unpickle), not a line
    of memoa_fast: the default filter shows a warning once per location, so one inside the library showed only the
    first old state a session loaded, from wherever it came.
    """
    import pickle
    import warnings

    fc = _loud_state()
    state = fc.state_dict()
    old = {"agents": state["agents"], "shared": {k: v for k, v in state["shared"].items() if k != CAP_RECORD}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc.load_state_dict(old)
        fc.validate_state_dict(old)
        with pytest.MonkeyPatch.context() as mp:
            # on the class: an attribute set on the object is its own, and pickled with it (a lambda cannot be)
            mp.setattr(ClientForecasters, "state_dict", lambda self: old)
            pickle.loads(pickle.dumps(fc))
    assert [(w.category, w.filename) for w in caught] == [(UncappedStateWarning, __file__)] * 3


def test_the_quiet_validator_returns_the_warning_it_would_issue():
    """``_validated`` (what a Dask shard asks: a worker thread may neither issue nor capture a warning, see
    :func:`memoa_fast._validation.issue_notices`) issues nothing and returns the ``(category, message)`` that
    validate_state_dict issues, with the same clean copy, which loads without a warning.
    """
    fc = _loud_state()
    state = fc.state_dict()
    old = {"agents": state["agents"], "shared": {k: v for k, v in state["shared"].items() if k != CAP_RECORD}}
    clean, notices = fc._validated(old)  # filterwarnings = error: no warning here
    with pytest.warns(UncappedStateWarning) as issued:
        checked = fc.validate_state_dict(old)
    assert notices == [(w.category, str(w.message)) for w in issued] and len(notices) == 1
    for part in ("agents", "shared"):
        assert clean[part].keys() == checked[part].keys() == state[part].keys()
        for key in clean[part]:
            np.testing.assert_array_equal(clean[part][key], checked[part][key])
    assert fc._validated(state)[1] == []
    fc.load_state_dict(clean)


class _StricterForecasters(ClientForecasters):
    """A user's forecasters whose validator checks more."""

    def validate_state_dict(self, state):
        if int(state["shared"]["t"]) > 0:
            raise ValueError("these forecasters resume only at t=0")
        return super().validate_state_dict(state)


class _WithStricterForecasters(ForecasterSignals):
    """A user's source of the package's class, holding forecasters whose validator checks more."""

    def __init__(self, lo, hi, seed=0, **kwargs):
        self.forecasters = _StricterForecasters(hi - lo, 1, seed=seed, first_client=lo, **kwargs)


class _OneMoreNotice(ForecasterSignals):
    """A subclass that adds a notice where the package's validators make theirs (their validate_state_dict issues it)."""

    def _validated(self, state):
        clean, notices = super()._validated(state)
        return clean, [*notices, (UserWarning, "one more")]


class _OwnHelper(NoisyLastValueSignals):
    """A user's source with a helper of its own that happens to be called ``_validated`` (the clean copy only)."""

    def _validated(self, state):
        return NoisyLastValueSignals.validate_state_dict(self, state)

    def validate_state_dict(self, state):
        return self._validated(state)


@pytest.mark.parametrize("make", [_WithStricterForecasters, _OneMoreNotice, _OwnHelper])
def test_a_shards_check_of_a_source_is_its_validate_state_dict_less_the_warnings(make):
    """What a Dask shard's check gives (``(clean, notices)``, issuing nothing) is what the source's own
    ``validate_state_dict`` returns and issues, for any class: the package's quiet ``_validated`` is used only where
    ``validate_state_dict`` is the package's, which issues exactly what ``self._validated`` returns. It was used
    whenever the class that defined validate_state_dict defined ``_validated`` too: forecasters that check more, held
    by a ForecasterSignals, were skipped (a state they refuse loaded), a subclass's ``_validated`` was bypassed (its
    notices issued on the worker), and a user's own ``_validated`` helper was taken for the package's (the restore failed
    unpacking its answer).
    """
    from types import SimpleNamespace

    from memoa_fast.distributed._shard import Shard

    kwargs = dict(low=0.1) if make is _OwnHelper else dict(lags=2, backend="numpy")
    source = make(0, 8, seed=3, **kwargs)
    source.observe(np.ones(1))
    source.next()
    state = source.state_dict()
    state["shared"].pop(CAP_RECORD, None)  # a state saved before the cap: the package's validators warn
    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        try:
            expected = source.validate_state_dict(state), None
        except ValueError as exc:
            expected = None, str(exc)
    notices = [(w.category, str(w.message)) for w in issued]
    shard = SimpleNamespace(source=source)  # the check reads only the shard's source
    if expected[1] is not None:
        with pytest.raises(ValueError, match=re.escape(expected[1])):
            Shard._checked_source_state(shard, state)
        return
    clean, answered = Shard._checked_source_state(shard, state)  # filterwarnings = error: nothing issued here
    assert answered == notices
    for part in ("agents", "shared"):
        assert clean[part].keys() == expected[0][part].keys()
        for key in clean[part]:
            np.testing.assert_array_equal(clean[part][key], expected[0][part][key])


class _OwnLoadForecasters(ClientForecasters):
    """A user's forecasters whose ``load_state_dict`` does more (it records each load)."""

    def load_state_dict(self, state):
        self.loads = getattr(self, "loads", 0) + 1
        super().load_state_dict(state)


class _WithOwnLoadForecasters(ForecasterSignals):
    """A user's source of the package's class, holding forecasters with a load of their own."""

    def __init__(self, lo, hi, seed=0, **kwargs):
        self.forecasters = _OwnLoadForecasters(hi - lo, 1, seed=seed, first_client=lo, **kwargs)


def test_the_installer_of_a_checked_state_is_the_packages_only_where_its_check_and_load_are():
    """:func:`checked_installer` (what a shard or a restore installs an already checked state with, not checking it
    again) is given only where ``validate_state_dict`` and ``load_state_dict`` are both the package's, on the object:
    a subclass's own check or load, or a load set on the instance, is what loads; forecasters with a load of their own,
    held by the package's source, get theirs called through it, once per load.
    """
    from memoa_fast._validation import checked_installer

    make = dict(lags=2, backend="numpy", threads=1)
    fc, signals = ClientForecasters(8, 1, seed=3, **make), ForecasterSignals(0, 8, 3, **make)
    assert checked_installer(fc) is ClientForecasters._install_checked
    assert checked_installer(signals) is ForecasterSignals._install_checked
    assert checked_installer(NoisyLastValueSignals(0, 8, 3)) is None  # no quiet check: loads as it always did
    assert checked_installer(_StricterForecasters(8, 1, seed=3, **make)) is None
    assert checked_installer(_OwnLoadForecasters(8, 1, seed=3, **make)) is None
    fc.load_state_dict = lambda state: None
    assert checked_installer(fc) is None
    holder = _WithOwnLoadForecasters(0, 8, 3, **make)
    holder.observe(np.ones(1))
    state = holder.state_dict()
    holder.observe(np.ones(1))
    install = checked_installer(holder)
    assert install is ForecasterSignals._install_checked
    install(holder, holder._validated(state)[0])
    holder.load_state_dict(state)
    assert holder.forecasters.loads == 2 and holder.forecasters.t == 1


class _StricterSignalsOwnLoad(ForecasterSignals):
    """A user's source of the package's class that checks more, holding forecasters with a load of their own."""

    def __init__(self, lo, hi, seed=0, **kwargs):
        self.forecasters = _OwnLoadForecasters(hi - lo, 1, seed=seed, first_client=lo, **kwargs)

    def validate_state_dict(self, state):
        if int(state["shared"]["t"]) > 0:
            raise ValueError("this source resumes only at t=0")
        return super().validate_state_dict(state)


def test_a_source_subclass_with_its_own_check_loads_through_it_whatever_forecasters_it_holds():
    """``load_state_dict`` of a ForecasterSignals subclass with a stricter ``validate_state_dict`` runs that check first,
    also when its forecasters have a load of their own (it loaded theirs directly, unchecked by the source's own
    validator); the forecasters' own load is then called with the clean copy, once.
    """
    source = _StricterSignalsOwnLoad(0, 8, 3, lags=2, backend="numpy", threads=1)
    at_zero = source.state_dict()
    source.observe(np.ones(1))
    with pytest.raises(ValueError, match="resumes only at t=0"):
        source.load_state_dict(source.state_dict())
    assert source.forecasters.t == 1 and getattr(source.forecasters, "loads", 0) == 0
    source.load_state_dict(at_zero)
    assert source.forecasters.t == 0 and source.forecasters.loads == 1


def test_a_restore_with_client_side_forecasters_checks_their_state_once(tmp_path, monkeypatch):
    """``restore_checkpoint(..., source=forecasters)`` checks the forecasters' state (O(n_clients) arrays) with the
    rest of the checkpoint, then installs that clean copy: their ``load_state_dict`` checked it a second time.
    """
    from memoa_fast import Game, Population
    from memoa_fast.checkpoint import restore_checkpoint, save_checkpoint

    game, make = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95), dict(lags=2, seed=3, backend="numpy", threads=1)
    pop, fc = Population(game, 8, 1, threads=1), ClientForecasters(8, 1, **make)
    pop.step(fc.observe(np.ones(1)))
    path = save_checkpoint(tmp_path / "c.npz", pop, source=fc)
    checks = []
    validated = ClientForecasters._validated
    monkeypatch.setattr(ClientForecasters, "_validated", lambda self, state: (checks.append(self), validated(self, state))[1])
    other = ClientForecasters(8, 1, **make)
    restore_checkpoint(path, Population(game, 8, 1, threads=1), source=other)
    assert checks == [other] and other.t == 1
    np.testing.assert_array_equal(other.state_dict()["agents"]["weights"], fc.state_dict()["agents"]["weights"])
