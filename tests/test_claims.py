"""The documented equalities, on random inputs: each test names the promise it checks and where it is made.

The README and the docstrings promise equalities: the same bits on any thread count (README "Backends,
threads, reproducibility"), every backend against the NumPy reference, ``run`` = repeated ``step`` or
``round`` (``Population.run``, ``Pipeline.run``), a copy or a restored state continues bitwise (README "The
API in ten lines"), a shard of clients = those rows of the whole population (``ClientForecasters`` "Shard
reproducibility", ``NoisyLastValueSignals``), K identical classes = the single-class game (README "Trust
classes"), the certificates' relative epsilon = the same bits at any scale (README "Bad input"), and
``step_predict`` = ``step`` + ``predict`` to the documented precision. Each is drawn over random sizes at
the chunk borders (``CHUNK +- 1``), dimensions 1-5, K = 1-3 classes, random games, invalid signal rows at
random places and at the first, last and chunk-border rows, valid values near ``SIGNAL_LIMIT``, both server
rules, ``alpha = 0`` and ``> 0``, records on and off. Small sizes, fixed example counts: a few seconds.
"""
import copy
import importlib
import inspect
import pickle
import threading
import warnings

import numpy as np
from helpers import available_backends
from hypothesis import given, settings
from hypothesis import strategies as st

from memoa_fast import ClientForecasters, Game, Pipeline, Population, Server, _backends, restore_checkpoint, save_checkpoint
from memoa_fast.certificates import epsilon_nash
from memoa_fast.distributed import NoisyLastValueSignals
from memoa_fast.kernels import CHUNK, SIGNAL_LIMIT

BACKENDS = available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]
SIZES = (1, 2, 3, CHUNK - 1, CHUNK + 1)
POLICIES = ("memoa", "greedy", "local", "consensus")
# invalid rows (NaN, inf, past the limit by an ulp or more) and valid values at the limit or near it
INVALID = (np.nan, np.inf, -np.inf, np.nextafter(SIGNAL_LIMIT, np.inf), -2 * SIGNAL_LIMIT, 1e300)
NEAR_LIMIT = (SIGNAL_LIMIT, -SIGNAL_LIMIT, np.nextafter(SIGNAL_LIMIT, 0.0), SIGNAL_LIMIT / (2 * CHUNK) * 1.01, 1e48)


def random_game(rng, K, policy):
    feedforward = bool(rng.integers(2)) if policy == "memoa" else True
    weights = dict(gamma=float(rng.uniform(0.5, 0.99)), policy=policy, feedforward=feedforward)
    if K == 1:
        return Game(q=float(rng.uniform(0.1, 3)), kappa=float(rng.uniform(0, 3)), r=float(rng.uniform(0.05, 2)), **weights)
    shares = rng.dirichlet(np.ones(K)) * 0.8 + 0.2 / K
    return Game(q=rng.uniform(0.1, 3, K), kappa=rng.uniform(0, 3, K), r=rng.uniform(0.05, 2, K), shares=shares / shares.sum(),
                **weights)


def random_labels(rng, n, K):
    if K == 1:
        return None
    labels = np.concatenate([np.arange(K), rng.integers(0, K, n - K)])  # every class has an agent
    rng.shuffle(labels)
    return labels


def random_signals(rng, T, n, d, near_limit=True):
    """``(T, n, d)`` signals: some rows invalid (random places and the first, last and chunk-border rows), some valid near the limit."""
    s = rng.normal(size=(T, n, d)) * 10.0 ** rng.uniform(-3, 3)
    borders = [r for r in (0, n - 1, CHUNK - 1, CHUNK) if r < n]
    for t in range(T):
        rows = list(rng.integers(0, n, rng.integers(0, 3))) + [r for r in borders if rng.random() < 0.4]
        for r in rows:
            s[t, r, rng.integers(d)] = INVALID[rng.integers(len(INVALID))]
        if near_limit and rng.random() < 0.4:
            for r in list(rng.integers(0, n, 2)) + [r for r in borders if rng.random() < 0.3]:
                s[t, r, rng.integers(d)] = NEAR_LIMIT[rng.integers(len(NEAR_LIMIT))]
    return s


