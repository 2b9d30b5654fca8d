"""The fused step kernel and Population's fused path against the unfused path.

``fused_step`` (two passes over memory) must give what ``mean_field`` then
``policy_update`` (then ``mixture_predict``) give, to ``RTOL = 1e-12``
relative to the size of the summed terms, as in ``test_kernels.py``; for the
Numba backend the next step's mean field it returns must be *bitwise* the
one ``mean_field`` computes from the moved states, so a fused run, an
unfused run and a run resumed from ``state_dict`` agree bit for bit.
"""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from memoa_fast import Game, Population, Server
from memoa_fast.kernels import CHUNK, _numba, _reference, work_shape

RTOL = 1e-12
NUMBA_THREADS = numba.config.NUMBA_NUM_THREADS
THREADS = (1, 2) if NUMBA_THREADS >= 2 else (1,)
GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
COEF = (0.4, 0.3, 0.5, 0.2)  # gain, c_signal, c_signal_mean, c_state_mean
QKR = (1.0, 2.0, 0.5)


def fused_backends():
    out = {"numba": _numba}
    try:
        from memoa_fast.kernels import _cython

        if hasattr(_cython, "fused_step"):
            out["cython"] = _cython
    except ImportError:
        pass
    return out


FUSED = fused_backends()


def assert_close(actual, expected, scale, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    err = np.abs(actual - expected)
    ok = (actual == expected) | (err <= RTOL * (np.abs(expected) + scale))
    assert ok.all(), f"{what}: {np.count_nonzero(~ok)} entries off, worst error {err[~ok].max()!r}"


def population(seed, n, d, bad_fraction):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 2)
    x = rng.normal(rng.normal(size=d) * scale, scale, size=(n, d))
    s = x + rng.normal(0.0, scale, size=(n, d))
    bad = np.flatnonzero(rng.random(n) < bad_fraction)
    s[bad, rng.integers(0, d, bad.size)] = rng.choice([np.nan, np.inf, -np.inf], bad.size)
    if rng.random() < 0.3:
        J = rng.integers(0, 4, n).astype(np.float64)  # ties for the worst client
    else:
        J = rng.exponential(scale * scale, n)
    log_p = rng.normal(0.0, 3.0, n)
    return rng, x, s, J, log_p - logsumexp(log_p)


def run_fused(kern, x, s, J, log_p, mean_x, have_mean_x, threads, discount=0.9):
    n, d = x.shape
    x, J, mean_x = x.copy(), J.copy(), mean_x.copy()
    mean_s, next_mean_x, yhat = np.full(d, 123.25), np.full(d, np.nan), np.full(d, np.nan)
    stats = kern.fused_step(x, s, J, np.full(work_shape(n, d), np.nan), *COEF, *QKR, discount,
                            mean_x, mean_s, next_mean_x, have_mean_x, log_p, yhat, threads)
    return stats, x, J, mean_x, mean_s, next_mean_x, yhat


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n", [1, 2, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 1, 50_000])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from([1, 3, 4, 16]),
       bad_fraction=st.sampled_from([0.0, 0.05, 1.0]), have_mean_x=st.booleans(), predict=st.booleans(),
       threads=st.sampled_from(THREADS))
def test_fused_step_matches_reference(backend, n, seed, d, bad_fraction, have_mean_x, predict, threads):
    _, x, s, J, log_p = population(seed, n, d, bad_fraction)
    log_p = log_p if predict else np.empty(0)
    given_mean = x.mean(axis=0) + 0.25  # any m(t) when it is given
    got = run_fused(FUSED[backend], x, s, J, log_p, given_mean, have_mean_x, threads)
    ref = run_fused(_reference, x, s, J, log_p, given_mean, have_mean_x, 1)
    (n_finite, max_J, worst), gx, gJ, gm, gs, gnext, gy = got
    (ref_finite, _, _), rx, rJ, rm, rs, rnext, ry = ref

    assert type(n_finite) is int and type(max_J) is float and type(worst) is int
    assert n_finite == ref_finite
    assert worst == int(np.argmax(gJ)) and max_J == gJ[worst], "worst client of the updated costs, first on ties"
    ax = np.abs(x)
    assert_close(gm, rm, ax.mean(axis=0), "m(t)")
    ok = np.isfinite(s).all(axis=1)
    if ok.any():
        assert_close(gs, rs, np.abs(s[ok]).mean(axis=0), "sbar(t)")
    else:
        assert (gs == 123.25).all(), "no finite signal: mean_s must be left alone"
    mag = ax + np.abs(np.where(ok[:, None], s, 0.0)) + np.abs(gm) + np.abs(gs)
    assert_close(gx, rx, mag, "x(t+1)")
    assert_close(gJ, rJ, np.abs(J) + (mag**2).sum(axis=1) * 10, "J(t+1)")
    assert gx[~ok].tobytes() == x[~ok].tobytes(), "an agent with a non-finite signal holds"
    assert_close(gnext, rnext, np.abs(rx).mean(axis=0), "m(t+1)")
    if predict:
        assert_close(gy, ry, np.exp(log_p) @ np.abs(rx), "yhat(t+1)")
    else:
        assert np.isnan(gy).all(), "no log-weights: yhat must be left alone"


