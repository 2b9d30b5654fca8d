"""The linear-quadratic MEMOA game: weights, closed-form gains and policies.

This is the project's formulation (``MODEL.md``) of the MEMOA abstract: N
agents with states ``x_i`` in R^d, private signals ``s_i``, dynamics
``x_i(t+1) = x_i(t) + u_i(t)`` and stage cost

.. math::

    l_i = \\tfrac12\\left(q|x_i - s_i|^2 + \\kappa|x_i - m|^2 + r|u_i|^2\\right),

with ``m`` the mean state. Weights are scalars, so the d coordinates decouple
and every gain is a scalar.

Trust classes (``MODEL.md`` section 7): the agents may come in K classes,
class ``j`` holding the share ``pi_j`` of the population with its own weights
``q_j, kappa_j, r_j`` (``gamma`` shared). :func:`solve_classes` computes the
exact K-class mean-field equilibrium and :class:`Game` turns it into the
:class:`PolicyTable` the kernels read.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._copies import build_as, own_attributes, set_own_attributes
from ._validation import as_real_values, check_bool, check_choice, check_int, check_real
from .kernels import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, N_COEF, SIGNAL, SIZE, Q, R

POLICIES = ("memoa", "greedy", "local", "consensus")

#: Smallest positive normal float64: a gain below it would lose relative accuracy (subnormal) or vanish.
_TINY = np.finfo(np.float64).tiny
#: Tolerance on ``sum(shares) == 1``.
SHARES_TOL = 1e-12


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
        Closed-loop discount ``gamma (1 - k)``; ``P (1 - a) = w``. It is
        computed as ``gamma r / (r + gamma P)``, never from ``1 - k``, so
        ``a / gamma`` is ``1 - k`` to full relative accuracy even when ``k``
        rounds to 1.
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
    mix : numpy.ndarray, shape (2, K, K + 1)
        ``mix[MIX_SIGNAL, :, :K] = M^s``, ``mix[MIX_STATE, :, :K] = M^m``;
        column ``K`` weighs the means over all agents, ``sbar`` and ``m``
        (the baselines' ``greedy`` and ``consensus``, MODEL.md section 4).
        Read-only.
    """

    coef: np.ndarray
    mix: np.ndarray

    @property
    def n_classes(self) -> int:
        """Number of classes K (rows of ``coef``)."""
        return self.coef.shape[0]


@dataclass(frozen=True, eq=False)
class ClassEquilibrium:
    """The exact K-class mean-field equilibrium (``MODEL.md`` section 7).

    Class ``j`` (share ``pi_j``, weights ``q_j, kappa_j, r_j``, ``w_j = q_j + kappa_j``)
    has the single-agent gains ``P_j, k_j, a_j = gamma (1 - k_j)``. With
    constant signals the class-mean deviations ``D = M - M*`` obey
    ``D(t+1) = A D(t)``, ``A`` the stable solution of

    .. math::

        e_j' A = (1 - k_j) e_j' + \\beta_j \\pi' A (I - a_j A)^{-1},\\qquad
        \\beta_j = k_j (1 - a_j) \\kappa_j / w_j,

    and the agent of class ``j`` plays
    ``u_i = -k_j (x_i - (q_j s_i + kappa_j m*)/w_j - sum_l C_jl (m_l - m_l*))`` with
    ``C_j. = (kappa_j/w_j)(1 - a_j) pi' A (I - a_j A)^{-1}``, ``m* = sum_l lam_l sbar_l``
    and ``m_l* = (q_l sbar_l + kappa_l m*)/w_l``. Note ``A = diag(1 - k) + diag(k) C``.

    Every array is read-only.

    Attributes
    ----------
    P, k, a : numpy.ndarray, shape (K,)
        Per-class gains (as :func:`solve_gains`).
    one_minus_k : numpy.ndarray, shape (K,)
        ``1 - k_j = r_j / (r_j + gamma P_j)``, computed without cancellation.
    A : numpy.ndarray, shape (K, K)
        Transition of the class-mean deviations; spectral radius < 1.
    C : numpy.ndarray, shape (K, K)
        Feed-forward gains on the class-mean deviations.
    lam : numpy.ndarray, shape (K,)
        Weights of the rest point ``m* = sum_l lam_l sbar_l``,
        ``lam_l = pi_l (q_l/w_l) / sum_j pi_j q_j/w_j``.
    shares : numpy.ndarray, shape (K,)
        The class shares ``pi``.
    spectral_radius : float
        Largest ``|eigenvalue|`` of ``A``.
    residual : float
        ``max |F(A) - A|``, ``F`` the right-hand side of the fixed point above.
    iterations : int
        Fixed-point steps taken (0 for the direct solution, ``method="qz"``,
        and for the closed form at K = 1).
    method : str
        ``"closed-form"`` (K = 1), ``"qz"``, ``"secular"`` or ``"iterate"`` (see :func:`solve_classes`).
    """

    P: np.ndarray
    k: np.ndarray
    a: np.ndarray
    one_minus_k: np.ndarray
    A: np.ndarray
    C: np.ndarray
    lam: np.ndarray
    shares: np.ndarray
    spectral_radius: float
    residual: float
    iterations: int
    method: str

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return self.A.shape[0]


# --------------------------------------------------------------------------- single-class gains


def _gains_arrays(q, kappa, r, gamma):
    """Gains of every class, vectorised and free of cancellation; no checks of representability.

    The gains depend on the weights only through ``w / r`` and ``q / w``: with
    ``zeta = sqrt(gamma w / r)`` and ``theta = gamma P / r`` the Riccati equation
    ``P (1 - gamma r / (r + gamma P)) = w`` reads ``theta^2 - (zeta^2 - (1-gamma)) theta - zeta^2 = 0``,
    i.e. ``theta = zeta u`` with ``u`` the positive root of
    ``u^2 - delta u - 1 = 0``, ``delta = zeta - (1 - gamma)/zeta``:

    .. math::

        u = (\\delta + \\sqrt{\\delta^2 + 4})/2 \\ (\\delta \\ge 0), \\quad
        u = 2 / (\\sqrt{\\delta^2 + 4} - \\delta) \\ (\\delta < 0);

    then ``k = theta/(1+theta)``, ``1 - k = 1/(1+theta)``, ``a = gamma (1-k)``,
    ``1 - a = (1 - gamma) + gamma k`` and ``P = w / (1 - a)``. The mean-field
    quadratic ``a rho^2 - B rho + (1-k) = 0`` is rewritten with positive terms only:
    ``c0 = k (1-a) q/w`` (``= -f(1)``), ``D1 = (1-a)((1-gamma)(1-k) + k q/w) + gamma (1-gamma)(1-k)^2``
    (``= B - 2a``), ``B = D1 + 2a``, ``S = sqrt(B^2 - 4a(1-k)) = hypot(D1, 2 sqrt(a c0))``, so

    .. math::

        \\rho = \\frac{2(1-k)}{B + S}, \\qquad 1 - \\rho = \\frac{2 c_0}{D_1 + S},
        \\qquad c = \\frac{\\kappa}{w}\\,\\frac{\\rho (1-a)}{(1-a) + a(1-\\rho)}.

    ``c0``, ``D1`` and ``S`` all carry the factor ``1 - a`` (``= k`` at gamma = 1,
    as small as 1e-154 when ``w/r`` is 1e-308: its square underflows), so they are
    evaluated divided by it; and ``c`` takes the quotient ``(1-a)/((1-a) + a(1-rho))``
    before multiplying by ``kappa/w``.

    Returns ``(P, k, e, a, rho, c)`` with ``e = 1 - k``.
    """
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        w = q + kappa
        qw = q / w
        kw = kappa / w
        omg = 1.0 - gamma
        zeta = math.sqrt(gamma) * np.sqrt(w) / np.sqrt(r)
        delta = zeta - omg / zeta
        h = np.hypot(delta, 2.0)
        u = np.where(delta >= 0.0, 0.5 * (delta + h), 2.0 / (h - delta))
        theta = u * zeta
        inv = 1.0 / theta
        k = np.where(theta >= 1.0, 1.0 / (1.0 + inv), theta / (1.0 + theta))
        e = np.where(theta <= 1.0, 1.0 / (1.0 + theta), inv / (1.0 + inv))
        a = gamma * e
        oma = omg + gamma * k
        P = w / oma
        # c0, D1 and S carry a factor 1 - a (= k at gamma = 1, which may be 1e-160: its square underflows),
        # so they are computed divided by it: c0s = c0/(1-a), D1s = D1/(1-a), Ss = S/(1-a).
        c0s = k * qw
        D1s = omg * e + k * qw + gamma * e * e * (omg / oma)
        Ss = np.hypot(D1s, 2.0 * np.sqrt(a) * np.sqrt(k / oma) * np.sqrt(qw))
        rho = 2.0 * e / (oma * (D1s + Ss) + 2.0 * a)
        y = np.where(c0s > 0.0, 2.0 * c0s / (D1s + Ss), 0.0)  # 1 - rho
        c = kw * rho * (oma / (oma + a * y))  # the quotient first: kappa/w * rho * (1-a) alone may underflow
        # q = 0: nothing anchors the mean, rho = 1 is an exact root (the
        # quadratic's roots are 1 and 1/gamma), and then c = 1. Exact, not rounded.
        anchorless = q == 0.0
        rho = np.where(anchorless, 1.0, rho)
        c = np.where(anchorless, 1.0, c)
    return P, k, e, a, rho, c


