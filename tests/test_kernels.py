"""Every compiled kernel module against the NumPy reference (the specification).

The backends under test are the modules ``memoa_fast.kernels._numba`` and
``_cython`` that implement the current contract (:func:`helpers.kernel_backends`:
they have ``signal_pass``). Each public kernel is compared with
:mod:`memoa_fast.kernels._reference` on random populations drawn by
hypothesis (structure) and NumPy (arrays): K in {1, 3, 16} classes, d in
{1, 3, 4, 16}, N at the chunk boundaries (1, 2, CHUNK - 1, CHUNK + 1,
3 CHUNK + 1) and one large N, invalid signal rows (NaN, inf, finite but over
``SIGNAL_LIMIT``, 1e308) at fractions 0, 0.05 and 1, one and two threads.

Tolerance: ``1e-12`` relative to the magnitude of the terms that were summed
(:func:`helpers.assert_close`); the magnitudes are computed by running the
reference on absolute values. Bitwise: the two-pass API (what a Dask shard
runs) equals ``fused_step``; one thread equals two.

The server: weights sum to 1 within 1e-12 and are never NaN, for losses
from 1e-300 to 1e308 in magnitude, including the reproducers of issue 8
(items 1-3). The vectorised ``exp``/``log`` of each backend are checked in
ulps against the exact value (``numpy.longdouble``).
"""

import math

import numpy as np
import pytest
from helpers import (
    CLASSES,
    DIMS,
    EDGE_N,
    EXTENDED,
    LARGE_N,
    assert_close,
    assert_server_step,
    classes,
    invalidate_rows,
    kernel_backends,
    log_weights,
    new_work,
    population,
    thread_counts,
    ulps_from_exact,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memoa_fast.kernels import CHUNK, GAIN, KAPPA, SIGNAL, SIZE, Q, R, _reference, layout

BACKENDS = kernel_backends()
if not BACKENDS:  # pragma: no cover
    pytest.skip("no compiled kernel module implements the current contract", allow_module_level=True)

SIZES = [*EDGE_N, LARGE_N]
PUBLIC = ("signal_pass", "merge_signals", "move_pass", "merge_move", "fold_rows", "fused_step", "mixture_predict",
          "mixture_reweight", "merge_log_sum_exp", "mixture_share", "mixture_update", "max_threads")
FEW = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ONE = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)


def _settings_for(n):
    return ONE if n >= LARGE_N else FEW


def _threads(data, name):
    return data.draw(st.sampled_from(thread_counts(name, BACKENDS[name])), label="threads")


# --------------------------------------------------------------------------- population step
def two_pass(mod, P, have_mean, predict, discount, threads):
    """The Dask shard's path: signal_pass, merge_signals, move_pass, merge_move (and fold_rows), on copies."""
    x, J, field, lay = P["x"].copy(), P["J"].copy(), P["field"].copy(), P["lay"]
    n, d = x.shape
    log_p = P["log_p"] if predict else np.empty(0)
    yhat = np.full(d, np.nan)
    work = new_work(n, lay)
    mod.signal_pass(x, P["s"], P["labels"], work, lay, not have_mean, threads)
    n_valid = mod.merge_signals(work, lay, P["coef"], P["mix"], field, not have_mean)
    mod.move_pass(x, P["s"], P["labels"], J, work, lay, P["coef"], field, discount, log_p, threads)
    max_j, arg = mod.merge_move(work, lay, P["coef"], field, predict, yhat)
    folded = np.full(lay.width, np.nan)
    mod.fold_rows(work, lay, folded)
    return dict(stats=(n_valid, max_j, arg), x=x, J=J, field=field, yhat=yhat, work=work, folded=folded)


def _read_only(a):
    view = a.view()
    view.flags.writeable = False
    return view


def fused(mod, P, have_mean, predict, discount, threads):
    """``fused_step`` on copies, with the array types a Population hands it.

    The mixing table and the log-weights are read-only there (``Game.table``, ``Server.log_weights``): Numba
    compiles one specialisation per tuple of argument types, so writeable ones here would compile a second
    fused step that no user runs (13-21 s of the suite's cold start) and leave the users' one untested.
    """
    x, J, field, lay = P["x"].copy(), P["J"].copy(), P["field"].copy(), P["lay"]
    n, d = x.shape
    yhat = np.full(d, np.nan)
    work = new_work(n, lay)
    log_p = P["log_p"] if predict else np.empty(0)
    stats = mod.fused_step(x, P["s"], P["labels"], J, work, lay, P["coef"], _read_only(P["mix"]), field, have_mean, discount,
                           _read_only(log_p), yhat, threads)
    return dict(stats=stats, x=x, J=J, field=field, yhat=yhat, work=work)


