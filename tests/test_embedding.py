"""The public API as a caller embeds it: array forms, aliasing, atomicity, threads and processes.

One call per step in someone else's pipeline: whatever form the arrays come in
(byte order, layout, strides, read-only, NumPy subclasses, Python sequences),
the result is the contiguous float64 one or a clear error naming the argument;
an argument that is a view of the object's own buffers reads the values it had
when the call began; a refused call changes nothing; a process forked from one
whose OpenMP threads ran still steps (on one thread, the same bits).
"""
import contextlib
import copy
import os
import pickle
import time
import warnings

import numpy as np
import pytest
from helpers import available_backends, call_from_two_threads, held_by_another_thread

from memoa_fast import Game, Pipeline, Population, Server, TrustClasses, TrustPopulation
from memoa_fast._validation import available_threads
from memoa_fast.distributed.signals import NoisyLastValueSignals
from memoa_fast.timeseries.forecasters import ClientForecasters, SquaredErrors

BACKENDS = available_backends()
THREADS = (1, 2) if available_threads() >= 2 else (1,)
N, D = 10, 3
GAME = Game(q=1.0, kappa=1.0, r=0.1, gamma=0.9)
TARGET = np.array([0.3, -0.2, 0.1])


def forms(a: np.ndarray) -> dict:
    """The same float64 values as ``a`` (2-D) in every form a caller may hand over."""
    wide = np.zeros((a.shape[0], 2 * a.shape[1]))
    wide[:, ::2] = a
    ro = a.copy()
    ro.flags.writeable = False
    return {
        "big-endian": a.astype(">f8"),
        "fortran": np.asfortranarray(a),
        "strided": wide[:, ::2],
        "negative-strides": np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1],
        "read-only": ro,
        "list": a.tolist(),
        "tuple": tuple(map(tuple, a.tolist())),
        "memoryview": memoryview(a.copy()),
        "float32-exact": a.astype(np.float32),  # ``a`` holds float32 values here: exact in both
    }


@pytest.fixture(scope="module")
def signals():
    rng = np.random.default_rng(11)
    return rng.normal(size=(N, D)).astype(np.float32).astype(np.float64)


def _population_run(backend, threads, s, labels=None):
    game = GAME if labels is None else Game(q=[1.0, 2.0], kappa=[1.0, 1.0], r=[0.1, 0.1], gamma=0.9, shares=[0.5, 0.5])
    pop = Population(game, N, D, labels=labels, backend=backend, threads=threads, parallel_threshold=1)
    server = Server(N, D, rule="eg", backend=backend, threads=threads, parallel_threshold=1)
    yhat = pop.step_predict(s, server)
    pop.step(s)
    server.update(s, TARGET)
    return [pop.states.copy(), pop.costs.copy(), yhat, server.predict(s), server.log_weights.copy()]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_array_form_steps_like_contiguous_float64(backend, threads, signals):
    expected = _population_run(backend, threads, signals)
    for name, form in forms(signals).items():
        got = _population_run(backend, threads, form)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b, err_msg=name)
    labels = np.arange(N) % 2
    expected = _population_run(backend, threads, signals, labels)
    for name, form in {"big-endian": labels.astype(">i8"), "int32": labels.astype(np.int32), "uint8": labels.astype(np.uint8),
                       "strided": np.repeat(labels, 2)[::2], "read-only": np.broadcast_to(labels, (N,)),
                       "list": labels.tolist(), "unmasked-masked-array": np.ma.masked_array(labels)}.items():
        for a, b in zip(_population_run(backend, threads, signals, form), expected):
            np.testing.assert_array_equal(a, b, err_msg=f"labels {name}")


