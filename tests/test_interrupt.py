"""Ctrl-C (or any asynchronous exception) during a call: it acts soon, and it never leaves an object silently wrong.

- ``Pipeline.run`` returns to Python between segments of bounded work (an interrupt acted only at the end of
  the whole series: 100 s after Ctrl-C at 1e6 clients x 2e4 rounds), with the bits of one round per value;
- a ``KeyboardInterrupt`` injected at every bytecode of the package's frames during ``Pipeline.round``,
  ``Pipeline.run`` and ``Population.step`` (``sys.settrace`` with opcode events): afterwards the object is either
  (a) at a round boundary (its state that of an uninterrupted object after some rounds, and continuing gives
  the same bits), or (b) refuses every call but ``reset``/``load_state_dict`` with a ``RuntimeError`` that says
  it was interrupted, and works again after one. Python raises an asynchronous exception at a bytecode boundary,
  the likeliest right after a kernel returns, before the counters after it were updated.
"""
import copy
import gc
import os
import signal
import threading
import warnings

import numpy as np
import pytest
from helpers import _bytecodes, _interrupt_at, _trace_package

import memoa_fast
import memoa_fast._exclusive
import memoa_fast.kernels
from memoa_fast import Game, Population, Server
from memoa_fast.timeseries import pipeline as pipeline_module
from memoa_fast.timeseries.forecasters import ClientForecasters, SquaredErrors
from memoa_fast.timeseries.pipeline import Pipeline
from memoa_fast.timeseries.trust import TrustClasses, TrustPopulation

GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
INTERRUPTED = "was interrupted in the middle of"


def _every_interrupt(make, call, check, kernel_stride=1):
    """``check(obj, k)`` after ``call(obj)`` on a fresh ``make()`` interrupted at its k-th bytecode, for every k.

    Returns how many bytecodes ``call`` runs. ``kernel_stride`` > 1 (the NumPy reference backends, thousands of
    bytecodes, every one inside the kernel call and so equivalent for the object) interrupts at every bytecode
    outside the kernel modules and at every ``kernel_stride``-th one inside them: the test stays within a second.
    """
    where = _bytecodes(make, call)
    for k, in_kernel in enumerate(where, start=1):
        if in_kernel and k % kernel_stride:
            continue
        obj = make()
        assert _interrupt_at(k, lambda: call(obj))
        check(obj, k)
    obj = make()
    assert not _interrupt_at(len(where) + 1, lambda: call(obj))
    return len(where)


def test_the_tracer_sees_every_bytecode_of_a_call_after_an_interrupt_inside_a_with_block():
    """The injection above needs the same bytecodes run after run: also after one cut short inside ``with ex:``.

    ``Population.step`` runs its kernel inside ``with self._exclusive:``; an interrupt there runs ``__exit__``
    after the tracer raised. On Python 3.13.0 that stripped ``_step`` of its opcode events for its next call
    (54 of a step's 264 bytecodes could never be interrupted) until the tracer set ``f_trace`` before
    ``f_trace_opcodes``.
    """
    noise = np.ones((4, 2))

    def make():
        return Population(GAME, 4, 2, threads=1)

    def where(frame):
        return frame.f_code, frame.f_lasti

    every = _bytecodes(make, lambda pop: pop.step(noise), where)
    inside = [k for k, (code, _) in enumerate(every, start=1) if code is Population._step.__code__]
    assert len(inside) > 20
    for k in inside[::3]:
        pop = make()
        assert _interrupt_at(k, lambda: pop.step(noise)), k
        again, fresh = [], make()
        _interrupt_at(0, lambda: fresh.step(noise), again, where)
        assert again == every, k


