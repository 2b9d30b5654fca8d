"""Streams for the time-series experiments: seeded synthetic series and real CSV columns.

Synthetic streams (MODEL.md section 6), each a function of ``(n_steps, seed)``
and z-scored by default (zero mean, unit standard deviation over the
generated series; the clients never see these statistics):

- ``logistic``: the logistic map ``x(t+1) = r x(t) (1 - x(t))`` in its
  chaotic range (``r = 3.8``);
- ``periodic``: a sum of three sinusoids of incommensurate periods plus
  white noise;
- ``concept``: an AR(2) process whose poles rotate slowly (gradual concept
  drift of the generating process);
- ``concept-drift``: an AR(2) process with abrupt regime switches at
  change points (new poles and a new level in each regime).

Real series come from CSV files through :func:`load_csv_series`, z-scored
with statistics fitted on a warm-up prefix only (no look-ahead).
"""
from __future__ import annotations

import csv
import difflib
import errno
import math
import os
import re
import select
import stat
import time
from pathlib import Path

import numpy as np

from .._validation import (
    MAX_COUNT,
    as_file_path,
    as_float64,
    binary_exponent,
    check_bool,
    check_int,
    check_real,
    check_seed,
    check_sizes,
    open_to_read,
    real_array,
    special_kind,
)
from .forecasters import TARGET_LIMIT

SYNTHETIC_STREAMS = ("logistic", "periodic", "concept", "concept-drift")


# --------------------------------------------------------------------------- synthetic
def logistic_map(n_steps: int, *, seed: int = 0, r: float = 3.8, transient: int = 200, normalize: bool = True) -> np.ndarray:
    """The logistic map in its chaotic range.

    .. math:: x(t+1) = r\\, x(t) (1 - x(t)), \\qquad x(0) \\sim U(0.1, 0.9) \\text{ (seeded)}

    The first ``transient`` iterates are discarded. ``r`` must be in
    ``[3.57, 4)`` (chaotic, and the orbit stays in (0, 1)).
    """
    normalize = check_bool("normalize", normalize)
    n_steps, seed = _check_length_seed(n_steps, seed, arrays=5 if normalize else 2)
    r = check_real("r", r, low=3.57, high=4.0, high_open=True)
    transient = check_int("transient", transient, low=0)
    x = np.random.default_rng(seed).uniform(0.1, 0.9)
    out = np.empty(n_steps)
    for _ in range(transient):
        x = r * x * (1.0 - x)
    for t in range(n_steps):
        out[t] = x
        x = r * x * (1.0 - x)
    return _finish(out, normalize, r=r)


def periodic(
    n_steps: int,
    *,
    seed: int = 0,
    periods: tuple[float, ...] = (17.0, 43.0, 101.0),
    amplitudes: tuple[float, ...] = (1.0, 0.6, 0.3),
    noise: float = 0.2,
    normalize: bool = True,
) -> np.ndarray:
    """A sum of sinusoids plus white noise, with seeded phases.

    .. math:: y(t) = \\sum_k a_k \\sin(2\\pi t / P_k + \\varphi_k) + \\sigma \\varepsilon(t)
    """
    normalize = check_bool("normalize", normalize)
    n_steps, seed = _check_length_seed(n_steps, seed, arrays=6 if normalize else 5)
    periods = _reals("periods", periods, low=0.0, low_open=True)
    amplitudes = _reals("amplitudes", amplitudes)
    if len(periods) != len(amplitudes) or not periods:
        raise ValueError(f"periods and amplitudes must be non-empty and of equal length, got {periods!r}, {amplitudes!r}")
    noise = check_real("noise", noise, low=0.0)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=len(periods))
    t = np.arange(n_steps, dtype=np.float64)
    y = np.zeros(n_steps)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by _finish, naming the parameters
        for P, a, phi in zip(periods, amplitudes, phases):
            y += a * np.sin(2.0 * math.pi * t / P + phi)
        y += noise * rng.standard_normal(n_steps)
        # What rounding alone can spread: sin of an argument up to 2 pi n / P + 2 pi, rounded to 2^-52 of it, and the sum.
        # A sinusoid sampled once or k times per period (P = 1/k) is constant in exact arithmetic: its series is this.
        rounding = sum(abs(a) * 2.0**-52 * (2.0 * math.pi * (n_steps / P + 1.0) + 1.0) for P, a in zip(periods, amplitudes))
    return _finish(y, normalize, rounding=64.0 * rounding, amplitudes=amplitudes, periods=periods, noise=noise)