def test_masked_labels_are_refused_naming_the_argument():
    labels = np.ma.masked_array(np.arange(N) % 2, mask=np.arange(N) == 3)
    game = Game(q=[1.0, 2.0], kappa=[1.0, 1.0], r=[0.1, 0.1], gamma=0.9, shares=[0.5, 0.5])
    with pytest.raises(TypeError, match="labels is a masked array with 1 masked entries"):
        Population(game, N, D, labels=labels)
    pop = Population(game, N, D, labels=np.arange(N) % 2)
    with pytest.raises(TypeError, match="labels is a masked array"):
        pop.set_labels(labels)
    np.testing.assert_array_equal(pop.labels, np.arange(N) % 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_masked_entry_is_refused_everywhere_and_nothing_changes(backend, signals):
    """``np.asarray`` drops the mask: the hidden value under it would be stepped on as data."""
    for threads in THREADS:  # nothing masked: the data, on every backend (the reference kernels ran masked arithmetic)
        for a, b in zip(_population_run(backend, threads, np.ma.masked_array(signals.copy(), mask=False)),
                        _population_run(backend, threads, signals)):
            np.testing.assert_array_equal(a, b)
    masked = np.ma.masked_array(signals.copy(), mask=np.zeros_like(signals, dtype=bool))
    masked[2, 1] = np.ma.masked
    pop = Population(GAME, N, D, backend=backend)
    server = Server(N, D, backend=backend)
    for call in (lambda: pop.step(masked), lambda: pop.step_predict(masked, server), lambda: server.predict(masked),
                 lambda: server.update(masked, signals[0]), lambda: server.update(signals, np.ma.masked_array(signals[0], mask=[1, 0, 0]))):
        with pytest.raises(TypeError, match="masked"):
            call()
    assert pop.t == 0 and server.n_updates == 0 and not pop.states.any()


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_matrix_is_a_plain_array_to_every_method(signals):
    """``np.matrix`` makes ``**`` a matrix power and rows 2-D: every method reads it as the plain array."""
    from memoa_fast.timeseries.forecasters import SquaredErrors

    square = signals[:D]  # (d, d): a matrix power would even run
    for backend in ("numpy", "numba"):
        a, b = SquaredErrors(D, D, backend=backend), SquaredErrors(D, D, backend=backend)
        assert a.add(np.matrix(square), signals[0])[0] == b.add(square, signals[0])[0]
    a, b = TrustClasses(D, 2), TrustClasses(D, 2)
    a.observe(np.matrix(square), signals[0])
    b.observe(square, signals[0])
    np.testing.assert_array_equal(a.errors, b.errors)
    pipe, ref = Pipeline(N, D, backend="numpy"), Pipeline(N, D, backend="numpy")
    np.testing.assert_array_equal(pipe.run(np.matrix(signals[:4])), ref.run(signals[:4]))


@pytest.mark.parametrize("rule", ["error", "minimax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_population_steps_on_a_view_of_its_own_states(backend, rule, signals):
    """``tp.step(tp.population.states)``: every candidate and the trust classes see the states before the step."""
    kw = dict(n_classes=2, reclass=2, rule=rule, powers=(1.0, 1.5), backend=backend, threads=1)
    a, b = TrustPopulation(N, D, **kw), TrustPopulation(N, D, **kw)
    for tp in (a, b):
        tp.step(signals)
        tp.observe(signals[0])
    for t in range(4):
        a.step(a.population.states)
        b.step(b.population.states.copy())
        a.observe(signals[t])
        b.observe(signals[t])
    for p, q in zip(a.populations, b.populations):
        np.testing.assert_array_equal(p.states, q.states)
    np.testing.assert_array_equal(a.trust.errors, b.trust.errors)
    np.testing.assert_array_equal(a.costs, b.costs)


def _trust_snapshot(tp):
    return ([p.state_dict() for p in tp.populations], tp.trust.errors.copy(), tp._signals.copy(), tp.class_costs.copy(),
            tp.costs.copy(), tp.t, tp.leader, tp.n_reclassed, tp.trust.n_observed)


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        np.testing.assert_array_equal(a, b)


def test_trust_population_refused_or_concurrent_calls_change_nothing(signals):
    tp = TrustPopulation(N, D, n_classes=2, reclass=2, powers=(1.0, 1.5), backend="numpy")
    tp.step(signals)
    tp.observe(signals[0])
    before = _trust_snapshot(tp)
    for bad in (signals[:-1], np.full((N, D), "x"), signals.astype(complex)):
        with pytest.raises((TypeError, ValueError), match="signals"):
            tp.step(bad)
    with tp._exclusive:  # another thread is inside a call
        with pytest.raises(RuntimeError, match="TrustPopulation"):
            tp.step(signals)
        with pytest.raises(RuntimeError, match="TrustPopulation"):
            tp.observe(signals[0])
    _assert_same(_trust_snapshot(tp), before)
    clone = pickle.loads(pickle.dumps(tp))  # the lock is not pickled; the clone has its own
    for obj in (tp, clone, copy.copy(tp)):
        obj.step(signals * 2)
        obj.observe(signals[1])
    _assert_same(_trust_snapshot(clone), _trust_snapshot(tp))


def test_trust_classes_refused_or_concurrent_calls_change_nothing(signals):
    """TrustClasses as every other object that owns state: a second thread's call (observe, the classes it ranks, a
    copy or pickle) raises ``RuntimeError`` while an observe runs, instead of racing with it; nothing changes.
    """
    tc = TrustClasses(N, 2, reclass=1)
    tc.observe(signals, TARGET)
    before = pickle.dumps(tc)
    calls = {"observe": lambda: tc.observe(signals * 2, TARGET), "classes": tc.classes, "classes_for": lambda: tc.classes_for([1.0, 2.0]),
             "pickle": lambda: pickle.dumps(tc), "copy": lambda: copy.copy(tc), "deepcopy": lambda: copy.deepcopy(tc)}
    with held_by_another_thread(tc._exclusive):  # another thread inside a call
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="TrustClasses is being used by another thread"):
                call()
    assert pickle.dumps(tc) == before  # nothing changed
    with tc._exclusive:  # this thread inside a call (a callback calling the object): not re-entrant either
        with pytest.raises(RuntimeError, match="TrustClasses is being used by another thread"):
            tc.observe(signals, TARGET)
    clone = pickle.loads(before)  # the lock is not pickled: the clone has its own, free
    for obj in (tc, clone, copy.copy(tc), copy.deepcopy(tc)):
        for call in ("observe", "classes", "classes_for"):  # every one works once the call is over
            getattr(obj, call)(*{"observe": (signals * 2, TARGET), "classes_for": ([1.0],)}.get(call, ()))
        np.testing.assert_array_equal(obj.errors, tc.errors)
        assert obj.n_observed == tc.n_observed == 2


def test_trust_classes_copies_are_independent(signals):
    """``copy.copy`` (as pickle and ``deepcopy``) gives its own arrays: the copy's observe left the original's errors
    moved while its count stayed, since the shallow copy shared them.
    """
    tc = TrustClasses(N, 2)
    tc.observe(signals, TARGET)
    before = tc.errors.copy()
    for other in (copy.copy(tc), copy.deepcopy(tc), pickle.loads(pickle.dumps(tc))):
        other.observe(signals * 3, TARGET)
        assert not np.shares_memory(other.errors, tc.errors) and other.n_observed == 2
        np.testing.assert_array_equal(tc.errors, before)
    assert tc.n_observed == 1


def test_trust_classes_observe_from_two_threads_raises_instead_of_racing():
    """NumPy releases the GIL inside each pass of ``observe``: two threads folding at once shared its scratch rows."""
    n = 200_000
    forecasts = np.random.default_rng(5).normal(size=(n, 1))
    tc = TrustClasses(n, 4)
    errors, done = call_from_two_threads(lambda: tc.observe(forecasts, 0.25), 30)
    assert errors and "not thread-safe" in str(errors[0])
    serial = TrustClasses(n, 4)
    for _ in range(done):
        serial.observe(forecasts, 0.25)
    assert tc.n_observed == done  # every refused call changed nothing
    np.testing.assert_array_equal(tc.errors, serial.errors)


@contextlib.contextmanager
def _paused_in_another_thread(obj, name, call):
    """Run ``call()`` in another thread, paused inside it where it calls ``obj.<name>`` (an instance attribute
    shadows the method) for the ``with`` block; on leaving it the call finishes. Yields the list of its errors.
    """
    import threading

    inside, leave, errors = threading.Event(), threading.Event(), []
    real = getattr(obj, name)

    def paused(*args):
        inside.set()
        leave.wait(30)
        return real(*args)

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            inside.set()

    setattr(obj, name, paused)
    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert inside.wait(30)
        yield errors
    finally:
        leave.set()
        worker.join()
        delattr(obj, name)


def test_trust_population_observe_refuses_its_trust_classes_to_another_thread(signals):
    """While ``tp.observe`` runs (here paused between folding the errors and ranking them), a call of ``tp.trust``
    from another thread raises ``RuntimeError``: the composite holds its TrustClasses' lock too, not only its own
    (``tp.trust.observe`` went through and moved the errors the call was about to rank).
    """
    kw = dict(n_classes=2, reclass=2, powers=(1.0, 1.5), backend="numpy")
    tp, twin = TrustPopulation(N, D, **kw), TrustPopulation(N, D, **kw)
    for obj in (tp, twin):
        obj.step(signals)
        obj.observe(signals[0])
        obj.step(signals * 2)
    with _paused_in_another_thread(tp, "_measure_class_costs", lambda: tp.observe(signals[1])) as errors:
        for call in (lambda: tp.trust.observe(signals, TARGET), tp.trust.classes, lambda: tp.trust.classes_for([1.0]),
                     lambda: pickle.dumps(tp.trust), lambda: copy.copy(tp.trust)):
            with pytest.raises(RuntimeError, match="TrustClasses is being used by another thread"):
                call()
        for call in (lambda: pickle.dumps(tp), lambda: copy.copy(tp)):
            with pytest.raises(RuntimeError, match="TrustPopulation is being used by another thread"):
                call()
    assert not errors
    twin.observe(signals[1])  # the same round alone: the refused calls changed nothing
    assert tp.n_reclassed == twin.n_reclassed == 1
    _assert_same(_trust_snapshot(tp), _trust_snapshot(twin))


def test_trust_population_is_not_copied_while_another_thread_steps_it(signals):
    """A pickle or copy while another thread's ``step`` is between two populations (the first moved, the second
    not yet) raises ``RuntimeError``: it returned a TrustPopulation whose candidates were a round apart.
    """
    tp = TrustPopulation(N, D, n_classes=2, reclass=2, powers=(1.0, 1.5), backend="numpy")
    tp.step(signals)
    with _paused_in_another_thread(tp.populations[1], "step", lambda: tp.step(signals * 2)) as errors:
        for call in (lambda: pickle.dumps(tp), lambda: copy.copy(tp), lambda: copy.deepcopy(tp)):
            with pytest.raises(RuntimeError, match="TrustPopulation is being used by another thread"):
                call()
    assert not errors
    clone = pickle.loads(pickle.dumps(tp))
    assert [p.t for p in clone.populations] == [p.t for p in tp.populations] == [2, 2]
    for a, b in zip(clone.populations, tp.populations):  # (a copy sums its mean state again: to rounding)
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_array_equal(a.costs, b.costs)
    np.testing.assert_array_equal(clone._signals, tp._signals)


def test_trust_population_pickle_is_a_snapshot_of_one_round(signals):
    """The pickler writes the state after ``__getstate__`` returns: a step then (another thread's, once the lock is
    free; here from the pickler's hook at the first population) must not reach the pickle. It did: the populations
    were written after the step and the signals of the round before, a state of no round.
    """
    import io

    tp = TrustPopulation(N, D, n_classes=2, reclass=2, powers=(1.0, 1.5), backend="numpy")
    tp.step(signals)

    class StepMidway(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, Population) and tp.populations[0].t == 1:
                tp.step(signals * 2)
            return NotImplemented

    buffer = io.BytesIO()
    StepMidway(buffer).dump(tp)
    assert tp.populations[0].t == 2  # the step ran while the pickle was being written
    clone = pickle.loads(buffer.getvalue())
    assert [p.t for p in clone.populations] == [1, 1]  # the round of the call
    np.testing.assert_array_equal(clone._signals, signals)
    clone.step(signals * 2)
    for a, b in zip(clone.populations, tp.populations):
        np.testing.assert_array_equal(a.states, b.states)
    np.testing.assert_array_equal(clone._signals, tp._signals)


def test_trust_classes_fold_is_the_formula(signals):
    """The buffered fold: ``v += w (|f - y|^2 - v)``, invalid rows at the round's worst valid error, dims can change."""
    rng = np.random.default_rng(3)
    tc = TrustClasses(N, 2)
    expected = np.zeros(N)
    for d in (3, 3, 1, 2):
        f = rng.normal(size=(N, d))
        f[1, 0], f[4, -1] = np.nan, 2e50
        y = rng.normal(size=d)
        sq = ((f - y) ** 2).sum(axis=1)
        ok = np.isfinite(sq) & (np.abs(f) <= 1e50).all(axis=1)
        sq[~ok] = sq[ok].max()
        expected += tc.weight * (sq - expected)
        tc.observe(f, y)
        np.testing.assert_array_equal(tc.errors, expected)
    tc.observe(np.full((N, 2), np.nan), np.zeros(2))  # no valid forecast: nothing moves
    np.testing.assert_array_equal(tc.errors, expected)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_pipeline_run_on_a_view_of_its_own_arrays(backend):
    rng = np.random.default_rng(5)
    a, b = Pipeline(N, 1, backend=backend, threads=1), Pipeline(N, 1, backend=backend, threads=1)
    y = rng.normal(size=6)
    a.run(y)
    b.run(y)
    for view in (lambda p: p.signals[:, 0], lambda p: p.states[:4, 0], lambda p: p.mixture):
        got = a.run(view(a)).copy()
        np.testing.assert_array_equal(got, b.run(view(b).copy()))
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_array_equal(a.squared_errors, b.squared_errors)


# --------------------------------------------------------------------------- processes
def _in_child(fn, tmp_path, timeout=60.0):
    """Run ``fn()`` in a forked child; return ``(result, warning messages)`` or fail if it dies or hangs."""
    path = tmp_path / "child.pickle"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn()
            payload = pickle.dumps((result, [str(w.message) for w in caught]))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload, code = pickle.dumps(("raised", repr(exc))), 1
        path.write_bytes(payload)
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hangs")
        time.sleep(0.02)
    assert os.WIFEXITED(status), f"the forked child was killed by signal {os.WTERMSIG(status)}"
    result = pickle.loads(path.read_bytes())
    assert os.WEXITSTATUS(status) == 0, result
    return result


@pytest.mark.skipif(not hasattr(os, "fork") or available_threads() < 2, reason="needs fork and two threads")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_a_process_forked_after_parallel_steps_steps_on_one_thread(backend, tmp_path):
    """GNU OpenMP cannot run in a child forked after its threads started (Numba kills it, libgomp hangs it)."""
    n = 2 * 4096 + 3
    s = np.sin(np.arange(n * 2.0)).reshape(n, 2)

    def run(pop=None):
        pop = pop or Population(GAME, n, 2, backend=backend, threads=2, parallel_threshold=1)
        for _ in range(3):
            pop.step(s)
        pipe = Pipeline(n, 1, threads=2, parallel_threshold=1) if backend == "numba" else None
        return pop.states.copy(), None if pipe is None else pipe.run(s[:5, 0]), pop.threads_used

    inherited = Population(GAME, n, 2, backend=backend, threads=2, parallel_threshold=1)
    parent = run()  # the parent's OpenMP threads start here
    assert parent[2] == 2
    for fn in (run, lambda: run(inherited)):  # built in the child, and inherited through fork with threads=2
        (states, preds, used), messages = _in_child(fn, tmp_path)
        np.testing.assert_array_equal(states, parent[0])
        if preds is not None:
            np.testing.assert_array_equal(preds, parent[1])
        assert any("forked after OpenMP threads had started" in m for m in messages), messages


def test_an_interrupted_output_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C while ``memoa run`` plots: exit 130 and one line, as during the run; no ``.r.json.*.tmp`` left behind."""
    import memoa_fast.timeseries.experiment as experiment
    from memoa_fast.timeseries.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "plot_result", interrupted)
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["run", "--clients", "10", "--rounds", "50", "--quiet", "--policies", "memoa", "--json", str(js), "--plot", str(png)])
    assert code == 130 and capsys.readouterr().err.strip() == "memoa: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_population_state_is_not_read_or_replaced_during_a_step(signals):
    """A snapshot taken while another thread steps would mix two rounds' rows (seen: 2 torn of 100 steps of 2e6 agents)."""
    labels = np.arange(N) % 2
    game = Game(q=[1.0, 2.0], kappa=[1.0, 1.0], r=[0.1, 0.1], gamma=0.9, shares=[0.5, 0.5])
    pop = Population(game, N, D, labels=labels, backend="numpy")
    pop.step(signals)
    before = pop.state_dict()
    calls = {"state_dict": pop.state_dict, "pickle": lambda: pickle.dumps(pop), "copy": lambda: copy.copy(pop),
             "load_state_dict": lambda: pop.load_state_dict(before), "reset": pop.reset,
             "set_labels": lambda: pop.set_labels(labels[::-1].copy()), "set_game": lambda: pop.set_game(game.with_weights(q=[3.0, 1.0]))}
    with pop._exclusive:  # another thread is inside a step
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="Population is being used by another thread"):
                call()
    _assert_same(pop.state_dict(), before)
    for call in calls.values():  # and every one works once the step is over
        call()


def test_step_predict_reads_the_server_under_its_lock(signals):
    """``step_predict`` reads the server's log-weights: never while another thread updates them, nor after an
    interrupted update (unnormalised between the update's two passes). It used to read them anyway: beside a thread
    updating the server, mixtures of states all 1 came out as far as 0.7 from 1. Now the server's ``RuntimeError``,
    and the population has not moved.
    """
    pop, server = Population(GAME, N, D), Server(N, D)
    pop.step_predict(signals, server)
    before = pop.state_dict()
    with server._exclusive:  # another thread is inside an update
        with pytest.raises(RuntimeError, match="Server is being used by another thread"):
            pop.step_predict(signals, server)
    _assert_same(pop.state_dict(), before)
    server._exclusive.interrupted = "update"  # as an interrupt between update's kernel and its counter leaves it
    with pytest.raises(RuntimeError, match="this Server was interrupted in the middle of update"):
        pop.step_predict(signals, server)
    _assert_same(pop.state_dict(), before)
    server.reset()  # the way back
    pop.step_predict(signals, server)
    assert pop.t == before["t"] + 1


def test_trust_classes_blame_the_argument_of_the_wrong_size():
    """Forecasts of N clients set d: a target of another size is the target's error (it used to name the forecasts)."""
    tc = TrustClasses(N, 2)
    for target in (0.5, np.ones(1), np.ones(N), np.ones(2 * D)):
        with pytest.raises(ValueError, match=r"^target must have shape \(3,\)"):
            tc.observe(np.ones((N, D)), target)
    for forecasts in (np.ones((N + 1, D)), np.ones((D, N)), np.ones((1, N, D))):
        with pytest.raises(ValueError, match=r"^forecasts must have shape"):
            tc.observe(forecasts, np.ones(D))
    assert tc.n_observed == 0 and not tc.errors.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_population_run_on_a_view_of_its_own_states(backend, signals):
    a, b = Population(GAME, N, D, backend=backend), Population(GAME, N, D, backend=backend)
    a.step(signals)
    b.step(signals)
    a.run(np.broadcast_to(a.states, (3, N, D)))
    b.run(np.broadcast_to(b.states.copy(), (3, N, D)))
    np.testing.assert_array_equal(a.states, b.states)
    np.testing.assert_array_equal(a.costs, b.costs)


@pytest.mark.skipif(not hasattr(os, "fork") or available_threads() < 2, reason="needs fork and two threads")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_servers_forecasters_and_scores_inherited_through_fork_run_on_one_thread(backend, tmp_path):
    """A Server (Cython: libgomp hung the child; Numba: killed it), ClientForecasters and SquaredErrors built with two
    threads in the parent, used in a child forked after the parent's OpenMP threads ran: the parent's bits, one thread.
    """
    n = 2 * 4096 + 3
    x = np.cos(np.arange(n * 2.0)).reshape(n, 2)
    y = np.array([0.25, -0.5])

    def use(server, forecasters, scores):
        server.update(x, y)
        mix = server.predict(x)
        signals = forecasters.observe(y).copy()
        total, mean, totals = scores.add(x, y)
        return server.log_weights.copy(), mix.copy(), signals, total, totals.copy()

    def build():
        return (Server(n, 2, backend=backend, threads=2, parallel_threshold=1),
                ClientForecasters(n, 2, backend=backend, threads=2, parallel_threshold=1),
                SquaredErrors(n, 2, backend=backend, threads=2, parallel_threshold=1))

    inherited = build()
    parent = use(*build())  # the parent's OpenMP threads start here
    _, messages = _in_child(lambda: None, tmp_path)
    result, messages = _in_child(lambda: use(*inherited), tmp_path)
    for got, want in zip(result, parent):
        np.testing.assert_array_equal(got, want)
    assert any("forked after OpenMP threads had started" in m for m in messages), messages


def _numba_signatures() -> int:
    """How many specialisations the Numba kernels of the public objects have compiled (or loaded) in this process."""
    from numba.core.registry import CPUDispatcher

    from memoa_fast.kernels import _forecast_numba, _numba, _pipeline_numba

    return sum(len(f.signatures) for module in (_numba, _forecast_numba, _pipeline_numba)
               for f in vars(module).values() if isinstance(f, CPUDispatcher))


@pytest.mark.skipif("numba" not in BACKENDS, reason="needs Numba")
def test_read_only_and_unaligned_inputs_use_the_kernels_already_compiled(signals):
    # Numba compiles every kernel again for each array type: a read-only array (Population.states, broadcast_to) cost
    # 9 s more on its first step with an empty cache (and again per parallel variant). Such inputs now reach the kernels
    # as the writeable aligned type (a view, or a copy of read-only memory), with the same bits and no new compilation.
    series = np.sin(np.arange(7.0))

    def use(step_signals, server_states, targets):
        pop, srv, pipe = Population(GAME, N, D, threads=1), Server(N, D, threads=1), Pipeline(N, 1, threads=1)
        pop.step(step_signals)
        srv.update(server_states, TARGET)
        pipe.run(targets)
        return pop.states.copy(), srv.log_weights.copy(), pipe.squared_errors.copy()

    plain = use(signals, signals, series)
    before = _numba_signatures()
    odd = use(*_odd_forms(signals, series))
    assert _numba_signatures() == before
    for got, want in zip(odd, plain):
        np.testing.assert_array_equal(got, want)


def _odd_forms(signals, series):
    """``signals`` read-only (a view), the server's states as read-only memory, the series unaligned."""
    readonly = signals.view()
    readonly.flags.writeable = False
    frozen = np.frombuffer(signals.tobytes(), dtype=np.float64).reshape(signals.shape)
    raw = np.zeros(series.size * 8 + 1, dtype=np.uint8)[1:]
    unaligned = raw.view(np.float64)
    unaligned[:] = series
    assert not unaligned.flags.aligned and not frozen.flags.writeable
    return readonly, frozen, unaligned


@pytest.mark.parametrize("kind", ["Server", "ClientForecasters", "SquaredErrors"])
def test_server_forecasters_and_scores_are_not_read_or_replaced_during_a_call(kind, signals):
    """As for a Population: state_dict, pickle, copies, load_state_dict and reset never run under another thread's call."""
    if kind == "Server":
        obj = Server(N, D, backend="numpy")
        obj.update(signals, TARGET)
    elif kind == "ClientForecasters":
        obj = ClientForecasters(N, D, backend="numpy")
        obj.observe(TARGET)
    else:
        obj = SquaredErrors(N, D, backend="numpy")
        obj.add(signals, TARGET)
    before = pickle.dumps(obj)
    calls = {"pickle": lambda: pickle.dumps(obj), "copy": lambda: copy.copy(obj), "reset": obj.reset}
    if kind != "SquaredErrors":
        saved = obj.state_dict()
        calls.update(state_dict=obj.state_dict, load_state_dict=lambda: obj.load_state_dict(saved))
    with obj._exclusive:  # another thread is inside a call
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=f"{kind} is being used by another thread"):
                call()
    assert pickle.dumps(obj) == before  # nothing changed
    for call in calls.values():  # and every one works once the call is over
        call()


