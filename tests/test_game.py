"""The closed-form gains against independent oracles (MODEL.md section 2)."""
import itertools
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import scipy.linalg

from memoa_fast import Game, solve_classes, solve_gains

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


# --------------------------------------------------------------------------- extreme weights (issue 8 item 5)
from decimal import Decimal, getcontext, localcontext  # noqa: E402

from hypothesis import HealthCheck, example, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TINY = np.finfo(np.float64).tiny
HUGE = np.finfo(np.float64).max


def _sqrt(x):
    """``x.sqrt()`` at the context's precision, by Newton steps that double the digits from float64's 15.

    Decimal's own square root spent 5 ms at 4000 digits, two thirds of the property test's time; this one
    0.8 ms. Each step at twice the digits (+10 guard digits) then one at the full precision: the error of a
    step is the square of the last one's, so the last step leaves 10 guard digits of noise, rounded off by
    the unary plus. On 1500 sums of products of floats over 1e-600..1e600 it gave Decimal.sqrt's result
    digit for digit (and it is within an ulp of it in any case).
    """
    if x == 0:
        return x
    ctx = getcontext()
    prec = ctx.prec
    n = x.adjusted() - x.adjusted() % 2  # x = m 10^n, m in [1, 100): m's float sqrt is the 15-digit start
    g = Decimal(math.sqrt(float(x.scaleb(-n)))).scaleb(n // 2)
    digits = 15
    try:
        while digits < prec:
            digits = min(2 * digits, prec)
            ctx.prec = digits + 10
            g = (g + x / g) / 2
        g = (g + x / g) / 2
    finally:
        ctx.prec = prec
    return +g


def reference_gains(q, kappa, r, gamma):
    """Textbook formulas of MODEL.md section 2 in exact-input decimal arithmetic.

    Independent of the library's rescaled forms. The precision (4000 digits) is
    far beyond 50 because the textbook roots cancel: with ratios up to 1e600
    the quadratics lose up to ~2400 digits, and every kept digit must be right.
    Returns P, k, 1 - k, a, rho, c as Decimals.
    """
    with localcontext() as ctx:
        ctx.prec = 4000
        q, kappa, r, gamma = (Decimal(float(v)) for v in (q, kappa, r, gamma))
        w = q + kappa
        b = w * gamma - r * (1 - gamma)
        P = (b + _sqrt(b * b + 4 * gamma * w * r)) / (2 * gamma)
        k = gamma * P / (r + gamma * P)
        e = r / (r + gamma * P)
        a = gamma * e
        B = 1 + a * e - k * (kappa / w) * (1 - a)
        # q = 0: the roots are exactly 1 and 1/gamma (a double root at gamma = 1).
        rho = Decimal(1) if q == 0 else (B - _sqrt(B * B - 4 * a * e)) / (2 * a)
        c = kappa * rho * (1 - a) / (w * (1 - a * rho))
        return P, k, e, a, rho, c


def representable(ref, kappa):
    """None if some gain sits within 1e-9 of the float64 normal range's edges (either outcome is fine)."""
    ok = True
    for i, v in enumerate(ref):
        if i == 5 and kappa == 0:
            continue
        f = float(v)
        if TINY * (1 - 1e-9) <= f <= TINY * (1 + 1e-9) or HUGE * (1 - 1e-9) <= f:
            return None
        ok &= bool(TINY <= f < HUGE)
    return ok


def assert_gains_accurate(q, kappa, r, gamma, rtol=4e-15):
    ref = reference_gains(q, kappa, r, gamma)
    expect = representable(ref, kappa)
    if expect is None:
        return
    if not expect:
        with pytest.raises(ValueError) as info:
            solve_gains(q, kappa, r, gamma)
        for word in ("not representable", f"q={float(q)!r}", f"r={float(r)!r}"):
            assert word in str(info.value)
        return
    g = solve_gains(q, kappa, r, gamma)
    got = (g.P, g.k, g.a / gamma, g.a, g.rho, g.c)
    for name, value, exact in zip(("P", "k", "1-k", "a", "rho", "c"), got, ref):
        if exact == 0:
            assert value == 0.0, (name, value)
            continue
        err = abs((Decimal(value) - exact) / exact)
        assert err <= rtol, f"{name}: got {value!r}, exact {float(exact)!r}, relative error {float(err):.3g} for q={q!r}, kappa={kappa!r}, r={r!r}, gamma={gamma!r}"


log_weight = st.floats(-300.0, 300.0).map(lambda t: 10.0**t)
weight_or_zero = st.one_of(st.just(0.0), log_weight, log_weight, log_weight)
discount = st.one_of(
    st.just(1.0),
    st.floats(-300.0, 0.0).map(lambda t: 10.0**t),  # log-uniform in [1e-300, 1]
    st.floats(-16.0, -0.1).map(lambda t: 1.0 - 10.0**t),  # close to 1
)


@seed(20261129)
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
@given(q=weight_or_zero, kappa=weight_or_zero, r=log_weight, gamma=discount)
def test_gains_are_accurate_for_any_weights(q, kappa, r, gamma):
    """Relative error <= 4e-15 (the README: "a few ulps") on P, k, 1-k, a, rho, c, or a ValueError exactly
    where a gain is outside float64's normal range (log-uniform weights in
    [1e-300, 1e300], so ratios reach 1e600).
    """
    if q + kappa == 0:
        return
    assert_gains_accurate(q, kappa, r, gamma)


@pytest.mark.parametrize(
    "q,kappa,r,gamma",
    [
        (1.0, 1e16, 0.1, 0.9),  # used to raise ZeroDivisionError
        (1e155, 1.0, 0.1, 0.9),  # used to give NaN/inf (b^2 overflowed)
        (1.0, 1e155, 0.1, 0.9),
        (1e155, 1e155, 0.1, 0.9),
        (1.0, 1.0, 1e308, 0.9),
        (1.0, 1e8, 0.1, 0.9),  # rho was off by 9e-8
        (1.0, 1e12, 0.1, 0.9),  # rho was off by 1.8e-4
        (1.0, 1.0, 1e-8, 0.9),  # a was off by 1e-4 relative
        (1.0, 2.0, 0.5, 0.95),
        (1e-300, 1e300, 1.0, 0.5),
        (1e300, 1e-300, 1e-300, 1.0),  # 1 - k ~ 1e-600: not representable
        (1e-300, 0.0, 1e300, 1.0),  # k ~ 1e-300
        (1e-300, 0.0, 1e300, 0.5),  # k ~ 1e-600: not representable
        (1.0, 1.0, 1.0, 1e-300),
        (0.0, 1e300, 1e-300, 0.9),
        # gamma = 1 and (q+kappa)/r < 1e-300: c's product kappa/w * rho * (1-a) underflowed before its division
        # (a ValueError "c = 0.0" where c = 5.8e-257), and the mean-field quadratic's terms (of order k^2) underflowed,
        # so 1 - rho was taken as 0 and c came out twice too large (the numerical audit)
        (126.38148091724337, 1.4724031462150992e-254, 7.484035172066521e161, 1.0),
        (6.978664952858547e-186, 5.362960920236335e-299, 2.130908391469481e170, 1.0),
        (1e-10, 1e-10, 1e300, 1.0),
        (1e-10, 1e-300, 1e300, 1.0),
    ],
)
def test_extreme_weight_reproducers(q, kappa, r, gamma):
    assert_gains_accurate(q, kappa, r, gamma)


def test_unrepresentable_gains_name_the_weights():
    with pytest.raises(ValueError, match=r"not representable.*q=1e\+300, kappa=0.0, r=1e-300.*1 - k"):
        Game(q=1e300, kappa=0.0, r=1e-300, gamma=0.5)


# --------------------------------------------------------------------------- value semantics (issue 8 item 16)


def test_game_is_immutable_hashable_and_equal_by_value():
    import copy
    import pickle

    game = Game(1.0, 2.0, 0.5, 0.95)
    for name in ("q", "kappa", "r", "gamma", "policy", "gains", "coefficients", "table", "shares", "classes", "feedforward"):
        with pytest.raises(AttributeError, match=f"Game is immutable: cannot set '{name}'"):
            setattr(game, name, 1.0)
    with pytest.raises(AttributeError, match="immutable"):
        game.extra = 1  # no new attributes either
    with pytest.raises(AttributeError, match="immutable"):
        del game.q
    with pytest.raises(ValueError, match="read-only"):
        game.table.coef[0, 0] = 0.0
    twin = Game(1.0, 2.0, 0.5, 0.95)
    assert twin == game and hash(twin) == hash(game) and len({game, twin}) == 1
    assert game != Game(1.0, 2.0, 0.5, 0.95, "greedy") and game != Game(1.0, 2.0, 0.5, 0.95, feedforward=False)
    assert game != game.to_dict()  # a dict is not a Game
    assert pickle.loads(pickle.dumps(game)) == game and copy.copy(game) is game
    assert {game: 1}[Game(**game.to_dict())] == 1
    assert game.with_policy("local") == Game(1.0, 2.0, 0.5, 0.95, "local")
    assert game.with_weights(kappa=3.0) == Game(1.0, 3.0, 0.5, 0.95)


def test_feedforward_false_single_class():
    game = Game(1.0, 2.0, 0.5, 0.95, feedforward=False)
    c = game.coefficients
    assert (c.gain, c.signal, c.signal_mean, c.state_mean) == (game.gains.k, 1 / 3, 2 / 3, 0.0)
    assert repr(game) == "Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95, policy='memoa', feedforward=False)"
    assert Game(**game.to_dict()) == game


# --------------------------------------------------------------------------- weights: dtypes are checked, not cast
@pytest.mark.parametrize("name", ["q", "kappa", "r", "shares"])
@pytest.mark.parametrize("bad", [
    np.array([1 + 2j, 1.0]),                      # used to drop the imaginary part (a ComplexWarning at most)
    np.array(["0.5", "0.5"]),                     # used to be parsed as numbers
    np.array("1"),                                # a 0-d string array, too
    np.array([np.datetime64(1, "s"), np.datetime64(1, "s")]),
    np.array([None, 0.5], dtype=object),          # used to say "must be finite, got nan"
    [0.5, "0.5"],
    [True, 0.5],
])
def test_weights_of_a_non_real_dtype_are_refused_naming_the_argument(name, bad):
    kwargs = {"q": [1.0, 2.0]} if name == "shares" else {}
    with pytest.raises(TypeError, match=f"^{name} must"):
        Game(**kwargs, **{name: bad})


def test_weights_of_real_dtypes_and_numbers_still_work():
    from fractions import Fraction

    want = Game(q=[0.5, 1.0], kappa=2.0, r=[0.25, 0.25], shares=[0.25, 0.75])
    assert Game(q=np.array([0.5, 1.0], dtype=np.float32), kappa=np.int8(2), r=np.array(0.25), shares=np.array([1, 3]) / 4) == want
    assert Game(q=[Fraction(1, 2), 1], kappa=np.array([2, 2], dtype=np.uint16), r=0.25, shares=(0.25, np.float64(0.75))) == want


@pytest.mark.parametrize("value", [np.array(3.0), np.array(3), Fraction(3), np.float32(3.0)])
def test_with_weights_takes_a_scalar_weight_as_game_does(value):
    """``with_weights(q=np.array(3.0))`` raised TypeError "len() of unsized object"; Game(q=np.array(3.0)) works."""
    game = Game(q=[1.0, 2.0], kappa=3.0, r=0.1, gamma=0.9, shares=[0.3, 0.7])
    assert game.with_weights(q=value) == Game(q=3.0, kappa=3.0, r=0.1, gamma=0.9, shares=[0.3, 0.7]) == Game(
        q=[3.0, 3.0], kappa=3.0, r=0.1, gamma=0.9, shares=[0.3, 0.7])
    assert Game(q=1.0).with_weights(kappa=value) == Game(q=1.0, kappa=3.0)


def test_a_decimal_weight_is_a_number_alone_as_in_a_sequence():
    """``Game(q=Decimal(1))`` said "got shape ()" while ``Game(q=[Decimal(1), 1])`` worked."""
    from decimal import Decimal

    assert Game(q=Decimal("0.5"), kappa=Decimal(2), r=Decimal("0.25")) == Game(q=0.5, kappa=2.0, r=0.25)
    with pytest.raises(ValueError, match=r"^r must be in \(0, inf\), got 0.0"):
        Game(r=Decimal(0))
    # a 0-d object array is a weight as a one-element object array is (it was a TypeError), its element checked alike
    assert Game(q=np.array(Decimal("0.5"), dtype=object), kappa=np.array(2.0, dtype=object)) == Game(q=0.5, kappa=2.0)
    with pytest.raises(TypeError, match=r"None of type NoneType is not a real number"):
        Game(q=np.array(None, dtype=object))


@pytest.mark.parametrize("kwargs, where", [({"q": 10**400}, "q"), ({"kappa": [1.0, -10**400]}, "kappa[1]"),
                                           ({"gamma": 10**400}, "gamma"), ({"r": Fraction(10**400, 3)}, "r"),
                                           ({"q": [1.0, 2.0], "shares": [10**400, 1]}, "shares[0]")])
def test_a_number_beyond_float64_is_refused_naming_it(kwargs, where):
    """A Python int or Fraction beyond float64 raised OverflowError "int too large to convert to float", naming nothing."""
    with pytest.raises(ValueError, match=rf"^{re.escape(where)} must be a finite float64 \(at most 1.8e308 in magnitude\)"):
        Game(**kwargs)
    with pytest.raises(ValueError, match=r"^q must be a finite float64 .* in \[0, inf\), got 1000.*\.\.\..*0 \(401 characters\)"):
        solve_gains(10**400, 1.0, 0.1, 0.9)


_LONG_DOUBLE_IS_WIDER = np.finfo(np.longdouble).max > np.finfo(np.float64).max  # x86-64 Linux; not Windows


@pytest.mark.parametrize("kwargs, where, shown", [
    ({"q": Decimal("1e400")}, "q", "Decimal('1E+400')"),
    ({"kappa": [1.0, Decimal("-1e400")]}, "kappa[1]", "Decimal('-1E+400')"),
    *([({"r": np.longdouble("1e400")}, "r", "1e+400"), ({"kappa": [1.0, np.longdouble("-1e400")]}, "kappa[1]", "-1e+400"),
       ({"q": np.array([np.longdouble(1), np.longdouble("1e400")])}, "q[1]", "1e+400")] if _LONG_DOUBLE_IS_WIDER else [])])
def test_a_decimal_or_long_double_beyond_float64_is_refused_as_such(kwargs, where, shown):
    """float() makes these inf without an OverflowError: the message said "got inf", a value never passed, and a long
    double in a sequence raised NumPy's RuntimeWarning "overflow encountered in cast" first (an error under -W error).
    """
    with pytest.raises(ValueError, match=rf"^{re.escape(where)} must be a finite float64 \(at most 1.8e308 in magnitude\).*"
                                         rf"got [^;]*{re.escape(shown)}"):
        Game(**kwargs)
    with pytest.raises(ValueError, match=r"^q must be finite, got inf"):  # infinite as given: said so, as before
        Game(q=Decimal("Infinity"))


@pytest.mark.parametrize("value", [np.array(0.9), np.float32(0.9), np.array(9, dtype=np.int8) / 10])
def test_gamma_and_scalar_arguments_accept_numpy_zero_d_reals(value):
    """Weights accepted a 0-d array but gamma, solve_gains' arguments and the scalar checks did not."""
    assert Game(gamma=value) == Game(gamma=float(value))
    assert solve_gains(np.array(1.0), np.array(1.0), np.array(0.1), value) == solve_gains(1.0, 1.0, 0.1, float(value))


@pytest.mark.parametrize("bad, error", [(np.array(True), TypeError), (np.array("0.9"), TypeError), (np.array([0.9]), TypeError),
                                        (np.array(0.9 + 0j), TypeError), (np.array(np.nan), ValueError)])
def test_gamma_refuses_other_arrays(bad, error):
    with pytest.raises(error, match="^gamma must"):
        Game(gamma=bad)


def test_max_iter_bool_is_a_type_error():
    from memoa_fast.game import solve_classes

    with pytest.raises(TypeError, match="max_iter must be an integer >= 1, got True"):
        solve_classes([1.0, 2.0], 1.0, 0.1, 0.9, method="iterate", max_iter=True)


@pytest.mark.parametrize("r_slow", [1e15, 1e16, 1e17])
def test_class_equilibrium_with_a_nearly_unit_class(r_slow):
    """A class with 1 - k_j within a few ulps of 1 (r_j/w_j = 1e17/3.25 at gamma = 0.9, k_j = 3e-16).

    The equilibrium exists (spectral radius 1 - 1.1e-16, representable) and the plain iteration finds it
    in 44 steps; the default direct (QZ) solve returned a garbage A (spectral radius 50) and raised "no
    stable K-class equilibrium" (the numerical audit).
    """
    args = ([2.0, 1.0, 0.25], 3.0, [0.1, 0.1, r_slow], 0.9, [0.2, 0.5, 0.3])
    eq = solve_classes(*args)
    ref = solve_classes(*args, method="iterate")
    assert eq.spectral_radius < 1.0 and eq.residual <= 1e-14
    np.testing.assert_allclose(eq.A, ref.A, rtol=0, atol=1e-14)
    np.testing.assert_allclose(eq.C, ref.C, rtol=0, atol=1e-14)
    assert Game(*args[:4], shares=args[4]).classes.A.shape == (3, 3)


def test_class_equilibrium_with_a_unit_class_names_the_class():
    # k_3 = 2.9e-17: 1 - k_3 rounds to 1, so A would have the eigenvalue 1; the message said "no unique stable
    # equilibrium" (the pencil's count), not why.
    with pytest.raises(ValueError, match=r"1 - k of class 2 rounds to 1 \(k = 2.92.*e-17\)"):
        solve_classes([2.0, 1.0, 0.25], 3.0, [0.1, 0.1, 1e18], 0.9, [0.2, 0.5, 0.3])


# Weights where the class-mean transition hinges on 1 - sum_j pi_j kappa_j/w_j = 8e-15 with k_j = 1 - 1e-19: A's
# largest eigenvalue is 6.1e-6 (the root of the secular equation below), but the pencil formed in float64 has
# eigenvalues 6.6e-20 and 1.8e-12, and the iteration moves by 5e-20 per step (the numerical audit).
ILL_CONDITIONED = ([0.001, 0.0], [6.21907044e10, 4.88153497e15], [3.06157938e-09, 7.15207651e-11], 0.5, [0.5, 0.5])


def secular_root(q, kappa, r, gamma, shares):
    """Largest root in (max (1-k_j), 1) of sum_j pi_j beta_j l / ((l - (1-k_j))(1 - a_j l)) = 1, bisected in 80 digits."""
    g = [solve_gains(qj, kj, rj, gamma) for qj, kj, rj in zip(q, kappa, r)]
    with localcontext() as ctx:
        ctx.prec = 80
        e = [Decimal(x.a) / Decimal(gamma) for x in g]
        a = [Decimal(x.a) for x in g]
        beta = [(1 - ej) * (1 - aj) * Decimal(kj) / (Decimal(qj) + Decimal(kj)) for ej, aj, qj, kj in zip(e, a, q, kappa)]
        pi = [Decimal(p) for p in shares]

        def f(lam):
            return sum(p * b * lam / ((lam - ej) * (1 - aj * lam)) for p, b, ej, aj in zip(pi, beta, e, a)) - 1

        lo, hi = max(e) * (1 + Decimal("1e-30")), Decimal("0.5")
        assert f(lo) > 0 > f(hi)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        return float(lo)


def test_ill_conditioned_iteration_does_not_stop_on_an_absolute_floor():
    # The iteration stopped after one step (a change of 5e-20 was below the absolute floor 4 eps) and returned
    # eigenvalues 2e-19 and 3e-26 for 6.1e-6: now it either converges to the root or says it did not converge.
    root = secular_root(*ILL_CONDITIONED)
    assert 6e-6 < root < 6.2e-6
    try:
        eq = solve_classes(*ILL_CONDITIONED, method="iterate")
    except ValueError as exc:
        assert "did not converge" in str(exc)
    else:
        assert np.max(np.abs(np.linalg.eigvals(eq.A))) == pytest.approx(root, rel=1e-6)


def test_ill_conditioned_direct_solve_finds_the_secular_root():
    # The pencil formed in float64 has lost this eigenvalue (its eigenvalues are 6.6e-20 and 1.8e-12); the secular
    # equation evaluated without the cancellation of 1 - sum_j pi_j beta_j finds it, and decides.
    eq = solve_classes(*ILL_CONDITIONED)
    assert eq.method == "secular"
    assert np.max(np.abs(np.linalg.eigvals(eq.A))) == pytest.approx(secular_root(*ILL_CONDITIONED), rel=1e-6)


def secular_roots(q, kappa, r, gamma, shares, total=None):
    """Every root in (0, 1) of the secular equation above (one per gap between the sorted distinct poles 1 - k_j, one
    in (max 1 - k_j, 1), and a pole shared by m classes m - 1 times), bisected in 90 digits; None where a bracket
    does not change sign (no stable equilibrium). The shares are taken as summing to 1 (MODEL.md section 7): divided
    by their exact sum, or by ``total`` (the sum of every class's share, when ``shares`` leaves some classes out).
    """
    g = [solve_gains(qj, kj, rj, gamma) for qj, kj, rj in zip(q, kappa, r)]
    with localcontext() as ctx:
        ctx.prec = 90
        a = [Decimal(x.a) for x in g]
        e = [aj / Decimal(gamma) for aj in a]
        # k = 1 - e from the accurate a: the float k rounds to 1 where e is 4e-17 (and 1 - k matters: 1 - beta ~ 1e-16)
        beta = [(1 - ej) * (1 - aj) * Decimal(kj) / (Decimal(qj) + Decimal(kj)) for ej, aj, qj, kj in zip(e, a, q, kappa)]
        norm = sum(Decimal(p) for p in shares) if total is None else Decimal(total)
        pi = [Decimal(p) / norm for p in shares]

        def f(lam):
            return sum(p * b * lam / ((lam - ej) * (1 - aj * lam)) for p, b, ej, aj in zip(pi, beta, e, a)) - 1

        poles = sorted(set(e))
        roots = [float(p) for p in poles for _ in range(e.count(p) - 1)]
        for lo, hi in zip(poles, [*poles[1:], Decimal(1)]):
            lo, hi = lo + (hi - lo) * Decimal("1e-60"), hi - (hi - lo) * Decimal("1e-60")
            if not f(lo) > 0 > f(hi):
                return None
            for _ in range(300):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
            roots.append(float(lo))
        return np.array(roots)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(2, 4), gamma=st.sampled_from([0.5, 0.9, 0.999, 1.0]),
       ill=st.booleans())