def _check_representable(gains, q, kappa, r, gamma, index=None, n_checked=6):
    """Raise ``ValueError`` naming the weights when a gain is not a normal, finite float64.

    Checks the first ``n_checked`` of ``(P, k, 1 - k, a, rho, c)`` (the K-class
    solver uses only the first four; ``c`` may be exactly 0 when ``kappa = 0``).
    """
    names = ("P", "k", "1 - k", "a", "rho", "c")
    for name, value, may_be_zero in list(zip(names, gains, (False,) * 5 + (True,)))[:n_checked]:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
        zero_ok = (np.asarray(kappa).reshape(-1) == 0.0) if may_be_zero else np.zeros(v.shape, bool)
        bad = ~np.isfinite(v) | (v > np.finfo(np.float64).max) | ((v < _TINY) & ~(zero_ok & (v == 0.0)))
        if bad.any():
            j = int(np.argmax(bad))
            qj, kj, rj = (float(np.asarray(x).reshape(-1)[j if np.size(x) > 1 else 0]) for x in (q, kappa, r))
            where = "" if index is None else f" of class {j}"
            raise ValueError(
                f"the gains{where} are not representable as float64 for q={qj!r}, kappa={kj!r}, r={rj!r}, "
                f"gamma={gamma!r}: {name} = {float(v[j])!r} is outside the normal range "
                f"[{_TINY:.4g}, {np.finfo(np.float64).max:.4g}] (the gains depend on (q+kappa)/r, q/(q+kappa) "
                f"and gamma; bring these ratios closer to 1)"
            )


def solve_gains(q: float, kappa: float, r: float, gamma: float) -> Gains:
    """Closed-form stationary gains of the MEMOA policy.

    .. math::

        b &= w\\gamma - r(1-\\gamma), \\qquad w = q + \\kappa \\\\
        P &= \\frac{b + \\sqrt{b^2 + 4\\gamma w r}}{2\\gamma}, \\qquad
        k = \\frac{\\gamma P}{r + \\gamma P}, \\qquad a = \\gamma (1-k) = \\frac{\\gamma r}{r + \\gamma P} \\\\
        0 &= a\\rho^2 - \\left(1 + a(1-k) - k\\tfrac{\\kappa}{w}(1-a)\\right)\\rho + (1-k),
        \\quad \\rho \\in [0, 1) \\\\
        c &= \\frac{\\kappa \\rho (1-a)}{w (1 - a\\rho)}

    Evaluated in rescaled, cancellation-free forms (the gains depend only on
    ``w/r``, ``q/w`` and ``gamma``; see ``_gains_arrays``): every gain, and
    ``1 - k = a / gamma``, has a relative error of a few ulps for any weights,
    including ratios of 1e-300 and 1e300 (checked against 50+-digit arithmetic
    in the tests).

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

    Raises
    ------
    ValueError
        On bad weights, and when a gain is not representable as a normal
        float64 (e.g. ``1 - k`` below 2.2e-308 when ``(q + kappa)/r`` exceeds
        about 1e308); the message names the weights and the gain.
    """
    q, kappa, r, gamma = _check_weights(q, kappa, r, gamma)
    return _scalar_gains(q, kappa, r, gamma)


def _scalar_gains(q, kappa, r, gamma) -> Gains:
    arrs = _gains_arrays(np.array([q]), np.array([kappa]), np.array([r]), gamma)
    _check_representable(arrs, q, kappa, r, gamma)
    P, k, _, a, rho, c = (float(x[0]) for x in arrs)
    return Gains(P=P, k=k, a=a, rho=rho, c=c)


def _check_weights(q, kappa, r, gamma):
    q = check_real("q", q, low=0.0)
    kappa = check_real("kappa", kappa, low=0.0)
    r = check_real("r", r, low=0.0, low_open=True)
    gamma = check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)
    if q + kappa <= 0.0:
        raise ValueError(f"q + kappa must be > 0 (an agent must care about something), got q={q!r}, kappa={kappa!r}")
    return q, kappa, r, gamma


# --------------------------------------------------------------------------- K classes: input checks


def _as_weight_vector(name, value, low_open):
    """A scalar weight (returned as a float) or a 1-D sequence of them (a read-only float64 array)."""
    accepted = f"a real number {'> 0' if low_open else '>= 0'} or a 1-D sequence of them (one per class)"
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, bool):
        raise TypeError(f"{name} must be {accepted}, got {value!r} of type {type(value).__name__}")
    if isinstance(value, numbers.Real) or (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype != object):
        return check_real(name, value, low=0.0, low_open=low_open)  # 0-d arrays of a non-real dtype: TypeError
    # (a 0-d object array goes on, as a sequence of them does: its element checked by as_real_values)
    arr = as_real_values(name, value, accepted)  # the dtype (or every element) checked: nothing is cast
    if arr.ndim == 0:  # a real number that is not a numbers.Real (decimal.Decimal): a scalar weight, as in a sequence
        return check_real(name, arr, low=0.0, low_open=low_open)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be {accepted}, got shape {arr.shape}")
    with np.errstate(invalid="ignore"):
        fine = np.isfinite(arr) & ((arr > 0.0) if low_open else (arr >= 0.0))
    if not fine.all():
        j = int(np.argmin(fine))
        # the entry as given (a list's or tuple's), so that one below float64's smallest is named as itself, not as the
        # 0.0 it became; an array's entry is its float64 already
        entry = value[j] if isinstance(value, (list, tuple)) else float(arr[j])
        check_real(f"{name}[{j}]", entry, low=0.0, low_open=low_open)  # raises, naming the entry
    arr.flags.writeable = False
    return arr


def _check_class_weights(q, kappa, r, gamma, shares):
    """Validated ``(K, q, kappa, r, gamma, shares)``; K = 1 gives floats and ``shares=None``."""
    q = _as_weight_vector("q", q, False)
    kappa = _as_weight_vector("kappa", kappa, False)
    r = _as_weight_vector("r", r, True)
    gamma = check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)
    lengths = {name: len(v) for name, v in (("q", q), ("kappa", kappa), ("r", r)) if isinstance(v, np.ndarray)}
    if shares is not None:
        if isinstance(shares, (str, bytes, numbers.Real)) or isinstance(shares, bool):
            raise TypeError(f"shares must be None or a 1-D sequence of K positive reals summing to 1, got {shares!r}")
        sh = as_real_values("shares", shares, "None or a 1-D sequence of K positive reals summing to 1")
        if sh.ndim != 1 or sh.size == 0:
            raise ValueError(f"shares must be a 1-D sequence of K positive reals summing to 1, got shape {sh.shape}")
        lengths["shares"] = len(sh)
    sizes = set(lengths.values())
    if len(sizes) > 1:
        detail = ", ".join(f"{k} has length {v}" for k, v in lengths.items())
        raise ValueError(f"per-class sequences must all have the same length K (scalars broadcast): {detail}")
    K = sizes.pop() if sizes else 1
    if K == 1:
        q, kappa, r = (float(x[0]) if isinstance(x, np.ndarray) else x for x in (q, kappa, r))
        if shares is not None and not (abs(float(sh[0]) - 1.0) <= SHARES_TOL):
            raise ValueError(f"shares must be positive and sum to 1 (within {SHARES_TOL:g}), got {sh.tolist()!r}")
        if q + kappa <= 0.0:
            raise ValueError(f"q + kappa must be > 0 (an agent must care about something), got q={q!r}, kappa={kappa!r}")
        return 1, q, kappa, r, gamma, None
    q, kappa, r = (np.broadcast_to(np.asarray(x, dtype=np.float64), (K,)).copy() for x in (q, kappa, r))
    for x in (q, kappa, r):
        x.flags.writeable = False
    with np.errstate(over="ignore"):  # q_j + kappa_j = inf: refused below, with the weights named (not a warning)
        w = q + kappa
    if (w <= 0.0).any():
        j = int(np.argmax(w <= 0.0))
        raise ValueError(
            f"q + kappa must be > 0 in every class (an agent must care about something), "
            f"got q[{j}]={float(q[j])!r}, kappa[{j}]={float(kappa[j])!r}"
        )
    if shares is None:
        sh = np.full(K, 1.0 / K)
    else:
        if not np.isfinite(sh).all() or (sh <= 0.0).any():
            j = int(np.argmax(~np.isfinite(sh) | (sh <= 0.0)))
            raise ValueError(f"shares must be positive and finite, got shares[{j}]={float(sh[j])!r} in {sh.tolist()!r}")
        total = float(sh.sum())
        if not abs(total - 1.0) <= SHARES_TOL:
            raise ValueError(f"shares must sum to 1 (within {SHARES_TOL:g}), got sum {total!r} for {sh.tolist()!r}")
    sh.flags.writeable = False
    return K, q, kappa, r, gamma, sh


