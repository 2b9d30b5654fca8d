"""A population of online agents stepped by the compiled kernels."""
from __future__ import annotations

import math

import numpy as np

from . import _backends
from ._validation import as_float_array, check_int
from .game import Game


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


class MeanFieldSummary:
    """The small per-step summary every population engine keeps on the client side.

    Shared by :class:`Population` and :class:`~memoa_fast.distributed.DaskPopulation`,
    which both hold ``_mean_x``, ``_mean_s``, ``_n_finite`` and ``_discount``.
    """

    @property
    def mean_state(self) -> np.ndarray:
        """The mean field ``m`` the last step used (``m(0)`` before any step); a copy."""
        return self._mean_x.copy()

    @property
    def mean_signal(self) -> np.ndarray:
        """The signal mean ``sbar`` the last step used; a copy."""
        return self._mean_s.copy()

    @property
    def n_finite_signals(self) -> int:
        """How many agents had a finite signal in the last step."""
        return self._n_finite

    @property
    def discount(self) -> float:
        """``gamma**t``, the weight of the next step's cost."""
        return self._discount


class Population(MeanFieldSummary):
    """N online agents sharing one :class:`Game`, stepped in place.

    One object per population (never one per agent). States, signals' mean,
    costs and work buffers are allocated once; :meth:`step` allocates nothing
    when the signals are already a C-contiguous float64 ``(N, d)`` array.

    Parameters
    ----------
    game : Game
        Weights, gains and policy.
    n_agents : int, optional
        Number of agents N >= 1 (taken from ``initial_states`` if given).
    dim : int, default 1
        State dimension d >= 1 (taken from ``initial_states`` if given).
    initial_states : array_like, shape (N, d), optional
        ``x_i(0)``; zeros by default. Copied.
    backend : {"numba", "cython", "numpy"}, default "numba"
        Which kernels run the step; ``numpy`` is the slow reference.
    threads : int, optional
        Threads for populations of at least ``parallel_threshold`` agents;
        default: every core. The global Numba thread count is restored after
        each call.
    parallel_threshold : int, default 8192
        Smaller populations run on one thread (a parallel region costs more
        than it saves there).
    client : dask.distributed.Client, optional
        Shard the population over this Dask cluster instead: the call then
        returns a :class:`memoa_fast.distributed.DaskPopulation` (same API,
        states resident on the workers; further keywords such as ``n_shards``
        and ``signals`` go to it). Needs the ``dask`` extra.

    Notes
    -----
    One :meth:`step` at round t, with the policy's coefficients
    ``(g, c_s, c_sbar, c_m)`` from :attr:`Game.coefficients`:

    .. math::

        m &= \\frac1N \\sum_i x_i, \\qquad \\bar s = \\text{mean of the finite } s_i \\\\
        u_i &= -g\\,(x_i - c_s s_i - c_{\\bar s} \\bar s - c_m m) \\\\
        J_i &\\mathrel{+}= \\tfrac{\\gamma^t}{2}\\left(q|x_i - s_i|^2 + \\kappa|x_i - m|^2 + r|u_i|^2\\right),
        \\qquad x_i \\leftarrow x_i + u_i .

    An agent whose signal row has a NaN or an infinity holds its state that
    round (``u_i = 0``), is left out of the signal mean and pays only the
    mean-field term ``gamma^t kappa |x_i - m|^2 / 2``: a bad signal never
    reaches the mean field, and its cost stays finite. If no agent has a
    finite signal, nobody moves and :attr:`mean_signal` keeps its last value.

    A step is one fused kernel (``fused_step``: ``numba`` and ``cython``,
    with a NumPy mirror for ``numpy``) making two passes over memory, the
    signals then the states and costs, which also leaves ``m(t+1)`` and the
    worst client ready for the next step; a backend without it runs the mean
    field and the policy as two kernels. Both give the same result to
    rounding (``1e-12`` relative; bitwise for a given compiled backend).
    """

    def __new__(cls, *args, client=None, **kwargs):
        if client is None:
            return super().__new__(cls)
        # One argument switches engines: a DaskPopulation is returned (and
        # Python then skips this class's __init__, the object not being one).
        backend = kwargs.pop("backend", "numba")
        if backend != "numba":
            raise ValueError(f"backend must be 'numba' when client is given (shards run the Numba kernels), got {backend!r}")
        from .distributed import DaskPopulation

        return DaskPopulation(*args, client=client, **kwargs)

    def __init__(
        self,
        game: Game,
        n_agents: int | None = None,
        dim: int | None = None,
        *,
        initial_states=None,
        backend: str = "numba",
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
        client=None,
    ):
        self.n_agents, self.dim = population_shape(game, n_agents, dim, initial_states)
        self.game = game
        self.backend = backend
        self._kernels = _backends.load(backend)
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self._threads_used = _backends.resolve_threads(threads, self.n_agents, self.parallel_threshold)
        from .kernels import work_shape

        shape = (self.n_agents, self.dim)
        self._x = np.zeros(shape)
        self._J = np.zeros(self.n_agents)
        self._work = np.zeros(work_shape(*shape))
        self._mean_x = np.zeros(self.dim)
        self._mean_s = np.zeros(self.dim)
        self._n_finite = 0
        # Fused path (backends with ``fused_step``): the kernel returns m(t+1)
        # in _next_mean_x and the worst agent, so the next step skips a pass.
        self._fused = hasattr(self._kernels, "fused_step")
        self._next_mean_x = np.zeros(self.dim)
        self._mean_ready = False  # _next_mean_x holds the kernels' mean of the current states
        self._worst = -1  # argmax of the costs after the last fused step; -1: unknown
        self._yhat = np.zeros(self.dim)
        self._yhat_view = _readonly(self._yhat)
        self._no_weights = _readonly(np.empty(0))
        self._x_view = _readonly(self._x)
        self._J_view = _readonly(self._J)
        self.reset(initial_states)

    # ------------------------------------------------------------------ state
    def reset(self, initial_states=None) -> None:
        """Back to round 0: states to ``initial_states`` (zeros if None), costs to 0."""
        if initial_states is None:
            self._x[...] = 0.0
        else:
            self._x[...] = as_float_array("initial_states", initial_states, (self.n_agents, self.dim))
        self._J[...] = 0.0
        self._mean_s[...] = 0.0
        self._mean_x[...] = self._x.mean(axis=0)
        self._n_finite = 0
        self._mean_ready = False
        self._worst = -1
        self.t = 0
        self._discount = 1.0

    @property
    def states(self) -> np.ndarray:
        """``x(t)``, shape (N, d): a read-only view of the live buffer (copy it to keep it)."""
        return self._x_view

    @property
    def costs(self) -> np.ndarray:
        """Discounted online costs ``J_i = sum_t gamma^t l_i(t)``: a read-only view."""
        return self._J_view

    @property
    def worst_agent(self) -> int:
        """Index of the agent with the largest online cost (first one on ties)."""
        if self._worst >= 0:  # tracked by the fused step
            return self._worst
        return int(np.argmax(self._J))

    @property
    def regret(self) -> float:
        """Under-performer regret ``max_i J_i``: the worst client's online cost."""
        return float(self._J[self.worst_agent])

    # ------------------------------------------------------------------ step
    def step(self, signals) -> np.ndarray:
        """Advance every agent one round on its private signal.

        Parameters
        ----------
        signals : array_like, shape (N, d) (or (N,) when d = 1)
            ``s_i(t)``. Non-finite rows are allowed: those agents hold.

        Returns
        -------
        numpy.ndarray
            The new states ``x(t+1)``, the read-only live view :attr:`states`.
        """
        s = as_float_array("signals", signals, (self.n_agents, self.dim), allow_nonfinite=True)
        if self._fused:
            self._fused_step(s, self._no_weights)
            return self._x_view
        kern, threads = self._kernels, self._threads_used
        n_finite, _, _ = kern.mean_field(self._x, s, self._J, self._work, self._mean_x, self._mean_s, threads)
        self._n_finite = n_finite
        g = self.game
        coef = g.coefficients
        kern.policy_update(
            self._x, s, self._J, coef.gain, coef.signal, coef.signal_mean, coef.state_mean,
            self._mean_s, g.q, g.kappa, g.r, self._mean_x, self._discount, threads,
        )
        self.t += 1
        self._discount *= g.gamma
        return self._x_view

    def step_predict(self, signals, server) -> np.ndarray:
        """:meth:`step`, then the mixture ``server`` would publish for the new states.

        The same as ``step(signals)`` followed by ``server.predict(states)``
        (to ``1e-12`` relative), but the fused step sums the mixture
        ``sum_i p_i x_i(t+1)`` inside its pass over the states, while they
        are in cache, instead of in a third pass over memory.

        Parameters
        ----------
        signals : array_like, shape (N, d) (or (N,) when d = 1)
            As for :meth:`step`.
        server : Server
            A server over the same N agents and dimension d; only read.

        Returns
        -------
        numpy.ndarray
            ``yhat(t+1)``, shape (d,): a read-only view of a buffer that the
            next call overwrites (copy it to keep it).
        """
        from .server import Server

        if not isinstance(server, Server):
            raise TypeError(f"server must be a memoa_fast.Server, got {type(server).__name__}")
        if (server.n_agents, server.dim) != (self.n_agents, self.dim):
            raise ValueError(
                f"server mixes {server.n_agents} agents of dimension {server.dim}, this population has "
                f"{self.n_agents} of dimension {self.dim}: build the Server with the same n_agents and dim"
            )
        s = as_float_array("signals", signals, (self.n_agents, self.dim), allow_nonfinite=True)
        if not self._fused:  # a third pass; the states are ours, so finite and already checked
            self.step(s)
            self._kernels.mixture_predict(server.log_weights, self._x, self._work, self._yhat, self._threads_used)
            return self._yhat_view
        self._fused_step(s, server.log_weights)
        return self._yhat_view

    def _fused_step(self, s, log_p) -> None:
        """One step with the backend's ``fused_step`` (two passes over memory; see ``kernels``)."""
        g = self.game
        coef = g.coefficients
        # m(t) is last step's m(t+1) when it is ready; the kernel computes it otherwise.
        used, following = self._next_mean_x, self._mean_x
        n_finite, max_cost, worst = self._kernels.fused_step(
            self._x, s, self._J, self._work, coef.gain, coef.signal, coef.signal_mean, coef.state_mean,
            g.q, g.kappa, g.r, self._discount, used, self._mean_s, following, self._mean_ready,
            log_p, self._yhat, self._threads_used,
        )
        self._mean_x, self._next_mean_x = used, following
        self._mean_ready = True
        self._n_finite = n_finite
        self._worst = worst if math.isfinite(max_cost) else -1
        self.t += 1
        self._discount *= g.gamma

    def run(self, signals) -> np.ndarray:
        """Step through ``signals`` of shape (T, N, d); returns the last states."""
        signals = np.asarray(signals)
        if signals.ndim not in (2, 3):
            raise ValueError(f"signals must have shape (T, n_agents, dim), got shape {signals.shape}")
        for s in signals:
            self.step(s)
        return self._x_view

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to resume this population exactly (copies).

        Keys: ``states``, ``costs``, ``mean_state``, ``mean_signal`` (arrays),
        ``t``, ``discount``, ``n_finite_signals`` and ``game`` (a dict of weights and policy).
        """
        return {
            "states": self._x.copy(),
            "costs": self._J.copy(),
            "mean_state": self._mean_x.copy(),
            "mean_signal": self._mean_s.copy(),
            "t": self.t,
            "discount": self._discount,
            "n_finite_signals": self._n_finite,
            "game": self.game.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; checks everything before changing anything."""
        game = state.get("game")
        if game != self.game.to_dict():
            raise ValueError(f"state was saved for game {game!r}, this population plays {self.game.to_dict()!r}")
        shape = (self.n_agents, self.dim)
        states = as_float_array("state['states']", state["states"], shape)
        costs = as_float_array("state['costs']", state["costs"], (self.n_agents,))
        mean_x = as_float_array("state['mean_state']", state["mean_state"], (self.dim,))
        mean_s = as_float_array("state['mean_signal']", state["mean_signal"], (self.dim,))
        t = check_int("state['t']", int(state["t"]), low=0)
        discount = float(state["discount"])
        if not (0.0 <= discount <= 1.0):
            raise ValueError(f"state['discount'] must be in [0, 1], got {discount!r}")
        self._x[...] = states
        self._J[...] = costs
        self._mean_x[...] = mean_x
        self._mean_s[...] = mean_s
        self._n_finite = int(state.get("n_finite_signals", 0))
        self._mean_ready = False  # the next step recomputes m from the restored states
        self._worst = -1
        self.t = t
        self._discount = discount

    def __repr__(self) -> str:
        return (
            f"Population({self.game!r}, n_agents={self.n_agents}, dim={self.dim}, backend={self.backend!r}, "
            f"threads={self.threads}, t={self.t})"
        )


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