def test_direct_solve_finds_every_secular_root(seed, K, gamma, ill):
    """A's eigenvalues are the secular roots (90 digits) to 1e-9 of the largest, for ordinary weights and for the
    ill-conditioned class: every 1 - k_j in 1e-24..1e-12 and q_j/w_j in 1e-16..1e-8 (or 0), so that
    1 - sum_j pi_j beta_j is 1e-16..1e-8. Before the secular check, QZ was wrong (by more than 1e-6 of the largest
    root, up to 100%) in 268 of 295 such games (a stress run of notes/xfail.md); ordinary games keep QZ's result.
    """
    rng = np.random.default_rng(seed)
    if ill:
        kappa = 10.0 ** rng.uniform(8, 16, K)
        q = kappa * 10.0 ** rng.uniform(-16, -8, K) * (rng.random(K) > 0.3)
        q[0] = q[0] or kappa[0] * 1e-12
        r = (q + kappa) * 10.0 ** rng.uniform(-24, -12, K)
    else:
        q, kappa, r = (10.0 ** rng.uniform(-3, 3, K) for _ in range(3))
    shares = rng.dirichlet(np.ones(K))
    args = (q.tolist(), kappa.tolist(), r.tolist(), gamma, (shares / shares.sum()).tolist())
    want = secular_roots(*args)
    # The shares sum to 1 (MODEL.md): q_0 > 0 anchors the mean, so there is a stable equilibrium however small the
    # anchor is next to the shares' own rounding (sum 1 +- 1e-16), which was refused ("no stable equilibrium").
    assert want is not None
    eq = solve_classes(*args)
    got = np.sort(np.abs(np.linalg.eigvals(eq.A)))
    assert np.max(np.abs(got - np.sort(want))) <= 1e-9 * want.max(), (eq.method, got, want)
    if not ill:
        assert eq.method == "qz"