def magnitudes(P, have_mean):
    """Magnitudes of the summed terms behind every output: the reference run on absolute values.

    Returns ``(field, x, J, next_rows)``: the field of the absolute run (class
    and global means, offsets), per-agent magnitudes of ``x(t+1)`` and of the
    updated cost, and per-class means of the state magnitudes.
    """
    lay, n = P["lay"], P["x"].shape[0]
    K = lay.n_classes
    A = dict(P, x=np.abs(P["x"]), s=np.abs(P["s"]), mix=np.abs(P["mix"]), field=np.abs(P["field"]))
    with np.errstate(invalid="ignore"):
        mag_field = two_pass(_reference, A, have_mean, False, 1.0, 1)["field"]
    cls = classes(P["labels"], n)
    ok = _reference.valid_rows(P["s"])
    s_ok = np.where(ok[:, None], np.abs(P["s"]), 0.0)
    table = P["coef"][cls]
    off = mag_field[lay.offset:lay.offset + K][cls]
    m = mag_field[lay.field_state]
    ax = np.abs(P["x"])
    gain, weight = table[:, GAIN:GAIN + 1], np.abs(table[:, SIGNAL:SIGNAL + 1])
    mag_u = np.where(ok[:, None], gain * (ax + weight * s_ok + off), 0.0)
    mag_x = ax + mag_u
    mag_cost = (table[:, Q] * ((ax + s_ok) ** 2).sum(1) + table[:, KAPPA] * ((ax + m) ** 2).sum(1)
                + table[:, R] * (mag_u**2).sum(1))
    mag_J = np.abs(P["J"]) + 0.5 * mag_cost
    sizes = P["coef"][:, SIZE]
    next_rows = np.array([mag_x[cls == l].sum(0) / max(sizes[l], 1.0) for l in range(K)])
    return mag_field, mag_x, mag_J, next_rows


def reference_step(P, have_mean, predict, discount):
    """What :func:`check_step` compares a backend with: the reference's step and the magnitudes behind its outputs."""
    return two_pass(_reference, P, have_mean, predict, discount, 1), magnitudes(P, have_mean)


def check_step(mod, P, have_mean, predict, discount, threads, expected=None):
    """One population step of ``mod`` against the reference: two-pass API and fused_step, bitwise equal to each other.

    ``expected``: :func:`reference_step` of the same arguments, when already computed (it depends on no backend).
    """
    lay = P["lay"]
    K = lay.n_classes
    got = two_pass(mod, P, have_mean, predict, discount, threads)
    one = fused(mod, P, have_mean, predict, discount, threads)
    ref, (mag_field, mag_x, mag_J, next_rows) = reference_step(P, have_mean, predict, discount) if expected is None else expected

    # fused_step runs the same chunk and merge functions as the two-pass API
    assert one["stats"] == got["stats"]
    for key in ("x", "J", "field", "yhat", "work"):
        assert one[key].tobytes() == got[key].tobytes(), f"fused_step and the two-pass API differ in {key}"

    n_valid, max_j, arg = got["stats"]
    assert type(n_valid) is int and type(max_j) is float and type(arg) is int
    assert n_valid == ref["stats"][0] == int(_reference.valid_rows(P["s"]).sum())
    counts = slice(lay.count, lay.count + K)
    assert got["work"][:, counts].tobytes() == ref["work"][:, counts].tobytes(), "per-chunk valid counts"

    f, rf = got["field"], ref["field"]
    rows = [("class signal means", slice(lay.class_signal, lay.class_signal + K)),
            ("signal mean", slice(lay.field_signal, lay.field_signal + 1)),
            ("class state means m_l(t)", slice(lay.class_state, lay.class_state + K)),
            ("state mean m(t)", slice(lay.field_state, lay.field_state + 1)),
            ("class offsets", slice(lay.offset, lay.offset + K))]
    for what, r in rows:
        assert_close(f[r], rf[r], mag_field[r], what)
    if n_valid == 0:  # no valid signal: the signal means are left as they were, bit for bit
        sig = slice(lay.class_signal, lay.class_signal + K)
        assert f[sig].tobytes() == P["field"][sig].tobytes()
        assert f[lay.field_signal].tobytes() == P["field"][lay.field_signal].tobytes()
    if have_mean:
        r = slice(lay.class_state, lay.class_state + K)
        assert f[r].tobytes() == P["field"][r].tobytes(), "m_l(t) was given: it must not change"

    ok = _reference.valid_rows(P["s"])
    assert_close(got["x"], ref["x"], mag_x, "x(t+1)")
    assert (got["x"][~ok] == P["x"][~ok]).all(), "an agent without a valid signal holds"
    assert_close(got["J"], ref["J"], mag_J, "J(t+1)")
    assert np.isfinite(got["x"]).all() and np.isfinite(got["J"]).all(), "a bad signal reached a state or a cost"
    assert np.isfinite(f[lay.class_signal:lay.field_rows]).all()
    cls_next = slice(lay.class_next, lay.class_next + K)
    assert_close(f[cls_next], rf[cls_next], next_rows, "class means m_l(t+1)")
    assert_close(f[lay.field_next], rf[lay.field_next], mag_x.mean(0), "m(t+1)")
    if predict:
        assert_close(got["yhat"], ref["yhat"], np.exp(P["log_p"]) @ mag_x, "yhat(t+1)")
    else:
        assert np.isnan(got["yhat"]).all(), "no log-weights: yhat must be left alone"
    assert arg == int(np.argmax(got["J"])) and max_j == got["J"][arg], "worst agent: first on ties"
    assert_close(np.float64(max_j), np.float64(ref["stats"][1]), mag_J.max(), "max J")
    # fold_rows: sums of the rows in row order, and the worst row
    expected = np.full(lay.width, np.nan)
    _reference.fold_rows(got["work"], lay, expected)
    assert_close(got["folded"], expected, np.abs(got["work"]).sum(0), "fold_rows")
    assert got["folded"][lay.arg_cost] == arg



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_population_kernels_match_reference(backend, n):
    """Two-pass API and fused_step against the reference; the two paths bitwise equal."""
    mod = BACKENDS[backend]

    @_settings_for(n)
    @given(data=st.data(), seed=seeds, K=st.sampled_from(CLASSES), d=st.sampled_from(DIMS),
           bad_fraction=st.sampled_from([0.0, 0.05, 1.0]), have_mean=st.booleans(), predict=st.booleans(),
           discount=st.floats(0.01, 1.0))
    def check(data, seed, K, d, bad_fraction, have_mean, predict, discount):
        threads = _threads(data, backend)
        empty_labels = K > 1 and data.draw(st.integers(0, 5), label="labels") == 0
        P = population(seed, n, d, K, bad_fraction, empty_labels)
        check_step(mod, P, have_mean, predict, discount, threads)

    check()