def test_a_collection_due_during_a_traced_call_adds_none_of_its_bytecodes():
    """The tracer counts the call's own bytecodes, whatever garbage waits: a collection inside the call ran the ``__del__``
    of a ``ClientForecasters`` in a garbage cycle (package code) among them, so the count and where an interrupt landed
    depended on the heap's history (one full-suite run failed the test above that way).
    """
    noise = np.ones((4, 2))

    def make(garbage):
        gc.set_threshold(10**6)  # no collection until the traced step
        pop = Population(GAME, 4, 2, threads=1)
        if garbage:  # a cycle only the collector frees
            cycle = [ClientForecasters(2, 1, seed=0, threads=1)]
            cycle.append(cycle)
            del cycle
        return pop

    def step(pop):
        gc.set_threshold(1)  # a collection at the step's first allocation, if the collector runs
        pop.step(noise)

    threshold = gc.get_threshold()
    try:
        clean = _bytecodes(lambda: make(False), step, lambda f: (f.f_code, f.f_lasti))
        dirty = _bytecodes(lambda: make(True), step, lambda f: (f.f_code, f.f_lasti))
    finally:
        gc.set_threshold(*threshold)
    assert dirty == clean


# --------------------------------------------------------------------------- Pipeline
def _pipe_state(pipe):
    """Everything a pipeline carries from one call to the next (its pickle), without the inputs each call rewrites.

    ``_y`` (round's copy of its target) and the round flags ``F_T``, ``F_REWEIGHT``, ``F_UPDATE``, ``F_RECORD``
    are written before they are read by every call; the kernel keeps the others (rule, first client, linear).
    """
    arrays, counters = pipe.__reduce__()[2]["state"]
    k = pipe._kern
    arrays = dict(arrays)
    del arrays["_y"]
    arrays["_flags"] = np.delete(arrays["_flags"], [k.F_T, k.F_REWEIGHT, k.F_UPDATE, k.F_RECORD])
    return arrays, counters


def _same_pipe_state(a, b):
    return a[1] == b[1] and all(np.array_equal(a[0][name], b[0][name]) for name in a[0])


def _refuses_pipeline(pipe, y):
    for call in (lambda: pipe.round(y[0]), lambda: pipe.run(y), lambda: copy.copy(pipe), lambda: pipe.t):
        with pytest.raises(RuntimeError, match=INTERRUPTED):
            call()


@pytest.mark.parametrize("backend, how", [("numba", "round"), ("numba", "run"), ("numpy", "round")])
def test_a_pipeline_interrupted_at_any_bytecode_is_at_a_round_or_refuses(backend, how):
    """(a) or (b) after a KeyboardInterrupt at every bytecode of ``round`` / ``run`` (segments of 2 rounds)."""
    n_rounds = 1 if how == "round" else 5
    y = np.sin(np.arange(2 + n_rounds + 2) / 3.0)
    base = Pipeline(5, seed=2, backend=backend, threads=1)
    base.run(y[:2])
    path = [copy.copy(base)]  # the uninterrupted states after j more rounds
    for v in y[2:]:
        nxt = copy.copy(path[-1])
        nxt.round(v)
        path.append(nxt)
    states = [_pipe_state(p) for p in path]
    final = states[-1]
    ys = y[2:2 + n_rounds]
    seen = set()

    def make():
        pipe = copy.copy(base)
        pipe._segment_rounds = 2
        return pipe

    def call(pipe):
        if how == "round":
            pipe.round(ys[0])
        else:
            pipe.run(ys)

    def check(pipe, k):
        try:
            state = _pipe_state(pipe)
        except RuntimeError as exc:
            assert INTERRUPTED in str(exc), k
            _refuses_pipeline(pipe, ys)
            pipe.reset()  # (b): the way back
            pipe.run(y[:2])
            assert _same_pipe_state(_pipe_state(pipe), states[0]), k
            seen.add("b")
            return
        done = [j for j, s in enumerate(states[:n_rounds + 1]) if _same_pipe_state(state, s)]
        assert done, f"interrupted at bytecode {k}: the pipeline matches no round boundary"
        assert pipe.t == base.t + done[0]
        pipe.run(y[2 + done[0]:])  # continuing gives the same bits
        assert _same_pipe_state(_pipe_state(pipe), final), k
        seen.add(done[0])

    total = _every_interrupt(make, call, check, kernel_stride=1 if backend == "numba" else 10)
    assert total > 20
    if backend == "numba":  # every boundary is reached: before, between the segments, after
        assert seen >= set(range(0, n_rounds + 1, 2)) | {n_rounds}, seen