# k_j rounds to 1 in float64 in both classes (1 - k_j = 3.8e-17 and 1.1e-15), and 1 - sum_j pi_j beta_j is 1e-16, so the
# largest root (0.7538617236, 80-digit closed form of the exact weights, shares summing to 1) hinges on 1 - k_j: the
# secular function took it as 1 - float(k_j) = 0 and found 0.856 (so did this file's 90-digit oracle, which built
# beta from the float k); the shares' own sum, 1 + 5.6e-17, moved it too (to 0.8166, with 1 - k_j exact).
K_ROUNDS_TO_ONE = ([0.002651439305462128, 1.952157233585824e-06], [12465034893647.64, 14397719560.836327],
                   [0.00023731369848950263, 8.170571633540893e-06], 0.5, [0.31740082050285306, 0.682599179497147])


def test_secular_root_where_k_rounds_to_one():
    eq = solve_classes(*K_ROUNDS_TO_ONE)
    assert np.max(np.abs(np.linalg.eigvals(eq.A))) == pytest.approx(0.7538617236, rel=1e-9)
    assert secular_roots(*K_ROUNDS_TO_ONE).max() == pytest.approx(0.7538617236, rel=1e-9)

@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(3, 4), gamma=st.sampled_from([0.5, 0.9, 0.999, 1.0]))
def test_direct_solve_with_a_class_without_signal_weight(seed, K, gamma):
    """A class with kappa_z = 0 (beta_z = 0) has no pole in the secular equation: its e_z = 1 - k_z is an eigenvalue
    of A of its own, and the other K - 1 are the secular roots of the other classes. In the ill-conditioned class
    (as in test_direct_solve_finds_every_secular_root) QZ was wrong by up to 18% of the largest root in 61 of 150
    such games, and the secular check, bisecting a bracket with no sign change at that pole, could not replace it.
    """
    rng = np.random.default_rng(seed)
    kappa = 10.0 ** rng.uniform(8, 16, K)
    q = kappa * 10.0 ** rng.uniform(-16, -8, K) * (rng.random(K) > 0.3)
    q[0] = q[0] or kappa[0] * 1e-12
    r = (q + kappa) * 10.0 ** rng.uniform(-24, -12, K)
    z = int(rng.integers(1, K))
    kappa[z], q[z] = 0.0, q[z] or 1e-4
    r[z] = q[z] * 10.0 ** rng.uniform(-20, -4)
    shares = rng.dirichlet(np.ones(K)).tolist()
    keep = [j for j in range(K) if j != z]
    total = sum(Decimal(p) for p in shares)  # the pole-free class keeps its share of the mean
    others = secular_roots(*([v[j] for j in keep] for v in (q, kappa, r)), gamma, [shares[j] for j in keep], total)
    assert others is not None  # the shares sum to 1 and q_0 > 0: a stable equilibrium (see above)
    eq = solve_classes(q.tolist(), kappa.tolist(), r.tolist(), gamma, shares)
    want = np.sort(np.append(others, eq.one_minus_k[z]))
    got = np.sort(np.abs(np.linalg.eigvals(eq.A)))
    assert np.max(np.abs(got - want)) <= 1e-9 * want.max(), (eq.method, got, want)


