"""The closed-form gains against independent oracles (MODEL.md section 2)."""
import itertools
import math

import numpy as np
import pytest
import scipy.linalg

from memoa_fast import Game, solve_gains

WEIGHT_GRID = list(
    itertools.product(
        [0.0, 0.3, 1.0, 5.0],  # q
        [0.0, 0.5, 2.0, 10.0],  # kappa
        [0.01, 0.1, 0.5, 4.0],  # r
        [0.3, 0.9, 0.95, 1.0],  # gamma
    )
)
WEIGHT_GRID = [w for w in WEIGHT_GRID if w[0] + w[1] > 0]


@pytest.mark.parametrize("q,kappa,r,gamma", WEIGHT_GRID)
def test_riccati_matches_scipy_and_identities(q, kappa, r, gamma):
    g = solve_gains(q, kappa, r, gamma)
    w = q + kappa
    # Independent oracle: the scalar discounted DARE with A = B = sqrt(gamma), Q = w, R = r.
    a = np.array([[math.sqrt(gamma)]])
    P_scipy = scipy.linalg.solve_discrete_are(a, a, np.array([[w]]), np.array([[r]]))[0, 0]
    assert g.P == pytest.approx(P_scipy, rel=1e-10)
    assert g.P * (1 - g.a) == pytest.approx(w, rel=1e-12)
    assert 0 < g.k < 1
    assert g.k == pytest.approx(gamma * g.P / (r + gamma * g.P), rel=1e-14)
    # The mean field relaxes at rho, and the policy reproduces exactly that rate.
    assert 1 - g.k + g.k * g.c == pytest.approx(g.rho, abs=1e-12)
    assert 0 <= g.rho <= 1
    coeffs = (g.a, -(1 + g.a * (1 - g.k) - g.k * (kappa / w) * (1 - g.a)), 1 - g.k)
    assert abs(np.polyval(coeffs, g.rho)) < 1e-12


def test_rho_below_one_when_signals_anchor_the_mean():
    # With q > 0 the mean field relaxes to sbar strictly; with q = 0 (pure
    # consensus, nothing anchors the mean) rho = 1 is the consistent root.
    assert solve_gains(1.0, 2.0, 0.5, 0.95).rho < 1
    assert solve_gains(0.0, 2.0, 0.5, 0.95).rho == pytest.approx(1.0, abs=1e-12)


def test_kappa_zero_is_the_single_agent_tracker():
    g = solve_gains(1.0, 0.0, 0.5, 0.9)
    assert g.c == 0.0
    assert g.rho == pytest.approx(1 - g.k, abs=1e-15)


def test_riccati_is_the_fixed_point_of_the_value_iteration():
    # Iterate the scalar discounted Riccati map from P = 0: an oracle that
    # knows nothing of the closed form.
    q, kappa, r, gamma = 1.0, 2.0, 0.5, 0.95
    w, P = q + kappa, 0.0
    for _ in range(2000):
        P = w + gamma * P - (gamma * P) ** 2 / (r + gamma * P)
    assert solve_gains(q, kappa, r, gamma).P == pytest.approx(P, rel=1e-12)


def test_negative_b_branch_is_accurate():
    # b = w gamma - r (1 - gamma) < 0: the product form avoids cancellation.
    q, kappa, r, gamma = 1e-6, 0.0, 100.0, 0.2
    g = solve_gains(q, kappa, r, gamma)
    w = q + kappa
    assert w * gamma - r * (1 - gamma) < 0
    # P solves gamma P^2 - b P - w r = 0
    b = w * gamma - r * (1 - gamma)
    assert gamma * g.P**2 - b * g.P - w * r == pytest.approx(0.0, abs=1e-18)
    assert g.P * (1 - g.a) == pytest.approx(w, rel=1e-9)


@pytest.mark.parametrize("policy", ["memoa", "greedy", "local", "consensus"])
def test_policy_coefficients_sum_to_one(policy):
    c = Game(1.0, 2.0, 0.5, 0.95, policy).coefficients
    assert c.signal + c.signal_mean + c.state_mean == pytest.approx(1.0, abs=1e-15)
    assert 0 < c.gain < 1


def test_memoa_coefficients_are_the_spec_policy(rng):
    game = Game(1.0, 2.0, 0.5, 0.95)
    g, c = game.gains, game.coefficients
    x, s, m, sbar = rng.normal(size=4)
    w = game.w
    u_spec = -g.k * (x - (game.q * s + game.kappa * sbar) / w - g.c * (m - sbar))
    u_coef = -c.gain * (x - c.signal * s - c.signal_mean * sbar - c.state_mean * m)
    assert u_coef == pytest.approx(u_spec, rel=1e-13)


def test_greedy_coefficients_are_the_one_step_lookahead(rng):
    game = Game(1.0, 2.0, 0.5, 0.95, "greedy")
    c = game.coefficients
    x, s, m, sbar = rng.normal(size=4)
    u_spec = (game.q * s + game.kappa * m - game.w * x) / (game.w + game.r)
    assert -c.gain * (x - c.signal * s - c.signal_mean * sbar - c.state_mean * m) == pytest.approx(u_spec, rel=1e-13)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(q=-1.0), ValueError, ["q", "-1.0", "[0"]),
        (dict(kappa=-0.5), ValueError, ["kappa", "-0.5"]),
        (dict(q=0.0, kappa=0.0), ValueError, ["q + kappa", "> 0"]),
        (dict(r=0.0), ValueError, ["r", "0.0", "(0"]),
        (dict(r=-2.0), ValueError, ["r", "-2.0"]),
        (dict(gamma=0.0), ValueError, ["gamma", "(0, 1]"]),
        (dict(gamma=1.5), ValueError, ["gamma", "1.5"]),
        (dict(gamma=float("nan")), ValueError, ["gamma", "finite"]),
        (dict(q="1"), TypeError, ["q", "'1'", "real number"]),
        (dict(r=None), TypeError, ["r", "None"]),
        (dict(policy="best"), ValueError, ["policy", "'best'", "memoa"]),
    ],
)
def test_bad_weights_have_clear_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Game(**kwargs)
    for word in words:
        assert word in str(info.value)
