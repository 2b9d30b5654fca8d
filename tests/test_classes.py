"""Trust classes: the exact K-class mean-field game (MODEL.md section 7).

Independent checks: the closed form at K = 1; the plain fixed-point
iteration from diag(1 - k) against the direct (QZ) solution; the NumPy
reference kernel simulating 10^5-10^6 agents under ``game.table``; and a
finite-horizon backward recursion for one agent's best response to the
equilibrium mean path.
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from memoa_fast.game import ClassEquilibrium, Game, _single_class_table, _solve_qz, solve_classes, solve_gains
from memoa_fast.kernels import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, SIGNAL, SIZE, Q, R, layout, work_shape
from memoa_fast.kernels import _reference as ref

THREE = dict(q=[2.0, 1.0, 0.25], kappa=[3.0, 1.0, 4.0], r=[0.1, 0.5, 0.2], gamma=0.9, shares=[0.2, 0.5, 0.3])


def random_classes(rng, K, gamma=0.9):
    return dict(
        q=rng.uniform(0.05, 3.0, K),
        kappa=rng.uniform(0.0, 5.0, K),
        r=10.0 ** rng.uniform(-2, 0.5, K),
        gamma=gamma,
        shares=rng.dirichlet(np.ones(K)),
    )


def fixed_point_map(eq, q, kappa, r, gamma, pi):
    """F(A) of MODEL.md section 7 written out row by row (independent of the library's batched form)."""
    K = eq.A.shape[0]
    A = eq.A
    out = np.empty_like(A)
    for j in range(K):
        g = solve_gains(q[j], kappa[j], r[j], gamma)
        beta = g.k * (1 - g.a) * kappa[j] / (q[j] + kappa[j])
        row = pi @ A @ np.linalg.inv(np.eye(K) - g.a * A)
        out[j] = beta * row
        out[j, j] += 1 - g.k
    return out


# --------------------------------------------------------------------------- K = 1


@pytest.mark.parametrize("q,kappa,r,gamma", [(1.0, 2.0, 0.5, 0.95), (0.3, 10.0, 0.01, 0.9), (5.0, 0.5, 4.0, 0.3), (1.0, 0.0, 0.5, 0.9)])
def test_one_class_is_the_closed_form(q, kappa, r, gamma):
    g = solve_gains(q, kappa, r, gamma)
    eq = solve_classes(q, kappa, r, gamma)
    assert eq.method == "closed-form" and eq.A[0, 0] == g.rho and eq.C[0, 0] == g.c  # bitwise
    assert eq.lam.tolist() == [1.0] and eq.spectral_radius == g.rho
    # The general machinery at K = 1 finds the same rho.
    e = np.array([g.a / gamma])
    beta = np.array([g.k * (1 - g.a) * kappa / (q + kappa)])
    A, radius = _solve_qz(e, np.array([g.a]), beta, np.array([1.0]), q, kappa, r, gamma)
    assert abs(A[0, 0] - g.rho) <= 2e-16
    # Two identical classes: A has the eigenvalues rho and 1 - k.
    for method, tol in (("qz", 2e-15), ("iterate", 1e-13)):
        two = solve_classes([q, q], [kappa, kappa], [r, r], gamma, method=method, tol=1e-16)
        eig = np.sort(np.linalg.eigvals(two.A).real)
        np.testing.assert_allclose(eig, np.sort([g.rho, g.a / gamma]), rtol=0, atol=tol)
    # (The iteration contracts slowly when k is near 1 -- 861 steps at r = 0.01 --
    # and its rounding floor is then residual / (1 - ratio), about 3e-14.)


@pytest.mark.parametrize("policy", ["memoa", "greedy", "local", "consensus"])
@pytest.mark.parametrize("feedforward", [True, False])
def test_one_class_table_is_bitwise_the_single_class_table(policy, feedforward):
    if policy != "memoa" and not feedforward:
        return
    game = Game(1.0, 2.0, 0.5, 0.95, policy, feedforward=feedforward)
    expected = _single_class_table(game.coefficients, 1.0, 2.0, 0.5)
    assert game.n_classes == 1 and game.shares is None
    assert game.table.coef.tobytes() == expected.coef.tobytes()
    assert game.table.mix.tobytes() == expected.mix.tobytes()
    # A length-1 sequence is the single-class game too.
    assert Game([1.0], [2.0], [0.5], 0.95, policy, feedforward=feedforward) == game


def test_one_class_game_is_unchanged():
    game = Game(1.0, 2.0, 0.5, 0.95)
    assert repr(game) == "Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95, policy='memoa')"
    assert game.to_dict() == {"q": 1.0, "kappa": 2.0, "r": 0.5, "gamma": 0.95, "policy": "memoa"}
    assert isinstance(game.q, float) and game.gains == solve_gains(1.0, 2.0, 0.5, 0.95)
    assert isinstance(game.classes, ClassEquilibrium) and game.classes.A[0, 0] == game.gains.rho
    co = game.coefficients
    assert (co.gain, co.signal, co.signal_mean, co.state_mean) == (game.gains.k, 1 / 3, 2 / 3 - game.gains.c, game.gains.c)


# --------------------------------------------------------------------------- identical classes


@pytest.mark.parametrize("policy", ["memoa", "greedy", "local", "consensus"])
@pytest.mark.parametrize("K", [2, 5])
def test_identical_classes_are_one_class(policy, K, rng):
    one = Game(1.0, 2.0, 0.5, 0.95, policy)
    shares = rng.dirichlet(np.ones(K))
    many = Game(1.0, 2.0, 0.5, 0.95, policy, shares=shares)
    assert many.n_classes == K
    t1, tk = one.table, many.table
    for col in (GAIN, SIGNAL, Q, KAPPA, R):
        np.testing.assert_allclose(tk.coef[:, col], t1.coef[0, col], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(tk.coef[:, SIZE], shares)
    # Offsets collapse: with the global means pooled by the shares (column K), every class's mix row is the
    # single-class one spread over the shares (memoa weighs the class means, greedy and consensus the global ones).
    assert tk.mix.shape == (2, K, K + 1) and t1.mix.shape == (2, 1, 2) and not t1.mix[:, :, 1].any()
    for plane in (MIX_SIGNAL, MIX_STATE):
        pooled = tk.mix[plane, :, :K] + np.outer(tk.mix[plane, :, K], shares)
        np.testing.assert_allclose(pooled, t1.mix[plane, 0, 0] * np.outer(np.ones(K), shares), atol=1e-12)
    # So for any class means the offsets are the single-class offset of the pooled means.
    m, sbar = rng.normal(size=K), rng.normal(size=K)
    off_k = (tk.mix[MIX_SIGNAL, :, :K] @ sbar + tk.mix[MIX_STATE, :, :K] @ m
             + tk.mix[MIX_SIGNAL, :, K] * (shares @ sbar) + tk.mix[MIX_STATE, :, K] * (shares @ m))
    off_1 = t1.mix[MIX_SIGNAL, 0, 0] * (shares @ sbar) + t1.mix[MIX_STATE, 0, 0] * (shares @ m)
    np.testing.assert_allclose(off_k, off_1, atol=1e-12)
    if policy == "memoa":
        eq = many.classes
        rho = one.gains.rho
        # A = (1-k) I + (rho - (1-k)) 1 pi': eigenvalues rho (once) and 1-k.
        np.testing.assert_allclose(eq.A, (1 - one.gains.k) * np.eye(K) + (rho - 1 + one.gains.k) * np.outer(np.ones(K), shares), atol=1e-13)
        assert eq.spectral_radius == pytest.approx(max(rho, 1 - one.gains.k), abs=1e-13)


# --------------------------------------------------------------------------- the fixed point


@pytest.mark.parametrize("seed", range(4))
def test_A_is_a_stable_fixed_point(seed):
    rng = np.random.default_rng(seed)
    w = random_classes(rng, 3 + seed)
    eq = solve_classes(**w)
    q, kappa, r, gamma, pi = (np.broadcast_to(w[k], (len(w["shares"]),)) if k != "gamma" else w[k] for k in ("q", "kappa", "r", "gamma", "shares"))
    np.testing.assert_allclose(fixed_point_map(eq, q, kappa, r, gamma, pi), eq.A, rtol=0, atol=1e-13)
    assert eq.residual <= 1e-13
    radius = np.max(np.abs(np.linalg.eigvals(eq.A)))
    assert radius < 1 and radius == pytest.approx(eq.spectral_radius, abs=1e-12)
    # Identities: A = diag(1-k) + diag(k) C; lam on the simplex, weighted by shares and q/w.
    np.testing.assert_allclose(eq.A, np.diag(eq.one_minus_k) + eq.k[:, None] * eq.C, atol=1e-15)
    np.testing.assert_allclose(eq.lam, pi * q / (q + kappa) / np.sum(pi * q / (q + kappa)), rtol=1e-14)
    np.testing.assert_allclose(eq.P * (1 - eq.a), q + kappa, rtol=1e-14)
    # Eigenvalues of A are the secular roots sum_j pi_j beta_j lam / ((lam - e_j)(1 - a_j lam)) = 1 in (0, 1).
    beta = eq.k * (1 - eq.a) * kappa / (q + kappa)
    for lam in np.linalg.eigvals(eq.A).real:
        assert np.sum(pi * beta * lam / ((lam - eq.one_minus_k) * (1 - eq.a * lam))) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("K", [2, 8, 64])
def test_iteration_from_diag_converges_to_the_direct_solution(K):
    """MODEL.md: the iteration from diag(1 - k_j) converges; it is linear, the QZ solution direct."""
    rng = np.random.default_rng(K)
    w = random_classes(rng, K)
    direct = solve_classes(**w)
    it = solve_classes(**w, method="iterate")
    np.testing.assert_allclose(it.A, direct.A, atol=1e-13)
    np.testing.assert_allclose(it.C, direct.C, atol=1e-13)
    assert direct.iterations == 0 and 5 < it.iterations < 500, it.iterations  # measured 30-60
    assert direct.residual <= 1e-14 and it.residual <= 1e-14
    assert direct.spectral_radius < 1


def test_no_stable_equilibrium_without_an_anchor():
    with pytest.raises(ValueError, match=r"every q_j is 0.*q=\[0.0, 0.0\].*kappa=\[1.0, 2.0\]"):
        solve_classes([0.0, 0.0], [1.0, 2.0], 0.5, 0.9)
    with pytest.raises(ValueError, match="every q_j is 0"):
        Game([0.0, 0.0], [1.0, 2.0], 0.5, 0.9)
    # A baseline does not need the equilibrium.
    assert Game([0.0, 0.0], [1.0, 2.0], 0.5, 0.9, "consensus").classes is None
    # One anchored class is enough.
    assert solve_classes([0.0, 1e-3], [1.0, 2.0], 0.5, 0.9).spectral_radius < 1
    # K = 1 keeps its closed form (rho = 1, c = 1) as before.
    assert Game(0.0, 1.0, 0.5, 0.9).gains.rho == 1.0


# --------------------------------------------------------------------------- the table


def test_memoa_table_is_the_policy(rng):
    game = Game(**THREE)
    eq, t = game.classes, game.table
    q, kappa = np.array(THREE["q"]), np.array(THREE["kappa"])
    w = q + kappa
    x, s = rng.normal(size=2)
    m, sbar = rng.normal(size=3), rng.normal(size=3)
    m_star = eq.lam @ sbar
    M_star = (q * sbar + kappa * m_star) / w
    for j in range(3):
        u_spec = -eq.k[j] * (x - (q[j] * s + kappa[j] * m_star) / w[j] - eq.C[j] @ (m - M_star))
        u_tab = -t.coef[j, GAIN] * (x - t.coef[j, SIGNAL] * s - t.mix[MIX_SIGNAL, j, :3] @ sbar - t.mix[MIX_STATE, j, :3] @ m)
        assert u_tab == pytest.approx(u_spec, rel=1e-13, abs=1e-15)
        assert not t.mix[:, j, 3].any()  # memoa reads the class means only
        # At rest (every class on its target) nobody moves.
        assert t.coef[j, SIGNAL] + t.mix[:, j].sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_array_equal(t.coef[:, SIZE], THREE["shares"])
    assert not t.coef.flags.writeable and not t.mix.flags.writeable

    nff = Game(**THREE, feedforward=False).table
    assert (nff.mix[MIX_STATE] == 0).all() and not nff.mix[:, :, 3].any()
    np.testing.assert_allclose(nff.mix[MIX_SIGNAL, :, :3], np.outer(kappa / w, eq.lam), rtol=1e-15)
    np.testing.assert_array_equal(nff.coef, t.coef)


@pytest.mark.parametrize("policy", ["greedy", "local", "consensus"])
def test_baseline_tables(policy, rng):
    game = Game(**{**THREE, "policy": policy})
    t = game.table
    q, kappa, r, pi = (np.array(THREE[k]) for k in ("q", "kappa", "r", "shares"))
    w = q + kappa
    k = np.array([solve_gains(q[j], kappa[j], r[j], 0.9).k for j in range(3)])
    x, s = rng.normal(size=2)
    m, sbar = rng.normal(size=3), rng.normal(size=3)
    m_all, sbar_all = rng.normal(size=2)  # the means over all agents (column 3), not a fixed mix of the class means
    for j in range(3):
        if policy == "greedy":
            u_spec = -(w[j] / (w[j] + r[j])) * (x - (q[j] * s + kappa[j] * m_all) / w[j])
        elif policy == "local":
            u_spec = -k[j] * (x - s)
        else:
            u_spec = -k[j] * (x - sbar_all)
        offset = t.mix[MIX_SIGNAL, j, :3] @ sbar + t.mix[MIX_STATE, j, :3] @ m + t.mix[MIX_SIGNAL, j, 3] * sbar_all
        offset += t.mix[MIX_STATE, j, 3] * m_all
        u_tab = -t.coef[j, GAIN] * (x - t.coef[j, SIGNAL] * s - offset)
        assert u_tab == pytest.approx(u_spec, rel=1e-13, abs=1e-15)
    assert not t.mix[:, :, :3].any()  # the class means play no part (whatever the shares)


# --------------------------------------------------------------------------- the population


@pytest.mark.parametrize("n_agents,steps", [(10**5, 12), (10**6, 3)])
def test_simulated_class_means_follow_A(n_agents, steps):
    """The NumPy reference kernel steps N agents under game.table; the class-mean
    deviations from M* follow D(t+1) = A D(t) (measured to ~1e-15 relative).
    """
    game = Game(**THREE)
    eq, table = game.classes, game.table
    K, d = 3, 2
    rng = np.random.default_rng(7)
    sizes = np.round(np.array(THREE["shares"]) * n_agents).astype(np.int64)
    labels = np.repeat(np.arange(K, dtype=np.int64), sizes)
    n = labels.size
    s = rng.normal(size=(n, d)) + 3.0 * labels[:, None]  # constant signals, distinct class means
    x = 5.0 * rng.normal(size=(n, d))
    J = np.zeros(n)
    lay = layout(K, d)
    work = np.zeros(work_shape(n, lay))
    field = np.zeros((lay.field_rows, d))
    coef = table.coef.copy()
    coef[:, SIZE] = sizes
    sbar = np.array([s[labels == l].mean(axis=0) for l in range(K)])
    q, kappa = np.array(THREE["q"]), np.array(THREE["kappa"])
    m_star = eq.lam @ sbar
    M_star = (q[:, None] * sbar + kappa[:, None] * m_star[None]) / (q + kappa)[:, None]
    D = np.array([x[labels == l].mean(axis=0) for l in range(K)]) - M_star
    scale = np.abs(D).max()
    have_mean = False
    for t in range(steps):
        ref.fused_step(x, s, labels, J, work, lay, coef, table.mix, field, have_mean, game.gamma**t, np.empty(0), np.zeros(d), 1)
        D_next = field[lay.class_next:lay.class_next + K] - M_star
        np.testing.assert_allclose(D_next, eq.A @ D, rtol=0, atol=1e-6 * scale)
        assert np.abs(D_next - eq.A @ D).max() <= 1e-12 * scale
        D = D_next
        field[lay.class_state:lay.class_state + K] = field[lay.class_next:lay.class_next + K]
        field[lay.field_state] = field[lay.field_next]
        have_mean = True
    assert np.abs(D).max() < 0.5 * scale  # it did relax


def best_response_first_move(q, kappa, r, gamma, s, x0, m_path):
    """One agent's exact best response to an exogenous mean path (finite-horizon LQ tracking, backward recursion).

    V_t(x) = P_t x^2/2 - p_t x + const, P_T = p_T = 0; stage cost
    (q (x - s)^2 + kappa (x - m_t)^2 + r u^2)/2, x' = x + u.
    """
    P, p = 0.0, 0.0
    w = q + kappa
    for t in range(len(m_path) - 1, 0, -1):
        h = q * s + kappa * m_path[t]
        P, p = w + r * gamma * P / (r + gamma * P), h + r * gamma * p / (r + gamma * P)
    return (gamma * p - gamma * P * x0) / (r + gamma * P)


@pytest.mark.parametrize("seed", range(3))
def test_each_class_best_responds_to_the_equilibrium_path(seed):
    rng = np.random.default_rng(100 + seed)
    w = random_classes(rng, 3)
    game = Game(**w)
    eq = game.classes
    q, kappa, r = w["q"], w["kappa"], w["r"]
    gamma, pi = game.gamma, w["shares"]
    sbar = rng.normal(size=3)
    M0 = rng.normal(size=3)
    m_star = eq.lam @ sbar
    M_star = (q * sbar + kappa * m_star) / (q + kappa)
    D0 = M0 - M_star
    T = 400  # 0.9^400 ~ 5e-19
    path, D = np.empty(T), D0.copy()
    for t in range(T):
        path[t] = m_star + pi @ D
        D = eq.A @ D
    t = game.table
    for j in range(3):
        for x0, s in rng.normal(size=(2, 2)):
            u_br = best_response_first_move(q[j], kappa[j], r[j], gamma, s, x0, path)
            u_pol = -t.coef[j, GAIN] * (x0 - t.coef[j, SIGNAL] * s - t.mix[MIX_SIGNAL, j, :3] @ sbar - t.mix[MIX_STATE, j, :3] @ M0)
            assert abs(u_br - u_pol) <= 1e-10 * (1 + abs(u_br)), (j, u_br, u_pol)


# --------------------------------------------------------------------------- the Game API


def test_value_semantics_and_helpers():
    game = Game(**THREE)
    assert game.n_classes == 3 and game.gains is None and game.coefficients is None
    assert Game(**game.to_dict()) == game and hash(Game(**game.to_dict())) == hash(game)
    assert pickle.loads(pickle.dumps(game)) == game and copy.deepcopy(game) is game
    assert eval(repr(game), {"Game": Game}) == game
    assert game != Game(**{**THREE, "shares": [0.3, 0.4, 0.3]})
    assert len({game, Game(**game.to_dict()), Game(**THREE, feedforward=False)}) == 2
    with pytest.raises(AttributeError, match="immutable.*'q'"):
        game.q = [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="read-only"):
        game.q[0] = 5.0
    base = game.with_policy("greedy")
    assert base.policy == "greedy" and base.classes is game.classes and base.with_policy("memoa") == game
    assert Game(**THREE, feedforward=False).with_policy("local").feedforward is True
    new = game.with_weights(q=[0.5, 1.0, 2.0])
    assert new.q.tolist() == [0.5, 1.0, 2.0] and new.kappa.tolist() == THREE["kappa"] and new.shares.tolist() == THREE["shares"]
    assert not np.allclose(new.classes.A, game.classes.A)
    grown = Game(1.0, 3.0, 0.1, 0.9).with_weights(q=[1.0, 2.0, 0.5, 0.25])
    assert grown.n_classes == 4 and grown.kappa.tolist() == [3.0] * 4 and grown.shares.tolist() == [0.25] * 4
    reshared = game.with_weights(shares=[0.1, 0.1, 0.8])
    assert reshared.shares.tolist() == [0.1, 0.1, 0.8] and reshared.q.tolist() == THREE["q"]


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(q=[1.0, 2.0], kappa=[1.0, 2.0, 3.0]), ValueError, ["same length", "q has length 2", "kappa has length 3"]),
        (dict(q=[1.0, -2.0]), ValueError, ["q[1]", "-2.0", "[0"]),
        (dict(r=[0.1, 0.0]), ValueError, ["r[1]", "0.0", "(0"]),
        (dict(kappa=[1.0, float("nan")]), ValueError, ["kappa[1]", "finite"]),
        (dict(q=[0.0, 1.0], kappa=[0.0, 1.0]), ValueError, ["q + kappa", "q[0]=0.0"]),
        (dict(q=[[1.0, 2.0]]), ValueError, ["q must be", "1-D", "(1, 2)"]),
        (dict(q="1"), TypeError, ["q", "'1'"]),
        (dict(q=[1.0, "a"]), TypeError, ["q must be"]),
        (dict(q=[True, 1.0]), TypeError, ["q must be"]),
        (dict(q=[1.0, 2.0], shares=[0.5, 0.6]), ValueError, ["shares", "sum to 1", "1.1"]),
        (dict(q=[1.0, 2.0], shares=[1.5, -0.5]), ValueError, ["shares", "positive", "-0.5"]),
        (dict(q=[1.0, 2.0], shares=[1.0]), ValueError, ["same length", "shares has length 1"]),
        (dict(shares=0.5), TypeError, ["shares", "0.5"]),
        (dict(q=[1.0, 2.0], feedforward=0), TypeError, ["feedforward", "0"]),
        (dict(q=[1.0, 2.0], policy="greedy", feedforward=False), ValueError, ["feedforward", "memoa", "greedy"]),
    ],
)
def test_bad_class_weights_have_clear_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Game(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_solver_options_are_checked():
    with pytest.raises(ValueError, match="method must be one of"):
        solve_classes([1.0, 2.0], 1.0, 0.1, 0.9, method="newton")
    with pytest.raises(ValueError, match="did not converge in max_iter=2"):
        solve_classes([1.0, 2.0], 1.0, 0.1, 0.9, method="iterate", max_iter=2)