def test_pipeline_run_in_segments_is_one_round_per_value():
    """Segments of 1, 2 and 3 rounds (as a long series gets), across round 0 and a burn-in: the bits of ``round``."""
    y = np.sin(np.arange(11)[:, None] / 3.0 + np.arange(2)[None, :])
    one = Pipeline(300, 2, seed=5, threads=1)
    expected = np.array([one.round(v, record=t > 3).copy() for t, v in enumerate(y)])
    for step in (1, 2, 3):
        seg = Pipeline(300, 2, seed=5, threads=1)
        seg._segment_rounds = step
        got = np.concatenate([seg.run(y[:4], record=False), seg.run(y[4:])])
        assert np.array_equal(got, expected)
        assert _same_pipe_state(_pipe_state(seg), _pipe_state(one))


def test_pipeline_segments_bound_the_work_of_one_compiled_call(monkeypatch):
    """``run`` calls the kernel once per ``_SEGMENT_WORK / (N d + _ROUND_VALUES)`` rounds, and returns to Python in between."""
    calls = []
    kern = memoa_fast.kernels._pipeline_numba
    inner = kern.run_rounds
    monkeypatch.setattr(kern, "run_rounds", lambda *a: calls.append(a[10].shape[0]) or inner(*a))
    monkeypatch.setattr(pipeline_module, "_SEGMENT_WORK", 10 * (40 * 3 + pipeline_module._ROUND_VALUES))
    pipe = Pipeline(40, 3, seed=1, threads=1)
    pipe.run(np.zeros((25, 3)))
    assert calls == [10, 10, 5]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_ctrl_c_stops_a_long_pipeline_run_soon_and_it_continues():
    """A signal during a long ``run`` acts at the end of the segment it arrives in; the pipeline continues with the same bits.

    Counted in segments, not seconds (a loaded machine stretches seconds, not segments): a thread watches
    ``pipe.t`` from outside the run, sends the signal once the first segment is done (at ``seen``), and the run
    must stop at most two segments later (the one running when the signal arrives, plus one if the run crossed
    a segment boundary between the watcher's read and its signal), before the series' end. On the old code the
    interrupt surfaced only after the whole series (here 20 segments). The handler raises only while the run is
    in progress: a watcher that sees ``t`` move only when a whole-series call ends signals after the run, and its
    KeyboardInterrupt must fail this test, not stop the test session from outside ``pytest.raises``.
    """
    n = 100_000
    pipe = Pipeline(n, seed=1, threads=1)
    seg = pipe._segment_rounds
    T = 20 * seg + 1
    y = np.sin(np.arange(T) / 7.0)
    pipe.run(y[:1])  # compiled and warm
    t0 = pipe.t
    seen, stop, running = [], threading.Event(), [True]

    def interrupt(signum, frame):
        if running:  # after the run: a no-op (the test fails on moved == T - 1 or "DID NOT RAISE")
            raise KeyboardInterrupt

    def watch():
        while pipe.t < t0 + seg:
            if stop.wait(1e-4):  # the run ended some other way: no signal
                return
        seen.append(pipe.t - t0)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, interrupt)
    out = np.full((T - 1, 1), np.nan)
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            try:
                pipe.run(y[1:], out=out)
            finally:
                running.clear()
    finally:
        running.clear()
        stop.set()
        watcher.join(10)
        signal.signal(signal.SIGUSR1, old)
    moved = pipe.t - t0  # rounds of this run, whole segments
    assert seen and seg <= seen[0] <= moved <= seen[0] + 2 * seg and moved % seg == 0 and moved < T - 1, (seg, seen, moved)
    done = pipe.t - 1
    assert not np.isnan(out[:done]).any() and np.isnan(out[done:]).all()
    # the rounds done are the rounds one call makes; the pipeline continues from there
    whole = Pipeline(n, seed=1, threads=1)
    np.testing.assert_array_equal(whole.run(y[:1 + done + 3])[1:1 + done], out[:done])
    pipe.run(y[1 + done:1 + done + 3])
    assert _same_pipe_state(_pipe_state(pipe), _pipe_state(whole))


