"""Certificates of the MEMOA policy against the exact finite-N game.

``MODEL.md`` section 3. Two independent checks that the decentralized
mean-field policy is (almost) a Nash equilibrium of the N-agent game:

* :func:`epsilon_nash` -- for any N, the exact gain an agent could obtain by
  deviating alone while every other agent keeps the policy (the epsilon of an
  epsilon-Nash equilibrium);
* :func:`nash_equilibrium` -- for small N (<= 50), the exact N-player feedback
  Nash equilibrium, the "centralized" object whose direct computation does not
  scale (O(N^4) per iteration).

:func:`policy_costs` and :func:`policy_gain_matrix` give the costs and the gains
of a :class:`~memoa_fast.game.Game`'s policy in the same finite-N setting, so
that the two can be compared.

Setting (all functions). Signals are constant (deterministic), ``s_i`` in R^d;
``x_i(0)`` are given. Every agent's control is
``u_i = -g (x_i - alpha s_i - beta sbar - mu m)`` with ``(g, alpha, beta, mu)``
the game's :class:`~memoa_fast.game.PolicyCoefficients` and ``m`` the *true*
finite-N mean of the states (it contains ``x_i`` with weight 1/N). Agent i's
cost is ``J_i = sum_{t>=0} gamma^t l_i(t)`` with

.. math::

    l_i = \\tfrac12\\left(q (x_i - s_i)^2 + \\kappa (x_i - m)^2 + r u_i^2\\right),

summed over the d coordinates, which decouple (scalar weights). Everything
below is per coordinate.

Trust classes (``MODEL.md`` section 7). Every function takes ``labels`` (the
class of every agent) for a K-class :class:`~memoa_fast.game.Game`: agents then
play ``game.table`` (``u_i = -g_c (x_i - c_c s_i - sum_l M^s_cl sbar_l - sum_l M^m_cl m_l)``
with the true finite-N class means) and pay their class's weights; the
certificate's state becomes ``(x_i, M_1, ..., M_K, 1)`` (``M_l`` the mean of
the other agents of class l) and the exact Nash equilibrium has per-player
weights. Measured: epsilon falls like 1/N^2 (N^2 eps 0.22, 0.13, 0.24 at
N = 10, 100, 1000 for 3 classes), and the exact Nash gains approach the
K-class policy's like 1/N.

Only NumPy/SciPy; the problems are tiny ((K+2)x(K+2) per agent for the
certificate, 3x3 for one class; (N+1)x(N+1) per player for the equilibrium).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._validation import MAX_COUNT, as_float64, available_memory, binary_exponent, check_int, check_real, gib, plain_array, real_array
from .game import Game
from .kernels import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, SIGNAL, Q, R, next_discount

__all__ = [
    "EpsilonNashResult",
    "NashEquilibrium",
    "epsilon_nash",
    "nash_equilibrium",
    "policy_costs",
    "policy_gain_matrix",
]

#: Largest population :func:`nash_equilibrium` accepts (cost O(N^4) per iteration).
NASH_MAX_AGENTS = 50
#: Default number of agents :func:`epsilon_nash` certifies (the worst under the policy).
DEFAULT_WORST_AGENTS = 8
#: Longest horizon chosen automatically (gamma = 1).
MAX_AUTO_HORIZON = 1_000_000
_EPS = np.finfo(np.float64).eps
_CHUNK = 32768  # batch size of the 3x3 problems (bounds the memory of the 9x9 solves; scaled for n x n)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EpsilonNashResult:
    """Exact unilateral-deviation gains of agents under a policy.

    Attributes
    ----------
    agents : ndarray of int, shape (k,)
        The certified agents (indices into the population).
    cost_policy : ndarray, shape (k,)
        ``J_i`` when agent i follows the policy like everybody else.
    cost_best_response : ndarray, shape (k,)
        ``J_i`` under agent i's exact best response to the others' policy.
    epsilon : ndarray, shape (k,)
        ``cost_policy - cost_best_response >= 0`` (computed without
        cancellation, see :func:`epsilon_nash`).
    relative_epsilon : ndarray, shape (k,)
        ``epsilon / cost_policy`` (0 where ``cost_policy`` is zero up to
        rounding, below 1e-12 times the size of its terms; ``epsilon`` is then
        zero too since ``0 <= epsilon <= cost_policy``).
    max_relative : float
        ``relative_epsilon.max()``.
    n_agents : int
        Population size N.
    horizon : int or None
        Horizon T of the costs, ``None`` for the exact infinite discounted sum.
    """

    agents: np.ndarray
    cost_policy: np.ndarray
    cost_best_response: np.ndarray
    epsilon: np.ndarray
    relative_epsilon: np.ndarray
    max_relative: float
    n_agents: int
    horizon: int | None

    @property
    def max_epsilon(self) -> float:
        """Largest absolute gain of a deviation, ``epsilon.max()``."""
        return float(self.epsilon.max())


@dataclass(frozen=True)
class NashEquilibrium:
    """Exact stationary feedback Nash equilibrium of the N-agent game.

    Per coordinate c the joint state is ``z = (x_1(c), ..., x_N(c), 1)`` and
    player i plays ``u_i = -gains[c, i] @ z``.

    Attributes
    ----------
    gains : ndarray, shape (d, N, N + 1)
        Feedback gains; ``gains[c, i, :N]`` acts on the states (identical for
        every coordinate: signals only enter the affine column
        ``gains[c, i, N]``).
    values : ndarray, shape (d, N, N + 1, N + 1)
        Player i's value matrix: its cost from ``z`` is ``z' values[c, i] z / 2``.
    own_gain : ndarray, shape (N,)
        ``gains[0, i, i]``, the weight of a player's own state (the mean-field
        policy has ``k (1 - c / N)`` here).
    signals : ndarray, shape (N, d)
    iterations : int
        Best-response rounds until the fixed point.
    residual : float
        Last change of the gains, ``max |K^{n+1} - K^n|``.
    q, kappa, r, gamma : float
        The game's weights (``q, kappa, r``: arrays of shape (N,), one per
        player, when the game has classes).
    labels : ndarray of int or None
        The players' classes (None for the single-class game).
    """

    gains: np.ndarray
    values: np.ndarray
    own_gain: np.ndarray
    signals: np.ndarray
    iterations: int
    residual: float
    q: float
    kappa: float
    r: float
    gamma: float
    labels: np.ndarray | None = None
    #: ``(centre, values, e)``: the equilibrium was solved for the signals minus ``centre`` (d,), times ``2^-e``;
    #: ``values`` are that problem's value matrices, which :meth:`costs` reads (see :func:`nash_equilibrium`).
    _shifted: tuple | None = field(default=None, repr=False, compare=False)
    n_agents: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "n_agents", int(self.signals.shape[0]))

    @property
    def cross_gain(self) -> np.ndarray:
        """Mean weight of the other players' states, ``mean_{j != i} gains[0, i, j]``, shape (N,)."""
        n = self.n_agents
        kx = self.gains[0, :, :n]
        return (kx.sum(axis=1) - np.diagonal(kx)) / (n - 1)

    def costs(self, initial_states) -> np.ndarray:
        """Stationary discounted costs ``J_i = sum_c z_c' P_i z_c / 2`` from ``initial_states``.

        Parameters
        ----------
        initial_states : array_like, shape (N, d) (or (N,) when d = 1)

        Returns
        -------
        ndarray, shape (N,)
        """
        n, d = self.signals.shape
        x0 = _as_states("initial_states", initial_states, n, d)
        if self._shifted is None:  # built by hand from values in the given coordinates
            centre, values, e_solve = np.zeros(d), self.values, 0
        else:
            centre, values, e_solve = self._shifted
        # In the coordinates the equilibrium was solved in (the costs depend on x - centre only, with no
        # cancellation of terms of size |x|^2), z = (x0 - centre, 1) = 2^e (x 2^-e, 2^(e_solve - e)), and the
        # shifted values are those of signals times 2^-e_solve: the quadratic form, times 2^(2e) (see "scale" below).
        x = (x0 - centre) if self._shifted is not None else x0
        e = max(binary_exponent(x), e_solve) if x.any() else e_solve
        z0 = np.concatenate([np.ldexp(x.T, -e), np.full((d, 1), math.ldexp(1.0, e_solve - e))], axis=1)  # (d, n+1)
        return _scale_back(0.5 * np.einsum("ck,cikl,cl->i", z0, values, z0), e, 2, "costs", _INPUTS)


# --------------------------------------------------------------------------- input checks


def _check_game(game) -> Game:
    if not isinstance(game, Game):
        raise TypeError(f"game must be a memoa_fast.game.Game, got {type(game).__name__}")
    return game