def concept(
    n_steps: int,
    *,
    seed: int = 0,
    radius: float = 0.95,
    angles: tuple[float, float] = (0.15, 0.9),
    drift_period: float = 3000.0,
    noise: float = 0.3,
    normalize: bool = True,
) -> np.ndarray:
    """AR(2) with slowly rotating poles: a gradual drift of the generating process.

    .. math::

        y(t) &= \\phi_1(t) y(t-1) + \\phi_2(t) y(t-2) + \\sigma\\varepsilon(t), \\qquad
        \\phi_1 = 2\\rho\\cos\\omega(t),\\ \\phi_2 = -\\rho^2 \\\\
        \\omega(t) &= \\omega_0 + (\\omega_1 - \\omega_0)\\,\\tfrac12\\left(1 - \\cos(2\\pi t / T + \\psi)\\right)

    so the oscillation frequency sweeps between ``angles`` every
    ``drift_period`` steps (phase ``psi`` seeded).
    """
    n_steps, seed = _check_length_seed(n_steps, seed, arrays=9)
    radius = check_real("radius", radius, low=0.0, high=1.0, high_open=True)
    drift_period = check_real("drift_period", drift_period, low=0.0, low_open=True)
    noise = check_real("noise", noise, low=0.0, low_open=True)
    w0, w1 = _pair("angles", angles, low=0.0, high=math.pi, ordered=False)
    normalize = check_bool("normalize", normalize)
    rng = np.random.default_rng(seed)
    psi = rng.uniform(0.0, 2.0 * math.pi)
    t = np.arange(n_steps, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        omega = w0 + (w1 - w0) * 0.5 * (1.0 - np.cos(2.0 * math.pi * t / drift_period + psi))
    if not np.isfinite(omega).all():
        raise ValueError(f"drift_period={drift_period!r} is too short for {n_steps} steps: the drift's phase 2 pi t / "
                         "drift_period overflows float64; give a drift period of a few samples or more")
    eps = noise * rng.standard_normal(n_steps)
    y = _ar2(2.0 * radius * np.cos(omega), np.full(n_steps, -radius * radius), np.zeros(n_steps), eps)
    return _finish(y, normalize, radius=radius, noise=noise)


def concept_drift(
    n_steps: int,
    *,
    seed: int = 0,
    segment: tuple[int, int] = (300, 900),
    radius: tuple[float, float] = (0.8, 0.97),
    angles: tuple[float, float] = (0.05, 1.2),
    level: float = 2.0,
    noise: float = 0.3,
    normalize: bool = True,
) -> np.ndarray:
    """AR(2) around a level, with abrupt regime switches at change points.

    Regime lengths are uniform on ``segment`` (integers, low <= high); each
    regime draws a pole radius in ``radius`` (within ``[0, 1)``: a stable
    process), an angle in ``angles`` (within ``[0, pi]``) and a level in
    ``[-level, level]`` (all seeded); the process keeps its deviation from
    the level across a switch, so the level jumps.

    Every generator checks its parameters (ValueError or TypeError naming
    the parameter) and returns a finite series; one that overflows float64
    raises ValueError naming its scale parameters, never a NaN or all-zero
    series.
    """
    normalize = check_bool("normalize", normalize)
    n_steps, seed = _check_length_seed(n_steps, seed, arrays=9 if normalize else 7)
    lo, hi = _pair("segment", segment, integer=True)
    radius = _pair("radius", radius, low=0.0, high=1.0, high_open=True)  # |poles| < 1: the process is stable
    angles = _pair("angles", angles, low=0.0, high=math.pi)
    noise = check_real("noise", noise, low=0.0, low_open=True)
    level = check_real("level", level, low=0.0)
    rng = np.random.default_rng(seed)
    phi1 = np.empty(n_steps)
    phi2 = np.empty(n_steps)
    mean = np.empty(n_steps)
    start = 0
    while start < n_steps:
        stop = min(n_steps, start + int(rng.integers(lo, hi + 1)))
        rho = rng.uniform(*radius)
        omega = rng.uniform(*angles)
        phi1[start:stop] = 2.0 * rho * math.cos(omega)
        phi2[start:stop] = -rho * rho
        # uniform(-level, level) draws -level + 2 level u: beyond 8.9e307, 2 level overflows (NumPy's OverflowError);
        # the same number is 2 (-level/2 + level u), exactly, from the same draw
        mean[start:stop] = rng.uniform(-level, level) if level <= 8.9e307 else 2.0 * rng.uniform(-level / 2.0, level / 2.0)
        start = stop
    with np.errstate(over="ignore", invalid="ignore"):
        eps = noise * rng.standard_normal(n_steps)
        y = _ar2(phi1, phi2, mean, eps)
    return _finish(y, normalize, radius=radius, level=level, noise=noise)


def _ar2(phi1, phi2, mean, eps):
    n = eps.shape[0]
    dev = np.zeros(n)
    a, b = 0.0, 0.0  # deviations at t-1, t-2
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by _finish
        for t in range(n):
            v = phi1[t] * a + phi2[t] * b + eps[t]
            dev[t] = v
            a, b = v, a
        return mean + dev


def _finish(y: np.ndarray, normalize: bool, rounding: float = 0.0, **scales) -> np.ndarray:
    """The generated series, z-scored if asked; ValueError naming ``scales`` if it overflowed float64 or is constant.

    Constant means: every value equal, or a spread (:func:`spread`) of at most ``rounding``, what the generator's
    rounding alone can make; z-scoring that would return the rounding errors at unit variance.
    """
    given = ", ".join(f"{k}={v!r}" for k, v in scales.items())
    hint = " (a period of 1/k samples, k = 1, 2, ..., makes a sinusoid constant)" if "periods" in scales else ""
    if not np.isfinite(y).all() and not math.isfinite(rounding):  # sin(2 pi t / P) with t / P beyond float64: no phase
        raise ValueError(f"the generated series is rounding error only (the phases overflow float64) with {given}; "
                         f"give periods of a few samples or more{hint}")
    if not np.isfinite(y).all():
        raise ValueError(f"the generated series overflows float64 (|y| > 1.8e308) with {given}; "
                         "lower these parameters (the stream is z-scored anyway)")
    if normalize and not y.max() > y.min():
        raise ValueError(f"the generated series is constant (every value {float(y[0])!r}) with {given}, so it cannot be "
                         "z-scored; give it an amplitude or noise > 0")
    if normalize:
        p2 = unit_scale(y)
        y_u = y / p2  # exact; no square of it overflows or underflows
        if not spread(y_u) > rounding / p2:
            # the bound it is within: the generator's own (periodic's phases), or ROUNDING_SPREAD of its largest value
            std, bound = float(np.std(y_u)) * p2, max(rounding, ROUNDING_SPREAD * float(np.max(np.abs(y_u))) * p2)
            phases = ", or its phases are rounding" if "periods" in scales else ""
            periods = ", or periods of a few samples or more" if "periods" in scales else ""
            raise ValueError(f"the generated series is rounding error only (its spread {std:.3g} is within the {bound:.3g} "
                             f"that rounding can make) with {given}, so it cannot be z-scored: it is constant up to "
                             f"rounding{phases}; give it a larger amplitude or noise{periods}{hint}")
    return zscore(y) if normalize else y


def _reals(name: str, values, **bounds) -> tuple[float, ...]:
    """A sequence of finite real numbers (each within ``bounds``, as :func:`check_real`), as a tuple."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r} of type {type(values).__name__}")
    return tuple(check_real(name, v, **bounds) for v in values)


def _pair(name: str, value, *, integer: bool = False, ordered: bool = True, **bounds):
    """A pair ``(low, high)`` of finite reals (or integers in ``[1, 2**63 - 1]``) within ``bounds``; ``low <= high`` if ``ordered``.

    Integers (segment lengths) end at ``2**63 - 1``, the largest NumPy draws (``integers(low, high + 1)``, an int64):
    beyond it NumPy's unnamed "high is out of bounds for int64".
    """
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    lo, hi = (check_int(name, v, low=1, high=MAX_COUNT) if integer else check_real(name, v, **bounds) for v in value)
    if ordered and hi < lo:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return lo, hi


_GENERATORS = {"logistic": logistic_map, "periodic": periodic, "concept": concept, "concept-drift": concept_drift}


def make_stream(name: str, n_steps: int, *, seed: int = 0, **params) -> np.ndarray:
    """A seeded synthetic stream by name, z-scored, shape (n_steps,).

    Parameters
    ----------
    name : {"logistic", "periodic", "concept", "concept-drift"}
    n_steps : int
        Length of the series, ``>= 2``.
    seed : int
        Same seed, same series (bitwise); an integer in ``[0, 2**63 - 1]``.
    **params
        Passed on to the generator (:func:`logistic_map`, :func:`periodic`,
        :func:`concept`, :func:`concept_drift`).
    """
    if not isinstance(name, str):
        raise TypeError(f"stream must be one of {', '.join(map(repr, SYNTHETIC_STREAMS))}; got {name!r} of type "
                        f"{type(name).__name__}")
    if name not in _GENERATORS:
        raise ValueError(f"stream must be one of {', '.join(map(repr, SYNTHETIC_STREAMS))}; got {name!r}")
    return _GENERATORS[name](n_steps, seed=seed, **params)


def zscore(values: np.ndarray, fit: slice | None = None) -> np.ndarray:
    """``(values - mean) / std`` with mean and std taken over ``values[fit]`` (all by default).

    Both are computed on the values divided by a power of two at least their
    largest magnitude (exact), so no square overflows: any finite float64
    series with spread gives a finite result (not zeros); and on their
    differences from the reference's first value (:func:`fit_on_differences`),
    so a level ``a`` that the values hold exactly (integers within ``2**53``,
    binary fractions) cancels: ``zscore(a + v)`` is ``zscore(v)``, bit for bit.
    Non-finite values and a constant reference raise ValueError, and so does
    one whose values differ by rounding only (:func:`spread`).
    """
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"cannot z-score a series with non-finite values (first at index {i}: {float(values[i])!r})")
    ref = values if fit is None else values[fit]
    if ref.size == 0:  # else NumPy's "zero-size array to reduction operation" from deep inside the fit
        raise ValueError(f"cannot z-score on no values: fit={fit!r} selects none of the series' {values.size} values "
                         "(give a fit with at least two values)")
    scale, origin_u, mean_u, std_u = fit_on_differences(ref.reshape(-1, 1))
    if not std_u[0] > 0.0:
        raise ValueError(f"cannot z-score a constant series (standard deviation 0, or at most {ROUNDING_SPREAD:.3g} times "
                         "its largest value: rounding only)")
    with np.errstate(over="ignore"):
        out = ((values / scale - origin_u[0]) - mean_u[0]) / std_u[0]
    if not np.isfinite(out).all():
        raise ValueError("cannot z-score this series: a value lies beyond 1e308 standard deviations of the reference")
    return out


def fit_on_differences(head: np.ndarray, exact: bool = False) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``(p2, origin, mean, std)`` of the columns of ``head`` (shape (n, d), finite), in units of ``p2``.

    .. math:: o_j = h_{0j} / p_2, \\qquad m_j, s_j = \\text{mean, spread of } h_{tj} / p_2 - o_j \\ (t < n)

    ``p2`` is :func:`unit_scale` of all of ``head`` (dividing by it leaves
    every value at most 2 in magnitude, every difference at most 4: no square
    overflows; and is exact). A column some 1e-154 times another's or less
    has squares that underflow in these units: its spread is then imprecise,
    down to 0 (constant) near 1e-162. The mean and the standard deviation are taken on
    the differences from the first row (the shifted-data algorithm): a level
    ``a`` far above the spread then cancels exactly wherever the values hold
    it exactly, where on the values themselves the mean's rounding, ``eps
    |a|``, shifted the whole z-scored series (``2**52 - 30000 + v``, ``v``
    integers of standard deviation 6200, z-scored 4.8e-5 away from ``v``'s;
    at ``1.7e12 + v``, 7.8e-9). The column's mean is ``p2 (o_j + m_j)``, and a
    z-score ``((y / p2 - o_j) - m_j) / s_j``. A column whose values differ by
    rounding only (:func:`spread` of the values, not of their differences:
    the rounding of the level) has ``s_j = 0``, unless ``exact`` says that
    the values are exact (an integer series cast to float64 without
    rounding): then only a constant column has. Each column alone, on
    contiguous rows, so its numbers do not depend on the other columns
    (but for ``p2``, a power of two, and that underflow).
    """
    p2 = unit_scale(head)
    head_u = head / p2
    # a level's rounding (0.3 and 0.1 + 0.2) is no spread; integers have none
    spread_of_values = np.full(head.shape[1], np.inf) if exact else spread(head_u, axis=0)
    origin_u = head_u[0].copy()
    head_u -= origin_u  # in place: a whole stream's z-score holds no more arrays than on the values; |.| <= 4
    shifted = np.ascontiguousarray(head_u.T)  # each column alone, on contiguous rows (no copy for one column)
    del head_u
    mean_u = shifted.mean(axis=1)
    std_u = np.where(spread_of_values > 0.0, spread(shifted, axis=1), 0.0)
    return p2, origin_u, mean_u, std_u


#: A reference whose standard deviation is at most this fraction of its largest magnitude (64 units in the last place)
#: is constant up to rounding: its values differ in their last bits only (0.3 and 0.1 + 0.2), and a z-score on it
#: would blow that rounding up to values of order 1e14 and more.
ROUNDING_SPREAD = 2.0**-46


def spread(values: np.ndarray, axis: int | None = None):
    """The standard deviation of ``values`` (along ``axis``), 0 where it is rounding only.

    .. math:: \\operatorname{spread}(v) = \\operatorname{std}(v) \\text{ if } \\operatorname{std}(v) > 2^{-46} \\max |v|, \\text{ else } 0

    ``values`` must be finite and at most about 1e300 in magnitude (the
    callers pass them divided by :func:`unit_scale`). Along an axis, each
    slice's spread is the very bits of that slice's alone: the slices are
    made contiguous rows first, since NumPy sums a reduction across the
    rows of a 2-D array in another order than along one (a coordinate's
    spread, and so what it holds, moved by an ulp with its neighbours).
    """
    if axis is not None:
        values = np.ascontiguousarray(np.moveaxis(np.asarray(values), axis, -1))
        axis = -1
    std = np.std(values, axis=axis)
    top = np.max(np.abs(values), axis=axis)
    out = np.where(std > ROUNDING_SPREAD * top, std, 0.0)
    return float(out) if out.ndim == 0 else out


def unit_scale(values: np.ndarray) -> float:
    """A power of two at least half the largest ``|value|`` (at most ``2**1023``; 1 when all are 0).

    Dividing by it is exact and leaves every value at most 2 in magnitude, so a
    mean or a standard deviation taken on the quotients cannot overflow.
    """
    return math.ldexp(1.0, min(binary_exponent(values), 1023))  # the package's one power-of-two scaling


#: ``run_experiment``'s and ``memoa run``'s default ``outlier_bound``, in standard deviations of the burn-in.
OUTLIER_BOUND = 24.0


def clip_outliers(series, bound, start: int = 1) -> np.ndarray:
    r"""The series with each value held within ``bound`` of the range of the values before it (as held), per coordinate.

    .. math::

        \tilde y(t) = y(t) \ (t < t_0), \qquad
        \tilde y(t) = \min\Bigl(\max\bigl(y(t),\ \min_{s<t} \tilde y(s) - 2^k b\bigr),\
                                  \max_{s<t} \tilde y(s) + 2^k b\Bigr) \ (t \ge t_0)

    with ``k`` the number of rows just before ``t`` (from ``t_0`` on) whose
    value of the coordinate was held: the reach doubles while the values are
    held, and is ``b`` again after a value within it.

    Causal (``y~(t)`` reads ``y(0..t)`` only), so it can feed an online
    forecaster: a spike of any height reaches it as a value at most ``b``
    beyond the range before it, and so does a sentinel such as ``99999``
    every time it recurs among values within the range (the range grows by
    the held values, never the raw ones). A real shift of the level by ``D``
    is let in over about ``log2(D / b)`` steps (the fed values lag it by at
    most ``D`` meanwhile), and a series that moves by more than ``b`` every
    step (a growth) is let in at its pace, not at ``b`` a step, which left
    the fed values ever further behind it (with a fixed reach, a shift took
    ``D / b`` steps). :func:`~memoa_fast.run_experiment` feeds what learns
    ``y~`` and scores every forecast against ``y``.

    Parameters
    ----------
    series : array_like, shape (T,) or (T, d)
        Finite real values, ``T >= 1``.
    bound : float or array_like, shape (d,)
        ``b > 0`` (``inf``: that coordinate is never held), in the series'
        units; one per coordinate, or one for all.
    start : int
        ``t_0 >= 1``: the first row that can be held; the rows before it are
        taken as they are and make the first range (a range of a few values
        is narrow: ``run_experiment`` starts at row 20).

    Returns
    -------
    numpy.ndarray
        ``y~``, float64, a new array of the shape of ``series``.
    """
    y = as_float64(real_array("series", series), copy=True)  # a copy: the result is new
    if y.ndim not in (1, 2) or y.shape[0] < 1 or y.size == 0:
        raise ValueError(f"series must have shape (T,) or (T, d) with T >= 1 and d >= 1, got shape {y.shape}")
    y2 = y.reshape(len(y), -1)
    if not np.isfinite(y2).all():
        raise ValueError(f"series must be finite; first non-finite value at row {int(np.argmax(~np.isfinite(y2).all(axis=1)))}")
    b = as_float64(real_array("bound", bound))
    if b.ndim > 1 or (b.ndim == 1 and b.shape != (y2.shape[1],)):
        raise ValueError(f"bound must be a number or one per coordinate, shape ({y2.shape[1]},); got shape {b.shape}")
    if not (b > 0).all():  # (NaN too)
        raise ValueError(f"bound must be > 0 (inf: never held), got {bound!r}")
    _hold(y2, np.broadcast_to(b, (y2.shape[1],)), check_int("start", start, low=1), copy=False)
    return y


#: The fewest rows of a block of :func:`_hold` (the first, and after held rows) and the most values of one.
_HOLD_MIN_ROWS = 16
_HOLD_BLOCK_VALUES = 1 << 15


def _hold(y: np.ndarray, bound: np.ndarray, start: int, copy: bool) -> tuple[np.ndarray, int, int]:
    """``(held, n_held, scanned)``: :func:`clip_outliers` in place on a (T, d) float64 ``y`` (or on a copy: ``copy``).

    ``bound`` has shape (d,); rows before ``start`` are not held. With
    ``copy`` the copy is made at the first held value.

    Vectorised: the running range is found a block of rows at a time (from
    16 rows, doubling while no value is held, up to ``2**15`` values). After
    a held row the rows are taken one at a time while they are held (a
    level shift let in over several rows, each coordinate's reach doubled
    for each held row before it), then in blocks again from 16 rows.
    So the cost is at most ``3 T d`` values plus ``16 d`` per held row,
    whatever the pattern of held rows, and the temporaries are a few blocks,
    whatever ``T``. With ``copy``, ``held`` is ``y`` itself when no value is held (no (T, d)
    copy is ever made for a clean series). ``scanned``: the values compared
    with the range, at most ``d (3 T + 16 (rows held + 1))``: a block has at
    most twice the rows the block before it went past, or 16 after held
    rows, and each row after a held one is compared once more on its own.
    """
    T, d = y.shape
    if T <= start:
        return y, 0, 0
    low = y[:start].min(axis=0)
    high = y[:start].max(axis=0)
    most = max(_HOLD_MIN_ROWS, _HOLD_BLOCK_VALUES // d)
    held = scanned = 0
    t, width, after_held = start, _HOLD_MIN_ROWS, False
    reach = bound  # 2**k bound for a coordinate held in the k rows just before (bound in blocks: nothing held there)
    with np.errstate(over="ignore"):  # a range plus a bound beyond float64's is inf: nothing lies beyond it
        while t < T:
            if after_held:  # the row after a held one, on its own: most likely held too in a shift of the level
                row = y[t]
                lo, hi = low - reach, high + reach
                out = (row < lo) | (row > hi)
                n_out = int(np.count_nonzero(out))
                scanned += d
                if n_out:
                    held += n_out
                    np.clip(row, lo, hi, out=row)
                    np.minimum(low, row, out=low)
                    np.maximum(high, row, out=high)
                    reach = np.where(out, 2.0 * reach, bound)  # doubled, not bound times 2**k: that overflows first
                    t += 1
                    continue
                # within the widened reach: taken as it is (a block would hold it at the plain bound); blocks again after it
                np.minimum(low, row, out=low)
                np.maximum(high, row, out=high)
                t += 1
                after_held, width = False, _HOLD_MIN_ROWS
                continue
            block = y[t : t + width]
            n = block.shape[0]
            scanned += n * d
            # the range before each row of the block (the running extremes up to the row before it: none held in it
            # yet), widened by the bound: what lies beyond it is held
            lo = np.concatenate((low[None], np.minimum(np.minimum.accumulate(block[:-1], axis=0), low)))
            hi = np.concatenate((high[None], np.maximum(np.maximum.accumulate(block[:-1], axis=0), high)))
            lo -= bound
            hi += bound
            beyond = (block < lo) | (block > hi)
            rows = np.flatnonzero(beyond.any(axis=1))
            if rows.size == 0:
                np.minimum(low, block.min(axis=0), out=low)
                np.maximum(high, block.max(axis=0), out=high)
                t += n
                width = min(2 * n, most)
                continue
            k = int(rows[0])
            if copy:  # the first held value: the rest is held in the copy
                y, copy = y.copy(), False
            row = y[t + k]
            held += int(np.count_nonzero(beyond[k]))
            reach = np.where(beyond[k], 2.0 * bound, bound)
            np.clip(row, lo[k], hi[k], out=row)
            np.minimum(low, y[t : t + k + 1].min(axis=0), out=low)
            np.maximum(high, y[t : t + k + 1].max(axis=0), out=high)
            t += k + 1
            after_held = True
    return y, held, scanned


def _check_length_seed(n_steps, seed, arrays):
    """``n_steps >= 2`` and the seed, checked; ``arrays`` float64 arrays of ``n_steps`` values must fit in memory.

    ``arrays`` is the generator's peak (measured, with ``normalize`` as given: z-scoring holds up to four arrays more),
    so a stream too long is refused naming ``n_steps`` before NumPy's ``MemoryError``, and one that fits is not.
    """
    n_steps = check_int("n_steps", n_steps, low=2, high=MAX_COUNT)
    check_sizes(n_steps, 1, per_agent_vectors=0, per_agent_scalars=arrays, what="stream", names=("n_steps", None),
                advice="ask for fewer steps")
    return n_steps, check_seed("seed", seed)


# --------------------------------------------------------------------------- CSV
class CsvSeriesError(ValueError):
    """A CSV file cannot give a clean numeric series; the message names file, line and column."""


#: Bytes read per block by :func:`load_csv_series`.
CSV_BLOCK_BYTES = 1 << 20
#: Longest accepted line (header included), so memory stays bounded whatever the file holds.
CSV_MAX_LINE_BYTES = 1 << 20
#: Seconds a named pipe (made by ``mkfifo``) is waited on for a process to open it for writing, before it is refused;
#: once a writer has it open, its data is waited for without limit (a slow writer).
CSV_PIPE_WAIT = 60.0
# A strict decimal number: what a CSV cell must hold (no underscores, no hex, no
# non-ASCII digits, no words). Python's float() alone accepts "1_001" and "١".
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = frozenset(s + w for s in ("", "+", "-") for w in ("nan", "inf", "infinity"))
#: Cells that mark a missing value (lower-cased): R's NA, pandas' NaN and <NA>, Excel's #N/A, SQL's NULL,
#: Python's None, FRED's ".", the UCI repository's "?" (its household power series), a dash or two (statistics
#: offices' tables). A gap, like an empty cell: an error, or a row dropped with ``missing="drop"``.
MISSING_MARKERS = frozenset((
    "na", "n/a", "n.a.", "#n/a", "#n/a n/a", "#na", "<na>", "nan", "-nan", "+nan", "null", "none", ".", "?", "-", "--",
    "#nv", "#n/d", "#n/b", "#н/д",  # Excel's #N/A in German, in Italian, Polish and Portuguese, in Dutch, in Russian
    "#i/t", "#hiányzik", "#yok", "#není_k_dispozici",  # in Danish and Norwegian, in Hungarian, in Turkish, in Czech
))
#: A spreadsheet's error value (lower-cased): a formula that gave no number, saved as text by Excel
#: (``#DIV/0!``, ``#VALUE!``, ``#REF!``, ``#NAME?``, ``#NUM!``, ``#NULL!``, ``#SPILL!``, ``#CALC!``, ...), Google Sheets
#: (``#ERROR!``) or LibreOffice (``Err:502``). The whole family, not a list: a gap, like a missing-value marker.
#: Letters of any script: the names are localized, and the decimal-comma locales' hold non-ASCII letters and Spanish's
#: inverted marks (``#¡VALOR!``, ``#¿NOMBRE?``, ``#ЗНАЧ!``, ``#VÄRDEFEL!``); and Excel's ``#GETTING_DATA`` (no mark).
_SPREADSHEET_ERROR = re.compile(r"#[¡¿]?[^\W\d_][\w/.]*[!?]|#getting_data|err:[0-9]{3}")
#: Delimiters a file may use, read from its header row: the first of these that the header holds.
CSV_DELIMITERS = (",", "\t", ";", "|")
# Signatures of files that are not UTF-8 text (checked on the first bytes, before decoding).
_SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive", "extract the CSV file from it first (unzip)"),
    (b"\xff\xfe\x00\x00", "UTF-32 text", "save it as UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 text", "save it as UTF-8"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8"),
)
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")
_DECIMAL_COMMA = re.compile(r"[+-]?[0-9]*,[0-9]+")
# Excel's delimiter line: a first line "sep=X" (after a byte-order mark, if any) names the delimiter.
_SEP_LINE = re.compile(rb"(?:\xef\xbb\xbf)?sep=([^\r\n]|[\xc0-\xff][\x80-\xbf]+)\r?\n?")


def load_csv_series(
    path: str | os.PathLike,
    column: str,
    *,
    warmup: int = 500,
    max_rows: int | None = None,
    return_scaling: bool = False,
    missing: str = "error",
    return_dropped: bool = False,
    decimal: str = ".",
):
    """One numeric column of a CSV file with a header row, z-scored on a warm-up prefix.

    .. math:: y(t) = (v(t) - \\mu_W) / \\sigma_W, \\qquad
        \\mu_W, \\sigma_W = \\text{mean, std of } v(0), \\dots, v(W-1)

    Only the first ``W = warmup`` values are used to fit the scaling, so no
    statistic of the future leaks into the stream. ``mu_W`` and ``sigma_W``
    are computed on the warm-up divided by a power of two at least its
    largest magnitude (exact, and no square can overflow), so any finite
    float64 cells give a finite scaling, and on the differences from
    ``v(0)`` (:func:`fit_on_differences`), so a level the cells hold exactly
    cancels: a column ``a + v`` gives the series of ``v``, bit for bit. Works on the ETT files (``OT``), on
    ``exchange_rate.csv`` (``CAD``) and on any UTF-8 file with one header row
    (a byte-order mark, quoted fields and CRLF line ends are fine) delimited
    by ``,``, tab, ``;`` or ``|``: the first of these (:data:`CSV_DELIMITERS`)
    that the header row holds outside quotes and that splits the first data
    row into as many fields (a name may hold another), or the one that a first line
    ``sep=X`` names (Excel's delimiter line; the header row follows it). Every data row must have the
    header's number of fields, so a column is never read from a shifted row.

    The file is read in blocks of :data:`CSV_BLOCK_BYTES` into a growing
    float64 array (no Python list of floats): memory is about 8 bytes per row
    plus one block. It is opened once and read once, front to back, so a pipe
    serves as well as a file: a named pipe (``mkfifo``) or a shell's process
    substitution (``<(zcat ETTh1.csv.gz)``, a path ``/dev/fd/N``). A named
    pipe that no process opens for writing within :data:`CSV_PIPE_WAIT`
    seconds is refused; a writer that has it open is waited for. A pipe is
    read as its bytes come (at most a block at a time), so with ``max_rows``
    a writer that pauses or never ends (``<(tail -f live.csv)``) is read only
    as far as the rows asked for.

    Parameters
    ----------
    path : path-like
        The CSV file, or a pipe giving its text (``'-'`` is a file named
        ``-``; ``memoa run --csv -`` reads standard input).
    column : str
        Header name of the column (exact, case-sensitive).
    warmup : int, default 500
        Rows the z-score is fitted on, ``>= 2``.
    max_rows : int, optional
        Read only the first ``max_rows`` data rows.
    return_scaling : bool, default False
        Also return ``(mean, std)`` of the warm-up prefix.
    missing : {"error", "drop"}, default "error"
        What an empty cell, a missing-value marker
        (:data:`MISSING_MARKERS`: ``NA``, ``N/A``, ``nan``, ``NULL``,
        ``None``, ``.``, ``#N/A``, ..., any case), a spreadsheet's error
        value (``#DIV/0!``, ``#VALUE!``, ``#NAME?``, ``Err:502``, ...) or a
        blank line means: an
        error (a gap in the series), or a row to drop, so that the series is
        the column's values in order with the gaps closed (FRED's H.10 file
        has market holidays and columns that start late). Either way, a row
        whose number of fields differs from the header's is an error.
    return_dropped : bool, default False
        Also return, last, the number of rows dropped as gaps
        (``missing="drop"``; blank lines after the last row do not count).
    decimal : {".", ","}, default "."
        The decimal mark of the column's numbers. With ``","`` (the files of
        many European locales: ``12,5``) a cell holds no point (``1.234,5``
        and ``12.5`` are refused, naming the cell), and the delimiter is
        never ``,``: it is read from the header row among ``\t``, ``;``
        and ``|`` (``;`` if the header holds none), and a delimiter line
        ``sep=,`` is refused.

    Returns
    -------
    numpy.ndarray, shape (n_rows,)
        (or ``(values, mean, std)`` with ``return_scaling``, and
        ``n_dropped`` after them with ``return_dropped``); every value is
        finite with ``|y| <= 1e30`` (:data:`memoa_fast.forecasters.TARGET_LIMIT`).

    Raises
    ------
    FileNotFoundError
        No such file, or a folder.
    CsvSeriesError (a ValueError)
        The message names the file, the line and the column. Raised for: an
        empty file; a compressed (gzip, bzip2, xz, zstd, zip) or UTF-16/32
        file, named as such; line ends of a lone ``\\r``; no such column (the
        message lists the columns, and says when the first line looks like
        data rather than a header); the column named twice in the header; a
        row whose number of fields differs from the header's; a missing-value
        marker (with ``missing="error"``); a device or socket; a named pipe
        that no process opened for writing within :data:`CSV_PIPE_WAIT` s; a cell
        that is empty or missing, or a blank line inside the data (a gap); a
        cell that is not a plain decimal number (``1_001``, ``0x10``, words);
        a cell that is not finite (``nan``, ``inf``, ``1e400``); a byte that
        is not UTF-8 (at its line); a quoted field not closed on its line; a
        line longer than :data:`CSV_MAX_LINE_BYTES` (1 MiB);
        fewer than ``warmup + 2`` data rows; a constant warm-up; a value that
        would z-score beyond ``1e30`` (for example ``1e200`` after a warm-up
        of ordinary values).
    """
    path = as_file_path("path", path, "the CSV file")
    if not isinstance(column, str):
        raise TypeError(f"column must be a str (a name in the header row), got {column!r} of type {type(column).__name__}")
    return_scaling = check_bool("return_scaling", return_scaling)
    return_dropped = check_bool("return_dropped", return_dropped)
    warmup = check_int("warmup", warmup, low=2)
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', got {missing!r}")
    _check_decimal(decimal)
    if max_rows is not None:
        max_rows = check_int("max_rows", max_rows, low=1)
    with _open_csv(path) as fh:
        arr, mean, std, dropped = _csv_series(fh, str(path), column, warmup, max_rows, missing == "drop", decimal)
    out = (arr, mean, std) if return_scaling else (arr,)
    if return_dropped:
        out += (dropped,)
    return out if len(out) > 1 else arr


def _csv_series(fh, path: str, column: str, warmup: int, max_rows: int | None, drop_missing: bool, decimal: str):
    """``(values, mean, std, n_dropped)`` of :func:`load_csv_series`, read from the open binary file ``fh``.

    ``path`` names the source in messages (``'<stdin>'`` for ``memoa run --csv -``); the other arguments are checked
    already.
    """
    reader = _ColumnReader(path, column, max_rows, drop_missing=drop_missing, decimal=decimal)
    arr = reader.read(fh)
    n = arr.shape[0]
    need = warmup + 2
    if n < need:
        capped = max_rows is not None and n == max_rows  # too few because of max_rows: say so
        raise CsvSeriesError(
            f"{path}, column {column!r}: {n} data rows"
            + (" (every cell of the column is empty or a missing-value marker)" if n == 0 and drop_missing else "")
            + (f" (read up to max_rows={max_rows})" if capped else "")
            + f", too few: need at least {need} (a warm-up of {warmup} rows to fit the z-score, then at least 2 to "
            "forecast); use a longer file or a shorter warm-up (warmup=, memoa run --warmup)"
            + (", or a larger max_rows" if capped else "")
        )
    head = arr[:warmup]
    scale, *fit = fit_on_differences(head[:, None])
    origin_u, mean_u, std_u = (float(v[0]) for v in fit)
    if not std_u > 0.0:
        raise CsvSeriesError(
            f"{path}, column {column!r}: constant over the first {warmup} rows of the warm-up (value {float(head[0])!r}"
            + (", the others differing from it by rounding only" if float(head.max()) > float(head.min()) else "")
            + "); the z-score needs spread, use a longer warm-up"
        )
    mean, std = (origin_u + mean_u) * scale, std_u * scale
    # Refuse a value that would z-score beyond the limit, naming it (checked on the raw values).
    reach = TARGET_LIMIT * std_u * scale  # may be inf: then nothing is out of reach
    lo, hi = mean - reach, mean + reach
    if float(arr.min()) < lo or float(arr.max()) > hi:
        i = int(np.argmax((arr < lo) | (arr > hi)))
        reader.refuse_scale(i, float(arr[i]), ((float(arr[i]) / scale - origin_u) - mean_u) / std_u, mean, std, TARGET_LIMIT)
    arr /= scale
    arr -= origin_u  # the differences from v(0) first: a level the cells hold exactly cancels (fit_on_differences)
    arr -= mean_u
    arr /= std_u
    if not max(-float(arr.min()), float(arr.max())) <= TARGET_LIMIT:  # rounding at the very edge of the limit
        i = int(np.argmax(~(np.abs(arr) <= TARGET_LIMIT)))
        reader.refuse_scale(i, float(arr[i]) * std + mean, float(arr[i]), mean, std, TARGET_LIMIT)
    return arr, mean, std, reader.n_dropped


def csv_columns(path: str | os.PathLike, *, decimal: str = ".") -> list[str]:
    """The column names of a CSV file's header row, as :func:`load_csv_series` reads them (with the same ``decimal``).

    Raises FileNotFoundError, or CsvSeriesError when the file is not CSV
    text (compressed, UTF-16, lone ``\\r`` line ends, an empty first line,
    an over-long first line).
    """
    path = as_file_path("path", path, "the CSV file")
    _check_decimal(decimal)
    with _open_csv(path) as fh:
        return _csv_names(fh, str(path), decimal)


def _csv_names(fh, path: str, decimal: str) -> list[str]:
    """:func:`csv_columns` of the open binary file ``fh``, named ``path`` in messages; reads the header row (and the next)."""
    reader = _ColumnReader(path, "", None, decimal=decimal)
    raw, line = reader._header_line(fh)
    return reader._names(raw, line)


def _open_csv(path: Path):
    """``path`` opened once to read, in binary: a regular file or a pipe, as the ``fstat`` of the open handle says.

    ``FileNotFoundError`` (saying so for a folder), ``CsvSeriesError`` for a device or a socket. Opened without
    blocking (:func:`memoa_fast._validation.open_to_read`), so a named pipe never holds the open; then, if it is a
    pipe, its writer is waited for (:func:`_await_writer`).
    """
    try:
        fh, st = open_to_read(path, lambda st: _refuse(path, st.st_mode))
    except OSError as exc:
        if exc.filename is None:  # _refuse's, from the handle's fstat (a folder): not a failed open
            raise
        if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOTDIR, errno.ELOOP):  # through a file, a link loop
            raise FileNotFoundError(f"CSV file not found: {str(path)!r}") from None
        # A socket put there after open_to_read's stat cannot be opened (ENXIO), nor a folder on Windows: the path's
        # stat only names what it is
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise exc from None
        _refuse(path, mode)
        raise
    if stat.S_ISFIFO(st.st_mode):
        try:
            _await_writer(fh, str(path))
        except BaseException:
            fh.close()
            raise
    return fh


def _refuse(path: Path, mode: int) -> None:
    """Refuse what cannot hold CSV text: a folder (``FileNotFoundError``, as before) or a device or socket."""
    if stat.S_ISDIR(mode):
        raise FileNotFoundError(f"CSV file not found: {str(path)!r} (it is a directory)")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise CsvSeriesError(f"{str(path)!r} is {special_kind(mode) or 'not a regular file'}, not a CSV file or a pipe; "
                             "give a CSV file")


def _await_writer(fh, path: str) -> None:
    """Wait, at most :data:`CSV_PIPE_WAIT` seconds, for a process to open the pipe ``fh`` for writing.

    Read with no writer, a pipe ends at once, whether its writer came and closed it (an empty pipe: the end, as read)
    or none has come yet (a named pipe whose writer is not started: a plain ``open`` would have waited for it, forever).
    Linux reports a hang-up only once a writer has come, which tells the two apart; where it is reported at once
    (other systems), the pipe reads as empty. A writer holding the pipe open makes ``peek`` wait for its first bytes,
    without limit (a slow writer).
    """
    if not hasattr(select, "poll"):  # pragma: no cover - Windows, which has no named pipes
        return
    poller = select.poll()
    poller.register(fh.fileno(), select.POLLIN)
    deadline = time.monotonic() + CSV_PIPE_WAIT
    while not fh.peek(1):  # b"": no writer has the pipe open now
        if poller.poll(0):  # hung up: a writer came and went
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise CsvSeriesError(f"{path}: no process opened this named pipe for writing within {CSV_PIPE_WAIT:g} s "
                                 "(it has no data until one does); start the program that writes it")
        poller.poll(min(left, 0.05) * 1000)  # wakes at a writer's first bytes or its close; one that only opens: next turn


def _check_decimal(decimal) -> None:
    if not isinstance(decimal, str) or decimal not in (".", ","):
        raise ValueError(f"decimal must be '.' or ',' (the numbers' decimal mark), got {decimal!r}")


def column_list(names: list[str], limit: int = 50) -> str:
    """``'a', 'b', ...``: the names quoted (each cut to 30 characters), at most ``limit`` of them."""
    return ", ".join(_short(nm, 30) for nm in names[:limit]) + (f", ... ({len(names)} columns)" if len(names) > limit else "")


def _short(text: str, limit: int = 40) -> str:
    """``repr`` of a cell, cut to ``limit`` characters (a message never echoes a file)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


class _ColumnReader:
    """Streams one column of a CSV file into a float64 array, block by block.

    Fast path (a block with no quote, no underscore and no earlier blank
    line): the block's lines are split in C and converted with ``float``
    straight into the array. Any failure in a block (a bad cell, a gap, a
    quote) re-reads that block line by line with the strict checks, which
    find the exact line and say what is wrong. Fields are split on commas; a
    quoted field must close on the line where it opens.
    """

    def __init__(self, path: str, column: str, max_rows: int | None, drop_missing: bool = False, decimal: str = "."):
        self.path, self.column, self.max_rows = path, column, max_rows
        self.drop_missing = drop_missing  # empty/missing cells and blank lines are rows to skip
        self.decimal = decimal  # the numbers' decimal mark: '.' or ',' (then ',' is never the delimiter)
        self.delimiters = tuple(d for d in CSV_DELIMITERS if d != decimal)  # those a header row may choose
        self.default_sep = "," if decimal == "." else ";"  # a header holding none; ';' is the decimal-comma locales' own
        self.col = 0
        self.n_fields = 0
        self.n = 0
        self.buf = np.empty(0)
        self.blank_at = None  # line of the first blank line seen (a gap unless only blank lines follow)
        self.sep = ","  # the delimiter, read from the header row
        self.forced_sep = None  # the delimiter named by a first line sep=X (Excel's), if any
        self.first_row = b""  # the line after the header row (see _delimiter), read by _header_line
        self.n_dropped = 0  # rows dropped as gaps (missing="drop"); blank lines count once a row follows them
        self.blank_run = 0

    # ------------------------------------------------------------------ driver
    def read(self, fh) -> np.ndarray:
        """The column's values from the open binary file ``fh``, read once, front to back (a pipe too)."""
        try:
            st = os.fstat(fh.fileno())
            size = st.st_size if stat.S_ISREG(st.st_mode) else None  # a pipe's size is unknown: the array grows as it fills
        except (OSError, ValueError):  # no file behind fh (io.BytesIO)
            size = None
        raw, line = self._header_line(fh)
        self._header(raw, line)
        line += 1
        pending = self.first_row  # read already (it settled the delimiter): the data starts with it
        # A file is read in whole blocks; a pipe, as its bytes come (read1: what is there, up to a block): its writer may
        # pause or never end (<(tail -f f.csv)), and rows written already are not held back until a whole block comes
        read = fh.read if size is not None or not hasattr(fh, "read1") else fh.read1
        parts, held = [], 0  # pieces of a line read since its start (joined once, at its end: no copy per piece)
        while not self._full():
            block = read(CSV_BLOCK_BYTES)
            if not block:
                pending += b"".join(parts)
                if pending:
                    self._block(pending, [pending], line)
                break
            if b"\n" not in block and pending[-1:] != b"\n":  # pending is first_row (a whole line) or a line's start
                parts.append(block)
                held += len(block)
                if len(pending) + held > CSV_MAX_LINE_BYTES:
                    self._too_long(line)
                continue
            data = pending + b"".join(parts) + block
            parts, held = [], 0
            cut = data.rfind(b"\n")
            if len(data) - cut - 1 > CSV_MAX_LINE_BYTES:
                self._too_long(line + data.count(b"\n", 0, cut) + 1)
            chunk, pending = data[:cut], data[cut + 1:]
            lines = chunk.split(b"\n")
            if self.buf.shape[0] == 0 and size is not None:  # size the array from the first block's line length
                self._grow(int(size / max(1.0, len(chunk) / len(lines)) * 1.05) + 16)
            self._block(chunk, lines, line)
            line += len(lines)
        return self.buf[: self.n] if self.n * 5 >= self.buf.shape[0] * 4 else self.buf[: self.n].copy()

    def _too_long(self, line: int):
        raise CsvSeriesError(
            f"{self.path}, line {line}: longer than {CSV_MAX_LINE_BYTES} bytes without a line end; "
            "this is not a CSV series (or its line ends are not \\n or \\r\\n)"
        )

    def _full(self) -> bool:
        return self.max_rows is not None and self.n >= self.max_rows

    def _grow(self, need: int) -> None:
        if self.max_rows is not None:
            need = min(need, self.max_rows)
        if need <= self.buf.shape[0]:
            return
        size = max(need, self.buf.shape[0] + self.buf.shape[0] // 2)  # by half at least: the copies stay linear
        if self.max_rows is not None:  # the half added too: never more than max_rows values (a pipe grows to them)
            size = min(size, self.max_rows)
        new = np.empty(size)
        new[: self.n] = self.buf[: self.n]
        self.buf = new

    def _append(self, values: np.ndarray) -> None:
        if self.max_rows is not None:
            values = values[: self.max_rows - self.n]
        self._grow(self.n + values.shape[0])
        self.buf[self.n : self.n + values.shape[0]] = values
        self.n += values.shape[0]

    # ------------------------------------------------------------------ header
    def _header_line(self, fh) -> tuple[bytes, int]:
        """``(raw, line)``: the header row's bytes and its line number.

        A first line ``sep=X`` (the delimiter line that Excel reads, and that tools writing for Excel put first)
        sets the delimiter, and the header row is the line after it.
        """
        raw, line = self._line(fh, 1), 1
        hint = _SEP_LINE.fullmatch(raw)
        if hint is not None:
            sep = hint.group(1).decode("utf-8", errors="replace")
            if sep not in CSV_DELIMITERS:
                raise CsvSeriesError(
                    f"{self.path}, line 1: the delimiter line 'sep={sep}' names {sep!r}; accepted delimiters: "
                    f"{', '.join(map(repr, CSV_DELIMITERS))}"
                )
            if sep == self.decimal:
                raise CsvSeriesError(
                    f"{self.path}, line 1: the delimiter line 'sep={sep}' names the decimal mark (decimal={sep!r}): "
                    "a number's comma would split its cell; read it with decimal='.', or write the file with ';'"
                )
            self.forced_sep = sep
            raw, line = self._line(fh, 2), 2
        self.first_row = fh.readline(CSV_MAX_LINE_BYTES + 1)  # a longer one is refused at its line by read()
        return raw, line

    def _line(self, fh, line: int) -> bytes:
        """The next line of ``fh`` (line number ``line``), refused when longer than :data:`CSV_MAX_LINE_BYTES`."""
        raw = fh.readline(CSV_MAX_LINE_BYTES + 1)
        if len(raw) > CSV_MAX_LINE_BYTES:
            self._too_long(line)
        return raw

    def _header(self, raw: bytes, line: int = 1) -> None:
        path = self.path
        names = self._names(raw, line)
        if self.column not in names:
            self._missing_column(names)
        at = [i for i, nm in enumerate(names) if nm == self.column]
        if len(at) > 1:
            raise CsvSeriesError(
                f"{path}: column {self.column!r} appears {len(at)} times in the header row (fields "
                f"{', '.join(str(i + 1) for i in at)}); which one is meant is unknown: rename the others"
            )
        self.col = at[0]
        self.n_fields = len(names)

    def _names(self, raw: bytes, line: int = 1) -> list[str]:
        """The header row's names (stripped), read from line ``line``; sets the delimiter. CsvSeriesError if the file is not CSV text."""
        path = self.path
        if not raw:
            raise CsvSeriesError(f"{path}: the file is empty (expected a header row naming the columns)"
                                 if line == 1 else f"{path}: no header row after the delimiter line (line 1)")
        for magic, what, fix in _SIGNATURES:
            if raw.startswith(magic):
                raise CsvSeriesError(f"{path}: the file is {what}, not UTF-8 CSV text; {fix}")
        if _BZIP2.match(raw):
            raise CsvSeriesError(f"{path}: the file is bzip2-compressed, not UTF-8 CSV text; decompress it first (bunzip2)")
        try:
            text = raw.decode("utf-8-sig").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise CsvSeriesError(f"{path}, line {line}: the header row is not UTF-8 text ({_byte(raw, exc)})") from None
        if not text.strip():
            raise CsvSeriesError(f"{path}, line {line}: the {'first ' if line == 1 else ''}line is empty (expected a header "
                                 "row naming the columns)")
        if "\r" in text:
            raise CsvSeriesError(
                f"{path}, line {line}: the line ends are \\r alone (classic Mac OS), so the file reads as one line; "
                "accepted: \\n or \\r\\n line ends (convert the file, e.g. tr '\\r' '\\n')"
            )
        # The delimiter is the first of CSV_DELIMITERS that the header holds (outside quotes): ',' by default.
        self.sep = self.forced_sep or self._delimiter(text)
        return [h.strip() for h in self._fields(text, line)]

    def _delimiter(self, header: str) -> str:
        """The delimiter: the first that the header row holds (outside quotes) and that splits the first data row alike.

        Of :data:`CSV_DELIMITERS` that the header row holds, the first that splits the first data row into as many
        fields as the header row; if none does (or there is no data row), the first held; ``','`` if none is held
        (``';'`` with ``decimal=','``).

        So a name holding another delimiter does not choose it: a tab-delimited header row ``date<TAB>Price, USD``
        is split on tabs (its first data row holds no comma), where the first delimiter held, ``','``, split it in two.
        """
        bare = _outside_quotes(header)
        held = [d for d in self.delimiters if d in bare]
        if len(held) > 1:
            row = _outside_quotes(self.first_row.decode("utf-8", errors="replace").rstrip("\r\n"))
            same = [d for d in held if row.count(d) == bare.count(d)]
            if same:
                return same[0]
        return held[0] if held else self.default_sep

    def _missing_column(self, names: list[str]):
        numbers = [nm.replace(",", ".") if self.decimal == "," and "." not in nm else nm for nm in names]
        data_like = all(_NUMBER.fullmatch(nm) or re.fullmatch(r"[0-9][0-9:/. T+-]*", nm) for nm in numbers)
        same = [nm for nm in names if nm.casefold() == self.column.strip().casefold()]  # ' ot' for 'OT'
        hint = same[:1] or difflib.get_close_matches(self.column, names, n=1)
        commented = [nm for nm in names if nm.startswith("#") and nm.lstrip("#").strip() == self.column.strip()]
        if commented:  # numpy.savetxt writes its header as a comment: '# v', or '# a,b' (that is not a delimiter line)
            hint = (f" (did you mean {commented[0]!r}? the header row starts with '#', a comment marker as numpy.savetxt "
                    f"writes it: ask for column {commented[0]!r}, or write the file without it, savetxt(..., comments=''))")
        elif self.decimal == "," and not self.forced_sep and any(
                self.column.strip() == part.strip() for nm in names for part in nm.split(",")):
            # 'date,value': a comma-delimited file read with decimal=',' (its comma is then never the delimiter)
            hint = ("; with decimal=',' the delimiter is tab, ';' or '|', never ',', and this header row is delimited by "
                    "commas: read the file with decimal='.' (memoa run without --decimal), or write it with ';'")
        elif len(names) == 1 and self.column.strip() in names[0].split():  # 'year value': spaces are not a delimiter
            hint = (f"; the header row holds none of the delimiters {', '.join(map(repr, self.delimiters))}: a file "
                    f"delimited by spaces is not read (convert it, e.g. tr -s ' ' '{self.default_sep}')")
        elif hint:
            hint = f" (did you mean {hint[0]!r}?)"
        elif re.fullmatch(r"[0-9]+", self.column.strip()) and not data_like:  # a position, not a name
            k = int(self.column)
            at = f": field {k} is {names[k - 1]!r}" if 1 <= k <= len(names) else ""
            hint = f" (a column is chosen by its name in the header row, not by its position{at})"
        raise CsvSeriesError(
            f"{self.path}: no column {self.column!r} in the header row; the columns are {column_list(names)}"
            + (hint or "")
            + ("; the first line looks like data, not a header row: the file needs a first line naming the columns"
               if data_like else "")
        )

    def _fields(self, text: str, line: int) -> list[str]:
        if '"' not in text:
            return text.split(self.sep)
        try:
            return next(csv.reader([text], strict=True, delimiter=self.sep, skipinitialspace=True))
        except csv.Error as exc:
            what = "a quoted field is not closed on this line" if "end of data" in str(exc) else f"malformed quoting ({exc})"
            raise CsvSeriesError(
                f"{self.path}, line {line}: {what}; quoted fields must open and close on one line"
            ) from None
        except StopIteration:  # pragma: no cover - a non-empty line always gives a row
            return [""]

    # ------------------------------------------------------------------ data
    def _block(self, chunk: bytes, lines: list[bytes], first_line: int) -> None:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = first_line + chunk.count(b"\n", 0, exc.start)
            self._slow(lines[: line - first_line], first_line)  # any earlier problem is reported first
            if self._full():
                return
            raise CsvSeriesError(
                f"{self.path}, line {line}: not UTF-8 text ({_byte(chunk, exc)}); save the file as UTF-8"
            ) from None
        sep = self.sep.encode()
        # Fast path only where every line has the header's field count (counted line by line, in C).
        if self.blank_at is None and b'"' not in chunk and b"_" not in chunk and self._uniform_fields(chunk, len(lines)):
            try:
                if self.n_fields == 1:
                    cells = lines
                else:
                    col = self.col
                    cells = [ln.split(sep, col + 1)[col] for ln in lines]
                if self.decimal == ",":  # a cell holding a point is left to the strict checks (they refuse it)
                    cells = [c.replace(b",", b".") if b"." not in c else b"x" for c in cells]
                values = np.fromiter(map(float, cells), dtype=np.float64, count=len(cells))
            except (ValueError, IndexError):
                values = None
            if values is not None and np.isfinite(values).all():
                self._append(values)
                # Blank lines that ended the last block lie inside the data (missing='drop'): count them now, as _slow
                # does at the row that follows them (this block's first line is one)
                self.n_dropped += self.blank_run
                self.blank_run = 0
                return
        self._slow(lines, first_line)

    def _uniform_fields(self, chunk: bytes, n_lines: int) -> bool:
        """Whether every one of the block's ``n_lines`` lines holds exactly ``n_fields - 1`` delimiters.

        Counted per line, not over the block: a row with one field too many and another with one too few
        balance in a block total, and the fast path would then read a shifted column from the first.
        """
        want = self.n_fields - 1
        if want == 0:
            return self.sep.encode() not in chunk
        data = np.frombuffer(chunk, dtype=np.uint8)
        at = np.flatnonzero(data == ord(self.sep))
        if at.shape[0] != n_lines * want:
            return False
        # With n_lines * want delimiters in all, every line holds exactly want of them iff the want delimiters
        # that would be line i's (numbers i * want .. i * want + want - 1, in order) lie inside line i.
        at = at.reshape(n_lines, want)
        ends = np.append(np.flatnonzero(data == 10), len(chunk))  # where each line ends (the last at the block's end)
        return bool((at[1:, 0] > ends[:-1]).all() and (at[:, -1] < ends).all())

    def _slow(self, lines: list[bytes], first_line: int) -> None:
        """Line by line, with the strict checks; raises at the first bad line.

        Each cell is stripped at most once: the column's cell (and lowered once) up front, the others only
        while telling a blank line (every cell empty) from a row with an empty cell.
        """
        path, column, col = self.path, self.column, self.col
        out = []
        for k, raw in enumerate(lines):
            if self.max_rows is not None and self.n + len(out) >= self.max_rows:
                break
            line = first_line + k
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            row = self._fields(text, line)
            cell = row[col].strip() if col < len(row) else ""  # a missing cell reads as an empty one
            folded = cell.lower()
            if not cell and not any(other.strip() for i, other in enumerate(row) if i != col):
                if self.drop_missing:  # a blank line is a row to drop (counted once a row follows it)
                    self.blank_run += 1
                elif self.blank_at is None:
                    self.blank_at = line
                continue
            if self.blank_at is not None:
                raise CsvSeriesError(
                    f"{path}, line {self.blank_at}, column {column!r}: empty line inside the data (a gap in the series); "
                    "remove it or fill in the missing row"
                )
            if self.blank_run:  # blank lines inside the data, dropped (blank lines at the end are not rows)
                self.n_dropped += self.blank_run
                self.blank_run = 0
            where = f"{path}, line {line} (data row {self.n + len(out) + 1}), column {column!r}"
            # A row of another field count is refused in both modes (missing='drop' drops gaps, not malformed rows).
            if col >= len(row) and not self.drop_missing:
                raise CsvSeriesError(
                    f"{where}: missing cell (the row has {len(row)} fields, the header {self.n_fields}); "
                    "the series has a gap there"
                )
            if len(row) != self.n_fields:
                trailing = ("; the row ends with the delimiter and the header row does not: end both alike"
                            if len(row) == self.n_fields + 1 and not row[-1].strip() else "")
                raise CsvSeriesError(
                    f"{path}, line {line} (data row {self.n + len(out) + 1}): {len(row)} fields, the header row has "
                    f"{self.n_fields} (delimiter {self.sep!r}); the columns cannot be matched: a field is missing, or a "
                    f"field holds the delimiter without quotes (quote it){trailing}"
                )
            spreadsheet_error = folded[:1] in ("#", "e") and _SPREADSHEET_ERROR.fullmatch(folded) is not None
            if self.drop_missing and (not cell or folded in MISSING_MARKERS or spreadsheet_error):
                self.n_dropped += 1
                continue
            if not cell:
                raise CsvSeriesError(
                    f"{where}: empty cell (a gap in the series); fill it, or drop such rows with missing='drop' "
                    "(memoa run --missing drop)"
                )
            if folded in MISSING_MARKERS:
                raise CsvSeriesError(
                    f"{where}: {_short(cell)} marks a missing value (a gap in the series); fill it, or drop such rows "
                    "with missing='drop' (memoa run --missing drop)"
                )
            if spreadsheet_error:
                raise CsvSeriesError(
                    f"{where}: {_short(cell)} is a spreadsheet's error value (its formula gave no number: a gap in the "
                    "series); fix the formula, or drop such rows with missing='drop' (memoa run --missing drop)"
                )
            if folded in _NON_FINITE:
                raise CsvSeriesError(
                    f"{where}: {_short(cell)} is not a finite number (treat it as a gap: fill it or drop the row)"
                )
            if self.decimal == ",":
                number = cell.replace(",", ".") if "." not in cell else ""
                if not _NUMBER.fullmatch(number):
                    raise CsvSeriesError(
                        f"{where}: {_short(cell)} is not a number with a decimal comma (decimal=','; a plain decimal such "
                        "as 12,5 or -3e-4 is expected; no point, no digit separators, no hexadecimal)"
                    )
            elif not _NUMBER.fullmatch(number := cell):
                comma = (" (a decimal comma? write 12.5, not 12,5, or read it with decimal=',', memoa run --decimal ,)"
                         if _DECIMAL_COMMA.fullmatch(cell) else "")
                raise CsvSeriesError(
                    f"{where}: {_short(cell)} is not a number{comma} (a plain decimal such as 12.5 or -3e-4 is expected; "
                    "no digit separators, no hexadecimal)"
                )
            v = float(number)
            if not math.isfinite(v):
                raise CsvSeriesError(f"{where}: {_short(cell)} is too large for a float64 (it overflows to infinity)")
            out.append(v)
        if out:
            self._append(np.asarray(out, dtype=np.float64))

    def refuse_scale(self, i: int, raw: float, z: float, mean: float, std: float, limit: float):
        far = f"{z:.3g}" if math.isfinite(z) else "more than 1e308"
        raise CsvSeriesError(
            f"{self.path}, line {i + 2} (data row {i + 1}), column {self.column!r}: {raw:g} is {far} warm-up standard "
            f"deviations from the warm-up mean (mean {mean:g}, std {std:g}); a z-scored value must stay within "
            f"+-{limit:g}. Check that cell, or fit the z-score on a longer warm-up"
        )


def _outside_quotes(text: str) -> str:
    """``text`` without its quoted fields (what lies between two double quotes)."""
    return re.sub(r'"[^"]*"', "", text)


def _byte(data: bytes, exc: UnicodeDecodeError) -> str:
    start = data.rfind(b"\n", 0, exc.start) + 1
    return f"byte 0x{data[exc.start]:02x} at character {exc.start - start + 1} of the line"
