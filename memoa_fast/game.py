"""The linear-quadratic MEMOA game: weights, closed-form gains and policies.

This is the project's formulation (``MODEL.md``) of the MEMOA abstract: N
agents with states ``x_i`` in R^d, private signals ``s_i``, dynamics
``x_i(t+1) = x_i(t) + u_i(t)`` and stage cost

.. math::

    l_i = \\tfrac12\\left(q|x_i - s_i|^2 + \\kappa|x_i - m|^2 + r|u_i|^2\\right),

with ``m`` the mean state. Weights are scalars, so the d coordinates decouple
and every gain is a scalar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validation import check_choice, check_real
from .kernels import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, N_COEF, Q, R, SIGNAL, SIZE

POLICIES = ("memoa", "greedy", "local", "consensus")


@dataclass(frozen=True)
class Gains:
    """Stationary gains of the decentralized mean-field policy.

    Attributes
    ----------
    P : float
        Positive root of the discounted scalar Riccati equation.
    k : float
        Feedback gain ``gamma P / (r + gamma P)``, in (0, 1).
    a : float
        Closed-loop discount ``gamma (1 - k)``; ``P (1 - a) = w``.
    rho : float
        Relaxation rate of the mean field, the root in [0, 1) of the
        consistency quadratic.
    c : float
        Mean-field feed-forward gain ``kappa rho (1-a) / (w (1 - a rho))``.
    """

    P: float
    k: float
    a: float
    rho: float
    c: float


@dataclass(frozen=True)
class PolicyCoefficients:
    """Every policy here is ``u_i = -gain (x_i - signal s_i - signal_mean sbar - state_mean m)``.

    The four numbers are all a kernel needs; ``signal + signal_mean + state_mean = 1``
    for every policy (a population at a common signal is at rest).
    """

    gain: float
    signal: float
    signal_mean: float
    state_mean: float


@dataclass(frozen=True, eq=False)
class PolicyTable:
    """The policy of every class as the kernels read it.

    An agent of class ``j`` plays

    .. math::

        u_i = -g_j\\left(x_i - c_j s_i - \\sum_l M^s_{jl} \\bar s_l - \\sum_l M^m_{jl} m_l\\right)

    and pays ``1/2 (q_j |x_i - s_i|^2 + kappa_j |x_i - m|^2 + r_j |u_i|^2)``, with
    ``m_l``, ``sbar_l`` the class means of states and valid signals and ``m``
    the mean of all states.

    Attributes
    ----------
    coef : numpy.ndarray, shape (K, N_COEF)
        Columns ``GAIN, SIGNAL, Q, KAPPA, R, SIZE`` (:mod:`memoa_fast.kernels`);
        ``SIZE`` holds the class share ``pi_j`` (a population replaces it by its
        class sizes). Read-only.
    mix : numpy.ndarray, shape (2, K, K)
        ``mix[MIX_SIGNAL] = M^s``, ``mix[MIX_STATE] = M^m``. Read-only.
    """

    coef: np.ndarray
    mix: np.ndarray

    @property
    def n_classes(self) -> int:
        return self.coef.shape[0]


def solve_gains(q: float, kappa: float, r: float, gamma: float) -> Gains:
    """Closed-form stationary gains of the MEMOA policy.

    .. math::

        b &= w\\gamma - r(1-\\gamma), \\qquad w = q + \\kappa \\\\
        P &= \\frac{b + \\sqrt{b^2 + 4\\gamma w r}}{2\\gamma}, \\qquad
        k = \\frac{\\gamma P}{r + \\gamma P}, \\qquad a = \\gamma (1-k) \\\\
        0 &= a\\rho^2 - \\left(1 + a(1-k) - k\\tfrac{\\kappa}{w}(1-a)\\right)\\rho + (1-k),
        \\quad \\rho \\in [0, 1) \\\\
        c &= \\frac{\\kappa \\rho (1-a)}{w (1 - a\\rho)}

    Parameters
    ----------
    q, kappa : float
        Tracking and mean-field weights, ``>= 0`` with ``q + kappa > 0``.
    r : float
        Control weight, ``> 0``.
    gamma : float
        Discount, in (0, 1].

    Returns
    -------
    Gains
    """
    q, kappa, r, gamma = _check_weights(q, kappa, r, gamma)
    w = q + kappa
    b = w * gamma - r * (1.0 - gamma)
    # For b < 0 the textbook root cancels; the equivalent product form does not.
    disc = math.sqrt(b * b + 4.0 * gamma * w * r)
    P = (b + disc) / (2.0 * gamma) if b >= 0 else 2.0 * w * r / (disc - b)
    k = gamma * P / (r + gamma * P)
    a = gamma * (1.0 - k)
    if q == 0.0:
        # Nothing anchors the mean: rho = 1 is an exact root (the quadratic's
        # roots are 1 and 1/gamma), and then c = 1. Exact, not rounded.
        return Gains(P=P, k=k, a=a, rho=1.0, c=1.0)
    B = 1.0 + a * (1.0 - k) - k * (kappa / w) * (1.0 - a)
    # Small root of a rho^2 - B rho + (1-k), in the cancellation-free form.
    rho = 2.0 * (1.0 - k) / (B + math.sqrt(max(B * B - 4.0 * a * (1.0 - k), 0.0)))
    c = kappa * rho * (1.0 - a) / (w * (1.0 - a * rho))
    return Gains(P=P, k=k, a=a, rho=rho, c=c)


def _check_weights(q, kappa, r, gamma):
    q = check_real("q", q, low=0.0)
    kappa = check_real("kappa", kappa, low=0.0)
    r = check_real("r", r, low=0.0, low_open=True)
    gamma = check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)
    if q + kappa <= 0.0:
        raise ValueError(f"q + kappa must be > 0 (an agent must care about something), got q={q!r}, kappa={kappa!r}")
    return q, kappa, r, gamma


class Game:
    """Weights, gains and the chosen policy of one MEMOA population.

    Parameters
    ----------
    q : float, default 1.0
        Weight on tracking the agent's own signal, ``q >= 0``.
    kappa : float, default 1.0
        Weight on staying near the mean state, ``kappa >= 0``; ``q + kappa > 0``.
    r : float, default 0.1
        Weight on the control effort, ``r > 0``.
    gamma : float, default 0.9
        Discount factor, ``0 < gamma <= 1``.
    policy : {"memoa", "greedy", "local", "consensus"}
        ``memoa`` is the decentralized mean-field Nash policy

        .. math:: u_i = -k\\left(x_i - \\frac{q s_i + \\kappa \\bar s}{w} - c(m - \\bar s)\\right);

        the others are the greedy baselines of ``MODEL.md`` section 4:
        ``greedy`` ``u_i = (q s_i + kappa m - w x_i)/(w + r)``,
        ``local`` ``u_i = -k (x_i - s_i)``, ``consensus`` ``u_i = -k (x_i - sbar)``.

    Examples
    --------
    >>> game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    >>> round(game.gains.k, 6), round(game.gains.rho, 6)  # doctest: +SKIP
    """

    __slots__ = ("q", "kappa", "r", "gamma", "policy", "gains", "coefficients", "table")

    def __init__(self, q: float = 1.0, kappa: float = 1.0, r: float = 0.1, gamma: float = 0.9, policy: str = "memoa"):
        self.q, self.kappa, self.r, self.gamma = _check_weights(q, kappa, r, gamma)
        self.policy = check_choice("policy", policy, POLICIES)
        self.gains = solve_gains(self.q, self.kappa, self.r, self.gamma)
        self.coefficients = _policy_coefficients(self.policy, self.q, self.kappa, self.r, self.gains)
        self.table = _single_class_table(self.coefficients, self.q, self.kappa, self.r)

    @property
    def n_classes(self) -> int:
        """Number of classes K (1 here)."""
        return 1

    @property
    def w(self) -> float:
        """Total state weight ``q + kappa``."""
        return self.q + self.kappa

    def with_policy(self, policy: str) -> "Game":
        """The same weights under another policy (for baselines on the same stream)."""
        return Game(self.q, self.kappa, self.r, self.gamma, policy)

    def to_dict(self) -> dict:
        return {"q": self.q, "kappa": self.kappa, "r": self.r, "gamma": self.gamma, "policy": self.policy}

    def __repr__(self) -> str:
        return f"Game(q={self.q!r}, kappa={self.kappa!r}, r={self.r!r}, gamma={self.gamma!r}, policy={self.policy!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Game) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().values()))


def _policy_coefficients(policy: str, q: float, kappa: float, r: float, gains: Gains) -> PolicyCoefficients:
    w = q + kappa
    if policy == "memoa":
        # target = (q s + kappa sbar)/w + c (m - sbar)
        return PolicyCoefficients(gains.k, q / w, kappa / w - gains.c, gains.c)
    if policy == "greedy":
        # u = (q s + kappa m - w x)/(w + r) = -(w/(w+r)) (x - (q s + kappa m)/w)
        return PolicyCoefficients(w / (w + r), q / w, 0.0, kappa / w)
    if policy == "local":
        return PolicyCoefficients(gains.k, 1.0, 0.0, 0.0)
    return PolicyCoefficients(gains.k, 0.0, 1.0, 0.0)  # consensus


def _single_class_table(coef: PolicyCoefficients, q: float, kappa: float, r: float) -> PolicyTable:
    row = np.zeros((1, N_COEF))
    row[0, GAIN], row[0, SIGNAL], row[0, Q], row[0, KAPPA], row[0, R], row[0, SIZE] = coef.gain, coef.signal, q, kappa, r, 1.0
    mix = np.zeros((2, 1, 1))
    mix[MIX_SIGNAL, 0, 0], mix[MIX_STATE, 0, 0] = coef.signal_mean, coef.state_mean
    row.flags.writeable = False
    mix.flags.writeable = False
    return PolicyTable(row, mix)
