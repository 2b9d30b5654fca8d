"""A population of online agents stepped in place by the compiled kernels (the one-machine engine)."""
from __future__ import annotations

import numpy as np

from . import _backends
from ._copies import CopiesKeepTheirClass, build_as
from ._exclusive import Exclusive
from ._state import INITIAL_LIMIT, check_population_state
from ._validation import MAX_COUNT, as_float_array, as_steps, check_int, check_out, check_sizes, plain_array, readonly_view
from .game import Game
from .kernels import MIX_SIGNAL, MIX_STATE, N_COEF, SIZE, layout, next_discount, padded, work_shape
from .server import Server


def population_shape(game, n_agents, dim, initial_states) -> tuple[int, int]:
    """Check ``game`` and return ``(N, d)`` from the arguments or from ``initial_states``."""
    if not isinstance(game, Game):
        raise TypeError(f"game must be a memoa_fast.Game, got {type(game).__name__}")
    if initial_states is not None:
        shape = np.shape(initial_states)
        if len(shape) == 1:
            shape = (shape[0], 1)
        if len(shape) != 2:
            raise ValueError(f"initial_states must have shape (n_agents, dim), got ndim {len(shape)}")
        n_agents = shape[0] if n_agents is None else n_agents
        dim = shape[1] if dim is None else dim
    if n_agents is None:
        raise TypeError("give n_agents (an integer >= 1) or initial_states of shape (n_agents, dim)")
    return check_int("n_agents", n_agents, low=1), check_int("dim", 1 if dim is None else dim, low=1)


