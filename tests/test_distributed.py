"""DaskPopulation on a real LocalCluster: same results as one process, checkpoints, lost workers.

Two worker processes on the loopback interface, started and closed here.
Skipped with a reason where dask.distributed is not installed.
"""
import dis
import functools
import math
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from helpers import _bytecodes, _interrupt_at, reap

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install 'memoa-fast[dask]')")

from memoa_fast import Game, Population, Server  # noqa: E402
from memoa_fast.checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint  # noqa: E402
from memoa_fast.distributed import (  # noqa: E402
    DaskPopulation,
    DaskServer,
    NoisyLastValueSignals,
    ShardLostError,
    shard_bounds,
)
from memoa_fast.kernels import CHUNK, SIZE  # noqa: E402
from memoa_fast.timeseries.forecasters import ForecasterSignals  # noqa: E402

pytestmark = pytest.mark.dask

GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
N = 3 * CHUNK + 77  # four chunks, the last one short
TIMEOUT = 60  # seconds for any cluster operation


def _start_cluster():
    from distributed import Client, LocalCluster

    # Everything on the loopback interface; the HTTP servers on random ports (None would mean
    # the default 8787, taken by the module's cluster when the kill test starts its own).
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0", timeout=TIMEOUT,
    )
    return cluster, Client(cluster, timeout=TIMEOUT)


def _stop_cluster(cluster, client):
    client.close(timeout=TIMEOUT)
    cluster.close(timeout=TIMEOUT)


@pytest.fixture(autouse=True)
def _every_client_a_test_opens_is_closed():
    """A test closes every Dask client it opens, a DaskPopulation's own one (``direct=True``) included: else fail.

    A client left open outlives its cluster: when the module's cluster closes, the client's IO-loop thread keeps
    reconnecting (``Client._reconnect``, and its ``scheduler-info`` callback every 2 s) for the rest of the session,
    each attempt drawing its backoff from the global ``random`` (``random.uniform`` in ``distributed.comm.connect``).
    A hypothesis test of a later module (``tests/test_state.py`` in CI) then saw the global random state change
    during a draw: ``HypothesisDeprecationWarning: Do not use the random module inside strategies``, a FlakyFailure.
    The module's own clients (fixtures of a wider scope) are open before this runs and are not counted.
    """
    before = set(distributed.Client._instances)
    yield
    left = [c for c in list(distributed.Client._instances) if c not in before and c.status not in ("closed", "newly-created")]
    for c in left:
        c.close(timeout=TIMEOUT)
    assert not left, f"the test left {len(left)} Dask client(s) open (close its DaskPopulation: dpop.close() or `with`)"


@pytest.fixture(scope="module")
def client():
    cluster, client = _start_cluster()
    try:
        yield client
    finally:
        _stop_cluster(cluster, client)


def _single(game=GAME, n=N, d=1, rule="eg", x0=None):
    pop = Population(game, n, d, initial_states=x0, threads=1)
    return pop, Server(n, d, rule=rule, eta=0.5, alpha=0.01, threads=1)


def _round(pop, server, signals, target):
    x = pop.step(signals)
    yhat = np.array(server.predict(x))
    server.update(x, target)
    return yhat


def _assert_close(dpop, dserver, pop, server, **tol):
    np.testing.assert_allclose(dpop.states, pop.states, **tol)
    np.testing.assert_allclose(dpop.costs, pop.costs, **tol)
    np.testing.assert_allclose(dpop.mean_state, pop.mean_state, **tol)
    np.testing.assert_allclose(dpop.mean_signal, pop.mean_signal, **tol)
    assert dpop.n_valid_signals == pop.n_valid_signals
    assert (dpop.t, dpop.discount) == (pop.t, pop.discount)
    assert dpop.worst_agent == pop.worst_agent
    assert dpop.regret == pytest.approx(pop.regret, rel=1e-12)
    if server is not None:
        np.testing.assert_allclose(dserver.log_weights, server.log_weights, **tol)
        assert dserver.n_updates == server.n_updates


# --------------------------------------------------------------------------- no cluster needed
def test_shard_bounds_are_whole_chunks():
    for n, k in [(1, 1), (CHUNK, 1), (CHUNK + 1, 2), (10 * CHUNK + 5, 3), (10**7, 7)]:
        bounds = shard_bounds(n, k)
        assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(lo % CHUNK == 0 and hi > lo for lo, hi in bounds)
        sizes = [hi - lo for lo, hi in bounds[:-1]]
        assert max(sizes, default=0) - min(sizes, default=0) <= CHUNK
    with pytest.raises(ValueError, match="n_shards <= 2"):
        shard_bounds(CHUNK + 1, 3)


def test_noisy_source_slices_reproduce_the_whole():
    whole = NoisyLastValueSignals(0, N, 3, dim=2)
    part = NoisyLastValueSignals(2 * CHUNK, N, 3, dim=2)
    for y in ([0.0, 1.0], [2.0, -1.0]):
        whole.observe(y)
        part.observe(y)
        np.testing.assert_array_equal(whole.next()[2 * CHUNK :], part.next())
    z = (NoisyLastValueSignals(0, 200_000, 1, low=1.0, high=1.0).next()[:, 0])
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01  # standard normal draws


def test_one_way_to_make_each_engine():
    """Population is the one-machine engine only; DaskPopulation is built by its own constructor."""
    with pytest.raises(TypeError, match="client"):
        Population(GAME, 10, 2, client=object())
    assert not hasattr(__import__("memoa_fast.distributed", fromlist=["x"]), "make_population")


def test_k_class_population_on_shards_matches_one_machine(client, rng):
    """Three classes with their own weights, labels changed between steps: the same results as one machine."""
    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    if getattr(game, "n_classes", 1) == 1 and not hasattr(Game, "with_weights"):
        pytest.skip("the K-class Game is not in this build")
    game = Game(q=[1.0, 0.3, 2.0], kappa=[2.0, 1.0, 0.5], r=[0.5, 0.2, 1.0], gamma=0.95, shares=[0.5, 0.3, 0.2])
    labels = rng.integers(0, 3, N)
    x0 = rng.normal(size=(N, 2))
    pop = Population(game, initial_states=x0, labels=labels, threads=1)
    dpop = DaskPopulation(game, initial_states=x0, labels=labels, client=client, n_shards=3, timeout=TIMEOUT)
    try:
        for t in range(4):
            s = rng.normal(size=(N, 2))
            s[t * 7, 0] = np.nan
            pop.step(s)
            dpop.step(s)
            if t == 1:
                labels = rng.integers(0, 3, N)
                pop.set_labels(labels)
                dpop.comm.reset()
                dpop.set_labels(labels)
                # The labels go out; only the shards' class sums come back (it used to gather every state).
                assert dpop.comm.round_trips == 1 and dpop.comm.bytes_received < 3000
                np.testing.assert_allclose(dpop.class_mean_state, pop.class_mean_state, rtol=1e-13, atol=1e-15)
        _assert_close(dpop, None, pop, None, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(dpop.class_mean_state, pop.class_mean_state, rtol=1e-12, atol=1e-13)
    finally:
        dpop.close()


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("rule", ["eg", "hedge"])
def test_client_signals_match_single_process(client, rng, rule):
    """Signals sent from the client (with non-finite rows); per-shard partials: equal to 1e-12."""
    d, T = 2, 12
    x0 = rng.normal(size=(N, d))
    signals = rng.normal(size=(T, N, d))
    signals[3, 5, 1] = np.nan
    signals[4, CHUNK + 9, :] = np.inf
    signals[6, :, :] = np.nan  # nobody moves, sbar keeps its value
    targets = rng.normal(size=(T, d))
    pop, server = _single(d=d, rule=rule, x0=x0)
    dpop = DaskPopulation(GAME, initial_states=x0, client=client, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule=rule, eta=0.5, alpha=0.01)
    assert dpop.n_shards == 2
    for s, y in zip(signals, targets):
        a = _round(pop, server, s, y)
        b = _round(dpop, dserver, s, y)
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    _assert_close(dpop, dserver, pop, server, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dserver.weights.sum(), 1.0, rtol=1e-12)
    dpop.close()


@pytest.mark.parametrize("rule", ["hedge", "eg"])
def test_exact_mode_is_bitwise_single_process(client, rule):
    """exact=True: chunk partials merged by the kernels' own merge: bitwise, on 3 shards over 2 workers (eg: its
    mixture error sum_i p_i (x_i - y) gathered from the shards as Server computes it).
    """
    d, T = 2, 10
    targets = np.linspace(-1, 1, T * d).reshape(T, d)
    pop, server = _single(d=d, rule=rule)
    source = NoisyLastValueSignals(0, N, 5, dim=d)
    dpop = DaskPopulation(
        GAME, N, d, client=client, n_shards=3, exact=True, signals=functools.partial(NoisyLastValueSignals, dim=d),
        seed=5, timeout=TIMEOUT,
    )
    dserver = DaskServer(dpop, rule=rule, eta=0.5, alpha=0.01)
    for y in targets:
        source.observe(y)
        dpop.observe(y)
        a = _round(pop, server, source.next(), y + 0.3)
        b = _round(dpop, dserver, None, y + 0.3)
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(dpop.states, pop.states)
    np.testing.assert_array_equal(dpop.costs, pop.costs)
    np.testing.assert_array_equal(dpop.mean_state, pop.mean_state)
    np.testing.assert_array_equal(dpop.mean_signal, pop.mean_signal)
    np.testing.assert_array_equal(dserver.log_weights, server.log_weights)
    assert dpop.regret == pop.regret and dpop.worst_agent == pop.worst_agent
    dpop.close()


def test_step_predict_is_step_then_the_servers_mixture_as_on_one_machine(client, rng):
    """``DaskPopulation.step_predict`` (the API is Population's: it was missing) = step, then ``server.predict()``.

    Against one machine's ``Population.step_predict`` to its documented precision, on shards with
    ``exact=True``; the server and ``out`` are checked before the step.
    """
    d, x0 = 2, rng.normal(size=(N, 2))
    pop, server = _single(d=d, x0=x0)
    dpop = DaskPopulation(GAME, N, d, client=client, initial_states=x0, n_shards=3, exact=True, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01)
    out = np.empty(d)
    for _ in range(3):
        s = rng.normal(size=(N, d))
        s[rng.integers(N)] = np.nan
        a = pop.step_predict(s, server)
        b = dpop.step_predict(s, dserver, out=out)
        assert b is out
        assert (np.abs(b - a) <= 1e-12 * (server.weights @ np.abs(pop.states))).all()
        np.testing.assert_array_equal(dserver.predict(), b)
        np.testing.assert_array_equal(dpop.states, pop.states)
        target = rng.normal(size=d)
        server.update(pop.states, target)
        dserver.update(None, target)
    with pytest.raises(TypeError, match="DaskServer"):
        dpop.step_predict(s, server)
    with pytest.raises(ValueError, match="out"):
        dpop.step_predict(s, dserver, out=np.empty(d + 1))
    dserver._interrupted = "an update"  # as an interrupt between an update's first and last write leaves it
    with pytest.raises(RuntimeError, match="interrupted"):  # before the step (it moved the population first)
        dpop.step_predict(s, dserver)
    assert dpop.t == 3
    dpop.close()


def test_forecasters_on_the_workers_match_the_single_process_pipeline(client):
    """MODEL.md section 6 with the client forecasters running on the workers, fed d numbers per round."""
    from memoa_fast.timeseries.forecasters import ClientForecasters
    from memoa_fast.timeseries.streams import logistic_map

    T = 15
    y = logistic_map(T + 1, seed=2)
    pop, server = _single(rule="hedge")
    forecasters = ClientForecasters(N, 1, lags=2, seed=9, threads=1)
    dpop = DaskPopulation(
        GAME, N, 1, client=client, signals=functools.partial(ForecasterSignals, lags=2), seed=9, timeout=TIMEOUT
    )
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
    dpop.comm.reset()
    for t in range(T):
        _round(pop, server, forecasters.observe(y[t]), y[t + 1])
        dpop.observe(y[t])
        _round(dpop, dserver, None, y[t + 1])
    # No agent array crossed the network: a few hundred bytes per round.
    assert dpop.comm.bytes_sent + dpop.comm.bytes_received < 2000 * T
    _assert_close(dpop, dserver, pop, server, rtol=1e-12, atol=1e-13)
    dpop.close()


def test_bytes_per_step_do_not_grow_with_n(client):
    per_step = []
    for n in (2 * CHUNK, 40 * CHUNK):
        dpop = DaskPopulation(GAME, n, 3, client=client, signals=functools.partial(NoisyLastValueSignals, dim=3), timeout=TIMEOUT)
        dserver = DaskServer(dpop, rule="eg", eta=0.1)
        dpop.run(steps=2)
        dserver.predict()
        dpop.comm.reset()
        for _ in range(5):
            dpop.observe(np.ones(3))
            x = dpop.step()
            dserver.predict(x)
            dserver.update(x, np.zeros(3))
        dpop.flush()
        per_step.append((dpop.comm.bytes_sent / 5, dpop.comm.bytes_received / 5, dpop.comm.round_trips))
        dpop.close()
    assert per_step[0] == per_step[1]
    assert per_step[0][0] + per_step[0][1] < 1500


# --------------------------------------------------------------------------- API
def test_handles_and_errors(client, rng):
    dpop = DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT)
    handle = dpop.step(rng.normal(size=N))
    assert handle.shape == (N, 1) and len(handle) == N
    server = Server(N, 1, threads=1)  # a single-process server gathers the handle through __array__
    np.testing.assert_array_equal(server.predict(handle), Server(N, 1, threads=1).predict(dpop.states))
    with pytest.raises(ValueError, match="worker-side signal source"):
        dpop.step()
    with pytest.raises(ValueError, match=r"signals must have shape \(12365, 1\)"):
        dpop.step(np.zeros(N + 1))
    dserver = DaskServer(dpop)
    with pytest.raises(TypeError, match="resident on its population's workers"):
        dserver.predict(np.zeros((N, 1)))
    out = np.full(1, 7.0)
    assert dserver.predict(out=out) is out and np.isfinite(out).all()
    for bad, error in ((np.zeros(2), ValueError), (np.zeros(1, dtype=np.float32), TypeError)):
        with pytest.raises(error, match=r"out must be a writeable float64 numpy array of shape \(1,\)"):
            dserver.predict(out=bad)
    with pytest.raises(ValueError, match="n_shards <= 4"):
        DaskPopulation(GAME, N, 1, client=client, n_shards=5)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        DaskPopulation(GAME, N, 1, client="tcp://127.0.0.1:8786")
    state = dpop.state_dict()
    dpop.step(rng.normal(size=N))
    dpop.load_state_dict(state)
    np.testing.assert_array_equal(dpop.states, state["states"])
    assert dpop.t == 1
    # run(): signals or steps, exactly one (either used to be ignored silently); a ragged list is named.
    t = dpop.t
    with pytest.raises(ValueError, match="exactly one of them; got both"):
        dpop.run(np.zeros((2, N, 1)), steps=5)
    with pytest.raises(ValueError, match="exactly one of them; got neither"):
        dpop.run()
    with pytest.raises(TypeError, match=r"signals must be an array of real numbers of shape \(T, n_agents, dim\), got list"):
        dpop.run([np.zeros(N), np.zeros(N - 1)])
    assert dpop.t == t
    dpop.run(np.zeros((2, N)))
    assert dpop.t == t + 2
    dpop.close()