def _as_signals(signals, n_agents: int | None = None) -> np.ndarray:
    """Signals as a float (N, d) array; (N,) means d = 1."""
    s = as_float64(real_array("signals", signals), copy=True)  # a copy: the results keep it
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:  # N = 0: no agent has a cost (means of nothing were NaN)
        raise ValueError(f"signals must have shape (N, d) or (N,) with N >= 1 agents and d >= 1, got shape {np.shape(signals)}")
    if n_agents is not None and s.shape[0] != n_agents:
        raise ValueError(f"signals must have shape ({n_agents}, d) (one row per agent, n_agents={n_agents}), got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = tuple(int(b) for b in np.argwhere(~np.isfinite(s))[0])
        raise ValueError(f"signals must be finite; first non-finite entry at index {bad}: {s[bad]!r}")
    return np.ascontiguousarray(s)


def _as_states(name: str, value, n: int, d: int) -> np.ndarray:
    x = as_float64(real_array(name, value), copy=True)
    if x.shape == (n,) and d == 1:
        x = x[:, None]
    if x.shape != (n, d):
        raise ValueError(f"{name} must have shape ({n}, {d}) like signals, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = tuple(int(b) for b in np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"{name} must be finite; first non-finite entry at index {bad}: {x[bad]!r}")
    return np.ascontiguousarray(x)


def _check_tol(tol) -> float:
    return check_real("tol", tol, low=0.0, high=1e-3, low_open=True)


def _check_agents(agents, n: int):
    if agents is None or (isinstance(agents, str) and agents == "all"):
        return agents
    if isinstance(agents, str):
        raise ValueError(f"agents must be None, 'all' or a sequence of indices in [0, {n - 1}], got {agents!r}")
    arr = np.asarray(plain_array("agents", agents))
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"agents must be a non-empty 1-d sequence of indices in [0, {n - 1}], got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"agents must hold integers in [0, {n - 1}], got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n:
        bad = int(arr[(arr < 0) | (arr >= n)][0])
        raise ValueError(f"agents must hold indices in [0, {n - 1}] (n_agents={n}), got {bad}")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"agents must not repeat an index, got {arr.tolist()}")
    return arr.astype(np.intp)


def _check_horizon(horizon):
    """``None``, or a round count in ``[1, 2**63 - 1]`` (beyond it ``gamma**T`` and ``float(T)`` overflowed: ``OverflowError``)."""
    if horizon is None:
        return None
    return check_int("horizon", horizon, low=1, high=MAX_COUNT)


# --------------------------------------------------------------------------- scale
# The costs are homogeneous of degree 2 in (signals, initial states): scaling both by c scales every J_i and
# epsilon_i by c^2, the gains' affine column by c, and leaves the state gains and epsilon_i / J_i unchanged. So
# each function works on the inputs times 2^-e (exact, a power of two), whose largest entry is in [0.5, 1) and
# whose squares neither overflow nor underflow, and scales its results back. The costs are also invariant under a
# common shift of every signal and state (they see differences only, and every policy's coefficients sum to 1), so
# the inputs are first shifted by the signals' mean (_centred_and_scaled): far from 0 (1e8 with a spread of 1) the
# absolute coordinates would cancel every digit of epsilon.
_TINY = float(np.finfo(np.float64).tiny)
_INPUTS = "signals and initial_states"


def _centred_and_scaled(s: np.ndarray, *states: np.ndarray):
    """``(s', states', e, c)``: the inputs minus the signals' mean ``2^e c`` (per coordinate), then times ``2^-e``.

    The costs see only ``x_i - s_i``, ``x_i - m``, ``u_i`` and every policy's coefficients sum to 1, so
    shifting every signal and state of a coordinate by the same constant changes no cost and no epsilon
    (``MODEL.md`` section 1). Solving in absolute coordinates would cancel terms of size ``|s|^2``
    (inputs near 1e8 with a spread of 1 lost every digit of epsilon); the shift is the signals' mean,
    so the solvers see the spread only. It is taken on the inputs times ``2^-e1`` (largest entry in
    ``[0.5, 1)``: no overflow whatever their size), and the shifted inputs are scaled again by an
    exact power of two; scaling both inputs by ``2^k`` scales the shift, so results stay exactly
    homogeneous (see "scale" above).
    """
    e1 = binary_exponent(s, *states)
    s, states = np.ldexp(s, -e1), [np.ldexp(x, -e1) for x in states]
    centre = s.mean(axis=0)
    s, states = s - centre, [x - centre for x in states]
    e2 = binary_exponent(s, *states)
    return np.ldexp(s, -e2), [np.ldexp(x, -e2) for x in states], e1 + e2, np.ldexp(centre, -e2)


def _scale_back(values: np.ndarray, e: int, power: int, what: str, inputs: str) -> np.ndarray:
    """``values * 2^(power e)`` (exact); ``ValueError`` when its largest entry leaves float64's normal range.

    ``what`` names the result and ``inputs`` the arguments it grows with (``power`` 2: with their square, 1: in
    proportion).
    """
    k = power * e
    values = np.asarray(values)
    top = float(np.max(np.abs(values))) if values.size else 0.0
    with np.errstate(over="ignore", under="ignore"):
        out = np.ldexp(values, k)
    if top > 0.0:
        big = float(np.max(np.abs(out)))
        if not math.isfinite(big) or big < _TINY:
            size = math.log10(top) + k * math.log10(2.0)
            grow = "with the square of" if power == 2 else "in proportion to"
            raise ValueError(
                f"{inputs} of this size give {what} of about 1e{size:.0f}, outside float64's normal range"
                f" [2.2e-308, 1.8e+308]: {what} grow {grow} {inputs} (epsilon / J does not depend on their scale),"
                " so rescale them"
            )
    return out


# --------------------------------------------------------------------------- horizon


def _closed_loop_radius(g: float, mu: float) -> float:
    """Spectral radius of the population under the policy: eigenvalues 1-g and 1-g(1-mu)."""
    return max(abs(1.0 - g), abs(1.0 - g * (1.0 - mu)))


def _auto_horizon(game: Game, tol: float) -> int:
    """Horizon for gamma = 1: the policy's transient ``radius^T`` has fallen below ``tol``."""
    co = game.coefficients
    lam = _closed_loop_radius(co.gain, co.state_mean)
    if lam >= 1.0:
        raise ValueError(f"the {game.policy!r} policy does not converge (closed-loop radius {lam:g} >= 1); pass a finite horizon")
    if lam == 0.0:
        return 2
    t = int(math.ceil(math.log(tol) / math.log(lam))) + 1
    if t > MAX_AUTO_HORIZON:
        raise ValueError(
            f"gamma = 1 needs a horizon of {t} steps for the transient to fall below tol={tol:g}"
            f" (more than {MAX_AUTO_HORIZON}); pass horizon explicitly"
        )
    return max(t, 2)


def _resolve_horizon(game: Game, horizon, tol: float):
    horizon = _check_horizon(horizon)
    if horizon is None and game.gamma >= 1.0:
        return _auto_horizon(game, tol)
    return horizon


# --------------------------------------------------------------------------- policy costs


def policy_costs(game, signals, initial_states, horizon=None, tol: float = 1e-13, labels=None) -> np.ndarray:
    """Exact costs of every agent when all follow ``game``'s policy (finite N).

    With all agents on ``u_j = -g(x_j - alpha s_j - beta sbar - mu m)`` the
    mean obeys ``m(t+1) - sbar = (1 - g(1 - mu)) (m(t) - sbar)`` and agent i's
    deviation from its rest point ``x_i^inf = alpha s_i + (beta + mu) sbar``
    obeys, with ``y = (x_i - x_i^inf, m - sbar)``,

    .. math::

        y(t+1) = A y(t), \\qquad A = \\begin{pmatrix} 1-g & g\\mu \\\\ 0 & 1 - g(1-\\mu)\\end{pmatrix},

    the same A for every agent. The stage cost is
    ``y'Q y / 2 + c_i' y + e_i / 2`` with
    ``Q = q e_1 e_1' + kappa (1,-1)(1,-1)' + r g^2 (1,-mu)(1,-mu)'``,
    ``c_i = q delta_i e_1 + kappa eps_i (1,-1)``, ``e_i = q delta_i^2 + kappa eps_i^2``,
    ``delta_i = x_i^inf - s_i``, ``eps_i = x_i^inf - sbar``. Hence, exactly,

    .. math::

        J_i = \\tfrac12 y_0'(L - \\gamma^T A^{T\\prime} L A^T) y_0
              + c_i'(I - (\\gamma A)^T)(I - \\gamma A)^{-1} y_0
              + \\tfrac12 e_i \\sum_{t<T}\\gamma^t,
        \\qquad L = Q + \\gamma A' L A,

    with ``T = infinity`` (``gamma < 1``, ``horizon=None``) dropping the
    ``gamma^T`` terms. O(N d). Where ``gamma^T A^T`` is near the identity
    (a horizon short against the slowest discounted mode) these differences
    would cancel, and the T terms are summed by doubling instead (O(log T)).

    Parameters
    ----------
    game : Game
        Weights and policy (``"memoa"`` gives the mean-field policy's costs).
    signals : array_like, shape (N, d) or (N,)
        Constant signals.
    initial_states : array_like, same shape as ``signals``
        ``x_i(0)``.
    horizon : int, optional
        Finite horizon T (sum over t = 0..T-1), in ``[1, 2**63 - 1]``. Default: infinite for
        ``gamma < 1``; for ``gamma = 1`` (the infinite sum diverges as soon as
        the rest point has a positive cost) the T at which the closed loop's
        transient ``radius^T`` falls below ``tol``.
    tol : float, default 1e-13
        Only used to choose T when ``gamma = 1``.
    labels : array_like of int, shape (N,), optional
        Class of every agent (required when ``game.n_classes > 1``). Then
        every agent plays ``game.table`` with the true class means ``m_l``,
        which obey ``m(t+1) = B m(t) + b`` (K x K, exact for any N), and the
        same formula holds for agent i of class c with
        ``y = (x_i - x_i^inf, m - m^inf)`` of dimension K + 1,
        ``(I - B) m^inf = b``, one ``A_c`` and ``L_c`` per class (a Stein
        equation solved through the complex Schur form) and ``pi`` (the class
        shares) in place of the mean's weights: O(N d + K^4 + K^3 d). Where
        ``gamma rho(A_c)^2 >= 1`` (the discounted sums need not converge) or
        the class means have no rest point, the costs are instead summed by
        simulating the whole population (O(N d T); with ``horizon=None`` over
        the T steps with ``gamma^T <= 1e-17``). Conditioning: with a class
        mean mode ``lambda`` of ``B`` near 1 (a tiny ``q``) and ``gamma`` near 1
        at an infinite horizon, the costs themselves depend on
        ``1 - gamma lambda^2``, which ``game.table`` fixes only to its ulps:
        one ulp of the table moves the exact costs by 1e-8 (``q = 1e-8``,
        ``gamma = 1 - 1e-9``) to 3e-5 (``q = 1e-12``, ``gamma = 1 - 1e-12``)
        of their size, and the result is as uncertain (a backward error of a
        few ulps; measured against 60-digit sums).

    Returns
    -------
    ndarray, shape (N,)
        ``J_i`` summed over the d coordinates.
    """
    game = _check_game(game)
    s = _as_signals(signals)
    n, d = s.shape
    x0 = _as_states("initial_states", initial_states, n, d)
    tol = _check_tol(tol)
    labels, sizes = _check_labels(game, labels, n)
    if labels is None:
        horizon = _resolve_horizon(game, horizon, tol)
    else:
        horizon = _resolve_class_horizon(game, sizes, horizon, tol)
    s, (x0,), e, _ = _centred_and_scaled(s, x0)  # see "scale" above: costs * 2^(-2e) from shifted inputs * 2^-e
    return _scale_back(_centred_policy_costs(game, s, x0, horizon, labels, sizes), e, 2, "costs", _INPUTS)


def _centred_policy_costs(game: Game, s: np.ndarray, x0: np.ndarray, horizon, labels, sizes) -> np.ndarray:
    """:func:`policy_costs` of checked inputs already centred and scaled (:func:`_centred_and_scaled`), in their units.

    ``horizon`` is resolved (``_resolve_horizon``, or ``_resolve_class_horizon`` with ``labels``). For
    :func:`policy_costs` (which scales the costs back) and :func:`epsilon_nash` (which ranks them), so that
    each centres its inputs once.
    """
    if labels is not None:
        costs = _class_policy_costs(game, labels, sizes, s, x0, horizon)
        if costs is None:  # not stable under the discount, or no rest point: sum the rounds (finite, or truncated)
            costs = _simulate_class_costs(game, labels, sizes, s, x0, _tail_horizon(game.gamma) if horizon is None else horizon)
        return costs
    co = game.coefficients
    g, al, be, mu = co.gain, co.signal, co.signal_mean, co.state_mean
    q, kappa, r, gamma = game.q, game.kappa, game.r, game.gamma

    A = np.array([[1.0 - g, g * mu], [0.0, 1.0 - g * (1.0 - mu)]])
    v = np.array([1.0, -mu])
    Q = q * np.diag([1.0, 0.0]) + kappa * np.array([[1.0, -1.0], [-1.0, 1.0]]) + r * g * g * np.outer(v, v)
    L = _lyapunov_dense(A, Q, gamma)
    W = np.linalg.inv(np.eye(2) - gamma * A)  # sum_t (gamma A)^t
    if horizon is None:
        LT, WT, ST = L, W, 1.0 / (1.0 - gamma)
    else:
        LT, WT = (M[0] for M in _finite_sums(A[None], Q[None], L[None], W[None], gamma, horizon))
        ST = _discount_sum(gamma, horizon)

    sbar = s.mean(axis=0)  # (d,)
    m0 = x0.mean(axis=0)
    xinf = al * s + (be + mu) * sbar
    delta = xinf - s
    eps = xinf - sbar
    y1 = x0 - xinf
    y2 = np.broadcast_to(m0 - sbar, y1.shape)
    quad = LT[0, 0] * y1 * y1 + 2.0 * LT[0, 1] * y1 * y2 + LT[1, 1] * y2 * y2
    # c' WT y0 with c = (q delta + kappa eps, -kappa eps)
    c1 = q * delta + kappa * eps
    c2 = -kappa * eps
    lin = c1 * (WT[0, 0] * y1 + WT[0, 1] * y2) + c2 * (WT[1, 0] * y1 + WT[1, 1] * y2)
    const = q * delta * delta + kappa * eps * eps
    return (0.5 * quad + lin + 0.5 * ST * const).sum(axis=1)


def _discount_sum(gamma: float, T: int) -> float:
    """``sum_{t<T} gamma^t``: ``T`` at ``gamma = 1``, else ``-expm1(T log1p(gamma - 1)) / (1 - gamma)``.

    ``(1 - gamma^T) / (1 - gamma)`` cancels when ``gamma^T`` is near 1 (``gamma = 1 - 1e-9``, ``T = 7``: 1e-8 of the
    sum lost); ``gamma - 1`` is exact (Sterbenz), so this form keeps every digit.
    """
    if gamma == 1.0:
        return float(T)
    return -math.expm1(T * math.log1p(gamma - 1.0)) / (1.0 - gamma)


def _finite_sums(A: np.ndarray, Q: np.ndarray, L: np.ndarray, W: np.ndarray, gamma: float, T: int):
    """``(L_T, W_T)``: ``sum_{t<T} gamma^t A'^t Q A^t`` and ``sum_{t<T} (gamma A)^t`` for a stack (..., n, n).

    ``L_T = L - gamma^T A^T' L A^T`` and ``W_T = (I - gamma^T A^T) W`` (``L``, ``W`` the infinite sums) cancel
    where ``gamma^T A^T`` is near the identity: a horizon short against the slowest discounted mode (``gamma = 1``
    with a gain of 1e-9: ``L`` is 1e9 times ``L_3``, and 1e-8 of ``L_3`` was lost). Where the subtracted terms
    exceed half the sums, the T terms are added instead by doubling (``S_{m+n} = S_m + gamma^m A^m' S_n A^m``):
    sums of terms, no cancellation, O(n^3 log T) for each matrix of the stack.
    """
    AT = np.linalg.matrix_power(A, T)
    gT = gamma**T
    tailL = gT * np.swapaxes(AT, -1, -2) @ L @ AT
    tailW = gT * AT
    eye = np.eye(A.shape[-1])
    big = (np.linalg.norm(tailL, axis=(-2, -1)) > 0.5 * np.linalg.norm(L, axis=(-2, -1))) | (np.linalg.norm(tailW, 2, axis=(-2, -1)) > 0.5)
    if not big.any():
        return L - tailL, (eye - tailW) @ W
    # Doubling: the accumulated sums cover the first m rounds, the block the next 2^j.
    LT, WT, P, gm = np.zeros_like(L), np.zeros_like(W), np.broadcast_to(eye, A.shape).copy(), 1.0
    Lb, Wb, Pb, gb = Q.copy(), np.broadcast_to(eye, A.shape).copy(), A.copy(), gamma
    while T:
        if T & 1:
            LT = LT + gm * np.swapaxes(P, -1, -2) @ Lb @ P
            WT = WT + gm * P @ Wb
            P, gm = P @ Pb, gm * gb
        T >>= 1
        if T:
            Lb = Lb + gb * np.swapaxes(Pb, -1, -2) @ Lb @ Pb
            Wb = Wb + gb * Pb @ Wb
            Pb, gb = Pb @ Pb, gb * gb
    return 0.5 * (LT + np.swapaxes(LT, -1, -2)), WT


def _lyapunov_dense(A: np.ndarray, C: np.ndarray, gamma: float) -> np.ndarray:
    """Solve ``P = C + gamma A' P A`` (small dense A) through its Kronecker form."""
    n = A.shape[0]
    M = np.eye(n * n) - gamma * np.kron(A.T, A.T)
    P = np.linalg.solve(M, C.reshape(-1)).reshape(n, n)
    return 0.5 * (P + P.T)


def policy_gain_matrix(game, signals, labels=None) -> np.ndarray:
    """The policy's gains in the joint-state form of :class:`NashEquilibrium`.

    ``u_i = -g(x_i - alpha s_i - beta sbar - mu m)`` with ``m = mean_j x_j`` is
    ``u_i = -K_i z``, ``z = (x_1, ..., x_N, 1)``, with

    .. math::

        K_{ij} = g(\\delta_{ij} - \\mu / N), \\qquad K_{i,N+1} = -g(\\alpha s_i + \\beta \\bar s).

    With ``labels`` (K classes, ``game.table``), for player i of class c:
    ``K_ij = g_c (delta_ij - M^m_{c, l_j} / n_{l_j})`` and
    ``K_{i,N+1} = -g_c (c_c s_i + sum_p M^s_cp sbar_p)``, ``sbar_p`` the class
    signal means.

    Parameters
    ----------
    game : Game
    signals : array_like, shape (N, d) or (N,)
    labels : array_like of int, shape (N,), optional
        Class of every agent (required when ``game.n_classes > 1``).

    Returns
    -------
    ndarray, shape (d, N, N + 1)
    """
    game = _check_game(game)
    s = _as_signals(signals)
    labels, sizes = _check_labels(game, labels, s.shape[0])
    e = binary_exponent(s)  # see "scale" above: the affine column grows with the signals, the sums stay finite
    s = np.ldexp(s, -e)
    if labels is not None:
        K = _class_gain_matrix(game, labels, sizes, s)
    else:
        co = game.coefficients
        K = _gain_matrix(co.gain, co.signal, co.signal_mean, co.state_mean, s)
    n = s.shape[0]
    K[..., n] = _scale_back(K[..., n], e, 1, "the gains' affine terms", "signals")
    return K


def _gain_matrix(g, al, be, mu, s):
    n, d = s.shape
    K = np.empty((d, n, n + 1))
    K[:, :, :n] = g * (np.eye(n) - mu / n)
    K[:, :, n] = -g * (al * s + be * s.mean(axis=0)).T
    return K


# --------------------------------------------------------------------------- epsilon-Nash


def epsilon_nash(game, n_agents, signals, initial_states, agents=None, horizon=None, tol: float = 1e-13,
                 max_iter: int = 100, labels=None) -> EpsilonNashResult:
    """Exact gain of a unilateral deviation from ``game``'s policy (epsilon-Nash certificate).

    All agents but i follow the policy ``u_j = -g(x_j - alpha s_j - beta sbar - mu m)``
    with ``m`` the true mean. Per coordinate, agent i faces a linear-quadratic
    problem in ``z = (x_i, M, 1)``, ``M`` the mean of the others
    (``m = (x_i + (N-1) M) / N``):

    .. math::

        z(t+1) = A z(t) + B u_i(t),\\qquad
        A = \\begin{pmatrix} 1 & 0 & 0 \\\\
                             g\\mu/N & 1 - g + g\\mu(N-1)/N & g(\\alpha S_{-i} + \\beta\\bar s) \\\\
                             0 & 0 & 1\\end{pmatrix},\\qquad B = e_1,

    ``S_{-i}`` the mean of the others' signals, and stage cost
    ``(z'Qz + r u^2)/2``, ``Q = q h h' + kappa f f'``, ``h = (1, 0, -s_i)``,
    ``f = ((N-1)/N)(1, -1, 0)`` (because ``x_i - m = (N-1)(x_i - M)/N``). The
    policy itself is ``u_i = F z``, ``F = -g(1 - mu/N, -mu(N-1)/N, -(alpha s_i + beta sbar))``.

    *Infinite horizon* (``gamma < 1``, ``horizon=None``): the best response
    solves the discounted Riccati equation

    .. math::

        P = Q + \\gamma A'PA - \\gamma^2 A'PB\\,(r + \\gamma B'PB)^{-1} B'PA,

    by policy iteration (Hewer) started at the policy's own gain ``F``, each
    step an exact discounted Lyapunov solve (Kronecker form, 9x9); it
    converges quadratically and is the ``T -> infinity`` limit of the backward
    recursion of ``MODEL.md``. ``J_i(BR) = z_0'Pz_0/2`` (the affine term is the
    constant coordinate of z, so ``P`` holds the linear and constant parts),
    ``J_i(policy) = z_0'L_F z_0/2`` with ``L_F = Q + rF'F + gamma A_F'L_F A_F``,
    ``A_F = A + BF``. The gap is computed without cancellation from the
    performance-difference identity

    .. math::

        \\epsilon_i = J_i(\\text{policy}) - J_i(\\text{BR})
        = \\sum_t \\gamma^t \\tfrac12 (r + \\gamma B'PB)\\,((F - G) z(t))^2
        = \\tfrac12 z_0' E z_0,\\quad E = (r + \\gamma B'PB)(F-G)'(F-G) + \\gamma A_F' E A_F,

    ``G = -gamma B'PA/(r + gamma B'PB)`` the optimal gain and ``z(t)`` the
    policy's trajectory: it is >= 0 by construction and accurate even when
    ``epsilon / J`` is 1e-12. It is checked against
    ``J_i(policy) - J_i(BR)`` (a mismatch beyond rounding raises).

    *Finite horizon* T (``horizon`` given, or ``gamma = 1``): the backward
    recursion ``P_T = 0``, ``P_t = Q + gamma A'P_{t+1}A - H_t G_t'G_t``,
    ``H_t = r + gamma B'P_{t+1}B``, ``G_t = -gamma B'P_{t+1}A / H_t``; the costs
    are sums over ``t = 0..T-1``, the policy's by simulation, and
    ``epsilon = sum_{t<T} gamma^t H_t ((F - G_t) z(t))^2 / 2``. With
    ``gamma = 1`` and no horizon, T is where the policy's closed-loop transient
    ``radius^T`` falls below ``tol`` (the rest point has a positive cost, so the
    infinite sums diverge; the deviation gain then also grows about linearly in
    T, by the O(1/N^2) per-step gain of a better rest point).

    The d coordinates decouple and are summed.

    Parameters
    ----------
    game : Game
        Weights and policy (the certificate is meant for ``"memoa"``, but any
        policy of :class:`Game` works: it only uses ``game.coefficients``).
    n_agents : int
        Population size N >= 2.
    signals : array_like, shape (N, d) or (N,)
        Constant signals ``s_i``.
    initial_states : array_like, same shape as ``signals``
        ``x_i(0)``.
    agents : None, 'all' or sequence of int, optional
        Agents to certify. ``None`` (default): the ``min(8, N)`` agents with the
        largest cost under the policy (the under-performers, ranked by
        :func:`policy_costs`); ``'all'``: every agent (O(N d), fine up to
        N ~ 10^6).
    horizon : int, optional
        Finite horizon T in ``[1, 2**63 - 1]``; default infinite (``gamma < 1``) or automatic
        (``gamma = 1``, see above). The gains of every round are kept
        (``8 T b (n + 1)`` bytes for ``b`` certified (agent, coordinate) pairs
        of state size ``n``, 3 or ``K + 2``): a T whose gains exceed the memory
        this process may use is a ``ValueError``.
    tol : float, default 1e-13
        Relative tolerance of the policy iteration on the gains (and of the
        transient when choosing T for ``gamma = 1``), in (0, 1e-3].
    max_iter : int, default 100
        Policy-iteration steps before giving up (``ValueError``).
    labels : array_like of int, shape (N,), optional
        Class of every agent, in ``[0, K)`` (required when
        ``game.n_classes > 1``; every class must have an agent). Then the
        K-class game of ``MODEL.md`` section 7 is certified: every agent plays
        ``game.table`` with the true finite-N class means ``m_l`` (which
        contain ``x_i`` with weight ``1/n_l``) and class signal means ``sbar_l``,
        and pays its class's weights. The deviating agent i of class c faces
        an LQ problem in ``z = (x_i, M_1, ..., M_K, 1)``, ``M_l`` the mean of
        the *other* agents of class l (``m_l = (delta_lc x_i + (n_l - delta_lc) M_l) / n_l``);
        under the table
        ``M_l(t+1) = (1 - g_l) M_l + g_l (c_l S_l + sum_p M^s_lp sbar_p + sum_p M^m_lp m_p)``
        with ``S_l`` the others' mean signal in class l, which is linear in z;
        the cost is ``(q_c (x_i - s_i)^2 + kappa_c (x_i - m)^2 + r_c u^2)/2`` with
        ``m = x_i/N + sum_l (n_l - delta_lc) M_l / N``. The same Riccati solutions
        as above, in dimension K + 2. Given for a single-class game, labels
        (all 0) select this general code path (a cross-check of the 3 x 3 one).

    Returns
    -------
    EpsilonNashResult

    Raises
    ------
    ValueError
        On bad inputs, on non-convergence, if the identity
        ``epsilon = J(policy) - J(BR)`` fails beyond rounding, or if the costs
        are outside float64's normal range (they grow with the square of the
        signals and states; ``epsilon / J`` does not depend on their scale:
        the inputs are scaled by a power of two, exactly, before solving).

    Examples
    --------
    >>> import numpy as np
    >>> from memoa_fast.game import Game
    >>> rng = np.random.default_rng(0)
    >>> res = epsilon_nash(Game(1.0, 2.0, 0.5, 0.95), 100, rng.normal(size=(100, 1)), rng.normal(size=(100, 1)))
    >>> bool(res.max_relative < 1e-3)
    True
    """
    game = _check_game(game)
    n = check_int("n_agents", n_agents, low=2)
    s = _as_signals(signals, n)
    d = s.shape[1]
    x0 = _as_states("initial_states", initial_states, n, d)
    agents = _check_agents(agents, n)
    tol = _check_tol(tol)
    max_iter = check_int("max_iter", max_iter, low=1)
    labels, sizes = _check_labels(game, labels, n)
    if labels is None:
        horizon = _resolve_horizon(game, horizon, tol)
    else:
        horizon = _resolve_class_horizon(game, sizes, horizon, tol)

    if horizon is not None:  # refused before any work that grows with T (ranking K classes may sum T rounds)
        k = min(DEFAULT_WORST_AGENTS, n) if agents is None else n if isinstance(agents, str) else agents.size
        _check_gains_fit(horizon, k * d, 3 if labels is None else game.n_classes + 2)

    s, (x0,), e, _ = _centred_and_scaled(s, x0)  # see "scale" above: costs * 2^(-2e) from shifted inputs * 2^-e
    if agents is None:  # ranked in the centred, scaled units (a positive factor 2^(2e) from the costs)
        costs = _centred_policy_costs(game, s, x0, horizon, labels, sizes)
        k = min(DEFAULT_WORST_AGENTS, n)
        agents = np.sort(np.argsort(-costs, kind="stable")[:k]).astype(np.intp)
    elif isinstance(agents, str):
        agents = np.arange(n, dtype=np.intp)

    if labels is None:
        A, F, Q, z0 = _deviation_problem(game, s, x0, agents)
        r = game.r
    else:
        A, F, Q, z0, r = _class_deviation_problem(game, labels, sizes, s, x0, agents)
    if horizon is None:
        out = _stationary_deviation(A, F, Q, z0, r, game.gamma, tol, max_iter)
    else:
        out = _finite_deviation(A, F, Q, z0, r, game.gamma, horizon)
    k = agents.size
    # mag: size of the terms the costs are sums of (|z|'|P||z|/2), the scale of their rounding.
    cp, cb, ep, mag, mag_e = (v.reshape(k, d).sum(axis=1) for v in out)

    # epsilon is a PSD quadratic form: only rounding can make it negative.
    floor = 1e3 * _EPS * mag_e
    if (ep < -floor).any():
        i = int(np.argmin(ep + floor))
        raise ValueError(f"negative deviation gain {ep[i]!r} for agent {int(agents[i])} (cost {cp[i]!r}): the certificate failed")
    ep = np.maximum(ep, 0.0)
    # Cross-check against the plain difference (which has cancellation of size eps*J).
    scale = np.maximum(np.maximum(cp, np.abs(cb)), mag)
    mismatch = np.abs((cp - cb) - ep)
    allowed = 1e-9 * scale + 1e-300
    if (mismatch > allowed).any():
        i = int(np.argmax(mismatch / allowed))
        raise ValueError(
            f"inconsistent certificate for agent {int(agents[i])}: J(policy) - J(BR) = {cp[i] - cb[i]!r} but "
            f"the advantage sum gives {ep[i]!r} (relative mismatch {mismatch[i] / scale[i]:.3g})"
        )
    # A cost at the rounding level of its own terms is zero (then so is epsilon).
    rel = np.divide(ep, cp, out=np.zeros_like(ep), where=cp > 1e-12 * mag)
    cp = _scale_back(cp, e, 2, "costs", _INPUTS)  # 0 <= epsilon, J(BR) <= J(policy): they fit where it does
    cb, ep = np.ldexp(cb, 2 * e), np.ldexp(ep, 2 * e)
    for arr in (agents, cp, cb, ep, rel):
        arr.setflags(write=False)
    return EpsilonNashResult(
        agents=agents,
        cost_policy=cp,
        cost_best_response=cb,
        epsilon=ep,
        relative_epsilon=rel,
        max_relative=float(rel.max()),
        n_agents=n,
        horizon=horizon,
    )


def _deviation_problem(game: Game, s: np.ndarray, x0: np.ndarray, agents: np.ndarray):
    """Batched (agent, coordinate) 3x3 problems: A (b,3,3), F (b,3), Q (b,3,3), z0 (b,3)."""
    n, d = s.shape
    co = game.coefficients
    g, al, be, mu = co.gain, co.signal, co.signal_mean, co.state_mean
    q, kappa = game.q, game.kappa
    sbar = s.mean(axis=0)
    si = s[agents].reshape(-1)  # (k*d,), agent-major
    xi = x0[agents].reshape(-1)
    sb = np.tile(sbar, agents.size)
    s_others = (n * sb - si) / (n - 1)
    m0 = np.tile(x0.mean(axis=0), agents.size)
    M0 = (n * m0 - xi) / (n - 1)
    b = si.size
    nf = (n - 1) / n

    A = np.zeros((b, 3, 3))
    A[:, 0, 0] = 1.0
    A[:, 1, 0] = g * mu / n
    A[:, 1, 1] = 1.0 - g + g * mu * nf
    A[:, 1, 2] = g * (al * s_others + be * sb)
    A[:, 2, 2] = 1.0
    F = np.empty((b, 3))
    F[:, 0] = -g * (1.0 - mu / n)
    F[:, 1] = g * mu * nf
    F[:, 2] = g * (al * si + be * sb)
    h = np.stack([np.ones(b), np.zeros(b), -si], axis=1)
    f = np.array([nf, -nf, 0.0])
    Q = q * h[:, :, None] * h[:, None, :] + kappa * np.outer(f, f)
    z0 = np.stack([xi, M0, np.ones(b)], axis=1)
    return A, F, Q, z0


def _lyap_batch(Acl: np.ndarray, C: np.ndarray, gamma: float) -> np.ndarray:
    """Batched ``P = C + gamma Acl' P Acl`` for n x n blocks, exact via the n^2 x n^2 Kronecker system."""
    out = np.empty_like(C)
    n = Acl.shape[1]
    eye = np.eye(n * n)
    chunk = max(1, (_CHUNK * 81) // (n**4))
    for lo in range(0, Acl.shape[0], chunk):
        a = Acl[lo : lo + chunk]
        at = np.swapaxes(a, 1, 2)
        kron = np.einsum("bij,bkl->bikjl", at, at).reshape(-1, n * n, n * n)
        vec = np.linalg.solve(eye - gamma * kron, C[lo : lo + chunk].reshape(-1, n * n, 1))
        P = vec.reshape(-1, n, n)
        out[lo : lo + chunk] = 0.5 * (P + np.swapaxes(P, 1, 2))
    return out


def _r_matrix(r):
    """A control weight (scalar, or one per batch item) shaped to scale (b, n, n) blocks."""
    return r if np.ndim(r) == 0 else np.asarray(r)[:, None, None]


def _quad(z, P):
    return np.einsum("bi,bij,bj->b", z, P, z)


def _stationary_deviation(A, F, Q, z0, r, gamma, tol, max_iter):
    """Infinite-horizon discounted best response by policy iteration from F."""
    def closed(G):  # A + B G with B = e_1: G is added to the first row
        Acl = A.copy()
        Acl[:, 0, :] += G
        return Acl

    def evaluate(G):
        return _lyap_batch(closed(G), Q + _r_matrix(r) * G[:, :, None] * G[:, None, :], gamma)

    def improve(P):
        H = r + gamma * P[:, 0, 0]  # B'PB with B = e_1
        PA = np.einsum("bj,bjk->bk", P[:, 0, :], A)  # B'PA
        return -gamma * PA / H[:, None], H

    G = F.copy()
    prev = np.inf
    for it in range(1, max_iter + 1):
        P = evaluate(G)
        G_new, _ = improve(P)
        diff = float(np.max(np.abs(G_new - G)))
        scale = 1.0 + float(np.max(np.abs(G_new)))
        G = G_new
        # Quadratic convergence; stagnation far below sqrt(eps) is the rounding floor.
        if diff <= tol * scale or (it > 2 and diff >= 0.5 * prev and diff <= 1e-9 * scale):
            break
        prev = diff
    else:
        raise ValueError(
            f"best-response policy iteration did not converge in max_iter={max_iter} steps"
            f" (last change {diff:.3g}, tol={tol:g})"
        )
    P = evaluate(G)
    G, H = improve(P)
    AF = closed(F)
    LF = _lyap_batch(AF, Q + _r_matrix(r) * F[:, :, None] * F[:, None, :], gamma)
    D = F - G
    E = _lyap_batch(AF, H[:, None, None] * D[:, :, None] * D[:, None, :], gamma)
    az = np.abs(z0)
    mag = 0.5 * np.maximum(_quad(az, np.abs(LF)), _quad(az, np.abs(P)))
    return 0.5 * _quad(z0, LF), 0.5 * _quad(z0, P), 0.5 * _quad(z0, E), mag, 0.5 * _quad(az, np.abs(E))


def _check_gains_fit(T: int, b: int, n: int) -> None:
    """``ValueError`` naming ``horizon`` if the gains of ``T`` rounds, ``8 T b (n + 1)`` bytes, exceed the memory this process may use.

    ``b`` (agent, coordinate) problems of state size ``n`` (3, or ``K + 2`` with K classes). :func:`epsilon_nash` calls
    it before any work that grows with ``T`` (ranking the agents of K classes sums ``T`` rounds), so a horizon that
    cannot fit is refused at once, not after that work.
    """
    per_round, available = 8 * b * (n + 1), available_memory()
    needed = T * per_round
    if available is not None and needed > available:
        raise ValueError(
            f"horizon={T}: the finite-horizon certificate keeps each round's gains for {b} (agent, coordinate) "
            f"problem(s) of size {n}, {needed:,} bytes ({gib(needed)} GiB), more than the {available:,} bytes "
            f"({gib(available)} GiB) this process may use (a horizon in [1, {available // per_round}] fits); "
            "certify fewer agents, or give a shorter horizon (with gamma < 1, horizon=None is the exact infinite sum)"
        )


def _finite_deviation(A, F, Q, z0, r, gamma, T):
    """Finite-horizon best response by the backward Riccati recursion (P_T = 0).

    The gains of every round are kept for the forward pass: ``8 T b (n + 1)`` bytes, checked against the memory this
    process may use before they are allocated (a ``ValueError`` naming ``horizon``, not NumPy's ``MemoryError`` or the
    out-of-memory killer).
    """
    b, n = A.shape[0], A.shape[1]
    _check_gains_fit(T, b, n)
    Gs = np.empty((T, b, n))
    Hs = np.empty((T, b))
    P = np.zeros((b, n, n))
    At = np.swapaxes(A, 1, 2)
    for t in range(T - 1, -1, -1):
        H = r + gamma * P[:, 0, 0]
        PA_row = np.einsum("bj,bjk->bk", P[:, 0, :], A)  # B'P A
        G = -gamma * PA_row / H[:, None]
        Gs[t], Hs[t] = G, H
        # P_t = Q + gamma A'PA - H G'G
        P = Q + gamma * (At @ P @ A) - H[:, None, None] * G[:, :, None] * G[:, None, :]
        P = 0.5 * (P + np.swapaxes(P, 1, 2))
    cost_br = 0.5 * _quad(z0, P)

    AF = A.copy()
    AF[:, 0, :] += F
    z = z0.copy()
    cost_pol = np.zeros(b)
    mag_pol = np.zeros(b)
    eps = np.zeros(b)
    absQ = np.abs(Q)
    disc = 1.0
    for t in range(T):
        u = np.einsum("bi,bi->b", F, z)
        cost_pol += disc * 0.5 * (_quad(z, Q) + r * u * u)
        mag_pol += disc * 0.5 * (_quad(np.abs(z), absQ) + r * u * u)
        du = np.einsum("bi,bi->b", F - Gs[t], z)
        eps += disc * 0.5 * Hs[t] * du * du
        z = np.einsum("bij,bj->bi", AF, z)
        disc = next_discount(disc, gamma, t + 1)  # gamma^(t+1); a running product stalls at a subnormal
    mag = np.maximum(mag_pol, 0.5 * _quad(np.abs(z0), np.abs(P)))
    return cost_pol, cost_br, eps, mag, eps  # eps is a sum of squares: no cancellation


# --------------------------------------------------------------------------- K classes


def _check_labels(game: Game, labels, n: int):
    """``(labels, sizes)`` as int arrays, or ``(None, None)`` for the single-class path."""
    K = game.n_classes
    if labels is None:
        if K > 1:
            raise ValueError(f"labels (the class of every agent, ints in [0, {K - 1}]) are required for a game with {K} classes")
        return None, None
    labels = plain_array("labels", labels)
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError):
        raise TypeError(f"labels must be an array of ints in [0, {K - 1}], got {labels!r}") from None
    if arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one class per agent), got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must hold integers in [0, {K - 1}], got dtype {arr.dtype}")
    if n and (arr.min() < 0 or arr.max() >= K):
        bad = int(arr[(arr < 0) | (arr >= K)][0])
        raise ValueError(f"labels must hold class indices in [0, {K - 1}] (the game has {K} classes), got {bad}")
    sizes = np.bincount(arr, minlength=K)
    if (sizes == 0).any():
        raise ValueError(f"every class needs at least one agent; class {int(np.argmin(sizes))} has none (class sizes {sizes.tolist()})")
    return arr.astype(np.intp), sizes


