"""The fused time-series pipeline: forecasters, population and server in one compiled round.

MODEL.md sections 5 and 6 for one policy and one server rule, with every
client's noise drawn inside the kernel. :meth:`Pipeline.round` does in two
passes over the clients what ``ClientForecasters.observe``,
``Population.step``, ``Server.predict`` and ``Server.update`` do in six or
more; :meth:`Pipeline.run` does a whole series in one compiled call, with
one pass per round for the hedge rule, and the same bits (see
:mod:`memoa_fast.kernels` ``_pipeline_reference`` for the exact semantics,
and ``bench/bench_fused_pipeline.py`` for the speed).
"""
from __future__ import annotations

import importlib
import math

import numpy as np

from .. import _backends
from .._copies import CopiesKeepTheirClass, build_as
from .._exclusive import Exclusive
from .._memory import staggered_zeros
from .._validation import (
    as_target_array,
    check_bool,
    check_choice,
    check_int,
    check_out,
    check_real,
    check_seed,
    check_sizes,
    readonly_view,
)
from ..game import Game
from ..kernels import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, RULE_EG, RULE_HEDGE, SIGNAL, SQUARE_CAP, Q, R, next_discount
from .forecasters import CAP_RECORD, _check_noise_range, check_square_cap, warn_uncapped

__all__ = ["Pipeline", "PIPELINE_BACKENDS"]

PIPELINE_BACKENDS = ("numba", "numpy")
_MODULES = {"numba": "memoa_fast.kernels._pipeline_numba", "numpy": "memoa_fast.kernels._pipeline_reference"}
_RULES = {"eg": RULE_EG, "hedge": RULE_HEDGE}
# Pipeline.run returns to Python after at most this much work per compiled call, counted in client-coordinates x rounds
# (N d per round, plus _ROUND_VALUES for a round's fixed cost): Python acts on Ctrl-C (or any signal) only between
# two bytecodes, never inside a compiled call, so one call for a whole series of 1e6 clients x 1e5 rounds was
# minutes with Ctrl-C dead. 2**24 is 0.1-0.25 s on one thread (6.5-15 ns per client-round measured, 2026-11, this
# shared machine); a new call costs one unfused round (pass A and pass B each alone: about one extra sweep), 1 in
# >= 160 rounds at 1e5 clients, within noise (ratio 0.97-1.00 at 1e5 x 1000). The bits do not depend on it.
_SEGMENT_WORK = 2**24
# A round's fixed cost (merges, flags, a parallel region) in client-round equivalents: 4.5 us at N = 1, about 400 x 12 ns.
_ROUND_VALUES = 512
# flags[F_RECORD] from before a compiled call until its end: a finished run_rounds leaves the last round's 0 or 1 there
# (its last write, flags[:] = the last round's flags), so the marker tells whether a call that was interrupted had run.
_UNFINISHED = -1


def load_pipeline_kernels(backend: str):
    """The fused-round kernel module: ``numba`` (compiled) or ``numpy`` (the reference)."""
    backend = check_choice("backend", backend, PIPELINE_BACKENDS)
    return importlib.import_module(_MODULES[backend])