def test_an_empty_class_is_refused_by_memoa_and_harmless_to_consensus_on_shards(client):
    """As on one machine: a memoa step that would read an empty class's means is refused before any shard moves.

    Consensus (which reads the means over all agents) keeps a population on a common signal at rest.
    """
    labels = np.repeat([0, 1], [N // 2, N - N // 2])  # class 2 is empty
    at_rest = np.full((N, 1), 5.0)
    for policy in ("memoa", "consensus"):
        game = Game([2.0, 1.0, 0.25], 3.0, 0.1, 0.9, policy)
        dpop = DaskPopulation(game, N, 1, labels=labels, client=client, n_shards=2, initial_states=at_rest, timeout=TIMEOUT)
        if policy == "memoa":
            dpop.comm.reset()
            with pytest.raises(ValueError, match=r"class 2 has no agent, but the 'memoa' policy"):
                dpop.step(at_rest)
            assert dpop.t == 0 and dpop.comm.round_trips == 0
            dpop.set_labels(np.arange(N) % 3)
        for _ in range(3):
            dpop.step(at_rest)
        np.testing.assert_allclose(dpop.states, 5.0, rtol=1e-14)
        dpop.close()


def test_a_failing_shard_names_itself_and_blocks_the_population(client):
    wrong_dim = functools.partial(NoisyLastValueSignals, dim=3)  # the population has d = 2
    dpop = DaskPopulation(GAME, N, 2, client=client, signals=wrong_dim, timeout=TIMEOUT)
    with pytest.raises(ValueError, match=r"signals of shard 0 \(agents \[0, 8192\)\) must have shape") as info:
        dpop.step()
    assert any("on worker tcp://127.0.0.1" in note for note in info.value.__notes__)
    with pytest.raises(RuntimeError, match="unusable"):
        dpop.step()
    dpop.close()


# --------------------------------------------------------------------------- checkpoints
_TARGETS = np.sin(np.arange(13))[:, None]


def _advance(pop, server, ts, source=None):
    for t in ts:
        if source is None:
            pop.observe(_TARGETS[t])
            _round(pop, server, None, _TARGETS[t + 1])
        else:
            source.observe(_TARGETS[t])
            _round(pop, server, source.next(), _TARGETS[t + 1])


def _assert_bitwise(a, a_server, b, b_server):
    for name in ("states", "costs", "mean_state", "mean_signal"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.t, a.discount, a.n_valid_signals, a.regret, a.worst_agent) == (b.t, b.discount, b.n_valid_signals,
                                                                                b.regret, b.worst_agent)
    np.testing.assert_array_equal(a_server.log_weights, b_server.log_weights)
    assert a_server.n_updates == b_server.n_updates


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_sharded_checkpoint_round_trip_is_bitwise_on_any_shard_count_and_one_machine(client, tmp_path):
    """Save on 2 shards (each writes its file); resume on 1, 2 and 3 shards and on one machine: bitwise the run that never stopped."""
    T, cut = 12, 5
    factory = functools.partial(NoisyLastValueSignals, low=0.1)
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, exact=True, signals=factory, seed=4, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01)
    _advance(dpop, dserver, range(cut))
    path = dpop.save(tmp_path / "run.ckpt", dserver)
    assert dpop.last_checkpoint == str(path) and dpop.last_checkpoint_step == cut
    shard_files = _files(tmp_path / "run.ckpt.shards")
    assert len(shard_files) == 2 and all(name.endswith(".npz") for name in shard_files)
    assert path.stat().st_size < 20_000  # the manifest holds no agent array
    _advance(dpop, dserver, range(cut, T))  # the run that never stopped

    ckpt = load_checkpoint(path)  # one machine reads the whole set
    assert ckpt.t == cut and ckpt.source["shared"]["t"] == cut
    pop = Population(GAME, N, 1, threads=1)
    server = Server(N, 1, rule="eg", eta=0.5, alpha=0.01, threads=1)
    source = NoisyLastValueSignals(0, N, 4, low=0.1)
    restore_checkpoint(path, pop, server, source=source)
    _advance(pop, server, range(cut, T), source)
    _assert_bitwise(pop, server, dpop, dserver)

    for n_shards in (1, 2, 3):
        other = DaskPopulation(GAME, N, 1, client=client, n_shards=n_shards, exact=True, signals=factory, seed=4,
                               timeout=TIMEOUT)
        other_server = DaskServer(other, rule="eg", eta=0.5, alpha=0.01)
        other.step()
        restore_checkpoint(path, other, other_server)  # in place, on the live shards
        assert other.t == cut and other_server.n_updates == cut
        _advance(other, other_server, range(cut, T))
        _assert_bitwise(other, other_server, dpop, dserver)
        if n_shards == 3:
            other.restore(path, other_server, n_shards=2)  # new shards read their rows
            assert other.n_shards == 2
            _advance(other, other_server, range(cut, T))
            _assert_bitwise(other, other_server, dpop, dserver)
        other.close()
    # The next save switches to a new set and deletes the previous one.
    dpop.save(path, dserver)
    assert len(set(_files(tmp_path / "run.ckpt.shards")) - set(shard_files)) == 2
    assert not set(_files(tmp_path / "run.ckpt.shards")) & set(shard_files)
    dpop.close()


def test_sharded_checkpoint_of_a_k_class_population(client, tmp_path, rng):
    """Labels travel in the shard files; class means and sizes come back; one machine reads the set too."""
    if not hasattr(Game(), "n_classes"):
        pytest.skip("the K-class Game is not in this build")
    game = Game(q=[1.0, 0.3, 2.0], kappa=[2.0, 1.0, 0.5], r=[0.5, 0.2, 1.0], gamma=0.95, shares=[0.5, 0.3, 0.2])
    labels = rng.integers(0, 3, N)
    signals = rng.normal(size=(4, N, 2))
    dpop = DaskPopulation(game, N, 2, labels=labels, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
    for s in signals[:2]:
        dpop.step(s)
    saved_states = dpop.states
    lay = dpop._lay
    dpop.mean_state  # the means are now up to date: save() writes the field as it is
    # The manifest's copy of the means is redundant: written wrong here (an engine bug, an edited file),
    # the restored means must still be those of the rows' states, as on one machine.
    dpop._field[lay.field_state] += 1.0
    dpop._field[lay.class_state:lay.class_state + 3] -= 2.0
    path = dpop.save(tmp_path / "k.ckpt")
    for s in signals[2:]:
        dpop.step(s)
    other = DaskPopulation(game, N, 2, labels=np.zeros(N, dtype=np.int64), client=client, exact=True, timeout=TIMEOUT)
    other.restore(path, n_shards=3)
    np.testing.assert_array_equal(other.labels, labels)
    np.testing.assert_allclose(other.mean_state, saved_states.mean(axis=0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(other.class_mean_state, [saved_states[labels == j].mean(axis=0) for j in range(3)],
                               rtol=1e-13, atol=1e-15)
    pop = Population(game, N, 2, labels=np.zeros(N, dtype=np.int64), threads=1)
    restore_checkpoint(path, pop)
    np.testing.assert_array_equal(pop.labels, labels)
    for engine in (other, pop):
        for s in signals[2:]:
            engine.step(s)
        np.testing.assert_array_equal(engine.states, dpop.states)
        np.testing.assert_array_equal(engine.costs, dpop.costs)
        np.testing.assert_array_equal(engine.class_mean_state, dpop.class_mean_state)
    other.close()
    dpop.close()


def test_single_file_checkpoint_of_a_sharded_population_still_works(client, tmp_path):
    dpop = DaskPopulation(GAME, N, 1, client=client, signals=NoisyLastValueSignals, seed=4, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
    _advance(dpop, dserver, range(3))
    path = dpop.save(tmp_path / "one.npz", dserver, sharded=False)
    assert not (tmp_path / "one.npz.shards").exists()
    states, weights = dpop.states, dserver.log_weights
    _advance(dpop, dserver, range(3, 5))
    dpop.restore(path, dserver, n_shards=3)
    np.testing.assert_array_equal(dpop.states, states)
    np.testing.assert_array_equal(dserver.log_weights, weights)
    dpop.close()


def test_save_and_restore_move_bytes_that_do_not_grow_with_n(client, tmp_path):
    used = []
    for n, name in ((2 * CHUNK, "a"), (40 * CHUNK, "b")):
        dpop = DaskPopulation(GAME, n, 2, client=client, n_shards=2, timeout=TIMEOUT,
                              signals=functools.partial(ForecasterSignals, dim=2, lags=2))
        dserver = DaskServer(dpop, rule="hedge", eta=0.5)
        for t in range(2):
            dpop.observe(np.full(2, 0.5 * t))
            dserver.update(dpop.step(), np.ones(2))
        dpop.flush()
        counts = []
        for action in (lambda: dpop.save(tmp_path / name, dserver), lambda: dpop.restore(tmp_path / name, dserver),
                       lambda: restore_checkpoint(tmp_path / name, dpop, dserver)):
            dpop.comm.reset()
            action()
            counts.append((dpop.comm.bytes_sent, dpop.comm.bytes_received, dpop.comm.round_trips))
        used.append(counts)
        dpop.close()
    assert used[0] == used[1]  # N x 20: the same bytes
    assert all(sent + received < 10_000 for sent, received, _ in used[0])


def _population_and_checkpoint(client, tmp_path, rng):
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    path = dpop.save(tmp_path / "c.ckpt", dserver)
    dserver.update(dpop.step(rng.normal(size=N)), np.zeros(1))
    return dpop, dserver, path


def _flip(path, where=0.5):
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, match", [
    ("flip shard data", "shard file .* not readable .*Bad CRC"),
    ("truncate shard", "bytes, the manifest says"),
    ("delete shard", "shard file .* is missing"),
    ("stale manifest", "shard file .* is missing"),
    ("swapped set", "does not match the manifest"),
    ("flip manifest", "not a readable memoa-fast checkpoint"),
])
def test_damaged_sharded_checkpoint_is_refused_and_changes_nothing(client, tmp_path, rng, damage, match):
    dpop, dserver, path = _population_and_checkpoint(client, tmp_path, rng)
    folder = tmp_path / "c.ckpt.shards"
    first = folder / _files(folder)[1]
    if damage == "flip shard data":
        _flip(first, 0.6)
    elif damage == "truncate shard":
        first.write_bytes(first.read_bytes()[:-100])
    elif damage == "delete shard":
        first.unlink()
    elif damage in ("stale manifest", "swapped set"):
        old = path.read_bytes()
        old_files = {name: (folder / name).read_bytes() for name in _files(folder)}
        dpop.save(path, dserver)  # a newer set replaces the old one
        if damage == "stale manifest":
            path.write_bytes(old)  # the old manifest is back, its files are gone
        else:  # the new files under the old names
            for old_name, new_name in zip(sorted(old_files), _files(folder)):
                os.replace(folder / new_name, folder / old_name)
            path.write_bytes(old)
    else:
        _flip(path, 0.5)
    states, costs, weights, t = dpop.states, dpop.costs, dserver.log_weights, dpop.t
    for load in (lambda: restore_checkpoint(path, dpop, dserver), lambda: dpop.restore(path, dserver, n_shards=3),
                 lambda: load_checkpoint(path)):
        with pytest.raises(CheckpointError, match=match):
            load()
        np.testing.assert_array_equal(dpop.states, states)
        np.testing.assert_array_equal(dpop.costs, costs)
        np.testing.assert_array_equal(dserver.log_weights, weights)
        assert dpop.t == t and dpop.n_shards == 2 and dserver.n_updates == 2
    dserver.update(dpop.step(rng.normal(size=N)), np.zeros(1))  # still usable: nothing was half-loaded
    assert dpop.t == t + 1
    dpop.close()


def test_unsaveable_state_writes_no_set(client, tmp_path, rng):
    """A state that could not be restored is refused at save time: the manifest and its set stay, nothing new is left."""
    dpop, dserver, path = _population_and_checkpoint(client, tmp_path, rng)
    folder = tmp_path / "c.ckpt.shards"
    before = (path.read_bytes(), _files(folder))
    lo, hi = dpop.bounds[1]
    # Damage the live arrays behind the validators' back (what a bug or a bit flip in memory would do).
    log_p = dserver.log_weights.copy()
    dpop._call(("load", None), per_shard_args=[(None, None, None, {dserver.sid: log_p[a:b] + (a == lo)}, None)
                                               for a, b in dpop.bounds])
    with pytest.raises(ValueError, match="cannot save a checkpoint of this server: .*not normalised"):
        dpop.save(path, dserver)
    assert (path.read_bytes(), _files(folder)) == before
    states = dpop.states.copy()
    states[lo + 3, 0] = 1e60
    dpop._call(("load", None), per_shard_args=[(states[a:b], None, None, {}, None) for a, b in dpop.bounds])
    with pytest.raises(ValueError, match=rf"this population: shard 1 \(agents \[{lo}, {hi}\)\): .*SIGNAL_LIMIT"):
        dpop.save(path)
    assert (path.read_bytes(), _files(folder)) == before
    other = DaskServer(DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT))
    with pytest.raises(TypeError, match="DaskServer of this population"):
        dpop.save(path, other)
    other.population.close()
    dpop.close()


def test_bad_checkpoint_leaves_a_sharded_population_untouched(client, tmp_path, rng):
    """A corrupt single-file checkpoint (sharded=False) is refused too, before anything changes."""
    dpop = DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT)
    dpop.step(rng.normal(size=N))
    path = save_checkpoint(tmp_path / "c.npz", dpop, sharded=False)
    _flip(path)
    before = dpop.states.copy()
    dpop.step(rng.normal(size=N))
    after = dpop.states.copy()
    with pytest.raises(CheckpointError, match="not a readable memoa-fast checkpoint"):
        restore_checkpoint(path, dpop)
    with pytest.raises(CheckpointError, match="not a readable memoa-fast checkpoint"):
        dpop.restore(path)
    np.testing.assert_array_equal(dpop.states, after)
    assert not np.array_equal(before, after) and dpop.t == 2
    dpop.close()


_KILLED_SAVER = r"""
import os, sys, time
import numpy as np
from distributed import Client, LocalCluster
from memoa_fast import Game
from memoa_fast.distributed import DaskPopulation, DaskServer
import memoa_fast.distributed.population as dpm

path, mode = sys.argv[1], sys.argv[2]
cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address='127.0.0.1:0')
client = Client(cluster)
pop = DaskPopulation(Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95), 3 * 4096, 1, client=client, n_shards=2)
server = DaskServer(pop, rule="hedge", eta=0.5)
server.update(pop.step(np.ones(3 * 4096)), np.ones(1))
pop.save(path, server)


import threading
lock = threading.Lock()


def stall(*args, **kwargs):
    if lock.acquire(blocking=False):  # several shard threads may get here: one says so
        print("stalled", flush=True)
    time.sleep(120)


if mode == "midfile":  # a shard's file half written (the workers are threads of this process)
    real = np.lib.format.write_array

    def half(fp, array, *a, **k):
        if array.size >= 4096:
            fp.write(array.tobytes()[: array.nbytes // 2])
            fp.flush()
            stall()
        return real(fp, array, *a, **k)

    np.lib.format.write_array = half
elif mode == "before-manifest":  # every shard file written, the manifest not switched
    dpm.write_manifest = stall
else:  # "before-cleanup": the manifest switched, the previous set not deleted yet
    real_remove = dpm.remove_shard_files

    def remove(folder, **kw):
        if "keep" in kw:
            stall()
        return real_remove(folder, **kw)

    dpm.remove_shard_files = remove
server.update(pop.step(np.full(3 * 4096, 2.0)), np.ones(1))
pop.save(path, server)
"""


@pytest.mark.parametrize("mode, survivor", [("midfile", 1), ("before-manifest", 1), ("before-cleanup", 2)])
def test_killed_sharded_save_leaves_a_loadable_checkpoint(client, tmp_path, mode, survivor):
    """SIGKILL the whole job during a sharded save: the manifest names a complete set (the previous one until it
    switches); restoring works, and the next save removes the debris.
    """
    import subprocess

    path = tmp_path / "job.ckpt"
    proc = subprocess.Popen([sys.executable, "-P", "-c", _KILLED_SAVER, str(path), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert line.strip() == "stalled", proc.stderr.read()[-3000:]
    finally:
        reap(proc)
    folder = tmp_path / "job.ckpt.shards"
    assert len(_files(folder)) > 2  # debris of the killed save (or the previous set) is there
    assert load_checkpoint(path).t == survivor
    dpop = DaskPopulation(GAME, 3 * CHUNK, 1, client=client, n_shards=3, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5)
    dpop.restore(path, dserver)
    assert dpop.t == survivor and dserver.n_updates == survivor
    dpop.save(path, dserver)
    assert len(_files(folder)) == dpop.n_shards and not [n for n in _files(folder) if n.endswith(".tmp")]
    dpop.close()


# --------------------------------------------------------------------------- a lost worker
@pytest.fixture
def own_cluster():
    """A cluster of its own: this test kills one of its workers."""
    cluster, client = _start_cluster()
    try:
        yield client
    finally:
        _stop_cluster(cluster, client)


def test_killed_worker_names_shard_and_checkpoint_and_the_run_resumes(own_cluster, tmp_path):
    client = own_cluster
    T, cut = 14, 6
    targets = np.cos(np.arange(T + 1))[:, None]
    factory = functools.partial(ForecasterSignals, lags=2)
    dpop = DaskPopulation(GAME, N, 1, client=client, signals=factory, seed=3, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=1.0, alpha=0.01)

    def advance(ts):
        for t in ts:
            dpop.observe(targets[t])
            _round(dpop, dserver, None, targets[t + 1])

    advance(range(cut))
    path = dpop.save(tmp_path / "last-good.npz", dserver)
    advance(range(cut, cut + 3))

    victim = dpop.info()[1]
    os.kill(victim["pid"], signal.SIGKILL)
    with pytest.raises(ShardLostError) as info:
        advance(range(cut + 3, T))
    err = info.value
    assert (err.shard, err.lo, err.hi, err.worker) == (1, victim["lo"], victim["hi"], victim["worker"])
    assert err.checkpoint == str(path) and err.step == cut + 3
    message = str(err)
    assert f"shard 1 (agents [{victim['lo']}, {victim['hi']}))" in message
    assert str(path) in message and f"(step {cut})" in message and "population.restore(" in message
    with pytest.raises(ShardLostError, match="unusable"):
        dpop.step()

    client.wait_for_workers(2, timeout=TIMEOUT)  # the nanny restarts the worker
    dpop.restore(path, dserver, n_shards=3)
    assert dpop.t == cut and dpop.n_shards == 3 and dserver.n_updates == cut
    advance(range(cut, T))

    from memoa_fast.timeseries.forecasters import ClientForecasters

    pop, server = _single(rule="hedge")
    server = Server(N, 1, rule="hedge", eta=1.0, alpha=0.01, threads=1)
    forecasters = ClientForecasters(N, 1, lags=2, seed=3, threads=1)
    for t in range(T):
        _round(pop, server, forecasters.observe(targets[t]), targets[t + 1])
    _assert_close(dpop, dserver, pop, server, rtol=1e-12, atol=1e-13)
    dpop.close()


# --------------------------------------------------------------------------- audit: refused calls, orders, bytes, failed saves
@pytest.fixture(scope="module")
def thread_client():
    """Workers as threads of this process, so that a test can make a worker's file write fail."""
    from distributed import Client, LocalCluster

    # a random port: None means the default 8787, taken whenever another Dask cluster runs here (a second test
    # session, a user's notebook): Dask's 'Port 8787 is already in use' warning then failed every test using it
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0")
    client = Client(cluster, timeout=TIMEOUT)
    try:
        yield client
    finally:
        _stop_cluster(cluster, client)


_DASK_READS = ("mean_state", "class_mean_state", "mean_signal", "class_mean_signal", "n_valid_signals", "n_finite_signals",
               "discount", "worst_agent", "regret", "state_dict", "server.weights", "server.state_dict")


def test_every_read_of_a_dask_population_refuses_during_another_threads_call(thread_client):
    """As on one machine (``test_every_read_of_the_state_refuses_during_another_threads_call``): every read of the
    state refuses while another thread is inside a call (holding the guard) and after an interrupted step, and reads
    the same once the hold ends. On 67547ed the summary's reads inherited from the one-machine engine
    (``mean_signal``, ``class_mean_signal``, ``n_valid_signals``, ``n_finite_signals``, ``discount``) took no guard, and
    ``mean_state`` after an interrupted step returned the field it had.
    """
    from helpers import held_by_another_thread

    signals = np.random.default_rng(4).standard_normal((N, 1))
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT) as pop:
        server = DaskServer(pop, rule="hedge", eta=0.5)
        pop.step(signals)
        server.update(None, np.ones(1))
        pop.mean_state  # noqa: B018 - the field made current: the reads below send no message

        def read(name):
            obj, _, attr = name.rpartition(".")
            value = getattr(server if obj else pop, attr)
            return value() if callable(value) else value

        before = {name: read(name) for name in _DASK_READS}
        with held_by_another_thread(pop._exclusive):
            for name in _DASK_READS:
                with pytest.raises(RuntimeError, match=r"refused, nothing changed: this DaskPopulation is being used by another thread"):
                    read(name)
        for name in _DASK_READS:
            _same_state({"v": read(name)}, {"v": before[name]})
        pop._interrupted = "a step"  # what a step cut short between its first and last write leaves
        try:
            for name in _DASK_READS:
                with pytest.raises(RuntimeError, match="was interrupted in the middle of a step"):
                    read(name)
        finally:
            pop._interrupted = None
        assert pop.discount == before["discount"]


def test_a_dask_population_read_of_its_client_side_summary_never_makes_another_threads_call_refuse(thread_client):
    """The summary's reads that send no message (``mean_signal``, ``class_mean_signal``, ``n_valid_signals``,
    ``n_finite_signals``, ``discount``) take no hold, as one machine's (``Exclusive.read``): a step of another thread
    during the read is served, and the read raises instead. On 121a9f2 they held the guard, so a thread polling
    ``pop.discount`` could stop a run's step (lock-free on 67547ed); a call of the package's own, lent the hold, still reads.
    """
    import threading

    signals = np.random.default_rng(5).standard_normal((N, 1))
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT) as pop:
        pop.step(signals)
        errors = []

        def step_meanwhile(read):
            def meanwhile():  # the read's copy, during which another thread's step runs whole
                worker = threading.Thread(target=lambda: _record(errors, pop.step, signals))
                worker.start()
                worker.join()
                return read()
            return meanwhile

        for name, private in (("mean_signal", "_mean_signal"), ("class_mean_signal", "_class_mean_signal")):
            t = pop.t
            pop.__dict__[private] = step_meanwhile(getattr(pop, private))
            try:
                with pytest.raises(RuntimeError, match="refused, nothing changed: this DaskPopulation is being used"):
                    getattr(pop, name)
            finally:
                del pop.__dict__[private]
            assert errors == [] and pop.t == t + 1  # the step was served

        def inside(self):  # a method of the population (a subclass's override) inside a call lending its hold: served
            return self.discount, self.n_valid_signals

        with pop._exclusive, pop._lend():
            assert inside(pop) == (pop._discount, N)


def _record(errors, call, *args):
    try:
        call(*args)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_a_dask_population_and_server_refuse_pickle_and_copies(thread_client):
    """A copy of a DaskPopulation drove the very same shards with its own round count (copy.copy succeeded: two handles,
    one set of states, a silent fork), and pickle failed on a module object. All three are refused, naming what to do
    instead, and the population runs on unchanged.
    """
    import copy
    import pickle

    signals = np.random.default_rng(3).standard_normal((N, 1))
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, seed=3, timeout=TIMEOUT) as dpop:
        dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
        dpop.step(signals)
        before = dpop.state_dict()
        for obj, name in ((dpop, "DaskPopulation"), (dserver, "DaskServer")):
            for how in (pickle.dumps, copy.copy, copy.deepcopy):
                with pytest.raises(TypeError, match=rf"^a {name} cannot be pickled or copied: .* save"):
                    how(obj)
        after = dpop.state_dict()
        assert after["t"] == before["t"] == 1
        np.testing.assert_array_equal(after["states"], before["states"])
        dpop.step(signals)
        assert dpop.t == 2