@pytest.mark.parametrize("K", [2, 8, 64])
@pytest.mark.parametrize("tied", [False, True])
def test_ordinary_games_confirm_qz_without_bisecting_the_roots(monkeypatch, K, tied):
    # TrustPopulation builds a K = 8 Game at every reclassing (361 in `memoa run --stream logistic`): bisecting all K
    # secular roots cost 3-4 ms each, 1.3 s of a 33 s run. QZ's eigenvalues are confirmed by the sign of g - 1 on
    # either side of each (the sorted roots' layout is known from the poles), and only a failed check bisects.
    import memoa_fast.game as game_module

    def no_bisection(*args):
        raise AssertionError("the secular roots were bisected for an ordinary game")

    rng = np.random.default_rng(K)
    q, kappa, r = (10.0 ** rng.uniform(-2, 2, K) for _ in range(3))
    if tied:  # classes sharing a pole (the same w/r), as TrustPopulation's first game (every class at q)
        kappa[1:K // 2], q[1:K // 2], r[1:K // 2] = kappa[0], q[0], r[0]
    args = (q.tolist(), kappa.tolist(), r.tolist(), 0.9, rng.dirichlet(np.ones(K)).tolist())
    want = solve_classes(*args)
    monkeypatch.setattr(game_module, "_secular_classes", no_bisection)
    got = solve_classes(*args)
    assert got.method == want.method == "qz"
    assert got.A.tobytes() == want.A.tobytes()


@pytest.mark.parametrize("args, method", [
    (([1e-4, 0.0, 2e-4], [1e12] * 3, [1e-10] * 3, 0.5, [0.3, 0.3, 0.4]), "secular"),  # one pole 2e-22 for all three
    (([1e-4, 3e-4, 2e-4, 1e-3], [1e12, 1e12, 4e13, 4e13], [1e-10, 1e-10, 3e-9, 3e-9], 0.9, [0.1, 0.2, 0.3, 0.4]), "secular"),
    (([2.0, 0.5, 1.0], [1.0, 2.5, 2.0], [0.3] * 3, 0.9, [0.2, 0.5, 0.3]), "qz"),  # w/r the same: ordinary, tied
])
def test_classes_sharing_a_pole_are_solved(args, method):
    # Classes with the same w/r share 1 - k_j: that pole is an eigenvalue of A (m - 1 times for m classes); the secular
    # solve deflates it. In the ill-conditioned regime (1 - k near 1e-22) only it finds the largest root.
    eq = solve_classes(*args)
    want = secular_roots(*args)
    got = np.sort(np.abs(np.linalg.eigvals(eq.A)))
    assert eq.method == method
    assert np.max(np.abs(got - np.sort(want))) <= 1e-9 * want.max(), (got, want)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), K=st.sampled_from([1, 3]), policy=st.sampled_from(["memoa", "greedy", "local", "consensus"]),
       e=st.sampled_from([-1020, -600, 600, 1000, 1022]), anchorless=st.booleans())