def test_noisy_last_value_signals_refuse_a_call_during_another_threads_call(signals):
    """A signal source owns state as every stateful object does: ``next``, ``observe`` and ``load_state_dict`` from a
    second thread while one is inside a call raise ``RuntimeError`` and change nothing (on 67547ed it had no lock: two
    threads' ``next`` drew into one buffer and could count one round twice or lose one), and work once it is over.
    """
    src = NoisyLastValueSignals(0, N, 3, dim=D, threads=1)
    src.observe(TARGET)
    saved, first = src.state_dict(), src.next().copy()
    src.load_state_dict(saved)
    calls = {"next": src.next, "observe": lambda: src.observe(-TARGET), "load_state_dict": lambda: src.load_state_dict(saved)}
    with held_by_another_thread(src._exclusive):
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="this NoisyLastValueSignals is being used by another thread"):
                call()
    assert src.t == 0 and np.array_equal(src._y, TARGET)  # nothing changed
    np.testing.assert_array_equal(src.next(), first)  # the same round drawn, bit for bit
    for call in calls.values():
        call()


#: Every public read of each kind's state that returns a value (a copy, a scalar, a state dict, a copy or pickle of the
#: object): the reads that take the object's lock. "TrustPopulation-error" is a TrustPopulation with ``rule="error"``.
_COPIES = ("pickle", "copy", "deepcopy")
_READS = {
    "Population": ("mean_state", "mean_signal", "class_mean_state", "class_mean_signal", "n_valid_signals", "n_finite_signals",
                   "discount", "worst_agent", "regret", "state_dict", *_COPIES),
    "Server": ("weights", "state_dict", *_COPIES),
    "Pipeline": ("weights", "log_weights", "forecaster_weights", "mean_state", "mean_signal", "n_valid_signals",
                 "worst_client", "regret", "last_error_sum", *_COPIES),
    "ClientForecasters": ("weights", "state_dict", *_COPIES),
    "SquaredErrors": _COPIES,
    "TrustClasses": ("classes", "classes_for", *_COPIES),
    "TrustPopulation": ("population", "game", "power", "regret", "worst_agent", *_COPIES),
    "TrustPopulation-error": ("population", "game", "power", "regret", "worst_agent", *_COPIES),
    "NoisyLastValueSignals": ("state_dict", *_COPIES),
}
#: The public properties that take no lock: views of the live buffers (a view cannot refuse: not a snapshot while
#: another thread steps), the round counters (read by a thread monitoring a run) and settings fixed at construction.
_NOT_LOCKED = {
    "Population": {"states", "costs", "labels", "n_classes", "threads_used"},
    "Server": {"log_weights", "threads_used"},
    "Pipeline": {"states", "signals", "costs", "mixture", "squared_errors", "signal_squared_errors", "noise_scales", "t",
                 "n_recorded"},
    "ClientForecasters": {"signals", "noise_scales"},
    "SquaredErrors": {"totals"},
    "TrustClasses": set(),
    "TrustPopulation": {"costs"},
    "TrustPopulation-error": {"costs"},
    "NoisyLastValueSignals": set(),
}