def _class_mix(game: Game, sizes) -> tuple[np.ndarray, np.ndarray]:
    """``(M^s, M^m)``, each (K, K): the table's weights on the class means, its column K folded in.

    Column K of ``game.table.mix`` weighs the means over all agents (the
    baselines). With constant signals every signal is valid, so
    ``sbar = sum_l (n_l / N) sbar_l`` and ``m = sum_l (n_l / N) m_l``: exact
    for these class sizes, whatever the game's shares.
    """
    mix = game.table.mix
    K = mix.shape[1]
    frac = sizes / sizes.sum()
    return (mix[MIX_SIGNAL, :, :K] + np.outer(mix[MIX_SIGNAL, :, K], frac),
            mix[MIX_STATE, :, :K] + np.outer(mix[MIX_STATE, :, K], frac))


def _class_closed_loop(game: Game, sizes) -> np.ndarray:
    """Class means under the table: ``m(t+1) = diag(1-g) m + diag(g) M^m m + const`` (exact for any N)."""
    g = game.table.coef[:, GAIN]
    return np.diag(1.0 - g) + g[:, None] * _class_mix(game, sizes)[1]


def _resolve_class_horizon(game: Game, sizes, horizon, tol: float):
    horizon = _check_horizon(horizon)
    if horizon is not None or game.gamma < 1.0:
        return horizon
    g = game.table.coef[:, GAIN]
    lam = max(float(np.max(np.abs(np.linalg.eigvals(_class_closed_loop(game, sizes))))), float(np.max(np.abs(1.0 - g))))
    if lam >= 1.0:
        raise ValueError(f"the {game.policy!r} policy does not converge (closed-loop radius {lam:g} >= 1); pass a finite horizon")
    t = 2 if lam == 0.0 else int(math.ceil(math.log(tol) / math.log(lam))) + 1
    if t > MAX_AUTO_HORIZON:
        raise ValueError(
            f"gamma = 1 needs a horizon of {t} steps for the transient to fall below tol={tol:g}"
            f" (more than {MAX_AUTO_HORIZON}); pass horizon explicitly"
        )
    return max(t, 2)