def test_every_table_depends_on_the_weights_ratios_only(seed, K, policy, e, anchorless):
    """Scaling q, kappa, r by 2^e (e even: exact, and exact under the square roots) changes no policy table, to the
    bit, wherever the scaled game is accepted, and warns of nothing (warnings are errors in this suite). The greedy
    gain w/(w + r) was 0 when w + r overflowed (q = r = 1e308: a population that never moves, for 1/2), and
    K-class weights with q_j + kappa_j = inf warned of an overflow before the ValueError naming them.
    """
    rng = np.random.default_rng(seed)
    q, kappa, r = (rng.uniform(1.0, 3.9, K) for _ in range(3))  # times 2^1022: up to 0.97 of the largest double
    if anchorless:
        kappa[0] = 0.0
    shares = {} if K == 1 else {"shares": [0.25, 0.25, 0.5]}

    def game(scale):
        weights = [x * scale for x in (q, kappa, r)]
        return Game(*(float(x[0]) for x in weights) if K == 1 else weights, 0.9, policy, **shares)

    base = game(1.0)
    try:
        scaled = game(math.ldexp(1.0, e))
    except ValueError as exc:  # a gain outside the normal range (P ~ w / (1 - a) at 2^1022)
        assert "not representable" in str(exc)
        return
    assert np.array_equal(scaled.table.coef[:, :2], base.table.coef[:, :2])
    assert np.array_equal(scaled.table.mix, base.table.mix)