def _readable(kind, signals):
    """``(object, {read: call})``: an object of ``kind`` after a round, and a call for each of its :data:`_READS`."""
    if kind == "Population":
        labels = np.arange(N) % 2
        game = Game(q=[1.0, 2.0], kappa=[1.0, 1.0], r=[0.1, 0.1], gamma=0.9, shares=[0.5, 0.5])
        obj = Population(game, N, D, labels=labels, backend="numpy")
        obj.step(signals)
    elif kind == "Server":
        obj = Server(N, D, backend="numpy")
        obj.update(signals, TARGET)
    elif kind == "Pipeline":
        obj = Pipeline(N, D, backend="numpy")  # alpha > 0: log_weights is computed (a new array), not a view
        obj.run(np.tile(TARGET, (3, 1)))
    elif kind == "ClientForecasters":
        obj = ClientForecasters(N, D, backend="numpy")
        obj.observe(TARGET)
    elif kind == "SquaredErrors":
        obj = SquaredErrors(N, D, backend="numpy")
        obj.add(signals, TARGET)
    elif kind == "TrustClasses":
        obj = TrustClasses(N, 2, reclass=1)
        obj.observe(signals, TARGET)
    elif kind == "NoisyLastValueSignals":
        obj = NoisyLastValueSignals(0, N, 3, dim=D)
        obj.observe(TARGET)
        obj.next()
    else:  # TrustPopulation, both rules (the "error" rule reads its one population)
        obj = TrustPopulation(N, D, n_classes=2, reclass=1, rule="error" if kind.endswith("error") else "minimax",
                              powers=(1.0, 1.5), power=1.0, backend="numpy")
        obj.step(signals)
        obj.observe(TARGET)
    calls = {"pickle": pickle.dumps, "copy": copy.copy, "deepcopy": copy.deepcopy, "state_dict": lambda o: o.state_dict(),
             "classes": lambda o: o.classes(), "classes_for": lambda o: o.classes_for([1.0, 2.0])}
    return obj, {read: calls.get(read, lambda o, read=read: getattr(o, read)) for read in _READS[kind]}