# --------------------------------------------------------------------------- K classes: the solver


def _fixed_point_map(A, e, a, beta, pi):
    """``F(A)``: rows ``(1-k_j) e_j' + beta_j pi'A (I - a_j A)^{-1}``; returns ``(F(A), V)`` with ``V_j. = pi'A(I - a_jA)^{-1}``."""
    K = A.shape[0]
    g = pi @ A
    # V_j (I - a_j A) = g  <=>  (I - a_j A)' V_j' = g'
    lhs = np.eye(K)[None] - a[:, None, None] * A.T[None]
    V = np.linalg.solve(lhs, np.broadcast_to(g, (K, K))[..., None])[..., 0]
    return np.diag(e) + beta[:, None] * V, V


def _weights_text(q, kappa, r, gamma, shares):
    lst = lambda x: np.asarray(x).tolist()  # noqa: E731
    return f"q={lst(q)!r}, kappa={lst(kappa)!r}, r={lst(r)!r}, gamma={gamma!r}, shares={lst(shares)!r}"


def solve_classes(q, kappa, r, gamma, shares=None, *, method: str = "qz", tol: float = 1e-14, max_iter: int = 10_000) -> ClassEquilibrium:
    """The exact K-class mean-field equilibrium (``MODEL.md`` section 7).

    Solves the fixed point of :class:`ClassEquilibrium` for ``A`` and returns
    ``A``, ``C`` and ``lam``.

    ``method="qz"`` (default, direct, O(K^3)): the equilibrium is the stable
    solution of a saddle-path system. With ``Phi_j(t) = sum_tau a_j^tau mu(t+1+tau)``
    (class j's discounted forecast of the mean deviation ``mu = pi'D``), the
    rows of the fixed point say ``Phi = V D`` with

    .. math::

        D(t+1) = \\operatorname{diag}(1-k) D(t) + \\operatorname{diag}(\\beta)\\Phi(t),\\qquad
        \\mathbf 1\\pi' D(t+1) + \\operatorname{diag}(a)\\Phi(t+1) = \\Phi(t),

    a 2K-dimensional pencil with exactly K generalized eigenvalues in the unit
    disk (they are the roots in (0, 1) of
    ``sum_j pi_j beta_j lam / ((lam - 1 + k_j)(1 - a_j lam)) = 1``). The ordered
    QZ decomposition gives an orthonormal basis ``[Z11; Z21]`` of the stable
    deflating subspace, ``V = Z21 Z11^{-1}`` and ``A = diag(1-k) + diag(beta) V``
    (backward stable; residual ``|F(A) - A|`` about 1e-16 for K up to 64). When a class's ``1 - k_j``
    is within a few ulps of 1 (``k_j`` about 1e-16: an eigenvalue ``1 - 1e-16``) the ordering can pick the
    wrong subspace; a result that fails the checks (spectral radius < 1, residual <= 1e-10) then falls back
    to the iteration below, and the result says ``method="iterate"``. The pencil is formed in float64, where
    ``beta_j ~ 1`` has lost ``1 - beta_j``: when ``1 - sum_j pi_j beta_j`` is near 1e-14 and the ``1 - k_j``
    near 1e-19, its stable eigenvalues are wrong (6.6e-20 and 1.8e-12 for 6.1e-6), though the residual is
    1e-20. So the K roots of the secular equation are also found, each by bisection in its bracket with
    ``g - 1`` evaluated without that cancellation (:func:`_secular_classes`); when ``A``'s eigenvalues differ
    from them by more than 1e-9 of the largest, or a root ``lam`` near 1 by more than ``1e-9 (1 - lam) + 64 eps``
    (``q_j/w_j`` tiny: a slow mean, ``1 - lam`` about ``sqrt(q_j/w_j)``, found in ``y = 1 - lam`` without
    cancellation), ``A = X diag(lam) X^{-1}`` from the roots' eigenvectors replaces it (``method="secular"``),
    as it does where QZ and the iteration both fail. A slowest root that rounds to 1 (``1 - lam`` below half
    an ulp: no float64 ``A`` has it) is refused. Ordinary weights keep QZ's result bit for bit.
    ``method="iterate"``: the plain iteration ``A <- F(A)`` from
    ``diag(1 - k_j)`` (linear convergence; 30-60 steps to 1e-15 for ordinary
    weights, slower when ``q_j/w_j`` is small and gamma near 1).

    Parameters
    ----------
    q, kappa, r : float or sequence of float
        Per-class weights (scalars broadcast to the K classes), ``q_j, kappa_j >= 0``,
        ``q_j + kappa_j > 0``, ``r_j > 0``.
    gamma : float
        Shared discount in (0, 1].
    shares : sequence of float, optional
        Class shares ``pi_j > 0`` summing to 1 (within 1e-12); default equal.
        K is the common length of the sequences among ``q, kappa, r, shares``.
    method : {"qz", "iterate"}
        ``"qz"``: the direct solve (checked against the secular roots, see above).
    tol : float, default 1e-14
        ``method="iterate"``: stop when the estimated error left,
        ``change * ratio / (1 - ratio)`` (``change = max |A^{n+1} - A^n|``,
        ``ratio`` its last contraction), is at most ``tol``, or when ``change``
        reaches the rounding floor (``4 eps max |A|``).
    max_iter : int, default 10000
        ``method="iterate"`` (and the direct solve's fallback to it): steps
        before giving up. It gives up sooner, with the same error, when its
        contraction per step (measured over the last 32 steps, while the change
        is still 1000 times above ``tol`` and the rounding floor) says that
        converging needs more than 16 times the steps left: classes whose gains
        tie to their last bits contract by ``1 - 4e-6`` per step.

    Returns
    -------
    ClassEquilibrium
        K = 1 (all scalars): the closed form of :func:`solve_gains`, bitwise:
        ``A = [[rho]]``, ``C = [[c]]``, ``lam = [1]`` (``m* = sbar``, also for
        ``q = 0``, where ``rho = 1``).

    Raises
    ------
    ValueError
        On bad weights, or when there is no stable equilibrium (every
        ``q_j = 0`` with K > 1: nothing anchors the mean, ``A`` has the
        eigenvalue 1 and ``m*`` is undefined; or ``q_j/w_j`` so small that the
        slowest mode's ``1 - lam`` is below half an ulp of 1), naming the weights.
    """
    method = check_choice("method", method, ("qz", "iterate"))
    tol = check_real("tol", tol, low=0.0, low_open=True)
    max_iter = check_int("max_iter", max_iter, low=1)
    K, q, kappa, r, gamma, shares = _check_class_weights(q, kappa, r, gamma, shares)
    return _solve_checked(K, q, kappa, r, gamma, shares, method, tol, int(max_iter))


def _readonly(*arrays):
    for x in arrays:
        x.flags.writeable = False
    return arrays