# --------------------------------------------------------------------------- Population
def _pop_state(pop):
    state = pop.state_dict()
    return state, pop.worst_agent


def _same_pop_state(a, b):
    (sa, wa), (sb, wb) = a, b
    if wa != wb or sa.keys() != sb.keys():
        return False
    return all(np.array_equal(sa[key], sb[key]) if isinstance(sa[key], np.ndarray) else sa[key] == sb[key] for key in sa)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_a_population_interrupted_at_any_bytecode_is_at_a_round_or_refuses(backend):
    """(a) or (b) after a KeyboardInterrupt at every bytecode of ``Population.step`` (and ``run`` of one step)."""
    rng = np.random.default_rng(4)
    signals = rng.normal(size=(4, 6, 2))
    signals[2, 1, 0] = np.nan
    base = Population(GAME, 6, 2, backend=backend, threads=1)
    base.step(signals[0])
    saved = base.state_dict()
    path = [copy.copy(base)]
    for s in signals[1:]:
        nxt = copy.copy(path[-1])
        nxt.step(s)
        path.append(nxt)
    states = [_pop_state(p) for p in path]

    def check(pop, k):
        try:
            state = _pop_state(pop)
        except RuntimeError as exc:
            assert INTERRUPTED in str(exc), k
            for call in (lambda: pop.step(signals[1]), lambda: pop.run(signals[1:2]), pop.state_dict,
                         lambda: copy.copy(pop), lambda: pop.set_game(GAME)):
                with pytest.raises(RuntimeError, match=INTERRUPTED):
                    call()
            pop.load_state_dict(saved)  # (b): the way back
            state = _pop_state(pop)
        done = [j for j, s in enumerate(states[:2]) if _same_pop_state(state, s)]
        assert done, f"interrupted at bytecode {k}: the population matches no round boundary"
        pop.run(signals[1 + done[0]:])
        assert _same_pop_state(_pop_state(pop), states[-1]), k

    calls = [lambda pop: pop.step(signals[1])] + ([lambda pop: pop.run(signals[1:2])] if backend == "numba" else [])
    for call in calls:
        assert _every_interrupt(lambda: copy.copy(base), call, check, kernel_stride=1 if backend == "numba" else 10) > 20


def test_an_interrupted_reset_or_load_refuses_until_one_completes():
    """``reset`` and ``load_state_dict`` cut short are marked themselves (at every bytecode of their writes); completing either clears it."""
    pop = Population(GAME, 6, 2, threads=1)
    pop.step(np.ones((6, 2)))
    saved = pop.state_dict()
    fresh = Population(GAME, 6, 2, threads=1)
    hits = []

    def check(obj, k):
        try:
            state = _pop_state(obj)
        except RuntimeError as exc:
            assert INTERRUPTED in str(exc), k
            hits.append(k)
            obj.reset()
            state = _pop_state(obj)
        assert _same_pop_state(state, _pop_state(fresh)) or _same_pop_state(state, (saved, pop.worst_agent)), k

    assert _every_interrupt(lambda: copy.copy(pop), lambda obj: obj.reset(), check) > 20
    reset_hits = len(hits)
    # load_state_dict: its checks (a thousand bytecodes, nothing written) are not the point; its writes are
    where = _bytecodes(lambda: copy.copy(fresh), lambda obj: obj.load_state_dict(saved))
    for k in range(len(where) - 150, len(where) + 1):
        obj = copy.copy(fresh)
        _interrupt_at(k, lambda: obj.load_state_dict(saved))
        check(obj, k)
    assert reset_hits > 0 and len(hits) > reset_hits


