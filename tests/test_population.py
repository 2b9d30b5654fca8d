"""Population: the policy's dynamics, cost accounting, bad signals, bad input."""
import copy
import math

import numba
import numpy as np
import pytest
from helpers import available_backends, call_from_two_threads
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memoa_fast import Game, Population

BACKENDS = available_backends()
GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)


def naive_run(game, x0, signals):
    """Textbook loop of MODEL.md sections 1-2 (per agent, per coordinate), for cross-checks."""
    g, (n, d) = game.gains, x0.shape
    x, J, disc = x0.copy(), np.zeros(n), 1.0
    w = game.w
    for s in signals:
        ok = [bool(np.all(np.isfinite(s[i]))) for i in range(n)]
        m = x.mean(axis=0)
        sbar = np.mean([s[i] for i in range(n) if ok[i]], axis=0)
        x_new = x.copy()
        for i in range(n):
            cost = 0.0
            for j in range(d):
                if ok[i]:
                    if game.policy == "memoa":
                        u = -g.k * (x[i, j] - (game.q * s[i, j] + game.kappa * sbar[j]) / w - g.c * (m[j] - sbar[j]))
                    elif game.policy == "greedy":
                        u = (game.q * s[i, j] + game.kappa * m[j] - w * x[i, j]) / (w + game.r)
                    elif game.policy == "local":
                        u = -g.k * (x[i, j] - s[i, j])
                    else:
                        u = -g.k * (x[i, j] - sbar[j])
                    cost += game.q * (x[i, j] - s[i, j]) ** 2 + game.kappa * (x[i, j] - m[j]) ** 2 + game.r * u**2
                    x_new[i, j] = x[i, j] + u
                else:
                    cost += game.kappa * (x[i, j] - m[j]) ** 2
            J[i] += 0.5 * disc * cost
        x, disc = x_new, disc * game.gamma
    return x, J


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["memoa", "greedy", "local", "consensus"])
def test_matches_textbook_loop(backend, policy, rng):
    game = GAME.with_policy(policy)
    n, d, T = 37, 3, 6
    x0 = rng.normal(size=(n, d))
    signals = rng.normal(size=(T, n, d))
    signals[2, 5, 1] = np.nan
    signals[4, 7, :] = np.inf
    pop = Population(game, initial_states=x0, backend=backend)
    pop.run(signals)
    x_ref, J_ref = naive_run(game, x0, signals)
    np.testing.assert_allclose(pop.states, x_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(pop.costs, J_ref, rtol=1e-12, atol=1e-13)
    assert pop.regret == pytest.approx(J_ref.max(), rel=1e-12)
    assert pop.worst_agent == int(np.argmax(J_ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_field_relaxes_at_rho_for_any_n(backend, rng):
    # Averaging the policy over agents: m(t+1) - sbar = (1 - k + k c)(m(t) - sbar) = rho (m(t) - sbar).
    n, d = 501, 2
    pop = Population(GAME, initial_states=rng.normal(3.0, 1.0, size=(n, d)), backend=backend)
    s = rng.normal(size=(n, d))
    sbar = s.mean(axis=0)
    gap = pop.states.mean(axis=0) - sbar
    for _ in range(8):
        pop.step(s)
        gap = GAME.gains.rho * gap
        np.testing.assert_allclose(pop.states.mean(axis=0) - sbar, gap, rtol=1e-9, atol=1e-13)


def test_the_mean_relaxes_as_one_agent_of_weight_q_whatever_kappa_so_memoa_tends_to_a_lagged_consensus(rng):
    """The mean field's rate rho is 1 - k(q, kappa=0): the gain of one agent tracking sbar with weight q alone, whatever
    kappa (the kappa term vanishes in the mean). So as kappa -> infinity MEMOA's clients publish one common forecast
    that follows m(t+1) = sbar + rho (m(t) - sbar), with rho = 0.0924 at q = 1, r = 0.1, gamma = 0.9: the consensus
    policy of the game without kappa. MODEL.md section 6 calls the consensus baseline "the extreme kappa -> infinity";
    that baseline moves by k(q + kappa) -> 1 (x(t+1) = sbar), so MEMOA does not tend to it (on the logistic map, 1200
    values, 100 clients: worst client 0.289 at kappa = 1e6 against consensus's 0.228).
    """
    for q, r, gamma in [(1.0, 0.1, 0.9), (1e-4, 3.0, 1.0), (50.0, 1e-3, 0.2)]:
        one_minus_kq = r / (r + gamma * Game(q=q, kappa=0.0, r=r, gamma=gamma).gains.P)  # 1 - k(q alone), no cancellation
        for kappa in (1e-6, 1.0, 1e3, 1e8):
            assert Game(q=q, kappa=kappa, r=r, gamma=gamma).gains.rho == pytest.approx(one_minus_kq, rel=1e-14)
    n, d, kappa = 40, 2, 1e8
    x0, s = rng.normal(size=(n, d)), rng.normal(size=(6, n, d))
    memoa = Population(Game(q=1.0, kappa=kappa, r=0.1, gamma=0.9), initial_states=x0)
    lagged = Population(Game(q=1.0, kappa=0.0, r=0.1, gamma=0.9, policy="consensus"), initial_states=x0.mean(axis=0) + 0 * x0)
    consensus = Population(Game(q=1.0, kappa=kappa, r=0.1, gamma=0.9, policy="consensus"), initial_states=x0)
    for signals in s:
        memoa.step(signals), lagged.step(signals), consensus.step(signals)
    np.testing.assert_allclose(memoa.states, lagged.states, atol=1e-6)  # the limit: the consensus of weight q alone
    assert np.abs(consensus.states - memoa.states).max() > 0.01  # not the consensus baseline at that kappa


SILENT_GAME = Game(q=[1.0, 2.0, 0.5], kappa=[2.0, 1.0, 3.0], r=[0.1, 0.3, 0.2], gamma=0.9, shares=[0.3, 0.3, 0.4])


def silent_class_signals(n, rounds=6, level=100.0):
    """A common signal ``level``; class 1 (agents 1, 4, 7...) sends none (NaN) in the first three rounds, class 2 none
    in round 4 (after it has signalled).
    """
    labels = np.arange(n) % 3
    s = np.full((rounds, n, 2), level)
    s[:3, labels == 1] = np.nan
    s[4, labels == 2] = np.nan
    return labels, s


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_with_no_signal_yet_leaves_a_common_signal_at_rest(backend):
    """Property: agents at rest on a common signal stay there, whichever agents' signals are missing. A class whose
    agents had sent no valid signal yet read 0 as its signal mean (the kernels keep a silent class's row, 0 at round
    0), and MEMOA's anchor m* = sum_l lam_l sbar_l took it: agents at 100 moved to 70.7 in one step (two equal classes,
    one silent). Such a class is now left out of the anchor (its row gets the anchor of the others); a class that has
    signalled keeps its last mean, as before.
    """
    labels, s = silent_class_signals(30)
    pop = Population(SILENT_GAME, initial_states=np.full((30, 2), 100.0), labels=labels, backend=backend)
    for t, signals in enumerate(s):
        pop.step(signals)
        np.testing.assert_allclose(pop.states, 100.0, rtol=1e-14, err_msg=f"round {t}")
        np.testing.assert_allclose(pop.class_mean_signal, 100.0, rtol=1e-14)
    # which classes have signalled is part of the state: a copy, a loaded state or a checkpoint taken while class 1
    # is still silent continues bitwise (here on signals that are not common, so a stand-in shows)
    varied = s + np.random.default_rng(0).normal(size=s.shape)
    run = Population(SILENT_GAME, initial_states=np.full((30, 2), 100.0), labels=labels, backend=backend)
    run.run(varied[:2])
    twins = [copy.deepcopy(run), Population(SILENT_GAME, 30, 2, labels=labels, backend=backend)]
    twins[1].load_state_dict(run.state_dict())
    assert list(run.state_dict()["class_signalled"]) == [1, 0, 1]
    run.run(varied[2:])
    for twin in twins:
        twin.run(varied[2:])
        np.testing.assert_array_equal(twin.states, run.states)
        np.testing.assert_array_equal(twin.costs, run.costs)


class _CountingKernels:
    """A backend module whose ``signal_pass`` calls are counted (the extra pass a step may run before its fused one)."""

    def __init__(self, kernels):
        self._kernels, self.signal_passes = kernels, 0

    def __getattr__(self, name):
        return getattr(self._kernels, name)

    def signal_pass(self, *args):
        self.signal_passes += 1
        return self._kernels.signal_pass(*args)


@pytest.mark.parametrize("policy", ["greedy", "local", "consensus"])
def test_a_silent_class_that_no_policy_reads_costs_no_pass_and_never_stops_a_step(policy):
    """A class with no valid signal yet gets a stand-in signal mean only when the policy reads class signal means
    (MEMOA's anchor). The baselines read none: a K-class baseline game with every q_j = 0 has no equilibrium (and no
    anchor weights), and its first step with a silent class raised AttributeError, leaving the population refusing
    every call; a class that stays silent (an empty one, which a baseline allows) cost an extra pass over the signals
    at every step. Which classes have signalled is still tracked, so a later switch to MEMOA leaves them out of its anchor.
    """
    labels = np.arange(12) % 2
    s = np.full((4, 12, 1), 100.0)
    s[:2, labels == 1] = np.nan  # class 1 silent in the first two rounds
    baseline = Game(q=[0.0, 0.0], kappa=[2.0, 1.0], r=0.1, gamma=0.9, shares=[0.5, 0.5], policy=policy)
    pop = Population(baseline, initial_states=np.full((12, 1), 100.0), labels=labels, backend="numpy")
    pop._kernels = counting = _CountingKernels(pop._kernels)
    pop.step(s[0])
    np.testing.assert_allclose(pop.states, 100.0, rtol=1e-14)
    assert list(pop.state_dict()["class_signalled"]) == [1, 0]
    pop.set_game(Game(q=[1.0, 1.0], kappa=[2.0, 1.0], r=0.1, gamma=0.9, shares=[0.5, 0.5]))  # MEMOA: class 1 still silent
    pop.run(s[1:])
    np.testing.assert_allclose(pop.states, 100.0, rtol=1e-14)
    assert counting.signal_passes == 2  # MEMOA's steps until class 1's first signal (rounds 1, 2), not round 3
    assert list(pop.state_dict()["class_signalled"]) == [1, 1]
    # a class that never signals (here: no agent in it) and that no policy reads: no extra pass, ever
    empty = Population(Game(q=[1.0, 1.0], kappa=2.0, r=0.1, gamma=0.9, shares=[0.5, 0.5], policy=policy),
                       initial_states=np.full((12, 1), 100.0), labels=np.zeros(12, dtype=int), backend="numpy")
    empty._kernels = counting = _CountingKernels(empty._kernels)
    empty.run(np.full((5, 12, 1), 100.0))
    assert counting.signal_passes == 0
    assert list(empty.state_dict()["class_signalled"]) == [1, 0]


def test_kappa_zero_agents_track_their_own_signal(rng):
    game = Game(q=1.0, kappa=0.0, r=0.5, gamma=0.95)
    pop = Population(game, 100, 2)
    s = rng.normal(size=(100, 2))
    for _ in range(200):
        pop.step(s)
    np.testing.assert_allclose(pop.states, s, atol=1e-12)


def test_common_signal_is_a_rest_point(rng):
    s = np.full((50, 3), 0.7)
    pop = Population(GAME, initial_states=s.copy())
    pop.step(s)
    np.testing.assert_allclose(pop.states, s, atol=1e-15)
    assert pop.regret < 1e-28  # zero up to the rounding of the mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_signal_holds_the_agent_and_skips_the_mean(backend, rng):
    n, d = 64, 2
    x0 = rng.normal(size=(n, d))
    s = rng.normal(size=(n, d))
    s[3, 0], s[10, 1], s[20] = np.nan, np.inf, -np.inf
    pop = Population(GAME, initial_states=x0, backend=backend)
    pop.step(s)
    bad = [3, 10, 20]
    np.testing.assert_array_equal(pop.states[bad], x0[bad])
    ok = np.isfinite(s).all(axis=1)
    np.testing.assert_allclose(pop.mean_signal, s[ok].mean(axis=0), rtol=1e-13)
    assert pop.n_finite_signals == n - 3
    assert np.isfinite(pop.costs).all() and np.isfinite(pop.states).all()
    m = x0.mean(axis=0)
    np.testing.assert_allclose(pop.costs[bad], 0.5 * GAME.kappa * ((x0[bad] - m) ** 2).sum(axis=1), rtol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_signals_missing_nobody_moves(backend, rng):
    x0 = rng.normal(size=(10, 2))
    pop = Population(GAME, initial_states=x0, backend=backend)
    pop.step(rng.normal(size=(10, 2)))
    sbar_before, x_before = pop.mean_signal, pop.states.copy()
    pop.step(np.full((10, 2), np.nan))
    assert pop.n_finite_signals == 0
    np.testing.assert_array_equal(pop.states, x_before)
    np.testing.assert_array_equal(pop.mean_signal, sbar_before)


def test_discounting_and_reset(rng):
    pop = Population(GAME, 5, 1)
    s = rng.normal(size=(5, 1))
    pop.step(s)
    assert pop.t == 1 and pop.discount == pytest.approx(GAME.gamma)
    pop.reset()
    assert pop.t == 0 and pop.discount == 1.0 and not pop.costs.any() and not pop.states.any()


def test_states_view_is_read_only_and_live(rng):
    pop = Population(GAME, 8, 2)
    out = pop.step(rng.normal(size=(8, 2)))
    assert out is pop.states
    with pytest.raises(ValueError):
        out[0, 0] = 1.0
    before = out.copy()
    pop.step(rng.normal(size=(8, 2)))
    assert not np.array_equal(out, before)  # live: the next step updates it


def test_one_dimensional_signals_are_accepted_for_d1(rng):
    pop = Population(GAME, 6)
    pop.step(rng.normal(size=6))
    assert pop.states.shape == (6, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_reproducible_and_thread_count_invariant(threads, rng):
    n, d = 50_000, 3
    x0, signals = rng.normal(size=(n, d)), rng.normal(size=(3, n, d))
    runs = []
    for t in (threads, 1):
        pop = Population(GAME, initial_states=x0, threads=t, parallel_threshold=1)
        pop.run(signals)
        runs.append((pop.states.copy(), pop.costs.copy(), pop.mean_state, pop.mean_signal))
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


def test_numba_thread_count_is_restored():
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        pop = Population(GAME, 40_000, 1, threads=2, parallel_threshold=1)
        pop.step(np.ones((40_000, 1)))
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


def test_state_dict_round_trip(rng):
    pop = Population(GAME, 20, 2)
    signals = rng.normal(size=(6, 20, 2))
    pop.run(signals[:3])
    saved = pop.state_dict()
    pop.run(signals[3:])
    other = Population(GAME, 20, 2)
    other.load_state_dict(saved)
    other.run(signals[3:])
    np.testing.assert_array_equal(other.states, pop.states)
    np.testing.assert_array_equal(other.costs, pop.costs)
    with pytest.raises(ValueError, match="game"):
        Population(GAME.with_policy("greedy"), 20, 2).load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(n_agents=0), ValueError, ["n_agents", "0", ">= 1"]),
        (dict(n_agents=2.5), TypeError, ["n_agents", "2.5"]),
        (dict(n_agents=3, dim=0), ValueError, ["dim", "0"]),
        (dict(n_agents=3, backend="cuda"), ValueError, ["backend", "'cuda'", "numba"]),
        (dict(n_agents=3, threads=0), ValueError, ["threads", "0"]),
        (dict(n_agents=3, threads=10_000), ValueError, ["threads", "10000"]),
        (dict(initial_states=np.zeros((2, 2, 2))), ValueError, ["initial_states", "ndim 3"]),
        (dict(initial_states=[[1.0, np.nan]]), ValueError, ["initial_states", "finite"]),
        (dict(n_agents=2, initial_states=np.zeros((3, 1))), ValueError, ["initial_states", "(2, 1)", "(3, 1)"]),
        (dict(), TypeError, ["n_agents"]),
    ],
)
def test_bad_construction_has_clear_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Population(GAME, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_game_type():
    with pytest.raises(TypeError, match="game must be a memoa_fast.Game"):
        Population({"q": 1}, 3)


@pytest.mark.parametrize(
    "signals, exc, words",
    [
        (np.zeros((4, 3)), ValueError, ["signals", "(5, 2)", "(4, 3)"]),
        (np.zeros((5, 2, 1)), ValueError, ["signals", "ndim 3"]),
        (np.array([["a", "b"]] * 5), TypeError, ["signals", "real numbers"]),
        ([[object(), 1.0]] * 5, TypeError, ["signals"]),
    ],
)
def test_bad_signals_have_clear_errors_and_leave_state_alone(signals, exc, words, rng):
    pop = Population(GAME, initial_states=rng.normal(size=(5, 2)))
    before = pop.state_dict()
    with pytest.raises(exc) as info:
        pop.step(signals)
    for word in words:
        assert word in str(info.value)
    np.testing.assert_array_equal(pop.states, before["states"])
    assert pop.t == 0


# --------------------------------------------------------------------------- K classes, copies, threads
K_GAME = Game(q=[1.0, 0.2, 3.0], kappa=[2.0, 1.0, 0.5], r=[0.5, 0.1, 1.0], gamma=0.95, shares=[0.5, 0.25, 0.25])


def naive_k_step(game, x, s, labels, discount):
    """One step of the K-class policy from Game.table, per agent (the table's meaning, spelled out)."""
    coef, mix = game.table.coef, game.table.mix
    K, (n, d) = game.n_classes, x.shape
    ok = np.isfinite(s).all(axis=1) & (np.abs(s) <= 1e50).all(axis=1)
    m = x.mean(axis=0)
    m_l = np.array([x[labels == l].mean(axis=0) if (labels == l).any() else np.zeros(d) for l in range(K)])
    sbar_l = np.array([s[(labels == l) & ok].mean(axis=0) for l in range(K)])
    sbar = s[ok].mean(axis=0)
    x_new, cost = x.copy(), np.zeros(n)
    for i in range(n):
        j = labels[i]
        gain, c_s, q, kappa, r = coef[j, :5]
        offset = mix[0, j, :K] @ sbar_l + mix[1, j, :K] @ m_l + mix[0, j, K] * sbar + mix[1, j, K] * m
        if ok[i]:
            u = -gain * (x[i] - c_s * s[i] - offset)
            cost[i] = q * ((x[i] - s[i]) ** 2).sum() + kappa * ((x[i] - m) ** 2).sum() + r * (u**2).sum()
            x_new[i] = x[i] + u
        else:
            cost[i] = kappa * ((x[i] - m) ** 2).sum()
    return x_new, 0.5 * discount * cost


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_class_population_matches_the_table_spelled_out(backend, rng):
    n, d = 60, 2
    labels = rng.integers(0, 3, n)
    x0 = rng.normal(size=(n, d))
    pop = Population(K_GAME, initial_states=x0, labels=labels, backend=backend)
    x, J, disc = x0.copy(), np.zeros(n), 1.0
    for t in range(5):
        s = rng.normal(size=(n, d))
        s[t, 0] = [np.nan, np.inf, 1e60, -1e300, 2.0][t]
        if t == 3:
            labels = rng.integers(0, 3, n)
            pop.set_labels(labels)
        pop.step(s)
        x, cost = naive_k_step(K_GAME, x, s, labels, disc)
        J += cost
        disc *= K_GAME.gamma
    np.testing.assert_allclose(pop.states, x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(pop.costs, J, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(pop.labels, labels)


def test_k_class_needs_labels_in_range(rng):
    with pytest.raises(TypeError, match="labels"):
        Population(K_GAME, 10, 1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        Population(K_GAME, 3, 1, labels=[0, 1, 3])
    with pytest.raises(TypeError, match="integer"):
        Population(K_GAME, 3, 1, labels=[0.0, 1.0, 2.0])
    pop = Population(K_GAME, 3, 1, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="same classes"):
        pop.set_game(GAME)


@pytest.mark.parametrize("backend", ["numba", "cython", "numpy"])
def test_labels_are_copied_so_a_later_edit_cannot_reach_the_kernels(rng, backend):
    """The kernels index class tables by label without bounds checks: the population keeps its own copy."""
    n, d = 40, 2
    labels = np.arange(n, dtype=np.int64) % 3
    pop = Population(K_GAME, n, d, labels=labels, backend=backend, threads=1)
    twin = Population(K_GAME, n, d, labels=labels.copy(), backend=backend, threads=1)
    labels[:] = 10**9  # out of range for a 3-class table
    s = rng.normal(size=(n, d))
    np.testing.assert_array_equal(pop.step(s), twin.step(s))
    assert pop.labels.max() == 2
    fresh = np.zeros(n, dtype=np.int64)
    pop.set_labels(fresh)
    fresh[:] = 10**9
    assert pop.labels.max() == 0


def test_state_round_trip_pickle_and_deepcopy_for_k_classes(rng):
    import copy
    import pickle

    n, d = 50, 2
    pop = Population(K_GAME, n, d, labels=rng.integers(0, 3, n), threads=1)
    signals = rng.normal(size=(6, n, d))
    for s in signals[:3]:
        pop.step(s)
    clones = [pickle.loads(pickle.dumps(pop)), copy.deepcopy(pop)]
    other = Population(K_GAME, n, d, labels=np.zeros(n, dtype=int), threads=1)
    other.load_state_dict(pop.state_dict())
    for s in signals[3:]:
        for p in [pop, other, *clones]:
            p.step(s)
    for p in [other, *clones]:
        assert p.states.tobytes() == pop.states.tobytes() and p.costs.tobytes() == pop.costs.tobytes()
        np.testing.assert_array_equal(p.labels, pop.labels)


def test_concurrent_steps_from_two_threads_raise(rng):
    pop = Population(GAME, 200_000, 1, threads=1)
    s = rng.normal(size=(200_000, 1))
    errors, done = call_from_two_threads(lambda: pop.step(s), 30)
    assert errors and "not thread-safe" in str(errors[0])
    assert pop.t == done and np.isfinite(pop.states).all()


def test_default_threads_depend_on_the_work_size():
    from memoa_fast import _backends

    assert Population(GAME, 100_000, 4)._threads_used == 1  # 4e5 values: one thread by default
    big = _backends.DEFAULT_PARALLEL_WORK
    requested, used = _backends.resolve_threads(None, big, dim=1)
    assert used == requested  # every available thread for a large enough step
    assert _backends.resolve_threads(1, big)[1] == 1
    assert _backends.resolve_threads(None, 100)[1] == 1


def test_step_predict_out_is_written_and_returned(rng):
    from memoa_fast import Server

    pop, server = Population(GAME, 30, 2), Server(30, 2)
    out = np.full(2, np.nan)
    got = pop.step_predict(rng.normal(size=(30, 2)), server, out=out)
    assert got is out and np.isfinite(out).all()
    np.testing.assert_allclose(out, server.predict(pop.states), rtol=1e-12)
    with pytest.raises(ValueError, match=r"out must be a writeable float64 numpy array of shape \(2,\), got ndarray float64 \(3,\)"):
        pop.step_predict(rng.normal(size=(30, 2)), server, out=np.zeros(3))
    with pytest.raises(TypeError, match=r"out must be .* got list"):
        pop.step_predict(rng.normal(size=(30, 2)), server, out=[0.0, 0.0])


@pytest.mark.parametrize("magnitude", [1e51, 1e200, 1e308])
def test_huge_signals_never_reach_the_mean_field(magnitude, rng):
    """Issue 8 item 4: a finite signal whose use could overflow is treated like a missing one."""
    pop = Population(GAME, 40, 2)
    s = rng.normal(size=(40, 2))
    s[:3, 1] = magnitude
    s[3, 0] = -magnitude
    before = pop.states.copy()
    pop.step(s)
    assert pop.n_valid_signals == 36
    assert np.isfinite(pop.mean_signal).all() and np.isfinite(pop.costs).all() and np.isfinite(pop.states).all()
    np.testing.assert_array_equal(pop.states[:4], before[:4])
    np.testing.assert_allclose(pop.mean_signal, s[4:].mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="initial_states must be at most"):
        Population(GAME, initial_states=np.full((2, 1), 1e200))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_low=st.floats(-300, 0), log_high=st.floats(0, 308),
       n=st.integers(1, 200), d=st.sampled_from([1, 3]), k_classes=st.sampled_from([1, 3]))
def test_any_float64_signal_keeps_mean_field_and_costs_finite(backend, seed, log_low, log_high, n, d, k_classes):
    """Issue 8: for every float64 signal the mean field and every cost stay finite, and every backend agrees."""
    rng = np.random.default_rng(seed)
    game = GAME if k_classes == 1 else K_GAME
    n = max(n, k_classes)  # every class has an agent (memoa refuses to read the means of an empty class)
    labels = None if k_classes == 1 else rng.permutation(np.arange(n) % 3)
    pops = [Population(game, n, d, labels=labels, backend=b) for b in (backend, "numpy")]
    for _ in range(3):
        mags = 10.0 ** rng.uniform(log_low, log_high, size=(n, d))
        s = np.where(rng.random((n, d)) < 0.5, -mags, mags)
        s[rng.random((n, d)) < 0.05] = np.nan
        for p in pops:
            p.step(s)
    got, ref = pops
    for p in pops:
        assert np.isfinite(p.mean_signal).all() and np.isfinite(p.mean_state).all()
        assert np.isfinite(p.costs).all() and np.isfinite(p.states).all()
    scale = 1.0 + np.abs(ref.states)
    assert np.all(np.abs(got.states - ref.states) <= 1e-12 * scale * 10)
    np.testing.assert_allclose(got.costs, ref.costs, rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_states_and_means_at_the_signal_limit_save_and_load(backend, tmp_path):
    """States and signals within SIGNAL_LIMIT (1e50) can round a few ulps beyond it; the saved state must load.

    One step of three agents at -1e50 on signals of -1e50 left states of -1.0000000000000003e50, and the mean of
    twenty valid signals of 1e50 (one an ulp below) was 1.0000000000000003e50 (numba, numpy): state_dict, pickle, copies and
    checkpoints refused them (``must be at most 1e+50``), so the run could no longer be saved.
    """
    import copy
    import pickle

    from memoa_fast import load_checkpoint, restore_checkpoint, save_checkpoint

    game = Game(q=1.0, kappa=30.0, r=0.1, gamma=0.9)
    reached = Population(game, initial_states=np.full((3, 1), -1e50), backend=backend)
    reached.step(np.full((3, 1), -1e50))
    means = Population(game, 20, 1, backend=backend)
    s = np.full((20, 1), 1e50)
    s[0] = np.nextafter(1e50, 0.0)
    means.step(s)
    assert reached.states.min() < -1e50  # the rounding this is about (the means' too with numba and numpy: 1e50 + 2 ulps)
    for pop in (reached, means):
        state = pop.state_dict()
        other = Population(game, pop.n_agents, 1, backend=backend)
        other.load_state_dict(state)
        for copied in (other, pickle.loads(pickle.dumps(pop)), copy.deepcopy(pop)):
            np.testing.assert_array_equal(copied.states, pop.states)
        path = save_checkpoint(tmp_path / "run.npz", pop)
        restore_checkpoint(load_checkpoint(path), other)
        np.testing.assert_array_equal(other.states, pop.states)
        np.testing.assert_array_equal(other.mean_signal, pop.mean_signal)
        Population(game, initial_states=pop.states, backend=backend)  # a state reached is a valid initial state
    with pytest.raises(ValueError, match="initial_states must be at most"):
        Population(game, initial_states=np.full((3, 1), -1.000001e50))  # beyond the rounding margin


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k_classes=st.sampled_from([1, 2, 3]),
       policy=st.sampled_from(["memoa", "greedy", "local", "consensus"]), log_kappa=st.floats(-4, 4), mixed=st.booleans())
@example(seed=0, k_classes=1, policy="memoa", log_kappa=math.log(30.0), mixed=False)  # the reproducer above
def test_every_state_reached_from_states_and_signals_within_the_limit_saves(seed, k_classes, policy, log_kappa, mixed):
    """The class of the test above: any game, states and signals at +-1e50 (or an ulp below), a few steps; every state loads."""
    rng = np.random.default_rng(seed)
    K = k_classes
    q, r, gamma = (list(np.exp(rng.uniform(-4, 2, K))), list(np.exp(rng.uniform(-4, 2, K))), float(rng.uniform(0.3, 1.0)))
    if seed == 0:
        q, r, gamma = [1.0], [0.1], 0.9
    kappa = [math.exp(log_kappa)] * K
    game = Game(q=q, kappa=kappa, r=r, gamma=gamma, policy=policy, shares=list(rng.dirichlet(np.ones(K)))) if K > 1 else \
        Game(q=q[0], kappa=kappa[0], r=r[0], gamma=gamma, policy=policy)
    n = 3 * K
    labels = None if K == 1 else np.arange(n) % K
    sign = -1.0 if seed % 2 == 0 else 1.0
    limit = np.full((n, 1), 1e50)
    if mixed:  # some an ulp below the limit, some of the other sign
        limit *= rng.choice([1.0, np.nextafter(1.0, 0.0)], size=(n, 1))
    pop = Population(game, initial_states=sign * limit, labels=labels, threads=1)
    for _ in range(4):
        pop.step(sign * limit * (rng.choice([1.0, -1.0], size=(n, 1)) if mixed else 1.0))
        Population(game, n, 1, labels=labels).load_state_dict(pop.state_dict())
    assert np.abs(pop.states).max() <= 1e50 * (1 + 1e-14)  # only rounding beyond the limit


def _largest_accepted_initial_state(game) -> float:
    """The largest magnitude ``Population`` accepts as an initial state (bisected over the float64 bit patterns)."""
    bits = (lambda x: int(np.float64(x).view(np.int64)))
    lo, hi = bits(1e50), bits(2e50)  # accepted, refused
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            Population(game, initial_states=np.full((1, 1), np.int64(mid).view(np.float64)), backend="numpy")
            lo = mid
        except ValueError:
            hi = mid
    return float(np.int64(lo).view(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy, q, kappa, r", [("greedy", 1e-11, 10.0, 0.1), ("greedy", 1e-11, 5.0, 1.0),
                                                 ("memoa", 1e-11, 10.0, 15.0)])
def test_every_accepted_initial_state_steps_to_states_that_save(backend, policy, q, kappa, r):
    """The saved states' limit (STATE_LIMIT, 1e50 (1 + 2**-20)) keeps a margin for rounding beyond any state a
    population reaches. Initial states up to STATE_LIMIT itself were accepted: one step of these games on signals of
    -1e50 from -STATE_LIMIT rounded an ulp beyond it, and the population could no longer be saved (nor copied).
    """
    game = Game(q=q, kappa=kappa, r=r, gamma=0.9, policy=policy)
    top = _largest_accepted_initial_state(game)
    for sign in (-1.0, 1.0):
        pop = Population(game, initial_states=np.full((3, 1), sign * top), backend=backend)
        for _ in range(3):
            pop.step(np.full((3, 1), sign * 1e50))
            Population(game, 3, 1, backend=backend).load_state_dict(pop.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_mean_signal_is_the_mean_signal_and_restores_as_it_was(backend, tmp_path):
    """K = 1: ``class_mean_signal`` is ``mean_signal``, bitwise, so a checkpoint (which does not save it) restores it.

    Numba's step rounded the class mean an ulp apart from the mean (0.21134933608179116 against
    0.21134933608179113 for these signals), and a restored population reported the other one.
    """
    from memoa_fast import restore_checkpoint, save_checkpoint

    pop = Population(GAME, 3, 1, backend=backend)
    pop.step([0.1257302210933933, -0.1321048632913019, 0.6404226504432821])
    np.testing.assert_array_equal(pop.class_mean_signal, pop.mean_signal.reshape(1, 1))
    restored = Population(GAME, 3, 1, backend=backend)
    restore_checkpoint(save_checkpoint(tmp_path / "run.npz", pop), restored)
    for key, value in pop.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[key], value, err_msg=key)


def test_a_run_past_the_last_round_is_refused_before_its_first_step():
    """From t = 2**63 - 2, run() over three steps took one and raised (half a run); now nothing is stepped."""
    pop = Population(GAME, 3, 1)
    state = pop.state_dict()
    state["t"], state["discount"] = 2**63 - 2, 0.0
    pop.load_state_dict(state)
    with pytest.raises(ValueError, match="a run of 3 steps would pass round 2\\*\\*63 - 1"):
        pop.run(np.ones((3, 3, 1)))
    assert pop.t == 2**63 - 2 and not pop.states.any()
    pop.run(np.ones((1, 3, 1)))
    assert pop.t == 2**63 - 1


def test_run_names_signals_that_are_not_an_array():
    """A ragged list used to raise NumPy's "inhomogeneous shape" ValueError without naming the argument."""
    pop = Population(Game(), 3, 2, backend="numpy")
    with pytest.raises(TypeError, match="^signals must be an array of real numbers"):
        pop.run([np.zeros((3, 2)), np.zeros((3, 3))])
    with pytest.raises(TypeError, match="^signals must be an array of real numbers"):
        pop.run(None)
    assert pop.t == 0
    pop.run([np.zeros((3, 2)), np.ones((3, 2))])
    assert pop.t == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["greedy", "consensus"])
def test_k_class_baselines_use_the_true_means(policy, backend, rng):
    # MODEL.md section 4: greedy tracks (q_j s_i + kappa_j m)/w_j with m the mean of all states, consensus the mean of
    # all valid signals sbar, whatever the class shares of the game. Here the game's shares (equal, the default) differ
    # from the classes' fractions (12/30/18 of 60), and invalid rows fall in class 0 only.
    game = Game([2.0, 1.0, 0.25], [3.0, 0.5, 1.0], [0.1, 0.3, 1.0], 0.9, policy)
    labels = rng.permutation(np.repeat([0, 1, 2], [12, 30, 18]))
    n, d = labels.size, 2
    x = 3.0 * rng.normal(size=(n, d))
    signals = rng.normal(size=(20, n, d)) + 2.0
    signals[:, np.flatnonzero(labels == 0)[:6], 0] = np.nan
    pop = Population(game, initial_states=x, labels=labels, backend=backend)
    q, kappa, r, w, k = (np.asarray(v)[labels] for v in (game.q, game.kappa, game.r, game.w, game.classes.k))
    for s in signals:
        ok = np.isfinite(s).all(axis=1)
        if policy == "greedy":
            u = (q[:, None] * s + kappa[:, None] * x.mean(axis=0) - w[:, None] * x) / (w + r)[:, None]
        else:
            u = -k[:, None] * (x - s[ok].mean(axis=0))
        x = x + np.where(ok[:, None], u, 0.0)
        pop.step(s)
    np.testing.assert_allclose(pop.states, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["memoa", "greedy", "consensus", "local"])
def test_an_empty_class_is_refused_or_leaves_a_common_signal_at_rest(policy, backend):
    # Every policy has signal + signal_mean + state_mean = 1: agents sitting on a common signal stay there. A class
    # without agents has no means; the kernels would read 0 and a stale value for them (consensus moved every agent
    # from 5 to 3.33 = (5 + 5 + 0)/3). So a policy that reads the class means (memoa) refuses the step, naming the
    # class, and changes nothing; the others (which read the means over all agents, or none) keep the rest point.
    game = Game([2.0, 1.0, 0.25], 3.0, 0.1, 0.9, policy)
    labels = np.repeat([0, 1], [10, 20])  # class 2 is empty
    pop = Population(game, initial_states=np.full((30, 1), 5.0), labels=labels, backend=backend)
    signals = np.full((30, 1), 5.0)
    if policy == "memoa":
        with pytest.raises(ValueError, match=r"class 2 has no agent, but the 'memoa' policy of this game reads that class's mean signal and state"):
            pop.step(signals)
        assert pop.t == 0 and (pop.states == 5.0).all() and (pop.costs == 0.0).all()
        pop.set_labels(np.repeat([0, 1, 2], [10, 10, 10]))  # every class has an agent: it steps, and stays at rest
    for _ in range(5):
        pop.step(signals)
    np.testing.assert_allclose(pop.states, 5.0, rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.6, 0.95])
def test_the_discount_is_gamma_to_the_t_down_to_zero(backend, gamma):
    """``discount`` is ``gamma**t``, also where that is subnormal, and reaches 0: no later cost is added.

    A running product ``discount *= gamma`` stalls: ``k 2**-1074 * gamma`` rounds back to ``k 2**-1074`` once
    ``k (1 - gamma) < 1/2``, so for every ``gamma > 1/2`` the discount stayed at a subnormal for ever (4.4e-323 for
    0.95) and kept weighing every later round's cost, while ``gamma**t`` is 0. Starts from a loaded state a few
    rounds before the product leaves the normal range (cheap: no 10^4 steps).
    """
    discount, t = 1.0, 0
    while discount * gamma >= 1e-307:
        discount, t = discount * gamma, t + 1
    pop = Population(Game(q=1.0, kappa=2.0, r=0.5, gamma=gamma), 3, 1, backend=backend)
    state = pop.state_dict()
    state["t"], state["discount"] = t, discount
    pop.load_state_dict(state)
    signals = np.array([[1.0], [-2.0], [3.0]])
    while pop.discount > 0.0:
        before = pop.discount
        pop.step(signals)
        assert pop.discount <= before, (pop.t, pop.discount)
        if pop.discount < 2.2250738585072014e-308:
            assert pop.discount == math.pow(gamma, pop.t), (pop.t, pop.discount)
        assert pop.t - t < 1000  # 0.95 ** t falls from 1e-307 to 0 in 746 rounds
    costs = pop.costs.copy()
    pop.step(-signals)  # a nonzero stage cost, weighed by gamma**t = 0
    np.testing.assert_array_equal(pop.costs, costs)
    Population(pop.game, 3, 1).load_state_dict(pop.state_dict())