_REFERENCE_STEPS = {}  # test_class_paths_match_reference's reference steps, one per case, shared by the backends


def _shared_reference(key, P, have_mean, predict, discount):
    """:func:`reference_step` computed once per ``key`` (the reference, NumPy, is 3/4 of a case's time), for the same inputs.

    Every backend of a case draws the same population (a seeded draw); the inputs are compared byte for byte with
    those the stored reference was computed from, so a reference is never reused for other inputs.
    """
    inputs = b"".join(np.ascontiguousarray(P[name]).tobytes() for name in ("x", "s", "labels", "J", "coef", "mix", "field", "log_p"))
    if key not in _REFERENCE_STEPS:
        ref, mags = reference_step(P, have_mean, predict, discount)
        for a in (*ref.values(), *mags):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False  # shared: no check may change it for the next backend
        _REFERENCE_STEPS[key] = inputs, (ref, mags)
    stored, expected = _REFERENCE_STEPS[key]
    assert stored == inputs, f"{key}: the population drawn differs from the one the reference step was computed for"
    return expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [16, 70])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("order", ["random", "sorted"])
@pytest.mark.parametrize("bad_fraction", [0.0, 0.05])
def test_class_paths_match_reference(backend, K, d, order, bad_fraction):
    """Every K-class path against the reference, each drawn for sure (the hypothesis test samples them).

    K = 16 (interleaved class accumulators) and 70 (one copy), every d (d = 4
    has its own unrolled loops), labels in random order and sorted (long runs
    of one class), every signal valid (the chunk-wide fast paths) or 5% invalid
    (the per-row checks); one and two threads, the second bitwise equal to the first.
    """
    mod = BACKENDS[backend]
    P = population(K * 1000 + d, 3 * CHUNK + 1, d, K, bad_fraction)
    if order == "sorted":
        P["labels"] = np.sort(P["labels"])
    for have_mean in (False, True):
        check_step(mod, P, have_mean, predict=have_mean, discount=0.7, threads=1,
                   expected=_shared_reference((K, d, order, bad_fraction, have_mean), P, have_mean, predict=have_mean, discount=0.7))
    counts = thread_counts(backend, mod)
    if counts != (1,):
        one, two = fused(mod, P, True, False, 0.7, 1), fused(mod, P, True, False, 0.7, max(counts))
        for key in ("x", "J", "field", "work"):
            assert one[key].tobytes() == two[key].tobytes(), f"{key}: threads={max(counts)} differs from threads=1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_worst_agent_ties_go_to_the_first_index(backend):
    mod = BACKENDS[backend]
    n, d = 3 * CHUNK + 1, 2
    P = population(1, n, d, 1, 0.0)
    P["J"] = np.zeros(n)
    P["J"][[CHUNK + 3, 5, 2 * CHUNK, n - 1]] = 2.0  # ties within and across chunks
    for threads in thread_counts(backend, mod):
        got = fused(mod, P, True, False, 0.0, threads)  # discount 0: the costs do not move
        assert got["stats"][1:] == (2.0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_limit_keeps_the_mean_field_finite(backend):
    """Finite but huge signals (up to 1e308) are invalid rows: they never reach a mean, a state or a cost."""
    mod = BACKENDS[backend]
    n, d = 2 * CHUNK + 5, 3
    P = population(4, n, d, 3, 0.0)
    P["s"][::3] = 1e308
    P["s"][1::7, 1] = -1e200
    P["s"][2] = 1e50  # exactly the limit: valid
    got = fused(mod, P, False, True, 0.9, 1)
    lay = P["lay"]
    ok = _reference.valid_rows(P["s"])
    assert got["stats"][0] == ok.sum() and ok[2]
    assert np.isfinite(got["field"]).all() and np.isfinite(got["x"]).all() and np.isfinite(got["J"]).all()
    assert (got["x"][~ok] == P["x"][~ok]).all()
    assert np.isfinite(got["yhat"]).all() and lay.n_classes == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 4, 16])