def test_a_handle_on_the_resident_states_refuses_pickle_and_copies(thread_client):
    """copy.copy of the handle step() returns gave another handle that followed the live states (a "snapshot" that
    changed at the next step, where a copy of Population.states keeps its round), and deepcopy and pickle failed
    naming the population's save. All three are refused, naming np.asarray / gather; np.asarray still copies.
    """
    import copy
    import pickle

    signals = np.random.default_rng(4).standard_normal((N, 1))
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, seed=4, timeout=TIMEOUT) as dpop:
        handle = dpop.step(signals)
        for how in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"^a ShardedStates cannot be pickled or copied: .* np\.asarray\(handle\)"):
                how(handle)
        kept = np.asarray(handle)
        dpop.step(signals)
        assert not np.array_equal(np.asarray(dpop.resident_states), kept) and dpop.t == 2


def test_a_sharded_set_is_read_and_restored_without_ast(thread_client, tmp_path, monkeypatch):
    """The shards' files and the manifest are read with no ast parse (its constructor is not thread-safe: two worker
    threads reading .npy headers at once failed a valid set as corrupt; test_checkpoint.py's single-file test says why).
    """
    factory = functools.partial(NoisyLastValueSignals, low=0.1)
    with (DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, exact=True, signals=factory, seed=4,
                         timeout=TIMEOUT) as dpop,
          DaskPopulation(GAME, N, 1, client=thread_client, n_shards=3, exact=True, signals=factory, seed=4,
                         timeout=TIMEOUT) as other):
        dserver, other_server = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01), DaskServer(other, rule="eg", eta=0.5, alpha=0.01)
        _advance(dpop, dserver, range(3))
        path = dpop.save(tmp_path / "run.ckpt", dserver)
        import ast
        import traceback

        def refuse(*args, **kwargs):
            raise AssertionError("parsed with ast:\n" + "".join(traceback.format_stack(limit=12)))

        with monkeypatch.context() as patch:  # only around the reads: pytest's own report of a failure parses
            patch.setattr(ast, "literal_eval", refuse)
            patch.setattr(ast, "parse", refuse)
            ckpt = load_checkpoint(path)  # here: every shard file, then the manifest's token
            restore_checkpoint(path, other, other_server)  # on the workers' threads, in this process
        np.testing.assert_array_equal(ckpt.population["states"], dpop.states)
        for name in ("states", "costs"):
            np.testing.assert_array_equal(getattr(other, name), getattr(dpop, name), err_msg=name)
        assert other.t == dpop.t == 3 and other_server.n_updates == 3
        np.testing.assert_array_equal(other_server.weights, dserver.weights)


@pytest.mark.parametrize("signals", [[1e30, -1e30, 1.0], [1e30, 1.0, -1e30], [1e30, -1e30, 1e30]], ids=["nan-nan-1", "nan-1-nan", "all-nan"])
def test_the_worst_agent_with_nan_costs_is_the_one_machine_populations(thread_client, signals):
    """``gamma^t`` underflowing to 0 times an infinite cost makes costs NaN (as on one machine). The shards took
    ``numpy.argmax`` (the first NaN) and the merge skipped a NaN: worst agent -1, regret -inf, where the one-machine
    Population names the largest cost (NaN never larger; agent 0 with regret NaN if every cost is NaN).
    """
    game = Game(1e250, 1e250, 1e250, 1e-200, policy="local")  # the discount is 0 from round 2
    x0 = np.array([[0.0], [1.0], [2.0]])
    s = np.broadcast_to(np.array(signals)[:, None], (3, 3, 1))
    pop = Population(game, initial_states=x0, threads=1)
    pop.run(s)
    with DaskPopulation(game, initial_states=x0, client=thread_client, timeout=TIMEOUT) as dpop:
        dpop.run(s)
        np.testing.assert_array_equal(dpop.costs, pop.costs)
        assert np.isnan(pop.costs).any()
        assert dpop.worst_agent == pop.worst_agent
        np.testing.assert_array_equal(dpop.regret, pop.regret)


def test_a_class_with_no_signal_yet_is_left_out_of_the_anchor_as_on_one_machine(thread_client, tmp_path):
    """A class whose agents have sent no valid signal yet has no signal mean: both engines leave it out of MEMOA's
    anchor (it read 0: agents at rest on a common signal of 100 left it), with the same bits.
    """
    game = Game(q=[1.0, 2.0, 0.5], kappa=[2.0, 1.0, 3.0], r=[0.1, 0.3, 0.2], gamma=0.9, shares=[0.3, 0.3, 0.4])
    labels = np.arange(12) % 3
    s = np.full((5, 12, 2), 100.0)
    s[:3, labels == 1] = np.nan  # class 1 silent for three rounds
    x0 = np.full((12, 2), 100.0)
    pop = Population(game, initial_states=x0, labels=labels, threads=1)
    pop.run(s)
    with DaskPopulation(game, initial_states=x0, labels=labels, client=thread_client, timeout=TIMEOUT) as dpop:
        dpop.run(s)
        np.testing.assert_array_equal(dpop.states, pop.states)
        np.testing.assert_allclose(pop.states, 100.0, rtol=1e-14)
    # a sharded checkpoint taken while class 1 is still silent records it: both engines continue as the run did
    varied = s + np.random.default_rng(1).normal(size=s.shape)
    whole = Population(game, initial_states=x0, labels=labels, threads=1)
    whole.run(varied)
    with DaskPopulation(game, initial_states=x0, labels=labels, client=thread_client, timeout=TIMEOUT) as dpop:
        dpop.run(varied[:2])
        save_checkpoint(tmp_path / "silent.npz", dpop, sharded=True)
        restored = Population(game, initial_states=x0, labels=labels, threads=1)
        restore_checkpoint(tmp_path / "silent.npz", restored)
        restored.run(varied[2:])
        dpop.reset(x0)
        restore_checkpoint(tmp_path / "silent.npz", dpop)
        dpop.run(varied[2:])
        np.testing.assert_array_equal(restored.states, whole.states)
        np.testing.assert_array_equal(dpop.states, whole.states)


def test_a_silent_class_of_a_baseline_game_without_anchor_weights_steps_as_on_one_machine(thread_client):
    """A baseline reads no class signal mean: a K-class baseline game with every q_j = 0 (no anchor weights) and a
    silent class stepped into an AttributeError (the stand-in read lam); both engines now step it, track the silent
    class, and leave it out of MEMOA's anchor after a switch of game, with the same bits.
    """
    labels = np.arange(8) % 2
    s = np.full((3, 8, 1), 100.0)
    s[:2, labels == 1] = np.nan
    baseline = Game(q=[0.0, 0.0], kappa=[2.0, 1.0], r=0.1, gamma=0.9, shares=[0.5, 0.5], policy="greedy")
    memoa = Game(q=[1.0, 1.0], kappa=[2.0, 1.0], r=0.1, gamma=0.9, shares=[0.5, 0.5])
    x0 = np.full((8, 1), 100.0)
    pop = Population(baseline, initial_states=x0, labels=labels, threads=1)
    with DaskPopulation(baseline, initial_states=x0, labels=labels, client=thread_client, timeout=TIMEOUT) as dpop:
        for engine in (pop, dpop):
            engine.step(s[0])
            engine.set_game(memoa)
            engine.run(s[1:])
        np.testing.assert_array_equal(dpop.states, pop.states)
        np.testing.assert_allclose(pop.states, 100.0, rtol=1e-14)
        assert list(dpop.state_dict()["class_signalled"]) == [1, 1]


def _closed_soon(client, seconds=20):
    """Whether ``client`` is closed within ``seconds`` (the finalizer's close runs in a thread of its own)."""
    deadline = time.monotonic() + seconds
    while client.status != "closed" and time.monotonic() < deadline:
        time.sleep(0.02)
    return client.status == "closed"


def test_a_population_dropped_without_close_closes_the_client_it_opened(thread_client):
    """A DaskPopulation (``direct=True``) dropped without ``close()`` closes the client it opened when collected;
    a client passed in stays open. The client stayed connected, and once its cluster closed it kept reconnecting
    from its IO-loop thread, drawing from the global ``random`` (a hypothesis test of a later module then failed).
    """
    import gc
    import weakref

    from memoa_fast.distributed import _comm

    dpop = DaskPopulation(GAME, N, 1, client=thread_client, timeout=TIMEOUT)
    own, dropped = dpop._own_client, weakref.ref(dpop)
    assert own is not None and own is not thread_client and own.status == "running"
    del dpop
    gc.collect()  # (a population is in a reference cycle with its states' handle: only the collector frees it)
    assert dropped() is None
    assert _closed_soon(own)
    assert thread_client.status == "running" and thread_client.submit(abs, -3).result(timeout=TIMEOUT) == 3
    with DaskPopulation(GAME, N, 1, client=thread_client, timeout=TIMEOUT) as dpop:  # closed: the finalizer is spent
        own = dpop._own_client
    assert own.status == "closed" and not dpop._own_client_closer.alive
    deadline = time.monotonic() + 20  # no client left to close: the closing thread ends
    while _comm._closer is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _comm._closer is None


class _FakeClient:
    """What the closing thread needs of a client: ``close(timeout=...)``, counted."""

    def __init__(self):
        self.closed = 0

    def close(self, timeout=None):
        self.closed += 1


def _interrupted_at_line(function, line, call):
    """``call()`` with a KeyboardInterrupt raised when ``function`` reaches its source line ``line``; whether it was."""
    import sys

    hit = []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line and not hit:
            hit.append(line)
            raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is function.__code__ else None

    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return bool(hit)


def _wait_until_the_closing_thread_waits(_comm, timeout=10.0):
    """Return once the closing thread has ended, or waits in its queue's ``get`` with nothing queued."""
    import inspect
    import sys

    source, first = inspect.getsourcelines(_comm._close_collected)
    get_line = first + next(i for i, text in enumerate(source) if "_to_close.get()" in text)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        thread = _comm._closer
        if thread is None or not thread.is_alive():
            return
        frame = sys._current_frames().get(thread.ident)
        if (_comm._to_close.empty() and frame is not None and frame.f_code is _comm._close_collected.__code__
                and frame.f_lineno == get_line):
            return
        time.sleep(0.002)


