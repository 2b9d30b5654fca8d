"""No allocation per step in steady state (tracemalloc over 100 steps).

NumPy reports its array buffers to tracemalloc (and so does Numba's
allocator), so a per-step temporary of the population's size would show in
the traced peak, and a leak in the traced net. After warm-up (JIT compiled
or loaded from cache, buffers allocated) 100 steps may leave at most a few
KiB behind (interpreter-level noise), and ``Population.step`` may not even
briefly hold a tenth of one (N, d) array: the Numba kernels' only transient
memory is a per-chunk scratch of a few to 30 KiB per thread (lanes, the
replicated per-coordinate constants, the vectorised exp's buffers).
"""
import gc
import tracemalloc

import numpy as np
import pytest
from helpers import available_backends

from memoa_fast import Game, Population, Server

COMPILED = [b for b in available_backends() if b != "numpy"]  # the reference allocates on purpose
GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
N, D, STEPS = 50_000, 4, 100
NET_LIMIT = 16 * 1024  # bytes left behind by 100 steps
PEAK_LIMIT = 160 * 1024  # a tenth of one (N, d) array (1.6 MB)


def traced(fn, steps):
    """Net and peak traced bytes over ``steps`` calls of ``fn(t)``."""
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for t in range(steps):
            fn(t)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, peak - before


@pytest.fixture(scope="module")
def signals():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(4, N, D))
    s[1, ::97, 2] = np.nan  # a few holding agents: the row-by-row path runs too
    return s


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("threads", [1, None])
def test_population_step_allocates_nothing(backend, threads, signals):
    pop = Population(GAME, N, D, backend=backend, threads=threads)
    for s in signals:  # warm-up
        pop.step(s)
    net, peak = traced(lambda t: pop.step(signals[t % 4]), STEPS)
    assert net < NET_LIMIT, f"{STEPS} steps left {net} bytes allocated"
    assert peak < PEAK_LIMIT, f"a step held {peak} bytes at once (a temporary of the population's size?)"


@pytest.mark.parametrize("backend", COMPILED)
def test_population_step_predict_allocates_nothing(backend, signals):
    pop = Population(GAME, N, D, backend=backend)
    server = Server(N, D, backend=backend)
    for s in signals:
        pop.step_predict(s, server)
    net, peak = traced(lambda t: pop.step_predict(signals[t % 4], server), STEPS)
    assert net < NET_LIMIT and peak < PEAK_LIMIT, (net, peak)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("rule", ["hedge", "eg"])
def test_server_steady_state_leaves_nothing_behind(backend, rule, signals):
    server = Server(N, D, rule=rule, eta=0.5, alpha=0.01, backend=backend)
    states = signals[0].copy()
    target = np.ones(D)

    def round_(t):
        server.predict(states)
        server.update(states, target)

    for t in range(3):
        round_(t)
    net, _ = traced(round_, STEPS)
    # The peak is not asserted: Server checks that the states are finite with
    # a temporary boolean mask (N d bytes, freed at once).
    assert net < NET_LIMIT, f"{STEPS} predict/update rounds left {net} bytes allocated"


@pytest.mark.parametrize("threads", [1, None])
def test_pipeline_round_and_run_allocate_nothing_of_their_size(threads):
    """``Pipeline.round`` per step, and ``Pipeline.run`` with ``out``, hold nothing of the population's or the series' size.

    What they hold briefly is the kernel's per-chunk scratch (up to ~180 KiB per thread, for CHUNK clients):
    the same for 4N clients as for N, and for a run of 4000 rounds as for 40. A run used to build its
    per-round flags and discounts in Python (256 KiB for 4000 rounds): now the kernel derives them.
    """
    from memoa_fast import Pipeline

    y = np.sin(np.arange(4000) * 0.1)[:, None]
    out = np.empty_like(y)
    peaks = []
    for n in (N, 4 * N):
        pipe = Pipeline(n, 1, game=GAME, threads=threads)
        pipe.run(y[:3], out=out[:3])  # warm-up: compiled or loaded, both calls
        pipe.round(0.1)
        net, peak = traced(lambda t: pipe.round(y[t]), STEPS)
        assert net < NET_LIMIT, f"{STEPS} rounds of {n} clients left {net} bytes allocated"
        assert peak < pipe._threads_used * 2 * 1024 * 1024 // 8, f"a round of {n} clients briefly held {peak} bytes"
        peaks.append(peak)
    # Each thread's scratch is held while it runs its chunks; whether two threads' scratch overlap in time is up to
    # the scheduler (a loaded machine ran them one after the other at N and together at 4N: 132192 against
    # 261696 bytes). So the difference may be one thread's scratch per extra thread, never anything of N's size.
    overlap = (pipe._threads_used - 1) * 2 * 1024 * 1024 // 8
    assert peaks[1] - peaks[0] < NET_LIMIT + overlap, f"a round held {peaks[0]} bytes with {N} clients, {peaks[1]} with {4 * N}"
    # a run of 4000 rounds holds what a run of 40 does (on a pipeline of one chunk, so that it takes 0.1 s)
    pipe = Pipeline(4096, 1, game=GAME, threads=threads)
    pipe.run(y[:3], out=out[:3])
    _, short_peak = traced(lambda t: pipe.run(y[:40], out=out[:40]), 1)
    net, peak = traced(lambda t: pipe.run(y, out=out), 1)
    assert net < NET_LIMIT, f"a run of {len(y)} rounds left {net} bytes allocated"
    assert peak - short_peak < NET_LIMIT, f"a run of {len(y)} rounds held {peak} bytes, of 40 rounds {short_peak}"


@pytest.mark.parametrize("backend", COMPILED)
def test_class_games_and_every_policy_step_without_allocating(backend, signals):
    """A K-class step (labels, class tables) and every policy take the same allocation-free path as one class."""
    from memoa_fast import POLICIES

    k3 = Game(q=[1.0, 2.0, 3.0], kappa=[1.0, 1.0, 1.0], r=[0.1, 0.1, 0.1], gamma=0.9, shares=[0.3, 0.3, 0.4])
    labels = np.arange(N) % 3
    for game, lab in [(GAME.with_policy(p), None) for p in POLICIES if p != "memoa"] + [(k3, labels)]:
        pop = Population(game, N, D, labels=lab, backend=backend, threads=1)
        pop.step(signals[0])
        net, peak = traced(lambda t: pop.step(signals[t % 4]), 20)
        assert net < NET_LIMIT and peak < PEAK_LIMIT, (game.policy, game.n_classes, net, peak)


@pytest.mark.parametrize("rule", ["error", "minimax"])
def test_trust_population_round_holds_nothing_of_its_size(rule, signals):
    """``TrustPopulation.step`` and ``observe`` (and so ``TrustClasses``) work in their own buffers.

    ``observe`` used to build ``(f - y)**2``, ``|f|``, their masks and ``np.bincount`` of read-only labels
    (which copies them): 540 KB a round at 20000 x 2, 2.2 MB at 80000 x 2. What is left is NumPy's reduction
    buffer (~66 KB, the same for any N).
    """
    from memoa_fast import TrustPopulation

    n, d = N // 2, 2
    s, target = np.ascontiguousarray(signals[:, :n, :d]), np.full(d, 0.3)
    tp = TrustPopulation(n, d, n_classes=4, reclass=1000, rule=rule, powers=(1.0, 1.5), threads=1)

    def round_(t):
        tp.step(s[t % 4])
        tp.observe(target)

    round_(0)
    net, peak = traced(round_, 20)
    assert net < NET_LIMIT and peak < PEAK_LIMIT, (net, peak)