def test_one_class_valid_signals_near_the_limit(backend, d):
    """K = 1: valid signals between ``SIGNAL_LIMIT / (2 CHUNK)`` and ``SIGNAL_LIMIT`` count, and match the reference.

    The Numba pass 1 proves a chunk valid with a cheap bound (every ``|s|`` at
    most ``SIGNAL_LIMIT / (2 CHUNK)``) and runs the exact lane test only when
    that fails: chunk 0 holds one such signal (the exact test passes), chunk 1
    several hundred in one column (a lane's magnitudes sum over the limit: row by
    row), chunk 2 one signal exactly at the limit.
    """
    mod = BACKENDS[backend]
    n = 3 * CHUNK + 1
    P = population(7 + d, n, d, 1, 0.0, empty_labels=True)
    P["s"][5, d - 1] = -1e48
    P["s"][CHUNK:CHUNK + 700, 0] = 0.9e50 * np.where(np.arange(700) % 2 == 0, 1.0, -1.0)
    P["s"][2 * CHUNK + 9, 0] = 1e50
    assert _reference.valid_rows(P["s"]).all()
    for threads in thread_counts(backend, mod):
        for have_mean in (False, True):
            check_step(mod, P, have_mean, True, 0.9, threads)
            assert fused(mod, P, have_mean, False, 0.9, threads)["stats"][0] == n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 3, 16])