def _comparable(value):
    """A read's value in a form that compares (a copy of an object: its pickle; a population: its state; a game: its dict)."""
    if isinstance(value, Population):
        return value.state_dict()
    if isinstance(value, (Server, Pipeline, ClientForecasters, SquaredErrors, TrustClasses, TrustPopulation,
                          NoisyLastValueSignals)):
        return pickle.dumps(value)
    if isinstance(value, Game):
        return value.to_dict()
    return value


@pytest.mark.parametrize("kind", list(_READS))
def test_every_public_property_is_a_locked_read_a_view_a_counter_or_a_setting(kind):
    """The read cases below cover every public property of each kind but those listed as taking no lock (so that a
    read added later is either tested here or declared a view, a counter or a setting).
    """
    import inspect

    cls = type(_readable(kind, np.zeros((N, D)))[0])
    props = {name for name, v in inspect.getmembers(cls) if isinstance(v, property) and not name.startswith("_")}
    assert props - _NOT_LOCKED[kind] == props & set(_READS[kind]) and _NOT_LOCKED[kind] <= props, kind


@pytest.mark.parametrize("kind, read", [(kind, read) for kind, reads in _READS.items() for read in reads])
def test_every_read_of_the_state_refuses_during_another_threads_call(kind, read, signals):
    """A read that returns a value derived from the state (a copy, a scalar, a state dict, a copy or pickle) returns one
    of a single round, or raises the ``RuntimeError`` a second writer gets: never a mixture of two rounds.

    The kernels release the GIL: on 67547ed the copies and scalars (``Population.mean_state``, ``.discount``,
    ``.regret``..., ``Server.weights``, ``Pipeline.mean_state``..., ``ClientForecasters.weights``,
    ``TrustPopulation.regret``...) were read whatever another thread was writing (``t`` of one round with the mean of
    the other). Another thread holds the object's lock here, as its step would; then an interrupted update's mark: the
    read refuses, as every call does, until ``load_state_dict``/``reset`` (or a copy taken before). Once the hold
    ends the read gives what it gave before.
    """
    obj, reads = _readable(kind, signals)
    call = reads[read]
    name = kind.partition("-")[0]
    before = _comparable(call(obj))
    with held_by_another_thread(obj._exclusive):
        with pytest.raises(RuntimeError, match=f"this {name} is being used by another thread"):
            call(obj)
    _assert_same(_comparable(call(obj)), before)
    obj._exclusive.interrupted = "a step"  # what a step cut short between its first and last write leaves
    with pytest.raises(RuntimeError, match=f"this {name} was interrupted in the middle of a step"):
        call(obj)
    obj._exclusive.interrupted = None
    _assert_same(_comparable(call(obj)), before)


