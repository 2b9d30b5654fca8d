"""The server: an online mixture of the clients' predictions."""
from __future__ import annotations

import math

import numpy as np

from . import _backends
from ._copies import CopiesKeepTheirClass, build_as
from ._exclusive import Exclusive
from ._state import RULES, check_server_state, server_state
from ._validation import MAX_COUNT, as_float_array, check_choice, check_int, check_out, check_real, check_sizes, readonly_view
from .kernels import RULE_EG, RULE_HEDGE, layout, work_shape

RULE_CODES = {"eg": RULE_EG, "hedge": RULE_HEDGE}


class Server(CopiesKeepTheirClass):
    """Mixes N client predictions with online weights kept in the log domain.

    Parameters
    ----------
    n_agents : int
        Number of clients N >= 1.
    dim : int, default 1
        Dimension d of a prediction.
    rule : {"hedge", "eg"}, default "hedge"
        ``eg``: exponentiated gradient on the mixture's squared loss,
        ``g_i = 2 <yhat - y, x_i - y>`` (see Notes); ``hedge``: exponentially
        weighted forecaster on each client's own loss ``|x_i - y|^2``.
    eta : float, default 1.0
        Learning rate, ``eta >= 0``.
    alpha : float, default 0.0
        Fixed share in [0, 1]: after each update ``p <- (1 - alpha) p + alpha/N``,
        which lets the weights follow drift.
    backend, threads, parallel_threshold
        As for :class:`~memoa_fast.Population`.

    Notes
    -----
    The mixture is :math:`\\hat y = \\sum_i p_i x_i` with ``p = 1/N`` at start.
    An update on the target ``y`` is

    .. math::

        \\log p_i \\leftarrow \\log p_i - \\eta g_i - \\log\\sum_j e^{\\log p_j - \\eta g_j},
        \\qquad p \\leftarrow (1-\\alpha) p + \\alpha/N,

    with the normalisation by log-sum-exp, so that weights never underflow
    (plain weights do at N = 10^7), computed as ``(log p - top) - log total``
    so that it stays exact when the log-weights are huge and nearly tied.

    For ``eg`` the gradient is computed from differences only,

    .. math::

        g_i = 2 \\langle e, x_i - y \\rangle, \\qquad
        e = \\sum_k p_k (x_k - y) = \\hat y - y,

    the textbook :math:`2 \\langle \\hat y - y, x_i \\rangle` less the common
    :math:`2 \\langle \\hat y - y, y \\rangle`, which the normalisation removes:
    so a common shift ``b`` of the states and the target changes the weights
    only through the rounding of ``x_i + b`` and ``y + b`` themselves (not at
    all when they are exact). Computed from ``x_i`` and a rounded ``yhat``,
    each step carried an error ``eps |b| |yhat - y|``: the weights of 200
    clients of spread 1 moved by 5e-5 in 300 rounds at ``b = 1e12``. A
    coordinate with ``e_j = 0`` adds 0 (it is measured from 0 there, where
    ``x_ij - y_j`` could overflow), so does ``x_ij = y_j`` beside an
    overflowed ``e_j``, and a client of weight 0 adds nothing to ``e``.

    Every finite step ``eta g_i`` is applied as it is, however large, so the
    steps keep their order (a common shift of the ``g_i`` changes nothing:
    with every step beyond ``1e300`` the smallest still takes the weight).
    Only a step whose computation overflows (``g_i`` or ``eta g_i`` beyond
    the largest double, or eg's ``inf - inf``; eg's differences ``x_i - y``
    and ``e`` overflow only where a state or the target is beyond half the
    largest double, but ``g_i`` wherever ``|e| |x_i - y|`` is: a target
    ``1e160`` away from states ``0, 1, 2`` now clips every step alike, where
    the textbook ``2 <e, x_i>`` kept them apart) is clipped, to the largest
    double ``1.8e308`` (``-1.8e308`` for ``-inf``): such a client keeps only
    the fixed share ``alpha / N`` (0 at ``alpha = 0``) beside any client with
    a nonzero weight whose step is at most half that, and the clients with
    nonzero weights whose steps all overflow tie (their previous weights are
    forgotten; a zero weight stays 0). The log-weights are rounded to the
    precision of the steps: with steps near
    ``1e20`` their differences below about ``1e4`` are lost. So the weights
    always sum to 1 (within rounding) and are never NaN, whatever finite
    states and targets arrive; a weight may be exactly 0 (log-weight
    ``-inf``) when ``alpha = 0``.

    The ``eg`` rule feeds its own mixture back into every step, so with a
    large ``eta`` rounding differences could grow round after round. Backends
    that round the states an ulp apart (Cython's fused multiply-adds, the
    reference) gave mixtures within 1.4e-15 of one another after 300 rounds
    at ``eta = 0.5``, ``2`` and ``5`` (``alpha = 0.01``, 5000 clients of a
    sine, d = 3, through ``run_experiment``; a test checks 1e-12). On one
    backend the bits never depend on the thread count.

    A Server is not thread-safe (concurrent calls raise ``RuntimeError``; its
    reads, :meth:`state_dict`, pickle and copies too, but they take no hold:
    one that an update of another thread overlaps raises, and that update is
    served); it can be pickled and deep-copied.
    """

    def __init__(
        self,
        n_agents: int,
        dim: int = 1,
        *,
        rule: str = "hedge",
        eta: float = 1.0,
        alpha: float = 0.0,
        backend: str = "numba",
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
    ):
        self.n_agents, self.dim = check_sizes(n_agents, dim, per_agent_vectors=0, per_agent_scalars=1, what="server")
        self.rule = check_choice("rule", rule, RULES)
        self.eta = check_real("eta", eta, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        self.backend = backend
        self._kernels = _backends.load(backend)
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self._threads_used = _backends.resolve_threads(threads, self.n_agents, self.parallel_threshold,
                                                                     self.dim)
        self._lay = layout(1, self.dim)
        self._log_p = np.empty(self.n_agents)
        self._work = np.zeros(work_shape(self.n_agents, self._lay))
        self._err = np.zeros(self.dim)  # update's mixture error yhat - y (eg)
        self._mixture = np.zeros(self.dim)  # predict's, copied to its out: any writeable float64 (d,) array, one kernel type
        self._y = np.zeros(self.dim)
        self._log_p_view = readonly_view(self._log_p)
        self._exclusive = Exclusive("Server")
        self.reset()

    def reset(self) -> None:
        """Uniform weights ``p = 1/N``; the update counter back to 0."""
        ex = self._exclusive
        with ex.restoring:  # never under another thread's update (its kernel reads these weights); also after an interrupt
            ex.interrupted = "reset"
            self._log_p[...] = -math.log(self.n_agents)
            self.n_updates = 0
            ex.interrupted = None

    @property
    def log_weights(self) -> np.ndarray:
        """``log p``, a read-only view of the live buffer.

        A view cannot refuse: read while another thread is inside an update it shows weights of no round (the
        update's two passes leave them unnormalised in between). :attr:`weights` and :meth:`state_dict` are
        snapshots (``RuntimeError`` then instead).
        """
        return self._log_p_view

    @property
    def weights(self) -> np.ndarray:
        """``p = exp(log p)`` (a new array; they sum to 1); ``RuntimeError`` during another thread's call, as every read of the state."""
        return self._exclusive.read(np.exp, self._log_p)

    def predict(self, states, out: np.ndarray | None = None) -> np.ndarray:
        """The mixture ``yhat = sum_i p_i x_i`` of ``states`` (N, d).

        Parameters
        ----------
        states : array_like, shape (N, d)
            Finite predictions of the clients.
        out : numpy.ndarray, shape (d,), optional
            Where to write the mixture (no allocation): any writeable float64 array of that shape (strided,
            unaligned, a view), on every backend; a new array otherwise.
        """
        out = check_out(out, (self.dim,))
        x = as_float_array("states", states, (self.n_agents, self.dim))
        with self._exclusive:
            # The kernel writes a buffer of ours, then d numbers are copied, as Population.step_predict does: a strided
            # out was refused by the Cython kernel ("ndarray is not C-contiguous", naming no argument) and made Numba
            # compile the predict kernel again for its type (1.1 s).
            self._kernels.mixture_predict(self._log_p, x, self._work, self._lay, self._mixture,
                                          _backends.usable_threads(self._threads_used))
            out[...] = self._mixture
        return out

    def update(self, states, target) -> None:
        """Reweight the clients once the target ``y`` of ``states`` (N, d) is known.

        ``target`` has shape (d,) (a scalar is accepted when d = 1) and must be finite. After update
        ``2**63 - 1``, the last count a saved state holds (``n_updates`` is saved as an int64; only a loaded
        state gets there), ``ValueError`` and nothing changes: one more would leave a server that could no
        longer be saved, copied or pickled.
        """
        x = as_float_array("states", states, (self.n_agents, self.dim))
        y = as_float_array("target", target, (self.dim,))
        kern, threads, lay, ex = self._kernels, _backends.usable_threads(self._threads_used), self._lay, self._exclusive
        with ex:
            check_update_count(self.n_updates)
            self._y[...] = y
            if self.rule == "eg":  # the gradient needs the mixture's error yhat - y of these very states
                kern.mixture_predict(self._log_p, x, self._work, lay, self._err, threads, self._y)  # sum_i p_i (x_i - y)
            ex.interrupted = "update"  # until n_updates counts it: an interrupt in between is refused later, not lost
            kern.mixture_update(self._log_p, x, self._y, self._err, RULE_CODES[self.rule], self.eta, self.alpha,
                                self._work, lay, threads)
            self.n_updates += 1
            ex.interrupted = None

    def state_dict(self) -> dict:
        """Everything needed to resume this server exactly (copies); never a snapshot taken during another thread's update.

        A checked read (no hold): ``RuntimeError`` if another thread's update overlapped it (that update is served).
        """
        return self._exclusive.read(lambda: server_state(self._log_p, self.n_updates, self.rule, self.eta, self.alpha))

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; checks everything before changing anything."""
        clean = check_server_state(state, n_agents=self.n_agents, rule=self.rule, eta=self.eta, alpha=self.alpha)
        ex = self._exclusive
        with ex.restoring:  # also after an interrupted update: this is the way back
            ex.interrupted = "load_state_dict"
            self._log_p[...] = clean["log_weights"]
            self.n_updates = clean["n_updates"]
            ex.interrupted = None

    def __reduce__(self):
        """Pickle and copies: a new, independent server of the same class (a subclass's own attributes kept), its state loaded.

        The state (:meth:`state_dict`) and a subclass's own attributes are one checked read: ``RuntimeError`` if
        another thread's call overlapped it (that call is served).
        """
        config = dict(rule=self.rule, eta=self.eta, alpha=self.alpha, backend=self.backend, threads=self.threads,
                      parallel_threshold=self.parallel_threshold)
        return self._reduce_keeping_class(_rebuild_server, _SERVER_BUILT_BY_INIT,
                                          lambda: ((self.n_agents, self.dim, config, None), self.state_dict()))

    @property
    def threads_used(self) -> int:
        """Threads the kernels run on (1 below the work-size threshold; see ``threads``)."""
        return self._threads_used

    def __repr__(self) -> str:
        return (
            f"Server(n_agents={self.n_agents}, dim={self.dim}, rule={self.rule!r}, eta={self.eta!r}, "
            f"alpha={self.alpha!r}, backend={self.backend!r})"
        )


def check_update_count(n_updates: int) -> None:
    """``ValueError`` before an update that would count past ``2**63 - 1`` (``MAX_COUNT``), the last a saved state holds.

    Shared by :class:`Server` and the Dask server, as the populations share their last round (``_refuse_step``).
    """
    if n_updates >= MAX_COUNT:
        raise ValueError(f"this server has made n_updates = {n_updates} = 2**63 - 1 updates, the last count a saved state "
                         "can hold (n_updates is saved as an int64): it updates no further")


#: The attributes :meth:`Server.__init__` sets: a copy builds them again; any other is a subclass's own.
_SERVER_BUILT_BY_INIT = frozenset({
    "n_agents", "dim", "rule", "eta", "alpha", "backend", "_kernels", "parallel_threshold", "threads", "_threads_used", "_lay",
    "_log_p", "_work", "_err", "_mixture", "_y", "_log_p_view", "_exclusive", "n_updates"})


def _rebuild_server(n_agents, dim, config, state=None, cls=Server):
    """Unpickle :class:`Server` or a subclass (:func:`~memoa_fast._copies.build_as`; old pickles give ``state``)."""
    return build_as(cls, Server, (n_agents, dim), config, state)