def test_greedy_gain_where_w_plus_r_overflows():
    assert Game(1e308, 0.0, 1e308, 0.9, "greedy").coefficients.gain == 0.5
    assert Game([1e308, 1.0], 0.0, [1e308, 1.0], 0.9, "greedy").table.coef[:, 0].tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"class 0 are not representable.*q=1e\+308, kappa=1e\+308"):
        Game([1e308, 1.0], [1e308, 1.0], 1.0, 0.9, "greedy")


def slow_root_y(q, kappa, r, gamma, shares):
    """``1 - lam`` of the largest root of the secular equation, from the exact weights: MODEL.md's closed form for
    P and k in 80 digits (not the float gains), bisected in y = 1 - lam (no cancellation of 1 - lam).
    """
    with localcontext() as ctx:
        ctx.prec = 80
        gm = Decimal(gamma)
        e, a, beta = [], [], []
        for qj, kj, rj in zip(q, kappa, r):
            qj, kj, rj = Decimal(qj), Decimal(kj), Decimal(rj)
            w = qj + kj
            b = w * gm - rj * (1 - gm)
            P = (b + (b * b + 4 * gm * w * rj).sqrt()) / (2 * gm)
            k = gm * P / (rj + gm * P)
            e.append(1 - k)
            a.append(gm * (1 - k))
            beta.append(k * (1 - gm * (1 - k)) * kj / w)
        pi = [Decimal(p) for p in shares]

        def g_minus_one(y):
            lam = 1 - y
            return sum(p * bj * lam / ((lam - ej) * (1 - aj * lam)) for p, bj, ej, aj in zip(pi, beta, e, a)) - 1

        lo, hi = Decimal(0), 1 - max(e)
        for _ in range(300):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if g_minus_one(mid) > 0 else (mid, hi)
        return float(lo)


EXACT_SHARES = [[0.5, 0.5], [0.25, 0.75], [0.5, 0.25, 0.25], [0.25] * 4, [0.125, 0.375, 0.5]]  # sums exactly 1 in float64


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), shares=st.sampled_from(EXACT_SHARES), gamma=st.sampled_from([1.0, 0.999999, 0.99]),
       tied=st.booleans())
def test_a_slow_mean_keeps_its_relative_decay(seed, shares, gamma, tied):
    """With q_j/w_j tiny (1e-30..1e-6) the class means relax by only y = 1 - lam per step (about sqrt(q/w)): A's
    slowest eigenvalue must keep y to 1e-9 of itself (+ 64 ulps of 1), and a y below half an ulp of 1 (no float64
    A has that eigenvalue) is refused. The secular equation was evaluated in lam, where 1 - lam cancels: y came out
    84% off at q/w = 1e-16 (1.84e-8 for 1e-8), identical at every q/w below (a mean relaxing 1e10 times too fast at
    1e-20), and QZ's y at q/w = 1e-12 was off by 2e-5 of itself (1.8e-11), within the 1e-9-of-1 check then.
    """
    rng = np.random.default_rng(seed)
    K = len(shares)
    kappa = 10.0 ** rng.uniform(-2, 2, K)
    q = kappa * 10.0 ** rng.uniform(-30, -6, K)
    r = (q + kappa) * 10.0 ** rng.uniform(-2, 2, K)
    if tied:  # identical classes: MODEL.md section 7, "the result equals K = 1"
        q, kappa, r = (np.full(K, x[0]) for x in (q, kappa, r))
    args = (q.tolist(), kappa.tolist(), r.tolist(), gamma, shares)
    y = slow_root_y(*args)
    eps = np.finfo(np.float64).eps
    tol = 1e-9 * y + 64 * eps  # QZ's result stands within this (an A accurate to an ulp has eigenvalues 6 ulps off)
    try:
        eq = solve_classes(*args)
    except ValueError as exc:  # only where 1 - y rounds to 1 (then no float64 A has the root)
        assert y < eps / 2 and re.search(r"rounds to 1 in float64.*q=\[", str(exc)), (y, str(exc))
        return
    assert abs((1.0 - eq.spectral_radius) - y) <= tol, (eq.method, 1.0 - eq.spectral_radius, y)
    assert abs(np.max(np.abs(np.linalg.eigvals(eq.A))) - (1.0 - y)) <= tol, eq.method
    if tied:
        assert abs((1.0 - solve_gains(q[0], kappa[0], r[0], gamma).rho) - y) <= tol


# The review's game (memoa-trust re-formed to it and stopped: exit 2): every gain ties with the others up to its last bits
NEAR_TIED = ([7.575376595806819e-13, 3.494050947935713e-13, 6.811150000754127e-14, 2.3541846426051537e-14,
              2.3038533797178366e-15, 2.938092240871028e-16, 2.0453943070582773e-17, 1.1e-17], [5900.0] * 8, [0.012] * 8,
             0.95, [0.125] * 8)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), shares=st.sampled_from(EXACT_SHARES), gamma=st.sampled_from([1.0, 0.95, 0.6]))