@pytest.mark.parametrize("kind", ["Population", "Server", "Pipeline"])
def test_a_read_takes_no_hold_and_refuses_when_a_call_ran_during_it(kind, signals):
    """A read (``Exclusive.read``) never makes another thread's call refuse: it takes no hold, it checks. A call that
    began, or began and ended, while the read copied makes the read raise (its copy may mix the two rounds); a call of
    this very thread still running (a callback inside it) refuses it as it refuses a writer; a hold that an interrupt
    left behind in this thread (its frame gone, around no write) does not.
    """
    import sys
    import threading

    from memoa_fast import _exclusive

    obj, _ = _readable(kind, signals)
    write = {"Population": lambda: obj.step(signals), "Server": lambda: obj.update(signals, TARGET),
             "Pipeline": lambda: obj.round(TARGET)}[kind]
    ex, done = obj._exclusive, []

    def a_call_meanwhile():  # the read's copy, during which another thread's call runs whole: served
        worker = threading.Thread(target=lambda: done.append(write()))
        worker.start()
        worker.join()
        return 0.0

    with pytest.raises(RuntimeError, match=f"this {kind} is being used by another thread"):
        ex.read(a_call_meanwhile)
    assert len(done) == 1 and not ex._slot and ex.interrupted is None  # the writer was served; no hold left
    with ex:  # a call of this thread, running
        with pytest.raises(RuntimeError, match="here by a call of this very thread"):
            ex.read(float, 1.0)

    def gone():
        return sys._getframe()

    ex._slot[0] = (_exclusive._thread.__dict__, gone())  # what an interrupt inside __exit__ leaves behind
    assert ex.read(float, 2.0) == 2.0
    write()  # the next call takes the hold over (this thread's)
    assert not ex._slot


#: One call of each kind that writes its state (a writer, which holds the object's lock).
_WRITES = {
    "Population": lambda o, s: o.step(s), "Server": lambda o, s: o.update(s, TARGET), "Pipeline": lambda o, s: o.round(TARGET),
    "ClientForecasters": lambda o, s: o.observe(TARGET), "SquaredErrors": lambda o, s: o.add(s, TARGET),
    "TrustClasses": lambda o, s: o.observe(s, TARGET), "TrustPopulation": lambda o, s: o.step(s),
    "TrustPopulation-error": lambda o, s: o.step(s), "NoisyLastValueSignals": lambda o, s: o.next(),
}


def _inside_the_read(kind, read):
    """``(owner, name)`` of a function that ``read`` (a state_dict, copy or pickle of ``kind``) calls while it reads the
    state: on d36c262 under the object's lock, since inside its checked read.
    """
    import memoa_fast._copies as copies
    import memoa_fast.distributed.signals as signals_module
    import memoa_fast.server as server_module
    import memoa_fast.timeseries.forecasters as forecasters_module
    import memoa_fast.timeseries.trust as trust_module

    if read in _COPIES:
        return (trust_module, "_state_copy") if kind.startswith("Trust") else (copies, "own_attributes")
    return {"Population": (Population, "_summary_state"), "Server": (server_module, "server_state"),
            "ClientForecasters": (forecasters_module, "source_settings"),
            "NoisyLastValueSignals": (signals_module, "source_settings")}[kind]


def _a_call_of_another_thread_meanwhile(monkeypatch, owner, name, write):
    """Make ``owner.name`` run ``write()`` whole in another thread (once) before it goes on; returns what that call met:
    ``[None]`` if it was served, ``[exception]`` if it was refused.
    """
    import threading

    real, met = getattr(owner, name), []

    def meanwhile(*args, **kwargs):
        if not met:
            def call():
                try:
                    write()
                    met.append(None)
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    met.append(exc)
            worker = threading.Thread(target=call)
            worker.start()
            worker.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, meanwhile)
    return met


_SNAPSHOTS = [(kind, read) for kind, reads in _READS.items() for read in reads if read in ("state_dict", *_COPIES)]


@pytest.mark.parametrize("kind, read", _SNAPSHOTS)
def test_a_state_dict_copy_or_pickle_never_makes_another_threads_call_refuse(kind, read, signals, monkeypatch):
    """``state_dict``, pickle, ``copy.copy`` and ``copy.deepcopy`` are checked reads, as the other reads: a call of
    another thread that runs while one copies is served, and the read raises the ``RuntimeError`` a second writer gets
    (its copy may mix two rounds). On d36c262 they held the lock: a thread checkpointing or copying an object made the
    stepping thread's call raise "being used by another thread" (and the read returned). Then the read gives the state
    of the round after that call, as an object that made the same calls one after the other.
    """
    obj, reads = _readable(kind, signals)
    call, name = reads[read], kind.partition("-")[0]
    met = _a_call_of_another_thread_meanwhile(monkeypatch, *_inside_the_read(kind, read), lambda: _WRITES[kind](obj, signals))
    with pytest.raises(RuntimeError, match=f"this {name} is being used by another thread"):
        call(obj)
    assert met == [None], met  # the writer was served, never refused because of the read
    assert not obj._exclusive._slot and obj._exclusive.interrupted is None
    monkeypatch.undo()
    twin, _ = _readable(kind, signals)
    _WRITES[kind](twin, signals)
    _assert_same(_snapshot(call(obj)), _snapshot(call(twin)))


def _snapshot(value):
    """:func:`_comparable` of a read's value, a pickle loaded first; a TrustPopulation by its state (its scratch arrays
    are not state: a pickle carries whatever they hold).
    """
    value = pickle.loads(value) if isinstance(value, bytes) else value
    return _trust_snapshot(value) if isinstance(value, TrustPopulation) else _comparable(value)


def test_an_error_of_a_read_that_met_a_call_is_the_busy_error(signals):
    """A read that fails while another thread's call ran meanwhile (it read a state being written: a dict that changed
    size, an index of another round) raises the busy ``RuntimeError``, its error chained; one that overlapped nothing
    raises its own error. On d36c262 the read's own error came out (as if the state were at fault).
    """
    import threading

    pop = Population(GAME, N, D, backend="numpy")
    ex = pop._exclusive

    def fails_meanwhile():
        worker = threading.Thread(target=lambda: pop.step(signals))
        worker.start()
        worker.join()
        raise KeyError("read of a state being written")

    with pytest.raises(RuntimeError, match="this Population is being used by another thread") as info:
        ex.read(fails_meanwhile)
    assert isinstance(info.value.__cause__, KeyError) and pop.t == 1
    with pytest.raises(KeyError, match="no call meanwhile"):
        ex.read(lambda: {}["no call meanwhile"])


