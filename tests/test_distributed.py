"""DaskPopulation on a real LocalCluster: same results as one process, checkpoints, lost workers.

Two worker processes on the loopback interface, started and closed here.
Skipped with a reason where dask.distributed is not installed.
"""
import functools
import os
import signal

import numpy as np
import pytest

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
from memoa_fast.kernels import CHUNK  # noqa: E402
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
                dpop.set_labels(labels)
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


def test_exact_mode_is_bitwise_single_process(client):
    """exact=True: chunk partials merged by the kernels' own merge: bitwise, on 3 shards over 2 workers."""
    d, T = 2, 10
    targets = np.linspace(-1, 1, T * d).reshape(T, d)
    pop, server = _single(d=d, rule="hedge")
    source = NoisyLastValueSignals(0, N, 5, dim=d)
    dpop = DaskPopulation(
        GAME, N, d, client=client, n_shards=3, exact=True, signals=functools.partial(NoisyLastValueSignals, dim=d),
        seed=5, timeout=TIMEOUT,
    )
    dserver = DaskServer(dpop, rule="hedge", eta=0.5, alpha=0.01)
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
    with pytest.raises(ValueError, match="n_shards <= 4"):
        DaskPopulation(GAME, N, 1, client=client, n_shards=5)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        DaskPopulation(GAME, N, 1, client="tcp://127.0.0.1:8786")
    state = dpop.state_dict()
    dpop.step(rng.normal(size=N))
    dpop.load_state_dict(state)
    np.testing.assert_array_equal(dpop.states, state["states"])
    assert dpop.t == 1
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
def test_checkpoint_round_trip_across_engines_and_shard_counts(client, tmp_path):
    """Save sharded, resume single-process and on 1 and 3 shards: each equals the run that never stopped."""
    T, cut = 12, 5
    targets = np.sin(np.arange(T + 1))[:, None]
    factory = functools.partial(NoisyLastValueSignals, low=0.1)

    def advance(pop, server, ts, source=None):
        for t in ts:
            if source is None:
                pop.observe(targets[t])
                _round(pop, server, None, targets[t + 1])
            else:
                source.observe(targets[t])
                _round(pop, server, source.next(), targets[t + 1])

    dpop = DaskPopulation(GAME, N, 1, client=client, signals=factory, seed=4, timeout=TIMEOUT)
    dserver = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01)
    advance(dpop, dserver, range(cut))
    path = dpop.save(tmp_path / "sharded.npz", dserver)
    assert dpop.last_checkpoint == str(path) and dpop.last_checkpoint_step == cut
    advance(dpop, dserver, range(cut, T))

    ckpt = load_checkpoint(path)
    assert ckpt.source["shared"]["t"] == cut
    pop = Population(ckpt.game, ckpt.n_agents, ckpt.dim, threads=1)
    server = Server(ckpt.n_agents, ckpt.dim, rule="eg", eta=0.5, alpha=0.01, threads=1)
    source = NoisyLastValueSignals(0, N, 4, low=0.1)
    restore_checkpoint(ckpt, pop, server, source=source)
    advance(pop, server, range(cut, T), source)
    _assert_close(dpop, dserver, pop, server, rtol=1e-12, atol=1e-13)

    for n_shards in (1, 3):
        other = DaskPopulation(GAME, N, 1, client=client, n_shards=n_shards, signals=factory, seed=4, timeout=TIMEOUT)
        other_server = DaskServer(other, rule="eg", eta=0.5, alpha=0.01)
        restore_checkpoint(path, other, other_server)
        advance(other, other_server, range(cut, T))
        _assert_close(other, other_server, pop, server, rtol=1e-12, atol=1e-13)
        other.close()
    dpop.close()


def test_bad_checkpoint_leaves_a_sharded_population_untouched(client, tmp_path, rng):
    dpop = DaskPopulation(GAME, N, 1, client=client, timeout=TIMEOUT)
    dpop.step(rng.normal(size=N))
    path = save_checkpoint(tmp_path / "c.npz", dpop)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
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