@example(seed=0, shares=[0.125] * 8, gamma=0.95)  # the review's game (NEAR_TIED)
def test_classes_whose_gains_tie_to_the_last_bits_are_solved(seed, shares, gamma):
    """q_j far below one kappa and r: the poles 1 - k_j differ by an ulp or two, so no float lies between two of them
    for the root of their bracket. The secular solve returned nothing there and QZ lost the slow root (7 stable
    eigenvalues found, 8 needed), so such games were refused although they have an equilibrium. Poles a few ulps
    apart are now one pole: its eigenvalue m - 1 times, and the slowest root kept to 1e-9 of itself (+ 64 ulps).
    """
    if len(shares) == 8:
        q, kappa, r, gamma, shares = NEAR_TIED
    else:
        rng = np.random.default_rng(seed)
        K = len(shares)
        kappa0 = 10.0 ** rng.uniform(0, 4)
        kappa, r = [kappa0] * K, [kappa0 * 10.0 ** rng.uniform(-6, -2)] * K
        q = (kappa0 * 10.0 ** rng.uniform(-20, -15, K)).tolist()
    k = np.array([solve_gains(qj, kj, rj, gamma).k for qj, kj, rj in zip(q, kappa, r)])
    assert np.ptp(1.0 - k) <= 8 * np.spacing(np.max(1.0 - k))  # the gains tie in float64 (the class under test)
    y = slow_root_y(q, kappa, r, gamma, shares)
    eps = np.finfo(np.float64).eps
    try:
        eq = solve_classes(q, kappa, r, gamma, shares)
    except ValueError as exc:  # only where 1 - y rounds to 1 (then no float64 A has the root)
        assert y < eps / 2 and "rounds to 1" in str(exc), (y, str(exc))
        return
    assert eq.residual <= 1e-15
    assert abs((1.0 - eq.spectral_radius) - y) <= 1e-9 * y + 64 * eps, (eq.method, 1.0 - eq.spectral_radius, y)
    others = np.sort(np.abs(np.linalg.eigvals(eq.A)))[:-1]
    np.testing.assert_allclose(others, np.max(1.0 - k), rtol=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_classes_whose_gains_nearly_tie_keep_the_slow_root(seed):
    """Poles 1 - k_j 1e-13..1e-11 apart (relative; q_j << kappa): the secular roots between them are floats, within
    an ulp of the exact ones, so their distances to the poles, and the eigenvector entries 1/(lam - e_j), were off
    by eps/gap (1e-4): the secular A failed the residual check and QZ's A stood with 1 - lam off by 1e-5..1e-3 of
    itself (documented: 1e-9 + 64 eps). Each root is now refined as an offset from its nearer pole.
    """
    rng = np.random.default_rng(seed)
    shares = [[0.25, 0.75], [0.125, 0.125, 0.25, 0.5], [0.125] * 8][seed % 3]  # summing to 1 in floats too
    K = len(shares)
    kappa0 = 10.0 ** rng.uniform(0, 4)
    kappa, r = [kappa0] * K, [kappa0 * 10.0 ** rng.uniform(-6, -2)] * K
    q = (kappa0 * 10.0 ** rng.uniform(-13, -11, K)).tolist()
    gamma = 1.0
    y = slow_root_y(q, kappa, r, gamma, shares)
    eq = solve_classes(q, kappa, r, gamma, shares)
    assert eq.residual <= 1e-13
    eps = np.finfo(np.float64).eps
    assert abs((1.0 - eq.spectral_radius) - y) <= 1e-9 * y + 64 * eps, (eq.method, 1.0 - eq.spectral_radius, y)


def _tied_setup(q, kappa, r, gamma, shares):
    """The arguments of ``_secular_classes`` / ``_secular_confirms`` for a game, as solve_classes forms them."""
    import memoa_fast.game as game_module

    q, kappa, r = (np.asarray(x, dtype=np.float64) for x in (q, kappa, r))
    _, k, e, a, _, _ = game_module._gains_arrays(q, kappa, r, gamma)
    oma = (1.0 - gamma) + gamma * k
    w = q + kappa
    return k, e, a, oma, q / w, k * oma * kappa / w, np.asarray(shares, dtype=np.float64), gamma


@pytest.mark.parametrize("shares", [[0.5, 0.5], [0.1, 0.9], [0.9, 0.1]])
@pytest.mark.parametrize("gamma", [0.9, 0.6])
def test_a_tied_pole_group_across_one_half_keeps_its_bracket(shares, gamma):
    """Two classes whose poles 1 - k_j are an ulp or two either side of 1/2 are one pole group; its bracket is
    (largest pole, 1), so 1/2 does not cut it. It was cut at 1/2 from the group's smallest pole: with g - 1 < 0 at
    1/2 (which lies between the two poles) the bracket was (0.5 + 1e-16, 0.5), the secular root came out as 1/2
    for 0.995 (A off by 0.45), and a QZ root anywhere above the pole passed the check (its right end counted as
    the bracket's).
    """
    import memoa_fast.game as game_module

    def pole(r):
        return float(game_module._gains_arrays(np.array([1e-3]), np.array([1.0]), np.array([r]), gamma)[2][0])

    lo, hi = 1e-6, 1e6  # r with 1 - k just below / above 1/2 (1 - k grows with r)
    while np.nextafter(lo, hi) < hi:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if pole(mid) < 0.5 else (lo, mid)
    while pole(hi) <= 0.5:
        hi = float(np.nextafter(hi, np.inf))
    args = _tied_setup([1e-3] * 2, [1.0] * 2, [lo, hi], gamma, shares)
    e = args[1]
    assert e[0] < 0.5 < e[1] and e[1] - e[0] <= 1e-12  # one pole group across 1/2 (the class under test)
    eq = solve_classes([1e-3] * 2, [1.0] * 2, [lo, hi], gamma, shares)
    assert eq.method == "qz"  # ordinary weights: QZ's A is accurate to its last bits
    A, roots = game_module._secular_classes(*args)
    np.testing.assert_allclose(np.sort(roots), np.sort(np.abs(np.linalg.eigvals(eq.A))), rtol=1e-12)
    np.testing.assert_allclose(A, eq.A, rtol=0, atol=1e-12)
    assert game_module._secular_confirms(eq.A, *args)
    lam, X = np.linalg.eig(eq.A)
    lam = lam.real.copy()
    lam[np.argmax(lam)] = 0.5 + 0.5 * np.max(lam)  # a slow root far off
    wrong = (X * lam[None, :]) @ np.linalg.inv(X)
    assert not game_module._secular_confirms(wrong.real, *args)


@pytest.mark.parametrize("shares", [[0.5, 0.5], [0.1, 0.2, 0.7], [1 / 3] * 3])
@pytest.mark.parametrize("ratio", [1e-12, 1e-16, 1e-24, 1e-30])
def test_identical_slow_classes_are_one_class(ratio, shares):
    # The reproducer of the test above: two identical classes with q/w = 1e-16 gave 1 - lam = 1.84e-8 for the closed
    # form's 1.0e-8, and so did every smaller q/w. The shares sum to 1 (MODEL.md section 7), also where the floats
    # do not: 0.1 + 0.2 + 0.7 is 1 - 2.8e-17 exactly, which outweighed the anchor sum_j pi_j q_j/w_j (1e-12 and
    # less) in the secular equation, 1 - lam off by 1.3e-5 of itself at q/w = 1e-12 and 50 times too large at 1e-20.
    one = solve_gains(ratio, 1.0, 1.0, 1.0)
    eq = solve_classes([ratio] * len(shares), 1.0, 1.0, 1.0, shares)
    assert abs((1.0 - eq.spectral_radius) - (1.0 - one.rho)) <= 64 * np.finfo(np.float64).eps
    assert np.max(np.abs(np.linalg.eigvals(eq.A))) == pytest.approx(one.rho, abs=64 * np.finfo(np.float64).eps)


def test_a_mean_slower_than_an_ulp_is_refused():
    # 1 - lam = 1e-20: no float64 A has that eigenvalue; it returned a wrong one (1 - 1.84e-8) silently. (QZ's within
    # 64 ulps of 1 may stand, see above; here QZ and the iteration fail.)
    with pytest.raises(ValueError, match=r"eigenvalue 1\.0 rounds to 1 in float64.*q=\[1e-40, 1e-40\]"):
        solve_classes([1e-40, 1e-40], 1.0, 1.0, 1.0)


@pytest.mark.parametrize("K", [2, 3, 8])
@pytest.mark.parametrize("gamma", [0.5453841753434214, 0.9, 0.99])
@pytest.mark.parametrize("ratio", [1e-15, 1e-17, 1e-20, 1e-40])
def test_a_mean_slower_than_an_ulp_is_refused_whatever_the_path(K, gamma, ratio):
    """Refused exactly where the exact slowest root's 1 - lam rounds to 1 (y <= 2**-54), whichever solve found A.

    With gamma < 1 (1 - lam about q/w, not sqrt(q/w)) QZ's eigenvalue within 64 ulps of 1 stood: eight identical
    classes with q/w = 1e-40 at gamma = 0.545 were accepted with 1 - lam = 4.4e-16 (exact 1e-40), three were refused,
    and a memoa-trust population's up-front check (the games at both ends of q_range) could pass or fail on that.
    """
    kappa, r = 0.003188615666889869, 0.09529630571034957
    q = ratio * kappa
    shares = {2: [0.5, 0.5], 3: [0.25, 0.25, 0.5], 8: [0.125] * 8}[K]  # summing to 1 exactly, as the oracle needs
    y = slow_root_y([q] * K, [kappa] * K, [r] * K, gamma, shares)
    try:
        eq = solve_classes([q] * K, kappa, r, gamma, shares)
    except ValueError as exc:
        assert y <= 2.0**-54 * (1 + 1e-6) and "rounds to 1 in float64" in str(exc), (y, str(exc))
        return
    assert y >= 2.0**-54 * (1 - 1e-6), (y, eq.method, 1.0 - eq.spectral_radius)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.0])