def test_one_class_chunks_all_valid_beside_chunks_with_an_invalid_row(backend, d):
    """K = 1: each chunk takes its own path, and the step matches the reference whatever its neighbours do.

    The compiled passes prove a chunk all valid in the read that sums it, and pass 2 then moves it
    without checking its rows (pass 1's count); a chunk holding one invalid value is summed and moved
    block by block. Chunk 0 is all valid; chunk 1 has one NaN in the last row of a block; chunk 2 one
    signal just over the limit in its first row; the short last chunk is all valid. One and two
    threads, the second bitwise equal to the first.
    """
    mod = BACKENDS[backend]
    n = 3 * CHUNK + 5
    P = population(40 + d, n, d, 1, 0.0, empty_labels=True)
    block = max(1, 256 // d)
    P["s"][CHUNK + block - 1, d - 1] = np.nan
    P["s"][2 * CHUNK, 0] = -1.0000001e50
    ok = _reference.valid_rows(P["s"])
    assert ok.sum() == n - 2
    for have_mean in (False, True):
        check_step(mod, P, have_mean, True, 0.8, 1)
    counts = thread_counts(backend, mod)
    one = fused(mod, P, True, True, 0.8, 1)
    assert one["stats"][0] == n - 2
    for threads in counts:
        other = fused(mod, P, True, True, 0.8, threads)
        for key in ("x", "J", "field", "yhat", "work"):
            assert one[key].tobytes() == other[key].tobytes(), f"{key}: threads={threads} differs from threads=1"


# --------------------------------------------------------------------------- server
def _server_reference(log_p, x, y, err, rule, eta, alpha, lay):
    """The reference update in its three steps; returns (stepped log-weights, top, log_total, final)."""
    out = log_p.copy()
    work = new_work(x.shape[0], lay)
    with np.errstate(all="ignore"):
        _reference.mixture_reweight(out, x, y, err, rule, eta, work, lay, 1)
        stepped = out.copy()
        top, log_total = _reference.merge_log_sum_exp(work, lay)
        _reference.mixture_share(out, top, log_total, alpha, x.shape[0], 1)
    return stepped, top, log_total, out


def _server_both_ways(mod, log_p, x, y, err, rule, eta, alpha, lay, threads):
    """mixture_update, and reweight + merge + share (a shard's path); asserts they agree bitwise."""
    n = x.shape[0]
    one = log_p.copy()
    mod.mixture_update(one, x, y, err, rule, eta, alpha, new_work(n, lay), lay, threads)
    parts = log_p.copy()
    work = new_work(n, lay)
    mod.mixture_reweight(parts, x, y, err, rule, eta, work, lay, threads)
    stepped = parts.copy()
    top, log_total = mod.merge_log_sum_exp(work, lay)
    assert type(top) is float and type(log_total) is float
    mod.mixture_share(parts, top, log_total, alpha, n, threads)
    assert one.tobytes() == parts.tobytes(), "mixture_update differs from reweight + merge_log_sum_exp + share"
    return stepped, top, log_total, one


def _assert_normalised(log_p, alpha, what):
    assert not np.isnan(log_p).any(), f"{what}: NaN log-weight"
    total = np.exp(log_p).sum()
    assert abs(total - 1.0) <= 1e-12, f"{what}: weights sum to {total!r}"
    if alpha > 0.0:
        floor = np.log(alpha / log_p.shape[0])
        assert log_p.min() >= floor - 1e-12 * abs(floor), f"{what}: fixed share keeps every weight >= alpha/N"


def _step_magnitude(x, y, err, rule, eta):
    if eta == 0.0:
        return np.zeros(x.shape[0])
    with np.errstate(over="ignore"):
        if rule == _reference.RULE_EG:
            loss = 2.0 * (np.abs(x - y) @ np.abs(err))
        else:
            loss = ((np.abs(x) + np.abs(y)) ** 2).sum(1)
        return np.minimum(eta * loss, _reference.STEP_LIMIT)  # an overflowing step is applied as the largest double


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_server_kernels_match_reference(backend, n):
    mod = BACKENDS[backend]

    @_settings_for(n)
    @given(data=st.data(), seed=seeds, d=st.sampled_from(DIMS), rule=st.sampled_from([0, 1]),
           eta=st.sampled_from([0.0, 0.05, 1.0, 50.0]), alpha=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
           spread=st.sampled_from([0.0, 1.0, 30.0, 300.0]))
    def check(data, seed, d, rule, eta, alpha, spread):
        threads = _threads(data, backend)
        rng = np.random.default_rng(seed)
        lay = layout(1, d)
        scale = 10.0 ** rng.uniform(-3, 3)
        x = rng.normal(rng.normal(size=d), 1.0, size=(n, d)) * scale
        y = rng.normal(size=d) * scale
        log_p = log_weights(rng, n, spread)

        yhat = np.full(d, np.nan)
        mod.mixture_predict(log_p, x, new_work(n, lay), lay, yhat, threads)
        expected = np.empty(d)
        _reference.mixture_predict(log_p, x, None, lay, expected, 1)
        assert_close(yhat, expected, np.exp(log_p) @ np.abs(x), "mixture_predict")
        # eg's mixture error sum_i p_i (x_i - y): predict with a centre
        err = np.full(d, np.nan)
        mod.mixture_predict(log_p, x, new_work(n, lay), lay, err, threads, y)
        expected = np.empty(d)
        _reference.mixture_predict(log_p, x, None, lay, expected, 1, y)
        assert_close(err, expected, np.exp(log_p) @ np.abs(x - y), "mixture_predict with a centre")

        stepped, top, log_total, got = _server_both_ways(mod, log_p, x, y, expected, rule, eta, alpha, lay, threads)
        r_stepped, r_top, r_log_total, ref = _server_reference(log_p, x, y, expected, rule, eta, alpha, lay)
        mag = np.abs(log_p) + _step_magnitude(x, y, expected, rule, eta)
        assert_close(stepped, r_stepped, mag, "stepped log-weights")
        assert_close(np.float64(top), np.float64(r_top), mag.max(), "log-sum-exp top")
        assert_close(np.float64(log_total), np.float64(r_log_total), 1.0 + mag.max(), "log_total")
        assert_close(got, ref, mag + abs(r_top) + 1.0, "log-weights")
        _assert_normalised(got, alpha, "mixture_update")

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, k=st.integers(-300, 308), d=st.sampled_from([1, 3]), rule=st.sampled_from([0, 1]),
       eta=st.sampled_from([1e-3, 1.0, 10.0, 1e300]), alpha=st.sampled_from([0.0, 0.125, 1.0]),
       n=st.sampled_from([2, 3, 9, 1000, CHUNK + 1]), tied=st.booleans())