# --------------------------------------------------------------------------- the other stateful objects
def _plain(value):
    """A comparable form of a state: nested dicts, arrays (by their bytes), numbers."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    return value


def _trust_state(tp):
    copy.copy(tp)  # refused (RuntimeError) after an interrupted call, as pickle
    own = {name: getattr(tp, name) for name in ("_signals", "_published_costs", "class_costs", "t", "leader")}
    return {"own": own, "errors": tp.trust.errors, "n": tp.trust.n_observed, "pops": [p.state_dict() for p in tp.populations]}


def _stateful_cases():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 6, 2))
    srv = Server(6, 2, rule="eg", eta=0.3, alpha=0.01, threads=1)
    srv.update(x[0], [0.1, 0.2])
    fc = ClientForecasters(6, 2, seed=3, threads=1)
    fc.observe([0.3, 0.1])
    sq = SquaredErrors(6, 2, threads=1)
    sq.add(x[0], [0.1, 0.2])
    tp = TrustPopulation(6, 2, n_classes=2, reclass=1000, rule="error", threads=1)
    tp.step(x[0])
    tp.observe([0.1, 0.2])
    tc = TrustClasses(6, 2, reclass=1)
    tc.observe(x[0], [0.1, 0.2])
    return {
        # object, its call (i = which round's inputs), its state (RuntimeError when refused), the way back (None: a copy)
        "Server.update": (srv, lambda o, i: o.update(x[i], [0.2, -0.1]), lambda o: o.state_dict(),
                          lambda o, base: o.load_state_dict(base.state_dict())),
        "ClientForecasters.observe": (fc, lambda o, i: o.observe([0.2 * i, -0.1]), lambda o: o.state_dict(),
                                      lambda o, base: o.load_state_dict(base.state_dict())),
        "SquaredErrors.add": (sq, lambda o, i: o.add(x[i], [0.2, -0.1]), lambda o: o.__reduce__()[2]["state"], None),
        "TrustPopulation.step": (tp, lambda o, i: o.step(x[i]), _trust_state, None),
        "TrustPopulation.observe": (tp, lambda o, i: o.observe([0.2 * i, -0.1]), _trust_state, None),
        "TrustClasses.observe": (tc, lambda o, i: o.observe(x[i], [0.2 * i, -0.1]), _trust_classes_state, None),
    }


def _trust_classes_state(tc):
    copy.copy(tc)  # refused (RuntimeError) after an interrupted call, as pickle
    return {"errors": tc.errors, "n": tc.n_observed, "classes": tc.classes()}


@pytest.mark.parametrize("case", ["Server.update", "ClientForecasters.observe", "SquaredErrors.add", "TrustPopulation.step",
                                  "TrustPopulation.observe", "TrustClasses.observe"])
def test_other_objects_interrupted_at_any_bytecode_are_at_a_round_or_refuse(case):
    """The same property for every other stateful object's mutating call (their counters: ``n_updates``, ``t``, ``max_total``)."""
    base, call, state, recover = _stateful_cases()[case]
    base = copy.copy(base)  # a copy's mean state is summed again from its states (the step's own sum may round apart)
    after = [copy.copy(base)]
    call(after[0], 1)
    then = copy.copy(after[0])
    call(then, 2)
    before, after, final = _plain(state(base)), _plain(state(after[0])), _plain(state(then))

    def check(obj, k):
        try:
            now = _plain(state(obj))
        except RuntimeError as exc:
            assert INTERRUPTED in str(exc), k
            with pytest.raises(RuntimeError, match=INTERRUPTED):
                call(obj, 1)
            if recover is None:  # no load_state_dict: a copy taken before is the way back
                return
            recover(obj, base)
            now = _plain(state(obj))
        assert now in (before, after), f"interrupted at bytecode {k}: matches no round boundary"
        if now == before:
            call(obj, 1)
        call(obj, 2)
        assert _plain(state(obj)) == final, k

    assert _every_interrupt(lambda: copy.copy(base), lambda o: call(o, 1), check) > 20