def _tail_horizon(gamma: float) -> int:
    """Steps T with ``gamma^T <= 1e-17``: the discounted tail of a bounded cost is below 1e-17 of the whole."""
    t = int(math.ceil(math.log(1e-17) / math.log(gamma))) + 1
    if t > MAX_AUTO_HORIZON:
        raise ValueError(
            f"gamma={gamma!r} needs {t} steps for the discounted tail to fall below 1e-17"
            f" (more than {MAX_AUTO_HORIZON}); pass horizon explicitly"
        )
    return t


def _class_signal_means(labels, sizes, s):
    K = sizes.shape[0]
    onehot = np.zeros((K, labels.shape[0]))
    onehot[labels, np.arange(labels.shape[0])] = 1.0
    return onehot, (onehot @ s) / sizes[:, None]


def _class_policy_costs(game: Game, labels, sizes, s, x0, horizon) -> np.ndarray | None:
    """:func:`policy_costs` of K classes in closed form, O(N d + K^4); ``None`` where it does not apply.

    Per coordinate the class means obey ``m(t+1) = B m(t) + b`` (:func:`_class_closed_loop`,
    ``b_l = g_l (c_l sbar_l + (M^s sbar)_l)``), with a rest point ``(I - B) m* = b``, and agent i of class c
    obeys ``x_i(t+1) - x_i* = (1 - g_c)(x_i - x_i*) + g_c M^m_c. (m - m*)`` with
    ``x_i* = c_c s_i + (M^s sbar)_c + M^m_c. m*``. So ``y = (x_i - x_i*, m - m*)`` obeys ``y(t+1) = A_c y(t)``,
    the same ``A_c`` for the whole class, and the stage cost is ``y'Q_c y / 2 + c_i'y + e_i / 2`` with
    ``Q_c = q_c e_1 e_1' + kappa_c f f' + r_c g_c^2 v v'``, ``f = (1, -pi)``, ``v = (1, -M^m_c.)``,
    ``c_i = q_c delta_i e_1 + kappa_c eps_i f``, ``e_i = q_c delta_i^2 + kappa_c eps_i^2``,
    ``delta_i = x_i* - s_i``, ``eps_i = x_i* - pi'm*``; then :func:`policy_costs`'s formula with ``L_c``, ``A_c``.

    Where ``I - B`` is singular, ``m*`` is the rest point these initial means reach (``W0'm`` is conserved, ``W0``
    spanning the left null space), so that ``y`` has no part on the eigenvalue 1.
    ``None`` (the caller sums the rounds instead) when ``gamma rho(A_c)^2 >= 1`` (the discounted sums need not
    converge, ``L_c`` need not exist) or when the class means have no rest point.
    """
    coef = game.table.coef
    K = sizes.shape[0]
    n, d = s.shape
    gamma = game.gamma
    Ms, Mm = _class_mix(game, sizes)
    onehot, sbar = _class_signal_means(labels, sizes, s)
    g, sig = coef[:, GAIN], coef[:, SIGNAL]
    q, kappa, r = coef[:, Q], coef[:, KAPPA], coef[:, R]
    pi = sizes / sizes.sum()
    B = _class_closed_loop(game, sizes)
    radius = max(float(np.max(np.abs(np.linalg.eigvals(B)))), float(np.max(np.abs(1.0 - g))))
    if not gamma * radius * radius < 1.0:
        return None
    fixed = Ms @ sbar  # (K, d)
    b = g[:, None] * (sig[:, None] * sbar + fixed)
    IB = np.eye(K) - B
    mstar = np.linalg.lstsq(IB, b, rcond=None)[0]  # I - B may be singular (greedy with every q_l = 0: a line of rest points)
    m0 = (onehot @ x0) / sizes[:, None]
    left, sv, right = np.linalg.svd(IB)
    null = sv <= 64 * K * _EPS * sv[0]
    if null.any():
        # The class means conserve W0'm (W0 spans the left null space of I - B): take the rest point they reach,
        # so that y has no part on the eigenvalue 1, whose sums grow like 1/(1 - gamma) and would amplify rounding.
        V0, W0 = right[null].T, left[:, null]
        try:
            mstar = mstar + V0 @ np.linalg.solve(W0.T @ V0, W0.T @ (m0 - mstar))
        except np.linalg.LinAlgError:  # eigenvalue 1 not semisimple: the means drift, no rest point
            return None
    # Checked on the rest point used: lstsq's least-norm answer is near 0 when it drops a direction that the null
    # test above keeps (a singular value between eps and 64 K eps of the largest, e.g. greedy with q = 1e-15), and
    # a residual measured against that scale refused a population with a rest point.
    resid = np.abs(IB @ mstar - b)
    if (resid > 1e3 * _EPS * (np.abs(IB) @ np.abs(mstar) + np.abs(b)) + _TINY).any():
        return None
    if horizon is None:
        gT, ST = 0.0, 1.0 / (1.0 - gamma)
    else:
        gT, ST = gamma**horizon, _discount_sum(gamma, horizon)

    dm = m0 - mstar  # (K, d): y's class-mean part, the same for every agent
    xstar = sig[labels][:, None] * s + (fixed + Mm @ mstar)[labels]
    delta = xstar - s
    eps = xstar - pi @ mstar
    y1 = x0 - xstar
    # Per class c (batched): A_c = [[1 - g_c, v_c'], [0, B]] with v_c = g_c M^m_c., and Q_c.
    n1 = K + 1
    a, V = 1.0 - g, g[:, None] * Mm
    A = np.zeros((K, n1, n1))
    A[:, 0, 0] = a
    A[:, 0, 1:] = V
    A[:, 1:, 1:] = B
    f = np.concatenate(([1.0], -pi))
    u = np.concatenate((np.ones((K, 1)), -Mm), axis=1)  # (1, -M^m_c.): u_c = -g_c u'y
    Qc = kappa[:, None, None] * np.outer(f, f) + (r * g * g)[:, None, None] * u[:, :, None] * u[:, None, :]
    Qc[:, 0, 0] += q
    try:
        L = _class_stein(B, a, V, Qc, gamma)
    except np.linalg.LinAlgError:  # gamma lambda_i lambda_j = 1 to the last bit (gamma = 1, I - B singular): no L
        return None
    eye = np.eye(n1)
    W = np.linalg.inv(eye - gamma * A)  # sum_t (gamma A_c)^t
    if gT == 0.0:  # infinite horizon, or gamma^T below the smallest float: the tail terms are exactly 0
        LT, WT = L, W
    else:
        LT, WT = _finite_sums(A, Qc, L, W, gamma, horizon)

    # Per agent: y0 = (y1_i, dm); c_i' WT y0 = q delta (e_1' WT y0) + kappa eps (f' WT y0).
    cl = labels
    Lm = LT[:, 0, 1:] @ dm  # (K, d)
    Mq = np.einsum("kd,ckl,ld->cd", dm, LT[:, 1:, 1:], dm)  # (K, d): dm' L_c dm
    we, wf = WT[:, 0, :], np.einsum("i,cij->cj", f, WT)  # rows e_1' WT_c and f' WT_c
    we_m, wf_m = we[:, 1:] @ dm, wf[:, 1:] @ dm  # (K, d)
    quad = LT[cl, 0, 0][:, None] * y1 * y1 + 2.0 * y1 * Lm[cl] + Mq[cl]
    qi, ki = q[cl][:, None], kappa[cl][:, None]
    lin = qi * delta * (we[cl, 0][:, None] * y1 + we_m[cl]) + ki * eps * (wf[cl, 0][:, None] * y1 + wf_m[cl])
    const = qi * delta * delta + ki * eps * eps
    return (0.5 * quad + lin + 0.5 * ST * const).sum(axis=1)