def _solve_checked(K, q, kappa, r, gamma, shares, method="qz", tol=1e-14, max_iter=10_000) -> ClassEquilibrium:
    if K == 1:
        # The closed form of solve_gains (the same function, so bitwise the same numbers).
        arrs = _gains_arrays(np.array([q]), np.array([kappa]), np.array([r]), gamma)
        _check_representable(arrs, q, kappa, r, gamma)
        P, k, e, a, rho, c = arrs
        P, k, a, e, A, C, lam, pi = _readonly(P, k, a, e, rho.reshape(1, 1), c.reshape(1, 1), np.array([1.0]), np.array([1.0]))
        return ClassEquilibrium(P=P, k=k, a=a, one_minus_k=e, A=A, C=C, lam=lam, shares=pi,
                                spectral_radius=abs(float(rho[0])), residual=0.0, iterations=0, method="closed-form")
    gains = _gains_arrays(q, kappa, r, gamma)
    _check_representable(gains, q, kappa, r, gamma, index=True, n_checked=4)
    P, k, e, a, _, _ = gains
    w = q + kappa
    qw, kw = q / w, kappa / w
    if not (qw > 0.0).any():
        raise ValueError(
            f"no stable K-class equilibrium: every q_j is 0, so nothing anchors the mean (A has the eigenvalue 1 "
            f"and m* is undefined); give at least one class q_j > 0. Got {_weights_text(q, kappa, r, gamma, shares)}"
        )
    if (e == 1.0).any():
        j = int(np.argmax(e == 1.0))
        raise ValueError(
            f"no representable K-class equilibrium: 1 - k of class {j} rounds to 1 (k = {float(k[j])!r}), so its class "
            f"mean would decay by less than an ulp per step (A has the eigenvalue 1 in float64); bring r_j/(q_j+kappa_j) "
            f"closer to 1. Got {_weights_text(q, kappa, r, gamma, shares)}"
        )
    oma = (1.0 - gamma) + gamma * k  # 1 - a without cancellation
    beta = k * oma * kw
    iterations = 0
    if method == "qz":
        try:
            A, radius = _solve_qz(e, a, beta, shares, q, kappa, r, gamma)
            FA, V = _fixed_point_map(A, e, a, beta, shares)
            residual = float(np.max(np.abs(FA - A)))
            _check_stable(A, radius, residual, q, kappa, r, gamma, shares)
        except ValueError as qz_error:
            # The pencil's ordering breaks down when a class's 1 - k_j is within a few ulps of 1 (an eigenvalue
            # 1 - 1e-16 next to the unit circle): then the iteration, which converges there, decides; where it
            # does not converge (1 - sum_j pi_j beta_j near 1e-14), the secular roots.
            try:
                A, V, radius, residual, iterations = _iterate_classes(e, a, beta, shares, tol, max_iter, q, kappa, r, gamma)
                _check_stable(A, radius, residual, q, kappa, r, gamma, shares)
                method = "iterate"
            except ValueError:
                secular = _secular_classes(k, e, a, oma, qw, beta, shares, gamma)
                try:
                    A, V, radius, residual = _from_secular(secular, e, a, beta, q, kappa, r, gamma, shares)
                except ValueError:
                    if secular is not None:
                        _refuse_unit_root(secular[1], q, kappa, r, gamma, shares)
                    raise qz_error from None  # none solved it: the direct solve's error
                method = "secular"
        if method != "secular":
            # QZ's (or the fallback iteration's) eigenvalues checked against the secular equation's sign changes (two
            # evaluations); the bisection of every root only where that check fails (ordinary games: 0.1 ms instead
            # of 3-4 ms at K = 8)
            secular = (None if _secular_confirms(A, k, e, a, oma, qw, beta, shares, gamma)
                       else _secular_classes(k, e, a, oma, qw, beta, shares, gamma))
            if secular is not None and not _same_spectrum(A, secular[1]):
                # The pencil, formed in float64, lost an eigenvalue (1 - sum_j pi_j beta_j near 1e-14 with 1 - k_j
                # near 1e-19, or 1 - lam near 1e-8 when q_j/w_j is tiny): the roots of the secular equation,
                # evaluated without those cancellations, decide.
                try:
                    A, V, radius, residual = _from_secular(secular, e, a, beta, q, kappa, r, gamma, shares)
                    method = "secular"
                except ValueError:
                    _refuse_unit_root(secular[1], q, kappa, r, gamma, shares)  # an eigenvalue below 1 is wrong then
                    # otherwise the secular A fails the checks: the direct solve stands
    else:
        A, V, radius, residual, iterations = _iterate_classes(e, a, beta, shares, tol, max_iter, q, kappa, r, gamma)
        _check_stable(A, radius, residual, q, kappa, r, gamma, shares)
    if radius > 1.0 - 1e-12 and _slowest_root_rounds_to_one(k, e, a, oma, qw, beta, shares, gamma):
        # Whatever the method found A: QZ's eigenvalue within 64 ulps of 1 stood where the exact one rounds to 1
        # (1 - lam = 4.4e-16 for an exact 1e-40 at gamma = 0.55), so such games were accepted or refused by the last
        # bits of the weights and by K. (An accepted eigenvalue is within 64 ulps of its root: only a radius this
        # close to 1 can hide such a root, so ordinary games skip the check.)
        _refuse_unit_root(np.array([1.0]), q, kappa, r, gamma, shares)
    C = (kw * oma)[:, None] * V
    lam = shares * qw
    lam = lam / lam.sum()
    P, k, a, e, A, C, lam = _readonly(*(np.array(x, dtype=np.float64) for x in (P, k, a, e, A, C, lam)))
    return ClassEquilibrium(P=P, k=k, a=a, one_minus_k=e, A=A, C=C, lam=lam, shares=shares,
                            spectral_radius=float(radius), residual=residual, iterations=iterations, method=method)


def _refuse_unit_root(roots, q, kappa, r, gamma, shares):
    """``ValueError`` when the slowest secular root rounds to 1: no float64 ``A`` has that eigenvalue below 1.

    With ``q_j/w_j`` tiny (1e-40 with gamma = 1), the class means relax by ``1 - lam`` about ``sqrt(q_j/w_j)``
    per step, less than an ulp of 1: ``A`` would have the eigenvalue 1 in float64 (and a QZ result's largest
    eigenvalue, off by more than that, would be wrong silently).
    """
    top = float(np.max(roots))
    if top >= 1.0:
        raise ValueError(
            f"no representable K-class equilibrium: the slowest mode of the class means decays by less than an ulp "
            f"per step (its eigenvalue {top!r} rounds to 1 in float64), as nothing anchors the mean strongly enough; "
            f"bring q_j/(q_j+kappa_j) closer to 1 in some class. Got {_weights_text(q, kappa, r, gamma, shares)}"
        )


# The iteration's contraction per step is measured over this many steps (a geometric mean: one step's ratio is noisy).
_RATE_WINDOW = 32
# It gives up early when, at that contraction, reaching its stopping rule needs this many times the steps left, and
# the change is still this many times above tol and the rounding floor: within 1000x of them the change is noise-led
# (games stopped there at 4-5x the steps left converged within them, a few hundred steps later).
_HOPELESS = 16.0
_FAR_FROM_DONE = 1e3


def _steps_still_needed(change, per_step, tol, floor):
    r"""Steps for a change shrinking by ``per_step < 1`` each step to meet :func:`_iterate_classes`' stopping rule.

    .. math:: n = \frac{\log(\max(\mathrm{tol}\,(1 - \rho)/\rho,\ \mathrm{floor}) / c)}{\log \rho}

    with ``c`` the last change and ``rho`` = ``per_step``: the error estimate ``c rho^n rho / (1 - rho)``
    reaches ``tol``, or the change reaches the rounding floor, whichever comes first. 0 or less: about there.
    """
    target = max(tol * (1.0 - per_step) / per_step, floor)
    return math.log(target / change) / math.log(per_step)


def _iterate_classes(e, a, beta, shares, tol, max_iter, q, kappa, r, gamma):
    """The plain iteration ``A <- F(A)`` from ``diag(1 - k)``; returns ``(A, V, radius, residual, iterations)``.

    It stops early, with the error of ``max_iter``, once its contraction per step, measured over
    :data:`_RATE_WINDOW` steps, says that converging needs more than :data:`_HOPELESS` times the steps left
    (classes whose gains tie to their last bits contract by 1 - 4e-6 per step and need millions: the QZ
    fallback spent 10,000 steps there, 1.7 s, before the secular roots solved the game).
    """
    A = np.diag(e)
    change = prev = np.inf
    recent = np.full(_RATE_WINDOW, np.inf)  # the last changes, recent[n % window] = change at step n
    for iterations in range(1, max_iter + 1):
        FA, V = _fixed_point_map(A, e, a, beta, shares)
        change = float(np.max(np.abs(FA - A)))
        A = FA
        if not np.isfinite(change):
            break
        # Linear convergence: the error left is about change * ratio / (1 - ratio). The rounding floor is
        # relative to A: when A's entries are 1e-19, a change of 1e-20 per step is no convergence.
        floor = 4.0 * np.finfo(np.float64).eps * float(np.max(np.abs(A)))
        ratio = change / prev if 0.0 < prev < np.inf else 1.0
        if change <= floor or (ratio < 1.0 and change * ratio / (1.0 - ratio) <= tol):
            break
        prev = change
        window_ago = recent[iterations % _RATE_WINDOW]  # the change _RATE_WINDOW steps ago
        recent[iterations % _RATE_WINDOW] = change
        if iterations > 2 * _RATE_WINDOW and _FAR_FROM_DONE * max(tol, floor) < change < window_ago:
            per_step = (change / window_ago) ** (1.0 / _RATE_WINDOW)
            needed = _steps_still_needed(change, per_step, tol, floor) if per_step < 1.0 else math.inf
            if needed > _HOPELESS * (max_iter - iterations):
                raise ValueError(
                    f"the K-class fixed point did not converge in max_iter={max_iter} steps: after {iterations} "
                    f"its change ({change:.3g}) shrinks by a factor {per_step:.9g} per step, so it needs about "
                    f"{needed:.3g} more to reach tol={tol:g} or the rounding floor ({floor:.3g}), over {_HOPELESS:g} "
                    f"times the {max_iter - iterations} left; stopped early, for "
                    f"{_weights_text(q, kappa, r, gamma, shares)}; try method='qz'"
                )
    else:
        raise ValueError(
            f"the K-class fixed point did not converge in max_iter={max_iter} steps (last change {change:.3g}, "
            f"tol={tol:g}) for {_weights_text(q, kappa, r, gamma, shares)}; try method='qz'"
        )
    FA, V = _fixed_point_map(A, e, a, beta, shares)
    residual = float(np.max(np.abs(FA - A)))
    radius = float(np.max(np.abs(np.linalg.eigvals(A)))) if np.isfinite(A).all() else np.inf
    return A, V, radius, residual, iterations