@pytest.mark.parametrize("backend, n", [("numba", 20_000), ("numpy", 400)])
def test_pipeline_progress_is_readable_from_another_thread_during_a_run(backend, n):
    """``t`` read by a monitoring thread during a ``run``: the rounds of the segments done, never an error (as before segments).

    Also with ``backend="numpy"``, whose rounds are marked for the length of the call (it raised "being used by another
    thread" there).
    """
    pipe = Pipeline(n, seed=1, backend=backend, threads=1)
    pipe._segment_rounds = 10
    y = np.sin(np.arange(300) / 7.0)
    pipe.run(y[:1])
    worker = threading.Thread(target=pipe.run, args=(y[1:],))
    seen = []
    worker.start()
    while worker.is_alive():
        seen.append(pipe.t)
    worker.join()
    assert seen == sorted(seen) and len(set(seen)) > 1 and pipe.t == 300
    assert all((t - 1) % 10 == 0 or t == 300 for t in seen)  # segment ends (the last segment is 9 rounds)


def test_reading_the_pipeline_counters_never_takes_its_lock():
    """``t`` and ``n_recorded`` are reads: they never hold the lock, also with a compiled call's counters left to settle.

    A reader holding it (it settled the counters under the lock) made the writer's call that came meanwhile fail
    with "being used by another thread" (a thread monitoring a run; the window is wide after an interrupt).
    """
    y = np.sin(np.arange(8) / 3.0)
    where = _bytecodes(lambda: Pipeline(5, seed=2, threads=1), lambda pipe: pipe.round(y[0]))
    after_kernel = max(k for k, in_kernel in enumerate(where, start=1) if in_kernel) + 1
    for k in (after_kernel, after_kernel + 1):  # right after the kernel returned: its counters not stored yet
        pipe = Pipeline(5, seed=2, threads=1)
        assert _interrupt_at(k, lambda: pipe.round(y[0]))
        held = []
        counts = _trace_package(lambda: (pipe.t, pipe.n_recorded), lambda frame: held.append(bool(pipe._exclusive._slot)))
        assert held and not any(held), k
        assert counts == (1, 0), k
        pipe.run(y[1:])
        whole = Pipeline(5, seed=2, threads=1)
        whole.run(y)
        assert (pipe.t, pipe.n_recorded) == (8, 7) and _same_pipe_state(_pipe_state(pipe), _pipe_state(whole)), k


def _refused_arguments():
    """A call of every stateful object refused by its argument checks (``TypeError``/``ValueError``), and a call that must work after."""
    pop = Population(Game(q=[1.0, 2.0], kappa=1.0, r=0.5, gamma=0.95, shares=[0.5, 0.5]), 4, 1, labels=[0, 1, 0, 1], threads=1)
    srv = Server(4, 1, threads=1)
    fc = ClientForecasters(4, 1, seed=3, threads=1)
    sq = SquaredErrors(4, 1, threads=1)
    tp = TrustPopulation(4, 1, n_classes=2, reclass=1000, threads=1)
    tc = TrustClasses(4, 2)
    pipe = Pipeline(4, seed=1, threads=1)
    ok_pop = lambda: pop.step(np.ones(4))  # noqa: E731
    return [
        (pop, lambda: pop.set_game(GAME), ok_pop),  # one class instead of two
        (pop, lambda: pop.set_game(Game(q=[1.0, 2.0], kappa=1.0, r=0.5, gamma=0.5, shares=[0.5, 0.5])), ok_pop),  # another gamma
        (pop, lambda: pop.set_game("a game"), ok_pop),
        (pop, lambda: pop.set_labels([0, 1, 2, 0]), ok_pop),
        (pop, lambda: pop.step(np.ones(3)), ok_pop),
        (pop, lambda: pop.reset(np.full(4, np.nan)), ok_pop),
        (pop, lambda: pop.load_state_dict({}), ok_pop),
        (srv, lambda: srv.update(np.ones(3), 0.0), lambda: srv.update(np.ones(4), 0.0)),
        (srv, lambda: srv.load_state_dict({}), lambda: srv.update(np.ones(4), 0.0)),
        (fc, lambda: fc.observe(np.nan), lambda: fc.observe(0.5)),
        (fc, lambda: fc.load_state_dict({}), lambda: fc.observe(0.5)),
        (sq, lambda: sq.add(np.ones(3), 0.0), lambda: sq.add(np.ones(4), 0.0)),
        (tp, lambda: tp.step(np.ones(3)), lambda: tp.step(np.ones(4))),
        (tp, lambda: tp.observe(np.nan), lambda: tp.observe(0.5)),
        (tc, lambda: tc.observe(np.ones(4), np.nan), lambda: tc.observe(np.ones(4), 0.5)),
        (tc, lambda: tc.observe(np.ones(3), 0.5), lambda: tc.observe(np.ones(4), 0.5)),
        (pipe, lambda: pipe.round(np.nan), lambda: pipe.round(0.5)),
        (pipe, lambda: pipe.run(np.ones((2, 2))), lambda: pipe.run(np.ones(2))),
    ]