def _class_stein(B: np.ndarray, a: np.ndarray, V: np.ndarray, Qc: np.ndarray, gamma: float) -> np.ndarray:
    """``L_c = Q_c + gamma A_c' L_c A_c`` for every class, ``A_c = [[a_c, v_c'], [0, B]]``: (K, K+1, K+1), O(K^4).

    By blocks, ``L_c = [[l, h'], [h, M]]``: ``l = Q_11 / (1 - gamma a^2)``,
    ``(I - gamma a B') h = Q_21 + gamma a l v`` and
    ``M = R + gamma B' M B``, ``R = Q_22 + gamma (l v v' + v (B'h)' + (B'h) v')``: one K x K Stein equation per
    class with the same B (:func:`_stein_schur`, one Schur form for all).
    """
    K, n1 = Qc.shape[0], Qc.shape[1]
    l = Qc[:, 0, 0] / (1.0 - gamma * a * a)
    Mh = np.eye(n1 - 1)[None] - gamma * a[:, None, None] * B.T[None]
    h = np.linalg.solve(Mh, (Qc[:, 1:, 0] + (gamma * a * l)[:, None] * V)[..., None])[..., 0]
    Bh = h @ B  # rows (B'h)'
    R = Qc[:, 1:, 1:] + gamma * (l[:, None, None] * V[:, :, None] * V[:, None, :]
                                 + V[:, :, None] * Bh[:, None, :] + Bh[:, :, None] * V[:, None, :])
    L = np.empty((K, n1, n1))
    L[:, 0, 0] = l
    L[:, 1:, 0] = h
    L[:, 0, 1:] = h
    L[:, 1:, 1:] = _stein_schur(B, R, gamma)
    return L