@pytest.mark.parametrize("where", ["closes_when_collected", "release_closer"])
def test_an_interrupted_registration_never_loses_a_close_nor_keeps_the_closing_thread(where):
    """Ctrl-C at any line of registering (or handing back) a population's own client: every client of a collected
    population is still closed, once, and the closing thread still ends when nothing is left. A count of the
    registrations drifted there: the thread ended while a client was registered, which then stayed open for good.
    """
    import gc
    import inspect
    import weakref

    from memoa_fast.distributed import _comm

    function = getattr(_comm, where)
    source, first = inspect.getsourcelines(function)
    body = [first + i for i, text in enumerate(source) if text.strip() and not text.strip().startswith(("def ", '"""', "#"))]
    for line in body:
        class Owner:
            pass

        a, a_client, b, b_client = Owner(), _FakeClient(), Owner(), _FakeClient()
        _comm.closes_when_collected(a, a_client, 1.0)
        if where == "closes_when_collected":
            _interrupted_at_line(function, line, lambda owner=b: _comm.closes_when_collected(owner, b_client, 1.0))
        else:
            b_closer = _comm.closes_when_collected(b, b_client, 1.0)
            b_client.close()  # the population closes its client itself, then hands the registration back
            _interrupted_at_line(function, line, lambda: _comm.release_closer(b_closer))
        # Each owner is collected as its last reference goes; a full gc.collect() only if a cycle kept it (one took
        # 0.15-0.5 s in this heap: two for each of 25 lines made this the suite's slowest test). Between the two, the
        # closing thread handles b's item and ends or waits for the next: a thread that ended too early leaves a open.
        b_gone = weakref.ref(b)
        del b
        if b_gone() is not None:
            gc.collect()
        _wait_until_the_closing_thread_waits(_comm)
        a_gone = weakref.ref(a)
        del a
        if a_gone() is not None:
            gc.collect()
        deadline = time.monotonic() + 10
        while (_comm._closer is not None or a_client.closed == 0) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert a_client.closed == 1, line
        assert b_client.closed <= (2 if where == "release_closer" else 1), line  # (closed again: harmless)
        assert _comm._closer is None and not _comm._registered, line


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_child_forked_while_the_registry_lock_is_held_can_still_register():
    """A fork copies ``_closer_lock`` as it is, held when another thread (the closing thread) was inside it: in the
    child no thread ever releases it, and the child's first population with its own client waited for it for good.
    The child now starts with a fresh lock (``os.register_at_fork``) and registers at once.
    """
    import threading
    import warnings

    from memoa_fast.distributed import _comm

    inside, leave = threading.Event(), threading.Event()

    def hold():
        with _comm._closer_lock:
            inside.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a process with threads: the case under test
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: registration must not wait; SIGALRM ends it (not 0) if it does
            try:
                signal.alarm(5)

                class Owner:
                    pass

                _comm.closes_when_collected(Owner(), _FakeClient(), 1.0)
                os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
    finally:
        leave.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0, status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_never_closes_a_copy_of_its_parents_client():
    """A child forked while a population's own client is registered copies the population, its finalizer and the
    queue: collected there, the copy's client was queued and closed by the child's closing thread, a close of a
    client whose connections the child shares with its parent. The child now closes only the clients it registered.
    """
    import gc
    import warnings

    from memoa_fast.distributed import _comm

    class Owner:
        pass

    parents_owner, parents_client = Owner(), _FakeClient()
    _comm.closes_when_collected(parents_owner, parents_client, 1.0)
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a process with threads (the closing thread)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: 0 if its own client is closed and the parent's copy is not
            try:
                signal.alarm(10)
                del parents_owner  # collected in the child: its finalizer queues the copy of the parent's client
                gc.collect()
                childs_owner, childs_client = Owner(), _FakeClient()
                _comm.closes_when_collected(childs_owner, childs_client, 1.0)
                del childs_owner
                gc.collect()
                deadline = time.monotonic() + 5
                while childs_client.closed == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                os._exit(0 if (childs_client.closed, parents_client.closed) == (1, 0) else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    finally:
        del parents_owner
        gc.collect()
    deadline = time.monotonic() + 10
    while (parents_client.closed == 0 or _comm._closer is not None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert parents_client.closed == 1 and _comm._closer is None  # the parent still closes its own


def test_a_population_collected_on_its_clients_event_loop_thread_closes_it(thread_client):
    """The collector may run the finalizer on the client's own IO-loop thread, where a blocking close would wait
    for the loop it blocks (until its timeout): the client is closed all the same, soon.
    """
    import gc

    dpop = DaskPopulation(GAME, N, 1, client=thread_client, timeout=TIMEOUT)
    own = dpop._own_client
    del dpop
    own.loop.add_callback(gc.collect)
    assert _closed_soon(own)


def test_a_population_collected_under_a_lock_of_distributed_does_not_deadlock(thread_client):
    """The collector runs a finalizer in whatever thread allocates, under whatever lock that thread holds: e.g.
    inside ``Client(...)``, where ``LoopRunner.start`` holds distributed's process-wide ``LoopRunner._lock``
    (seen: a script that made a new DaskPopulation after dropping one hung there for good). Closing the client
    there (``Client.close`` -> ``LoopRunner.stop`` takes that lock) waited for itself; the finalizer only queues it.
    """
    import gc
    import threading

    from distributed.utils import LoopRunner

    dpop = DaskPopulation(GAME, N, 1, client=thread_client, timeout=TIMEOUT)
    own = dpop._own_client
    del dpop

    def collect_under_the_lock():
        try:
            with LoopRunner._lock:  # as a collection triggered by an allocation inside LoopRunner.start or stop
                gc.collect()
        except RuntimeError:  # (the lock released below, to free a deadlocked collector)
            pass

    collector = threading.Thread(target=collect_under_the_lock, name="collector", daemon=True)
    collector.start()
    collector.join(10)
    deadlocked = collector.is_alive()
    if deadlocked:
        LoopRunner._lock.release()  # free it, and distributed with it, for the rest of the session
        collector.join(TIMEOUT)
    assert not deadlocked, "the finalizer blocked the collecting thread on a lock that thread held"
    deadline = time.monotonic() + 20
    while own.status != "closed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert own.status == "closed"


@pytest.mark.parametrize("action", ["reset", "load_state_dict", "restore"])
def test_means_after_a_reload_that_follows_a_step_are_those_of_the_new_states(client, tmp_path, rng, action):
    """reset, load_state_dict and a single-file restore right after a step: m(t) is the new states' mean, as on one
    machine (it was the mean of the states the step moved, read from the shards' last move pass).
    """
    x0 = rng.normal(size=(N, 2)) + 5.0
    pop = Population(GAME, N, 2, initial_states=x0, threads=1)
    dpop = DaskPopulation(GAME, N, 2, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
    state = pop.state_dict()
    path = save_checkpoint(tmp_path / "x0.npz", pop)
    s = rng.normal(size=(N, 2))
    dpop.step(s)
    {"reset": lambda: dpop.reset(x0), "load_state_dict": lambda: dpop.load_state_dict(state),
     "restore": lambda: restore_checkpoint(path, dpop)}[action]()
    np.testing.assert_array_equal(dpop.mean_state, pop.mean_state)
    np.testing.assert_array_equal(dpop.class_mean_state, pop.class_mean_state)
    pop.step(s)
    dpop.step(s)
    np.testing.assert_array_equal(dpop.mean_state, pop.mean_state)
    np.testing.assert_array_equal(dpop.states, pop.states)
    dpop.close()


def test_state_dict_and_a_single_file_save_keep_the_mean_field_bitwise(client, tmp_path, rng):
    """Gathering the state must not re-derive m(t) on the client (NumPy sums round differently from the kernels)."""
    pop = Population(GAME, N, 2, threads=1)
    dpop = DaskPopulation(GAME, N, 2, client=client, n_shards=3, exact=True, timeout=TIMEOUT)
    for _ in range(3):
        s = rng.normal(size=(N, 2))
        pop.step(s)
        dpop.step(s)
    a, b = pop.state_dict(), dpop.state_dict()
    for key in ("states", "costs", "mean_state", "mean_signal"):
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    np.testing.assert_array_equal(dpop.mean_state, pop.mean_state)
    one = load_checkpoint(save_checkpoint(tmp_path / "one.npz", pop)).population
    two = load_checkpoint(dpop.save(tmp_path / "two.npz", sharded=False)).population
    np.testing.assert_array_equal(two["mean_state"], one["mean_state"])
    dpop.close()


def test_a_refused_restore_leaves_the_shards_in_place(client, tmp_path, rng):
    """A restore refused for its arguments changes nothing, from a single file as from a manifest (a single-file
    restore released the shards before checking n_shards, leaving an unusable population).
    """
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5)
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    single = dpop.save(tmp_path / "one.npz", dserver, sharded=False)
    sharded = dpop.save(tmp_path / "set.ckpt", dserver)
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    states, weights = dpop.states, dserver.log_weights
    for path in (single, sharded):
        for n_shards, error, match in ((0, ValueError, "n_shards must be an integer >= 1, got 0"),
                                       (5, ValueError, "n_shards <= 4"), (True, TypeError, "got True of type bool")):
            with pytest.raises(error, match=match):
                dpop.restore(path, dserver, n_shards=n_shards)
            assert (dpop.t, dpop.n_shards, dserver.n_updates) == (2, 2, 2)
            np.testing.assert_array_equal(dpop.states, states)
            np.testing.assert_array_equal(dserver.log_weights, weights)
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    assert dpop.t == 3
    dpop.close()


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_servers_not_restored_restart_from_round_zero(client, tmp_path, rng, kind):
    """A restore that rebuilds the shards gives the other servers uniform weights: their update count restarts too."""
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, timeout=TIMEOUT)
    kept, other = DaskServer(dpop, rule="hedge", eta=0.5), DaskServer(dpop, rule="eg", eta=0.3)
    for _ in range(2):
        x = dpop.step(rng.normal(size=N))
        kept.update(x, np.ones(1))
        other.update(x, np.ones(1))
    path = dpop.save(tmp_path / "c.npz", kept, sharded=kind == "sharded")
    dpop.restore(path, kept, n_shards=3)
    assert kept.n_updates == 2 and other.n_updates == 0
    np.testing.assert_array_equal(other.log_weights, np.full(N, -math.log(N)))  # libm's log, as the shards (NumPy's varies by version)
    fresh = Server(N, 1, rule="eg", eta=0.3, threads=1)
    fresh.load_state_dict(other.state_dict())  # a consistent state: a one-machine server at round 0
    assert fresh.n_updates == 0
    dpop.close()


def test_reset_moves_bytes_that_do_not_grow_with_n(client):
    """reset() to zeros sends no agent array (it sent N x d zeros and N zero costs); results as on one machine."""
    used = []
    for n in (2 * CHUNK, 40 * CHUNK):
        dpop = DaskPopulation(GAME, n, 3, client=client, n_shards=2, timeout=TIMEOUT)
        pop = Population(GAME, n, 3, threads=1)
        s = np.linspace(-1.0, 1.0, n * 3).reshape(n, 3)
        for engine in (pop, dpop):
            engine.step(s)
            engine.step(s)
        dpop.comm.reset()
        dpop.reset()
        used.append(dpop.comm.bytes_sent + dpop.comm.bytes_received)
        pop.reset()
        assert dpop.t == 0 and dpop.discount == 1.0 and not dpop.states.any() and not dpop.costs.any()
        for engine in (pop, dpop):
            engine.step(s)
        np.testing.assert_allclose(dpop.states, pop.states, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dpop.costs, pop.costs, rtol=1e-12, atol=1e-14)
        dpop.close()
    assert used[0] == used[1] and used[0] < 2000


def test_observe_without_a_signal_source_is_refused(client):
    dpop = DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT)
    with pytest.raises(ValueError, match=r"observe\(\) feeds the worker-side signal sources, and this population has none"):
        dpop.observe(np.ones(1))
    assert dpop._pending == []
    dpop.close()


@pytest.mark.parametrize("failure", ["worker raises", "worker disk full", "manifest disk full"])
def test_a_failed_save_keeps_the_previous_set_and_the_population(thread_client, tmp_path, rng, monkeypatch, failure):
    """A save that fails on a worker or at the manifest: the previous checkpoint is intact, the new files are gone,
    and the population keeps running (a worker's exception made it unusable, losing the run since the last save).
    """
    import memoa_fast.checkpoint as ckpt
    import memoa_fast.distributed.population as dpm

    dpop = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
    pop, server = Population(GAME, N, 1, threads=1), Server(N, 1, rule="hedge", eta=0.5, alpha=0.01, threads=1)
    signals = rng.normal(size=(4, N))
    for s in signals[:2]:
        _round(pop, server, s, np.ones(1))
        _round(dpop, dserver, s, np.ones(1))
    path = dpop.save(tmp_path / "c.ckpt", dserver)
    folder = tmp_path / "c.ckpt.shards"
    before = (path.read_bytes(), _files(folder))
    _round(pop, server, signals[2], np.ones(1))
    _round(dpop, dserver, signals[2], np.ones(1))
    real = ckpt.write_shard_file

    def write(folder, token, index, *args, **kwargs):
        if index == 1:
            if failure == "worker raises":
                raise RuntimeError("the disk controller failed")
            raise OSError(28, "No space left on device")
        return real(folder, token, index, *args, **kwargs)

    def manifest(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failure == "manifest disk full":
        monkeypatch.setattr(dpm, "write_manifest", manifest)
    else:
        monkeypatch.setattr(ckpt, "write_shard_file", write)
    error, match = (RuntimeError, "disk controller") if failure == "worker raises" else (OSError, "No space left")
    with pytest.raises(error, match=match):
        dpop.save(path, dserver)
    monkeypatch.undo()
    assert (path.read_bytes(), _files(folder)) == before
    assert dpop.last_checkpoint_step == 2
    _round(pop, server, signals[3], np.ones(1))
    _round(dpop, dserver, signals[3], np.ones(1))
    _assert_close(dpop, dserver, pop, server, rtol=1e-12, atol=1e-13)
    assert dpop.save(path, dserver) == path and load_checkpoint(path).t == 4
    dpop.close()


@pytest.mark.parametrize("other", ["single-file save", "sharded save"])
def test_a_concurrent_save_never_removes_the_files_of_a_sharded_save_in_progress(thread_client, tmp_path, rng, monkeypatch,
                                                                                other):
    """Two saves of one checkpoint at once. The one finishing first removes what it takes for debris (shard files of
    other saves, older than its start); the other's shard files, written and waiting for its manifest, must stay
    however old they look, or its manifest names deleted files: both saves succeed and nothing can be loaded.
    """
    import memoa_fast.distributed.population as dpm

    dpop = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
    _round(dpop, dserver, rng.normal(size=N), np.ones(1))
    path, folder = tmp_path / "c.ckpt", tmp_path / "c.ckpt.shards"
    real, inner = dpm.write_manifest, []

    def manifest_after_a_concurrent_save(target, **kwargs):
        if not inner:
            inner.append(True)
            for f in folder.iterdir():  # a long save: its shard files look old
                os.utime(f, (time.time() - 3600, time.time() - 3600))
            if other == "single-file save":
                save_checkpoint(path, *_single())
            else:
                second = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=1, timeout=TIMEOUT)
                second.save(path)
                second.close()
        real(target, **kwargs)

    monkeypatch.setattr(dpm, "write_manifest", manifest_after_a_concurrent_save)
    dpop.save(path, dserver)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_checkpoint(path).population["states"], dpop.states)
    dpop.save(path, dserver)  # the next save removes whatever the two left
    assert len(_files(folder)) == dpop.n_shards
    dpop.close()


def test_a_concurrent_saves_cleanup_keeps_the_set_the_current_manifest_names(thread_client, tmp_path, rng):
    """Save A's cleanup runs after save B (begun before A) switched the manifest to its set and ended: B's files are
    older than A's start and no longer in progress, but they are the checkpoint now.
    """
    from memoa_fast.checkpoint import remove_shard_files

    dpop = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT)
    path = dpop.save(tmp_path / "c.ckpt")  # save B
    folder = tmp_path / "c.ckpt.shards"
    names = _files(folder)
    assert remove_shard_files(folder, keep="0" * 16, before=time.time() + 10) == []  # save A's cleanup
    assert _files(folder) == names
    np.testing.assert_array_equal(load_checkpoint(path).population["states"], dpop.states)
    dpop.close()


class _SourceThatCannotResume:
    """A worker-side source without load_state_dict (zeros as signals)."""

    def __init__(self, lo, hi, seed):
        self.out = np.zeros((hi - lo, 1))

    def next(self):
        return self.out


@pytest.mark.parametrize("factory", [functools.partial(ForecasterSignals, lags=2), _SourceThatCannotResume],
                         ids=["another kind of source", "a source without load_state_dict"])
