"""Trust classes from measured error: quantile classes and class weights (MODEL.md section 7)."""
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


def test_weights_follow_the_formula():
    trust = TrustClasses(4, 2, reclass=1, half_life=1.0, q=2.0)
    trust.observe(np.array([[1.0], [2.0], [3.0], [4.0]]), [0.0])
    v = 0.5 * np.array([1.0, 4.0, 9.0, 16.0])  # half-life 1: weight 1/2 on the first error
    np.testing.assert_allclose(trust.errors, v)
    labels, q, shares = trust.classes()
    assert labels.tolist() == [0, 0, 1, 1]
    median = np.median(v)
    np.testing.assert_allclose(q, 2.0 * median / np.array([v[:2].mean(), v[2:].mean()]))


def test_invalid_forecasts_leave_the_error_alone():
    trust = TrustClasses(3, 1, half_life=2.0)
    trust.observe([[1.0], [1.0], [1.0]], [0.0])
    before = trust.errors.copy()
    trust.observe([[np.nan], [1e200], [1.0]], [0.0])
    assert trust.errors[0] == before[0] and trust.errors[1] == before[1]
    assert trust.errors[2] > before[2]


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
    trust = TrustPopulation(n, d, n_classes=4, reclass=R, kappa=2.0, q=1.0, r=0.1, gamma=0.9)
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
