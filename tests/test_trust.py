"""Trust classes from measured error: quantile classes and class weights (MODEL.md section 7)."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memoa_fast.timeseries.trust import TrustClasses


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_classes_are_quantiles_of_the_error(n, k, seed):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    trust = TrustClasses(n, k, reclass=5)
    scale = np.exp(rng.uniform(-4, 1, n))
    y = rng.normal(size=(40, 2))
    for t in range(40):
        trust.observe(y[t] + scale[:, None] * rng.normal(size=(n, 2)), y[t])
    labels, q, shares = trust.classes()
    sizes = np.bincount(labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    np.testing.assert_allclose(shares, sizes / n)
    # Every client of a lower class has an error no larger than every client of a higher class.
    for j in range(k - 1):
        assert trust.errors[labels == j].max() <= trust.errors[labels == j + 1].min()
    # Better classes get at least as much weight on their own forecast.
    assert np.all(np.diff(q) <= 1e-12 * q[:-1])
    assert np.all((q >= 1e-3) & (q <= 1e3))


@pytest.mark.parametrize("power", [1.0, 6.0, 0.005])
def test_class_weights_beyond_float64_are_clipped_without_a_warning(power):
    """A ratio median/mean_j (or its power) beyond float64 is clipped to q_range like any other, silently.

    Errors a few hundred decades apart (a near-exact forecaster and a poor one) overflowed ``(median/mean_j)**beta``
    and NumPy warned "overflow encountered": with warnings as errors a TrustPopulation's re-forming raised, rolled
    back and raised again at every retry. The weights are the clipped ones: compared in log space.
    """
    import warnings

    trust = TrustClasses(6, 3, reclass=1, q=2.0, power=power)
    trust.errors[:] = [5e-324, 5e-324, 1.0, 1.0, 1e300, 1e300]  # the first class mean: 1/mean overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, q, _ = trust.classes()
    means = np.array([5e-324, 1.0, 1e300])
    log_ratio = power * (np.log(np.median(trust.errors)) - np.log(means))
    want = 2.0 * np.exp(np.clip(log_ratio, np.log(1e-3), np.log(1e3)))
    np.testing.assert_allclose(q, want, rtol=1e-12)


def test_weights_follow_the_formula():
    trust = TrustClasses(4, 2, reclass=1, half_life=1.0, q=2.0)
    trust.observe(np.array([[1.0], [2.0], [3.0], [4.0]]), [0.0])
    v = 0.5 * np.array([1.0, 4.0, 9.0, 16.0])  # half-life 1: weight 1/2 on the first error
    np.testing.assert_allclose(trust.errors, v)
    labels, q, shares = trust.classes()
    assert labels.tolist() == [0, 0, 1, 1]
    median = np.median(v)
    np.testing.assert_allclose(q, 2.0 * median / np.array([v[:2].mean(), v[2:].mean()]))


@pytest.mark.parametrize("power", [1.0, 1.5])
def test_a_class_of_exact_forecasters_keeps_the_top_weight_as_in_the_limit(power):
    """A class whose clients forecast every target exactly (mean v = 0) gets q high, the limit of mean v -> 0+.

    It got q (the median client's weight; the ratio median/0 was read as 1): below the weight of a less accurate
    class (198 q at beta = 1.5 here, 34 q at beta = 1), while a class error of 5e-324 gets 1000 q. The classes are ranked the same
    for exact and near-exact forecasters, so the weights must be too.
    """
    offsets = np.array([0.0, 0.0, 0.1, 0.1414, 1.0, 1.0, 1.0, 1.0])  # two exact clients, two good ones, four poor ones
    trust = TrustClasses(8, 4, reclass=1, q=2.0, power=power)
    for y in (0.5, -1.0, 2.0):
        trust.observe((y + offsets)[:, None], [y])
    assert trust.errors[0] == trust.errors[1] == 0.0
    labels, exact, _ = trust.classes()
    trust.errors[:2] = 5e-324  # the same ranking, a class error just above 0
    assert trust.classes()[0].tolist() == labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(exact, trust.classes()[1])
    assert exact[0] == 2.0 * 1e3 and np.all(np.diff(exact) <= 0)


@pytest.mark.parametrize("offsets, power, q_range", [
    ([1e-160, 1e-160, 1.0, 1.0, 1.0, 1.0], 0.005, (1e-3, 1e3)),  # median/mean_0 ~ 1e320: overflowed, was q high
    ([1e-160] * 4 + [1e45, 1e45], 0.005, (1e-3, 1e3)),  # median/mean_2 ~ 1e-410: underflowed, was q low
    ([1e-160, 1e-160, 1.0, 1.0, 1.0, 1.0], 0.5, (1e-300, 1e300)),  # a wide q_range: 1e160, not the top 1e300
])
def test_a_ratio_beyond_float64_whose_power_is_not_follows_the_formula(offsets, power, q_range):
    """q_j = q (median/mean_j)^beta, clipped, also where median/mean_j leaves float64 but its power does not.

    The quotient was raised to beta after it overflowed to inf (or underflowed to 0), so a class of error 1e-320 got
    the top of q_range like an exact class, though its weight is (1e320)^0.005 ~ 40 q: the weight jumped as the class
    error crossed median/1.8e308, not only at 0. Errors made by ``observe`` (a forecast 1e-160 off: v ~ 2e-322).
    """
    offsets = np.array(offsets)
    trust = TrustClasses(6, 3, reclass=1, q=2.0, power=power, q_range=q_range)
    trust.observe(offsets[:, None], [0.0])
    labels, q, _ = trust.classes()
    v = trust.errors
    means = np.array([v[labels == j].mean() for j in range(3)])
    assert np.all(means > 0) and np.all(np.diff(means) >= 0)
    log_ratio = power * (np.log(np.median(v)) - np.log(means))
    want = 2.0 * np.exp(np.clip(log_ratio, np.log(q_range[0]), np.log(q_range[1])))
    assert np.all((want > 2.0 * q_range[0] * 1.01) & (want < 2.0 * q_range[1] / 1.01))  # inside the range, not clipped
    np.testing.assert_allclose(q, want, rtol=1e-12)


@pytest.mark.parametrize("errors, want", [
    ([1.0] * 5 + [1e10, np.inf, np.inf], [1.0, 1.0, 1e-3, 1e-3]),  # a class mean of inf: it got q, above (1, 1e10)'s
    ([1.0] * 4 + [1.5e308] * 4, [1e3, 1e3, 0.5**1.5, 0.5**1.5]),  # a class sum overflows (it warned, then got q)
    ([1.0] * 2 + [1.5e308] * 4, [1e3, 1.0, 1.0]),  # and the median's: 1.5e308, the median's class keeps q
    ([np.inf] * 4 + [1.0, 1.0], [1e3, 1.0, 1.0]),  # median inf: the inf classes are the median's
])
def test_class_weights_at_the_far_end_of_the_errors_are_monotone(errors, want):
    """A class mean of inf (errors written into ``errors``; observe makes none) is the limit mean -> inf: the bottom.

    It was read as the median's ratio 1 (q), above the weight of a better class of finite error, and a class sum past
    float64 warned "overflow encountered in reduce" (an error with warnings as errors) and read as inf: the mean and
    median of finite errors are finite now. (The median-inf case passed before; it guards 44071a1's log path.)
    """
    trust = TrustClasses(len(errors), len(want), reclass=1, power=1.5)
    trust.errors[:] = errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, q, _ = trust.classes()
        _, (q0,), _ = trust.classes_for([0.0])
    np.testing.assert_allclose(q, want, rtol=1e-14)
    np.testing.assert_array_equal(q0, 1.0)  # beta = 0: every class at q, whatever the errors


def test_an_invalid_forecast_counts_as_the_rounds_worst_valid_one():
    """A client that never forecasts validly ranks with the least accurate (its error used to stay at 0: the most trusted)."""
    rng = np.random.default_rng(5)
    n = 40
    trust = TrustClasses(n, 4, half_life=5.0)
    scale = np.exp(rng.uniform(-3, 1, n))
    y = rng.normal(size=60)
    for t in range(60):
        f = y[t] + scale * rng.normal(size=n)
        f[3], f[17] = np.nan, 1e60  # never valid
        if t % 2:
            f[29] = np.inf  # valid every other round
        trust.observe(f[:, None], y[t])
    valid = np.ones(n, dtype=bool)
    valid[[3, 17, 29]] = False
    # Each round's worst valid squared error is at least every valid client's, so the EWMA is too.
    assert trust.errors[3] == trust.errors[17] >= trust.errors[valid].max() > 0
    labels, _, _ = trust.classes()
    assert labels[3] == labels[17] == 3
    # Client 29's invalid rounds count as the worst: its error is above what its valid rounds alone gave.
    assert trust.errors[29] > np.median(trust.errors[valid])
    # A round with no valid forecast changes nothing.
    before = trust.errors.copy()
    trust.observe(np.full((n, 1), np.nan), 0.0)
    np.testing.assert_array_equal(trust.errors, before)
    # All valid: the plain update, the same bits as before this rule.
    f = rng.normal(size=(n, 1))
    want = before + trust.weight * (((f - 0.5) ** 2).sum(axis=1) - before)
    trust.observe(f, 0.5)
    np.testing.assert_array_equal(trust.errors, want)


def test_due_every_reclass_rounds():
    trust = TrustClasses(10, 2, reclass=3)
    assert [t for t in range(10) if trust.due(t)] == [3, 6, 9]


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_clients=0), "n_clients"), (dict(n_clients=3, n_classes=4), "n_classes must be at most"),
    (dict(n_clients=30, reclass=0), "reclass"), (dict(n_clients=30, half_life=0.0), "half_life"),
    (dict(n_clients=30, q_range=(2.0, 3.0)), "q_range"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrustClasses(**kwargs)


def test_trust_population_reclasses_and_starts_as_memoa(rng):
    from memoa_fast import Game, Population
    from memoa_fast.timeseries.trust import TrustPopulation

    n, d, R = 64, 1, 5
    trust = TrustPopulation(n, d, n_classes=4, reclass=R, kappa=2.0, q=1.0, r=0.1, gamma=0.9, rule="error")
    plain = Population(Game(q=1.0, kappa=2.0, r=0.1, gamma=0.9), n, d)
    noise = np.exp(rng.uniform(-4, 0, n))[:, None]
    y = np.sin(np.arange(30) / 3.0)
    for t in range(R):  # identical classes before the first re-forming: the single-class MEMOA policy
        s = y[t + 1] + noise * rng.normal(size=(n, d))
        np.testing.assert_allclose(trust.step(s), plain.step(s), rtol=1e-12, atol=1e-13)
        trust.observe([y[t + 1]])
    assert trust.n_reclassed == 1
    labels, q, shares = trust.trust.classes()
    np.testing.assert_array_equal(trust.population.labels, labels)
    np.testing.assert_allclose(trust.game.q, q)
    # the noisiest clients sit in the last class, which leans most on the population
    assert np.corrcoef(noise[:, 0], labels)[0, 1] > 0.5 and q[0] > q[-1]


def _noisy_run(trust_pops, n, d, rounds, seed):
    """Step every population on the same noisy signals of a sine and let each observe the target."""
    rng = np.random.default_rng(seed)
    noise = np.exp(rng.uniform(-4, 0, n))[:, None]
    y = np.sin(np.arange(rounds + 1) / 3.0)
    published = []
    for t in range(rounds):
        s = y[t + 1] + noise * rng.normal(size=(n, d))
        published.append([pop.step(s).copy() for pop in trust_pops])
        for pop in trust_pops:
            pop.observe(np.full(d, y[t + 1]))
    return published


def test_minimax_candidates_are_the_error_rule_populations_and_the_leader_has_the_lowest_class_cost():
    from memoa_fast.timeseries.trust import TrustPopulation

    n, d, R, powers = 60, 2, 7, (0.5, 1.5, 4.0)
    kw = dict(n_classes=4, reclass=R, kappa=3.0, feedforward=False, cost_half_life=5.0)
    minimax = TrustPopulation(n, d, rule="minimax", powers=powers, power=1.5, **kw)
    singles = [TrustPopulation(n, d, rule="error", power=p, **kw) for p in powers]
    assert minimax.power == 1.5 and minimax.population is minimax.populations[1]
    rng = np.random.default_rng(3)
    noise = np.exp(rng.uniform(-4, 0, n))[:, None]
    y = np.sin(np.arange(60) / 3.0)
    w = 1.0 - 2.0 ** (-1.0 / 5.0)
    costs = np.zeros(len(powers))  # the rule's class costs, computed here independently
    expected_leader, leaders = 1, set()
    published_cost = np.zeros(n)
    for t in range(59):
        s = y[t + 1] + noise * rng.normal(size=(n, d))
        leader_before = singles[minimax.leader].costs.copy()
        published = minimax.step(s).copy()
        single_states = [pop.step(s).copy() for pop in singles]
        # each candidate is exactly the error rule with its exponent, and the published states are the leader's
        for c in range(len(powers)):
            np.testing.assert_array_equal(minimax.populations[c].states, single_states[c])
        np.testing.assert_array_equal(published, single_states[minimax.leader])
        # the published path's cost: this round's loss of the leader, added to what was there
        leader_round = singles[minimax.leader].costs - leader_before
        np.testing.assert_allclose(minimax.costs, published_cost + leader_round, rtol=1e-13, atol=0)
        published_cost = minimax.costs.copy()
        assert minimax.regret == published_cost.max() and minimax.worst_agent == int(np.argmax(published_cost))
        labels = minimax.population.labels
        for c in range(len(powers)):
            sq = ((single_states[c] - y[t + 1]) ** 2).sum(axis=1)
            worst_class = max(sq[labels == j].mean() for j in range(4))
            costs[c] += w * (worst_class - costs[c])
        minimax.observe(np.full(d, y[t + 1]))
        for pop in singles:
            pop.observe(np.full(d, y[t + 1]))
        np.testing.assert_allclose(minimax.class_costs, costs, rtol=1e-12)
        if (t + 1) % R == 0:  # the leader changes only when the classes are re-formed
            expected_leader = int(np.argmin(costs))
            leaders.add(expected_leader)
        assert minimax.leader == expected_leader
    assert minimax.n_reclassed == 59 // R
    assert len(leaders) >= 1


def test_minimax_with_one_exponent_is_the_error_rule():
    from memoa_fast.timeseries.trust import TrustPopulation

    kw = dict(n_classes=3, reclass=4, kappa=2.0, power=2.0)
    a = TrustPopulation(40, 1, rule="minimax", powers=[2.0], **kw)
    b = TrustPopulation(40, 1, rule="error", **kw)
    out_a = _noisy_run([a], 40, 1, 30, seed=5)
    out_b = _noisy_run([b], 40, 1, 30, seed=5)
    for xa, xb in zip(out_a, out_b):
        np.testing.assert_array_equal(xa[0], xb[0])


@pytest.mark.parametrize("kwargs, words", [
    (dict(rule="best"), "rule must be one of 'error', 'minimax'; got 'best'"),
    (dict(rule="minimax", powers=[]), "powers must be distinct finite numbers"),
    (dict(rule="minimax", powers=[1.0, 1.0, 1.5]), "powers must be distinct"),
    (dict(rule="minimax", powers=[1.5, -1.0]), "powers must be distinct finite numbers >= 0"),
    (dict(rule="minimax", powers=[1.5, float("nan")]), "powers must be distinct finite numbers >= 0"),
    (dict(rule="minimax", powers="abc"), "powers must be a sequence of numbers"),
    (dict(rule="minimax", powers=[1.0, 2.0], power=1.5), r"power must be one of powers=\(1.0, 2.0\)"),
    (dict(cost_half_life=0.0), "cost_half_life"),
])
def test_trust_population_bad_arguments(kwargs, words):
    from memoa_fast.timeseries.trust import TrustPopulation

    with pytest.raises(ValueError, match=words):
        TrustPopulation(20, 1, n_classes=2, **kwargs)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_no_feedforward_moves_lie_in_the_family_bench_trust_bound_bounds(k, seed):
    """bench/trust_bound.py's floor rests on this: without feed-forward, every move is
    ``x_i(t+1) = a x_i(t) + b s_i(t) + sum_l c_l sbar_l(t)`` with ``a, b, c_l >= 0`` summing to 1,
    whatever the class weights and shares.
    """
    from memoa_fast import Game, Population

    rng = np.random.default_rng(seed)
    q = rng.choice([0.0, 1.0], k) * np.exp(rng.uniform(-6, 6, k))
    q[0] = max(q[0], 1e-3)  # some class must follow its signal
    kappa = np.exp(rng.uniform(-4, 3, k))
    r = np.exp(rng.uniform(-3, 2, k))
    shares = rng.dirichlet(np.ones(k))
    game = Game(q=q, kappa=kappa, r=r, gamma=0.9, shares=shares, feedforward=False)
    gain, lam = game.classes.k, game.classes.lam
    a = 1.0 - gain
    b = gain * game.q / game.w
    c = (gain * game.kappa / game.w)[:, None] * lam[None, :]
    assert np.all((a >= 0) & (a < 1) & (b >= 0)) and np.all(c >= 0) and np.all(lam >= 0)
    np.testing.assert_allclose(a + b + c.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    n, d = 50 * k, 2
    labels = np.arange(n) % k
    pop = Population(game, n, d, labels=labels, threads=1)
    x = rng.normal(size=(n, d))
    pop.step(x)  # an arbitrary state to start from
    x = pop.states.copy()
    s = rng.normal(size=(n, d))
    sbar = np.stack([s[labels == j].mean(axis=0) for j in range(k)])
    want = a[labels, None] * x + b[labels, None] * s + c[labels] @ sbar
    np.testing.assert_allclose(pop.step(s), want, rtol=1e-11, atol=1e-11)


def _trust_state(tp):
    """Everything a TrustPopulation's observe() may change (copies)."""
    return (tp.class_costs.copy(), tp.trust.errors.copy(), tp.trust.n_observed, tp.t, tp.n_reclassed, tp.leader,
            [pop.state_dict() for pop in tp.populations], list(tp.games))


@pytest.mark.parametrize("bad, error", [
    ([float("nan")], ValueError), ([float("inf")], ValueError), ([1e31], ValueError), ([-1e308], ValueError),
    (None, TypeError), ("abc", TypeError), (1 + 1j, TypeError), ([0.1, 0.2], ValueError), ([[0.1]], ValueError),
])
def test_trust_population_refuses_a_bad_target_and_changes_nothing(bad, error):
    """One NaN (or overflowing) target used to send every minimax candidate's measured cost to inf for good,
    freezing the leader, and still count the round; None was taken as NaN. Now: refused first, nothing changes.
    """
    from memoa_fast.timeseries.trust import TrustPopulation

    rng = np.random.default_rng(5)
    tp = TrustPopulation(12, 1, n_classes=3, reclass=2, backend="numpy")
    for _ in range(3):
        tp.step(rng.normal(size=(12, 1)))
        tp.observe([0.1])
    tp.step(rng.normal(size=(12, 1)))
    before = _trust_state(tp)
    assert np.isfinite(before[0]).all()
    with pytest.raises(error, match="^target must"):
        tp.observe(bad)
    after = _trust_state(tp)
    for a, b in zip(before[:6], after[:6]):
        np.testing.assert_array_equal(a, b)
    for sa, sb in zip(before[6], after[6]):
        for key in ("states", "costs", "labels"):
            np.testing.assert_array_equal(sa[key], sb[key])
    assert before[7] == after[7]
    tp.observe([0.1])  # and it goes on: every candidate still in the race
    assert np.isfinite(tp.class_costs).all() and tp.t == before[3] + 1


@pytest.mark.parametrize("bad, error", [([float("nan")], ValueError), (None, TypeError), ([1e31], ValueError), ([0.1, 0.2], ValueError)])
def test_trust_classes_refuse_a_bad_target_and_change_nothing(bad, error):
    trust = TrustClasses(6, 2)
    trust.observe(np.ones((6, 1)), [0.5])
    errors, n = trust.errors.copy(), trust.n_observed
    with pytest.raises(error, match="^(target|forecasts) must"):  # TrustClasses reads d from the target
        trust.observe(np.ones((6, 1)), bad)
    np.testing.assert_array_equal(trust.errors, errors)
    assert trust.n_observed == n


@pytest.mark.parametrize("q_range, error", [(5.0, TypeError), ((0.5,), TypeError), ((0.5, 2.0, 3.0), TypeError), ("ab", TypeError),
                                             ((float("nan"), 2.0), ValueError)])
def test_q_range_must_be_a_pair(q_range, error):
    with pytest.raises(error, match="q_range"):
        TrustClasses(6, 2, q_range=q_range)


def test_powers_are_checked_whatever_the_rule():
    """powers=[nan] used to be accepted (and ignored) with rule='error'."""
    from memoa_fast.timeseries.trust import TrustPopulation

    with pytest.raises(ValueError, match="powers must be"):
        TrustPopulation(6, n_classes=2, rule="error", powers=[float("nan")])


def test_a_shallow_copy_of_a_trust_classes_subclass_shares_nothing():
    """copy.copy of a TrustClasses subclass shared the subclass's own mutable attributes with the original."""
    import copy

    from memoa_fast.timeseries.trust import TrustClasses

    class Logged(TrustClasses):
        pass

    trust = Logged(6, 2, reclass=2)
    trust.log = [1]
    trust.observe(np.arange(6.0)[:, None], [0.5])
    clone = copy.copy(trust)
    clone.log.append(2)
    clone.observe(np.ones((6, 1)), [0.1])
    assert type(clone) is Logged and trust.log == [1] and trust.n_observed == 1 and clone.n_observed == 2


def test_a_shallow_copy_of_a_trust_population_is_independent():
    """copy.copy shared the populations, the class records and the costs with the original."""
    import copy

    from memoa_fast.timeseries.trust import TrustPopulation

    rng = np.random.default_rng(2)
    tp = TrustPopulation(8, 1, n_classes=2, reclass=2, backend="numpy")
    for _ in range(3):
        tp.step(rng.normal(size=(8, 1)))
        tp.observe([0.2])
    before = _trust_state(tp)
    clone = copy.copy(tp)
    clone.step(np.ones((8, 1)))
    clone.observe([0.3])
    after = _trust_state(tp)
    for a, b in zip(before[:6], after[:6]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tp.population.states, before[6][tp.leader]["states"])


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), ("50", TypeError), (True, TypeError), (None, TypeError)])
def test_due_takes_a_round_number(bad, error):
    """due(-1) and due(1.5) used to answer False instead of naming the argument."""
    trust = TrustClasses(6, 2, reclass=3)
    with pytest.raises(error, match="^t must be an integer >= 0"):
        trust.due(bad)
    assert [trust.due(t) for t in range(7)] == [False, False, False, True, False, False, True]
    assert trust.due(np.int64(3))