def _stein_schur(A: np.ndarray, C: np.ndarray, gamma: float) -> np.ndarray:
    """Solve ``P = C + gamma A' P A`` (real n x n A; symmetric C, or a stack (..., n, n) of them) via A's Schur form.

    With ``A = U T U^H`` (complex Schur, T upper triangular), ``X = U^H P U`` obeys ``X = U^H C U + gamma T^H X T``,
    solved column by column: ``(I - gamma T_jj T^H) X_j = (U^H C U)_j + gamma T^H sum_{l<j} X_l T_lj``
    (Bartels-Stewart): O(n^3) per C, where the Kronecker form (:func:`_lyapunov_dense`) costs O(n^6). Needs
    ``gamma lambda_i lambda_j != 1`` for A's eigenvalues.
    """
    from scipy.linalg import schur

    T, U = schur(A, output="complex")
    UH = U.conj().T
    Ct = UH @ C @ U
    n = A.shape[0]
    cols = np.ascontiguousarray(np.moveaxis(Ct.reshape(-1, n, n), 2, 0))  # cols[j, c] = C~_c[:, j]
    X = np.zeros_like(cols)  # X[j, c] = column j of X_c, laid out so that sum_{l<j} X_l T_lj is one product
    TH = T.conj().T  # lower triangular
    eye = np.eye(n)
    for j in range(n):
        rhs = cols[j] + gamma * np.tensordot(T[:j, j], X[:j], axes=(0, 0)) @ TH.T  # one row per C
        X[j] = np.linalg.solve(eye - gamma * T[j, j] * TH, rhs.T).T  # (scipy's triangular solve threads: slow when busy)
    X = X.transpose(1, 2, 0).reshape(Ct.shape)  # X[c][:, j]
    P = (U @ X @ UH).real
    return 0.5 * (P + np.swapaxes(P, -1, -2))


