"""The Dask engine's population: N agents sharded over the workers of a cluster."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import uuid
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import _backends
from .._exclusive import Exclusive
from .._state import check_population_state, check_source_layout
from .._validation import (
    as_float_array,
    as_steps,
    as_target_array,
    check_bool,
    check_int,
    check_out,
    check_real,
    check_seed,
    issue_notices,
    readonly_view,
)
from ..checkpoint import (
    CheckpointError,
    _check_engines,
    _remove_stale_temporaries,
    _restore_checked,
    check_merged_server,
    end_save_live,
    is_manifest,
    load_checkpoint,
    mark_save_live,
    new_token,
    read_manifest,
    remove_shard_files,
    save_checkpoint,
    shard_folder,
    write_manifest,
)
from ..game import Game
from ..kernels import CHUNK, N_COEF, SIZE, layout, next_discount, used_columns
from ..population import MeanFieldSummary, _check_magnitude, check_labels, first_max, population_shape
from ._comm import (
    DEFAULT_TIMEOUT,
    CommStats,
    ShardLostError,
    closes_when_collected,
    default_client,
    direct_client,
    is_loss,
    payload_nbytes,
    release_closer,
)
from ._shard import Kept, Shard


def shard_bounds(n_agents: int, n_shards: int) -> list[tuple[int, int]]:
    """Split ``[0, n_agents)`` into ``n_shards`` ranges of whole ``CHUNK``-agent blocks.

    Blocks are spread as evenly as possible (shard sizes differ by at most one
    block); every boundary but the last is a multiple of ``CHUNK``, which keeps
    each shard's chunk partials identical to the single-process ones.
    """
    n_agents = check_int("n_agents", n_agents, low=1)
    n_chunks = -(-n_agents // CHUNK)
    n_shards = check_int("n_shards", n_shards, low=1)
    if n_shards > n_chunks:
        raise ValueError(
            f"n_shards={n_shards} is more than the {n_chunks} blocks of {CHUNK} agents in a population of "
            f"{n_agents}: a shard holds whole blocks, so use n_shards <= {n_chunks}"
        )
    edges = [(k * n_chunks) // n_shards for k in range(n_shards + 1)]
    return [(a * CHUNK, min(b * CHUNK, n_agents)) for a, b in zip(edges[:-1], edges[1:])]


def _issue_warnings(answers) -> None:
    """Issue, once each, the warnings the shards' sources gave about a state they accepted (``answers[k]["warnings"]``).

    Every shard checks its own slice, so every shard gives the same warning about the shared part: one is enough.
    """
    issue_notices(notice for answer in answers for notice in answer.get("warnings", ()))


def _added_sums(answers, n_classes: int):
    """The shards' ``state_sums`` answers added up in shard order: ``(sum_i x_i, class sums or None)``."""
    total = sum(a["sum"] for a in answers)
    return total, (None if n_classes == 1 else sum(a["class_sums"] for a in answers))


def _one_caller(call: str, *, of_population: bool = False):
    """Make a public method hold its population's guard for its whole length (:class:`DaskPopulation`: "One caller").

    ``call`` names it in the messages; ``of_population``: a method of an object that belongs to a population (a
    :class:`ShardedStates`, a :class:`~memoa_fast.distributed.DaskServer`), whose ``population`` holds the guard.
    """
    def decorate(method):
        if of_population:
            @functools.wraps(method)
            def held(self, *args, **kwargs):
                return self.population._held(call, method, self, args, kwargs)
        else:
            @functools.wraps(method)
            def held(self, *args, **kwargs):
                if args or kwargs:  # the population's own states as an argument: read before the guard (_gather_own)
                    args, kwargs = self._gather_own(args, kwargs)
                return self._held(call, method, self, args, kwargs)
        return held
    return decorate


class _Lend:
    """``with population._lend():`` (:meth:`DaskPopulation._lend`), restoring the previous lend on exit.

    A plain context manager, not a generator one: a ``KeyboardInterrupt`` arriving inside
    ``contextlib``'s exit before the generator resumed would leave its ``finally`` to run later, at the
    generator's collection, possibly in the middle of another lend, which it would then end.
    """

    __slots__ = ("population", "before")

    def __init__(self, population):
        self.population = population
        self.before = None

    def __enter__(self):
        self.before = self.population._lent
        self.population._lent = self.population._exclusive.held_here()

    def __exit__(self, *exc) -> None:
        self.population._lent = self.before