@pytest.mark.parametrize("how", ["restore_checkpoint single", "restore single", "load_state_dict", "restore_checkpoint set",
                                 "restore set"])
def test_a_source_state_the_shards_refuse_changes_nothing(thread_client, tmp_path, factory, how):
    """Every shard's source is asked before anything is loaded: a refused source state leaves the population as it
    was and usable (the shards loaded their states, then one source refused: a half-loaded, unusable population).
    """
    saved = DaskPopulation(GAME, N, 1, client=thread_client, signals=NoisyLastValueSignals, seed=1, timeout=TIMEOUT)
    saved.observe(np.ones(1))
    saved.step()
    state = saved.state_dict()
    single = saved.save(tmp_path / "one.npz", sharded=False)
    sharded = saved.save(tmp_path / "set.ckpt")
    saved.close()
    dpop = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=factory, seed=1, timeout=TIMEOUT)
    dpop.step()
    dpop.step()
    states, t = dpop.states, dpop.t
    load = {"restore_checkpoint single": lambda: restore_checkpoint(single, dpop),
            "restore single": lambda: dpop.restore(single, n_shards=3),
            "load_state_dict": lambda: dpop.load_state_dict(state),
            "restore_checkpoint set": lambda: restore_checkpoint(sharded, dpop),
            "restore set": lambda: dpop.restore(sharded, n_shards=3)}[how]
    with pytest.raises(ValueError, match=r"shard 0 \(agents \[0, \d+\)\): .*(must hold exactly|has no load_state_dict)"):
        load()
    assert dpop.t == t and dpop.n_shards == 2
    np.testing.assert_array_equal(dpop.states, states)
    dpop.step()
    assert dpop.t == t + 1
    dpop.close()


def test_a_server_of_another_population_is_refused_by_every_save_and_restore(client, tmp_path, rng):
    """A DaskServer of another population (same N and d) is refused before anything is written or loaded, on the
    single-file paths too (they saved its weights beside this population's states, or loaded them into it).
    """
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5)
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    single = dpop.save(tmp_path / "one.npz", dserver, sharded=False)
    sharded = dpop.save(tmp_path / "set.ckpt", dserver)
    other_pop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, timeout=TIMEOUT)
    other = DaskServer(other_pop, rule="hedge", eta=0.5)
    before = (single.read_bytes(), sharded.read_bytes(), other.log_weights.copy(), dpop.states.copy())
    for action in (lambda: dpop.save(single, other, sharded=False), lambda: save_checkpoint(single, dpop, other, sharded=False),
                   lambda: dpop.save(sharded, other), lambda: dpop.restore(single, other, n_shards=3),
                   lambda: restore_checkpoint(single, dpop, other), lambda: dpop.restore(sharded, other),
                   lambda: restore_checkpoint(sharded, dpop, other)):
        with pytest.raises(TypeError, match="server must be a DaskServer of this population"):
            action()
        after = (single.read_bytes(), sharded.read_bytes(), other.log_weights, dpop.states)
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(before, after))
        assert dpop.n_shards == 2 and other.n_updates == 0
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    other_pop.close()
    dpop.close()


