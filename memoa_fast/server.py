"""The server: an online mixture of the clients' predictions."""
from __future__ import annotations

import math

import numpy as np

from . import _backends
from ._validation import as_float_array, check_choice, check_int, check_real

RULES = ("eg", "hedge")
_RULE_CODES = {"eg": 0, "hedge": 1}


class Server:
    """Mixes N client predictions with online weights kept in the log domain.

    Parameters
    ----------
    n_agents : int
        Number of clients N >= 1.
    dim : int, default 1
        Dimension d of a prediction.
    rule : {"hedge", "eg"}, default "hedge"
        ``eg``: exponentiated gradient on the mixture's squared loss,
        ``g_i = 2 <yhat - y, x_i>``; ``hedge``: exponentially weighted
        forecaster on each client's own loss ``|x_i - y|^2``.
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
    (plain weights do at N = 10^7).
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
        self.n_agents = check_int("n_agents", n_agents, low=1)
        self.dim = check_int("dim", dim, low=1)
        self.rule = check_choice("rule", rule, RULES)
        self.eta = check_real("eta", eta, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        self.backend = backend
        self._kernels = _backends.load(backend)
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self._threads_used = _backends.resolve_threads(threads, self.n_agents, self.parallel_threshold)
        from .kernels import work_shape

        self._log_p = np.empty(self.n_agents)
        self._work = np.zeros(work_shape(self.n_agents, self.dim))
        self._yhat = np.zeros(self.dim)
        self._y = np.zeros(self.dim)
        self._yhat_view = self._yhat.view()
        self._yhat_view.flags.writeable = False
        self._log_p_view = self._log_p.view()
        self._log_p_view.flags.writeable = False
        self.reset()

    def reset(self) -> None:
        """Uniform weights ``p = 1/N``; the update counter back to 0."""
        self._log_p[...] = -math.log(self.n_agents)
        self.n_updates = 0

    @property
    def log_weights(self) -> np.ndarray:
        """``log p``, a read-only view of the live buffer."""
        return self._log_p_view

    @property
    def weights(self) -> np.ndarray:
        """``p = exp(log p)`` (a new array; they sum to 1)."""
        return np.exp(self._log_p)

    def predict(self, states) -> np.ndarray:
        """The mixture ``yhat = sum_i p_i x_i`` of ``states`` (N, d).

        Returns a read-only view of an internal buffer that the next call overwrites.
        """
        x = as_float_array("states", states, (self.n_agents, self.dim))
        self._kernels.mixture_predict(self._log_p, x, self._work, self._yhat, self._threads_used)
        return self._yhat_view

    def update(self, states, target) -> None:
        """Reweight the clients once the target ``y`` of ``states`` (N, d) is known.

        ``target`` has shape (d,) (a scalar is accepted when d = 1) and must be finite.
        """
        x = as_float_array("states", states, (self.n_agents, self.dim))
        y = as_float_array("target", target, (self.dim,))
        kern, threads = self._kernels, self._threads_used
        if self.rule == "eg":  # the gradient needs the mixture of these very states
            kern.mixture_predict(self._log_p, x, self._work, self._yhat, threads)
        self._y[...] = y
        kern.mixture_update(self._log_p, x, self._y, self._yhat, _RULE_CODES[self.rule], self.eta, self.alpha, self._work, threads)
        self.n_updates += 1

    def state_dict(self) -> dict:
        """Everything needed to resume this server exactly (copies)."""
        return {
            "log_weights": self._log_p.copy(),
            "n_updates": self.n_updates,
            "rule": self.rule,
            "eta": self.eta,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; checks everything before changing anything."""
        for key in ("rule", "eta", "alpha"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state.get(key)!r}, this server has {key}={getattr(self, key)!r}")
        log_p = as_float_array("state['log_weights']", state["log_weights"], (self.n_agents,))
        total = float(np.logaddexp.reduce(log_p))
        if abs(total) > 1e-9:
            raise ValueError(f"state['log_weights'] must be normalised (log-sum-exp 0), got {total!r}")
        self._log_p[...] = log_p
        self.n_updates = check_int("state['n_updates']", int(state["n_updates"]), low=0)

    def __repr__(self) -> str:
        return (
            f"Server(n_agents={self.n_agents}, dim={self.dim}, rule={self.rule!r}, eta={self.eta!r}, "
            f"alpha={self.alpha!r}, backend={self.backend!r})"
        )