def test_server_weights_stay_normalised_for_any_loss(backend, seed, k, d, rule, eta, alpha, n, tied):
    """Losses from 1e-300 to 1e308 (and overflowing ones): weights sum to 1 within 1e-12, never NaN."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(seed)
    lay = layout(1, d)
    root = 10.0 ** (k / 2)
    x = np.full((n, d), root) if tied else root * rng.uniform(0.5, 1.5, (n, d)) * rng.choice([-1.0, 1.0], (n, d))
    y = np.zeros(d)
    log_p = np.full(n, -np.log(n))
    for step in range(2):  # an overflowing update must not poison the next one (issue 8 item 2)
        yhat = np.empty(d)  # eg's mixture error yhat - y (y = 0)
        mod.mixture_predict(log_p, x, new_work(n, lay), lay, yhat, 1, y)
        assert np.isfinite(yhat).all()
        _, _, _, got = _server_both_ways(mod, log_p, x, y, yhat, rule, eta, alpha, lay, 1)
        _assert_normalised(got, alpha, f"update {step}")
        if d == 1:  # one term per loss: no summation order, so the reference must agree
            r_stepped, r_top, _, ref = _server_reference(log_p, x, y, yhat, rule, eta, alpha, lay)
            with np.errstate(over="ignore"):  # steps up to 1.8e308 (only an overflow is clipped): the scale may be inf
                scale = np.abs(r_stepped) + abs(r_top) + 1.0
            assert_close(got, ref, scale, "log-weights")
            # the scale above is inf (any value passes) where a stepped log-weight is -inf or near -1.8e308: the
            # weights themselves must agree to rounding
            assert_close(np.exp(got), np.exp(ref), 1.0, "weights")
        if tied and step == 0:
            assert_close(got, np.full(n, -np.log(n)), 1.0, "tied losses keep uniform weights (issue 8 item 1)")
        log_p = got
        x = rng.normal(size=(n, d))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=seeds, n=st.sampled_from([3, CHUNK + 5, 2 * CHUNK + 1]), rule=st.sampled_from(["hedge", "eg"]),
       alpha=st.sampled_from([0.0, 0.01]), log_step=st.floats(295.0, 309.0), spread=st.sampled_from([0.01, 1.0, 20.0]))
def test_server_kernels_rank_steps_up_to_the_largest_double(backend, data, seed, n, rule, alpha, log_step, spread):
    """Steps of 10^(log_step - spread) .. 10^log_step (past the largest double: overflow), eg's of both signs,
    over several chunks (chunk tops of +-1.8e308: top_c - top and log p - top overflow to -inf, never NaN), 1 or 2
    threads: MODEL.md's update in exact arithmetic to the rounding of each step (:func:`helpers.assert_server_step`),
    through ``mixture_update`` and through the Dask shard's reweight + merge + share.
    """
    mod = _reference if backend == "reference" else BACKENDS[backend]
    threads = 1 if backend == "reference" else _threads(data, backend)
    rng = np.random.default_rng(seed)
    lay = layout(1, 1)
    e = log_step - rng.uniform(0.0, spread, (n, 1))
    if rule == "eg":  # g_i = 2 <yhat - y, x_i - y> = 2 x_i, of either sign (overflowing past 1.8e308); err = yhat - y = 1
        x, y, yhat = rng.choice([-1.0, 1.0], (n, 1)) * 10.0 ** np.minimum(e - math.log10(2.0), 308.2), np.zeros(1), np.ones(1)
    else:
        x, y, yhat = 10.0 ** (e / 2), np.zeros(1), np.zeros(1)
    log_p = log_weights(rng, n, 5.0)
    code = _reference.RULE_EG if rule == "eg" else _reference.RULE_HEDGE
    if backend == "reference":
        got = _server_reference(log_p, x, y, yhat, code, 1.0, alpha, lay)[3]
    else:  # also the Dask shard's path (reweight, merge, share), bitwise the same
        got = _server_both_ways(mod, log_p, x, y, yhat, code, 1.0, alpha, lay, threads)[3]
    assert_server_step(log_p, x, y, yhat, rule, 1.0, alpha, got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 3])
def test_centred_predict_adds_nothing_for_a_zero_weight(backend, d):
    """A client of weight 0 adds 0 to ``sum_i p_i (x_i - centre)`` as it does to ``sum_i p_i x_i``, also where
    ``x_i - centre`` overflows (``0 * inf`` gave NaN: eg's error, so every step, NaN); two chunks, every thread count.
    """
    mod = BACKENDS[backend]
    n, lay = CHUNK + 3, layout(1, d)
    x = np.tile(np.arange(n, dtype=float)[:, None] % 7, (1, d))
    dead = [1, CHUNK + 1]  # one in each chunk: weight 0 (log -inf, and an exp that underflows)
    x[dead] = 1.7e308
    log_p = np.full(n, -np.log(n - 2))
    log_p[dead] = [-np.inf, -800.0]
    centre = np.full(d, -2e307)  # x - centre = 1.9e308: inf for the dead clients only
    live = np.exp(log_p) != 0
    expected = np.exp(log_p[live]) @ (x[live] - centre)
    for threads in thread_counts(backend, mod):
        out = np.full(d, np.nan)
        mod.mixture_predict(log_p, x, new_work(n, lay), lay, out, threads, centre)
        assert_close(out, expected, np.exp(log_p[live]) @ np.abs(x[live] - centre), f"threads={threads}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue8_server_reproducers(backend):
    """Issue 8 items 1-3 at the kernel level (the Server calls exactly these kernels)."""
    mod = BACKENDS[backend]
    lay = layout(1, 1)

    def update(log_p, x, y, rule, eta, alpha):  # as Server.update
        err = np.empty(x.shape[1])
        mod.mixture_predict(log_p, x, new_work(x.shape[0], lay), lay, err, 1, y)
        mod.mixture_update(log_p, x, y, err, rule, eta, alpha, new_work(x.shape[0], lay), lay, 1)
        _assert_normalised(log_p, alpha, "reproducer")
        return log_p

    # item 1: Server(3, 1, rule="hedge", eta=1).update(full((3, 1), 1e9), zeros(1)) gave weights [1, 1, 1]
    log_p = update(np.full(3, -np.log(3)), np.full((3, 1), 1e9), np.zeros(1), _reference.RULE_HEDGE, 1.0, 0.0)
    yhat = np.empty(1)
    mod.mixture_predict(log_p, np.ones((3, 1)), new_work(3, lay), lay, yhat, 1)
    assert abs(yhat[0] - 1.0) <= 1e-12
    # item 1, 1000 clients all off by 1e4
    rng = np.random.default_rng(8)
    states = 1e4 + rng.uniform(0, 1e-3, (1000, 1))
    update(np.full(1000, -np.log(1000)), states, np.zeros(1), _reference.RULE_HEDGE, 1.0, 0.0)
    # item 2: an overflowing loss, then an ordinary one: no NaN, even with alpha > 0
    for rule in (_reference.RULE_EG, _reference.RULE_HEDGE):
        log_p = update(np.full(2, -np.log(2)), np.array([[1e200], [2e200]]), np.zeros(1), rule, 1.0, 0.01)
        update(log_p, np.ones((2, 1)), np.zeros(1), rule, 1.0, 0.01)
    # item 3: 9 clients at 458, eg, eta 10, alpha 0.125, target 0: the weights stay uniform
    log_p = update(np.full(9, -np.log(9)), np.full((9, 1), 458.0), np.zeros(1), _reference.RULE_EG, 10.0, 0.125)
    assert_close(log_p, np.full(9, -np.log(9)), 1.0, "uniform weights")


# --------------------------------------------------------------------------- determinism
def _everything(mod, P, threads):
    """Bytes of every output of every public kernel on one input."""
    lay, n, d = P["lay"], *P["x"].shape
    out = {}
    for have_mean, predict in ((False, True), (True, False)):
        got = two_pass(mod, P, have_mean, predict, 0.9, threads)
        out["two_pass", have_mean] = (got["stats"], *(got[k].tobytes() for k in ("x", "J", "field", "yhat", "folded")))
        got = fused(mod, P, have_mean, predict, 0.9, threads)
        out["fused", have_mean] = (got["stats"], *(got[k].tobytes() for k in ("x", "J", "field", "yhat")))
    yhat = np.empty(d)
    mod.mixture_predict(P["log_p"], P["x"], new_work(n, lay), lay, yhat, threads)
    out["predict"] = yhat.tobytes()
    err = np.empty(d)
    mod.mixture_predict(P["log_p"], P["x"], new_work(n, lay), lay, err, threads, np.ones(d))
    out["predict centred"] = err.tobytes()
    for rule in (0, 1):
        for alpha in (0.0, 0.01):
            log_p = P["log_p"].copy()
            mod.mixture_update(log_p, P["x"], np.ones(d), err, rule, 50.0, alpha, new_work(n, lay), lay, threads)
            out["update", rule, alpha] = log_p.tobytes()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,K", [(3 * CHUNK + 1, 1), (3 * CHUNK + 1, 3), (LARGE_N, 1)])
def test_bitwise_independent_of_thread_count(backend, n, K):
    mod = BACKENDS[backend]
    counts = thread_counts(backend, mod)
    if counts == (1,):
        pytest.skip(f"{backend} cannot run two threads here")
    P = population(2024, n, 4, K, 0.05)
    one = _everything(mod, P, 1)
    assert _everything(mod, P, 2) == one, "threads=2 differs from threads=1"
    assert _everything(mod, P, 2) == one, "threads=2 is not reproducible"


# --------------------------------------------------------------------------- vectorised exp and log
def _vector_math(mod):
    """``(exp, log)`` of a backend's vectorised kernels as ``f(src, out)``, or None where it has none."""
    if hasattr(mod, "_exp_array"):
        return mod._exp_array, mod._log_array
    if hasattr(mod, "_exp_into") and hasattr(mod, "_log_into"):
        return (lambda a, o: mod._exp_into(a, o, np.empty(2 * a.size)),
                lambda a, o: mod._log_into(a, o, np.empty(2 * a.size)))
    return None


def _math_backends():
    return {name: f for name, mod in BACKENDS.items() if (f := _vector_math(mod)) is not None}


@pytest.mark.skipif(not EXTENDED, reason="numpy.longdouble is no wider than float64 here: no exact reference")
@pytest.mark.parametrize("backend", _math_backends())
def test_vectorised_exp_within_one_ulp_of_the_exact_value(backend):
    """Exp within 1 ulp of the exact value (``numpy.longdouble``) where the result is normal.

    Within one subnormal step below that; specials as ``numpy.exp``. Measured: 0.85 ulp. Against ``numpy.exp``
    itself the distance depends on NumPy's version (NumPy 1.26's ``exp`` is 1.5 ulp off: the two differ by up to 2).
    """
    exp, _ = _math_backends()[backend]
    rng = np.random.default_rng(31)
    x = np.concatenate([rng.uniform(-745.1, 709.78, 400_000), rng.uniform(-1.0, 1.0, 100_000),
                        rng.uniform(-708.5, -700.0, 50_000), [0.0, -0.0, 1.0, -1.0, 709.78, -708.39]])
    out = np.empty_like(x)
    exp(x, out)
    exact = np.exp(x.astype(np.longdouble))
    normal = exact >= np.finfo(np.float64).tiny
    assert ulps_from_exact(out[normal], exact[normal]).max() < 1.0
    assert np.abs(out[~normal].astype(np.longdouble) - exact[~normal]).max() <= 5e-324
    special = np.array([-np.inf, np.inf, np.nan, 709.8, 710.0, 1e300, -745.2, -746.0, -1e300])
    out = np.empty_like(special)
    exp(special, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, np.exp(special))


@pytest.mark.skipif(not EXTENDED, reason="numpy.longdouble is no wider than float64 here: no exact reference")
@pytest.mark.parametrize("backend", _math_backends())
def test_vectorised_log_within_one_ulp_of_the_exact_value(backend):
    """Log within 1 ulp of the exact value (``numpy.longdouble``) on positive normal numbers.

    Measured: 0.80 ulp (NumPy 1.26's own ``log`` is 1.7 ulp off). Others as ``numpy.log``; each result its own input's.
    """
    _, log = _math_backends()[backend]
    rng = np.random.default_rng(12)
    x = np.concatenate([10.0 ** rng.uniform(-307, 308, 400_000), 1.0 + rng.uniform(-0.3, 0.42, 100_000),
                        1.0 + rng.standard_normal(50_000) * 1e-9, np.sqrt([0.5, 2.0]), [1.0, 2.0, 0.5],
                        np.nextafter(np.sqrt([0.5, 2.0]), 0.0), [2.2250738585072014e-308, 1.7976931348623157e308]])
    out = np.empty_like(x)
    log(x, out)
    assert ulps_from_exact(out, np.log(x.astype(np.longdouble))).max() < 1.0
    special = np.array([0.0, -0.0, 5e-324, 1e-310, -1.0, -np.inf, np.inf, np.nan])
    mixed = np.concatenate([x[:100], special, x[100:200]])
    out = np.empty_like(mixed)
    log(mixed, out)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(out[100:108], np.log(special))
    plain = np.empty(200)
    log(np.ascontiguousarray(np.concatenate([x[:100], x[100:200]])), plain)
    np.testing.assert_array_equal(np.concatenate([out[:100], out[108:]]), plain)


# --------------------------------------------------------------------------- API
def test_backends_expose_the_reference_api():
    for name, mod in BACKENDS.items():
        for fn in PUBLIC:
            assert callable(getattr(mod, fn, None)), f"{name} lacks {fn}"
        assert (mod.RULE_EG, mod.RULE_HEDGE) == (_reference.RULE_EG, _reference.RULE_HEDGE) == (0, 1)
        assert mod.max_threads() >= 1


def test_invalidate_rows_helper_makes_rows_invalid():
    rng = np.random.default_rng(0)
    s = np.zeros((1000, 3))
    bad = invalidate_rows(rng, s, 0.05)
    ok = _reference.valid_rows(s)
    assert 0 < bad.size < 200 and not ok[bad].any() and ok.sum() == 1000 - bad.size