class Pipeline(CopiesKeepTheirClass):
    """N forecasting clients, their single-class population and a server, stepped one round per call.

    Parameters
    ----------
    n_clients : int
        Clients N >= 1.
    dim : int, default 1
        Dimension d of the stream.
    game : Game, optional
        A single-class game (any policy); default ``Game(q=1, kappa=1, r=0.1,
        gamma=0.9)``, the experiment's.
    rule : {"hedge", "eg"}, default "hedge"
        The server's rule (see :class:`~memoa_fast.Server`).
    eta : float, default 0.5
        Server learning rate, ``>= 0``.
    alpha : float, default 0.01
        Fixed share, in ``[0, 1]``.
    lags : int, default 2
        ``p``, the past noisy values in each forecaster's features
        ``[lags, lags^2, 1]``; ``p = 2`` runs a written-out loop.
    noise_range : (float, float), default (0.02, 1.0)
        ``sigma_i`` is log-uniform on ``[low, high]``, ``0 < low <= high``.
    mu : float, default 0.1
        NLMS step size, in ``(0, 2)``.
    seed : int, default 0
        Seed of the noise scales and of the noise, an integer in ``[0, 2**63 - 1]``.
    backend : {"numba", "numpy"}, default "numba"
        ``numpy`` runs the slow reference.
    threads : int, optional
        Kernel threads (as for :class:`~memoa_fast.Population`): the default
        uses every core for rounds of at least ``2**15`` values (N x d: a
        round is compute-bound, so two threads pay off, even with a second
        process running, from fewer values than a population step's
        ``2**20``).
    parallel_threshold : int, default 8192
        Fewer clients always run on one thread.

    Notes
    -----
    Round ``t`` (:meth:`round` with the target ``y(t)``), with ``x(t)`` the
    states published last round:

    1. (``t >= 1``) the server reweights on ``x(t)`` against ``y(t)``:
       ``log p_i -= eta loss_i`` (hedge: ``|x_i - y|^2``; eg:
       ``2 <e, x_i - y(t)>`` with ``e = sum_k p_k (x_k(t) - y(t-1)) -
       (y(t) - y(t-1))``, the :class:`~memoa_fast.Server`'s
       ``e = sum_k p_k (x_k - y)`` from differences only: a common shift of
       the states and targets moves no weight beyond its own rounding; the
       centred sum is step 4's, done last round, where ``y(t)`` is not yet
       known); each client's squared error is recorded;
    2. client ``i`` observes ``z_i = y(t) + sigma_i eps_i(t)`` and runs
       normalised LMS (``w_i += mu e_i phi_i / |phi_i|^2``, ``t >= 1``), then
       forecasts ``s_i(t)``;
    3. the log-weights are normalised (log-sum-exp) and shared,
       ``p <- (1 - alpha) p + alpha / N``; the population steps on ``s(t)``
       (``x(t+1)``, the costs, the worst client);
    4. it returns ``yhat(t+1) = sum_i p_i x_i(t+1)`` (eg also keeps
       ``sum_i p_i (x_i(t+1) - y(t))`` and ``y(t)`` for the next step 1).

    This is exactly ``observe``, ``step``, ``predict`` and ``update`` of the
    unfused objects, with the server's update on ``y(t)`` done at the start
    of round ``t`` instead of the end of round ``t - 1``. The noise
    ``eps_i(t)`` is a counter-based Box-Muller normal of ``(seed, i, t, j)``
    (SplitMix64): the same on any thread count, and any slice of clients
    reproduces those clients' draws. It differs from
    :class:`~memoa_fast.forecasters.ClientForecasters`' PCG64 stream.

    A Pipeline is not thread-safe: a call while another thread is inside one
    raises ``RuntimeError`` and changes nothing (one object per thread).

    Interrupts (Ctrl-C, or an exception from a signal handler): :meth:`run`
    returns to Python between segments of about 0.1-0.2 s, so an interrupt
    acts within that; afterwards the pipeline is at the end of the last
    round done (:attr:`t`), whatever bytecode the interrupt landed on, and
    continues with the same bits. With ``backend="numpy"`` (Python, which
    an interrupt can stop inside a round) a pipeline interrupted inside its
    kernel refuses every call but :meth:`reset` with a ``RuntimeError``
    saying so; restore a copy or pickle taken before.

    Examples
    --------
    >>> import numpy as np
    >>> from memoa_fast import Pipeline
    >>> pipe = Pipeline(1000, seed=1, backend="numpy")
    >>> y = np.sin(np.arange(50) / 3.0)
    >>> for value in y[:40]:
    ...     yhat = pipe.round(value)
    >>> predictions = pipe.run(y[40:])  # the other ten rounds in one call, the same bits
    >>> pipe.t, yhat.shape, predictions.shape
    (50, (1,), (10, 1))
    """

    def __init__(
        self,
        n_clients: int,
        dim: int = 1,
        *,
        game: Game | None = None,
        rule: str = "hedge",
        eta: float = 0.5,
        alpha: float = 0.01,
        lags: int = 2,
        noise_range: tuple[float, float] = (0.02, 1.0),
        mu: float = 0.1,
        seed: int = 0,
        backend: str = "numba",
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
    ):
        self.n_clients = check_int("n_clients", n_clients, low=1)
        self.dim = check_int("dim", dim, low=1)
        if game is None:
            game = Game(q=1.0, kappa=1.0, r=0.1, gamma=0.9)
        if not isinstance(game, Game):
            raise TypeError(f"game must be a memoa_fast.Game, got {type(game).__name__}")
        if game.n_classes != 1:
            raise ValueError(f"game must have one class (a Pipeline runs a single-class population), got n_classes={game.n_classes}")
        self.game = game
        self.rule = check_choice("rule", rule, tuple(_RULES))
        self.eta = check_real("eta", eta, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        self.lags = check_int("lags", lags, low=1)
        # x, s (N, d); the forecasters' weights (2p + 1, N, d) and lags (p, N, d); six (N,) arrays: before allocating
        check_sizes(self.n_clients, self.dim, per_agent_vectors=3 * self.lags + 3, per_agent_scalars=6, what="pipeline",
                    names=("n_clients", "dim"), detail=f", lags={self.lags}")
        self.noise_range = _check_noise_range(noise_range)
        self.mu = check_real("mu", mu, low=0.0, high=2.0, low_open=True, high_open=True)
        self.seed = check_seed("seed", seed)
        self.backend = check_choice("backend", backend, PIPELINE_BACKENDS)
        self._kern = load_pipeline_kernels(self.backend)
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self._threads_used = _backends.resolve_threads(threads, self.n_clients, self.parallel_threshold,
                                                                     self.dim, default_work=_backends.PIPELINE_PARALLEL_WORK)
        k = self._kern
        n, d, p = self.n_clients, self.dim, self.lags
        self._key, scale_key = k.seed_keys(self.seed)
        # the arrays a round streams through together, each starting on its own cache line of a page (_memory.py)
        (self._x, self._s, self._J, self._log_p, self._ebuf, self._sigma, self._sq_err, self._sq_sig, self._weights,
         self._lag_buf) = staggered_zeros([(n, d), (n, d), (n,), (n,), (n,), (n,), (n,), (n,), (2 * p + 1, n, d), (p, n, d)])
        self._sigma[...] = k.noise_scales(scale_key, 0, n, *self.noise_range)
        self._y = np.zeros(d)
        self._yhat = np.zeros(d)
        self._y_rows, self._yhat_rows = self._y.reshape(1, d), self._yhat.reshape(1, d)  # round(): a series of one
        self._field = np.zeros((k.FIELD_ROWS, d))
        self._work = np.zeros(k.work_shape(n, d))
        self._params = np.zeros(k.N_PARAMS)
        self._flags = np.zeros(k.N_FLAGS, dtype=np.int64)
        self._stats = np.zeros(k.N_STATS)
        table = game.table
        prm = self._params
        prm[k.P_ETA], prm[k.P_ALPHA], prm[k.P_MU] = self.eta, self.alpha, self.mu
        prm[k.P_GAIN], prm[k.P_SIGNAL] = table.coef[0, GAIN], table.coef[0, SIGNAL]
        prm[k.P_Q], prm[k.P_KAPPA], prm[k.P_R] = table.coef[0, Q], table.coef[0, KAPPA], table.coef[0, R]
        prm[k.P_MIX_SIGNAL], prm[k.P_MIX_STATE] = table.mix[MIX_SIGNAL, 0, 0], table.mix[MIX_STATE, 0, 0]
        self._flags[k.F_RULE] = _RULES[self.rule]
        # with a share floor alpha / N no weight can underflow: keep p itself (the kernel then needs no log per client)
        self._linear = self.alpha / n >= k.LINEAR_FLOOR
        self._flags[k.F_LINEAR] = self._linear
        self._exclusive = Exclusive("Pipeline", recover="reset(), or continue from a copy or pickle taken before")
        self._reference = self.backend == "numpy"  # Python: an interrupt can stop it inside a round
        self._segment_rounds = max(1, _SEGMENT_WORK // (n * d + _ROUND_VALUES))  # rounds per compiled call of run()
        self._pending = None
        self._views = {name: readonly_view(getattr(self, name)) for name in ("_x", "_s", "_J", "_log_p", "_sq_err",
                                                                          "_sq_sig", "_sigma", "_yhat")}
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to round 0: states, costs, errors and forecasters zeroed, uniform weights; same noise."""
        ex = self._exclusive
        with ex.restoring:  # also after an interrupted round: reset is a way back
            ex.interrupted = "reset"
            self._reset()
            ex.interrupted = None

    def _reset(self) -> None:
        self._x[...] = 0.0
        self._s[...] = 0.0
        self._J[...] = 0.0
        self._log_p[...] = -math.log(self.n_clients)
        self._ebuf[...] = np.exp(self._log_p)  # the weights themselves when self._linear
        self._weights[...] = 0.0
        self._weights[0] = 1.0  # persistence: the first forecast is the first noisy observation
        self._lag_buf[...] = 0.0
        self._sq_err[...] = 0.0
        self._sq_sig[...] = 0.0
        self._yhat[...] = 0.0
        self._field[...] = 0.0  # m(0) = mean of the zero states
        self._stats[...] = 0.0
        self._stats[self._kern.S_ARG_COST] = -1.0
        self._t = 0
        self._n_recorded = 0
        self._discount = 1.0
        self._pending = None

    # ------------------------------------------------------------------ counters
    @property
    def t(self) -> int:
        """The round counter: rounds done since construction or :meth:`reset` (also after an interrupted :meth:`run`).

        Read from another thread during a :meth:`run`, the rounds of the segments done so far.
        """
        return self._t if self._pending is None else self._counts()[0]

    @t.setter
    def t(self, value: int) -> None:
        self._t = value

    @property
    def n_recorded(self) -> int:
        """How many rounds added their squared errors (``record=True``, round >= 1)."""
        return self._n_recorded if self._pending is None else self._counts()[1]

    @n_recorded.setter
    def n_recorded(self, value: int) -> None:
        self._n_recorded = value

    def _counts(self) -> tuple:
        """``(t, n_recorded)`` with a compiled call that an interrupt cut off counted if it ran; nothing is written.

        A read, so it never takes the lock: a reader (a thread monitoring a :meth:`run`) must never make the
        writer's next call fail as "being used by another thread". ``RuntimeError`` after an interrupted round of
        the reference backend (marked, and no call running). See :meth:`_settle`.
        """
        pending, ex = self._pending, self._exclusive
        if pending is None:
            return self._t, self._n_recorded
        if ex.interrupted is not None:
            # Marked: a reference round running in another thread (it holds the lock), or one an interrupt cut off:
            # no call holds the lock and _pending is still this call's (a call that ended or began since would have
            # replaced it: every call sets _pending before its mark and clears it after, all under the lock).
            if not ex._slot and ex.interrupted is not None and self._pending is pending:
                raise RuntimeError(ex.interrupted_message())
        elif self._flags[self._kern.F_RECORD] != _UNFINISHED:
            t0, T, record, n0, _ = pending
            return t0 + T, n0 + (T - (t0 == 0) if record else 0)
        return self._t, self._n_recorded

    def _settle(self) -> None:
        """Finish the bookkeeping of a compiled call that an interrupt cut off (the caller holds ``_exclusive``).

        ``_pending`` is set before each compiled call and cleared after its counters: when it is still set, an
        exception came in between. The call's own last write tells whether it ran: ``flags[F_RECORD]`` is
        ``_UNFINISHED`` until then (a compiled call runs whole or not at all). If it ran, the counters are computed
        from ``_pending`` (absolute values: settling twice is harmless); if not, nothing moved. The reference
        backend marks ``_exclusive.interrupted`` instead (it may have stopped inside a round).
        """
        if self._pending is None or self._exclusive.interrupted is not None:
            return
        self._t, self._n_recorded, self._discount = self._settled()
        self._pending = None

    def _settled(self) -> tuple:
        """``(t, n_recorded, discount)`` as :meth:`_settle` leaves them; writes nothing (a copy's counters).

        For a caller that holds the lock, or checks it (``Exclusive.read``), with no mark set.
        """
        pending = self._pending
        if pending is None or self._flags[self._kern.F_RECORD] == _UNFINISHED:
            return self._t, self._n_recorded, self._discount
        t0, T, _, _, discount = pending
        gamma = self.game.gamma
        for j in range(1, T + 1):  # the kernel's rule (run_rounds), round by round
            discount = next_discount(discount, gamma, t0 + j)
        return (*self._counts(), discount)

    def round(self, y, record: bool = True) -> np.ndarray:
        """One round on the target ``y(t)``; returns ``yhat(t+1)``.

        Parameters
        ----------
        y : float or array_like, shape (d,)
            The stream's value at this round: finite, ``|y| <= TARGET_LIMIT`` (``1e30``) in every
            coordinate, as for :meth:`ClientForecasters.observe <memoa_fast.timeseries.forecasters.ClientForecasters.observe>`
            (beyond it the forecasters' squared features overflow); otherwise ``ValueError`` and nothing changes.
        record : bool, default True
            Add this round's squared errors of the states ``x(t)`` and of the
            raw forecasts ``s(t-1)`` against ``y(t)`` to :attr:`squared_errors`
            and :attr:`signal_squared_errors` (from round 1 on; round 0 has no
            forecast of ``y(0)``). Pass ``False`` during a burn-in.

        Returns
        -------
        numpy.ndarray
            ``yhat(t+1)``, shape (d,): the read-only live buffer, overwritten
            by the next round (copy it to keep it).
        """
        y = as_target_array("y", y, (self.dim,))
        record = check_bool("record", record)
        with self._exclusive:
            if self._pending is not None:
                self._settle()
            self._y[...] = y
            self._segment(self._y_rows, self._yhat_rows, record)  # _rounds of one target, without its loop
        return self._views["_yhat"]

    def run(self, series, record: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`round` on every value of ``series``, in a few compiled calls; returns every ``yhat(t+1)``.

        The same bits as calling :meth:`round` on each value in turn, only
        faster: with the hedge rule, pass B of one round and pass A of the next
        run in one sweep over the clients (see ``run_rounds`` in
        ``memoa_fast.kernels._pipeline_numba``), and Python is entered once per
        segment of rounds of bounded work (about 0.1-0.2 s: ``_SEGMENT_WORK``),
        so Ctrl-C acts within a fraction of a second. An interrupt leaves the
        pipeline at the end of the last segment done: :attr:`t` says which
        round, the rows of the predictions up to there are written, and a
        further call continues from there with the same bits.
        Nothing of size T is allocated besides the predictions (none with ``out``).

        Parameters
        ----------
        series : array_like, shape (T, d) or (T,) when d = 1
            The targets ``y(t), y(t+1), ...``; finite with ``|y| <= 1e30``, all checked before the first
            round (one bad value: ``ValueError``, nothing changes). ``T = 0`` does nothing.
        record : bool, default True
            As for :meth:`round`, for every round of the series.
        out : numpy.ndarray, optional
            C-contiguous float64 array of shape (T, d) for the predictions
            (spares the allocation when a caller runs many series). It may
            not overlap ``series``. A ``series`` that is a view of this
            pipeline's own arrays (:attr:`signals`, :attr:`states`, ...) is
            copied first, so it reads the values it had when the call began.

        Returns
        -------
        numpy.ndarray
            Shape (T, d): row ``k`` is the ``yhat(t+1)`` that :meth:`round`
            returns for ``series[k]`` (``out`` when given).
        """
        try:
            T = len(series)
        except TypeError:  # a scalar, a 0-d array
            raise ValueError(f"series must have shape (T, {self.dim}), got {type(series).__name__} "
                             f"of shape {np.shape(series)}") from None
        ys = as_target_array("series", series, (T, self.dim))
        record = check_bool("record", record)
        out = check_out(out, (T, self.dim), contiguous=True)
        if np.shares_memory(out, ys):
            raise ValueError("out must not share memory with series (the targets are read while out is written)")
        if any(np.may_share_memory(ys, getattr(self, name)) for name in _STATE_ARRAYS):
            ys = ys.copy()  # a view of this pipeline's own arrays (run(pipe.signals[:, 0])): the kernel writes them
        if T:
            with self._exclusive:
                self._rounds(ys, out, record)
        return out

    def _rounds(self, ys: np.ndarray, yhats: np.ndarray, record: bool) -> None:
        """The kernel's ``run_rounds`` on the targets ``ys`` (T >= 1, d), predictions into ``yhats``, and the bookkeeping.

        :meth:`round` is this with one target (``ys`` and ``yhats`` views of its
        buffers; it calls :meth:`_segment` directly): one code path for both calls. The caller holds ``_exclusive``.
        A long series runs in segments of ``_segment_rounds`` rounds, one compiled call each (Python in between).
        """
        if self._pending is not None:
            self._settle()
        T, step = ys.shape[0], self._segment_rounds
        for a in range(0, T, step):
            self._segment(ys[a:a + step], yhats[a:a + step], record)

    def _segment(self, ys: np.ndarray, yhats: np.ndarray, record: bool) -> None:
        """One compiled ``run_rounds`` call and its counters, in an order that an interrupt anywhere cannot tear.

        The marker first (``flags[F_RECORD] = _UNFINISHED``: the kernel's last write replaces it), then
        ``_pending`` (what :meth:`_settle` needs to finish the bookkeeping if the counters below are never
        reached), the kernel, the counters, and ``_pending = None`` last. The reference backend, being Python,
        can stop inside a round: it marks ``_exclusive.interrupted`` for the length of the call (set after
        ``_pending``, cleared before it, so a marked pipeline always has ``_pending`` set).
        """
        k, flags = self._kern, self._flags
        T, t0, n0, discount = ys.shape[0], self._t, self._n_recorded, self._discount
        flags[k.F_RECORD] = _UNFINISHED
        flags[k.F_T] = t0
        self._pending = (t0, T, record, n0, discount)
        if self._reference:
            self._exclusive.interrupted = "a round"
        discount, recorded = k.run_rounds(
            self._x, self._s, self._J, self._log_p, self._ebuf, self._sigma, self._weights, self._lag_buf, self._sq_err,
            self._sq_sig, ys, self._yhat, yhats, self._field, self._work, self._params, self._key, flags,
            self._stats, _backends.usable_threads(self._threads_used), record, self.game.gamma, discount)
        self._t, self._n_recorded, self._discount = t0 + T, n0 + recorded, discount
        if self._reference:
            self._exclusive.interrupted = None
        self._pending = None

    # ------------------------------------------------------------------ views and reads
    # The views are of the live buffers: they cannot refuse, and read while another thread is inside a round they
    # show values of two rounds (not a snapshot; copy them between calls, or take a copy or pickle of the pipeline).
    # Every other read (a copy, a scalar) is checked against the lock (Exclusive.read, no hold taken): the writers'
    # RuntimeError during another thread's round (it used to return a mixture of two rounds) and after an
    # interrupted one. Not t and n_recorded: counters a thread monitoring a run reads, each one value stored at a
    # segment's end (see _counts).
    @property
    def states(self) -> np.ndarray:
        """``x(t)``, shape (N, d), each client's published forecast of the next value: read-only live view.

        Not a snapshot while another thread is inside a round (a view cannot refuse): copy it between calls.
        """
        return self._views["_x"]

    @property
    def signals(self) -> np.ndarray:
        """``s(t-1)``, the forecasters' last outputs, shape (N, d): read-only live view."""
        return self._views["_s"]

    @property
    def costs(self) -> np.ndarray:
        """Discounted online costs ``J_i``, shape (N,): read-only live view."""
        return self._views["_J"]

    @property
    def log_weights(self) -> np.ndarray:
        """The server's ``log p``, shape (N,): a read-only live view, or a new array when ``alpha > 0``.

        With a positive share (``alpha / N >= 1e-290``) the kernel keeps the
        weights ``p`` themselves (no weight can underflow), and this is ``log p``
        (a checked read, no hold taken: ``RuntimeError`` during another thread's round).
        """
        if self._linear:
            out = self._exclusive.read(np.log, self._ebuf)
            out.flags.writeable = False
            return out
        return self._views["_log_p"]

    @property
    def weights(self) -> np.ndarray:
        """``p = exp(log p)`` (a new array; ``RuntimeError`` during another thread's round)."""
        return self._exclusive.read(lambda: self._ebuf.copy() if self._linear else np.exp(self._log_p))

    @property
    def mixture(self) -> np.ndarray:
        """``yhat(t)``, the last mixture returned: read-only live view."""
        return self._views["_yhat"]

    @property
    def squared_errors(self) -> np.ndarray:
        """``sum_t |x_i(t) - y(t)|^2`` over the recorded rounds, shape (N,): read-only live view."""
        return self._views["_sq_err"]

    @property
    def signal_squared_errors(self) -> np.ndarray:
        """``sum_t |s_i(t-1) - y(t)|^2`` over the recorded rounds (the raw forecasts), shape (N,): read-only live view."""
        return self._views["_sq_sig"]

    @property
    def last_error_sum(self) -> float:
        """``sum_i |x_i(t) - y(t)|^2`` of the last recorded round (0 when it was not recorded)."""
        return self._exclusive.read(lambda: float(self._stats[self._kern.S_ERR]))

    @property
    def noise_scales(self) -> np.ndarray:
        """``sigma_i``, shape (N,): read-only."""
        return self._views["_sigma"]

    @property
    def forecaster_weights(self) -> np.ndarray:
        """NLMS weights, shape (N, d, 2p + 1), ordered ``[lags, min(lags^2, SQUARE_CAP), 1]`` (a copy)."""
        # .copy(): np.ascontiguousarray returns the transposed view itself when it is contiguous already (N = d = 1)
        return self._exclusive.read(lambda: np.moveaxis(self._weights, 0, -1).copy())

    @property
    def mean_state(self) -> np.ndarray:
        """``m(t)``, the mean state; a copy."""
        return self._exclusive.read(self._field[self._kern.FIELD_STATE].copy)

    @property
    def mean_signal(self) -> np.ndarray:
        """``sbar``, the mean valid signal of the last round; a copy."""
        return self._exclusive.read(self._field[self._kern.FIELD_SIGNAL].copy)

    @property
    def n_valid_signals(self) -> int:
        """How many clients had a valid signal in the last round."""
        return self._exclusive.read(lambda: int(self._stats[self._kern.S_VALID]))

    @property
    def worst_client(self) -> int:
        """The client with the largest online cost (first on ties, NaN never larger; -1 before the first round or if every cost is NaN)."""
        return self._exclusive.read(lambda: int(self._stats[self._kern.S_ARG_COST]))

    @property
    def regret(self) -> float:
        """Under-performer regret ``max_i J_i``: the cost of :attr:`worst_client` (NaN never larger; NaN if every cost is)."""
        return self._exclusive.read(self._regret)

    def _regret(self) -> float:
        worst = int(self._stats[self._kern.S_ARG_COST])
        return float(self._J[worst]) if worst >= 0 else float(self._J.max())

    # ------------------------------------------------------------------ copies
    def __reduce__(self):
        """Pickle, ``copy.copy`` and ``copy.deepcopy``: a new, independent Pipeline that continues this one bitwise.

        Each builds a Pipeline with the same arguments and copies every state array into it (:meth:`_load_saved`);
        a subclass's copy is of its class, with its own attributes (:mod:`memoa_fast._copies`). One checked read
        (no hold): ``RuntimeError`` if another thread's round overlapped it (that round is served), and after an
        interrupted one; the counters of a compiled call an interrupt cut off are counted as the next call would
        (:meth:`_settled`), without writing them.
        """
        config = dict(game=self.game, rule=self.rule, eta=self.eta, alpha=self.alpha, lags=self.lags,
                      noise_range=self.noise_range, mu=self.mu, seed=self.seed, backend=self.backend, threads=self.threads,
                      parallel_threshold=self.parallel_threshold)

        def take():
            arrays = {name: getattr(self, name).copy() for name in _STATE_ARRAYS}
            t, n_recorded, discount = self._settled()
            counters = {"t": t, "n_recorded": n_recorded, "_discount": discount, CAP_RECORD: float(SQUARE_CAP)}
            return (self.n_clients, self.dim, config, None, None), (arrays, counters)

        return self._reduce_keeping_class(_rebuild_pipeline, _PIPELINE_BUILT_BY_INIT, take)

    def _load_saved(self, saved) -> None:
        """Copy the pickled ``(arrays, counters)`` in: shapes, dtypes and the squared features' cap checked first.

        The counters record the squared features' cap (:func:`~memoa_fast.timeseries.forecasters.check_square_cap`):
        another one is refused, none (a pickle made before the cap) loads with an ``UncappedStateWarning``. A pickle
        made before eg's centred mixture (a ``_field`` of 4 rows) loads too (:meth:`_from_before_centre`).
        """
        arrays, counters = saved
        cap_key = f"pipeline/counters/{CAP_RECORD}"
        recorded = check_square_cap(counters, cap_key)
        if set(arrays) != set(_STATE_ARRAYS):
            raise ValueError(f"a pickled Pipeline must hold the arrays {sorted(_STATE_ARRAYS)}, got {sorted(arrays)}")
        values = {name: np.asarray(arrays[name]) for name in _STATE_ARRAYS}
        values = self._from_before_centre(values)
        for name, value in values.items():
            target = getattr(self, name)
            if value.shape != target.shape or value.dtype != target.dtype:
                raise ValueError(f"a pickled Pipeline's {name} must be {target.dtype} of shape {target.shape}, "
                                 f"got {value.dtype} of shape {value.shape}")
        for name, value in values.items():
            getattr(self, name)[...] = value
        self.t, self.n_recorded, self._discount = int(counters["t"]), int(counters["n_recorded"]), float(counters["_discount"])
        if not recorded:  # last: the warning says the pickle loads
            warn_uncapped(cap_key)

    def _from_before_centre(self, values: dict) -> dict:
        """A pickle made before eg's centred mixture (389e086 and earlier: ``_field`` of 4 rows) in today's shapes.

        eg's loss reads ``field[FIELD_DEV] = sum_i p_i (x_i(t) - c)`` and its centre ``field[FIELD_CENTRE] = c``, which
        the last round's pass B wrote with ``c = y(t-1)``; such a pickle does not hold ``y(t-1)`` (``run`` never
        stored it), so they are derived with ``c = 0``: ``dev = sum_i p_i (x_i(t) - 0)`` is the stored ``yhat(t)``
        itself (``x - 0 = x``: the same products summed in the same order). Its first eg step is then measured from
        0, as that version's were (``e = yhat(t) - y(t)``), and every later one from the last target. ``_work`` is
        scratch between rounds (each round's pass A writes what its merges and pass B read): an old one is not copied.
        """
        k, field, work = self._kern, values["_field"], values["_work"]
        old_shape = (k.FIELD_ROWS_BEFORE_CENTRE, self.dim)
        if field.shape != old_shape or field.dtype != np.float64 or values["_yhat"].shape != (self.dim,):
            return values  # today's shapes, or refused by the caller's checks
        new = np.zeros(self._field.shape)
        new[:k.FIELD_ROWS_BEFORE_CENTRE] = field
        new[k.FIELD_CENTRE] = 0.0
        new[k.FIELD_DEV] = values["_yhat"]
        values = {**values, "_field": new}
        if work.ndim == 2 and work.shape[0] == self._work.shape[0] and work.shape[1] < self._work.shape[1]:
            values["_work"] = np.zeros(self._work.shape)
        return values

    def __repr__(self) -> str:
        return (
            f"Pipeline(n_clients={self.n_clients}, dim={self.dim}, game={self.game!r}, rule={self.rule!r}, "
            f"eta={self.eta!r}, alpha={self.alpha!r}, lags={self.lags}, noise_range={self.noise_range}, mu={self.mu!r}, "
            f"seed={self.seed}, backend={self.backend!r}, threads={self.threads}, t={self._t})"
        )


#: Every array a Pipeline's rounds read or write (besides the noise key, a function of the seed).
_STATE_ARRAYS = ("_x", "_s", "_J", "_log_p", "_ebuf", "_sigma", "_sq_err", "_sq_sig", "_weights", "_lag_buf", "_y", "_yhat",
                 "_field", "_work", "_params", "_flags", "_stats")


#: The attributes :meth:`Pipeline.__init__` sets: a copy builds them again; any other is a subclass's own.
_PIPELINE_BUILT_BY_INIT = frozenset({
    "n_clients", "dim", "game", "rule", "eta", "alpha", "lags", "noise_range", "mu", "seed", "backend", "_kern",
    "parallel_threshold", "threads", "_threads_used", "_key", "_y_rows", "_yhat_rows", "_linear", "_exclusive", "_reference",
    "_segment_rounds", "_pending", "_views", "_t", "_n_recorded", "_discount", *_STATE_ARRAYS})


def _rebuild_pipeline(n_clients, dim, config, arrays=None, counters=None, cls=Pipeline):
    """Unpickle a :class:`Pipeline` or a subclass: build it from its arguments (its arrays follow, :meth:`Pipeline._load_saved`).

    A pickle made before subclasses were kept gives ``arrays`` and ``counters`` here (and no ``cls``): copied in at once.
    """
    return build_as(cls, Pipeline, (n_clients, dim), config, None if arrays is None else (arrays, counters))