class ShardedStates:
    """A handle on a :class:`DaskPopulation`'s states, which stay on the workers.

    What :meth:`DaskPopulation.step` returns (the live states, like
    :attr:`Population.states`). A :class:`DaskServer` mixes them where they
    are; ``np.asarray(handle)`` (or :meth:`gather`) copies them to the client.
    Not picklable nor copyable (``TypeError``): a copy of the handle would
    follow the live states, where a copy of :attr:`Population.states` keeps
    the round it was taken at.
    """

    def __init__(self, population: "DaskPopulation"):
        self.population = population

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, d)``."""
        return (self.population.n_agents, self.population.dim)

    @property
    def ndim(self) -> int:
        """2."""
        return 2

    @property
    def dtype(self):
        """float64."""
        return np.dtype(np.float64)

    def __len__(self) -> int:
        return self.population.n_agents

    @_one_caller("ShardedStates.gather", of_population=True)
    def gather(self) -> np.ndarray:
        """The states, copied to the client (N x d x 8 bytes)."""
        return self.population._gather_agents("states", (self.population.n_agents, self.population.dim))

    def __array__(self, dtype=None, copy=None):
        arr = self.gather()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __reduce__(self):
        # copy.copy gave another handle on the same live states (not a snapshot of this round, as a copy of
        # Population.states is), and deepcopy and pickle named the population's save: the states are what is wanted.
        raise TypeError(f"a {type(self).__name__} cannot be pickled or copied: it is a handle on the states that live on "
                        "the workers' shards, which a copy would follow round after round; np.asarray(handle) or "
                        "handle.gather() copies this round's states to the client")

    def __repr__(self) -> str:
        return f"<ShardedStates shape={self.shape} on {self.population.n_shards} shards>"


class DaskPopulation(MeanFieldSummary):
    """N online agents sharded over the workers of a Dask cluster.

    Same model, API and results as :class:`~memoa_fast.Population` (see its
    Notes for the step); the states live on the workers, in shards of whole
    ``CHUNK``-agent blocks, each a Dask actor.

    Parameters
    ----------
    game : Game
        Weights, gains and policy; a K-class game needs ``labels``.
    n_agents : int, optional
        Number of agents N (taken from ``initial_states`` if given).
    dim : int, default 1
        State dimension d (taken from ``initial_states`` if given).
    client : dask.distributed.Client, optional
        The cluster to run on; default: the current default client.
    labels : array_like of int, shape (N,), optional
        The class of each agent (K-class games).
    n_shards : int, optional
        Number of shards, placed round-robin on the workers; default: one per
        worker (at most one per block).
    initial_states : array_like, shape (N, d), optional
        ``x_i(0)``; zeros by default (then nothing of size N is sent).
    signals : callable, optional
        A picklable factory ``signals(lo, hi, seed)`` run on each worker to
        make the shard's signal source (:mod:`memoa_fast.distributed.signals`);
        then ``step()`` takes no signals.
    seed : int, default 0
        Passed to the signal factory; an integer in ``[0, 2**63 - 1]`` (every seeded object's domain).
        The sources of this package record it (and their noise settings) in
        their saved state, so a checkpoint or state of their sources restores
        only onto a population whose sources have the same ones (any shard
        count): another seed is a ``ValueError`` naming it, before anything changes.
    threads : int, optional
        Kernel threads per shard; default: the worker's thread count.
    parallel_threshold : int, default 8192
        Shards smaller than this run on one thread.
    exact : bool, default False
        Gather one partial row per chunk instead of one per shard, which
        makes the run bitwise identical to the single-process Numba one.
    timeout : float, default 600
        Seconds to wait for a shard's answer before declaring it lost.
    direct : bool, default True
        Talk to the shards' workers directly rather than through the
        scheduler (Dask's ``direct_to_workers``): when ``client`` does not
        already, the population opens its own client on the same scheduler
        (closed by :meth:`close`, or when the population is garbage-collected
        without it; a client passed in is never closed). Use False where the
        client cannot reach the workers.

    Notes
    -----
    A step runs the same two kernel passes as :class:`~memoa_fast.Population`
    and costs one round trip: the client sends each shard its signals (or
    nothing, with a worker-side source); each shard runs the signal pass and
    answers with its partial rows (class sums of the valid signals and of
    the states, counts: ``O(K d)`` numbers per shard, whatever N); the client
    merges them with the kernels' own ``merge_signals`` into the mean field
    and the class offsets, and queues the move pass (the per-class
    coefficients and the mean field, ``O(K d)`` numbers), which travels with
    the next message.

    Faults: a shard whose worker is lost (or silent for ``timeout``) raises
    :class:`ShardLostError` naming the shard, its agents, its worker, the
    step and the last checkpoint; the population then refuses to step until
    :meth:`restore` rebuilds the shards on the live workers.

    One caller at a time: a DaskPopulation is not thread-safe, and neither
    are its servers (:class:`~memoa_fast.distributed.DaskServer`), which send
    their messages through it. A step is several messages (the signal pass,
    the client's merge, the move queued for the next message), an update
    too; a call of another thread landing in between (a load, reset or
    restore whose new states the queued move would move with the old
    states' mean field, another step, a server's update) would corrupt the
    run silently. So every public method of the population, of its servers
    and of :class:`ShardedStates` that sends messages or changes the
    client's state holds one guard (:class:`memoa_fast._exclusive.Exclusive`)
    for its whole length, and a second caller, of another thread (or a
    signal handler or callback of the same thread, inside a call), gets
    ``RuntimeError`` at once, naming the call in progress, and nothing
    changes: it never waits (one object per thread is the supported use). A
    call that calls public methods itself (:meth:`run`, :meth:`restore`,
    :meth:`save`...) lends them its hold. The summary's reads that send no
    message (``mean_signal``, ``discount``, ``n_valid_signals``...) hold
    nothing: they check the guard, as one machine's reads check its lock
    (``RuntimeError`` during another thread's call; never a refusal of that
    call). Its :meth:`state_dict`, :meth:`save` and
    :func:`~memoa_fast.save_checkpoint` send messages, so they hold the guard:
    unlike one machine's objects, whose state_dict, copies and pickles only
    check their lock, a thread saving a DaskPopulation makes another thread's
    step meanwhile refuse (save from the thread that steps it, between
    steps). A move queued by a step is sent
    with the next call, whichever it is: by then the step has returned. The
    interrupt marks are unchanged: a call cut short between its first and
    last write still leaves a population that refuses every call until
    :meth:`load_state_dict`, :meth:`reset` or :meth:`restore`. :meth:`close`
    is refused too while another thread is inside a call, so is the exit of
    a ``with`` block then: its ``RuntimeError`` replaces an exception the
    block raised (which stays its ``__context__``), and the shards stay until
    a later :meth:`close` or the collection of the population.

    Not picklable nor copyable (``TypeError``, as for its servers): a copy
    would drive the same shards with its own round count. Save it
    (:meth:`save`, :func:`~memoa_fast.save_checkpoint`) and restore the file
    into a new population instead.
    """

    backend = "numba"

    def __init__(
        self,
        game: Game,
        n_agents: int | None = None,
        dim: int | None = None,
        *,
        client=None,
        labels=None,
        n_shards: int | None = None,
        initial_states=None,
        signals=None,
        seed: int = 0,
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
        exact: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        direct: bool = True,
    ):
        # One caller at a time (see the class docstring): the hold of the call in progress, the name of that call,
        # and the hold it lends to the public calls it makes itself (_lend).
        self._exclusive = Exclusive("DaskPopulation")
        self._calling: str | None = None
        self._lent = None
        self.n_agents, self.dim = population_shape(game, n_agents, dim, initial_states)
        x0 = None
        if initial_states is not None:
            x0 = as_float_array("initial_states", initial_states, (self.n_agents, self.dim))
            _check_magnitude("initial_states", x0)
        if signals is not None and not callable(signals):
            raise TypeError(f"signals must be a factory signals(lo, hi, seed) returning a signal source, got {signals!r}")
        self._lay = layout(game.n_classes, self.dim)
        self._labels = check_labels(labels, self.n_agents, game.n_classes)
        self._coef = np.zeros((game.n_classes, N_COEF))
        self._set_game(game)
        self._set_sizes()
        self.signal_factory = signals
        self.seed = check_seed("seed", seed)
        self.threads = None if threads is None else check_int("threads", threads, low=1)
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.exact = check_bool("exact", exact)
        direct = check_bool("direct", direct)
        self.timeout = check_real("timeout", timeout, low=0.0, low_open=True)
        self._kernels = _backends.load("numba")  # the client merges with the kernels' own merges
        self.client = default_client(client)
        self._own_client = None
        self._own_client_closer = None
        if direct and not self.client.direct_to_workers:
            own = direct_client(self.client, self.timeout)
            # Dropped without close(), the population closes the client it opened when it is collected (never one
            # it was given): left open, that client reconnects in the background once its cluster is gone.
            try:
                self._own_client_closer = closes_when_collected(self, own, min(self.timeout, 30.0))
            except BaseException:
                own.close(timeout=self.timeout)
                raise
            self._own_client = own
        self.comm = CommStats()
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step: int | None = None
        self._servers: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
        self._pending: list = []
        # (thread, tokens) set by restore() for its own load (in its thread) of the state its new shards' sources checked
        self._sources_checked = None
        self._broken: str | None = None
        self._lost_shard: int | None = None
        # Set for the length of a message to the shards (the op's name) and of a mutating call (what it does):
        # left set by an interrupt, it makes every call refuse (see _check_usable).
        self._in_flight: str | None = None
        self._interrupted: str | None = None
        self._handle = ShardedStates(self)
        self._field = np.zeros((self._lay.field_rows, self.dim))
        self._stale_means = False
        self._n_valid = 0
        self.t = 0
        self._discount = 1.0
        self._actors: list = []
        try:
            self._build(n_shards, x0)
        except BaseException:
            self.close()
            raise
        self._interrupted = None

    def _unpack(self, parts, part) -> np.ndarray:
        """The shards' compact rows (:func:`memoa_fast.kernels.used_columns`) back in a full-width work array."""
        rows = np.concatenate(parts)
        work = np.zeros((rows.shape[0], self._lay.width))
        work[:, used_columns(self._lay, part)] = rows
        return work

    # ------------------------------------------------------------------ shards
    def _workers(self) -> list[str]:
        workers = sorted(self._client.nthreads())
        if not workers:
            raise RuntimeError("the Dask cluster has no workers")
        return workers

    def _spawn(self, n_shards):
        """New shards on the live workers (not installed): ``(bounds, workers, futures, actors)``."""
        workers = self._workers()
        n_chunks = -(-self.n_agents // CHUNK)
        n_shards = min(len(workers), n_chunks) if n_shards is None else check_int("n_shards", n_shards, low=1)
        bounds = shard_bounds(self.n_agents, n_shards)
        futures = []
        for k, (lo, hi) in enumerate(bounds):
            worker = workers[k % len(workers)]
            futures.append(
                self._client.submit(
                    Shard, k, lo, hi, self.n_agents, self._lay, self.threads, self.parallel_threshold, self.exact,
                    self.signal_factory, self.seed,
                    actor=True, workers=[worker], allow_other_workers=False, pure=False,
                    key=f"memoa-shard-{k}-{uuid.uuid4().hex}",
                )
            )
        shard_workers = [workers[k % len(workers)] for k in range(len(bounds))]
        # An actor handle binds to the current client when it is made: ours.
        with self._client.as_current():
            actors = [f.result(timeout=self.timeout) for f in futures]
        return bounds, shard_workers, futures, actors

    def _install(self, spawned) -> None:
        self._interrupted = "a restore"  # until the restore (or construction) has written everything
        self.bounds, self.shard_workers, self._futures, self._actors = spawned
        self._pending = []
        self._broken = self._lost_shard = None
        self._in_flight = None  # last: until here (from _release_shards) only a restore goes on

    def _build(self, n_shards, x0, source=None, labels=None) -> list | None:
        """(Re)create the shards on the live workers: zero costs, uniform weights, fresh sources.

        The new shards are made (``n_shards`` checked) and their sources asked
        whether they take ``source`` (a saved state about to be loaded) before
        the current ones are released: a refused call leaves the population as it was.
        They get ``labels`` (a single-file restore's, about to be loaded), else the client's.
        Returns the tokens of the new shards' kept copies of ``source`` (:meth:`_check_sources`), None if not asked.
        """
        kept = None
        try:
            spawned = self._spawn(n_shards)
            if source is not None and self.signal_factory is not None:
                kept = self._check_sources(source, spawned)
        except Exception as exc:
            if not self._actors:
                self._broken = f"shards could not be created: {exc}"
            raise
        if labels is None:
            labels = self._client_labels(marked=True)  # before the release: the labels of a sharded restore are on the shards
        self._release_shards()
        self._install(spawned)
        args = [(None if x0 is None else x0[lo:hi], None, labels[lo:hi] if labels.shape[0] else None, {}, None)
                for lo, hi in self.bounds]
        self._call(("load", None), per_shard_args=args, marked=True)
        self._restart_servers()
        self._field[...] = 0.0
        self._unsignalled = None  # see MeanFieldSummary._unsignalled_classes
        if x0 is not None:
            self._refresh_means(x0)
        return kept

    def _restart_servers(self) -> None:
        """Every server of this population back to round 0 (uniform weights on the new shards, update count 0)."""
        for server in list(self._servers.values()):
            server._reset()

    @property
    def n_shards(self) -> int:
        """How many shards hold the agents."""
        return len(self.bounds)

    @property
    def _client(self):
        """The client that holds the shards: our direct one if we opened it."""
        return self.client if self._own_client is None else self._own_client

    def _release_shards(self) -> None:
        self._in_flight = "a replacement of its shards"  # only a restore (or construction) installs new ones
        self._actors = []
        self._futures = []

    @_one_caller("DaskPopulation.close")
    def close(self) -> None:
        """Release the shards (the workers drop their arrays) and our own client, if any. Safe to call twice."""
        self._release_shards()
        if self._own_client is not None:
            self._own_client.close(timeout=self.timeout)
            release_closer(self._own_client_closer)
            self._own_client = None
        self._broken = self._broken or "closed"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        # A copy would drive the same shards with its own round count and mean field, a silent fork; a pickle has no
        # shards to point to. Refused for pickle, copy.copy and copy.deepcopy alike (all three ask for a reduction).
        raise TypeError(f"a {type(self).__name__} cannot be pickled or copied: its states live on the workers' shards, "
                        "which a copy would share; save it with population.save(path) or mf.save_checkpoint(path, "
                        "population), and restore that into a new DaskPopulation")

    # ------------------------------------------------------------------ one caller
    def _held(self, call, method, obj, args, kwargs, depth: int = 2):
        """``method(obj, *args, **kwargs)`` under the guard (:func:`_one_caller`); ``RuntimeError`` at once if it is held.

        The guard is entered here, in this frame, which runs for the whole call: :class:`~memoa_fast._exclusive.Exclusive`
        tells a hold left behind by an interrupt (its frame gone) from a call in progress by it. ``depth``: how many
        frames up from here the caller of the public call is (its wrapper's caller).
        """
        ex = self._exclusive
        lent = self._lent
        if lent is not None and lent is ex.held_here() and self._lends_to(sys._getframe(depth)):
            # A call that this thread's call in progress makes itself (run's step, restore's load_state_dict): under
            # its hold, lent to this one call only, so that what this call runs (a callback) cannot call in again.
            self._lent = None
            try:
                return method(obj, *args, **kwargs)
            finally:
                self._lent = lent
        try:
            ex.__enter__()
        except RuntimeError as exc:
            raise RuntimeError(f"{call} refused, nothing changed: {exc}; it is inside {self._calling or 'a call'}, and "
                               "one caller at a time is served (a DaskPopulation and its servers share one guard)") from None
        try:
            self._calling = call
            return method(obj, *args, **kwargs)
        finally:
            self._calling = None
            ex.__exit__()

    def _lends_to(self, caller) -> bool:
        """Whether a public call made by the frame ``caller`` during a lend is one the call in progress makes itself.

        The package's own code (run's loop, restore's and the checkpoint functions' bodies), or a method of this
        population or of one of its servers (a subclass's override calling ``super()``). Not code that merely runs
        in between: a signal handler, or a callback of a user's object (a source's ``state_dict``, an ``__array__``),
        which would otherwise be served in the middle of a save (the population's state of round t, the server's of
        the next) or a restore.
        """
        if caller.f_globals.get("__name__", "").partition(".")[0] == "memoa_fast":
            return True
        owner = caller.f_locals.get("self") if caller.f_code.co_argcount else None
        return owner is self or any(owner is server for server in self._servers.values())

    def _gather_own(self, args, kwargs):
        """``args``, ``kwargs`` with each :class:`ShardedStates` of this population gathered, before the guard.

        At the top, or one level down in a dict, list or tuple (a state dict's ``"states"``). The handle is an array
        (``__array__``) that a call would otherwise convert inside itself, where its ``gather`` is refused as a
        re-entrant call of this very thread: ``pop.step(pop.resident_states)``, ``pop.reset(pop.step(s))``. Read
        here, it is what ``np.asarray(handle)`` before the call reads.
        """
        for value in (*args, *kwargs.values()):
            if isinstance(value, (ShardedStates, dict, list, tuple)):
                break
        else:
            return args, kwargs  # the common case (arrays, numbers, None): nothing to read, no copy

        def plain(value):
            if isinstance(value, ShardedStates):
                return value.gather() if value.population is self else value
            if type(value) is dict and any(isinstance(v, ShardedStates) for v in value.values()):
                return {k: plain(v) for k, v in value.items()}
            if type(value) in (list, tuple) and any(isinstance(v, ShardedStates) for v in value):
                return type(value)(plain(v) for v in value)
            return value
        return tuple(plain(a) for a in args), {k: plain(v) for k, v in kwargs.items()}

    def _checkpoint_call(self, call, body, *args):
        """``body(*args)``, :func:`~memoa_fast.checkpoint.save_checkpoint`'s or ``restore_checkpoint``'s, as one call.

        Under the guard for its whole length (the population's and the server's state, gathered or loaded one after
        the other, never with another thread's call in between), lent to the calls it makes of them.
        """
        def lent(_):
            with self._lend():
                return body(*args)
        return self._held(call, lent, self, (), {}, depth=3)  # the caller of save_checkpoint / restore_checkpoint

    def _lend(self) -> "_Lend":
        """Within a call that holds the guard: lend its hold to the public calls it makes itself, in this thread.

        Each of them takes it for its own length only (see :meth:`_held`); a token of another hold (one left by an
        interrupt, another thread's) never matches.
        """
        return _Lend(self)

    # ------------------------------------------------------------------ messaging
    def _queue(self, op) -> None:
        """An op for every shard that needs no answer: it travels with the next message."""
        self._pending.append(op)

    def _call(self, op, per_shard_args=None, *, marked: bool = False) -> list:
        """Send the queued ops plus ``op`` to every shard and return each shard's answer, in shard order.

        ``per_shard_args[k]`` replaces ``op``'s arguments for shard k. ``marked``: the caller is a mutating call
        that has set (or, as a restore, may clear) the mark :attr:`_interrupted`, so the mark does not refuse it.

        From the first message sent until every answer is in and the queue is cleared, ``_in_flight`` names
        ``op``: an interrupt (or any exception from here, not from a shard) leaves it set, and the population
        refuses every call until :meth:`restore`, since the shards may have run the message, part of it, or
        not, and not all alike (the queued ops would be sent again, or lost).
        """
        self._check_usable(marked)
        ops = list(self._pending)
        messages = []
        for k in range(len(self._actors)):
            last = op if per_shard_args is None else (op[0], per_shard_args[k])
            messages.append(ops + [last])
        self.comm.bytes_sent += sum(payload_nbytes(m) for m in messages)
        self._in_flight = f"a message to its shards ({op[0]!r})"
        results = self._exchange(op, ops, messages)
        del self._pending[:len(ops)]  # a finalizer may have queued more meanwhile
        self._in_flight = None
        self.comm.round_trips += 1
        self.comm.bytes_received += sum(payload_nbytes(r) for r in results)
        return results

    def _exchange(self, op, ops, messages) -> list:
        """:meth:`_call`'s round trip: the answers, or the first shard's failure raised."""
        try:
            futures = [actor.run(msg) for actor, msg in zip(self._actors, messages)]
        except RuntimeError as exc:  # the proxy refuses calls once its worker is known lost
            self._lost(0, exc, find_lost=True)
        results, failures = [], []
        deadline = time.monotonic() + self.timeout
        for k, fut in enumerate(futures):
            try:
                results.append(fut.result(timeout=max(deadline - time.monotonic(), 0.001)))
            except BaseException as exc:  # noqa: BLE001 - a failure may leave the shards inconsistent
                failures.append((k, exc))
                results.append(None)
        if failures:
            k, exc = failures[0]
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: _in_flight stays set
                raise exc
            if is_loss(exc, self.shard_workers[k] in self._workers_or_empty()):
                self._lost(k, exc)
            # A read-only op that failed after every queued op completed (on every shard that failed) changed nothing
            # live: the population stays usable (a save that a worker could not write does not end the run).
            harmless = op[0] in Shard.READ_ONLY and all(
                getattr(e, "shard_ops_done", None) == len(ops) for _, e in failures)
            if not harmless:
                self._broken = f"shard {k} failed: {type(exc).__name__}: {exc}"
            lo, hi = self.bounds[k]
            exc.add_note(f"in shard {k} (agents [{lo}, {hi})) on worker {self.shard_workers[k]}, step {self.t}")
            if harmless:
                del self._pending[:len(ops)]
                self._in_flight = None
            raise exc
        return results

    @_one_caller("DaskPopulation.flush")
    def flush(self) -> None:
        """Send the queued ops now (they are sent with the next call anyway)."""
        if self._pending:
            self._call(("info", ()))

    def _check_usable(self, marked: bool = False) -> None:
        """Raise unless the population can take a call: not lost, broken, or left mid-message or mid-update by an interrupt.

        ``marked``: the caller holds (or restores over) the mark of a mutating call, which then does not refuse it.
        """
        if self._lost_shard is not None:
            k = self._lost_shard
            lo, hi = self.bounds[k]
            raise ShardLostError(
                f"this DaskPopulation is unusable: {self._broken}; {self._resume_hint()}",
                shard=k, lo=lo, hi=hi, worker=self.shard_workers[k], step=self.t, checkpoint=self.last_checkpoint,
            )
        if self._broken is not None:
            raise RuntimeError(f"this DaskPopulation is unusable ({self._broken}); {self._resume_hint()}")
        if self._in_flight is not None:
            raise RuntimeError(
                f"this DaskPopulation was interrupted in the middle of {self._in_flight} (KeyboardInterrupt, or "
                "another exception on the client): its shards may have run it, part of it or not, not all alike, so it "
                f"refuses every call until restore() rebuilds them; {self._resume_hint()}"
            )
        if self._interrupted is not None and not marked:
            raise RuntimeError(
                f"this DaskPopulation was interrupted in the middle of {self._interrupted} (KeyboardInterrupt, or "
                "another exception, between its first and last write): its state may be partly updated, so it refuses "
                "every call until restored: load_state_dict(...) of a state_dict taken before, reset(), or restore(); "
                f"{self._resume_hint()}"
            )

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was saved by this population, so the run must start over"
        return (
            f"the last good checkpoint is {self.last_checkpoint!r} (step {self.last_checkpoint_step}): "
            f"resume with population.restore({self.last_checkpoint!r}, server=...)"
        )

    def _lost(self, k, exc, find_lost=False):
        if find_lost:
            alive = set(self._workers_or_empty())
            k = next((i for i, w in enumerate(self.shard_workers) if w not in alive), k)
        lo, hi = self.bounds[k]
        worker = self.shard_workers[k]
        self._broken = f"shard {k} (agents [{lo}, {hi})) on worker {worker} was lost at step {self.t}"
        self._lost_shard = k
        message = (
            f"shard {k} (agents [{lo}, {hi})) on worker {worker} was lost at step {self.t} "
            f"({type(exc).__name__}: {exc}); {self._resume_hint()}"
        )
        raise ShardLostError(
            message, shard=k, lo=lo, hi=hi, worker=worker, step=self.t, checkpoint=self.last_checkpoint
        ) from exc

    def _workers_or_empty(self) -> list[str]:
        try:
            return list(self._client.nthreads())
        except Exception:  # noqa: BLE001 - only used to improve an error message
            return []


    # ------------------------------------------------------------------ state
    @_one_caller("DaskPopulation.reset")
    def reset(self, initial_states=None) -> None:
        """Back to round 0: states to ``initial_states`` (zeros if None), costs to 0 (servers are left alone)."""
        x0 = None
        if initial_states is not None:
            x0 = as_float_array("initial_states", initial_states, (self.n_agents, self.dim))
            _check_magnitude("initial_states", x0)
        self._check_usable(marked=True)  # before the mark: a population that cannot reset keeps its mark
        self._interrupted = "a reset"
        self._switch_game(self.game)
        # Zeros are written by the shards: only given states cross the network.
        self._call(("reset", None), per_shard_args=[(None if x0 is None else x0[lo:hi],) for lo, hi in self.bounds],
                   marked=True)
        self._field[...] = 0.0
        self._unsignalled = None  # see MeanFieldSummary._unsignalled_classes
        self._stale_means = False
        if x0 is not None:
            self._refresh_means(x0)
        self._n_valid = 0
        self.t = 0
        self._discount = 1.0
        self._interrupted = None

    def _load_all(self, states, costs, labels=None, source=None, kept=None) -> None:
        """Scatter full arrays (checked by the caller) to the shards.

        ``kept[k]``: the token of shard k's kept copy of its slice of ``source`` (:meth:`_check_sources`), which it is
        not sent again, or None.
        """
        args = [
            (states[lo:hi], costs[lo:hi], None if labels is None else labels[lo:hi], {},
             None if source is None else Kept(kept[k]) if kept is not None and kept[k] is not None
             else _slice_source(source, lo, hi))
            for k, (lo, hi) in enumerate(self.bounds)
        ]
        self._call(("load", None), per_shard_args=args, marked=True)

    @_one_caller("DaskPopulation.set_labels")
    def set_labels(self, labels) -> None:
        """Move agents between classes (K-class games); takes effect at the next step.

        The N labels are sent; the class means come back as each shard's class sums (K d numbers per shard).
        """
        labels = check_labels(labels, self.n_agents, self._lay.n_classes)
        self._check_usable()  # a population that cannot send them keeps its labels (they were replaced, then refused)
        self._interrupted = "set_labels"
        self._labels = labels
        self._set_sizes()
        answers = self._call(("load", None), per_shard_args=[(None, None, self._labels[lo:hi], {}, None)
                                                             for lo, hi in self.bounds], marked=True)
        self._means_from_sums(*_added_sums(answers, self._lay.n_classes))  # marks the field current (the rows are stale)
        self._interrupted = None

    @_one_caller("DaskPopulation.set_game")
    def set_game(self, game: Game) -> None:
        """Play ``game`` from the next step on (as :meth:`Population.set_game <memoa_fast.Population.set_game>`); client-side only."""
        self._check_new_game(game)
        before = self._interrupted  # a population marked by another call stays marked
        self._interrupted = before or "set_game"
        self._switch_game(game)
        self._interrupted = None if before == "set_game" else before

    def _switch_game(self, game: Game) -> None:
        """``_set_game`` by rebinding whole attributes (the new ones made first): an interrupt leaves each one old or new.

        :meth:`reset` and :meth:`load_state_dict` call it with the current game, which makes a game switch cut
        short whole again (the class sizes are never touched).
        """
        coef = np.array(game.table.coef, dtype=np.float64)
        coef[:, SIZE] = self._coef[:, SIZE]
        mix = np.ascontiguousarray(game.table.mix)
        self._coef, self._mix, self.game = coef, mix, game
        self._check_classes_read()

    @property
    @_one_caller("DaskPopulation.states")
    def states(self) -> np.ndarray:
        """``x(t)``, shape (N, d), gathered from the workers (a read-only copy: N x d x 8 bytes cross the network)."""
        return readonly_view(self._gather_agents("states", (self.n_agents, self.dim)))

    @property
    def resident_states(self) -> "ShardedStates":
        """The live states as a handle that stays on the workers (what :meth:`step` returns)."""
        return self._handle

    @property
    @_one_caller("DaskPopulation.costs")
    def costs(self) -> np.ndarray:
        """Discounted online costs ``J_i``, gathered (a read-only copy)."""
        return readonly_view(self._gather_agents("costs", (self.n_agents,)))

    def _worst(self) -> tuple[float, int]:
        """The largest cost and its first agent as :attr:`Population.worst_agent`: a NaN never larger; every cost NaN: ``numpy.argmax``."""
        best, arg = -np.inf, -1
        for value, index in self._call(("worst", ())):
            if value > best:
                best, arg = value, index
        if arg < 0:  # no cost above -inf (every one NaN): as the one-machine fallback
            costs = self._gather_agents("costs", (self.n_agents,))
            arg = first_max(costs)
            best = float(costs[arg])
        return best, arg

    @property
    @_one_caller("DaskPopulation.worst_agent")
    def worst_agent(self) -> int:
        """Index of the agent with the largest online cost (first one on ties, a NaN never larger; 0 if every cost is NaN).

        2 numbers per shard (every cost gathered when every cost is NaN).
        """
        return self._worst()[1]

    @property
    @_one_caller("DaskPopulation.regret")
    def regret(self) -> float:
        """Under-performer regret ``max_i J_i``: the cost of :attr:`worst_agent`; 2 numbers per shard (see there)."""
        return float(self._worst()[0])

    def _gather_agents(self, what, shape, sid=None) -> np.ndarray:
        out = np.empty(shape)
        for (lo, hi), part in zip(self.bounds, self._call(("gather", (what, sid)))):
            out[lo:hi] = part
        return out

    # ------------------------------------------------------------------ step
    @_one_caller("DaskPopulation.step")
    def step(self, signals=None) -> "ShardedStates":
        """Advance every agent one round.

        Parameters
        ----------
        signals : array_like, shape (N, d), optional
            ``s_i(t)`` from the client (N x d numbers are then sent); None
            when the shards generate them (``signals=`` factory at construction).

        Returns
        -------
        ShardedStates
            The live states, a handle on the workers.
        """
        self._check_usable()
        self._refuse_step()
        if signals is None:
            if self.signal_factory is None:
                raise ValueError(
                    "step() without signals needs a worker-side signal source: create the population with "
                    "signals=factory (called on each worker as factory(lo, hi, seed)), or pass signals of shape (N, d)"
                )
            self._interrupted = "a step"
            rows = self._call(("signal_pass", (None,)), marked=True)
        else:
            s = as_float_array("signals", signals, (self.n_agents, self.dim), allow_nonfinite=True)
            self._interrupted = "a step"
            rows = self._call(("signal_pass", None), per_shard_args=[(s[lo:hi],) for lo, hi in self.bounds], marked=True)
        work = self._unpack(rows, "step")
        flags = self._unsignalled_classes()
        read = self._silent_and_read(flags)
        if read is not None:  # a class with no signal yet that MEMOA's anchor reads: left out of it, as on one machine
            self._stand_in_for_silent_classes(work, read)
        if flags is not None and flags.any():
            flags = flags & (self._class_counts(work) == 0)
        # The state columns hold the sums of the current states (the shards' last move pass, or a fresh
        # sum after a load): the same numbers one machine's merge_move turns into m(t).
        self._n_valid = self._kernels.merge_signals(work, self._lay, self._coef, self._mix, self._field, True)
        self._queue(("move", (self._coef.copy(), self._field.copy(), self._discount)))
        self._stale_means = True
        self.t += 1
        self._unsignalled, self._unsignalled_t = flags, self.t
        self._discount = next_discount(self._discount, self.game.gamma, self.t)
        self._interrupted = None  # the last write: an interrupt before it leaves the population refusing
        return self._handle

    @_one_caller("DaskPopulation.step_predict")
    def step_predict(self, signals, server, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`step`, then the mixture ``server`` would publish for the new states, as on one machine.

        :meth:`step` followed by ``server.predict()`` (one more round trip of ``O(d)`` numbers per shard; one
        machine sums the mixture inside the step's pass, and the two agree to ``1e-12`` of
        ``sum_i p_i |x_i(t+1)|``: see :meth:`Population.step_predict <memoa_fast.Population.step_predict>`).
        The server (also whether an interrupted update left it refusing) and ``out`` are checked before the step: a
        refused call changes nothing.

        Parameters
        ----------
        signals : array_like, shape (N, d), or None
            As for :meth:`step` (None with a worker-side signal source).
        server : DaskServer
            A server of this population (:class:`~memoa_fast.distributed.DaskServer`); only read.
        out : numpy.ndarray, shape (d,), optional
            Where to write ``yhat(t+1)`` (no allocation); a new array otherwise.

        Returns
        -------
        numpy.ndarray
            ``yhat(t+1)``, shape (d,).
        """
        if getattr(server, "population", None) is not self:  # a DaskServer knows its population (server.py imports this)
            raise TypeError(f"server must be a DaskServer built on this population (DaskServer(population)), got {server!r}")
        if out is not None:
            check_out(out, (self.dim,))
        server._check_usable()  # an interrupted server refuses now, before the population moves (as on one machine)
        with self._lend():
            self.step(signals)
        return server._predict(out)

    @_one_caller("DaskPopulation.observe")
    def observe(self, target) -> None:
        """Give the worker-side signal sources the stream's newest value (d numbers per shard, sent with the next message).

        ``target`` has shape (d,) and is finite with ``|y| <= TARGET_LIMIT`` (``1e30``), as for every object that
        learns from a stream; a population without a ``signals=`` factory refuses the call (``ValueError``).
        """
        if self.signal_factory is None:
            raise ValueError(
                "observe() feeds the worker-side signal sources, and this population has none: create it with "
                "signals=factory (called on each worker as factory(lo, hi, seed)) to use observe()"
            )
        # The rule of every object that learns from a stream: a value the sources refuse is refused here, before it is queued.
        y = as_target_array("target", target, (self.dim,))
        self._check_usable()
        self._queue(("observe", (y.copy(),)))

    @_one_caller("DaskPopulation.run")
    def run(self, signals=None, *, steps: int | None = None) -> "ShardedStates":
        """Step through ``signals`` of shape (T, N, d) (or (T, N) when d = 1), or ``steps`` times on worker-side signals.

        Exactly one of the two is given (both, or neither, is a ``ValueError``: one would be ignored).
        """
        if (signals is None) == (steps is None):
            raise ValueError("run() takes signals of shape (T, n_agents, dim) or steps= (a count of steps on worker-side "
                             f"signals), exactly one of them; got {'both' if steps is not None else 'neither'}")
        with self._lend():
            if signals is not None:
                signals = as_steps("signals", signals)
                self._refuse_steps(signals.shape[0])  # a run that cannot be taken whole is not begun
                for s in signals:
                    self.step(s)
            else:
                steps = check_int("steps", steps, low=0)
                self._refuse_steps(steps)
                for _ in range(steps):
                    self.step()
        return self._handle

    def _client_labels(self, marked: bool = False) -> np.ndarray:
        """The labels on the client: after a sharded restore of a K-class game they are only on the shards.

        The client holds a copy of the labels whenever it had them anyway (given
        to the constructor or :meth:`set_labels`, or in a state it loaded); a
        sharded restore leaves them where the shards read them (the client
        moves ``O(shards)`` bytes: the class sizes come from the shards'
        answers). The calls that need them on the client move ``O(N)`` numbers
        anyway (:attr:`labels`, :meth:`state_dict`, :meth:`reset` to given
        states, a single-file save): the first of them gathers them (N x 8
        bytes), once.
        """
        if self._labels is None:
            labels = np.empty(self.n_agents, dtype=np.int64)
            for (lo, hi), part in zip(self.bounds, self._call(("gather", ("labels", None)), marked=marked)):
                labels[lo:hi] = part
            self._labels = labels
        return self._labels

    @property
    @_one_caller("DaskPopulation.labels")
    def labels(self) -> np.ndarray:
        """The class of every agent, shape (N,), read-only (zeros when K = 1); after a sharded restore, gathered once."""
        self._client_labels()
        return MeanFieldSummary.labels.fget(self)

    def _refresh_means(self, states) -> None:
        self._client_labels(marked=True)  # within a reset, load or restore (which hold the mark)
        super()._refresh_means(states)

    def _means_from_sums(self, total, class_sums) -> None:
        """As on one machine; the field then holds the means of the current states (not of the last move pass's)."""
        super()._means_from_sums(total, class_sums)
        self._stale_means = False

    @property
    @_one_caller("DaskPopulation.mean_state")
    def mean_state(self) -> np.ndarray:
        """``m(t)``, the mean of the current states; after a step, one round trip of ``O(K d)`` numbers per shard."""
        self._refuse_interrupted()  # also when the field is current (no message, whose check would refuse)
        return self._current_means()

    def _current_means(self) -> np.ndarray:
        """:attr:`mean_state` (the field made current first, if stale), for the caller that holds the guard."""
        if self._stale_means:
            # The shards' last move pass left the sums of the moved states in their rows: the kernels'
            # merge_move turns them into m(t+1), as on one machine.
            rows = self._unpack(self._call(("rows", ())), "step")
            lay, K = self._lay, self._lay.n_classes
            self._kernels.merge_move(rows, lay, self._coef, self._field, False, np.empty(self.dim))
            self._field[lay.class_state:lay.class_state + K] = self._field[lay.class_next:lay.class_next + K]
            self._field[lay.field_state] = self._field[lay.field_next]
            self._stale_means = False
        return self._field[self._lay.field_state].copy()

    @property
    @_one_caller("DaskPopulation.class_mean_state")
    def class_mean_state(self) -> np.ndarray:
        """``m_l(t)``, the mean state of each class, shape (K, d) (see :attr:`mean_state`)."""
        self._refuse_interrupted()
        self._current_means()
        return self._class_mean_state()

    # The other reads of the summary send no message: checked against the guard, as one machine's reads against its
    # lock (Exclusive.read), never holding it, so that a thread monitoring a run cannot make its step refuse; the
    # guard's message names the call.
    def _refuse_interrupted(self) -> None:
        """``RuntimeError`` after an interrupted call (its mark, or a message cut off), as one machine's reads: half updated."""
        if self._interrupted is not None or self._in_flight is not None:
            self._check_usable()

    def _read(self, call: str, fn):
        """``fn()``, a read of the client-side summary: a value of one round, or ``RuntimeError``; takes no hold.

        ``RuntimeError`` if a call held the guard before or after ``fn`` or ran meanwhile (:meth:`Exclusive.read
        <memoa_fast._exclusive.Exclusive.read>`), and after an interrupted call. A read the call in progress makes
        itself (a call lent the hold, see :meth:`_held`) is served, as its other calls are.
        """
        ex = self._exclusive
        lent = self._lent
        if lent is not None and lent is ex.held_here() and self._lends_to(sys._getframe(2)):
            value = fn()  # under the hold of this thread's call in progress, which made it
        else:
            try:
                value = ex.read(fn)
            except RuntimeError as exc:
                raise RuntimeError(f"{call} refused, nothing changed: {exc}; it is inside {self._calling or 'a call'}, "
                                   "and one caller at a time is served (a DaskPopulation and its servers share one "
                                   "guard)") from None
        self._refuse_interrupted()  # a mark set before the read stays (only a restore, a call, clears it)
        return value

    @property
    def mean_signal(self) -> np.ndarray:
        """``sbar``, the mean of the last step's valid signals (kept when none was valid); a copy."""
        return self._read("DaskPopulation.mean_signal", self._mean_signal)

    @property
    def class_mean_signal(self) -> np.ndarray:
        """``sbar_l``, each class's mean valid signal of the last step, shape (K, d); a copy (see :attr:`Population.class_mean_signal`)."""
        return self._read("DaskPopulation.class_mean_signal", self._class_mean_signal)

    @property
    def n_valid_signals(self) -> int:
        """How many agents had a valid signal in the last step."""
        return self._read("DaskPopulation.n_valid_signals", lambda: self._n_valid)

    @property
    def n_finite_signals(self) -> int:
        """Alias of :attr:`n_valid_signals` (its name before invalid meant more than non-finite)."""
        return self._read("DaskPopulation.n_finite_signals", lambda: self._n_valid)

    @property
    def discount(self) -> float:
        """``gamma**t``, the weight of the next step's cost."""
        return self._read("DaskPopulation.discount", lambda: self._discount)

    # ------------------------------------------------------------------ persistence
    @_one_caller("DaskPopulation.state_dict")
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: :meth:`Population.state_dict`'s keys, gathered.

        With a worker-side source that has ``state_dict``, also ``source``:
        ``{"agents": {...}, "shared": {...}}`` concatenated over the shards.
        """
        # m(t) as the kernels merged it (re-deriving it here from the gathered states would round differently).
        states = self._gather_agents("states", (self.n_agents, self.dim))
        self._client_labels()
        costs = self._gather_agents("costs", (self.n_agents,))
        self._current_means()  # the field current: the summary reads it (no message), under this call's guard
        state = self._summary_state(states, costs)
        source = self._gather_source()
        if source is not None:
            state["source"] = source
        return state

    def _gather_source(self):
        parts = self._call(("gather", ("source", None)))
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise RuntimeError("some shards' signal sources have no state_dict(): cannot checkpoint them")
        agents = {name: np.concatenate([p["agents"][name] for p in parts]) for name in parts[0]["agents"]}
        shared = {name: np.asarray(v) for name, v in parts[0]["shared"].items()}
        for k, p in enumerate(parts[1:], start=1):
            for name, v in shared.items():
                if not np.array_equal(np.asarray(p["shared"][name]), v):
                    raise RuntimeError(f"signal sources disagree on shared state {name!r} (shard 0 vs shard {k})")
        return {"agents": agents, "shared": shared}

    @_one_caller("DaskPopulation.load_state_dict")
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (of this class or of :class:`Population`); checks everything first."""
        clean = check_population_state(state, game=self.game, n_agents=self.n_agents, dim=self.dim)
        source, kept = state.get("source"), None
        if source is not None:
            source = check_source_layout(source, n_agents=self.n_agents)
            if self.signal_factory is None:
                raise ValueError("state has a signal source's state but this population has no signals= factory")
            # (restore's new shards checked this very state: not again, it is O(N); only restore's own load, in its
            # thread, takes that check: another thread's load_state_dict meanwhile loads another state)
            handed = self._sources_checked
            kept = handed[1] if handed is not None and handed[0] == threading.get_ident() else self._check_sources(source)
        labels = clean["labels"] if self._lay.n_classes > 1 else None
        try:
            self._check_usable(marked=True)  # before the mark: a population that cannot load keeps its mark
            self._interrupted = "a load_state_dict"
            self._switch_game(self.game)
        except BaseException:
            if kept is not None and any(kept):  # the shards' kept copies go
                with contextlib.suppress(Exception):
                    self._call(("discard", ()), marked=True)
            raise
        self._load_all(clean["states"], clean["costs"], labels, source, kept)
        self._apply_summary(clean)
        self._interrupted = None

    def _check_sources(self, source, spawned=None) -> list:
        """Every shard's source (of ``spawned`` shards, else of ours) asked whether it takes its slice of ``source``.

        A round trip that changes nothing live; ``ValueError`` naming the first shard that refuses. When every shard
        accepts, their sources' warnings (an old format that still loads) are issued here, once each (the load of a
        :meth:`restore` that checked the same state before rebuilding the shards does not ask again). Returns, per
        shard, the token of the clean copy it kept for the load that follows (the package's sources:
        ``Shard._check_source``), else None; that load sends :class:`~memoa_fast.distributed._shard.Kept` of it, not the
        slice: checked once, sent once. The token is this call's: a load installs the copy of its own check, never
        the one another call's check (another thread's) left on the shard.
        """
        bounds = self.bounds if spawned is None else spawned[0]
        token = uuid.uuid4().hex
        args = [(_slice_source(source, lo, hi), token) for lo, hi in bounds]
        answers = self._call(("check_source", None), per_shard_args=args, marked=True) if spawned is None else \
            self._run_on(spawned, "check_source", args)
        refused = [a["error"] for a in answers if "error" in a]
        if refused:
            if spawned is None and any(a.get("kept") for a in answers):  # the copies the shards that accepted kept go
                with contextlib.suppress(Exception):
                    self._call(("discard", ()), marked=True)
            raise ValueError(f"state['source'] is refused by this population's signal sources: {refused[0]}")
        _issue_warnings(answers)
        return [token if a["kept"] else None for a in answers]

    @_one_caller("DaskPopulation.restore")
    def restore(self, path, server=None, *, n_shards: int | None = None):
        """Rebuild the shards on the live workers and load the checkpoint at ``path``.

        This is how a run resumes after :class:`ShardLostError`, on any number
        of workers (``n_shards`` defaults to one per live worker). The
        checkpoint is read and checked completely before anything changes: a
        sharded checkpoint (:meth:`save`) by the new shards, each reading its
        own rows from the shard files, while the old shards are still in
        place; a single-file one on the client. Servers of this population
        other than ``server`` restart from uniform weights. Returns the
        :class:`~memoa_fast.checkpoint.Manifest` of a sharded checkpoint, the
        :class:`~memoa_fast.checkpoint.Checkpoint` of a single file.
        """
        _check_engines(self, server, None, saving=False)  # the one check of the server on either path
        if is_manifest(path):
            with self._lend():
                return self._restore_shards(path, server, rebuild=True, n_shards=n_shards)
        ckpt = load_checkpoint(path)
        ckpt.check_compatible(self, server)
        kept = self._build(n_shards, None, source=ckpt.source, labels=ckpt.population.get("labels"))  # marks: "a restore"
        if server is not None:
            server._interrupted = "a restore"  # _build reset it to round 0: marked until its state is loaded
        self._sources_checked = (threading.get_ident(), kept)  # by _build's check, before the old shards went: not again
        try:
            with self._lend():  # to the load_state_dicts
                result = _restore_checked(ckpt, self, server, None)  # whose load_state_dicts clear the marks last
        finally:
            self._sources_checked = None
        self._interrupted = None
        return result

    @_one_caller("DaskPopulation.save")
    def save(self, path, server=None, *, sharded: bool = True):
        """Write a checkpoint of this population (and ``server``, a :class:`DaskServer` of it) atomically.

        Sharded (the default): every shard writes its own rows to its own
        file, in the folder ``<path>.shards`` beside ``path``, and the client
        writes the manifest at ``path`` last; the client moves ``O(shards)``
        bytes, whatever N. The folder must be on a file system that the
        client and every worker see at the same path. ``sharded=False``
        gathers everything to the client and writes one file
        (:func:`~memoa_fast.checkpoint.save_checkpoint`). Returns ``path``.

        Notes
        -----
        A save writes new files (their names carry the save's token), never
        one that the current manifest names; each by a temporary file,
        ``fsync`` and ``os.replace``. The manifest, written the same way and
        last, switches atomically from the previous complete set to the new
        one; only then are the previous set's files, and any debris of saves
        that were killed, deleted. A crash at any point therefore leaves a
        manifest whose files are all present: the previous checkpoint before
        the switch, the new one after. A state that could not be restored is
        refused (``ValueError``) before the manifest is written, and the
        files already written for it are deleted.
        """
        with self._lend():  # to the state_dicts, or to _save_shards
            return save_checkpoint(path, self, server, sharded=sharded)  # which checks the server (once)

    def _check_own_server(self, server) -> None:
        """``TypeError`` unless ``server`` is None or a :class:`DaskServer` of this population (its weights live on our shards).

        Called once per save or restore, by the checkpoint functions' engine check
        (:meth:`save` and :meth:`restore` go through it; the shard paths do not check again).
        """
        if server is not None and getattr(server, "population", None) is not self:
            got = "one of another population" if hasattr(server, "population") else f"a {type(server).__name__}"
            raise TypeError(f"server must be a DaskServer of this population (or None), got {got}")

    @_one_caller("save_checkpoint")  # also called by save_checkpoint(path, population) directly
    def _save_shards(self, path, server=None):
        """The sharded save (see :meth:`save`); ``server`` was checked by :func:`~memoa_fast.checkpoint.save_checkpoint`."""
        given = Path(path)
        target = Path(os.path.realpath(given))
        if not target.parent.is_dir():
            raise FileNotFoundError(f"cannot write checkpoint {target}: folder {target.parent} does not exist")
        folder = shard_folder(target)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"cannot write checkpoint {target}: {folder} is a file: a sharded checkpoint keeps its "
                                  "shard files in a folder of that name (move the file, or save with sharded=False)")
        folder.mkdir(exist_ok=True)
        started = time.time()
        token = new_token()
        live = mark_save_live(folder, token)  # a concurrent save's cleanup keeps this save's files meanwhile
        try:
            return self._save_shards_marked(given, target, folder, started, token, server)
        finally:
            end_save_live(folder, token, live)

    def _save_shards_marked(self, given, target, folder, started, token, server):
        """The sharded save proper, while the save ``token`` is marked live (:func:`~memoa_fast.checkpoint.mark_save_live`)."""
        if server is not None:
            server._check_usable()  # a server left mid-update by an interrupt is not saved
        self._current_means()  # the mean fields of the current states (O(K d) per shard, if stale)
        lay, K = self._lay, self._lay.n_classes
        population = {
            "mean_state": self._field[lay.field_state].copy(),
            "mean_signal": self._field[lay.field_signal].copy(),
            "class_mean_signal": self._field[lay.class_signal:lay.class_signal + K].copy(),
            "class_mean_state": self._field[lay.class_state:lay.class_state + K].copy(),
            "t": self.t, "discount": self._discount, "n_valid_signals": self._n_valid,
        }
        if K > 1:  # which classes have had a valid signal (see MeanFieldSummary._unsignalled_classes)
            population["class_signalled"] = (~self._unsignalled_classes()).astype(np.int64)
        sid = None if server is None else server.sid
        args = [(str(folder), token, population, self.game, sid) for _ in self.bounds]
        try:
            answers = self._call(("save_file", None), per_shard_args=args)
            for kind, raise_as in (("error", ValueError), ("os_error", OSError)):
                failed = [a[kind] for a in answers if kind in a]
                if failed:
                    what = "population" if kind == "error" else "population's shards"
                    raise raise_as(f"cannot save a checkpoint of this {what}: {failed[0]}")
            server_state = None
            if server is not None:
                saved = {"n_updates": server.n_updates, "rule": server.rule, "eta": server.eta, "alpha": server.alpha}
                try:
                    check_merged_server([a["lse"] for a in answers], saved, rule=server.rule, eta=server.eta,
                                        alpha=server.alpha)
                except ValueError as exc:
                    raise ValueError(f"cannot save a checkpoint of this server: {exc}") from None
                server_state = saved
            source_shared, source_agents = self._merge_sources(answers)
            shards = [{key: a[key] for key in ("file", "lo", "hi", "size", "digest")} for a in answers]
            write_manifest(
                target, game=self.game, n_agents=self.n_agents, dim=self.dim, population=population,
                server=server_state, source_shared=source_shared, source_agents=source_agents, token=token,
                shards=shards,
            )
        except BaseException:
            remove_shard_files(folder, token=token)
            raise
        remove_shard_files(folder, keep=token, before=started)
        _remove_stale_temporaries(target, started)
        self._record_checkpoint(given, self.t)
        return given

    @staticmethod
    def _merge_sources(answers):
        """The sources' shared state (which every shard must agree on) and the per-agent arrays' layout."""
        if all(a["source_agents"] is None for a in answers):
            return None, None
        if any(a["source_agents"] is None for a in answers):
            raise RuntimeError("some shards' signal sources have no state_dict(): cannot checkpoint them")
        first = answers[0]
        for k, a in enumerate(answers[1:], start=1):
            if a["source_agents"] != first["source_agents"]:
                raise RuntimeError(f"signal sources disagree on their per-agent arrays (shard 0 vs shard {k})")
            if set(a["source_shared"]) != set(first["source_shared"]) or any(
                not np.array_equal(np.asarray(a["source_shared"][n]), np.asarray(v))
                for n, v in first["source_shared"].items()
            ):
                raise RuntimeError(f"signal sources disagree on their shared state (shard 0 vs shard {k})")
        return first["source_shared"], first["source_agents"]

    @_one_caller("restore_checkpoint")  # also called by restore_checkpoint(path, population) directly
    def _restore_shards(self, path, server=None, *, rebuild: bool = False, n_shards: int | None = None):
        """Load a sharded checkpoint: every shard reads and checks its own rows, then all install them.

        Phase 1 changes nothing: the client reads the manifest and checks it
        against this population and ``server``; each target shard (the
        current ones, or new ones when ``rebuild``) reads its rows from the
        shard files that hold them, checks them and keeps them aside; the
        client checks the server's normalisation from the shards'
        log-sum-exp pieces. Any failure discards the staged rows (and the new
        shards) and raises :class:`CheckpointError`. Phase 2 installs them.
        ``server`` was checked by the caller (:meth:`restore`, :func:`~memoa_fast.checkpoint.restore_checkpoint`).
        The client reads only the manifest: the means come from the shards'
        sums and, for a K-class game, the class sizes from their counts of
        the labels they read, which stay on the shards (see :meth:`_client_labels`).
        """
        manifest = read_manifest(path, n_agents=self.n_agents, dim=self.dim)
        where = manifest.path
        if manifest.game != self.game:
            raise CheckpointError(f"{where} was saved for {manifest.game!r}, the population plays {self.game!r}")
        if server is not None:
            if manifest.server is None:
                raise CheckpointError(f"{where} holds no server state; restore without server=")
            for key in ("rule", "eta", "alpha"):
                if manifest.server[key] != getattr(server, key):
                    raise CheckpointError(
                        f"{where} was saved with server {key}={manifest.server[key]!r}, this server has "
                        f"{key}={getattr(server, key)!r}"
                    )
        if manifest.source_agents is not None and self.signal_factory is None:
            raise CheckpointError(f"{where} holds the state of worker-side signal sources, but this population has no "
                                  "signals= factory")
        sid = None if server is None else server.sid
        spawned = self._spawn(n_shards) if rebuild else None
        bounds = spawned[0] if rebuild else self.bounds
        args = [(replace(manifest, shards=manifest.files_for(lo, hi)), sid) for lo, hi in bounds]
        try:
            answers = (self._run_on(spawned, "stage", args) if rebuild
                       else self._call(("stage", None), per_shard_args=args, marked=True))
            failed = [a["error"] for a in answers if "error" in a]
            if failed:
                raise CheckpointError(f"{where}: {failed[0]}")
            if server is not None:
                try:
                    check_merged_server([a["lse"] for a in answers], manifest.server, rule=server.rule, eta=server.eta,
                                        alpha=server.alpha)
                except ValueError as exc:
                    raise CheckpointError(f"{where}: server {exc}") from None
            _issue_warnings(answers)  # last of the checks: the state loads
        except BaseException:
            if not rebuild:
                with contextlib.suppress(Exception):
                    self._call(("discard", ()), marked=True)
            raise
        self._interrupted = "a restore"  # from here until the last write (a refused restore above changed nothing)
        if server is not None:
            server._interrupted = "a restore"
        if rebuild:
            self._release_shards()
            self._install(spawned)
            self._restart_servers()
            if server is not None:
                server._interrupted = "a restore"
        self._call(("commit", (sid,)), marked=True)
        lay, K = self._lay, self._lay.n_classes
        if K > 1:  # the labels stay on the shards (fetched only by a call that moves O(N) anyway)
            self._labels = None
            self._coef[:, SIZE] = sum(a["sizes"] for a in answers)
            self._check_classes_read()
        pop = manifest.population
        self._field[...] = 0.0
        self._unsignalled = None  # see MeanFieldSummary._unsignalled_classes
        self._field[lay.field_signal] = pop["mean_signal"]
        self._field[lay.class_signal:lay.class_signal + K] = pop["class_mean_signal"]
        flags = pop.get("class_signalled")  # None in a manifest written before it: derived from t
        self._unsignalled, self._unsignalled_t = (None if flags is None else ~flags), pop["t"]
        # m(t) and m_l(t) from the shards' sums of the rows they installed (as one machine does from its states):
        # the manifest's copies are not trusted to match the rows.
        self._means_from_sums(*_added_sums(answers, K))
        self._n_valid = pop["n_valid_signals"]
        self.t = pop["t"]
        self._discount = pop["discount"]
        if server is not None:
            server.n_updates = manifest.server["n_updates"]
        self._record_checkpoint(path, manifest.t)
        if server is not None:
            server._interrupted = None
        self._interrupted = None
        return manifest

    def _run_on(self, spawned, op, per_shard_args) -> list:
        """``op`` on shards that are not installed yet (a restore's new shards); raises on any failure."""
        bounds, workers, _, actors = spawned
        messages = [[(op, args)] for args in per_shard_args]
        self.comm.bytes_sent += sum(payload_nbytes(m) for m in messages)
        futures = [actor.run(msg) for actor, msg in zip(actors, messages)]
        deadline = time.monotonic() + self.timeout
        results = [f.result(timeout=max(deadline - time.monotonic(), 0.001)) for f in futures]
        self.comm.round_trips += 1
        self.comm.bytes_received += sum(payload_nbytes(r) for r in results)
        return results

    def _record_checkpoint(self, path, t) -> None:
        self.last_checkpoint, self.last_checkpoint_step = str(path), int(t)

    @_one_caller("DaskPopulation.info")
    def info(self) -> list[dict]:
        """Per shard: agents ``[lo, hi)``, worker address, process id and kernel threads."""
        return [dict(shard=k, worker=w, **i) for k, (w, i) in enumerate(zip(self.shard_workers, self._call(("info", ()))))]

    def __repr__(self) -> str:
        return (
            f"DaskPopulation({self.game!r}, n_agents={self.n_agents}, dim={self.dim}, n_shards={self.n_shards}, "
            f"exact={self.exact}, t={self.t})"
        )


def _slice_source(source, lo, hi):
    return {"agents": {k: v[lo:hi] for k, v in source["agents"].items()}, "shared": dict(source["shared"])}