def test_sizes_are_checked_against_memory_before_anything_is_allocated(monkeypatch):
    """The minimax rule runs one population per exponent: each fitted alone, so six together were never checked."""
    from memoa_fast import _validation
    from memoa_fast.timeseries.trust import TrustPopulation

    monkeypatch.setattr(_validation, "available_memory", lambda: 2**20)  # 1 MiB
    with pytest.raises(ValueError, match=r"n_clients=100000, dim=1: the trust classes' arrays need"):
        TrustClasses(100_000, 2)
    # 6 populations of 5000 x 2 need ~1.2 MiB together, each alone ~0.2 MiB
    with pytest.raises(ValueError, match=r"n_clients=5000, dim=2, 6 exponents: the trust population's arrays need"):
        TrustPopulation(5000, 2, n_classes=2, backend="numpy")
    TrustPopulation(500, 2, n_classes=2, backend="numpy")


@pytest.mark.parametrize("q, kappa, r, gamma", [
    (1e-10, 0.0, 1e4, 0.9),  # q_j = 1e-3 q: 1 - k_j rounds to 1
    (1e-12, 0.0, 1e4, 0.9),
    (1e-10, 1e-12, 1e4, 0.5),
    (1e-9, 0.0, 1e4, 0.9),  # every reachable class weight is fine
    (1e4, 0.0, 1e-4, 0.9),  # q_j = 1e3 q: k_j near 1
    (1.0, 3.0, 0.1, 0.9),
])
def test_weights_a_reforming_cannot_solve_are_refused_up_front_not_mid_run(q, kappa, r, gamma):
    """Weights a re-forming cannot solve are refused when the population is made, or every re-forming succeeds.

    A re-forming gives a class any q_j in [q low, q high] (q_range): either the population is refused when it is
    made, naming q and that range, or every re-forming succeeds, even one that sends the classes to both ends.
    (It used to run until the first re-forming that reached an unsolvable class weight, and stop there.)
    """
    from memoa_fast.timeseries.trust import TrustPopulation

    n = 16
    try:
        tp = TrustPopulation(n, 1, n_classes=4, reclass=2, q=q, kappa=kappa, r=r, gamma=gamma, rule="minimax")
    except ValueError as exc:
        assert str(exc).startswith(f"memoa-trust: q={q!r} ") and "q_range=(0.001, 1000.0)" in str(exc), exc
        return
    spread = np.geomspace(1e-12, 1e12, n)  # errors far apart: the ratios reach both clipping ends at beta = 1..6
    for t in range(6):
        tp.step(spread * (-1) ** t)
        tp.observe(0.0)
    assert tp.n_reclassed == 3
    q_all = np.concatenate([np.asarray(g.q) for g in tp.games])
    assert q_all.min() == pytest.approx(q * 1e-3) and q_all.max() == pytest.approx(q * 1e3)