def test_a_refused_read_keeps_no_copy_alive(signals, monkeypatch):
    """A read refused after its copy (a call ran meanwhile) drops that copy at once, also while its error is kept (a
    checkpointing thread that keeps its last error, pytest's ``excinfo``). On 4a54a28 the frame of ``Exclusive.read``,
    which the error's traceback keeps, still held the whole state copy.
    """
    import threading
    import weakref

    pop = Population(GAME, N, D, backend="numpy")
    real, copies = Population._summary_state, []

    def summary_state(self, states, costs):  # a whole step of another thread after the copy, before the check
        copies.append(weakref.ref(states))
        worker = threading.Thread(target=lambda: pop.step(signals))
        worker.start()
        worker.join()
        return real(self, states, costs)

    monkeypatch.setattr(Population, "_summary_state", summary_state)
    with pytest.raises(RuntimeError, match="this Population is being used by another thread") as info:
        pop.state_dict()
    assert info.value is not None and pop.t == 1
    assert copies[0]() is None


@pytest.mark.parametrize("kind", ["Population", "Server", "Pipeline", "ClientForecasters", "SquaredErrors",
                                  "NoisyLastValueSignals"])
def test_a_copy_reads_a_subclass_own_attributes_in_its_checked_read(kind, signals, monkeypatch):
    """A pickle or copy reads a subclass's own attributes in the one checked read of its state (on 67547ed they were
    read after the lock was left; on d36c262 under a second hold): a call of another thread meanwhile is served and
    the copy raises; with none, the copy is of the subclass, its own attributes kept.
    """
    import memoa_fast._copies as copies

    obj, _ = _readable(kind, signals)
    sub = type(f"Own{kind}", (type(obj),), {})
    obj.__class__ = sub  # a subclass's object, with an attribute of its own
    obj.history = [1, 2]
    met = _a_call_of_another_thread_meanwhile(monkeypatch, copies, "own_attributes", lambda: _WRITES[kind](obj, signals))
    with pytest.raises(RuntimeError, match=f"this {kind} is being used by another thread"):
        copy.copy(obj)
    assert met == [None]
    clone = copy.copy(obj)
    assert type(clone) is sub and clone.history == [1, 2]


def test_save_checkpoint_overlapping_a_step_raises_and_writes_nothing(signals, tmp_path, monkeypatch):
    """A checkpoint saved from another thread than the stepping one never makes its step (or update) refuse: when one
    overlaps the save's read of the states, the save raises a ``RuntimeError`` that names the object and says to save
    between steps, before anything is written (the file already there is untouched, no temporary left). On d36c262
    the step was refused. The population and the server are read as one round: a step of the population while the
    server's state is read is caught too (a checkpoint of a population of round t + 1 with a server of round t - 1
    would restore a pair no run went through).
    """
    import memoa_fast.server as server_module
    from memoa_fast import load_checkpoint, save_checkpoint

    pop, srv = Population(GAME, N, D, backend="numpy"), Server(N, D, backend="numpy")
    pop.step(signals)
    srv.update(pop.states, TARGET)
    path = tmp_path / "run.npz"
    save_checkpoint(path, pop, srv)
    saved = path.read_bytes()
    for owner, name, write, what in [(Population, "_summary_state", lambda: pop.step(signals), "Population"),
                                     (server_module, "server_state", lambda: srv.update(pop.states, TARGET), "Server"),
                                     (server_module, "server_state", lambda: pop.step(signals), "Population")]:
        met = _a_call_of_another_thread_meanwhile(monkeypatch, owner, name, write)
        with pytest.raises(RuntimeError, match=f"save_checkpoint: .*this {what} is being used by another thread.*save "
                                               "between steps"):
            save_checkpoint(path, pop, srv)
        monkeypatch.undo()
        assert met == [None], met
        assert path.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]
    save_checkpoint(path, pop, srv)  # between steps
    ck = load_checkpoint(path)
    assert (ck.t, ck.server["n_updates"]) == (pop.t, srv.n_updates) == (3, 2)
    np.testing.assert_array_equal(ck.population["states"], pop.states)


def test_save_checkpoint_takes_the_game_with_the_states(signals, tmp_path, monkeypatch):
    """The game a checkpoint records is the one its states were played with: read in the save's checked read, not
    after it. On 4a54a28 it was read after: a ``set_game`` of the stepping thread right after the states were read
    made the save raise ``ValueError`` ("cannot save a checkpoint of this population": its own state blamed as
    another game's). A ``set_game`` during the read is an overlap (the busy ``RuntimeError``).
    """
    import threading

    import memoa_fast.checkpoint as checkpoint
    from memoa_fast import load_checkpoint, save_checkpoint

    other = Game(q=2.0, kappa=1.0, r=0.1, gamma=0.9)
    pop = Population(GAME, N, D, backend="numpy")
    pop.step(signals)
    states, path = pop.states.copy(), tmp_path / "run.npz"
    met = _a_call_of_another_thread_meanwhile(monkeypatch, checkpoint, "_states", lambda: pop.set_game(other))
    with pytest.raises(RuntimeError, match="save_checkpoint: .*this Population is being used by another thread"):
        save_checkpoint(path, pop)
    monkeypatch.undo()
    assert met == [None] and not path.exists()
    pop.set_game(GAME)
    real = checkpoint._states_of_one_round

    def then_set_game(*args):  # the states are read; the stepping thread re-solves its game before the save goes on
        taken = real(*args)
        worker = threading.Thread(target=pop.set_game, args=(other,))
        worker.start()
        worker.join()
        return taken

    monkeypatch.setattr(checkpoint, "_states_of_one_round", then_set_game)
    save_checkpoint(path, pop)
    assert pop.game is other
    ck = load_checkpoint(path)
    assert ck.game.to_dict() == GAME.to_dict() and ck.t == 1
    np.testing.assert_array_equal(ck.population["states"], states)