def snapshot(pop):
    return {"states": pop.states.copy(), "costs": pop.costs.copy(), "mean_state": pop.mean_state.copy(),
            "mean_signal": pop.mean_signal.copy(), "class_mean_signal": pop.class_mean_signal.copy(),
            "class_mean_state": pop.class_mean_state.copy(), "worst": pop.worst_agent, "valid": pop.n_valid_signals}


def assert_same_bits(a, b, what):
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), f"{what}: {key} differs"


def assert_near(a, b, rtol, what):
    """Every array of ``a`` within ``rtol`` of ``b``'s, relative to the largest magnitude of that array."""
    for key in a:
        if key == "worst":  # an ulp may move the worst agent between two near-equal costs
            continue
        x, y = np.asarray(a[key], float), np.asarray(b[key], float)
        scale = 1.0 + np.abs(y).max(initial=0.0)
        assert np.allclose(x, y, rtol=0.0, atol=rtol * scale, equal_nan=True), f"{what}: {key} off by {np.abs(x - y).max()}"


# --------------------------------------------------------------------------- Population and Server
@settings(max_examples=25)
@given(n=st.sampled_from(SIZES), d=st.integers(1, 5), K=st.integers(1, 3), policy=st.sampled_from(POLICIES),
       rule=st.sampled_from(("eg", "hedge")), alpha=st.sampled_from((0.0, 0.05)), seed=st.integers(0, 2**32 - 1))
def test_population_and_server_the_same_bits_on_any_thread_count_and_the_reference_on_every_backend(n, d, K, policy, rule,
                                                                                                 alpha, seed):
    """README: "the same input gives bitwise the same result whatever the thread count"; every backend = the reference.

    And ``Population.run(signals)`` = one ``step`` per row of ``signals``, bitwise.
    """
    rng = np.random.default_rng(seed)
    K = min(K, n)
    game, labels = random_game(rng, K, policy), random_labels(rng, n, K)
    x0, T = rng.normal(size=(n, d)), 3
    s = random_signals(rng, T, n, d)
    y = rng.normal(size=(T, d))
    runs = {}
    for backend in BACKENDS:
        for threads in ((1, 2) if backend != "numpy" else (1,)):
            pop = Population(game, initial_states=x0, labels=labels, backend=backend, threads=threads, parallel_threshold=1)
            server = Server(n, d, rule=rule, eta=0.5, alpha=alpha, backend=backend, threads=threads, parallel_threshold=1)
            seen = []
            for t in range(T):
                yhat = pop.step_predict(s[t], server).copy()
                server.update(pop.states, y[t])
                seen.append({**snapshot(pop), "yhat": yhat, "log_weights": server.log_weights.copy()})
            runs[backend, threads] = seen
            if threads == 1:
                again = Population(game, initial_states=x0, labels=labels, backend=backend)
                again.run(s)
                assert_same_bits(snapshot(again), snapshot(pop), f"{backend}: run(signals) against step by step")
    for backend in COMPILED:
        for t in range(T):
            assert_same_bits(runs[backend, 2][t], runs[backend, 1][t], f"{backend} on 2 threads, round {t}")
            assert_near(runs[backend, 1][t], runs["numpy", 1][t], 1e-9, f"{backend} against the reference, round {t}")