def test_a_shard_folder_that_is_a_file_is_named(client, tmp_path):
    dpop = DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT)
    (tmp_path / "c.ckpt.shards").write_text("not a folder")
    with pytest.raises(FileExistsError, match=r"c\.ckpt\.shards is a file: a sharded checkpoint keeps its shard files in a "
                                              r"folder of that name"):
        dpop.save(tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()
    dpop.close()


def test_observe_refuses_a_target_the_sources_would_refuse(client):
    """observe() checks the target as every object that learns from a stream does (finite, |y| <= TARGET_LIMIT), at
    the call: the worker-side sources refused it later, on the next message, which left the population unusable.
    """
    from memoa_fast._validation import TARGET_LIMIT

    dpop = DaskPopulation(GAME, N, 1, client=client, signals=functools.partial(ForecasterSignals, lags=2), timeout=TIMEOUT)
    dpop.observe(np.ones(1))
    dpop.step()
    for bad in (np.array([10 * TARGET_LIMIT]), -1e300):
        with pytest.raises(ValueError, match=r"target must .*1e\+30"):
            dpop.observe(bad)
    dpop.observe(np.ones(1))
    dpop.step()
    assert dpop.t == 2
    source = NoisyLastValueSignals(0, 10, 0)
    with pytest.raises(ValueError, match=r"y must .*1e\+30"):
        source.observe(10 * TARGET_LIMIT)
    dpop.close()


def test_flags_are_bools(client):
    for flag in ("exact", "direct"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no' of type str"):
            DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT, **{flag: "no"})
    dpop = DaskPopulation(GAME, N, 1, client=client, exact=np.True_, direct=np.False_, timeout=TIMEOUT)
    assert dpop.exact is True and dpop._own_client is None
    dpop.close()


# --------------------------------------------------------------------------- saved mean fields: derived, never trusted
K2_GAME = Game(q=[1.0, 0.3], kappa=[2.0, 1.0], r=[0.5, 0.2], gamma=0.95, shares=[0.5, 0.5])


def _saved_pair(client, tmp_path, rng, how):
    """Two saved states of one population, ``(good, bad)``: the second's mean fields are out of step with its states."""
    labels = rng.integers(0, 2, N)
    src = Population(K2_GAME, N, 2, labels=labels, threads=1)
    for _ in range(2):
        src.step(rng.normal(size=(N, 2)))
    if how == "load_state_dict":
        good = src.state_dict()
        return labels, good, dict(good, mean_state=good["mean_state"] + 3.0)
    engine = src
    if how == "sharded":
        engine = DaskPopulation(K2_GAME, N, 2, labels=labels, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
        engine.load_state_dict(src.state_dict())
    suffix = ".ckpt" if how == "sharded" else ".npz"
    good = save_checkpoint(tmp_path / f"good{suffix}", engine)
    lay = engine._lay
    engine._field[lay.field_state] += 3.0  # what an engine bug or an edited file could write
    engine._field[lay.class_state:lay.class_state + 2] -= 2.0
    bad = save_checkpoint(tmp_path / f"bad{suffix}", engine)
    if how == "sharded":
        engine.close()
    return labels, good, bad


@pytest.mark.parametrize("how", ["load_state_dict", "single file", "sharded"])
@pytest.mark.parametrize("kind", ["one machine", "dask"])
def test_a_saved_mean_field_out_of_step_with_the_states_has_no_effect_on_either_engine(thread_client, tmp_path, rng, how, kind):
    """The rule of both engines: m(t) and m_l(t) are derived from the states they install (one machine: its states;
    Dask: the shards' sums), never taken from a saved copy. Restoring a state whose means were written wrong gives
    bitwise the means, and the next step, of the same state written right.
    """
    labels, good, bad = _saved_pair(thread_client, tmp_path, rng, how)
    signals = rng.normal(size=(N, 2))
    results = []
    for saved in (good, bad):
        if kind == "one machine":
            engine = Population(K2_GAME, N, 2, labels=np.zeros(N, dtype=np.int64), threads=1)
        else:
            engine = DaskPopulation(K2_GAME, N, 2, labels=np.zeros(N, dtype=np.int64), client=thread_client, n_shards=2,
                                    exact=True, timeout=TIMEOUT)
        if how == "load_state_dict":
            engine.load_state_dict(saved)
        elif kind == "dask":
            engine.restore(saved, n_shards=3)
        else:
            restore_checkpoint(saved, engine)
        states = np.array(engine.states)
        np.testing.assert_array_equal(engine.labels, labels)
        np.testing.assert_allclose(engine.mean_state, states.mean(axis=0), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(engine.class_mean_state, [states[labels == j].mean(axis=0) for j in range(2)],
                                   rtol=1e-13, atol=1e-15)
        got = [engine.mean_state, engine.class_mean_state]
        engine.step(signals)
        got += [engine.mean_state, engine.class_mean_state, np.array(engine.states), np.array(engine.costs)]
        results.append(got)
        if kind == "dask":
            engine.close()
    for a, b in zip(*results):
        np.testing.assert_array_equal(b, a)


# --------------------------------------------------------------------------- K-class sharded restore: labels stay on the shards
K3_GAME = Game(q=[1.0, 0.3, 2.0], kappa=[2.0, 1.0, 0.5], r=[0.5, 0.2, 1.0], gamma=0.95, shares=[0.5, 0.3, 0.2])


@pytest.mark.parametrize("rebuild", [False, True])
def test_a_k_class_sharded_restore_reads_no_rows_on_the_client(client, tmp_path, rng, monkeypatch, rebuild):
    """The client moves O(shards) bytes: the class sizes come from the shards' answers, never from the N labels
    (the workers are processes here, so the patch below is the client's alone). The calls that move O(N) numbers
    anyway (labels, state_dict, reset to given states) gather the labels once and agree with one machine.
    """
    import memoa_fast.checkpoint as ckpt
    import memoa_fast.distributed.population as dpop_module

    labels = rng.integers(0, 3, N)
    labels[labels == 2] = 1 if rebuild else 2  # with rebuild, class 2 is empty: the sizes must say so
    dpop = DaskPopulation(K3_GAME, N, 2, labels=labels, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
    if not rebuild:
        dpop.step(rng.normal(size=(N, 2)))
    path = dpop.save(tmp_path / "k.ckpt")
    dpop.close()
    pop = Population(K3_GAME, N, 2, labels=np.zeros(N, dtype=np.int64), threads=1)
    restore_checkpoint(path, pop)

    def no_rows_here(*args, **kwargs):
        raise AssertionError("the client read shard rows")

    other = DaskPopulation(K3_GAME, N, 2, labels=np.zeros(N, dtype=np.int64), client=client, n_shards=2, exact=True,
                           timeout=TIMEOUT)
    received = other.comm.bytes_received
    with monkeypatch.context() as m:
        m.setattr(ckpt, "read_shard_rows", no_rows_here)
        m.setattr(dpop_module, "read_shard_rows", no_rows_here, raising=False)
        if rebuild:
            other.restore(path, n_shards=3)
        else:
            restore_checkpoint(path, other)
    assert other.comm.bytes_received - received < N  # nor through the shards' answers (the labels are 8 N bytes)
    np.testing.assert_array_equal(other._coef[:, SIZE], np.bincount(labels, minlength=3))
    if rebuild:  # memoa reads every class's means: the empty class is refused, as on one machine
        for engine in (pop, other):
            with pytest.raises(ValueError, match="class 2 has no agent"):
                engine.step(np.zeros((N, 2)))
    else:
        s = rng.normal(size=(N, 2))
        pop.step(s)
        other.step(s)
        np.testing.assert_array_equal(other.states, pop.states)
        np.testing.assert_array_equal(other.costs, pop.costs)
    np.testing.assert_array_equal(other.labels, labels)
    np.testing.assert_array_equal(other.state_dict()["labels"], pop.state_dict()["labels"])
    x0 = rng.normal(size=(N, 2))
    for engine in (pop, other):
        engine.reset(x0)
    np.testing.assert_array_equal(other.class_mean_state, pop.class_mean_state)
    other.close()


# --------------------------------------------------------------------------- one server-ownership check per call
def test_every_save_and_restore_checks_the_server_once_with_the_same_messages(thread_client, tmp_path, rng, monkeypatch):
    """The population says which servers it takes (its own DaskServers), once per call, whichever way it is called."""
    dpop = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5)
    dserver.update(dpop.step(rng.normal(size=N)), np.ones(1))
    single, sharded = tmp_path / "one.npz", tmp_path / "set.ckpt"
    import memoa_fast.checkpoint as ckpt
    import memoa_fast.distributed.population as dpop_module

    # An ownership check is a call of the population's own check, or of the checkpoint functions' engine check
    # with a server (which holds one, its own or the population's): counted once either way.
    calls, inside = [], []
    own_check, engines_check = DaskPopulation._check_own_server, ckpt._check_engines

    def counted_own(self, server):
        if not inside:
            calls.append("own")
        return own_check(self, server)

    def counted_engines(population, server, source, *, saving):
        if server is not None:
            calls.append("engines")
        inside.append(1)
        try:
            return engines_check(population, server, source, saving=saving)
        finally:
            inside.pop()

    monkeypatch.setattr(DaskPopulation, "_check_own_server", counted_own)
    monkeypatch.setattr(ckpt, "_check_engines", counted_engines)
    monkeypatch.setattr(dpop_module, "_check_engines", counted_engines, raising=False)
    paths = {
        "dpop.save single": lambda s: dpop.save(single, s, sharded=False),
        "save_checkpoint single": lambda s: save_checkpoint(single, dpop, s, sharded=False),
        "dpop.save sharded": lambda s: dpop.save(sharded, s),
        "save_checkpoint sharded": lambda s: save_checkpoint(sharded, dpop, s),
        "dpop.restore single": lambda s: dpop.restore(single, s, n_shards=2),
        "restore_checkpoint single": lambda s: restore_checkpoint(single, dpop, s),
        "dpop.restore sharded": lambda s: dpop.restore(sharded, s, n_shards=2),
        "restore_checkpoint sharded": lambda s: restore_checkpoint(sharded, dpop, s),
    }
    for name, call in paths.items():
        calls.clear()
        call(dserver)
        assert len(calls) == 1, (name, calls)
    other = DaskServer(DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT), rule="hedge", eta=0.5)
    plain = Server(N, 1, rule="hedge", eta=0.5)
    for name, call in paths.items():
        for server, got in ((other, "one of another population"), (plain, "a Server")):
            calls.clear()
            with pytest.raises(TypeError) as info:
                call(server)
            assert str(info.value) == f"server must be a DaskServer of this population (or None), got {got}", name
            assert len(calls) == 1, (name, calls)
    other.population.close()
    dpop.close()


# --------------------------------------------------------------------------- round counters a state can hold
def test_noisy_last_value_signals_stop_at_the_largest_savable_round():
    """``t`` is saved as an int64: at round 2**63 - 1 (a loaded state) ``next`` refuses, changing nothing, instead of
    reaching a round no state_dict or checkpoint can hold (OverflowError), as ClientForecasters.observe does.
    """
    source = NoisyLastValueSignals(0, 3, 1)
    source.load_state_dict({"agents": {}, "shared": {"t": np.array(2**63 - 2), "y": np.array([0.5])}})
    source.next()
    source.validate_state_dict(source.state_dict())
    with pytest.raises(ValueError, match=r"round 2\*\*63 - 1"):
        source.next()
    assert source.t == 2**63 - 1
    source.validate_state_dict(source.state_dict())


def test_noisy_last_value_signals_serve_client_indices_up_to_the_largest_count():
    """Clients ``[lo, hi)`` of a population (N <= 2**63 - 1): the last ones draw; an index beyond is a ValueError naming
    ``lo`` or ``hi`` (it was an ``OverflowError``, "int too big to convert", from the hash's 64-bit words).
    """
    last = NoisyLastValueSignals(2**63 - 3, 2**63 - 1, 1)
    last.observe([0.5])
    assert np.isfinite(last.next()).all()
    for lo, hi, name in ((2**63 - 1, 2**63, "lo"), (2**63, 2**63 + 1, "lo"), (0, 2**63, "hi"), (2**64, 2**64 + 2, "lo")):
        with pytest.raises(ValueError, match=rf"{name} must be an integer in \[.*, 2\*\*63 - [12]\], got"):
            NoisyLastValueSignals(lo, hi, 1)


def test_noisy_last_value_signals_refuse_a_saved_target_observe_would_refuse():
    """A saved ``y`` beyond TARGET_LIMIT (1e30) loaded although observe() refuses it; now refused, nothing changes."""
    source = NoisyLastValueSignals(0, 3, 1)
    source.observe([0.5])
    for y in (1e300, -1e31):
        with pytest.raises(ValueError, match=r"source/shared/y.*<= 1e\+30"):
            source.load_state_dict({"agents": {}, "shared": {"t": np.array(4), "y": np.array([y])}})
        assert source.t == 0 and source.state_dict()["shared"]["y"][0] == 0.5
    source.load_state_dict({"agents": {}, "shared": {"t": np.array(4), "y": np.array([1e30])}})  # the limit itself
    assert source.t == 4


def test_a_k_class_population_restored_from_shards_saves_and_restores_again_without_its_labels(thread_client, tmp_path, rng):
    """Labels left on the shards by a sharded restore serve every later call that does not need them on the client
    (set_game, steps, reset to zeros, a sharded save, a sharded restore onto another shard count): the client never
    receives them (fewer than N bytes per call), and the states follow one machine's bitwise.
    """
    labels = rng.integers(0, 3, N)
    pop = Population(K3_GAME, N, 2, labels=labels, threads=1)
    dpop = DaskPopulation(K3_GAME, N, 2, labels=labels, client=thread_client, n_shards=2, exact=True, timeout=TIMEOUT)
    signals = rng.normal(size=(5, N, 2))
    pop.step(signals[0])
    dpop.step(signals[0])
    first = dpop.save(tmp_path / "first.ckpt")
    other = DaskPopulation(K3_GAME, N, 2, labels=np.zeros(N, dtype=np.int64), client=thread_client, n_shards=3,
                           exact=True, timeout=TIMEOUT)
    game = Game(q=[1.5, 0.3, 2.0], kappa=[2.0, 1.0, 0.5], r=[0.5, 0.2, 1.0], gamma=0.95, shares=[0.5, 0.3, 0.2])
    calls = [
        lambda: other.restore(first, n_shards=3),
        lambda: other.set_game(game),
        lambda: other.step(signals[1]),
        lambda: other.save(tmp_path / "second.ckpt"),
        lambda: other.restore(tmp_path / "second.ckpt", n_shards=2),
        lambda: other.step(signals[2]),
    ]
    for call in calls:
        received = other.comm.bytes_received
        call()
        assert other.comm.bytes_received - received < N
    pop.set_game(game)
    pop.step(signals[1])
    pop.step(signals[2])
    np.testing.assert_array_equal(other.states, pop.states)
    np.testing.assert_array_equal(other.costs, pop.costs)
    np.testing.assert_array_equal(other._coef[:, SIZE], np.bincount(labels, minlength=3))
    np.testing.assert_array_equal(other.labels, labels)  # gathered once, when asked for
    np.testing.assert_array_equal(other.state_dict()["labels"], labels)
    other.reset()
    pop.reset()
    np.testing.assert_array_equal(other.class_mean_state, pop.class_mean_state)
    assert other.n_shards == 2
    other.close()
    dpop.close()


def test_the_discount_is_gamma_to_the_t_down_to_zero_on_either_engine(client, rng):
    """The discount is ``gamma**t`` where that is subnormal too, and reaches 0 (a running product stalled at 5e-324
    for gamma = 0.6, weighing every later cost for ever); the engines agree bitwise (loaded just before the stall).
    """
    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.6)
    discount, t = 1.0, 0
    while discount * game.gamma >= 1e-307:
        discount, t = discount * game.gamma, t + 1
    pop = Population(game, 10, 1, threads=1)
    dpop = DaskPopulation(game, 10, 1, client=client, n_shards=1, exact=True, timeout=TIMEOUT)
    state = pop.state_dict()
    state["t"], state["discount"] = t, discount
    signals = rng.normal(size=(80, 10, 1))  # 0.6**t falls from 1e-307 to 0 in 72 rounds
    for engine in (pop, dpop):
        engine.load_state_dict(state)
        engine.run(signals)
        assert engine.discount == 0.0 == math.pow(game.gamma, engine.t)
    np.testing.assert_array_equal(dpop.costs, pop.costs)
    dpop.close()


def test_no_step_past_the_last_round_a_state_can_hold_on_either_engine(client, rng):
    """A loaded state at t = 2**63 - 1 stepped once more gave t = 2**63: no save, copy or pickle could hold it."""
    s = rng.normal(size=(N, 2))
    pop = Population(GAME, N, 2, threads=1)
    dpop = DaskPopulation(GAME, N, 2, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
    state = pop.state_dict()
    state["t"], state["discount"] = 2**63 - 1, 0.0  # gamma**t underflows to 0
    for engine in (pop, dpop):
        engine.load_state_dict(state)
        before = engine.state_dict()
        with pytest.raises(ValueError, match=r"round t = 9223372036854775807 = 2\*\*63 - 1.*steps no further"):
            engine.step(s)
        after = engine.state_dict()
        assert after["t"] == 2**63 - 1
        for key in ("states", "costs", "mean_state"):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        state["t"] = 2**63 - 2
        engine.load_state_dict(state)
        engine.step(s)  # the last round is still taken
        assert engine.t == 2**63 - 1 and engine.state_dict()["t"] == 2**63 - 1
        state["t"] = 2**63 - 1
    dpop.close()


def test_set_labels_on_a_population_that_cannot_send_them_changes_nothing(client):
    """A closed (or broken) population refused set_labels after replacing its labels and class sizes on the client."""
    game = Game(q=[1.0, 2.0], kappa=1.0, r=0.5, gamma=0.9)
    labels = np.arange(N) % 2
    dpop = DaskPopulation(game, N, 1, client=client, labels=labels, timeout=TIMEOUT)
    dpop.close()
    with pytest.raises(RuntimeError, match="unusable"):
        dpop.set_labels(1 - labels)
    np.testing.assert_array_equal(dpop.labels, labels)


def test_a_run_past_the_last_round_is_refused_whole_on_either_engine(client, rng):
    """run() from t = 2**63 - 2 over three steps took one step, then raised: now it is refused before the first."""
    s = rng.normal(size=(3, N, 1))
    pop = Population(GAME, N, 1, threads=1)
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
    state = pop.state_dict()
    state["t"], state["discount"] = 2**63 - 2, 0.0
    for engine, run in ((pop, lambda: pop.run(s)), (dpop, lambda: dpop.run(s))):
        engine.load_state_dict(state)
        before = engine.state_dict()
        with pytest.raises(ValueError, match="a run of 3 steps would pass round 2\\*\\*63 - 1.*nothing was stepped"):
            run()
        after = engine.state_dict()
        assert after["t"] == 2**63 - 2
        np.testing.assert_array_equal(after["states"], before["states"])
        engine.run(s[:1])  # the last round is still taken
        assert engine.t == 2**63 - 1
        engine.run(s[:0])  # an empty run is nothing to refuse
    dpop.close()


def test_no_update_past_the_last_count_a_state_can_hold_on_the_dask_server(client, rng):
    """As ``Server``: at n_updates = 2**63 - 1 (a loaded state) update refuses and changes nothing (2**63 could not be saved)."""
    dpop = DaskPopulation(GAME, N, 1, client=client, n_shards=2, exact=True, timeout=TIMEOUT)
    server = DaskServer(dpop, rule="hedge", eta=0.5)
    state = server.state_dict()
    state["n_updates"] = 2**63 - 1
    server.load_state_dict(state)
    with pytest.raises(ValueError, match=r"n_updates = 9223372036854775807 = 2\*\*63 - 1.*updates no further"):
        server.update(None, [0.5])
    after = server.state_dict()
    assert after["n_updates"] == 2**63 - 1
    np.testing.assert_array_equal(after["log_weights"], state["log_weights"])
    state["n_updates"] = 2**63 - 2
    server.load_state_dict(state)
    server.update(None, [0.5])  # the last update is still made
    assert server.state_dict()["n_updates"] == 2**63 - 1
    dpop.close()


# --------------------------------------------------------------------------- the settings a source's state records
@pytest.mark.parametrize("name, other, saved", [("seed", 2**63 - 2, "9223372036854775807"), ("low", 0.2, "0.1"),
                                                ("high", 2.0, "3.0")])
def test_noisy_last_value_signals_refuse_a_state_saved_with_other_settings(name, other, saved):
    """A state of a source with another seed or noise range would continue with other noise: refused naming the key,
    the saved value and this source's, nothing changed; with the same settings it continues bitwise on any slice.
    """
    settings = dict(seed=2**63 - 1, low=0.1, high=3.0)
    whole = NoisyLastValueSignals(0, 10, **settings)
    whole.observe([0.5])
    whole.next()
    state = whole.state_dict()
    assert state["shared"]["seed"].dtype == np.int64 and int(state["shared"]["seed"]) == 2**63 - 1
    wrong = NoisyLastValueSignals(0, 10, **dict(settings, **{name: other}))
    for load in (wrong.load_state_dict, wrong.validate_state_dict):
        with pytest.raises(ValueError, match=rf"state\['source/shared/{name}'\] is {saved}, but this source has {name}="):
            load(state)
        assert wrong.t == 0 and wrong.state_dict()["shared"]["y"][0] == 0.0
    part = NoisyLastValueSignals(4, 10, **settings)  # another slice: lo is rightly not a setting
    part.load_state_dict(state)
    np.testing.assert_array_equal(part.next(), whole.next()[4:])


def _settings_run(dpop, dserver, ts, source=None):
    for t in ts:
        if source is None:
            dpop.observe(_TARGETS[t])
            x = dpop.step()
        else:
            x = dpop.step(source.observe(_TARGETS[t]))
        dserver.update(x, _TARGETS[t + 1])


@pytest.mark.parametrize("factory, other", [
    (functools.partial(NoisyLastValueSignals, low=0.1), dict(seed=5)),
    (functools.partial(ForecasterSignals, lags=2, mu=0.3, backend="numpy"), dict(mu=0.2)),
], ids=["noisy, another seed", "forecasters, another mu"])
def test_worker_side_sources_with_other_settings_refuse_every_restore_onto_any_shard_count(thread_client, tmp_path, factory, other):
    """A sharded or single-file checkpoint, or a state, of worker-side sources restored onto sources made with another
    seed or mu, on another shard count, is refused before anything changes (it used to continue with other noise).
    """
    make = functools.partial(DaskPopulation, GAME, N, 1, client=thread_client, exact=True, timeout=TIMEOUT)
    saved = make(n_shards=2, signals=factory, seed=4)
    saved_server = DaskServer(saved, rule="eg", eta=0.5, alpha=0.01)
    _settings_run(saved, saved_server, range(3))
    sharded, single, state = saved.save(tmp_path / "set.ckpt", saved_server), saved.save(tmp_path / "one.npz", sharded=False), \
        saved.state_dict()
    _settings_run(saved, saved_server, range(3, 5))
    other_factory = functools.partial(factory, **{k: v for k, v in other.items() if k != "seed"})
    dpop = make(n_shards=3, signals=other_factory, seed=other.get("seed", 4))
    dserver = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01)
    _settings_run(dpop, dserver, range(1))
    states, t = dpop.states, dpop.t
    name = next(iter(other))
    for load in (lambda: restore_checkpoint(sharded, dpop, dserver), lambda: dpop.restore(sharded, dserver, n_shards=2),
                 lambda: restore_checkpoint(single, dpop), lambda: dpop.restore(single, n_shards=1),
                 lambda: dpop.load_state_dict(state)):
        with pytest.raises(ValueError, match=rf"shard 0 \(agents \[0, \d+\)\): .*state\['source/shared/{name}'\] is"):
            load()
        assert dpop.t == t and dpop.n_shards == 3
        np.testing.assert_array_equal(dpop.states, states)
    dpop.close()
    twin = make(n_shards=1, signals=factory, seed=4)  # the same settings, another shard count: bitwise
    twin_server = DaskServer(twin, rule="eg", eta=0.5, alpha=0.01)
    restore_checkpoint(sharded, twin, twin_server)
    _settings_run(twin, twin_server, range(3, 5))
    _assert_bitwise(twin, twin_server, saved, saved_server)
    twin.close()
    saved.close()


def _without_cap(path):
    """The checkpoint at ``path`` (a single file or a manifest) rewritten as saved before the cap: no square_cap."""
    from memoa_fast.timeseries.forecasters import CAP_RECORD

    with np.load(path) as npz:
        kept = {k: npz[k] for k in npz.files if k != "source_shared__" + CAP_RECORD}
    assert len(kept) < len(npz.files)
    with open(path, "wb") as f:
        np.savez(f, **kept)
    return path


def test_worker_side_forecasters_saved_before_the_cap_warn_once_in_the_client_on_every_restore(client, tmp_path):
    """A state or checkpoint of worker-side forecasters without the cap's record warns once per restore, in the client
    (the shards' validators warned in the workers: twice per shard, and never where the user is), on every path,
    at the line that restores.
    """
    import warnings

    from memoa_fast.timeseries.forecasters import CAP_RECORD, UncappedStateWarning

    make = functools.partial(DaskPopulation, GAME, N, 1, client=client, signals=functools.partial(ForecasterSignals, lags=2),
                             seed=4, timeout=TIMEOUT)
    with make(n_shards=2) as dpop:
        dserver = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01)
        _settings_run(dpop, dserver, range(3))
        state = dpop.state_dict()
        shared = {k: v for k, v in state["source"]["shared"].items() if k != CAP_RECORD}
        old = {**state, "source": {"agents": state["source"]["agents"], "shared": shared}}
        sharded = _without_cap(dpop.save(tmp_path / "old.ckpt", dserver))
        single = _without_cap(dpop.save(tmp_path / "old.npz", sharded=False))
        for load in (lambda: dpop.load_state_dict(old), lambda: restore_checkpoint(single, dpop),
                     lambda: restore_checkpoint(sharded, dpop, dserver), lambda: dpop.restore(sharded, dserver, n_shards=1),
                     lambda: dpop.restore(single, n_shards=2)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load()
            assert [(w.category, w.filename) for w in caught] == [(UncappedStateWarning, __file__)], [str(w) for w in caught]
            assert dpop.t == 3


class _Gate:
    """Holds a shard's source check until the test's other thread has done its part (open unless a test closes it)."""

    entered = threading.Event()  # a shard's check has started
    release = threading.Event()  # it may go on
    release.set()

    @classmethod
    def wait(cls):
        cls.entered.set()
        if not cls.release.wait(TIMEOUT):
            raise RuntimeError("the test's other thread never released the shard's check")


class _GatedSource(NoisyLastValueSignals):
    """A user's worker-side source, with only validate_state_dict, whose check waits at the gate."""

    def validate_state_dict(self, state):
        _Gate.wait()
        return super().validate_state_dict(state)


class _ElsewhereWarning(UserWarning):
    pass


def _gated_load(thread_client, monkeypatch, kind, other, started=None):
    """``dpop.load_state_dict`` of a worker-side source's state (``kind``), with ``other()`` run in another thread while
    the shards' checks wait at the gate (and the load starts once ``started`` is set, if given); returns the warnings
    shown meanwhile, as ``(message, category, thread)``, and the other thread.

    The workers are threads of this process, as with ``processes=False``: the shards' checks run in the user's process.
    ``"forecasters"``: the package's own source, with a state saved before the cap (one UncappedStateWarning to issue).
    Whatever the other thread does, the user's warning filters and ``showwarning`` are those of before.
    """
    from memoa_fast.timeseries import forecasters

    factory = functools.partial(ForecasterSignals, lags=2) if kind == "forecasters" else _GatedSource
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=factory, seed=1, timeout=TIMEOUT) as dpop:
        dpop.observe(np.ones(1))
        dpop.step()
        state = dpop.state_dict()
        if kind == "forecasters":
            shared = {k: v for k, v in state["source"]["shared"].items() if k != forecasters.CAP_RECORD}
            state["source"] = {"agents": state["source"]["agents"], "shared": shared}
            check = forecasters.check_source_state
            monkeypatch.setattr(forecasters, "check_source_state", lambda *a, **k: (_Gate.wait(), check(*a, **k))[1])
        warnings.simplefilter("always")  # the user's filters (pytest's catch_warnings around the test restores them)
        shown = []
        monkeypatch.setattr(warnings, "showwarning", lambda message, category, *a, **k: shown.append(
            (str(message), category, threading.current_thread())))
        filters, showwarning = list(warnings.filters), warnings.showwarning
        thread = threading.Thread(target=other)
        _Gate.entered.clear()
        _Gate.release.clear()
        try:
            thread.start()
            assert started is None or started.wait(TIMEOUT)
            dpop.load_state_dict(state)
        finally:
            _Gate.release.set()
            thread.join(TIMEOUT)
        assert (warnings.filters, warnings.showwarning) == (filters, showwarning), warnings.filters[:2]
        assert dpop.t == 1
        assert _Gate.entered.is_set()  # the checks did wait for the other thread
    uncapped = [(c, t) for _, c, t in shown if c.__name__ == "UncappedStateWarning"]
    assert uncapped == [(forecasters.UncappedStateWarning, threading.current_thread())] * (kind == "forecasters"), shown
    return shown, thread


@pytest.mark.parametrize("kind", ["forecasters", "a user's source"])
def test_a_shards_source_check_leaves_the_process_warning_state_alone(thread_client, monkeypatch, kind):
    """A shard checks its source's state without swapping the process's warning filters or ``showwarning``: with workers as
    threads they are the user's. It captured the validator's warnings in ``warnings.catch_warnings``, which swaps them for
    every thread and is not thread-safe: another thread's ``catch_warnings``, entered before the check and left during
    it, had the shard restore, at its own exit, that thread's filters ("ignore") in place of the user's, for good.
    """
    inside = threading.Event()

    def other():  # e.g. another library's catch_warnings in another thread
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inside.set()
            _Gate.entered.wait(TIMEOUT)
        _Gate.release.set()

    _gated_load(thread_client, monkeypatch, kind, other, started=inside)  # asserts the filters and the warnings