@pytest.mark.parametrize("n", [CHUNK + 7, 100_000])
@pytest.mark.parametrize("d", [1, 3, 16])
def test_numba_fused_equals_unfused_bitwise(n, d):
    """Same bytes as mean_field + policy_update; m(t+1) is what mean_field gives on x(t+1)."""
    _, x, s, J, log_p = population(n + d, n, d, 0.02)
    for threads in THREADS:
        stats, fx, fJ, fm, fs, fnext, fy = run_fused(_numba, x, s, J, log_p, np.zeros(d), False, threads)
        ux, uJ, um, us = x.copy(), J.copy(), np.empty(d), np.full(d, 123.25)
        n_finite, _, _ = _numba.mean_field(ux, s, uJ, np.zeros(work_shape(n, d)), um, us, threads)
        _numba.policy_update(ux, s, uJ, *COEF, us, *QKR, um, 0.9, threads)
        assert n_finite == stats[0]
        assert (fm.tobytes(), fs.tobytes(), fx.tobytes(), fJ.tobytes()) == (um.tobytes(), us.tobytes(), ux.tobytes(), uJ.tobytes())
        after, _ = np.empty(d), None
        stats2 = _numba.mean_field(ux, s, uJ, np.zeros(work_shape(n, d)), after, np.empty(d), threads)
        assert fnext.tobytes() == after.tobytes(), "carried m(t+1) differs from a fresh mean_field"
        assert (stats[1], stats[2]) == (stats2[1], stats2[2])
        yhat = np.empty(d)
        _numba.mixture_predict(log_p, ux, np.zeros(work_shape(n, d)), yhat, threads)
        assert fy.tobytes() == yhat.tobytes()


@pytest.mark.skipif(NUMBA_THREADS < 2, reason="Numba was started with one thread")
def test_numba_fused_thread_count_invariant():
    n, d = 5 * CHUNK + 3, 4
    _, x, s, J, log_p = population(3, n, d, 0.05)
    runs = [run_fused(_numba, x, s, J, log_p, np.zeros(d), False, t) for t in (1, 2, 1, 2)]
    flat = [(r[0], *(a.tobytes() for a in r[1:])) for r in runs]
    assert all(f == flat[0] for f in flat)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        run_fused(_numba, x, s, J, log_p, np.zeros(d), False, 2)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