def test_beta_zero_reaches_only_q_and_is_not_refused():
    """With beta = 0 every class keeps q whatever the errors: weights whose ends of q_range fail are still fine."""
    from memoa_fast.timeseries.trust import TrustPopulation

    with pytest.raises(ValueError, match="memoa-trust: q=1e-10"):
        TrustPopulation(8, n_classes=2, reclass=1, q=1e-10, kappa=0.0, r=1e4, rule="error", power=1.0)
    tp = TrustPopulation(8, n_classes=2, reclass=1, q=1e-10, kappa=0.0, r=1e4, rule="error", power=0.0)
    for t in range(3):
        tp.step(np.geomspace(1e-6, 1e6, 8))
        tp.observe(0.0)
    assert tp.n_reclassed == 3 and np.all(np.asarray(tp.game.q) == 1e-10)


@pytest.mark.parametrize("powers, error", [("15", ValueError), (b"15", ValueError), ([True, 1.5], TypeError),
                                           (["1", "1.5"], TypeError), ([1.5, 2 + 0j], TypeError), (1.5, ValueError),
                                           (np.array(1.5), ValueError)])
def test_powers_are_real_numbers_never_cast(powers, error):
    """powers='15' was read as (1.0, 5.0), [True, 1.5] as (1.0, 1.5) and ['1', '1.5'] as numbers: refused now.

    A 0-d array (iterable by its type, not by its value) is named as a number is, not NumPy's "iteration over a 0-d array".
    """
    from memoa_fast.timeseries.trust import TrustPopulation

    with pytest.raises(error, match="powers must be"):
        TrustPopulation(6, n_classes=2, power=1.0 if powers in ("15", b"15") else 1.5, powers=powers)
    tp = TrustPopulation(6, n_classes=2, powers=np.array([1.0, 1.5], dtype=np.float32))  # real arrays are fine
    assert tp.powers == (1.0, 1.5) and all(type(p) is float for p in tp.powers)