def _simulate_class_costs(game: Game, labels, sizes, s, x0, T: int) -> np.ndarray:
    """Every agent on ``game.table`` with the true class means, costs summed over t < T.

    O(N d T): the test oracle of :func:`_class_policy_costs`, and its fallback where that does not apply.

    The discount is ``gamma^t`` (:func:`~memoa_fast.kernels.next_discount`: a running product stalled at a subnormal
    for ``gamma > 1/2``). Once it underflows to 0 (``gamma < 1``: after about 745 / -ln(gamma) rounds) no later round
    adds to any cost, so the sum stops there: the same bits for every longer horizon (a horizon of 2**63 - 1 used to
    loop for ever).
    """
    coef = game.table.coef
    Ms, Mm = _class_mix(game, sizes)
    onehot, sbar = _class_signal_means(labels, sizes, s)
    weights = sizes / sizes.sum()
    g = coef[labels, GAIN][:, None]
    sig = coef[labels, SIGNAL][:, None]
    q, kappa, r = coef[labels, Q], coef[labels, KAPPA], coef[labels, R]
    fixed = Ms @ sbar  # (K, d)
    target = sig * s
    x = x0.copy()
    J = np.zeros(x.shape[0])
    disc = 1.0
    for t in range(T):
        if disc == 0.0:
            break
        mcls = (onehot @ x) / sizes[:, None]
        m = weights @ mcls
        u = -g * (x - target - (fixed + Mm @ mcls)[labels])
        track = ((x - s) ** 2).sum(axis=1)
        J += disc * 0.5 * (q * track + kappa * ((x - m) ** 2).sum(axis=1) + r * (u**2).sum(axis=1))
        x += u
        disc = next_discount(disc, game.gamma, t + 1)
    return J


def _class_deviation_problem(game: Game, labels, sizes, s, x0, agents):
    """Batched (agent, coordinate) problems in z = (x_i, M_1..M_K, 1): A, F, Q, z0 and r (one per item)."""
    coef = game.table.coef
    Ms, Mm = _class_mix(game, sizes)
    K = coef.shape[0]
    n, d = s.shape
    dim = K + 2
    onehot, sbar = _class_signal_means(labels, sizes, s)
    mcls0 = (onehot @ x0) / sizes[:, None]
    g, sig = coef[:, GAIN], coef[:, SIGNAL]
    fixed = Ms @ sbar  # (K, d): signal part of every class's offset
    nf = float(n)
    k = agents.size
    cls = labels[agents]
    own = np.zeros((k, K))
    own[np.arange(k), cls] = 1.0
    others = sizes[None, :] - own  # (k, K)
    omega = others / sizes[None, :]  # weight of M_l in m_l
    has = others > 0

    # Per agent (independent of the coordinate).
    A1 = np.zeros((k, dim, dim))
    A1[:, 0, 0] = 1.0
    A1[:, dim - 1, dim - 1] = 1.0
    F1 = np.zeros((k, dim))
    gc = g[cls]
    for l in range(K):
        A1[:, 1 + l, 0] = g[l] * Mm[l, cls] / sizes[cls]
        A1[:, 1 + l, 1:1 + K] = g[l] * Mm[l][None, :] * omega
        A1[:, 1 + l, 1 + l] += 1.0 - g[l]
        A1[~has[:, l], 1 + l, :] = 0.0  # no other agent in this class: M_l is unused
    F1[:, 0] = -gc * (1.0 - Mm[cls, cls] / sizes[cls])
    F1[:, 1:1 + K] = gc[:, None] * Mm[cls] * omega
    f1 = np.zeros((k, dim))
    f1[:, 0] = 1.0 - 1.0 / nf
    f1[:, 1:1 + K] = -others / nf

    # Per (agent, coordinate), agent-major.
    b = k * d
    rep = lambda v: np.repeat(v, d, axis=0)  # noqa: E731
    A = rep(A1)
    F = rep(F1)
    f = rep(f1)
    si = s[agents].reshape(-1)
    xi = x0[agents].reshape(-1)
    cb = rep(cls)
    coord = np.tile(np.arange(d), k)
    for l in range(K):
        o_l = rep(others[:, l])
        own_l = (cb == l).astype(float)
        S_l = np.where(o_l > 0, (sizes[l] * sbar[l, coord] - own_l * si) / np.where(o_l > 0, o_l, 1.0), 0.0)
        A[:, 1 + l, dim - 1] = np.where(o_l > 0, g[l] * (sig[l] * S_l + fixed[l, coord]), 0.0)
    F[:, dim - 1] = g[cb] * (sig[cb] * si + fixed[cb, coord])
    h = np.zeros((b, dim))
    h[:, 0] = 1.0
    h[:, dim - 1] = -si
    qv, kv, rv = coef[cb, Q], coef[cb, KAPPA], coef[cb, R]
    Qm = qv[:, None, None] * h[:, :, None] * h[:, None, :] + kv[:, None, None] * f[:, :, None] * f[:, None, :]
    z0 = np.zeros((b, dim))
    z0[:, 0] = xi
    for l in range(K):
        o_l = rep(others[:, l])
        own_l = (cb == l).astype(float)
        z0[:, 1 + l] = np.where(o_l > 0, (sizes[l] * mcls0[l, coord] - own_l * xi) / np.where(o_l > 0, o_l, 1.0), 0.0)
    z0[:, dim - 1] = 1.0
    return A, F, Qm, z0, rv


def _class_gain_matrix(game: Game, labels, sizes, s) -> np.ndarray:
    coef = game.table.coef
    Ms, Mm = _class_mix(game, sizes)
    n, d = s.shape
    _, sbar = _class_signal_means(labels, sizes, s)
    g = coef[labels, GAIN]
    K = np.empty((d, n, n + 1))
    K[:, :, :n] = g[:, None] * (np.eye(n) - Mm[labels][:, labels] / sizes[labels][None, :])
    K[:, :, n] = (-g[:, None] * (coef[labels, SIGNAL][:, None] * s + (Ms @ sbar)[labels])).T
    return K


# --------------------------------------------------------------------------- exact Nash