# --------------------------------------------------------------------------- Population
def _signals(rng, T, n, d):
    sig = rng.normal(size=(T, n, d)) + np.linspace(0.0, 3.0, T)[:, None, None]
    sig[2, :: max(1, n // 7), 0] = np.nan
    sig[5, 1, :] = np.inf
    sig[min(T - 1, 7)] = np.nan  # a round with no finite signal: nobody moves
    return sig


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n,d,threads", [(37, 3, 1), (3 * CHUNK + 5, 2, 1), (40_000, 4, None)])
def test_population_fused_equals_unfused(backend, n, d, threads, rng):
    """Bitwise: the fused step sums m(t+1) exactly as the backend's mean_field sums m."""
    x0 = rng.normal(size=(n, d))
    signals = _signals(rng, 12, n, d)
    fused = Population(GAME, initial_states=x0, threads=threads, backend=backend)
    unfused = Population(GAME, initial_states=x0, threads=threads, backend=backend)
    unfused._fused = False  # the two-kernel path other backends take
    reference = Population(GAME, initial_states=x0, backend="numpy")
    assert fused._fused and reference._fused
    for s in signals:
        fused.step(s)
        unfused.step(s)
        reference.step(s)
        for attr in ("states", "costs", "mean_state", "mean_signal"):
            assert getattr(fused, attr).tobytes() == getattr(unfused, attr).tobytes(), attr
        assert fused.n_finite_signals == unfused.n_finite_signals == reference.n_finite_signals
        assert fused.worst_agent == unfused.worst_agent == int(np.argmax(unfused.costs))
        assert fused.regret == unfused.regret
        scale = np.abs(reference.states).max()
        np.testing.assert_allclose(fused.states, reference.states, rtol=RTOL, atol=RTOL * scale)
        np.testing.assert_allclose(fused.costs, reference.costs, rtol=RTOL, atol=RTOL * np.abs(reference.costs).max())
        np.testing.assert_allclose(fused.mean_state, reference.mean_state, rtol=RTOL, atol=RTOL * scale)


def test_population_resume_from_state_dict_is_bitwise(rng):
    n, d = 2 * CHUNK + 9, 3
    x0 = rng.normal(size=(n, d))
    signals = _signals(rng, 10, n, d)
    straight = Population(GAME, initial_states=x0)
    straight.run(signals)
    first = Population(GAME, initial_states=x0)
    first.run(signals[:4])
    state = first.state_dict()
    resumed = Population(GAME, n_agents=n, dim=d)
    resumed.load_state_dict(state)
    assert resumed.mean_state.tobytes() == first.mean_state.tobytes()
    resumed.run(signals[4:])
    for attr in ("states", "costs", "mean_state", "mean_signal", "worst_agent", "regret", "t", "discount"):
        a, b = getattr(straight, attr), getattr(resumed, attr)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), attr
    # load_state_dict into a population that already stepped: the carried mean is dropped
    first.run(signals[4:6])
    first.load_state_dict(state)
    first.run(signals[4:])
    assert first.states.tobytes() == straight.states.tobytes()
    # reset: the next step recomputes m from the new initial states
    straight.reset(x0)
    again = Population(GAME, initial_states=x0)
    straight.step(signals[0])
    again.step(signals[0])
    assert straight.states.tobytes() == again.states.tobytes()


@pytest.mark.parametrize("backend", ["numba", "numpy", "unfused"])
@pytest.mark.parametrize("rule", ["hedge", "eg"])
def test_step_predict_is_step_then_predict(backend, rule, rng):
    n, d = CHUNK + 11, 2
    x0 = rng.normal(size=(n, d))
    signals = _signals(rng, 6, n, d)
    fused = backend != "unfused"
    backend = backend if fused else "numba"
    pop, twin = Population(GAME, initial_states=x0, backend=backend), Population(GAME, initial_states=x0, backend=backend)
    pop._fused = fused  # "unfused": step, then a separate mixture pass
    server, twin_server = Server(n, d, rule=rule, eta=0.5, alpha=0.01, backend=backend), Server(n, d, rule=rule, eta=0.5, alpha=0.01, backend=backend)
    for t, s in enumerate(signals):
        yhat = pop.step_predict(s, server)
        assert not yhat.flags.writeable
        twin.step(s)
        expected = twin_server.predict(twin.states)
        assert pop.states.tobytes() == twin.states.tobytes()
        np.testing.assert_allclose(yhat, expected, rtol=RTOL, atol=RTOL * np.abs(twin.states).max())
        y = np.sin(t + np.arange(d))
        server.update(pop.states, y)
        twin_server.update(twin.states, y)


def test_step_predict_checks_its_server(rng):
    pop = Population(GAME, 10, 2)
    with pytest.raises(TypeError, match="memoa_fast.Server"):
        pop.step_predict(np.zeros((10, 2)), object())
    with pytest.raises(ValueError, match="same n_agents and dim"):
        pop.step_predict(np.zeros((10, 2)), Server(11, 2))
    with pytest.raises(ValueError, match="same n_agents and dim"):
        pop.step_predict(np.zeros((10, 2)), Server(10, 3))