@pytest.mark.parametrize("kind", ["forecasters", "a user's source"])
def test_a_warning_another_thread_issues_during_a_shards_source_check_is_not_forwarded(thread_client, monkeypatch, kind):
    """A warning of another thread of the process, issued while a shard checks its source's state, is shown where it was
    issued, once, and not taken for the source's (it was captured with it, and issued again at the line that loads).
    """
    def other():
        _Gate.entered.wait(TIMEOUT)
        warnings.warn("another thread's warning", _ElsewhereWarning)
        _Gate.release.set()

    shown, thread = _gated_load(thread_client, monkeypatch, kind, other)
    assert [w for w in shown if w[1] is _ElsewhereWarning] == [("another thread's warning", _ElsewhereWarning, thread)]


class _StricterForecasters(ForecasterSignals):
    """A user's subclass of the package's source whose validator checks more."""

    def validate_state_dict(self, state):
        if int(state["shared"]["t"]) > 0:
            raise ValueError("this source resumes only at t=0")
        return super().validate_state_dict(state)


def test_a_subclass_that_overrides_the_validator_keeps_it_on_the_shards(thread_client):
    """The shards ask the package's sources for their warnings as data (``_validated``, which the subclass inherits)
    only when that is the validator: one a subclass overrides is the one called, and its refusal is the restore's.
    """
    factory = functools.partial(_StricterForecasters, lags=2)
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=factory, seed=1, timeout=TIMEOUT) as dpop:
        fresh = dpop.state_dict()
        dpop.observe(np.ones(1))
        dpop.step()
        with pytest.raises(ValueError, match=r"shard 0 \(agents \[0, \d+\)\): this source resumes only at t=0"):
            dpop.load_state_dict(dpop.state_dict())
        assert dpop.t == 1
        dpop.load_state_dict(fresh)
        assert dpop.t == 0


def _restores(dpop, tmp_path):
    """Every way to restore ``dpop`` from its current state, by name: ``{name: restore()}``."""
    state = dpop.state_dict()
    single = dpop.save(tmp_path / "one.npz", sharded=False)
    sharded = dpop.save(tmp_path / "set.ckpt")
    return {"load_state_dict": lambda: dpop.load_state_dict(state),
            "restore_checkpoint single": lambda: restore_checkpoint(single, dpop),
            "restore single": lambda: dpop.restore(single, n_shards=2),
            "restore_checkpoint set": lambda: restore_checkpoint(sharded, dpop),
            "restore set": lambda: dpop.restore(sharded, n_shards=2)}


def test_every_restore_checks_each_shards_forecasters_state_once(thread_client, tmp_path, monkeypatch):
    """Each shard checks its slice of the forecasters' state (O(N) arrays) once per restore, in the op that asks
    (``check_source``, ``stage``), and installs the clean copy of that check: the load is sent no slice and checks
    nothing, the commit installs its staged copy as it is. The load checked its slice twice (``_validated`` for the
    clean copy, then ``load_state_dict``'s own check), the commit once more, and restore() of a single file asked the
    new shards and then, in its load, the same shards again: 3 (and 4) checks per shard for a state or a single file,
    2 for a sharded set.
    """
    from memoa_fast.timeseries.forecasters import ClientForecasters

    checks = []
    validated = ClientForecasters._validated
    monkeypatch.setattr(ClientForecasters, "_validated", lambda self, state: (checks.append(self.first_client),
                                                                             validated(self, state))[1])
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=functools.partial(ForecasterSignals, lags=2),
                        seed=1, timeout=TIMEOUT) as dpop:
        dpop.observe(np.ones(1))
        dpop.step()
        restores = _restores(dpop, tmp_path)
        expected = dict.fromkeys(restores, 1)
        source_bytes = sum(v.nbytes for v in dpop.state_dict()["source"]["agents"].values())
        counted = {}
        for name, restore in restores.items():
            checks.clear()
            sent = dpop.comm.bytes_sent
            restore()
            if name == "load_state_dict":  # the slices travel once (with the check), plus the states and costs
                assert source_bytes < dpop.comm.bytes_sent - sent < 2 * source_bytes
            assert dpop.t == 1 and dpop.n_shards == 2
            counted[name] = {lo: checks.count(lo) for lo, _ in dpop.bounds}
            assert sorted(set(checks)) == [lo for lo, _ in dpop.bounds]
        assert counted == {name: {lo: k for lo, _ in dpop.bounds} for name, k in expected.items()}


def test_a_source_state_one_shard_refuses_leaves_no_kept_copy_on_the_others(thread_client, monkeypatch):
    """A shard that accepts its slice keeps its clean copy for the load; when another shard refuses, the copies go (the
    shards are told to discard them), and the next load sends and checks its own slices.
    """
    from memoa_fast.distributed._shard import Shard

    discarded = []
    discard = Shard._discard
    monkeypatch.setattr(Shard, "_discard", lambda self: (discarded.append((self.lo, self._kept is not None)), discard(self))[1])
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=functools.partial(ForecasterSignals, lags=2),
                        seed=1, timeout=TIMEOUT) as dpop:
        dpop.observe(np.ones(1))
        dpop.step()
        state = dpop.state_dict()
        bad = {**state, "source": {"agents": {**state["source"]["agents"]}, "shared": state["source"]["shared"]}}
        bad["source"]["agents"]["lags"] = lags = state["source"]["agents"]["lags"].copy()
        lags[-1] = np.nan  # in the last shard's slice only
        with pytest.raises(ValueError, match=rf"shard 1 \(agents \[{dpop.bounds[1][0]}, {N}\)\): .*lags"):
            dpop.load_state_dict(bad)
        assert sorted(discarded) == [(0, True), (dpop.bounds[1][0], False)]
        dpop.observe(2 * np.ones(1))
        dpop.step()
        dpop.load_state_dict(state)
        assert dpop.t == 1


def test_a_load_installs_only_the_source_copies_its_own_check_kept(thread_client, tmp_path, monkeypatch):
    """A shard's kept copy of a source state is named by the check that kept it, and a load installs only its own.

    A second caller (another thread) may check its state between a load's check and its load: the shards then held
    the other state's copy and the load installed it with its own states and costs (a population at t = 1 with its
    sources at t = 2; the other caller, refused while that load was in flight, never loaded). A single-file restore
    handed its check to whichever load_state_dict ran while it was in progress, in any thread: another thread's state
    was loaded with the checkpoint's sources. Now the load refuses, before any shard writes; and since one caller at a
    time is served, another thread's load during a restore is refused at once (the restore loads its checkpoint).
    """
    import memoa_fast.distributed.population as dpop_module
    from memoa_fast._state import check_source_layout

    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=functools.partial(ForecasterSignals, lags=2),
                        seed=1, timeout=TIMEOUT) as dpop:
        dpop.observe(np.ones(1))
        dpop.step()
        first = dpop.state_dict()
        single = dpop.save(tmp_path / "one.npz", sharded=False)
        dpop.observe(2 * np.ones(1))
        dpop.step()
        second = dpop.state_dict()
        check = dpop._check_sources

        def then_another_check(source, spawned=None):  # another thread's load_state_dict(second) checks now
            kept = check(source, spawned)
            check(check_source_layout(second["source"], n_agents=N))
            return kept

        monkeypatch.setattr(dpop, "_check_sources", then_another_check)
        with pytest.raises(RuntimeError, match="another call checked its own"):
            dpop.load_state_dict(first)
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="unusable"):  # nothing mixed is served: restore() is the way back
            dpop.state_dict()
        dpop.restore(single, n_shards=2)
        assert dpop.t == 1 and int(dpop.state_dict()["source"]["shared"]["t"]) == 1

        restore_checked = dpop_module._restore_checked

        def another_thread_loads_first(*args):
            failed = []
            worker = threading.Thread(target=lambda: _record_failure(failed, dpop.load_state_dict, second))
            worker.start()
            worker.join()
            # one caller at a time: the other thread is refused at once (on 1644d71 it loaded, and this restore refused)
            assert len(failed) == 1 and "refused, nothing changed" in failed[0] and "DaskPopulation.restore" in failed[0]
            return restore_checked(*args)

        monkeypatch.setattr(dpop_module, "_restore_checked", another_thread_loads_first)
        dpop.restore(single, n_shards=2)
        monkeypatch.undo()
        assert dpop.t == 1 and int(dpop.state_dict()["source"]["shared"]["t"]) == 1
        dpop.load_state_dict(second)
        got = dpop.state_dict()
        assert dpop.t == 2 and int(got["source"]["shared"]["t"]) == 2
        np.testing.assert_array_equal(got["source"]["agents"]["weights"], second["source"]["agents"]["weights"])


def _record_failure(failed, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the test's thread
        failed.append(repr(exc))


_SECOND_CALLS = {
    "load_state_dict": lambda pop, server, before, path: pop.load_state_dict(before),
    "reset": lambda pop, server, before, path: pop.reset(),
    "restore": lambda pop, server, before, path: pop.restore(path, server),
    "step": lambda pop, server, before, path: pop.step(np.full(N, 7.0)),
    "server update": lambda pop, server, before, path: server.update(None, np.ones(1)),
}


@pytest.mark.parametrize("second", list(_SECOND_CALLS))
def test_a_second_caller_between_a_steps_signal_pass_and_its_move_is_refused_and_changes_nothing(thread_client, tmp_path,
                                                                                                  second):
    """One caller at a time, for the whole length of a call: a step is several messages (the signal pass, the client's
    merge, the move queued for the next message), and another thread's call landing in between is refused at once
    (``RuntimeError`` naming the population and the call in progress) and changes nothing; the step completes as
    without it. On main another thread's ``load_state_dict`` (or ``reset``, ``restore``) there went through: its new
    states were moved with the mean field of the old ones (silent corruption); a ``step`` or an update was refused
    only as if the population had been interrupted.
    """
    rng = np.random.default_rng(18)
    signals = rng.normal(size=(3, N))
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, initial_states=rng.normal(size=N),
                        timeout=TIMEOUT) as pop:
        server = DaskServer(pop, rule="hedge", eta=0.5)
        pop.step(signals[0])
        server.update(None, np.ones(1))
        before, server_before = pop.state_dict(), server.state_dict()
        path = pop.save(tmp_path / "before.ckpt", server)
        pop.step(signals[1])  # what the second caller would go back from
        at_1, server_at_1 = pop.state_dict(), server.state_dict()
        refused = []
        unpack = pop._unpack

        def second_caller_between_the_passes(rows, part):  # the client merges the signal pass's rows here
            if part == "step" and not refused:
                def call():
                    try:
                        _SECOND_CALLS[second](pop, server, before, path)
                    except RuntimeError as exc:
                        refused.append(exc)
                    else:
                        refused.append(None)
                other = threading.Thread(target=call)
                other.start()
                other.join(TIMEOUT)
            return unpack(rows, part)

        pop._unpack = second_caller_between_the_passes
        try:
            pop.step(signals[2])
        finally:
            del pop._unpack
        assert refused and refused[0] is not None, f"another thread's {second} was taken in the middle of a step"
        message = str(refused[0])
        assert "DaskPopulation" in message and "another thread" in message and "DaskPopulation.step" in message, message
        got, server_got = pop.state_dict(), server.state_dict()
        pop.load_state_dict(at_1)  # the same step without the second caller
        server.load_state_dict(server_at_1)
        pop.step(signals[2])
        _same_state(got, pop.state_dict())
        _same_state(server_got, server.state_dict())
        assert pop.t == 3 and server.n_updates == 1 and server_before["n_updates"] == 1


@pytest.mark.parametrize("outer", ["run", "step_predict", "save", "restore"])
def test_the_calls_a_call_makes_itself_are_served_and_a_callback_inside_them_is_refused(thread_client, tmp_path, outer):
    """A call that calls public methods itself (run's steps, step_predict's step and predict, save's state_dicts,
    restore's load_state_dicts) lends them its hold, in its thread, each for its own length: they are served, while a
    callback that calls in from inside one of them (here from a step's merge, or a load's) is refused at once, and the
    lend ends with the call (a later call of another thread is served).
    """
    rng = np.random.default_rng(5)
    signals = rng.normal(size=(2, N))
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT) as pop:
        server = DaskServer(pop, rule="eg", eta=0.5)
        _round(pop, server, signals[0], np.ones(1))
        path = pop.save(tmp_path / "c.npz", server, sharded=False)
        refused = []

        def callback():
            try:
                pop.state_dict()
            except RuntimeError as exc:
                refused.append(str(exc))

        def hooked(real):
            def inner(*args, **kwargs):
                callback()
                return real(*args, **kwargs)
            return inner

        pop._unpack = hooked(pop._unpack)  # inside every step (and predict)
        pop._apply_summary = hooked(pop._apply_summary)  # inside every load_state_dict
        pop._gather_agents = hooked(pop._gather_agents)  # inside every state_dict
        try:
            if outer == "run":
                pop.run(signals)
            elif outer == "step_predict":
                pop.step_predict(signals[1], server)
            elif outer == "save":
                pop.save(tmp_path / "d.npz", server, sharded=False)
            else:
                pop.restore(path, server)
        finally:
            del pop._unpack, pop._apply_summary, pop._gather_agents
        assert refused and all("a call of this very thread that has not returned" in r for r in refused), refused
        assert pop._lent is None and pop._calling is None
        later = []
        other = threading.Thread(target=lambda: _record_failure(later, pop.step, signals[1]))
        other.start()
        other.join(TIMEOUT)
        assert not later, later
        assert pop.t == {"run": 4, "step_predict": 3, "save": 2, "restore": 2}[outer]


def _checkpoint_function(function, pop, server, path, tmp_path):
    """``save_checkpoint`` of ``pop`` and ``server`` to a new file (returns it), or ``restore_checkpoint`` of ``path`` (returns it)."""
    if function == "save_checkpoint":
        return save_checkpoint(tmp_path / "b.npz", pop, server, sharded=False)
    restore_checkpoint(path, pop, server)
    return path


@pytest.mark.parametrize("function", ["save_checkpoint", "restore_checkpoint"])
def test_a_callback_of_this_thread_inside_a_checkpoint_call_is_refused(thread_client, tmp_path, function, monkeypatch):
    """A save (restore) lends its hold to the population's and the server's own calls it makes, not to code that
    runs in between in the same thread: a signal handler, a user object's method. Here such a callback steps the
    population and updates the server (in a save, between the population's state and the server's): refused at once,
    nothing changes. On aafa181 it was served (lent the hold): a file of the population at round 1 and the server after its
    second update, the very mix the checkpoint's guard is for.
    """
    rng = np.random.default_rng(9)
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT) as pop:
        server = DaskServer(pop, rule="hedge", eta=0.5)
        _round(pop, server, rng.normal(size=N), np.ones(1))
        path = save_checkpoint(tmp_path / "a.npz", pop, server, sharded=False)
        refused = []
        # run by the save after the population's state_dict, by the restore in its checks (reading the file's server)
        module = sys.modules["memoa_fast.checkpoint"]
        name = "check_population_state" if function == "save_checkpoint" else "check_server_state"
        real = getattr(module, name)

        def in_between(*args, **kwargs):  # as a signal handler run at this point would
            if not refused:
                _record_failure(refused, lambda: _round(pop, server, rng.normal(size=N), np.ones(1)))
                refused.append(refused.pop() if refused else "served")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, in_between)
        path = _checkpoint_function(function, pop, server, path, tmp_path)
        monkeypatch.undo()
        assert len(refused) == 1 and "a call of this very thread that has not returned" in refused[0], refused
        assert pop.t == 1 and server.n_updates == 1 and pop._lent is None and pop._calling is None
        saved = load_checkpoint(path)
        assert saved.t == 1 and saved.server["n_updates"] == 1
        _round(pop, server, rng.normal(size=N), np.ones(1))  # served after the call
        assert pop.t == 2 and server.n_updates == 2


def test_the_populations_own_states_are_taken_as_an_array_argument_of_its_calls(thread_client):
    """``pop.step(pop.resident_states)``, ``pop.reset(pop.step(s))``, a state dict whose states are the handle: the
    handle of the population's own states is an array (``__array__``), read as ``np.asarray(handle)`` before the call.
    Since the one-caller guard (aafa181) its ``gather`` ran inside the call and was refused as a re-entrant call of
    this very thread: ``RuntimeError`` for a single-threaded program that worked before.
    """
    rng = np.random.default_rng(3)
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, initial_states=rng.normal(size=N),
                        timeout=TIMEOUT) as pop:
        pop.step(rng.normal(size=N))
        before = pop.state_dict()
        x = pop.states
        pop.step(x)
        expected = pop.state_dict()
        pop.load_state_dict(before)
        _same_state(pop.state_dict(), before)
        pop.step(pop.resident_states)  # signals = the current states, as above
        _same_state(pop.state_dict(), expected)
        pop.reset(pop.resident_states)  # round 0 at the current states
        assert pop.t == 0
        np.testing.assert_array_equal(pop.states, expected["states"])
        pop.load_state_dict(dict(before, states=pop.resident_states))
        np.testing.assert_array_equal(pop.states, expected["states"])
        assert pop.t == before["t"]