def test_a_call_refused_by_its_argument_checks_leaves_the_object_usable():
    """A refused argument changes nothing, so it never marks the object as interrupted (``set_game`` marked it for good)."""
    for obj, refused, works in _refused_arguments():
        with pytest.raises((TypeError, ValueError)):
            refused()
        assert obj._exclusive.interrupted is None, type(obj).__name__
        works()
        copy.copy(obj)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_hold_of_a_thread_gone_in_a_fork_is_never_taken_over():
    """In a forked child, the threads that were inside a call are gone mid-call: no thread there may enter the object.

    A new thread of the child is very often given the ident of a parent thread that is gone (glibc reuses its
    stack): the hold was taken over by its ident, a torn state used as a clean one (a Pipeline whose kernel was
    half way settled as "nothing moved"). The child's threads must get ``RuntimeError``, as its main thread does.
    """
    ex = memoa_fast._exclusive.Exclusive("Thing")
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with ex:
            inside.set()
            leave.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(30)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (Python >= 3.12)
            pid = os.fork()
        if pid == 0:  # the child: exit code 0 if nobody got in, 1 if a thread did, 3 on any other error
            code = 3
            try:
                entered = []

                def enter():
                    try:
                        with ex:
                            entered.append(threading.get_ident())
                    except RuntimeError:
                        pass

                for _ in range(4):  # a few threads: one of them usually gets the worker's ident
                    th = threading.Thread(target=enter)
                    th.start()
                    th.join()
                enter()
                code = 1 if entered else 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        worker.join()
    with ex:  # in this process the hold ended with the call
        pass


def test_noisy_last_value_signals_interrupted_at_any_bytecode_are_at_a_round_or_refuse():
    """``NoisyLastValueSignals`` (locked since a3341b1, with no interrupted mark): ``next`` and ``observe`` cut short at
    any bytecode leave it at a round boundary (a round cut short is drawn again, the same bits). Its
    ``load_state_dict`` wrote ``y``, then ``t``: cut short between the two it held the loaded ``y`` with the old
    round, neither state, silently. Such a load now marks it: it refuses until a load completes.
    """
    from memoa_fast.distributed import NoisyLastValueSignals

    base = NoisyLastValueSignals(3, 9, seed=5, dim=2)
    base.observe([0.3, -0.2])
    base.next()
    other = copy.copy(base)
    other.observe([1.0, 2.0])
    other.next()
    loaded, saved = other.state_dict(), base.state_dict()
    calls = {"next": lambda o: o.next(), "observe": lambda o: o.observe([0.5, 0.1]),
             "load_state_dict": lambda o: o.load_state_dict(loaded)}
    for name, call in calls.items():
        done = copy.copy(base)
        call(done)
        before, after = _plain(saved), _plain(done.state_dict())

        def check(obj, k):
            try:
                now = _plain(obj.state_dict())
            except RuntimeError as exc:
                assert INTERRUPTED in str(exc) and name == "load_state_dict", (name, k, str(exc))
                with pytest.raises(RuntimeError, match=INTERRUPTED):
                    obj.next()
                obj.load_state_dict(saved)
                now = _plain(obj.state_dict())
            assert now in (before, after), f"{name} interrupted at bytecode {k}: matches no round boundary"

        assert _every_interrupt(lambda: copy.copy(base), call, check) > 5