def nash_equilibrium(game, n_agents, signals, tol: float = 1e-12, max_iter: int = 10000, labels=None) -> NashEquilibrium:
    """Exact stationary feedback Nash equilibrium of the N-agent game (N <= 50).

    Per coordinate, joint state ``z = (x_1, ..., x_N, 1)`` (dimension N+1),
    ``z(t+1) = z(t) + sum_j e_j u_j(t)`` and player i's stage cost
    ``(z'Q_i z + r u_i^2)/2`` with

    .. math::

        Q_i = q\\, h_i h_i' + \\kappa\\, f_i f_i',\\qquad
        h_i = e_i - s_i e_{N+1},\\qquad f_i = e_i - \\tfrac1N (1, \\dots, 1, 0).

    Given the others' gains ``u_j = -K_j z``, player i's best response solves
    the discounted Riccati equation of ``A_{-i} = I - sum_{j != i} e_j K_j``,
    ``B_i = e_i``:

    .. math::

        P_i = Q_i + \\gamma A_{-i}' P_i A_{-i}
              - \\gamma^2 A_{-i}'P_i e_i (r + \\gamma e_i'P_i e_i)^{-1} e_i' P_i A_{-i},
        \\qquad K_i = \\gamma\\,\\frac{e_i' P_i A_{-i}}{r + \\gamma e_i' P_i e_i}.

    (This is the undiscounted Riccati equation of ``sqrt(gamma) A_{-i}``,
    ``sqrt(gamma) e_i``.) Each best response is computed exactly by policy
    iteration warm-started at the player's current gain, each evaluation a
    discounted Lyapunov equation solved by Smith doubling, all players at once
    (Jacobi best-response rounds). The rounds start at the mean-field (MEMOA)
    gains and stop when ``max |K^{n+1} - K^n| <= tol (1 + max |K|)``. Cost
    O(N^4 log(1/(1-gamma))) per round.

    Signals only enter the affine column of the gains (the state block of the
    game does not see them), so the state gains are the same in every
    coordinate; the d coordinates are solved together as a batch.

    Parameters
    ----------
    game : Game
        Only the weights q, kappa, r, gamma are used (``gamma < 1``: with
        ``gamma = 1`` the stationary costs are infinite).
    n_agents : int
        N, in [2, 50].
    signals : array_like, shape (N, d) or (N,)
        Constant signals.
    tol : float, default 1e-12
        Relative tolerance on the gains, in (0, 1e-3].
    max_iter : int, default 10000
        Best-response rounds before giving up (``ValueError``).
    labels : array_like of int, shape (N,), optional
        Class of every player (required when ``game.n_classes > 1``): player i
        then has its class's weights ``q_i, kappa_i, r_i`` (``Q_i`` and ``r``
        above become per player), and the rounds start at the K-class
        policy's gains (:func:`policy_gain_matrix` with ``labels``).

    Returns
    -------
    NashEquilibrium
        Its :meth:`NashEquilibrium.costs` gives the players' costs from given
        initial states; compare with :func:`policy_costs` and
        :func:`policy_gain_matrix`.
    """
    game = _check_game(game)
    n = check_int("n_agents", n_agents, low=2)
    if n > NASH_MAX_AGENTS:
        raise ValueError(
            f"n_agents must be in [2, {NASH_MAX_AGENTS}] for the exact Nash equilibrium"
            f" (cost O(N^4) per round), got {n}; use epsilon_nash for large populations"
        )
    s = _as_signals(signals, n)
    tol = _check_tol(tol)
    max_iter = check_int("max_iter", max_iter, low=1)
    if game.gamma >= 1.0:
        raise ValueError(f"nash_equilibrium needs gamma < 1 (with gamma = 1 the stationary costs are infinite), got gamma={game.gamma!r}")
    labels, sizes = _check_labels(game, labels, n)
    signals = s
    # Solved for the signals minus their mean (the costs see differences only: a common shift changes no state
    # gain, see _centred_and_scaled), times 2^-e; shifted and scaled back at the end.
    s, _, e, centre = _centred_and_scaled(s)  # the given signals are 2^e (s + centre)
    gamma = game.gamma
    if labels is None:
        q, kappa, r = game.q, game.kappa, game.r
        qp, kp, rp = q, kappa, r
    else:
        coef = game.table.coef
        q, kappa, r = (coef[labels, col] for col in (Q, KAPPA, R))
        qp, kp = q[None, :, None, None], kappa[None, :, None, None]
        rp = r
    d = s.shape[1]
    dim = n + 1
    idx = np.arange(n)

    # Player cost matrices Q[c, i] (d, n, dim, dim).
    h = np.zeros((d, n, dim))
    h[:, idx, idx] = 1.0
    h[:, :, n] = -s.T
    f = np.zeros((n, dim))
    f[:, :n] = -1.0 / n
    f[idx, idx] += 1.0
    Qm = qp * h[..., :, None] * h[..., None, :] + kp * (f[:, :, None] * f[:, None, :])[None]

    if labels is None:
        gains = game.gains
        w = q + kappa
        K = _gain_matrix(gains.k, q / w, kappa / w - gains.c, gains.c, s)  # mean-field start
    else:
        K = _class_gain_matrix(game.with_policy("memoa"), labels, sizes, s)  # K-class mean-field start

    diff = np.inf
    P = None
    for it in range(1, max_iter + 1):
        K_new, P = _best_responses(K, Qm, rp, gamma, tol)
        diff = float(np.max(np.abs(K_new - K)))
        K = K_new
        if diff <= tol * (1.0 + float(np.max(np.abs(K)))):
            break
    else:
        raise ValueError(
            f"best-response iteration did not reach a Nash equilibrium in max_iter={max_iter} rounds"
            f" (last change {diff:.3g}, tol={tol:g})"
        )
    # Values of the equilibrium itself (P above belongs to the last best responses, = K).
    Acl = _joint_closed_loop(K)
    C = Qm + _r_players(rp) * K[..., :, None] * K[..., None, :]
    P = _stein(np.sqrt(gamma) * np.broadcast_to(Acl[:, None], C.shape), C)
    # The shifted problem's values (read by costs), then back to the given signals. With z' = (x - c, 1) = T z,
    # T = [[I, -c 1], [0, 1]]: the affine gains become k' - c K_x 1 and the values T' P T; the affine column of K
    # and the cross terms of P scale with the signals, P's corner with their square; the state blocks do not.
    shifted_values = P.copy()
    shifted_values.setflags(write=False)
    c = centre[:, None]
    K[..., n] -= c * K[..., :n].sum(axis=-1)
    row = P[..., :n, :n].sum(axis=-1)  # (d, n, n): P_xx 1
    corner = P[..., n, n] - 2.0 * c * P[..., :n, n].sum(axis=-1) + c * c * row.sum(axis=-1)
    cross = P[..., :n, n] - c[..., None] * row
    P[..., :n, n] = P[..., n, :n] = cross
    P[..., n, n] = corner
    K[..., n] = _scale_back(K[..., n], e, 1, "the gains' affine terms", "signals")
    P[..., :n, n] = P[..., n, :n] = _scale_back(P[..., n, :n], e, 1, "the values' cross terms", "signals")
    P[..., n, n] = _scale_back(P[..., n, n], e, 2, "the values' constant terms", "signals")
    for arr in (K, P):
        arr.setflags(write=False)
    return NashEquilibrium(
        gains=K,
        values=P,
        own_gain=np.diagonal(K[0, :, :n]).copy(),
        signals=signals,
        iterations=it,
        residual=diff,
        q=q,
        kappa=kappa,
        r=r,
        gamma=gamma,
        labels=labels,
        _shifted=(np.ldexp(centre, e), shifted_values, e),
    )


def _r_players(r):
    """Control weights (scalar, or one per player) shaped to scale (d, N, dim, dim) blocks."""
    return r if np.ndim(r) == 0 else np.asarray(r)[None, :, None, None]


def _joint_closed_loop(K: np.ndarray) -> np.ndarray:
    """``I - sum_j e_j K_j`` per coordinate, shape (d, N+1, N+1)."""
    d, n, dim = K.shape
    Acl = np.broadcast_to(np.eye(dim), (d, dim, dim)).copy()
    Acl[:, :n, :] -= K
    return Acl


def _stein(M: np.ndarray, C: np.ndarray, max_steps: int = 64) -> np.ndarray:
    """Batched ``P = C + M' P M`` by Smith doubling (spectral radius of M < 1)."""
    S = C.copy()
    Mk = np.array(M)
    for _ in range(max_steps):
        inc = np.swapaxes(Mk, -1, -2) @ S @ Mk
        S += inc
        big = float(np.max(np.abs(S)))
        if not np.isfinite(big):
            break
        if float(np.max(np.abs(inc))) <= _EPS * big and float(np.max(np.abs(Mk))) <= 1e-3:
            return 0.5 * (S + np.swapaxes(S, -1, -2))
        Mk = Mk @ Mk
    raise ValueError(
        "discounted Lyapunov equation did not converge"
        ": the joint closed loop is not stable under the discount (gains not stabilizing)"
    )


def _best_responses(K: np.ndarray, Qm: np.ndarray, r: float, gamma: float, tol: float, max_inner: int = 100):
    """Every player's exact best response to the others' gains K (all players at once).

    Returns the new gains (d, N, N+1) and the players' value matrices.
    """
    d, n, dim = K.shape
    idx = np.arange(n)
    Acl = _joint_closed_loop(K)
    # A_{-i} = Acl + e_i K_i (player i's own row restored to the identity).
    Ami = np.broadcast_to(Acl[:, None], (d, n, dim, dim)).copy()
    Ami[:, idx, idx, :] += K
    sg = math.sqrt(gamma)
    L = K.copy()
    prev = np.inf
    for it in range(1, max_inner + 1):
        Mcl = Ami.copy()
        Mcl[:, idx, idx, :] -= L
        C = Qm + _r_players(r) * L[..., :, None] * L[..., None, :]
        P = _stein(sg * Mcl, C)
        Prow = P[:, idx, idx, :]  # (d, n, dim): e_i' P_i
        H = r + gamma * Prow[:, idx, idx]  # r + gamma e_i' P_i e_i, (d, n)
        L_new = gamma * np.einsum("cnj,cnjk->cnk", Prow, Ami) / H[..., None]
        change = float(np.max(np.abs(L_new - L)))
        scale = 1.0 + float(np.max(np.abs(L_new)))
        L = L_new
        if change <= 0.1 * tol * scale or (it > 2 and change >= 0.5 * prev and change <= 1e-9 * scale):
            return L, P
        prev = change
    raise ValueError(f"a player's best response (policy iteration) did not converge in {max_inner} steps (last change {change:.3g})")