@pytest.mark.parametrize("rule", ["error", "minimax"])
def test_a_reclassing_that_fails_changes_nothing(rule, monkeypatch):
    """observe() at a re-classing that fails other than in the solver raises and leaves everything as it was.

    It used to fold the round's errors, advance the round counter past the re-classing and keep the old classes:
    a retry counted the errors twice and the classes waited another ``reclass`` rounds. (A game the solver cannot
    solve, its ``ValueError``, keeps the previous classes instead: next test.) The failure is injected into the
    re-forming: the property is the same for any exception raised there.
    """
    import pickle

    from memoa_fast.game import Game
    from memoa_fast.timeseries.trust import TrustPopulation

    tp = TrustPopulation(8, 1, n_classes=4, reclass=2, q=1.0, kappa=0.0, r=10.0, gamma=0.9, rule=rule, backend="numpy",
                         powers=(1.0, 1.5))
    signals = np.repeat([1.0, 3.16, 10.0, 100.0], 2)[:, None]  # errors 1 ... 1e4
    tp.step(signals)
    tp.observe(0.0)  # round 1: no re-classing
    tp.step(signals)
    before = pickle.loads(pickle.dumps(tp))

    def interrupted(self, **kw):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the re-forming's solves

    with monkeypatch.context() as patch:
        patch.setattr(Game, "with_weights", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tp.observe(0.0)  # round 2 re-forms the classes
    assert (tp.t, tp.n_reclassed, tp.trust.n_observed, tp.leader) == (before.t, before.n_reclassed, before.trust.n_observed,
                                                                      before.leader)
    assert np.array_equal(tp.trust.errors, before.trust.errors)
    assert np.array_equal(tp.class_costs, before.class_costs)
    assert [g.to_dict() for g in tp.games] == [g.to_dict() for g in before.games]
    for pop, old in zip(tp.populations, before.populations):
        assert np.array_equal(pop.labels, old.labels) and pop.t == old.t
    # the call may be repeated: the same round once, re-formed as the uninterrupted object does it
    tp.observe(0.0)
    before.observe(0.0)
    assert (tp.t, tp.n_reclassed) == (before.t, before.n_reclassed) == (2, 1)
    assert np.array_equal(tp.trust.errors, before.trust.errors) and np.array_equal(tp.class_costs, before.class_costs)


@pytest.mark.parametrize("rule", ["error", "minimax"])
def test_a_reforming_the_solver_cannot_solve_keeps_the_previous_classes(rule, monkeypatch):
    """A re-formed game with no equilibrium found (the solver's ValueError): the round counts, the classes stay.

    The run goes on with the classes of the last solved game (a run used to stop there, after the weights passed
    the check made when the object is built), ``n_reforms_kept`` counts it and a RuntimeWarning names the weights.
    """
    import pickle

    from memoa_fast.game import Game
    from memoa_fast.timeseries.trust import TrustPopulation

    tp = TrustPopulation(8, 1, n_classes=4, reclass=2, q=1.0, kappa=0.0, r=10.0, gamma=0.9, rule=rule, backend="numpy",
                         powers=(1.0, 1.5))
    signals = np.repeat([1.0, 3.16, 10.0, 100.0], 2)[:, None]
    tp.step(signals)
    tp.observe(0.0)
    tp.step(signals)
    before = pickle.loads(pickle.dumps(tp))
    labels = [pop.labels.copy() for pop in tp.populations]

    def unsolvable(self, **kw):
        raise ValueError("no unique stable K-class equilibrium (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(Game, "with_weights", unsolvable)
        with pytest.warns(RuntimeWarning, match="previous classes are kept"):
            tp.observe(0.0)  # round 2 re-forms the classes
    assert (tp.t, tp.n_reclassed, tp.n_reforms_kept) == (2, 0, 1)
    assert [g.to_dict() for g in tp.games] == [g.to_dict() for g in before.games]
    assert all(np.array_equal(pop.labels, old) for pop, old in zip(tp.populations, labels))
    before.observe(0.0)  # the round itself is measured as the uninterrupted object measures it
    assert np.array_equal(tp.trust.errors, before.trust.errors) and np.array_equal(tp.class_costs, before.class_costs)
    tp.step(signals)  # and the run goes on with the kept classes
    assert np.isfinite(tp.population.states).all()


def test_memoa_trust_runs_where_a_reformed_game_ties_its_gains(capsys):
    """The review's reproducer: q_j far below kappa gives every class the same gain up to its last bits.

    QZ lost the slow root and the secular solve stopped at poles an ulp apart, so a re-formed game with an
    equilibrium was refused and the job stopped there (exit 2), after the weights passed the check made up front.
    The solver now takes such poles as one (test_game.py): the job runs through, every re-forming solved.
    """
    import warnings

    from memoa_fast.timeseries.cli import main

    argv = ["run", "--clients", "40", "--rounds", "300", "--policies", "memoa-trust", "--q", "1.1e-14", "--kappa", "5900",
            "--r", "0.012", "--gamma", "0.95"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no re-forming kept
        assert main(argv) in (0, None)
    assert "memoa-trust" in capsys.readouterr().out


@pytest.mark.parametrize("gamma", [0.9, 1e-200], ids=["inf", "underflow"])
def test_minimax_published_costs_overflow_as_the_leaders_and_never_name_a_nan_worst_agent(gamma):
    """Past float64's range the published path's costs are the leader's: inf stays inf (``J_i`` only grows), NaN only
    once ``gamma^t`` underflows (``0 * inf``), and ``worst_agent``/``regret`` name the largest non-NaN cost, as the
    "error" rule (its Population) does. The round loss ``J_after - J_before`` was ``inf - inf = NaN`` (with a
    RuntimeWarning): at gamma 0.9 an inf published cost became NaN, and worst_agent moved from 0 to agent 2.
    Before ``first_max``, ``worst_agent`` took ``numpy.argmax``, the first NaN.
    """
    from memoa_fast.timeseries.trust import TrustPopulation

    got = {}
    for rule in ("minimax", "error"):
        tp = TrustPopulation(3, 1, rule=rule, n_classes=1, q=1e250, kappa=1e250, r=1e250, gamma=gamma)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(3):  # clients 0 and 1 overflow in round 1; the discount is 0 in round 3 when gamma = 1e-200
                tp.step(np.array([1e30, -1e30, 1.0]))
                tp.observe(np.ones(1))
        got[rule] = tp.costs.copy(), tp.worst_agent, tp.regret
    (costs, worst, regret), (ref_costs, ref_worst, ref_regret) = got["minimax"], got["error"]
    assert np.isfinite(costs[2]) and (np.isinf(costs[:2]).all() if gamma == 0.9 else np.isnan(costs[:2]).all())
    np.testing.assert_array_equal(np.isnan(costs), np.isnan(ref_costs))
    np.testing.assert_array_equal(np.isinf(costs), np.isinf(ref_costs))
    assert worst == ref_worst == (0 if gamma == 0.9 else 2)
    np.testing.assert_allclose(regret, ref_regret, rtol=1e-12)
    assert regret == costs[worst]
