"""Server mixture: closed forms for hedge, a plain-weights oracle for eg, underflow safety."""
import numpy as np
import pytest
from helpers import assert_server_step, available_backends
from hypothesis import given, settings
from hypothesis import strategies as st

from memoa_fast import Server

BACKENDS = available_backends()


def plain_weights_run(rule, eta, alpha, states, targets):
    """MODEL.md section 5 with plain (not log) weights: fine at small N, the oracle."""
    n = states.shape[1]
    p = np.full(n, 1.0 / n)
    preds = []
    for x, y in zip(states, targets):
        yhat = p @ x
        preds.append(yhat)
        g = 2 * x @ (yhat - y) if rule == "eg" else ((x - y) ** 2).sum(axis=1)
        p = p * np.exp(-eta * g)
        p /= p.sum()
        p = (1 - alpha) * p + alpha / n
    return p, np.array(preds)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["eg", "hedge"])
@pytest.mark.parametrize("alpha", [0.0, 0.05, 1.0])
def test_matches_plain_weight_oracle(backend, rule, alpha, rng):
    T, n, d = 30, 25, 2
    states = rng.normal(size=(T, n, d))
    targets = rng.normal(size=(T, d))
    srv = Server(n, d, rule=rule, eta=0.3, alpha=alpha, backend=backend)
    preds = []
    for x, y in zip(states, targets):
        preds.append(srv.predict(x).copy())
        srv.update(x, y)
    p_ref, preds_ref = plain_weights_run(rule, 0.3, alpha, states, targets)
    np.testing.assert_allclose(srv.weights, p_ref, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(np.array(preds), preds_ref, rtol=1e-11, atol=1e-14)
    assert srv.n_updates == T


def test_hedge_closed_form(rng):
    # Without fixed share, hedge's weights are the softmax of -eta * cumulative loss.
    n, T, eta = 40, 12, 0.7
    states, targets = rng.normal(size=(T, n, 1)), rng.normal(size=(T, 1))
    srv = Server(n, 1, rule="hedge", eta=eta)
    for x, y in zip(states, targets):
        srv.update(x, y)
    cum = ((states - targets[:, None, :]) ** 2).sum(axis=(0, 2))
    z = -eta * cum
    np.testing.assert_allclose(srv.weights, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_weights_do_not_underflow_at_huge_losses(backend):
    # Plain weights would all be exp(-1e4) = 0 here; the log domain keeps a proper law.
    n = 1000
    x = np.linspace(0.0, 100.0, n)[:, None]
    srv = Server(n, 1, rule="hedge", eta=1.0, backend=backend)
    srv.update(x, np.array([150.0]))
    p = srv.weights
    assert np.isfinite(srv.log_weights).all()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert int(np.argmax(p)) == n - 1
    assert srv.predict(x)[0] == pytest.approx(100.0, rel=1e-6)


def test_fixed_share_keeps_every_client_alive():
    n, alpha = 100, 0.01
    x = np.arange(n, dtype=float)[:, None]
    srv = Server(n, 1, rule="hedge", eta=10.0, alpha=alpha)
    for _ in range(20):
        srv.update(x, np.array([0.0]))
    assert srv.weights.min() >= alpha / n * (1 - 1e-12)


def test_state_dict_round_trip(rng):
    srv = Server(10, 1, rule="eg", eta=0.5, alpha=0.01)
    x = rng.normal(size=(10, 1))
    srv.update(x, [0.3])
    other = Server(10, 1, rule="eg", eta=0.5, alpha=0.01)
    other.load_state_dict(srv.state_dict())
    np.testing.assert_array_equal(other.log_weights, srv.log_weights)
    with pytest.raises(ValueError, match="rule"):
        Server(10, 1, rule="hedge", eta=0.5, alpha=0.01).load_state_dict(srv.state_dict())


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(n_agents=0), ValueError, ["n_agents", "0"]),
        (dict(n_agents=3, rule="adam"), ValueError, ["rule", "'adam'", "'eg'", "'hedge'"]),
        (dict(n_agents=3, eta=-1.0), ValueError, ["eta", "-1.0"]),
        (dict(n_agents=3, alpha=1.5), ValueError, ["alpha", "1.5", "[0, 1]"]),
        (dict(n_agents=3, alpha="x"), TypeError, ["alpha", "'x'"]),
    ],
)
def test_bad_construction(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Server(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_update_input_leaves_weights_alone(rng):
    srv = Server(4, 2)
    x = rng.normal(size=(4, 2))
    before = srv.log_weights.copy()
    with pytest.raises(ValueError, match="target must be finite"):
        srv.update(x, [np.nan, 0.0])
    with pytest.raises(ValueError, match=r"target must have shape \(2,\)"):
        srv.update(x, [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="states must be finite"):
        srv.update(np.full((4, 2), np.inf), [0.0, 0.0])
    np.testing.assert_array_equal(srv.log_weights, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_update_past_the_last_count_a_state_can_hold(backend, rng):
    """A loaded state at n_updates = 2**63 - 1 updated once more gave 2**63: no save, copy or pickle could hold it."""
    import pickle

    srv = Server(4, 2, rule="eg", alpha=0.1, backend=backend)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=2)
    srv.update(x, y)
    state = srv.state_dict()
    state["n_updates"] = 2**63 - 1
    srv.load_state_dict(state)
    with pytest.raises(ValueError, match=r"n_updates = 9223372036854775807 = 2\*\*63 - 1.*updates no further"):
        srv.update(x, y)
    assert srv.n_updates == 2**63 - 1
    np.testing.assert_array_equal(srv.log_weights, state["log_weights"])
    assert pickle.loads(pickle.dumps(srv)).n_updates == 2**63 - 1  # still saved, copied, pickled
    state["n_updates"] = 2**63 - 2
    srv.load_state_dict(state)
    srv.update(x, y)  # the last update is still made
    assert srv.n_updates == 2**63 - 1 and srv.state_dict()["n_updates"] == 2**63 - 1


# --------------------------------------------------------------------------- issue 8: any loss, any size
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(log_scale=st.floats(-300, 307), n=st.integers(1, 300), rule=st.sampled_from(["hedge", "eg"]),
       alpha=st.sampled_from([0.0, 1e-3, 0.125, 1.0]), eta=st.sampled_from([0.0, 1e-3, 1.0, 10.0, 1e308]),
       seed=st.integers(0, 2**32 - 1))
def test_weights_always_sum_to_one_and_never_nan(backend, log_scale, n, rule, alpha, eta, seed):
    rng = np.random.default_rng(seed)
    server = Server(n, 2, rule=rule, eta=eta, alpha=alpha, backend=backend)
    for _ in range(3):
        states = rng.uniform(-1.0, 1.0, size=(n, 2)) * 10.0**log_scale
        if rng.random() < 0.5:
            states[:] = states[0]  # large and tied
        server.update(states, rng.normal(size=2))
        lp = server.log_weights
        assert not np.isnan(lp).any() and not (lp == np.inf).any()
        assert abs(np.exp(lp).sum() - 1.0) <= 1e-12
    yhat = server.predict(np.ones((n, 2)))
    np.testing.assert_allclose(yhat, 1.0, rtol=1e-12)


def test_issue_8_reproducers():
    s = Server(3, 1, rule="hedge", eta=1.0)
    s.update(np.full((3, 1), 1e9), np.zeros(1))
    np.testing.assert_allclose(s.weights, 1 / 3, rtol=1e-14)
    np.testing.assert_allclose(s.predict(np.ones((3, 1))), [1.0], rtol=1e-14)
    s = Server(2, 1, eta=1.0, alpha=0.01)
    s.update(np.array([[1e200], [2e200]]), np.zeros(1))
    s.update(np.ones((2, 1)), np.zeros(1))
    assert np.isfinite(s.weights).all() and abs(s.weights.sum() - 1) < 1e-12
    s = Server(1000, 1, rule="hedge", eta=1.0)
    s.update(np.full((1000, 1), 1e4) + np.arange(1000)[:, None] * 1e-12, np.zeros(1))
    assert abs(np.logaddexp.reduce(s.log_weights)) < 1e-12
    Server(1000, 1, rule="hedge", eta=1.0).load_state_dict(s.state_dict())  # restorable


def test_zero_weights_can_be_saved_and_restored():
    s = Server(2, 1, rule="hedge", eta=1.0, alpha=0.0)
    for _ in range(3):
        s.update(np.array([[0.0], [1e150]]), np.zeros(1))
    assert s.weights[1] == 0.0 and s.weights[0] == 1.0  # the step was clipped to 1e300: exp underflows to 0
    state = s.state_dict()
    state["log_weights"] = np.array([0.0, -np.inf])  # an exactly zero weight
    other = Server(2, 1, rule="hedge", eta=1.0, alpha=0.0)
    other.load_state_dict(state)
    assert other.log_weights[1] == -np.inf
    other.update(np.ones((2, 1)), np.zeros(1))
    assert other.log_weights[1] == -np.inf and other.log_weights[0] == 0.0


def test_predict_returns_fresh_arrays_or_writes_out(rng):
    s = Server(5, 2)
    a = s.predict(rng.normal(size=(5, 2)))
    b = s.predict(rng.normal(size=(5, 2)))
    assert a is not b and not np.shares_memory(a, b)
    out = np.empty(2)
    assert s.predict(np.ones((5, 2)), out=out) is out
    np.testing.assert_allclose(out, 1.0)
    read_only = np.empty(2)
    read_only.flags.writeable = False
    for bad, error, got in ((np.empty(3), ValueError, r"ndarray float64 \(3,\)"), (read_only, ValueError, "read-only"),
                            (np.empty(2, dtype=np.float32), TypeError, "float32"), ((0.0, 0.0), TypeError, "tuple")):
        with pytest.raises(error, match=rf"out must be a writeable float64 numpy array of shape \(2,\), got .*{got}"):
            s.predict(np.ones((5, 2)), out=bad)
    np.testing.assert_allclose(out, 1.0)  # nothing written by the refused calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_writes_any_writeable_float64_out_on_every_backend(backend, rng):
    """``out`` may be strided, reversed, a column of a 2-D array or unaligned: the same bits as ``out=None``.

    The kernel writes the server's own buffer and predict copies d numbers out, as ``Population.step_predict``
    does. The Cython kernel refused a strided ``out`` with "ndarray is not C-contiguous" (naming no argument),
    and Numba compiled the kernel again for its type.
    """
    s = Server(7, 3, rule="eg", eta=0.4, backend=backend)
    x = rng.normal(size=(7, 3))
    s.update(x, np.ones(3))
    expected = s.predict(x)
    unaligned = np.frombuffer(bytearray(8 * 3 + 1), dtype=np.float64, count=3, offset=1)
    for out in (np.zeros(6)[::2], np.zeros(3)[::-1], np.zeros((3, 2))[:, 1], unaligned):
        assert s.predict(x, out=out) is out
        np.testing.assert_array_equal(out, expected)


def test_pickle_and_deepcopy(rng):
    import copy
    import pickle

    s = Server(50, 2, rule="eg", eta=0.3, alpha=0.02)
    s.update(rng.normal(size=(50, 2)), np.zeros(2))
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert clone.log_weights.tobytes() == s.log_weights.tobytes() and clone.n_updates == 1
        x = rng.normal(size=(50, 2))
        clone.update(x, np.ones(2))
    assert s.n_updates == 1  # the clones are independent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["hedge", "eg"])
def test_steps_beyond_the_clip_still_rank_the_clients(backend, rule):
    # MODEL.md section 5: p_i <- p_i exp(-eta g_i), normalised. A common shift of every g_i changes nothing, so when
    # every step exceeds 1e300 (clients at 1e150-1e151 from the target, eta = 1e3) the client with the smallest step
    # still takes the weight (the others are exp(-1e301) times smaller). A clip at 1e300 made them tie: uniform
    # weights. Only an overflowing step is clipped now (to the largest double).
    n = 5
    srv = Server(n, 1, rule=rule, eta=1e3, alpha=0.0, backend=backend)
    x = np.array([[3e150], [1e150], [2e150], [4e150], [5e150]])
    y = np.zeros(1)
    srv.update(x, y)
    # hedge: g_i = x_i^2; eg: g_i = 2 yhat x_i with yhat = mean x > 0. Either way client 1 has the smallest step.
    np.testing.assert_array_equal(srv.weights, np.eye(n)[1])
    # the steps' order beyond 1e300 holds near the largest double too (steps 1.8e308 / 25 .. 1.8e308)
    big = Server(n, 1, rule="hedge", eta=1.0, alpha=0.0, backend=backend)
    big.update(np.sqrt(np.finfo(float).max) * np.array([[0.6], [0.2], [0.4], [0.8], [1.0]]), y)
    np.testing.assert_array_equal(big.weights, np.eye(n)[1])


def _prior(rng, n, kind):
    """Normalised log-weights: uniform, spread over ~30 nats, or with some exact zeros."""
    if kind == "uniform":
        return np.full(n, -np.log(n))
    lp = rng.normal(0.0, 10.0, n)
    if kind == "zeros" and n > 1:
        lp[rng.random(n) < 0.3] = -np.inf
        lp[0] = 0.0 if np.isinf(lp).all() else lp[0]
    top = lp[np.isfinite(lp)].max()
    return lp - (top + np.log(np.exp(lp - top).sum()))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 24), d=st.sampled_from([1, 2]), rule=st.sampled_from(["hedge", "eg"]),
       alpha=st.sampled_from([0.0, 0.01]), log_eta=st.floats(-3.0, 308.0), log_step=st.one_of(st.floats(-6.0, 310.0), st.floats(300.0, 308.5)),
       spread=st.sampled_from([0.0, 0.003, 0.3, 3.0, 30.0]), prior=st.sampled_from(["uniform", "spread", "zeros"]))
def test_server_step_is_model_md_for_any_steps(backend, seed, n, d, rule, alpha, log_eta, log_step, spread, prior):
    """MODEL.md section 5's update in exact arithmetic, to the rounding of each step, for steps from 1e-6 to overflow.

    The largest step near 10^log_step (states at 10^((log_step - log_eta) / 2), within [1e-3, 1e160], from the target;
    each client's scale spread over 10^spread below it; eta up to 1e308): the steps reach every magnitude up to the
    largest double and beyond (an overflowing step counts as the largest double); half the examples put the largest
    step in [1e300, 3e308] (a clip at 1e300 fails there). See :func:`helpers.assert_server_step` for what is checked (order beyond rounding, clients far behind
    at exactly the fixed share, the weight ratios where the scores are known to 1e-3).
    """
    rng = np.random.default_rng(seed)
    eta = 10.0**log_eta
    log_scale = min(max((log_step - log_eta) / 2, -3.0), 160.0)
    scale = 10.0 ** (log_scale - rng.uniform(0.0, spread, (n, 1)))
    x = rng.choice([-1.0, 1.0], (n, d)) * rng.uniform(0.5, 1.0, (n, d)) * scale
    y = rng.normal(size=d) * 10.0 ** rng.uniform(-3.0, log_scale)
    srv = Server(n, d, rule=rule, eta=eta, alpha=alpha, backend=backend)
    lp = _prior(rng, n, prior)
    srv.load_state_dict(dict(srv.state_dict(), log_weights=lp))
    yhat = srv.predict(x)  # the very mixture update() computes (same kernel, same bits)
    srv.update(x, y)
    assert_server_step(lp, x, y, yhat, rule, eta, alpha, srv.log_weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflowing_step_counts_as_the_largest_double(backend):
    # eta g_i = inf is applied as DBL_MAX: such a client gets weight 0 beside any client whose step is at most
    # half the largest double (its log-weight is then larger by >= 9e307), and clients whose steps all overflow
    # tie (log p_i - DBL_MAX rounds to -DBL_MAX whenever log p_i > -1e292): the law stays proper, never NaN.
    y = np.zeros(1)
    srv = Server(4, 1, rule="hedge", eta=1e308, alpha=0.0, backend=backend)
    srv.update(np.array([[0.1], [0.5], [2.0], [3.0]]), y)  # steps 1e306, 2.5e307, inf, inf
    np.testing.assert_array_equal(srv.weights, [1.0, 0.0, 0.0, 0.0])
    for alpha in (0.0, 0.01):
        srv = Server(3, 1, rule="hedge", eta=1e308, alpha=alpha, backend=backend)
        srv.load_state_dict(dict(srv.state_dict(), log_weights=np.log([0.5, 0.3, 0.2])))
        srv.update(np.array([[2.0], [3.0], [4.0]]), y)  # every step overflows: they tie
        np.testing.assert_allclose(srv.weights, 1 / 3, rtol=1e-15)
    # eg: a step of -inf counts as -DBL_MAX (that client takes the weight)
    srv = Server(3, 2, rule="eg", eta=1e308, alpha=0.0, backend=backend)
    x = np.array([[-1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # y = 0: e = yhat - y = (1, 0), g = 2 <e, x_i - y> = [-2, 2, 6]
    srv.update(x, np.zeros(2))  # steps -inf, inf, inf
    np.testing.assert_array_equal(srv.weights, [1.0, 0.0, 0.0])
    # a dot product with overflowing terms of both signs (+-3.3e599 here) has no sign: inf, -inf (a fused multiply-add)
    # or NaN (taken as +inf) by the summation order, so the backends may differ; never NaN
    srv = Server(3, 2, rule="eg", eta=1.0, alpha=0.0, backend=backend)
    x = np.array([[1e300, 1e300], [1e300, -1e300], [-1e300, 1e300]])  # y = 0: e = (1e300 / 3, 1e300 / 3)
    srv.update(x, np.zeros(2))  # g_1 = 2 (3.3e599 + 3.3e599) = inf; g_2, g_3: 3.3e599 - 3.3e599
    assert not np.isnan(srv.log_weights).any()
    assert abs(srv.weights.sum() - 1.0) <= 1e-15, srv.weights  # one client takes the weight (-inf), or they tie
    # g_i is measured from y: steps that are equal in exact arithmetic (both 1e600 here) overflow alike and tie, where
    # 2 <yhat - y, x_i> gave the first client inf - inf and the second 0
    srv = Server(2, 2, rule="eg", eta=1.0, alpha=0.0, backend=backend)
    x = np.array([[1e300, 1e300], [0.0, 0.0]])  # y = (-1e9, 1e300): e = (5e299, -5e299), x_i - y = (1e300, 0), (1e9, -1e300)
    srv.update(x, np.array([-1e9, 1e300]))
    np.testing.assert_array_equal(srv.weights, [0.5, 0.5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eg_step_overflows_only_where_it_does(backend):
    """The eg step is clipped only where it overflows: not where a client of weight 0 is beyond the largest double
    from the target (its ``0 (x_i - y)`` was ``0 * inf = NaN``, so every step NaN, clipped alike), nor where ``2 e_j``
    alone does (Numba doubled ``e`` before the product), nor where ``e_j`` overflows and ``x_ij = y_j`` (``0 * inf``).
    """
    srv = Server(3, 2, rule="eg", eta=1.0, alpha=0.0, backend=backend)
    state = srv.state_dict()
    state["log_weights"] = np.array([-800.0, np.log(0.5), np.log(0.5)])  # client 0: weight 0 (exp underflows)
    srv.load_state_dict(state)
    x = np.array([[1.7e308, 5.0], [-2e307, 0.0], [-2e307, 1.0]])  # x_0 - y = (inf, 5)
    srv.update(x, np.array([-2e307, 0.0]))  # e = (0, 0.5): g = (., 0, 1)
    np.testing.assert_allclose(srv.weights, [0.0, 1 / (1 + np.exp(-1.0)), np.exp(-1.0) / (1 + np.exp(-1.0))], rtol=1e-15)
    srv = Server(2, 1, rule="eg", eta=1e-300, alpha=0.0, backend=backend)
    state = srv.state_dict()
    state["log_weights"] = np.log([0.99, 0.01])
    srv.load_state_dict(state)
    srv.update(np.array([[1.7e308], [1e-10]]), np.zeros(1))  # e = 1.68e308: steps inf (clipped) and 3.4e-2
    np.testing.assert_array_equal(srv.weights, [0.0, 1.0])
    srv = Server(3, 2, rule="eg", eta=1.0, alpha=0.0, backend=backend)
    srv.update(np.array([[1.7e308, 1.0], [-2e307, 0.0], [-2e307, 1.0]]), np.array([-2e307, 0.0]))  # e = (inf, 2/3)
    w = np.exp(-4 / 3)  # g = (inf, 0, 4/3): client 0's step clipped, 1 and 2 kept apart
    np.testing.assert_allclose(srv.weights, [0.0, 1 / (1 + w), w / (1 + w)], rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["eg", "hedge"])
def test_a_common_shift_of_states_and_targets_changes_no_weight(backend, rule):
    """In exact arithmetic the update sees differences only (eg: a shift adds one term to every ``g_i``, which the
    normalisation removes); with ``x + b`` and ``y + b`` exact (a grid of 2^-10, b a power of two) the weights must
    not move: bitwise, as the update computes the differences exactly. eg's ``2 <yhat - y, x_i>`` from a rounded
    ``yhat`` moved the log-weights by 4e-9 at b = 2^20 already.
    """
    rng = np.random.default_rng(21)
    T, n, d = 40, 64, 2
    truth = np.round(np.cumsum(rng.normal(size=(T, d)), axis=0) * 0.1 * 1024) / 1024
    x = np.round((truth[:, None, :] + rng.normal(size=(T, n, d)) * np.linspace(0.05, 1, n)[None, :, None]) * 1024) / 1024
    ref = Server(n, d, rule=rule, eta=0.5, alpha=0.01, backend=backend)
    for t in range(T - 1):
        ref.update(x[t], truth[t + 1])
    for b in (2.0**20, 2.0**40):
        assert np.array_equal((x + b) - b, x) and np.array_equal((truth + b) - b, truth)  # the shifted inputs are exact
        srv = Server(n, d, rule=rule, eta=0.5, alpha=0.01, backend=backend)
        for t in range(T - 1):
            srv.update(x[t] + b, truth[t + 1] + b)
        np.testing.assert_array_equal(srv.log_weights, ref.log_weights, err_msg=f"b = {b:g}")  # bitwise