def _secular_classes(k, e, a, oma, qw, beta, pi, gamma):
    """``(A, roots)`` from the K roots of the secular equation, or None where its brackets fail.

    The stable eigenvalues of ``A`` are the roots in (0, 1) of
    ``g(lam) = sum_j pi_j beta_j lam / ((lam - e_j)(1 - a_j lam)) = 1`` (``e = 1 - k``): one between each two
    neighbouring distinct poles ``e_j`` and one in ``(max e_j, 1)`` (``g - 1`` goes from ``+inf`` to ``-inf``
    across each such bracket, and ``g(1) = sum_j pi_j k_j kappa_j / ((1 - e_j) w_j) < 1`` when some
    ``q_j > 0``), and a pole shared by m classes, m - 1 times. ``g - 1`` is evaluated without the
    cancellation of ``1 - sum_j pi_j beta_j`` (which may be 1e-14 when every ``beta_j`` is about 1), as

    .. math::

        g(\\lambda) - 1 = \\sum_j \\pi_j \\frac{e_j - \\lambda(\\epsilon_j + a_j e_j) + a_j\\lambda^2}
        {(\\lambda - e_j)(1 - a_j\\lambda)} + \\Big(\\sum_j \\pi_j - 1\\Big),\\qquad
        \\epsilon_j = 1 - \\beta_j = (1 - k_j) + k_j a_j + k_j (1 - a_j) \\frac{q_j}{w_j},

    a sum of positive terms (``1 - k_j`` taken as the float ``e_j``, accurate where ``k_j`` has rounded to 1;
    the sums over the classes with a pole, ``sum_j pi_j - 1`` the pole-free classes' ``-pi_j``: the shares sum
    to 1, whatever the floats' last bits). A root above 1/2 is found as ``y = 1 - lam`` (``g - 1`` at 1/2 says
    on which side a root is), with the same function written in ``y`` (:func:`_secular_setup`), so that
    ``1 - lam`` keeps its relative accuracy when it is tiny (``q_j/w_j`` small: the mean relaxes slowly).
    Each root is bisected to the last bit (geometric steps while its bracket spans more than a factor 4), then
    as an offset ``t`` from its bracket's nearer end (``lam - e_j = (origin - e_j) + t``, in ``y`` with ``k_j``),
    so that its distances to poles a few ulps away, and the eigenvector, keep their relative accuracy.
    The eigenvector of ``A`` for the root ``lam_i`` is ``d_j = beta_j lam_i / ((lam_i - e_j)(1 - a_j lam_i))``
    (``= beta_j (1 - y_i) / ((k_j - y_i)((1 - a_j) + a_j y_i))``; the stable mode of the pencil with
    ``pi'd = 1``), so ``A = X diag(lam) X^{-1}``. A class with ``beta_j = 0`` (``kappa_j = 0``)
    has no pole (its term is ``-pi_j`` for every ``lam``): the brackets are those of the other classes, and its
    ``e_j`` is an eigenvalue of its own (see :func:`_secular_setup`). ``oma = 1 - a`` without cancellation.
    """
    setup = _secular_setup(k, e, a, oma, qw, beta, pi, gamma)
    if setup is None:
        return None
    live, poles, first, group, g_minus_one, g_minus_one_y, upper, lo, hi = setup
    lo0, hi0 = lo, hi
    # Roots below 1/2 are bisected in lam, the others in y = 1 - lam (lo, hi in each one's own variable; g - 1
    # falls as lam grows, so it rises as y grows).
    lo, hi = _bisect(lo, hi, lambda mid: np.where(upper, g_minus_one_y(mid) <= 0.0, g_minus_one(mid) > 0.0))
    # Each root as an offset t from its bracket's nearer end (a pole): the float root is only within an ulp of the
    # exact one, so its distances to poles an ulp or a few apart (classes whose gains nearly tie) would be off by
    # up to 100% (eps / gap relative), and so would the eigenvector entries 1/(lam - e_j). The offset is bisected
    # between the two floats that bracket the root, g - 1 evaluated with lam - e_j = (origin - e_j) + t.
    found = 0.5 * (lo + hi)
    origin = np.where(found - lo0 <= hi0 - found, lo0, hi0)
    t_lo, t_hi = _bisect(lo - origin, hi - origin, lambda t: np.where(
        upper, g_minus_one_y(origin + t, origin, t) <= 0.0, g_minus_one(origin + t, origin, t) > 0.0))
    t = 0.5 * (t_lo + t_hi)
    found = origin + t
    y = np.where(upper, found, 1.0 - found)
    roots = np.where(upper, 1.0 - found, found)
    X = _secular_vectors(beta, k, e, a, oma, roots, y, upper, origin, t)
    if not np.isfinite(X).all():
        return None
    # Classes with the same 1 - k_j (same pole): the pole itself is an eigenvalue, once less than the classes
    # sharing it, with the eigenvectors d on those classes with pi'd = 0 (then Phi = 0): d = e_j0/pi_j0 - e_j/pi_j.
    tied = [j for g_j, j in zip(group.tolist(), live.tolist()) if j != first[g_j]]
    if tied:
        extra = np.zeros((e.shape[0], len(tied)))
        for col, j in enumerate(tied):
            j0 = first[group[np.searchsorted(live, j)]]
            extra[j0, col], extra[j, col] = 1.0 / pi[j0], -1.0 / pi[j]
        X = np.hstack([X, extra])
        roots = np.append(roots, e[tied])
    # A class z without a pole (beta_z = 0: kappa_z = 0) keeps its own mean's decay e_z as an eigenvalue: d_i as
    # above on the other classes (pi'd = Phi = 1), and d_z = (1 - g(e_z)) / pi_z, the rest of Phi
    dead = np.flatnonzero(beta <= 0.0)
    if dead.shape[0]:
        lam = e[dead]
        high = lam > 0.5
        extra = _secular_vectors(beta, k, e, a, oma, lam, k[dead], high)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            rest = np.where(high, g_minus_one_y(k[dead]), g_minus_one(lam))
        extra[dead, :] = 0.0
        extra[dead, np.arange(dead.shape[0])] = -rest / pi[dead]
        if not np.isfinite(extra).all():
            return None
        X = np.hstack([X, extra])
        roots = np.append(roots, lam)
    try:
        A = np.linalg.solve(X.T, (X * roots[None, :]).T).T
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(A).all():
        return None
    return A, roots


def _bisect(lo, hi, rises):
    """Every bracket ``[lo, hi]`` bisected to the last bit; ``rises(mid)`` is True where the root lies above ``mid``.

    Geometric steps while a bracket of one sign spans more than a factor 4 (on either side of 0), else halving.
    """
    for _ in range(400):
        with np.errstate(invalid="ignore"):
            mid = np.where((lo > 0.0) & (hi > 4.0 * lo), np.sqrt(lo) * np.sqrt(hi),
                           np.where((hi < 0.0) & (lo < 4.0 * hi), -np.sqrt(-lo) * np.sqrt(-hi), lo + 0.5 * (hi - lo)))
        done = (mid <= lo) | (mid >= hi)
        if done.all():
            break
        up = rises(mid)
        lo = np.where(~done & up, mid, lo)
        hi = np.where(~done & ~up, mid, hi)
    return lo, hi