def test_model_md_root_in_unit_interval_does_not_exist_at_q_zero(gamma):
    """MODEL.md section 2 defines rho as "the root in [0, 1)" of the consistency quadratic, and allows q = 0.

    At q = 0 there is no such root: f(1) = a - B + (1 - k) = -k (1-a) q/w = 0 and the product of the roots is
    (1 - k)/a = 1/gamma, so the roots are exactly 1 and 1/gamma (a double root 1 at gamma = 1). The library
    takes rho = 1 (and c = 1), the limit of the root in [0, 1) as q -> 0+ (checked here at q = 1e-12).
    """
    kappa, r = 2.0, 0.5
    g = solve_gains(0.0, kappa, r, gamma)
    k, a = g.k, g.a
    roots = np.sort(np.roots([a, -(1 + a * (1 - k) - k * (1 - a)), 1 - k]).real)
    np.testing.assert_allclose(roots, [1.0, 1.0 / gamma], rtol=1e-7)
    assert not any(0.0 <= x < 1.0 - 1e-7 for x in roots)
    assert (g.rho, g.c) == (1.0, 1.0)
    near = solve_gains(1e-12, kappa, r, gamma)
    assert near.rho < 1.0 and near.rho == pytest.approx(1.0, abs=1e-5) and near.c == pytest.approx(1.0, abs=1e-5)


def test_a_hopeless_iteration_stops_early_and_says_why(monkeypatch):
    # Gains that tie to their last bits contract by 1 - 4e-6 per step: 7e6 steps to converge. The QZ fallback ran all
    # 10,000 of max_iter (1.7 s) before the secular roots solved the game; memoa-trust re-forms such games.
    import memoa_fast.game as game_module

    calls = []
    real_map = game_module._fixed_point_map
    monkeypatch.setattr(game_module, "_fixed_point_map", lambda *args: calls.append(1) or real_map(*args))
    q, kappa, r, gamma, shares = NEAR_TIED
    with pytest.raises(ValueError, match=r"did not converge in max_iter=10000 steps: after \d+ its change .* shrinks by "
                                         r"a factor 0\.99999\d+ per step, so it needs about [0-9.e+]+ more to reach tol=1e-14 or the rounding "
                                         r"floor \(\S+\), over 16 times the \d+ left; stopped early"):
        solve_classes(q, kappa, r, gamma, shares, method="iterate")
    assert len(calls) <= 100
    calls.clear()
    eq = solve_classes(q, kappa, r, gamma, shares)  # QZ fails, the iteration gives up early, the secular roots solve
    assert eq.method == "secular" and len(calls) <= 100


def test_the_early_stop_cuts_only_iterations_that_would_not_converge(monkeypatch):
    # Ordinary to slow means and near ties (q_j/w_j 1e-4 to 1e-20), max_iter 600: every game the iteration stops early
    # is one that the full iteration (the early stop switched off) does not solve in max_iter steps, and every game it
    # solves is the full iteration's, bitwise and in as many steps.
    import memoa_fast.game as game_module

    def solve(*args, early_stop):
        with monkeypatch.context() as m:
            if not early_stop:
                m.setattr(game_module, "_HOPELESS", math.inf)
            try:
                return solve_classes(*args, method="iterate", max_iter=600)
            except ValueError as exc:
                return str(exc)

    rng = np.random.default_rng(5)
    stopped = solved = 0
    for trial in range(12):
        K = int(rng.integers(2, 5))
        kappa0 = 10.0 ** rng.uniform(-2, 4)
        low = -20 if trial % 2 else -4
        q = (kappa0 * 10.0 ** rng.uniform(low, low + 5, K)).tolist()
        kappa, r = [kappa0] * K, (kappa0 * 10.0 ** rng.uniform(-6, -1, K)).tolist()
        gamma, shares = [1.0, 0.95, 0.6][trial % 3], rng.dirichlet(np.ones(K)).tolist()
        shares[-1] = 1.0 - sum(shares[:-1])
        args = (q, kappa, r, gamma, shares)
        full, got = solve(*args, early_stop=False), solve(*args, early_stop=True)
        if isinstance(got, str):
            assert isinstance(full, str) and "stopped early" not in full, (trial, got[:200])
            stopped += "stopped early" in got
        else:
            assert not isinstance(full, str), (trial, full[:200])
            assert got.iterations == full.iterations and got.A.tobytes() == full.A.tobytes(), trial
            assert got.residual <= 1e-13
            solved += 1
    assert stopped >= 2 and solved >= 2, (stopped, solved)  # both sides of the rule are exercised