@pytest.mark.parametrize("function", ["save_checkpoint", "restore_checkpoint"])
def test_the_checkpoint_functions_hold_a_dask_population_for_their_whole_length(thread_client, tmp_path, function,
                                                                                  monkeypatch):
    """``save_checkpoint``/``restore_checkpoint`` of a single file over a DaskPopulation and its server gather (load)
    the population's state, then the server's: another thread's step in between is refused, and the checkpoint (the
    restored pair) is of one round. It used to be served: a file holding the population at t and the server at the
    next round's weights.
    """
    rng = np.random.default_rng(7)
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, timeout=TIMEOUT) as pop:
        server = DaskServer(pop, rule="hedge", eta=0.5)
        _round(pop, server, rng.normal(size=N), np.ones(1))
        path = save_checkpoint(tmp_path / "a.npz", pop, server, sharded=False)
        before, server_before = pop.state_dict(), server.state_dict()
        refused = []
        # what the save runs after the population's state_dict, or the restore's server.load_state_dict first
        module, name = ((sys.modules["memoa_fast.checkpoint"], "check_population_state") if function == "save_checkpoint" else
                        (sys.modules["memoa_fast.distributed.server"], "check_server_state"))
        real = getattr(module, name)

        def after_the_population(*args, **kwargs):
            other = threading.Thread(target=lambda: _record_failure(
                refused, lambda: _round(pop, server, rng.normal(size=N), np.ones(1))))
            other.start()
            other.join(TIMEOUT)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, after_the_population)
        path = _checkpoint_function(function, pop, server, path, tmp_path)
        monkeypatch.undo()
        assert len(refused) == 1 and f"inside {function}" in refused[0], refused
        assert pop.t == 1 and server.n_updates == 1
        saved = load_checkpoint(path)
        assert saved.t == 1 and saved.server["n_updates"] == 1
        _same_state(pop.state_dict(), before)
        _same_state(server.state_dict(), server_before)


class _OwnLoad(ForecasterSignals):
    """A user's subclass that overrides ``load_state_dict`` only (it records each load, then loads as the package's)."""

    loaded = []

    def load_state_dict(self, state):
        _OwnLoad.loaded.append(self.forecasters.first_client)
        super().load_state_dict(state)


class _OwnInstaller(ForecasterSignals):
    """A user's subclass with a method of its own that happens to be called ``_install_checked``."""

    def _install_checked(self, clean):
        raise AssertionError("a user's own _install_checked was called for the package's")


class _RefusingNow(ForecasterSignals):
    """A user's subclass whose validator refuses any state once ``refuse`` is set."""

    refuse = False

    def validate_state_dict(self, state):
        if _RefusingNow.refuse:
            raise ValueError("this source refuses every state now")
        return super().validate_state_dict(state)


class _OneMoreNotice(ForecasterSignals):
    """A user's subclass that adds a notice where the package's validators make theirs."""

    def _validated(self, state):
        clean, notices = super()._validated(state)
        return clean, [*notices, (UserWarning, "one more")]


@pytest.mark.parametrize("make", [_OwnLoad, _OwnInstaller, _RefusingNow, _OneMoreNotice])
def test_a_subclass_of_the_package_source_keeps_its_own_load_and_check_on_every_restore(thread_client, tmp_path, make):
    """The shards install a checked state through the package's installer only where ``validate_state_dict`` and
    ``load_state_dict`` both are the package's: a subclass's own ``load_state_dict`` is called on every shard, on every
    path; a method of its own named as the installer is never taken for it; a stricter validator refuses every
    restore, and nothing is installed; the notices of its own ``_validated`` are issued once per restore, by the client
    (the shards' load does not issue them again).
    """
    with DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, signals=functools.partial(make, lags=2), seed=1,
                        timeout=TIMEOUT) as dpop:
        dpop.observe(np.ones(1))
        dpop.step()
        saved = dpop.state_dict()["source"]
        restores = _restores(dpop, tmp_path)
        dpop.observe(2 * np.ones(1))
        dpop.step()
        before = dpop.state_dict()["source"]
        for name, restore in restores.items():
            _OwnLoad.loaded.clear()
            if make is _RefusingNow:
                _RefusingNow.refuse = True
                try:
                    with pytest.raises(ValueError, match=r"shard 0 \(agents \[0, \d+\)\): .*refuses every state now"):
                        restore()
                finally:
                    _RefusingNow.refuse = False
                assert dpop.t == 2, name
                expected = before
            else:
                with warnings.catch_warnings(record=True) as caught:  # the workers are threads: theirs are caught too
                    warnings.simplefilter("always")
                    restore()
                assert [str(w.message) for w in caught] == ["one more"] * (make is _OneMoreNotice), name
                assert dpop.t == 1, name
                expected = saved
            assert sorted(_OwnLoad.loaded) == ([lo for lo, _ in dpop.bounds] if make is _OwnLoad else []), name
            got = dpop.state_dict()["source"]
            for part in ("agents", "shared"):
                for key, value in expected[part].items():
                    np.testing.assert_array_equal(got[part][key], value, err_msg=f"{name}: {part}/{key}")
            if make is not _RefusingNow:
                dpop.observe(2 * np.ones(1))
                dpop.step()


def test_client_side_forecasters_with_other_settings_are_refused_by_a_restore_onto_other_shards(thread_client, tmp_path):
    """Without worker-side sources: the client's forecasters saved beside a Dask population; restored onto another
    shard count with forecasters of another seed, refused and nothing changed; with the same, bitwise.
    """
    from memoa_fast import ClientForecasters

    make_source = functools.partial(ClientForecasters, N, 1, lags=2, noise_range=(0.1, 2.0), backend="numpy", threads=1)
    dpop = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, exact=True, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
    source = make_source(seed=2**63 - 1)
    _settings_run(dpop, dserver, range(3), source)
    path = save_checkpoint(tmp_path / "c.npz", dpop, dserver, source=source, sharded=False)
    _settings_run(dpop, dserver, range(3, 5), source)
    other = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=3, exact=True, timeout=TIMEOUT)
    other_server = DaskServer(other, rule="hedge", eta=0.5, alpha=0.01)
    wrong = make_source(seed=2**63 - 2)
    before = wrong.state_dict()
    with pytest.raises(CheckpointError, match=r"state\['source/shared/seed'\] is 9223372036854775807, but this source has "
                                              r"seed=9223372036854775806"):
        restore_checkpoint(path, other, other_server, source=wrong)
    assert other.t == 0 and other_server.n_updates == 0 and wrong.t == 0
    np.testing.assert_array_equal(wrong.state_dict()["agents"]["weights"], before["agents"]["weights"])
    right = make_source(seed=2**63 - 1)
    restore_checkpoint(path, other, other_server, source=right)
    _settings_run(other, other_server, range(3, 5), right)
    _assert_bitwise(other, other_server, dpop, dserver)
    other.close()
    dpop.close()


def test_sharded_checkpoints_saved_before_the_settings_were_recorded_restore_as_before(thread_client, tmp_path, monkeypatch):
    """Nothing a user saved is lost: a sharded set whose sources recorded no settings (a real one written by main
    99c2a56, and one of today's written without them) restores onto any shard count and onto one machine, bitwise.
    """
    from pathlib import Path

    old = Path(__file__).parent / "data" / "old_sources" / "noisy.ckpt"
    factory = functools.partial(NoisyLastValueSignals, low=0.1, high=3.0)
    restored = DaskPopulation(GAME, 50, 1, client=thread_client, exact=True, signals=factory, seed=5, timeout=TIMEOUT)
    restored_server = DaskServer(restored, rule="eg", eta=0.5, alpha=0.01)
    restore_checkpoint(old, restored, restored_server)
    assert restored.t == 3 and sorted(restored.state_dict()["source"]["shared"]) == ["high", "low", "seed", "t", "y"]
    pop, server = _single(n=50)
    source = NoisyLastValueSignals(0, 50, 5, low=0.1, high=3.0)
    restore_checkpoint(old, pop, server, source=source)
    uninterrupted = NoisyLastValueSignals(0, 50, 5, low=0.1, high=3.0)
    for t in range(3):
        uninterrupted.observe([np.sin(0.7 * t)])  # the targets of make_old_sources.py
        uninterrupted.next()
    assert source.t == 3
    np.testing.assert_array_equal(source.next(), uninterrupted.next())
    restore_checkpoint(old, pop, server, source=source)
    _advance(restored, restored_server, range(3, 6))
    _advance(pop, server, range(3, 6), source)
    _assert_bitwise(pop, server, restored, restored_server)
    restored.close()

    with monkeypatch.context() as patch:  # today's sources, saving no settings (the workers are threads of this process)
        patch.setattr(NoisyLastValueSignals, "settings", lambda self: {})
        saved = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=2, exact=True, signals=factory, seed=5,
                               timeout=TIMEOUT)
        saved_server = DaskServer(saved, rule="eg", eta=0.5, alpha=0.01)
        _advance(saved, saved_server, range(3))
        path = saved.save(tmp_path / "set.ckpt", saved_server)
        _advance(saved, saved_server, range(3, 6))
    assert sorted(load_checkpoint(path).source["shared"]) == ["t", "y"]
    for n_shards in (1, 3):
        other = DaskPopulation(GAME, N, 1, client=thread_client, n_shards=n_shards, exact=True, signals=factory, seed=5,
                               timeout=TIMEOUT)
        other_server = DaskServer(other, rule="eg", eta=0.5, alpha=0.01)
        restore_checkpoint(path, other, other_server)
        _advance(other, other_server, range(3, 6))
        _assert_bitwise(other, other_server, saved, saved_server)
        other.close()
    saved.close()


# --------------------------------------------------------------------------- an interrupt at any bytecode of a step or an update
_INTERRUPTED = "was interrupted in the middle of"
_OWN_FRAMES = ("step", "update", "_call", "_exchange", "_queue")
_EVERY_NTH_LINE = {"_call": 2, "_exchange": 4}  # most of their lines are in the round trip, where only restore() recovers


def _where(frame, _ops={}):
    """``(function, line, instruction name)`` of the bytecode ``frame`` is about to run."""
    code = frame.f_code
    if code not in _ops:
        _ops[code] = {i.offset: i.opname for i in dis.get_instructions(code)}
    return code.co_name, frame.f_lineno, _ops[code].get(frame.f_lasti, "")


def _interrupt_points(where, method, stride=500):
    """Which of a call's bytecodes to interrupt at (1-based), from ``_where`` of each.

    In the engine's own functions (``method``, ``_queue``): the first bytecode of each line, and in ``method``'s
    frame after its first round trip (its bookkeeping) also every bytecode that follows a write or a call (the
    others change nothing: the state there is that at the one before); in ``_call`` and its wait (``_exchange``,
    where the population only sends and reads answers) the first bytecode of every second or fourth line; every
    ``stride``-th bytecode elsewhere (argument checks, message sizes). About 40 of 2000-2700.
    """
    points, seen, after_trip = [], set(), False
    for k, (name, line, _) in enumerate(where, start=1):
        after_trip = after_trip or name == "_exchange"
        first = name in _OWN_FRAMES and (name, line) not in seen
        if first and name in _EVERY_NTH_LINE:
            first = sum(n == name for n, _ in seen) % _EVERY_NTH_LINE[name] == 0
        seen.add((name, line))
        prev = where[k - 2] if k > 1 else ("", 0, "")
        after_write = prev[0] == name and prev[2].startswith(("STORE", "CALL", "DELETE"))
        if first or (name == method and after_trip and after_write) or k % stride == 0:
            points.append(k)
    return points


def _same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same_state(a[key], b[key])
        elif key in ("mean_state", "class_mean_state"):  # a load sums the loaded states on the client, in another order
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-15, err_msg=key)
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("method", ["step", "update"])
def test_a_dask_population_or_server_interrupted_at_any_bytecode_is_at_a_round_or_refuses(thread_client, tmp_path, method):
    """A ``KeyboardInterrupt`` at (a sample of) every bytecode the client runs in ``DaskPopulation.step`` or
    ``DaskServer.update``: afterwards each object is either at a round boundary of an uninterrupted twin (its state,
    worker-side sources included, that of the twin before or after the call) and continues with the twin's bits, or it
    refuses every call with a ``RuntimeError`` saying it was interrupted, until ``load_state_dict``/``reset`` (an
    interrupt after the shards answered) or ``restore`` (during the round trip). On main an interrupt between the
    round trip and the counters after it left the population a round apart (the move queued, ``t`` and the discount
    behind; or the move lost) and the server's weights unnormalised or its count behind, silently.
    """
    factory = functools.partial(NoisyLastValueSignals, low=0.1, high=3.0)
    pop = DaskPopulation(GAME, CHUNK + 100, 1, client=thread_client, n_shards=2, threads=1, signals=factory, seed=5,
                         timeout=TIMEOUT)
    server = DaskServer(pop, rule="eg", eta=0.5, alpha=0.01)
    calls = []
    for t in range(3):
        calls += [lambda t=t: pop.observe(_TARGETS[t]), lambda: pop.step(), lambda t=t: server.update(None, _TARGETS[t + 1])]
    j = 4 if method == "step" else 5  # the call interrupted: round 1's
    snaps = {}  # after calls[:i]
    for i, call in enumerate(calls[:j + 2], start=1):
        call()
        if i >= j - 2:
            snaps[i] = (pop.state_dict(), server.state_dict())
        if i == j:
            saved = pop.save(tmp_path / "before.ckpt", server, sharded=False)

    def start():
        pop.load_state_dict(snaps[j - 2][0])
        server.load_state_dict(snaps[j - 2][1])
        calls[j - 2]()  # the queue holds what a run's holds: the last update's share and an observe, or a move
        calls[j - 1]()

    def continue_from(i, k):
        for call in calls[i:j + 2]:
            call()
        try:
            _same_state(pop.state_dict(), snaps[j + 2][0])
            _same_state(server.state_dict(), snaps[j + 2][1])
        except AssertionError as exc:
            raise AssertionError(f"interrupted at bytecode {k} {where[k - 1]}, continued from call {i}: not the "
                                 f"uninterrupted run's state: {exc}") from None

    def usable(read):
        """Whether ``read()`` (a call that changes nothing) is taken; if not, the reason says it was interrupted."""
        try:
            read()
        except RuntimeError as exc:
            assert _INTERRUPTED in str(exc)
            return False
        return True

    where = _bytecodes(lambda: start() or pop, lambda _: calls[j](), classify=_where)
    points = _interrupt_points(where, method)
    seen = set()
    for k in points:
        start()
        assert _interrupt_at(k, calls[j])
        pop_usable, server_usable = usable(lambda: pop.costs), usable(lambda: server.log_weights)
        if pop_usable and server_usable:
            # t (a step) or the update count (an update) says which boundary; continuing checks the rest bitwise
            done = (pop.t, server.n_updates) == (snaps[j + 1][0]["t"], snaps[j + 1][1]["n_updates"])
            assert done or (pop.t, server.n_updates) == (snaps[j][0]["t"], snaps[j][1]["n_updates"])
            seen.add(j + done)
            continue_from(j + done, k)
            continue
        refusing = [lambda: server.update(None, _TARGETS[0]), server.predict, lambda: server.log_weights, server.state_dict]
        if not pop_usable:
            refusing += [pop.step, lambda: pop.observe(_TARGETS[0]), lambda: pop.states, lambda: pop.costs,
                         pop.state_dict, lambda: pop.save(tmp_path / "no.ckpt")]
        else:
            _same_state(pop.state_dict(), snaps[j][0])  # only the server was cut short
        for call in refusing:
            with pytest.raises(RuntimeError, match=_INTERRUPTED):
                call()
        seen.add("refused")
        if pop._in_flight is not None:  # the shards may disagree: only a restore
            with pytest.raises(RuntimeError, match=_INTERRUPTED):
                pop.reset()
            seen.add("restore")
            pop.restore(saved, server)
        else:
            if not pop_usable:
                pop.load_state_dict(snaps[j][0])
            server.load_state_dict(snaps[j][1])
        continue_from(j, k)
    start()
    assert not _interrupt_at(len(where) + 1, calls[j])
    assert seen == {j, j + 1, "refused", "restore"}, seen
    pop.close()