def check_labels(labels, n_agents: int, n_classes: int) -> np.ndarray:
    """Return a private int64 copy of ``labels``, shape (N,), values in ``[0, K)``; an empty array when K = 1."""
    if n_classes == 1:
        if labels is None:
            return np.empty(0, dtype=np.int64)
    elif labels is None:
        raise TypeError(f"the game has {n_classes} classes: give labels, an integer array of shape ({n_agents},)")
    arr = np.asarray(plain_array("labels", labels))
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be an integer array of class indices, got dtype {arr.dtype}")
    if arr.shape != (n_agents,):
        raise ValueError(f"labels must have shape ({n_agents},), got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        bad = int(np.flatnonzero((arr < 0) | (arr >= n_classes))[0])
        raise ValueError(f"labels must be in [0, {n_classes}) (the game's classes), got {int(arr[bad])} at index {bad}")
    if n_classes == 1:
        return np.empty(0, dtype=np.int64)
    # Always a private copy: the kernels index class tables by these labels without bounds checks, so a caller
    # who edits the array after passing it must not reach them.
    return np.array(arr, dtype=np.int64, order="C", copy=True)


def first_max(J) -> int:
    """The first index of the largest entry of ``J``, a NaN never larger (the kernels' ``>``); 0 if every entry is NaN."""
    return int(np.argmax(np.where(J > -np.inf, J, -np.inf)))


def state_sums(states: np.ndarray, labels: np.ndarray, n_classes: int):
    """``(sum_i x_i, class sums)`` of ``states`` (N, d): the sums behind ``m(t)`` and ``m_l(t)``.

    The class sums ``sum_{i: label_i = l} x_i`` (K, d) are None when K = 1. One
    machine sums all its states; each Dask shard sums its own rows, and the
    client adds the shards' sums (a few numbers per shard, never the states).
    """
    class_sums = None
    if n_classes > 1:
        class_sums = np.zeros((n_classes, states.shape[1]))
        np.add.at(class_sums, labels, states)
    return states.sum(axis=0), class_sums


class MeanFieldSummary:
    """The small mean-field summary every population engine keeps beside its agents.

    Shared by :class:`Population` and :class:`~memoa_fast.distributed.DaskPopulation`,
    which both hold ``_field`` (rows named by ``_lay``, see
    :mod:`memoa_fast.kernels`), ``_coef``, ``_mix``, ``_labels``, ``_n_valid``
    and ``_discount``: the summary's properties, the game and the classes are
    handled here, once for both engines.
    """

    # The summary's reads. Each public one is made through the object's lock (a Population's ``_exclusive.read``,
    # which checks it without taking a hold; a DaskPopulation overrides them with its guard,
    # :func:`~memoa_fast.distributed.population._one_caller`): while another thread is inside a step it raises the
    # writers' ``RuntimeError`` at once, instead of returning a value of a round half taken (a kernel writes the mean
    # signal in place; the mean state, t and the discount are stored one after the other after it), and after an
    # interrupted update it raises too (see :class:`~memoa_fast._exclusive.Exclusive`). The package's own calls,
    # which hold the lock, read the unchecked ``_``-methods below.
    def _mean_state(self) -> np.ndarray:
        return self._field[self._lay.field_state].copy()

    def _mean_signal(self) -> np.ndarray:
        return self._field[self._lay.field_signal].copy()

    def _class_mean_state(self) -> np.ndarray:
        lay = self._lay
        return self._field[lay.class_state:lay.class_state + lay.n_classes].copy()

    def _class_mean_signal(self) -> np.ndarray:
        lay = self._lay
        if lay.n_classes == 1:
            return self._field[lay.field_signal:lay.field_signal + 1].copy()
        return self._field[lay.class_signal:lay.class_signal + lay.n_classes].copy()

    # A class whose agents have sent no valid signal since round 0 has no signal mean: the kernels' merge keeps the
    # row it finds (0 at round 0), and MEMOA's anchor m* = sum_l lam_l sbar_l read that 0 as a class's signal mean, so
    # a population at rest on a common signal of 100 left it (to 70.7 in one step with two equal classes). Such a
    # class is left out of the anchor instead: its row gets the anchor of the classes that have a signal mean. Only a
    # class whose signal mean the policy reads (MEMOA's, q_l > 0) needs it: the baselines read none (a baseline game
    # may have no anchor weights at all, every q_j = 0), and a class nobody reads may stay silent (an empty class) at
    # no cost. Which classes have signalled is tracked for every policy (a later set_game may read them), from the
    # valid counts pass 1 leaves in ``work``: no pass of its own.
    def _unsignalled_classes(self):
        """The classes with no valid signal since round 0 (bool (K,)), or None when K = 1.

        Kept by the steps and saved with the state (``class_signalled``, also in checkpoints and manifests); for a
        state saved without it (older ones) it is derived from the round counter: every class at round 0, none
        after (a class still silent then keeps the stand-in its row holds).
        """
        K = self._lay.n_classes
        if K == 1:
            return None
        flags = self._unsignalled  # set with _unsignalled_t, the round it is of (None: derive it)
        if flags is None or self._unsignalled_t != self.t:
            flags = np.full(K, self.t == 0)
        return flags

    def _silent_and_read(self, flags):
        """The classes in ``flags`` (:meth:`_unsignalled_classes`) whose signal mean the policy reads, or None if none is."""
        if flags is None or not flags.any():
            return None
        read = flags & self._reads_class_signal
        return read if read.any() else None

    def _class_counts(self, work) -> np.ndarray:
        """Each class's valid-signal count of the round, from pass 1's partials in ``work`` (K,)."""
        lay = self._lay
        return work[:, lay.count:lay.count + lay.n_classes].sum(axis=0)

    def _stand_in_for_silent_classes(self, work, flags) -> None:
        """Give each class in ``flags`` with no valid signal in ``work`` the anchor of the others.

        ``work`` holds pass 1's partials, before the merge (which keeps the row of a class with no valid signal):
        the anchor ``sum lam_l sbar_l / sum lam_l`` over the classes with a signal mean is written into the
        signal-mean row of each such class. ``flags`` holds only classes the policy reads (MEMOA's: its game has
        anchor weights ``lam``).
        """
        lay, K, d = self._lay, self._lay.n_classes, self._lay.dim
        counts = self._class_counts(work)
        silent = flags & (counts == 0)
        if silent.any():
            dp = padded(d)
            rows = self._field[lay.class_signal:lay.class_signal + K]
            means = rows.copy()  # a class silent this round but signalled before: its kept mean
            for l in np.flatnonzero(counts > 0):
                means[l] = work[:, lay.signal + l * dp:lay.signal + l * dp + d].sum(axis=0) / counts[l]
            have = ~silent
            lam = np.asarray(self.game.classes.lam)[have]
            if lam.sum() > 0:
                rows[silent] = lam @ means[have] / lam.sum()
            elif counts.sum() > 0:  # no class with a signal mean weighs in the anchor: the mean of the valid signals
                rows[silent] = counts @ means / counts.sum()

    @property
    def mean_state(self) -> np.ndarray:
        """``m(t)``, the mean of the current states; a copy (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(self._mean_state)

    @property
    def mean_signal(self) -> np.ndarray:
        """``sbar``, the mean of the last step's valid signals (kept when none was valid); a copy.

        ``RuntimeError`` during another thread's call.
        """
        return self._exclusive.read(self._mean_signal)

    @property
    def class_mean_state(self) -> np.ndarray:
        """``m_l(t)``, the mean state of each class, shape (K, d); a copy (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(self._class_mean_state)

    @property
    def class_mean_signal(self) -> np.ndarray:
        """``sbar_l``, each class's mean valid signal of the last step, shape (K, d); a copy.

        A class with no valid signal in the last step keeps its mean of the step before; one that has had none since
        round 0 holds the anchor ``m*`` of the others when the policy reads its signal mean (MEMOA, ``q_l > 0``: it is
        left out of the anchor), else 0. ``RuntimeError`` during
        another thread's call. With one class this is :attr:`mean_signal` (shape (1, d)),
        the same bits: the compiled step may round its
        own copy of the class mean an ulp apart, and a single-class checkpoint, which does not save it, restores
        it as the mean signal (the two then differed after a restore).
        """
        return self._exclusive.read(self._class_mean_signal)

    @property
    def n_valid_signals(self) -> int:
        """How many agents had a valid signal in the last step (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(getattr, self, "_n_valid")

    @property
    def n_finite_signals(self) -> int:
        """Alias of :attr:`n_valid_signals` (its name before invalid meant more than non-finite)."""
        return self._exclusive.read(getattr, self, "_n_valid")

    @property
    def discount(self) -> float:
        """``gamma**t``, the weight of the next step's cost (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(getattr, self, "_discount")

    def _set_game(self, game: Game) -> None:
        table = game.table
        sizes = self._coef[:, SIZE].copy()
        self._coef[...] = table.coef
        self._coef[:, SIZE] = sizes
        self._mix = np.ascontiguousarray(table.mix)
        self.game = game
        self._check_classes_read()

    def _set_sizes(self) -> None:
        K = self._lay.n_classes
        self._coef[:, SIZE] = np.bincount(self._labels, minlength=K) if K > 1 else self.n_agents
        self._check_classes_read()

    def _check_classes_read(self) -> None:
        """Set ``_empty_read``: why a step must be refused, or None (see :meth:`_refuse_step`).

        A class with no agent has no mean state or signal; the kernels would read 0 and a stale value in its place,
        so a policy whose offsets weigh that class's means would drift (agents at a common signal would leave it).
        Computed when the game or the labels change, so a step pays nothing for it.
        """
        self._empty_read = None
        self._reads_class_signal = None  # which classes' signal means the policy reads (K > 1): see _silent_and_read
        K = self._lay.n_classes
        if K == 1:
            return
        empty = self._coef[:, SIZE] == 0
        reads_signal, reads_state = ((self._mix[plane, :, :K] != 0).any(axis=0) for plane in (MIX_SIGNAL, MIX_STATE))
        self._reads_class_signal = reads_signal
        bad = np.flatnonzero(empty & (reads_signal | reads_state))
        if bad.size:
            cls = int(bad[0])
            what = " and ".join(name for name, read in (("signal", reads_signal[cls]), ("state", reads_state[cls])) if read)
            self._empty_read = (
                f"class {cls} has no agent, but the {self.game.policy!r} policy of this game reads that class's mean {what} "
                f"(its shares are {[float(v) for v in self.game.shares]}): give every class an agent (labels, "
                "set_labels), or play a game without that class"
            )

    def _refuse_step(self) -> None:
        """``ValueError`` before a step that cannot be taken (nothing changes).

        A step that would read the means of a class with no agent; and one past
        round ``2**63 - 1``, whose round counter no state could hold (a saved
        state's ``t`` is an int64: the population could no longer be saved,
        copied or pickled; only a loaded state gets there).
        """
        if self._empty_read is not None:
            raise ValueError(self._empty_read)
        if self.t >= MAX_COUNT:
            raise ValueError(f"this population is at round t = {self.t} = 2**63 - 1, the last a saved state can hold "
                             "(t is saved as an int64): it steps no further")

    def _refuse_steps(self, n_steps: int) -> None:
        """``ValueError`` before a run of ``n_steps`` steps that could not all be taken (nothing changes).

        :meth:`_refuse_step` for the whole run at once: a run that would pass round ``2**63 - 1`` is refused
        before its first step, not stopped in its middle (it used to take the steps up to that round, then raise).
        """
        if n_steps == 0:
            return
        self._refuse_step()
        if self.t + n_steps > MAX_COUNT:
            raise ValueError(f"this population is at round t = {self.t}: a run of {n_steps} steps would pass round "
                             f"2**63 - 1, the last a saved state can hold (t is saved as an int64); nothing was stepped")

    def set_game(self, game: Game) -> None:
        """Play ``game`` from the next step on (for example re-solved weights); same classes and discount.

        Costs already paid are kept; later stage costs use the new weights.
        """
        self._check_new_game(game)
        self._set_game(game)

    def _check_new_game(self, game: Game) -> None:
        """:meth:`set_game`'s checks of ``game`` (``TypeError``, ``ValueError``); nothing changes."""
        if not isinstance(game, Game):
            raise TypeError(f"game must be a memoa_fast.Game, got {type(game).__name__}")
        if game.n_classes != self._lay.n_classes or game.gamma != self.game.gamma:
            raise ValueError(
                f"the new game must have the same classes and discount: it has n_classes={game.n_classes}, "
                f"gamma={game.gamma!r}; this population has n_classes={self._lay.n_classes}, gamma={self.game.gamma!r}"
            )

    @property
    def n_classes(self) -> int:
        """Number of classes K of the game."""
        return self._lay.n_classes

    @property
    def labels(self) -> np.ndarray:
        """The class of every agent, shape (N,), read-only (zeros when K = 1)."""
        if self._labels.shape[0] == 0:
            return readonly_view(np.zeros(self.n_agents, dtype=np.int64))
        return readonly_view(self._labels)

    def _summary_state(self, states: np.ndarray, costs: np.ndarray) -> dict:
        """The state dict of either engine around its (copied or gathered) ``states`` and ``costs``."""
        state = {
            "states": states,
            "costs": costs,
            "mean_state": self._mean_state(),  # the unchecked reads: the caller holds the lock or checks it
            "mean_signal": self._mean_signal(),
            "class_mean_signal": self._class_mean_signal(),
            "t": self.t,
            "discount": self._discount,
            "n_valid_signals": self._n_valid,
            "game": self.game.to_dict(),
        }
        if self._lay.n_classes > 1:
            state["labels"] = self._labels.copy()
            state["class_signalled"] = (~self._unsignalled_classes()).astype(np.int64)
        return state

    def _apply_summary(self, clean: dict) -> None:
        """Everything but the agent arrays from a checked state: classes, mean field, counters."""
        lay, K = self._lay, self._lay.n_classes
        if K > 1:
            self._labels = clean["labels"]
            self._set_sizes()
        self._field[...] = 0.0
        flags = clean.get("class_signalled")  # None for a state saved without it: derived from t
        self._unsignalled, self._unsignalled_t = (None if flags is None else ~flags), clean["t"]
        self._field[lay.field_signal] = clean["mean_signal"]
        self._field[lay.class_signal:lay.class_signal + K] = clean["class_mean_signal"]
        self._refresh_means(clean["states"])
        self._n_valid = clean["n_valid_signals"]
        self.t = clean["t"]
        self._discount = clean["discount"]

    def _refresh_means(self, states) -> None:
        """``m_l(t)`` and ``m(t)`` of ``states`` into the field (a cheap NumPy pass: construction, labels, restore)."""
        self._means_from_sums(*state_sums(states, self._labels, self._lay.n_classes))

    def _means_from_sums(self, total, class_sums) -> None:
        """``m(t) = total / N`` and ``m_l(t) = class_sums[l] / n_l`` (0 for an empty class) into the field.

        ``class_sums`` is ignored (may be None) when K = 1: then ``m_0 = m``.
        """
        lay, K = self._lay, self._lay.n_classes
        mean = total / self.n_agents
        if K == 1:
            self._field[lay.class_state] = mean
        else:
            sizes = self._coef[:, SIZE]
            self._field[lay.class_state:lay.class_state + K] = np.where(
                sizes[:, None] > 0, class_sums / np.maximum(sizes, 1.0)[:, None], 0.0)
        self._field[lay.field_state] = mean


class Population(CopiesKeepTheirClass, MeanFieldSummary):
    """N online agents sharing one :class:`Game`, stepped in place on this machine.

    One object per population (never one per agent). States, costs, the
    mean field and the work buffers are allocated once; :meth:`step`
    allocates nothing when the signals are already a C-contiguous float64
    ``(N, d)`` array. For a population sharded over a Dask cluster, build a
    :class:`memoa_fast.distributed.DaskPopulation` instead (same API).

    Parameters
    ----------
    game : Game
        Weights, gains and policy; a K-class game needs ``labels``.
    n_agents : int, optional
        Number of agents N >= 1 (taken from ``initial_states`` if given).
    dim : int, default 1
        State dimension d >= 1 (taken from ``initial_states`` if given).
    initial_states : array_like, shape (N, d), optional
        ``x_i(0)``; zeros by default. Copied.
    labels : array_like of int, shape (N,), optional
        The class of each agent, in ``[0, K)``; needed when the game has K > 1
        classes (see :meth:`set_labels` to change them between steps).
    backend : {"numba", "cython", "numpy"}, default "numba"
        Which kernels run the step; ``numpy`` is the slow reference.
    threads : int, optional
        Kernel threads, used for populations of at least ``parallel_threshold``
        agents. Default: the cores this process may use (its CPU affinity,
        capped by ``NUMBA_NUM_THREADS``), but only for steps of at least
        ``2**20`` values (N x d); smaller steps run on one thread, which never
        loses on a shared machine (see ``bench/concurrent_threads.py``).
        Numba's global thread count is restored after each call.
    parallel_threshold : int, default 8192
        Smaller populations run on one thread (a parallel region costs more
        than it saves there).

    Notes
    -----
    One :meth:`step` at round t, for an agent of class ``j`` with the game's
    table (:attr:`Game.table`: gain ``g_j``, signal weight ``c_j`` and the
    mixing matrices ``M^s``, ``M^m``):

    .. math::

        u_i &= -g_j\\left(x_i - c_j s_i - \\sum_l M^s_{jl} \\bar s_l - \\sum_l M^m_{jl} m_l\\right) \\\\
        J_i &\\mathrel{+}= \\tfrac{\\gamma^t}{2}\\left(q_j|x_i - s_i|^2 + \\kappa_j|x_i - m|^2 + r_j|u_i|^2\\right),
        \\qquad x_i \\leftarrow x_i + u_i ,

    with ``m_l``, ``sbar_l`` the class means of the states and of the valid
    signals and ``m`` the mean of all states (one class: the policies of
    ``MODEL.md`` sections 2 and 4).

    A signal row is valid when every entry is finite and at most
    ``memoa_fast.kernels.SIGNAL_LIMIT`` (1e50) in magnitude. An agent whose
    signal is not valid holds its state that round (``u_i = 0``), is left out
    of the signal means and pays only the mean-field term: a bad signal,
    NaN, infinite or merely huge, never reaches the mean field, and every
    cost stays finite. If a class has no valid signal, its signal mean keeps
    its last value.

    A step is one kernel call making two passes over memory (the signals,
    then the states and costs), which also leaves ``m(t+1)``, the worst
    client and, in :meth:`step_predict`, the server's mixture ready. The
    same two passes run on each Dask shard.

    A Population is not thread-safe: stepping one object from two threads at
    once raises ``RuntimeError``, and so does reading or replacing its state
    (:meth:`state_dict`, pickle, copies, :meth:`load_state_dict`,
    :meth:`reset`, :meth:`set_labels`, :meth:`set_game`) while another thread
    is inside a step, instead of a snapshot that mixes two rounds. The reads
    (:meth:`state_dict`, pickle, copies) take no hold: one that a step of
    another thread overlaps raises, and that step is served (a thread that
    checkpoints a run never stops it). It can be pickled and deep-copied.

    Interrupts (Ctrl-C, or an exception from a signal handler): an interrupt
    that lands between a step's kernel and its last counter (where Ctrl-C
    during a long step lands) leaves a population that refuses every call
    but :meth:`load_state_dict` and :meth:`reset` with a ``RuntimeError``
    saying so, never one whose round counter, discount or mean field lag
    its states; anywhere else (between the steps of :meth:`run`, in the
    checks) it is at the end of the last step done.
    """

    def __init__(
        self,
        game: Game,
        n_agents: int | None = None,
        dim: int | None = None,
        *,
        initial_states=None,
        labels=None,
        backend: str = "numba",
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
    ):
        self.n_agents, self.dim = population_shape(game, n_agents, dim, initial_states)
        check_sizes(self.n_agents, self.dim, per_agent_vectors=1, per_agent_scalars=1 + (game.n_classes > 1))
        self._kernels = _backends.load(backend)
        self.backend = backend
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self._threads_used = _backends.resolve_threads(threads, self.n_agents, self.parallel_threshold,
                                                                     self.dim)
        self._lay = layout(game.n_classes, self.dim)
        self._labels = check_labels(labels, self.n_agents, game.n_classes)
        self._coef = np.zeros((game.n_classes, N_COEF))
        self._set_game(game)
        self._set_sizes()
        shape = (self.n_agents, self.dim)
        self._x = np.zeros(shape)
        self._J = np.zeros(self.n_agents)
        self._work = np.zeros(work_shape(self.n_agents, self._lay))
        self._field = np.zeros((self._lay.field_rows, self.dim))
        self._yhat = np.zeros(self.dim)
        # No server: log_p is empty. Read-only like Server.log_weights (step_predict's), so that Numba compiles the
        # fused step once for both calls (a writeable array is another type: the whole step compiled again).
        self._no_weights = readonly_view(np.empty(0))
        self._x_view = readonly_view(self._x)
        self._J_view = readonly_view(self._J)
        self._exclusive = Exclusive("Population")
        self._fresh = True  # the arrays are still np.zeros: reset() need not write N x d zeros again
        self.reset(initial_states)

    # ------------------------------------------------------------------ state
    def reset(self, initial_states=None) -> None:
        """Back to round 0: states to ``initial_states`` (zeros if None), costs to 0."""
        x0 = None
        if initial_states is not None:
            x0 = as_float_array("initial_states", initial_states, (self.n_agents, self.dim))
            _check_magnitude("initial_states", x0)
        ex = self._exclusive
        with ex.restoring:  # also after an interrupted update: reset is a way back
            ex.interrupted = "reset"
            self._reset(x0)
            ex.interrupted = None

    def _reset(self, x0) -> None:
        """:meth:`reset` to the checked ``x0`` (None: zeros); the caller holds the lock."""
        if x0 is None:
            if not self._fresh:
                self._x[...] = 0.0
        else:
            self._x[...] = x0
        if not self._fresh:
            self._J[...] = 0.0
        self._fresh = False
        self._field[...] = 0.0
        self._unsignalled, self._unsignalled_t = None, 0
        self._mean_ready = False  # m(t) is computed by the next step's signal pass
        if x0 is not None:
            self._refresh_means(self._x)
        self._n_valid = 0
        self._worst = -1
        self.t = 0
        self._discount = 1.0

    def set_labels(self, labels) -> None:
        """Move agents between classes (K-class games); takes effect at the next step.

        Parameters
        ----------
        labels : array_like of int, shape (N,)
            The new class of every agent, in ``[0, K)``.
        """
        labels = check_labels(labels, self.n_agents, self._lay.n_classes)
        ex = self._exclusive
        with ex:
            ex.interrupted = "set_labels"
            self._labels = labels
            self._set_sizes()
            self._mean_ready = False
            self._refresh_means(self._x)
            ex.interrupted = None

    def set_game(self, game: Game) -> None:
        """Play ``game`` from the next step on (for example re-solved weights); same classes and discount.

        Costs already paid are kept; later stage costs use the new weights.
        """
        ex = self._exclusive
        with ex:
            self._check_new_game(game)  # a refused game changes nothing: checked before the mark (not an interrupted update)
            ex.interrupted = "set_game"
            self._set_game(game)
            ex.interrupted = None

    @property
    def states(self) -> np.ndarray:
        """``x(t)``, shape (N, d): a read-only view of the live buffer (copy it to keep it).

        A view cannot refuse: read while another thread is inside a step it shows rows of two rounds (not a
        snapshot). For one, take :meth:`state_dict` (it raises ``RuntimeError`` then instead).
        """
        return self._x_view

    @property
    def costs(self) -> np.ndarray:
        """Discounted online costs ``J_i = sum_t gamma^t l_i(t)``: a read-only view of the live buffer.

        As :attr:`states`: not a snapshot while another thread steps (:meth:`state_dict` is).
        """
        return self._J_view

    def _worst_agent(self) -> int:
        if self._worst >= 0:  # tracked by the step
            return self._worst
        return first_max(self._J)

    @property
    def worst_agent(self) -> int:
        """Index of the agent with the largest online cost (first one on ties, a NaN never larger; 0 if every cost is NaN).

        ``RuntimeError`` during another thread's call (its costs are being written), as every read of the state.
        """
        return self._exclusive.read(self._worst_agent)

    @property
    def regret(self) -> float:
        """Under-performer regret ``max_i J_i``: the worst client's online cost (``RuntimeError`` during another thread's call)."""
        return self._exclusive.read(lambda: float(self._J[self._worst_agent()]))

    # ------------------------------------------------------------------ step
    def step(self, signals) -> np.ndarray:
        """Advance every agent one round on its private signal.

        Parameters
        ----------
        signals : array_like, shape (N, d) (or (N,) when d = 1)
            ``s_i(t)``. Invalid rows (NaN, infinite, or beyond ``SIGNAL_LIMIT``)
            are allowed: those agents hold.

        Returns
        -------
        numpy.ndarray
            The new states ``x(t+1)``, the read-only live view :attr:`states`.
        """
        s = as_float_array("signals", signals, (self.n_agents, self.dim), allow_nonfinite=True)
        self._step(s, self._no_weights)
        return self._x_view

    def step_predict(self, signals, server: Server, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`step`, then the mixture ``server`` would publish for the new states.

        The same as ``step(signals)`` followed by ``server.predict(states)``
        to ``1e-12`` of ``sum_i p_i |x_i(t+1)|`` in each coordinate (not of the
        mixture itself: the two sums round apart, so a mixture that cancels to
        near 0 may differ from ``predict``'s by more than itself), but the step
        sums ``sum_i p_i x_i(t+1)`` inside its pass over the states, while they
        are in cache.

        Parameters
        ----------
        signals : array_like, shape (N, d) (or (N,) when d = 1)
            As for :meth:`step`.
        server : Server
            A server over the same N agents and dimension d; only read, under its lock: while another thread is
            inside one of its calls, or after an interrupted update, ``RuntimeError`` (the server's) and nothing
            changes, as for :meth:`Server.predict`.
        out : numpy.ndarray, shape (d,), optional
            Where to write ``yhat(t+1)`` (no allocation); a new array otherwise.

        Returns
        -------
        numpy.ndarray
            ``yhat(t+1)``, shape (d,).
        """
        if not isinstance(server, Server):
            raise TypeError(f"server must be a memoa_fast.Server, got {type(server).__name__}")
        if (server.n_agents, server.dim) != (self.n_agents, self.dim):
            raise ValueError(
                f"server mixes {server.n_agents} agents of dimension {server.dim}, this population has "
                f"{self.n_agents} of dimension {self.dim}: build the Server with the same n_agents and dim"
            )
        out = check_out(out, (self.dim,))
        s = as_float_array("signals", signals, (self.n_agents, self.dim), allow_nonfinite=True)
        # The step reads the server's log-weights: under the server's lock too, so that another thread's update
        # (whose two passes leave them unnormalised in between: a mixture 0.7 off, seen) or an interrupted one is
        # refused with the server's RuntimeError, before this population moves, instead of mixed in.
        with server._exclusive:
            self._step(s, server.log_weights)
        out[...] = self._yhat
        return out

    def _step(self, s, log_p) -> None:
        """One step: the backend's ``fused_step`` (two passes over memory; see :mod:`memoa_fast.kernels`).

        Interrupts: ``_exclusive.interrupted`` is set before the kernel and cleared after the last counter, so an
        exception anywhere in between (Ctrl-C lands right after the kernel returns, its results lost) leaves a
        population that refuses every call but ``load_state_dict``/``reset``, never one whose counters (``t``,
        the discount, ``n_valid_signals``, ``m(t)``) are a round behind its states.
        """
        self._refuse_step()
        ex = self._exclusive
        with ex:
            ex.interrupted = "a step"
            threads = _backends.usable_threads(self._threads_used)
            flags = self._unsignalled_classes()
            read = self._silent_and_read(flags)
            if read is not None:  # a silent class MEMOA's anchor reads (usually the first step only): pass 1 first
                self._kernels.signal_pass(self._x, s, self._labels, self._work, self._lay, not self._mean_ready, threads)
                self._stand_in_for_silent_classes(self._work, read)
            n_valid, max_cost, worst = self._kernels.fused_step(
                self._x, s, self._labels, self._J, self._work, self._lay, self._coef, self._mix, self._field,
                self._mean_ready, self._discount, log_p, self._yhat, threads,
            )
            # m(t+1) becomes the next step's m(t): no pass over the states needed for it.
            lay, K = self._lay, self._lay.n_classes
            self._field[lay.class_state:lay.class_state + K] = self._field[lay.class_next:lay.class_next + K]
            self._field[lay.field_state] = self._field[lay.field_next]
            self._mean_ready = True
            self._n_valid = n_valid
            self._worst = worst  # -1 from every kernel when no cost is above -inf (every one NaN): see worst_agent
            if flags is not None and flags.any():  # pass 1's valid counts are still in work
                flags = flags & (self._class_counts(self._work) == 0)
            self.t += 1
            self._unsignalled, self._unsignalled_t = flags, self.t
            self._discount = next_discount(self._discount, self.game.gamma, self.t)
            ex.interrupted = None

    def run(self, signals) -> np.ndarray:
        """Step through ``signals`` of shape (T, N, d) (or (T, N) when d = 1); returns the last states.

        The dtype and the shape of every step are checked before the first step (one array), and so is the round
        counter (a run that would pass round ``2**63 - 1`` is refused whole, nothing stepped). A view of
        this population's own arrays (``np.broadcast_to(pop.states, (T, N, d))``) is copied first, so every
        step reads the values it had when the call began.
        """
        steps = as_steps("signals", signals)
        self._refuse_steps(steps.shape[0])  # a run that cannot be taken whole is not begun
        if np.may_share_memory(steps, self._x) or np.may_share_memory(steps, self._J):
            steps = steps.copy()
        for s in steps:
            self.step(s)
        return self._x_view

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to resume this population exactly (copies).

        Keys: ``states``, ``costs``, ``labels`` and ``class_signalled`` (K > 1 only: which classes have had a
        valid signal, K flags 0/1), ``mean_state``,
        ``mean_signal``, ``class_mean_signal`` (arrays), ``t``, ``discount``,
        ``n_valid_signals`` and ``game`` (a dict of weights and policy).
        A checked read of the object's lock (:meth:`Exclusive.read <memoa_fast._exclusive.Exclusive.read>`, no
        hold): if another thread's call was inside a step, or began one, while it copied, ``RuntimeError`` (a
        copy taken then would mix rows of two rounds; take it again between steps), as do pickle and
        :func:`copy.copy`; that call is served, never refused because of this read.
        """
        return self._exclusive.read(lambda: self._summary_state(self._x.copy(), self._J.copy()))

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; checks everything before changing anything."""
        clean = check_population_state(state, game=self.game, n_agents=self.n_agents, dim=self.dim)
        ex = self._exclusive
        with ex.restoring:  # also after an interrupted update: this is the way back
            ex.interrupted = "load_state_dict"
            self._apply_state(clean)
            ex.interrupted = None

    def _apply_state(self, clean: dict) -> None:
        self._x[...] = clean["states"]
        self._J[...] = clean["costs"]
        self._apply_summary(clean)
        self._mean_ready = False  # the next step sums m(t) from the restored states, as a fresh run would
        self._worst = -1
        self._fresh = False

    def __reduce__(self):
        """Pickle and copies: a new, independent population of the same class (a subclass's own attributes kept), its state loaded.

        One checked read (:meth:`state_dict`, a subclass's own if it has one, and a subclass's own attributes,
        :meth:`~memoa_fast._copies.CopiesKeepTheirClass._reduce_keeping_class`): ``RuntimeError`` if another thread's
        step overlapped it, and after an interrupted one; that step is served.
        """
        def take():
            state = self.state_dict()
            config = dict(labels=state.get("labels"), backend=self.backend, threads=self.threads,
                          parallel_threshold=self.parallel_threshold)
            return (Population, (self.game, self.n_agents, self.dim), config, None), state

        return self._reduce_keeping_class(_rebuild, _POPULATION_BUILT_BY_INIT, take)

    @property
    def threads_used(self) -> int:
        """Threads the kernels run on (1 below the work-size threshold; see ``threads``)."""
        return self._threads_used

    def __repr__(self) -> str:
        return (
            f"Population({self.game!r}, n_agents={self.n_agents}, dim={self.dim}, backend={self.backend!r}, "
            f"threads={self.threads}, t={self.t})"
        )


#: The attributes :meth:`Population.__init__` sets: a copy builds them again; any other is a subclass's own.
_POPULATION_BUILT_BY_INIT = frozenset({
    "n_agents", "dim", "_kernels", "backend", "parallel_threshold", "threads", "_threads_used", "_lay", "_labels", "_coef",
    "game", "_mix", "_empty_read", "_discount", "_x", "_J", "_work", "_field", "_yhat", "_no_weights", "_x_view", "_J_view",
    "_exclusive", "_fresh", "_mean_ready", "_n_valid", "_worst", "t", "_unsignalled", "_unsignalled_t",
    "_reads_class_signal"})


def _rebuild(cls, args, config, state=None, subclass=None):
    """Unpickle :class:`Population` or a subclass: build it (its state follows, ``CopiesKeepTheirClass.__setstate__``).

    The class comes last (``subclass``); a pickle made before subclasses were kept gives ``cls`` (``Population``) and
    ``state`` only: the state is loaded at once, validated.
    """
    if state is not None:  # the labels are built with the population (a K-class one needs them)
        config = dict(config, labels=state.get("labels"))
    return build_as(subclass or cls, Population, args, config, state)


def _check_magnitude(name: str, arr: np.ndarray) -> None:
    """Refuse states beyond :data:`INITIAL_LIMIT`: a cost built from them could overflow, and a checkpoint refuses them.

    ``INITIAL_LIMIT`` is ``SIGNAL_LIMIT`` (1e50) with a margin of ``2**-21`` for rounding, half the margin of a saved
    state's states (``STATE_LIMIT``), so that every state a population reaches from them saves.
    """
    top = float(np.max(np.abs(arr))) if arr.size else 0.0
    if top > INITIAL_LIMIT:
        raise ValueError(f"{name} must be at most 1e+50 in magnitude (SIGNAL_LIMIT, with a margin of 2**-21 for rounding: "
                         f"{INITIAL_LIMIT!r}; so that no cost can overflow and every state reached saves), got {top!r}")