@settings(max_examples=6)
@given(n=st.sampled_from((2, 3, CHUNK + 1)), d=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_step_predict_is_step_then_predict_to_the_documented_precision(n, d, seed):
    """``Population.step_predict``: ``step`` + ``server.predict`` to ``1e-12`` of ``sum_i p_i |x_i|``.

    The states cancel (pairs ``+-x``, the ``local`` policy at its signals keeps them): the mixture is a
    rounding error, and the two sums' differ by more than itself on the reference (it said "1e-12 relative").
    """
    rng = np.random.default_rng(seed)
    half = rng.normal(size=(n // 2, d)) * 10.0 ** rng.uniform(0, 8)
    pairs = np.concatenate([half, -half[::-1], np.zeros((n % 2, d))])
    # Cancelling, and shifted by a mean of the pairs' size (a mixture of its summands' size: catches a relative error).
    for x0 in (pairs, pairs + rng.normal(size=d) * np.abs(half).max()):
        for backend in BACKENDS:
            pop = Population(Game(1.0, 0.0, 0.5, 0.9, policy="local"), initial_states=x0, backend=backend)
            server = Server(n, d, rule="hedge", eta=0.0, backend=backend)
            yhat = pop.step_predict(x0, server)
            np.testing.assert_array_equal(pop.states, x0)
            scale = np.exp(server.log_weights) @ np.abs(pop.states)
            assert (np.abs(yhat - server.predict(pop.states)) <= 1e-12 * scale).all(), backend


@settings(max_examples=15)
@given(n=st.sampled_from((3, 9, CHUNK + 1)), d=st.integers(1, 4), K=st.sampled_from((2, 3)),
       policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**32 - 1))
def test_identical_classes_play_the_single_class_game(n, d, K, policy, seed):
    """README "Trust classes": "identical classes give the single-class policy".

    The baselines read the means over all agents, so K identical classes move every agent as one class
    does whatever the shares and the invalid rows; ``memoa`` reads the class means weighted by the game's
    shares, so it is the single-class game when the shares are the class sizes and every signal is valid.
    """
    rng = np.random.default_rng(seed)
    q, kappa, r, gamma = rng.uniform(0.1, 3), rng.uniform(0, 3), rng.uniform(0.05, 2), rng.uniform(0.5, 0.99)
    labels = random_labels(rng, n, K)
    if policy == "memoa":
        shares, s = np.bincount(labels, minlength=K) / n, rng.normal(size=(3, n, d))
    else:
        # no valid values near the limit: their sums cancel in another order in each game (the means of
        # +-1e50 and 1 are rounding errors, differing by more than themselves)
        shares, s = rng.dirichlet(np.ones(K)) * 0.5 + 0.5 / K, random_signals(rng, 3, n, d, near_limit=False)
        shares /= shares.sum()
    feedforward = bool(rng.integers(2)) if policy == "memoa" else True
    one = Game(q, kappa, r, gamma, policy=policy, feedforward=feedforward)
    many = Game(q=[q] * K, kappa=[kappa] * K, r=r, gamma=gamma, policy=policy, feedforward=feedforward, shares=shares)
    x0 = rng.normal(size=(n, d))
    for backend in BACKENDS:
        a = Population(one, initial_states=x0, backend=backend)
        b = Population(many, initial_states=x0, labels=labels, backend=backend)
        for t in range(3):
            a.step(s[t])
            b.step(s[t])
            snap_a, snap_b = snapshot(a), snapshot(b)
            for key in ("class_mean_signal", "class_mean_state", "worst"):
                del snap_a[key], snap_b[key]
            assert_near(snap_b, snap_a, 1e-12, f"{backend}, {K} identical classes, round {t}")


@settings(max_examples=15)
@given(n=st.sampled_from(SIZES), d=st.integers(1, 4), K=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       how=st.sampled_from(("pickle", "copy", "deepcopy", "state_dict", "checkpoint")))
def test_a_copy_or_a_restored_state_continues_bitwise_on_another_thread_count(n, d, K, seed, how, tmp_path_factory):
    """README: "a copy is independent and continues bitwise"; the checkpoint module: "continue bit for bit".

    Including a K-class step where one class had no valid signal (its signal mean is the last one kept).
    """
    rng = np.random.default_rng(seed)
    K = min(K, n)
    game, labels = random_game(rng, K, str(rng.choice(POLICIES))), random_labels(rng, n, K)
    s = random_signals(rng, 4, n, d)
    if K > 1:
        s[1][labels == rng.integers(K)] = np.nan
    backend = str(rng.choice(BACKENDS))
    pop = Population(game, initial_states=rng.normal(size=(n, d)), labels=labels, backend=backend, threads=1,
                     parallel_threshold=1)
    server = Server(n, d, rule=str(rng.choice(("eg", "hedge"))), eta=0.5, alpha=0.05, backend=backend)
    for t in range(2):
        pop.step_predict(s[t], server)
        server.update(pop.states, np.ones(d))
    if how in ("pickle", "copy", "deepcopy"):
        twin_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "copy": copy.copy, "deepcopy": copy.deepcopy}[how]
        twin, twin_server = twin_of(pop), twin_of(server)
    else:
        twin = Population(game, n, d, labels=labels, backend=backend, threads=2, parallel_threshold=1)
        twin_server = Server(n, d, rule=server.rule, eta=0.5, alpha=0.05, backend=backend, threads=2, parallel_threshold=1)
        if how == "state_dict":
            twin.load_state_dict(pop.state_dict())
            twin_server.load_state_dict(server.state_dict())
        else:
            path = tmp_path_factory.mktemp("claims") / "run.npz"
            save_checkpoint(path, pop, server)
            restore_checkpoint(path, twin, twin_server)
    for t in range(2, 4):
        a = pop.step_predict(s[t], server).copy()
        b = twin.step_predict(s[t], twin_server).copy()
        server.update(pop.states, np.full(d, 0.5))
        twin_server.update(twin.states, np.full(d, 0.5))
        assert np.array_equal(a, b), f"{how}: the mixture of round {t}"
        assert_same_bits(snapshot(twin), snapshot(pop), f"{how} ({backend}), round {t}")
        assert np.array_equal(twin_server.log_weights, server.log_weights)


# --------------------------------------------------------------------------- the fused pipeline
@settings(max_examples=15)
@given(n=st.sampled_from(SIZES), d=st.integers(1, 3), lags=st.integers(1, 3), policy=st.sampled_from(POLICIES),
       rule=st.sampled_from(("eg", "hedge")), eta=st.sampled_from((0.0, 0.5)), alpha=st.sampled_from((0.0, 0.01, 1.0)),
       seed=st.integers(0, 2**32 - 1))
def test_pipeline_run_is_round_after_round_on_any_thread_count_and_its_copies_continue(n, d, lags, policy, rule, eta,
                                                                                       alpha, seed):
    """``Pipeline.run``: "the same bits as calling round on each value in turn"; "bitwise the same on any thread count".

    ``run`` on two threads over pieces of the series (records on and off) against ``round`` on one thread;
    a pickled or copied pipeline continues bitwise (``Pipeline.__reduce__``); the reference within 1e-8.
    """
    rng = np.random.default_rng(seed)
    game = random_game(rng, 1, policy)
    kw = dict(game=game, rule=rule, eta=eta, alpha=alpha, lags=lags, mu=float(rng.uniform(0.05, 1.5)), seed=seed)
    T = 6
    y, record = rng.normal(size=(T, d)), rng.random(T) < 0.7
    names = ("states", "signals", "costs", "log_weights", "squared_errors", "signal_squared_errors", "forecaster_weights",
             "mean_state", "mean_signal", "mixture")

    def state(p):
        return {**{k: np.array(getattr(p, k)) for k in names}, "worst": p.worst_client, "t": p.t, "recorded": p.n_recorded,
                "valid": p.n_valid_signals}

    one = Pipeline(n, d, threads=1, parallel_threshold=1, **kw)
    reference = Pipeline(n, d, backend="numpy", **kw)
    rounds = []
    for t in range(T):
        rounds.append(one.round(y[t], record=bool(record[t])).copy())
        reference.round(y[t], record=bool(record[t]))
    assert_near(state(reference), state(one), 1e-8, "the reference")
    two = Pipeline(n, d, threads=2, parallel_threshold=1, **kw)
    twin, t = None, 0
    while t < T:
        end = t + 1
        while end < T and record[end] == record[t]:
            end += 1
        np.testing.assert_array_equal(two.run(y[t:end], record=bool(record[t])), np.array(rounds[t:end]))
        if twin is None:
            twin, t_twin = (pickle.loads(pickle.dumps(two)) if rng.random() < 0.5 else copy.copy(two)), end
        t = end
    assert_same_bits(state(two), state(one), "run on 2 threads against round on 1")
    for t in range(t_twin, T):
        twin.round(y[t], record=bool(record[t]))
    assert_same_bits(state(twin), state(one), "a copy of the pipeline")


@settings(max_examples=6)
@given(n2=st.sampled_from((2, 9, CHUNK + 1)), d=st.integers(1, 5), lags=st.integers(1, 3), data=st.data())
def test_pipeline_clients_noise_and_forecasts_depend_on_the_client_alone(n2, d, lags, data):
    """``Pipeline``: the noise is a function of ``(seed, client, round, coordinate)``: a smaller pipeline repeats the first clients."""
    n1 = data.draw(st.integers(1, n2 - 1))
    seed = data.draw(st.integers(0, 2**63 - 1))
    y = np.random.default_rng(n1).normal(size=(3, d))
    small = Pipeline(n1, d, lags=lags, seed=seed, threads=1)
    large = Pipeline(n2, d, lags=lags, seed=seed, threads=2, parallel_threshold=1)
    np.testing.assert_array_equal(small.noise_scales, large.noise_scales[:n1])
    for value in y:
        small.round(value)
        large.round(value)
        np.testing.assert_array_equal(small.signals, large.signals[:n1])


# --------------------------------------------------------------------------- signal sources
@settings(max_examples=6)
@given(block=st.sampled_from((1, 3, CHUNK)), d=st.integers(1, 3), lags=st.integers(1, 3), data=st.data())
def test_forecaster_shards_are_the_rows_of_the_whole_population_on_any_thread_count(block, d, lags, data):
    """``ClientForecasters`` "Shard reproducibility": ``[lo, hi)`` = those rows of the whole object, any threads."""
    n = data.draw(st.sampled_from((1, 2, 7, CHUNK + 1) if block == CHUNK else (1, 2, 7, 20)))
    n_blocks = -(-n // block)
    cuts = sorted({0, n, *(min(n, block * k) for k in data.draw(st.lists(st.integers(0, n_blocks), max_size=2)))})
    kw = dict(lags=lags, mu=0.5, seed=data.draw(st.integers(0, 2**63 - 1)), block_size=block, parallel_threshold=1)
    y = np.random.default_rng(n).normal(size=(3, d))
    for backend in ("numba", "numpy"):
        whole = ClientForecasters(n, d, backend=backend, threads=2, **kw)
        shards = [ClientForecasters(hi - lo, d, first_client=lo, backend=backend, threads=1, **kw)
                  for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
        for value in y:
            rows = np.array(whole.observe(value))
            np.testing.assert_array_equal(np.concatenate([np.array(s.observe(value)) for s in shards]), rows)


@settings(max_examples=6)
@given(n=st.sampled_from((1, 2, 9, CHUNK + 1)), d=st.integers(1, 4), data=st.data())
def test_noisy_last_value_slices_and_thread_counts_draw_the_same_signals(n, d, data):
    """``NoisyLastValueSignals``: clients ``[lo, hi)`` reproduce that slice of the whole source, "whatever the sharding" and threads."""
    seed = data.draw(st.integers(0, 2**63 - 1))
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    whole = NoisyLastValueSignals(0, n, seed, dim=d, threads=2)
    part = NoisyLastValueSignals(lo, hi, seed, dim=d, threads=1)
    for value in np.random.default_rng(n).normal(size=(3, d)):
        whole.observe(value)
        part.observe(value)
        np.testing.assert_array_equal(part.next(), whole.next()[lo:hi])


# --------------------------------------------------------------------------- certificates
@settings(max_examples=10)
@given(n=st.integers(2, 6), d=st.integers(1, 2), K=st.integers(1, 2), policy=st.sampled_from(POLICIES),
       power=st.integers(-480, 480), seed=st.integers(0, 2**32 - 1))
def test_certificates_relative_epsilon_same_bits_at_any_scale_and_one_class_by_either_path(n, d, K, policy, power, seed):
    """README "Certificates at any scale": "the relative epsilon is the same bits at any scale (2^-480 to 2^480)".

    And a single-class game certified through the K-class code (labels all 0) agrees with the 3 x 3 path.
    """
    rng = np.random.default_rng(seed)
    game, labels = random_game(rng, K, policy), random_labels(rng, n, K) if K <= n else None
    if labels is None:
        game = random_game(rng, 1, policy)
    s, x0 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    base = epsilon_nash(game, n, s, x0, agents="all", labels=labels)
    scaled = epsilon_nash(game, n, s * 2.0**power, x0 * 2.0**power, agents="all", labels=labels)
    np.testing.assert_array_equal(scaled.relative_epsilon, base.relative_epsilon)
    if game.n_classes == 1:
        general = epsilon_nash(game, n, s, x0, agents="all", labels=np.zeros(n, dtype=np.int64))
        np.testing.assert_allclose(general.cost_policy, base.cost_policy, rtol=1e-9)
        np.testing.assert_allclose(general.cost_best_response, base.cost_best_response, rtol=1e-9)


# --------------------------------------------------------------------------- threads of the caller
def test_separate_objects_stepping_at_once_in_separate_threads_give_the_bits_of_one_after_the_other():
    """README: "Separate objects step concurrently in separate threads with the same bits as one after the other".

    Every kind of object at once, each with two kernel threads (Numba's thread count is set per call and
    restored; the OpenMP regions of two Python threads overlap), against the same calls made in turn.
    """
    n, d, T = CHUNK + 1, 2, 4
    rng = np.random.default_rng(7)
    game = Game(q=[1.0, 2.0], kappa=[0.5, 1.5], r=0.3, gamma=0.9)
    labels, x0 = np.arange(n) % 2, rng.normal(size=(n, d))
    s = random_signals(rng, T, n, d, near_limit=False)
    y = rng.normal(size=(T, d))

    def population_job(backend):
        def run():
            pop = Population(game, initial_states=x0, labels=labels, backend=backend, threads=2, parallel_threshold=1)
            server = Server(n, d, rule="eg", eta=0.5, alpha=0.01, backend=backend, threads=2, parallel_threshold=1)
            out = []
            for t in range(T):
                out.append(pop.step_predict(s[t], server).copy())
                server.update(pop.states, y[t])
            return [np.array(out), pop.states.copy(), pop.costs.copy(), server.log_weights.copy()]
        return run

    def pipeline_job():
        pipe = Pipeline(n, d, seed=3, threads=2, parallel_threshold=1)
        return [pipe.run(y).copy(), pipe.states.copy(), pipe.log_weights.copy()]

    def forecaster_job():
        fc = ClientForecasters(n, d, seed=5, threads=2, parallel_threshold=1)
        return [np.array([np.array(fc.observe(v)) for v in y])]

    jobs = [population_job(b) for b in COMPILED] + [pipeline_job, forecaster_job]
    in_turn = [job() for job in jobs]
    at_once = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def go(k):
        start.wait()
        at_once[k] = jobs[k]()

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, (alone, together) in enumerate(zip(in_turn, at_once)):
        assert together is not None, f"job {k} raised"
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(b, a)


# --------------------------------------------------------------------------- the reference as a backend
def test_the_reference_backend_gives_the_compiled_results_without_warning_at_a_tiny_share_and_overflowing_costs():
    """Every backend, the same result: the NumPy reference warned where the compiled kernels return the documented value.

    ``alpha = 5e-324`` is a valid fixed share, but ``alpha / N`` rounds to 0: the share is ``log 0 = -inf``, no
    share (``log(alpha / N)`` warned "divide by zero"). A cost past the largest double is ``inf`` (the README's
    bound on finite costs; it warned "overflow"). Under warnings-as-errors (as this suite runs) the Server then
    stopped between its reweight and its share (weights moved, ``n_updates`` not), the Population after its
    signal pass (mean signal moved, ``t`` not), and ``Pipeline(backend="numpy")`` in its pass B.
    """
    x = np.array([[0.0], [1.0], [2.0]])
    heavy = Game(q=[2.0, 3.77e243], kappa=[2.18, 0.11], r=[2.17, 2.27], gamma=0.5, policy="local", shares=[0.5, 0.5])
    costly = Game(1e250, 1e250, 1e250, 0.9)
    series = np.array([1e30, -1e30, 1e30, 0.5])
    got = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in BACKENDS:
            server = Server(3, 1, rule="hedge", eta=1.0, alpha=5e-324, backend=backend)
            server.update(x, [0.5])
            pop = Population(heavy, 3, 1, labels=[0, 1, 0], backend=backend)
            pop.step(np.array([[1.0], [1e40], [0.0]]))
            got[backend] = (server.log_weights.copy(), server.n_updates, pop.states.copy(), pop.costs.copy(), pop.t)
        for backend in ("numba", "numpy"):
            pipes = [Pipeline(3, 1, alpha=5e-324, seed=1, backend=backend), Pipeline(3, 1, game=costly, seed=1, backend=backend)]
            got["pipeline", backend] = [(pipe.run(series).copy(), pipe.costs.copy(), pipe.log_weights.copy()) for pipe in pipes]
    for backend in BACKENDS:
        log_w, n_updates, states, costs, t = got[backend]
        np.testing.assert_allclose(log_w, got["numpy"][0], rtol=1e-12)
        assert n_updates == 1 and t == 1
        np.testing.assert_allclose(states, got["numpy"][2], rtol=1e-12)
        assert np.isinf(costs[1]) and np.isfinite(costs[[0, 2]]).all(), costs
    for (yhat, costs, log_w), (yhat_ref, costs_ref, log_w_ref) in zip(got["pipeline", "numba"], got["pipeline", "numpy"]):
        np.testing.assert_allclose(yhat, yhat_ref, rtol=1e-9)
        np.testing.assert_array_equal(np.isinf(costs), np.isinf(costs_ref))
        np.testing.assert_allclose(log_w, log_w_ref, rtol=1e-9)
    assert np.isinf(got["pipeline", "numpy"][1][1]).all()


def test_every_backend_names_the_same_worst_agent_once_a_discount_of_0_meets_an_infinite_cost():
    """Past the README's bound on finite costs, ``gamma^t`` underflows to 0 while a cost is ``inf``: ``0 * inf`` makes
    those costs NaN on every backend (silently). The worst agent is the largest cost's, NaN never compared larger
    (the compiled kernels' ``>``); the reference's ``argmax`` took the first NaN (Population: agent 0 and regret
    NaN against 2 and 1e250; Pipeline: 0 against -1).
    """
    x = np.array([[0.0], [1.0], [2.0]])
    costly = Game(1e250, 1e250, 1e250, 0.01, policy="local")
    got = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in BACKENDS:
            pop = Population(costly, initial_states=x, backend=backend)
            pop.run(np.broadcast_to(np.array([[1e30], [-1e30], [1.0]]), (170, 3, 1)))
            got[backend] = (pop.costs.copy(), pop.worst_agent, pop.regret)
        for backend in ("numba", "numpy"):
            pipe = Pipeline(3, 1, game=costly, backend=backend)
            pipe.run(np.tile([1e30, -1e30, 1.0], 60))
            got["pipeline", backend] = (pipe.costs.copy(), pipe.worst_client)
    assert np.isnan(got["numpy"][0][:2]).all() and np.isfinite(got["numpy"][0][2])
    for backend in BACKENDS:
        np.testing.assert_array_equal(np.isnan(got[backend][0]), np.isnan(got["numpy"][0]))
        costs, worst, regret = got[backend]
        assert worst == 2 and regret == costs[2], backend
        np.testing.assert_allclose(regret, got["numpy"][2], rtol=1e-12)
    assert np.isnan(got["pipeline", "numba"][0]).all() and np.isnan(got["pipeline", "numpy"][0]).all()
    assert got["pipeline", "numba"][1] == got["pipeline", "numpy"][1]


def _first_largest(costs):
    """The first index of the largest non-NaN cost (0 if every cost is NaN): the worst-agent rule, written independently."""
    finite = costs[~np.isnan(costs)]
    return int(np.flatnonzero(costs == finite.max())[0]) if finite.size else 0


def test_every_backend_and_thread_count_names_the_same_worst_agent_when_a_whole_chunk_of_costs_is_nan():
    """The same NaN costs as above, filling the first chunk (then the second one's first agents): Cython's chunk
    maximum fell back to ``(J[lo], lo)`` on an all-NaN chunk and its merge started from chunk 0's row, so it named
    agent 0 with regret NaN where Numba and the reference name the largest finite cost (agent CHUNK + 1).
    Also a NaN before an infinite cost: the inf is the worst (Population fell back to ``argmax``, the first NaN).
    """
    costly = Game(1e250, 1e250, 1e250, 0.01, policy="local")
    n = CHUNK + 4
    x = (np.arange(n, dtype=float) % 3)[:, None]
    for n_nan in (CHUNK, CHUNK + 2, n):
        s = np.ones((n, 1))
        s[:n_nan:2], s[1:n_nan:2] = 1e30, -1e30  # pairs that cancel in the mean field
        signals = np.broadcast_to(s, (170, n, 1))
        for backend in BACKENDS:
            for threads in (1, 2):
                pop = Population(costly, initial_states=x, backend=backend, threads=threads)
                pop.run(signals)
                costs = pop.costs
                assert np.isnan(costs[:n_nan]).all() and np.isfinite(costs[n_nan:]).all()
                assert pop.worst_agent == _first_largest(costs), (n_nan, backend, threads)
                np.testing.assert_array_equal(pop.regret, costs[pop.worst_agent])
    for backend in BACKENDS:
        pop = Population(Game(1.0, 1.0, 1.0, 0.9), initial_states=np.zeros((3, 1)), backend=backend)
        pop._J[:] = [np.nan, np.inf, 1.0]  # no public way to this pattern without overflowing every cost
        pop.step(np.ones((3, 1)))
        assert (pop.worst_agent, pop.regret) == (1, np.inf), backend


def test_every_backend_module_has_the_references_functions_with_its_signatures():
    """``kernels/_reference.py``: "Every backend module has the same public functions with the same signatures".

    (All of the reference's ``__all__`` but ``valid_rows``, its definition of a valid row, which the tests use.)
    """
    reference = importlib.import_module(_backends._MODULES["numpy"])
    for backend in COMPILED:
        module = importlib.import_module(_backends._MODULES[backend])
        for name in reference.__all__:
            if name == "valid_rows":
                continue
            ours, theirs = getattr(reference, name), getattr(module, name, None)
            assert theirs is not None, f"{backend} has no {name}"
            if not callable(ours):
                assert theirs == ours, f"{backend}.{name}"
                continue
            try:
                signature = inspect.signature(theirs)
            except (TypeError, ValueError):  # a compiled function without a Python signature
                continue
            assert list(signature.parameters) == list(inspect.signature(ours).parameters), f"{backend}.{name}"