def test_a_thread_checkpointing_or_copying_never_stops_the_stepping_thread(tmp_path):
    """One thread steps a population and updates its server (200 rounds), another takes state_dicts, deep copies,
    pickles and checkpoints of them meanwhile, switching threads every microsecond. The stepping thread completes every
    round (on d36c262 it died with "being used by another thread"); every read returns a state of one round (the one
    the stepping thread recorded for it) or raises ``RuntimeError``; some of each happen (the stepping thread pauses
    between two rounds four times, for one read of each kind that overlaps nothing).
    """
    import sys
    import threading

    from memoa_fast import load_checkpoint, save_checkpoint

    n, d, rounds = 16, 2, 200
    rng = np.random.default_rng(5)
    signals, targets = rng.normal(size=(rounds, n, d)), rng.normal(size=(rounds, d))
    pop, srv = Population(GAME, n, d, backend="numpy"), Server(n, d, backend="numpy")
    states, weights = {0: pop.state_dict()["states"]}, {0: srv.state_dict()["log_weights"]}
    done, writer_errors = threading.Event(), []
    paused, resume = threading.Event(), threading.Event()

    def step():
        try:
            for k in range(rounds):
                if k % 50 == 25:  # a pause between rounds, for reads that overlap no call (a save takes many rounds' time)
                    resume.clear()
                    paused.set()
                    assert resume.wait(30)
                pop.step(signals[k])
                states[pop.t] = pop.states.copy()
                srv.update(pop.states, targets[k])
                weights[srv.n_updates] = srv.log_weights.copy()
        except BaseException as exc:  # noqa: BLE001 - reported below
            writer_errors.append(exc)
        finally:
            done.set()

    path = tmp_path / "ck.npz"
    reads = {"state_dict": lambda: ("pop", pop.state_dict()), "deepcopy": lambda: ("pop", copy.deepcopy(pop).state_dict()),
             "pickle": lambda: ("srv", pickle.loads(pickle.dumps(srv)).state_dict()),
             "save_checkpoint": lambda: ("ck", save_checkpoint(path, pop, srv) and load_checkpoint(path))}
    served, refused, taken = dict.fromkeys(reads, 0), dict.fromkeys(reads, 0), []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        writer = threading.Thread(target=step)
        writer.start()
        k = 0
        while not done.is_set():
            if paused.is_set():  # the stepping thread waits: one read of each kind, all served
                for name, read in reads.items():
                    taken.append(read())
                    served[name] += 1
                paused.clear()
                resume.set()
            name = list(reads)[k % len(reads)]
            try:
                taken.append(reads[name]())
                served[name] += 1
            except RuntimeError as exc:
                assert "is being used by another thread" in str(exc), exc
                refused[name] += 1
            k += 1
        writer.join()
    finally:
        sys.setswitchinterval(interval)
    assert not writer_errors, writer_errors[0]
    assert pop.t == srv.n_updates == rounds
    for what, value in taken:  # each read: the state the stepping thread recorded for its round
        if what == "pop":
            np.testing.assert_array_equal(value["states"], states[value["t"]])
        elif what == "srv":
            np.testing.assert_array_equal(value["log_weights"], weights[value["n_updates"]])
        else:
            np.testing.assert_array_equal(value.population["states"], states[value.t])
            n_updates = value.server["n_updates"]
            assert n_updates in (value.t - 1, value.t)  # saved between a step and its update, or after both
            np.testing.assert_array_equal(value.server["log_weights"], weights[n_updates])
    assert sum(refused.values()) > 0, (served, refused)  # overlaps happened (hundreds, measured)


@pytest.mark.skipif("numba" not in BACKENDS, reason="needs Numba (its typeof names the compiled specialisation)")
def test_step_and_step_predict_hand_the_kernel_the_same_array_types(signals):
    """Numba compiles ``fused_step`` once per tuple of argument types: ``step`` and ``step_predict`` (whose log-weights,
    ``Server.log_weights``, are a read-only view) must agree, or the first ``step_predict`` after ``step`` compiles the
    whole fused step again (4.5 s serial, as much again parallel, with an empty cache).
    """
    import numba

    pop, srv = Population(GAME, N, D, backend="numpy"), Server(N, D, backend="numpy")
    seen = []
    fused = pop._kernels.fused_step

    class Recording:
        def fused_step(self, *args):
            seen.append(tuple(numba.typeof(a) for a in args if isinstance(a, np.ndarray)))
            return fused(*args)

    pop._kernels = Recording()
    pop.step(signals)
    pop.step_predict(signals, srv)
    pop.step(pop.states)
    assert len(set(seen)) == 1, seen


def test_a_read_only_view_of_a_whole_buffer_reaches_the_kernels_as_that_buffer(signals):
    """``server.update(pop.states, y)``, ``pop.step(forecasters.observe(y))``: the live read-only view of an object's
    whole buffer is passed on as the buffer itself (no new writeable view: NumPy takes ~0.6 us to make one, a tenth
    of a small step); any other read-only view still reads its own values, and the caller's array keeps its flag.
    """
    from memoa_fast._validation import as_float_array

    pop = Population(GAME, N, D, backend="numpy")
    pop.step(signals)
    assert as_float_array("states", pop.states, (N, D)) is pop._x
    assert not pop.states.flags.writeable
    square = np.asfortranarray(signals[:D] + 1.0)  # its transpose is C-contiguous, of the same shape, other bytes
    base = np.zeros((2 * N, D))
    base[:N] = signals
    for view, want in ((square.T, square.T.copy()), (base[:N], signals), (base[N:], np.zeros((N, D))),
                       (base.reshape(N, 2 * D)[:, :D].copy(), base.reshape(N, 2 * D)[:, :D])):
        view = view.view()
        view.flags.writeable = False
        got = as_float_array("x", view, view.shape)
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable and not view.flags.writeable


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_the_certificates_and_run_experiment_refuse_masked_entries_and_read_subclasses_as_plain_arrays():
    # plain_array was called by as_float_array, as_steps and the labels' check, but the certificates and
    # run_experiment read their arrays with np.asarray: a masked entry was read beneath its mask, silently.
    from memoa_fast.certificates import epsilon_nash, policy_costs, policy_gain_matrix
    from memoa_fast.timeseries.experiment import run_experiment

    s = np.linspace(-1.0, 1.0, 2 * N).reshape(N, 2)
    hidden = s.copy()
    hidden[3, 1] = 1e6  # the value beneath the mask
    masked = np.ma.masked_array(hidden, mask=np.arange(2 * N).reshape(N, 2) == 7)
    game = Game(q=[1.0, 2.0], kappa=[1.0, 1.0], r=[0.1, 0.1], gamma=0.9, shares=[0.5, 0.5])
    labels = np.arange(N) % 2
    masked_labels = np.ma.masked_array(labels, mask=np.arange(N) == 2)
    calls = {
        "signals": lambda: policy_costs(GAME, masked, s, horizon=5),
        "initial_states": lambda: policy_costs(GAME, s, masked, horizon=5),
        "agents": lambda: epsilon_nash(GAME, N, s, s, agents=np.ma.masked_array([0, 1], mask=[False, True]), horizon=5),
        "labels": lambda: policy_gain_matrix(game, s, labels=masked_labels),
        "series": lambda: run_experiment(np.ma.masked_array(np.sin(np.arange(12.0)), mask=np.arange(12) == 4), n_clients=2,
                                         policies="memoa", burn_in=2, backend="numpy", threads=1),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name} is a masked array with 1 masked entries"):
            call()
    # np.matrix and a masked array with nothing masked are their plain arrays
    np.testing.assert_array_equal(policy_costs(GAME, np.asmatrix(s), np.ma.masked_array(s), horizon=5),
                                  policy_costs(GAME, s, s, horizon=5))
    np.testing.assert_array_equal(policy_gain_matrix(game, s, labels=np.ma.masked_array(labels)),
                                  policy_gain_matrix(game, s, labels=labels))