def _secular_vectors(beta, k, e, a, oma, lam, y, high, origin=None, t=None):
    """Columns ``d_j = beta_j lam / ((lam - e_j)(1 - a_j lam))``, in ``y = 1 - lam`` where ``high`` (may be inf or NaN).

    With ``origin`` and ``t`` (each root as ``origin + t`` in its own variable): ``lam - e_j = (origin - e_j) + t``,
    ``k_j - y = (k_j - origin) - t``.
    """
    L, Y = lam[None, :], y[None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        low_gap = L - e[:, None] if origin is None else (origin[None, :] - e[:, None]) + t[None, :]
        high_gap = k[:, None] - Y if origin is None else (k[:, None] - origin[None, :]) - t[None, :]
        low_form = beta[:, None] * L / (low_gap * (1.0 - a[:, None] * L))
        high_form = beta[:, None] * L / (high_gap * (oma[:, None] + a[:, None] * Y))
    return np.where(high[None, :], high_form, low_form)


#: Poles of the secular equation this close (relative) are taken as one (see :func:`_secular_setup`).
_TIED_POLES = 1e-12


def _secular_setup(k, e, a, oma, qw, beta, pi, gamma):
    """``(live, poles, first, group, g_minus_one, g_minus_one_y, upper, lo, hi)`` of :func:`_secular_classes`, or None.

    ``live``: the indices of the classes with ``beta_j > 0`` (a class with ``beta_j = 0``, ``kappa_j = 0``, has no
    pole: its term of ``g - 1`` is ``-pi_j``). ``poles``, ``first``, ``group``: :func:`numpy.unique` of their
    ``e_j`` (sorted distinct poles, each one's first class as an index into ``e``, every live class's pole);
    ``g_minus_one(lam)``: ``g - 1`` at each entry of the array ``lam``, without the cancellation of
    ``1 - sum_j pi_j beta_j``; ``g_minus_one_y(y)``: the same at ``lam = 1 - y``, without the cancellation of
    ``1 - lam`` either: with ``lam = 1 - y`` the numerator of class j is exactly

    .. math::

        -k_j (1 - a_j) \\frac{q_j}{w_j} + y\\Big((1 - \\gamma) e_j + (1 - a_j) k_j \\frac{q_j}{w_j}\\Big) + a_j y^2

    and the denominator ``(k_j - y)((1 - a_j) + a_j y)``. ``upper``: the brackets whose root is above 1/2
    (bisected in ``y``; a bracket holding 1/2 is cut there, on its root's side); ``lo``, ``hi``: every
    bracket's ends in its own variable (in ``y``: the largest ``k`` of the next pole's classes, 0 for the
    top bracket, and the smallest ``k`` of this pole's classes). None unless ``0 <= e_j < 1`` and ``g(1) < 1``.
    """
    live = np.flatnonzero(beta > 0.0)
    if live.shape[0] == 0:
        return None
    poles, first, group = np.unique(e[live], return_index=True, return_inverse=True)
    if not (poles[0] >= 0.0 and poles[-1] < 1.0):
        return None
    # Poles within 1e-12 of each other (relative) are one pole: between two such poles hardly a float holds the
    # root of their bracket, and its eigenvector (entries 1/(lam - e_j)) is lost to rounding (classes whose gains
    # tie up to their last bits, e.g. q_j << kappa_j). They share the pole as exactly tied classes do (its
    # eigenvalue m - 1 times, eigenvectors on those classes with pi'd = 0): an eigenvalue off by at most 1e-12 of
    # itself, while every other root, the slow one too, is still bisected from every class's own term.
    new = np.ones(poles.shape[0], dtype=bool)
    new[1:] = np.diff(poles) > _TIED_POLES * poles[1:]
    poles, first, group = poles[new], first[new], (np.cumsum(new) - 1)[group]
    first = live[first]
    kl, el, al, ol, pl, ql = k[live], e[live], a[live], oma[live], pi[live], qw[live]
    eps = el + kl * al + kl * ol * ql  # e_j, not 1 - k_j: the float k_j may have rounded to 1 (e_j = 4e-17)
    n0 = kl * ol * ql
    n1 = (1.0 - gamma) * el + ol * kl * ql
    # The classes without a pole: their -pi_j (sum_j pi_j = 1, MODEL.md section 7; not the float shares' own sum,
    # whose last bits, 1e-17, would outweigh the anchor sum_j pi_j q_j/w_j when that is 1e-12 or less)
    share_gap = -math.fsum(np.delete(pi, live).tolist())

    def g_minus_one(lam, origin=None, t=None):
        # With origin and t (lam = origin + t): lam - e_j as (origin - e_j) + t, exact to a rounding of t next to a pole
        L = lam[:, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            gap = L - el if origin is None else (origin[:, None] - el) + t[:, None]
            terms = pl * (el - L * (eps + al * el) + al * L * L) / (gap * (1.0 - al * L))
        return terms.sum(axis=1) + share_gap

    def g_minus_one_y(y, origin=None, t=None):
        Y = y[:, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            gap = kl - Y if origin is None else (kl - origin[:, None]) - t[:, None]
            terms = pl * ((al * Y + n1) * Y - n0) / (gap * (ol + al * Y))
        return terms.sum(axis=1) + share_gap

    if not (g_minus_one_y(np.array([0.0]))[0] < 0.0):
        return None
    D = poles.shape[0]
    kmin = np.full(D, np.inf)
    kmax = np.full(D, -np.inf)
    np.minimum.at(kmin, group, kl)
    np.maximum.at(kmax, group, kl)
    top = np.append(poles[1:], 1.0)
    pmax = np.full(D, -np.inf)  # a bracket in lam starts above its group's largest pole
    np.maximum.at(pmax, group, el)
    # A bracket holding 1/2 is cut there, on the side of its root (g - 1 > 0 at 1/2: the root is above it). The
    # bracket is (pmax, top): a merged group whose poles straddle 1/2 holds no root above its smallest pole there.
    straddle = (pmax < 0.5) & (top > 0.5)
    above = bool(straddle.any()) and bool(g_minus_one(np.array([0.5]))[0] > 0.0)
    upper = (pmax >= 0.5) | (straddle & above)
    lo = np.where(upper, np.append(kmax[1:], 0.0), pmax)
    hi = np.where(upper, np.where(straddle, 0.5, kmin), np.where(straddle, 0.5, top))
    return live, poles, first, group, g_minus_one, g_minus_one_y, upper, lo, hi


def _slowest_root_rounds_to_one(k, e, a, oma, qw, beta, pi, gamma) -> bool:
    """Whether the largest secular root ``lam = 1 - y`` rounds to 1 in float64 (``y <= 2**-54``), by one sign.

    ``g - 1`` in ``y`` (:func:`_secular_setup`, no cancellation) rises through its root as ``y`` grows from 0, so
    the root lies at or below ``2**-54`` (half the spacing of the floats below 1) exactly when ``g - 1 >= 0`` there.
    """
    setup = _secular_setup(k, e, a, oma, qw, beta, pi, gamma)
    if setup is None:
        return False
    upper, g_minus_one_y = setup[6], setup[5]
    return bool(upper[-1]) and bool(g_minus_one_y(np.array([2.0**-54]))[0] >= 0.0)


def _slow_root_tol(roots):
    """``1e-9 (1 - lam) + 64 eps``: how far from a root ``lam`` near 1 an eigenvalue of ``A`` may be."""
    return 1e-9 * (1.0 - roots) + 64.0 * np.finfo(np.float64).eps


def _root_tolerance(roots):
    """How far an eigenvalue of ``A`` may be from each secular root.

    ``1e-9`` of the largest root, and at most ``1e-9 (1 - lam) + 64 eps`` (a root near 1 is a
    slow mean: its ``1 - lam`` must keep its relative accuracy; 64 eps is the rounding of the eigenvalues of an ``A``
    accurate to an ulp, 1.4e-15 off for 5e-9 at K = 16).
    """
    roots = np.asarray(roots, dtype=np.float64)
    return np.minimum(1e-9 * float(np.max(roots)), _slow_root_tol(roots))


def _secular_confirms(A, k, e, a, oma, qw, beta, pi, gamma):
    """Whether ``A``'s eigenvalues are the secular roots to :func:`_root_tolerance`, without bisecting them.

    True also where :func:`_secular_classes` would give None (its brackets fail: QZ stands). Sorted, the
    roots are known to come, for each distinct pole ``p_i`` in turn, as ``m_i - 1`` copies of ``p_i`` (a pole
    shared by ``m_i`` classes) and then the root in ``(p_i, p_{i+1})`` (``p_{D+1} = 1``). So with ``A``'s sorted
    eigenvalue moduli ``mu`` and ``delta = 1e-9 max mu``, a copy must be within ``delta`` of its pole, and
    a bracket's root lies within its tolerance ``delta_i`` (:func:`_root_tolerance` of ``mu_i``) of its ``mu``
    exactly when ``g - 1`` (the bisection's sign) is ``> 0`` at ``mu - delta_i`` and ``<= 0`` at
    ``mu + delta_i`` (the bracket's ends count as ``+inf`` at the pole and ``<= 0`` at its upper end); a
    bracket above 1/2 is checked in ``y = 1 - lam``, as it is bisected. One evaluation of ``g - 1`` at
    ``2 D`` points.
    """
    setup = _secular_setup(k, e, a, oma, qw, beta, pi, gamma)
    if setup is None:
        return True
    live, poles, _, group, g_minus_one, g_minus_one_y, upper, lo, hi = setup
    if live.shape[0] < e.shape[0]:
        return False  # classes without a pole (kappa_j = 0): their e_j are eigenvalues too; the full solve decides
    mu = np.sort(np.abs(np.linalg.eigvals(A)))
    delta = 1e-9 * float(mu[-1])
    counts = np.bincount(group, minlength=poles.shape[0])
    at, copies = [], []
    i = 0
    for p, m in zip(poles.tolist(), counts.tolist()):
        copies.extend(abs(float(mu[i + c]) - p) <= delta for c in range(m - 1))
        i += m - 1
        at.append(i)
        i += 1
    if not all(copies):
        return False
    roots = mu[at]
    tol = np.minimum(delta, _slow_root_tol(roots))
    D = poles.shape[0]
    own = np.where(upper, 1.0 - roots, roots)  # each root in its bracket's variable
    left, right = own - tol, own + tol
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        at_lam = g_minus_one(np.concatenate([left, right]))
        at_y = g_minus_one_y(np.concatenate([left, right]))
    # In lam, g - 1 > 0 left of the root and <= 0 right of it; in y the other way round.
    left_ok = np.where(upper, at_y[:D] <= 0.0, at_lam[:D] > 0.0) | (left <= lo)
    right_ok = np.where(upper, at_y[D:] > 0.0, at_lam[D:] <= 0.0) | (right >= hi)
    return bool(np.all(left_ok) and np.all(right_ok))


def _from_secular(secular, e, a, beta, q, kappa, r, gamma, shares):
    """``(A, V, radius, residual)`` of :func:`_secular_classes`' result, checked; ``ValueError`` when there is none or it fails."""
    if secular is None:
        raise ValueError("no secular solution (tied 1 - k_j)")
    A, roots = secular
    FA, V = _fixed_point_map(A, e, a, beta, shares)
    residual = float(np.max(np.abs(FA - A)))
    radius = float(np.max(roots))
    _check_stable(A, radius, residual, q, kappa, r, gamma, shares)
    return A, V, radius, residual


def _same_spectrum(A, roots):
    """Whether ``A``'s eigenvalues are the secular roots to :func:`_root_tolerance` (both sorted by modulus)."""
    mine = np.sort(np.abs(np.linalg.eigvals(A)))
    roots = np.sort(roots)
    return bool(np.all(np.abs(mine - roots) <= _root_tolerance(roots)))


def _check_stable(A, radius, residual, q, kappa, r, gamma, shares):
    if not (np.isfinite(A).all() and radius < 1.0 and residual <= 1e-10):
        raise ValueError(
            f"no stable K-class equilibrium (spectral radius {radius:.6g}, fixed-point residual {residual:.3g}) "
            f"for {_weights_text(q, kappa, r, gamma, shares)}"
        )


def _solve_qz(e, a, beta, pi, q, kappa, r, gamma):
    """Stable deflating subspace of the saddle-path pencil ``M - lambda E`` (see :func:`solve_classes`)."""
    from scipy.linalg import ordqz

    K = e.shape[0]
    diag = np.arange(K)
    E = np.zeros((2 * K, 2 * K))
    M = np.zeros((2 * K, 2 * K))
    E[diag, diag] = 1.0
    E[K:, :K] = pi[None, :]
    E[K + diag, K + diag] = a
    M[diag, diag] = e
    M[diag, K + diag] = beta
    M[K + diag, K + diag] = 1.0
    _, _, alpha, bet, _, Z = ordqz(M, E, sort="iuc", output="real")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mod = np.abs(alpha) / np.abs(bet)  # infinite eigenvalues (beta = 0) are unstable
    stable = int((mod < 1.0).sum())
    if stable != K:
        raise ValueError(
            f"no unique stable K-class equilibrium: the saddle-path pencil has {stable} stable eigenvalues, "
            f"{K} needed, for {_weights_text(q, kappa, r, gamma, pi)}"
        )
    Z11, Z21 = Z[:K, :K], Z[K:, :K]
    V = np.linalg.solve(Z11.T, Z21.T).T
    A = np.diag(e) + beta[:, None] * V
    return A, float(np.max(mod[:K]))


# --------------------------------------------------------------------------- the game


_SLOTS = ("q", "kappa", "r", "gamma", "policy", "gains", "coefficients", "table", "shares", "feedforward", "classes")


class Game:
    """Weights, gains and the chosen policy of one MEMOA population (1 or K trust classes).

    Immutable (assigning an attribute raises ``AttributeError``), hashable and
    equal by value.

    Parameters
    ----------
    q : float or sequence of float, default 1.0
        Weight on tracking the agent's own signal, ``q >= 0`` (per class).
    kappa : float or sequence of float, default 1.0
        Weight on staying near the mean state, ``kappa >= 0``; ``q + kappa > 0``.
    r : float or sequence of float, default 0.1
        Weight on the control effort, ``r > 0``.
    gamma : float, default 0.9
        Discount factor, ``0 < gamma <= 1`` (shared by all classes).
    policy : {"memoa", "greedy", "local", "consensus"}
        ``memoa`` is the decentralized mean-field Nash policy

        .. math:: u_i = -k\\left(x_i - \\frac{q s_i + \\kappa \\bar s}{w} - c(m - \\bar s)\\right);

        the others are the greedy baselines of ``MODEL.md`` section 4:
        ``greedy`` ``u_i = (q s_i + kappa m - w x_i)/(w + r)``,
        ``local`` ``u_i = -k (x_i - s_i)``, ``consensus`` ``u_i = -k (x_i - sbar)``.
    shares : sequence of float, optional (keyword)
        Class shares ``pi_j > 0`` summing to 1 within 1e-12 (default equal).
        K is the common length of the sequences among ``q, kappa, r, shares``;
        scalars broadcast. All scalars and ``shares=None`` is the single-class
        game (K = 1), exactly as before.
    feedforward : bool, default True (keyword)
        ``memoa`` only. ``False`` drops the feed-forward term on the
        (class-)mean deviations: ``u_i = -k_j (x_i - (q_j s_i + kappa_j m*)/w_j)``
        (``MODEL.md`` section 7, last paragraph: may do better on time series,
        where ``m - sbar`` measures the series' own change).

    Attributes
    ----------
    q, kappa, r : float (K = 1) or read-only numpy.ndarray of shape (K,)
    gamma : float
    policy : str
    shares : None (K = 1) or read-only numpy.ndarray of shape (K,)
    feedforward : bool
    gains : Gains or None
        The single-class gains (K = 1); ``None`` for K > 1 (see ``classes``).
    coefficients : PolicyCoefficients or None
        The single-class policy's four numbers (K = 1); ``None`` for K > 1.
    classes : ClassEquilibrium or None
        The K-class equilibrium (:func:`solve_classes`). For K = 1 its closed-form
        equivalent (``A = [[rho]]``, ``C = [[c]]``). ``None`` only for a baseline
        policy whose weights admit no stable equilibrium (all ``q_j = 0``, K > 1).
    table : PolicyTable
        The policy as the kernels read it (K = 1: built from ``coefficients``).
        For ``memoa`` and K classes, with ``m* = sum_l lam_l sbar_l``,
        ``m_l* = (q_l sbar_l + kappa_l m*)/w_l``:
        ``u = -k_j (x - (q_j s + kappa_j m*)/w_j - sum_l C_jl (m_l - m_l*))``, i.e.
        ``GAIN = k_j``, ``SIGNAL = q_j/w_j``, ``mix[MIX_STATE] = C`` and
        ``mix[MIX_SIGNAL]_jl = (kappa_j/w_j) lam_l - C_jl q_l/w_l - (sum_i C_ji kappa_i/w_i) lam_l``.
        Baselines read the means over all agents (column ``K`` of ``mix``),
        whatever the classes' sizes and valid counts: greedy ``GAIN =
        w_j/(w_j+r_j)``, ``SIGNAL = q_j/w_j``, ``mix[MIX_STATE]_jK =
        kappa_j/w_j`` (the true ``m``); local ``GAIN = k_j``, ``SIGNAL = 1``;
        consensus ``GAIN = k_j``, ``mix[MIX_SIGNAL]_jK = 1`` (the mean of every
        valid signal).

    Examples
    --------
    >>> game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    >>> round(game.gains.k, 6), round(game.gains.rho, 6)  # doctest: +SKIP
    >>> trust = Game(q=[2.0, 1.0, 0.25], kappa=3.0, r=0.1, gamma=0.9, shares=[0.2, 0.5, 0.3])
    >>> trust.n_classes, trust.table.mix.shape
    (3, (2, 3, 4))
    """

    __slots__ = _SLOTS

    def __init__(self, q=1.0, kappa=1.0, r=0.1, gamma: float = 0.9, policy: str = "memoa", *, shares=None, feedforward: bool = True):
        K, q, kappa, r, gamma, shares = _check_class_weights(q, kappa, r, gamma, shares)
        policy = check_choice("policy", policy, POLICIES)
        feedforward = check_bool("feedforward", feedforward)
        if not feedforward and policy != "memoa":
            raise ValueError(f"feedforward=False applies to the 'memoa' policy only, got policy={policy!r}")
        self._assign(K, q, kappa, r, gamma, policy, shares, feedforward, None)

    def _assign(self, K, q, kappa, r, gamma, policy, shares, feedforward, classes):
        put = object.__setattr__
        put(self, "q", q)
        put(self, "kappa", kappa)
        put(self, "r", r)
        put(self, "gamma", gamma)
        put(self, "policy", policy)
        put(self, "shares", shares)
        put(self, "feedforward", feedforward)
        if K == 1:
            gains = solve_gains(q, kappa, r, gamma)
            coefficients = _policy_coefficients(policy, q, kappa, r, gains, feedforward)
            put(self, "gains", gains)
            put(self, "coefficients", coefficients)
            put(self, "classes", classes if classes is not None else _solve_checked(1, q, kappa, r, gamma, None))
            put(self, "table", _single_class_table(coefficients, q, kappa, r))
            return
        if classes is None:
            try:
                classes = _solve_checked(K, q, kappa, r, gamma, shares)
            except ValueError:
                if policy == "memoa":
                    raise
                # Baselines need only the per-class gains; check them alone.
                classes = None
        put(self, "gains", None)
        put(self, "coefficients", None)
        put(self, "classes", classes)
        put(self, "table", _class_table(policy, q, kappa, r, gamma, shares, classes, feedforward))

    # ----------------------------------------------------------------- immutability

    def __setattr__(self, name, value):
        raise AttributeError(f"Game is immutable: cannot set {name!r}; build a new Game (see with_policy, with_weights)")

    def __delattr__(self, name):
        raise AttributeError(f"Game is immutable: cannot delete {name!r}")

    def __reduce__(self):
        # A subclass's pickle is of its class, with its own attributes (its __dict__ and its own slots): both were dropped.
        # Copies are self.
        return (_restore_game, (self.to_dict(), type(self)), own_attributes(self, frozenset(_SLOTS)) or None)

    def __setstate__(self, own: dict) -> None:
        """A subclass's own attributes, after :func:`_restore_game` built it (its own slots too: Game's ``__setattr__`` refuses)."""
        set_own_attributes(self, own)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # ----------------------------------------------------------------- derived

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return 1 if self.shares is None else int(self.shares.shape[0])

    @property
    def w(self):
        """Total state weight ``q + kappa`` (per class for K > 1)."""
        return self.q + self.kappa

    def with_policy(self, policy: str) -> "Game":
        """The same weights under another policy (for baselines on the same stream).

        ``feedforward`` is kept for ``"memoa"`` and reset to True for a
        baseline (it only applies to ``memoa``). The equilibrium is not
        re-solved.
        """
        policy = check_choice("policy", policy, POLICIES)
        feedforward = self.feedforward if policy == "memoa" else True
        if policy == "memoa" and self.n_classes > 1 and self.classes is None:
            return Game(self.q, self.kappa, self.r, self.gamma, policy, shares=self.shares, feedforward=feedforward)
        new = object.__new__(Game)
        new._assign(self.n_classes, self.q, self.kappa, self.r, self.gamma, policy, self.shares, feedforward, self.classes)
        return new

    def with_weights(self, q=None, kappa=None, r=None, shares=None) -> "Game":
        """A new game with some per-class weights (or shares) replaced, re-solved.

        Arguments left ``None`` keep this game's values; ``gamma``, ``policy``
        and ``feedforward`` are kept. Replacing ``q`` by a sequence of length K
        turns a single-class game into a K-class one (other weights broadcast).
        Re-solving costs about 0.1-0.5 ms for K <= 16 (one 2K x 2K ordered QZ).

        Examples
        --------
        >>> g = Game(q=[1.0, 1.0], kappa=3.0, r=0.1, gamma=0.9)
        >>> g.with_weights(q=[2.0, 0.5]).q.tolist()
        [2.0, 0.5]
        """
        def length(x):
            # A sequence's length; None for a scalar: a number, a 0-d array, a Decimal (what Game takes as one weight).
            if x is None or isinstance(x, numbers.Real):
                return None
            try:
                return len(x)
            except TypeError:  # no length (np.array(3.0) raised "len() of unsized object"): Game checks it
                return None

        K_new = max((n for n in map(length, (q, kappa, r, shares)) if n is not None), default=None)

        def keep(mine):
            # A per-class array of this game must not clash in length with a new K.
            if isinstance(mine, np.ndarray) and K_new is not None and len(mine) != K_new and np.all(mine == mine[0]):
                return float(mine[0])
            return mine

        new_shares = shares if shares is not None else (self.shares if K_new in (None, self.n_classes) else None)
        return Game(
            keep(self.q) if q is None else q,
            keep(self.kappa) if kappa is None else kappa,
            keep(self.r) if r is None else r,
            self.gamma,
            self.policy,
            shares=new_shares,
            feedforward=self.feedforward,
        )

    # ----------------------------------------------------------------- value semantics

    def to_dict(self) -> dict:
        """Plain values (lists for per-class weights): ``Game(**game.to_dict()) == game``."""
        if self.n_classes == 1:
            d = {"q": self.q, "kappa": self.kappa, "r": self.r, "gamma": self.gamma, "policy": self.policy}
        else:
            d = {"q": self.q.tolist(), "kappa": self.kappa.tolist(), "r": self.r.tolist(), "gamma": self.gamma,
                 "policy": self.policy, "shares": self.shares.tolist()}
        if not self.feedforward:
            d["feedforward"] = False
        return d

    def __repr__(self) -> str:
        d = self.to_dict()
        return "Game(" + ", ".join(f"{k}={v!r}" for k, v in d.items()) + ")"

    def _key(self) -> tuple:
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.to_dict().items())

    def __eq__(self, other) -> bool:
        return isinstance(other, Game) and self._key() == other._key()

    def __hash__(self) -> int:
        if self.n_classes == 1 and self.feedforward:
            return hash(tuple(self.to_dict().values()))
        return hash(self._key())


def _restore_game(d: dict, cls=Game) -> Game:
    """Unpickle a :class:`Game` or a subclass (built by ``Game.__init__``; a pickle made before subclasses were kept names none)."""
    return build_as(cls, Game, (), d)


def _policy_coefficients(policy: str, q: float, kappa: float, r: float, gains: Gains, feedforward: bool = True) -> PolicyCoefficients:
    w = q + kappa
    if policy == "memoa":
        if not feedforward:
            # target = (q s + kappa sbar)/w
            return PolicyCoefficients(gains.k, q / w, kappa / w, 0.0)
        # target = (q s + kappa sbar)/w + c (m - sbar)
        return PolicyCoefficients(gains.k, q / w, kappa / w - gains.c, gains.c)
    if policy == "greedy":
        # u = (q s + kappa m - w x)/(w + r) = -(w/(w+r)) (x - (q s + kappa m)/w)
        return PolicyCoefficients(float(_greedy_gain(w, r)), q / w, 0.0, kappa / w)
    if policy == "local":
        return PolicyCoefficients(gains.k, 1.0, 0.0, 0.0)
    return PolicyCoefficients(gains.k, 0.0, 1.0, 0.0)  # consensus


def _greedy_gain(w, r):
    """The greedy baseline's gain ``w / (w + r)`` (scalar or per class), also where ``w + r`` overflows.

    ``w + r`` exceeds the largest double when both are near it (``w = r = 1e308``: the gain is 1/2, and
    ``w / (w + r)`` gave 0, a population that never moves). There the gain is taken as
    ``1 / (1 + r/w)`` or ``(w/r) / (1 + w/r)``, whichever ratio is at most 1; elsewhere it is ``w / (w + r)``
    as before, to the bit.
    """
    w, r = np.asarray(w, dtype=np.float64), np.asarray(r, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        total = w + r
        safe = np.where(r <= w, 1.0 / (1.0 + r / w), (w / r) / (1.0 + w / r))
        return np.where(np.isfinite(total), w / total, safe)


def _single_class_table(coef: PolicyCoefficients, q: float, kappa: float, r: float) -> PolicyTable:
    row = np.zeros((1, N_COEF))
    row[0, GAIN], row[0, SIGNAL], row[0, Q], row[0, KAPPA], row[0, R], row[0, SIZE] = coef.gain, coef.signal, q, kappa, r, 1.0
    mix = np.zeros((2, 1, 2))  # K = 1: the class means are the global means; column 1 (the global means) stays 0
    mix[MIX_SIGNAL, 0, 0], mix[MIX_STATE, 0, 0] = coef.signal_mean, coef.state_mean
    row.flags.writeable = False
    mix.flags.writeable = False
    return PolicyTable(row, mix)


def _class_table(policy, q, kappa, r, gamma, shares, classes, feedforward) -> PolicyTable:
    """The K-class :class:`PolicyTable` (see :class:`Game`, attribute ``table``)."""
    K = shares.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):  # q_j + kappa_j = inf: refused below by _check_representable
        w = q + kappa
        qw, kw = q / w, kappa / w
    if classes is not None:
        k = classes.k
    else:
        gains = _gains_arrays(q, kappa, r, gamma)
        _check_representable(gains, q, kappa, r, gamma, index=True, n_checked=4)
        k = gains[1]
    coef = np.zeros((K, N_COEF))
    mix = np.zeros((2, K, K + 1))  # column K: the means over all agents
    coef[:, Q], coef[:, KAPPA], coef[:, R], coef[:, SIZE] = q, kappa, r, shares
    coef[:, GAIN] = k
    if policy == "memoa":
        coef[:, SIGNAL] = qw
        lam = classes.lam
        if feedforward:
            C = classes.C
            mix[MIX_STATE, :, :K] = C
            mix[MIX_SIGNAL, :, :K] = np.outer(kw - C @ kw, lam) - C * qw[None, :]
        else:
            mix[MIX_SIGNAL, :, :K] = np.outer(kw, lam)
    elif policy == "greedy":
        coef[:, GAIN] = _greedy_gain(w, r)
        coef[:, SIGNAL] = qw
        mix[MIX_STATE, :, K] = kw  # the true m (MODEL.md section 4), not sum_l pi_l m_l with the game's shares
    elif policy == "local":
        coef[:, SIGNAL] = 1.0
    else:  # consensus: the mean of every valid signal
        mix[MIX_SIGNAL, :, K] = 1.0
    coef.flags.writeable = False
    mix.flags.writeable = False
    return PolicyTable(coef, mix)
