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
import math
import os
from pathlib import Path

import numpy as np

from ._validation import check_int, check_real

SYNTHETIC_STREAMS = ("logistic", "periodic", "concept", "concept-drift")


# --------------------------------------------------------------------------- synthetic
def logistic_map(n_steps: int, *, seed: int = 0, r: float = 3.8, transient: int = 200, normalize: bool = True) -> np.ndarray:
    """The logistic map in its chaotic range.

    .. math:: x(t+1) = r\\, x(t) (1 - x(t)), \\qquad x(0) \\sim U(0.1, 0.9) \\text{ (seeded)}

    The first ``transient`` iterates are discarded. ``r`` must be in
    ``[3.57, 4)`` (chaotic, and the orbit stays in (0, 1)).
    """
    n_steps, seed = _check_length_seed(n_steps, seed)
    r = check_real("r", r, low=3.57, high=4.0, high_open=True)
    transient = check_int("transient", transient, low=0)
    x = np.random.default_rng(seed).uniform(0.1, 0.9)
    out = np.empty(n_steps)
    for _ in range(transient):
        x = r * x * (1.0 - x)
    for t in range(n_steps):
        out[t] = x
        x = r * x * (1.0 - x)
    return zscore(out) if normalize else out


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
    n_steps, seed = _check_length_seed(n_steps, seed)
    if len(periods) != len(amplitudes) or not periods:
        raise ValueError(f"periods and amplitudes must be non-empty and of equal length, got {periods!r}, {amplitudes!r}")
    noise = check_real("noise", noise, low=0.0)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=len(periods))
    t = np.arange(n_steps, dtype=np.float64)
    y = np.zeros(n_steps)
    for P, a, phi in zip(periods, amplitudes, phases):
        y += a * np.sin(2.0 * math.pi * t / check_real("period", P, low=0.0, low_open=True) + phi)
    y += noise * rng.standard_normal(n_steps)
    return zscore(y) if normalize else y


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
    n_steps, seed = _check_length_seed(n_steps, seed)
    radius = check_real("radius", radius, low=0.0, high=1.0, high_open=True)
    drift_period = check_real("drift_period", drift_period, low=0.0, low_open=True)
    noise = check_real("noise", noise, low=0.0, low_open=True)
    w0, w1 = (check_real("angle", a, low=0.0, high=math.pi) for a in angles)
    rng = np.random.default_rng(seed)
    psi = rng.uniform(0.0, 2.0 * math.pi)
    t = np.arange(n_steps, dtype=np.float64)
    omega = w0 + (w1 - w0) * 0.5 * (1.0 - np.cos(2.0 * math.pi * t / drift_period + psi))
    eps = noise * rng.standard_normal(n_steps)
    return _ar2(2.0 * radius * np.cos(omega), np.full(n_steps, -radius * radius), np.zeros(n_steps), eps, normalize)


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

    Regime lengths are uniform on ``segment``; each regime draws a pole
    radius in ``radius``, an angle in ``angles`` and a level in
    ``[-level, level]`` (all seeded); the process keeps its deviation from
    the level across a switch, so the level jumps.
    """
    n_steps, seed = _check_length_seed(n_steps, seed)
    lo, hi = (check_int("segment", s, low=1) for s in segment)
    noise = check_real("noise", noise, low=0.0, low_open=True)
    level = check_real("level", level, low=0.0)
    rng = np.random.default_rng(seed)
    phi1 = np.empty(n_steps)
    phi2 = np.empty(n_steps)
    mean = np.empty(n_steps)
    start = 0
    while start < n_steps:
        stop = min(n_steps, start + int(rng.integers(lo, max(lo, hi) + 1)))
        rho = rng.uniform(*radius)
        omega = rng.uniform(*angles)
        phi1[start:stop] = 2.0 * rho * math.cos(omega)
        phi2[start:stop] = -rho * rho
        mean[start:stop] = rng.uniform(-level, level)
        start = stop
    eps = noise * rng.standard_normal(n_steps)
    return _ar2(phi1, phi2, mean, eps, normalize)


def _ar2(phi1, phi2, mean, eps, normalize):
    n = eps.shape[0]
    dev = np.zeros(n)
    a, b = 0.0, 0.0  # deviations at t-1, t-2
    for t in range(n):
        v = phi1[t] * a + phi2[t] * b + eps[t]
        dev[t] = v
        a, b = v, a
    y = mean + dev
    return zscore(y) if normalize else y


_GENERATORS = {"logistic": logistic_map, "periodic": periodic, "concept": concept, "concept-drift": concept_drift}


def make_stream(name: str, n_steps: int, *, seed: int = 0, **params) -> np.ndarray:
    """A seeded synthetic stream by name, z-scored, shape (n_steps,).

    Parameters
    ----------
    name : {"logistic", "periodic", "concept", "concept-drift"}
    n_steps : int
        Length of the series, ``>= 2``.
    seed : int
        Same seed, same series (bitwise).
    **params
        Passed on to the generator (:func:`logistic_map`, :func:`periodic`,
        :func:`concept`, :func:`concept_drift`).
    """
    if name not in _GENERATORS:
        raise ValueError(f"stream must be one of {', '.join(map(repr, SYNTHETIC_STREAMS))}; got {name!r}")
    return _GENERATORS[name](n_steps, seed=seed, **params)


def zscore(values: np.ndarray, fit: slice | None = None) -> np.ndarray:
    """``(values - mean) / std`` with mean and std taken over ``values[fit]`` (all by default)."""
    ref = values if fit is None else values[fit]
    std = float(ref.std())
    if not std > 0.0:
        raise ValueError("cannot z-score a constant series (standard deviation 0)")
    return (values - float(ref.mean())) / std


def _check_length_seed(n_steps, seed):
    return check_int("n_steps", n_steps, low=2), check_int("seed", seed, low=0)


# --------------------------------------------------------------------------- CSV
class CsvSeriesError(ValueError):
    """A CSV file cannot give a clean numeric series; the message names file, line and column."""


def load_csv_series(
    path: str | os.PathLike,
    column: str,
    *,
    warmup: int = 500,
    max_rows: int | None = None,
    return_scaling: bool = False,
):
    """One numeric column of a CSV file with a header row, z-scored on a warm-up prefix.

    .. math:: y(t) = (v(t) - \\mu_W) / \\sigma_W, \\qquad
        \\mu_W, \\sigma_W = \\text{mean, std of } v(0), \\dots, v(W-1)

    Only the first ``W = warmup`` values are used to fit the scaling, so no
    statistic of the future leaks into the stream. Works on the ETT files
    (``OT``), on ``exchange_rate.csv`` (``CAD``) and on any comma-separated
    file with one header row (a UTF-8 byte-order mark, quoted fields and
    CRLF line ends are fine).

    Parameters
    ----------
    path : path-like
        The CSV file.
    column : str
        Header name of the column (exact, case-sensitive).
    warmup : int, default 500
        Rows the z-score is fitted on, ``>= 2``.
    max_rows : int, optional
        Read only the first ``max_rows`` data rows.
    return_scaling : bool, default False
        Also return ``(mean, std)`` of the warm-up prefix.

    Returns
    -------
    numpy.ndarray, shape (n_rows,)
        (or ``(values, mean, std)`` with ``return_scaling``)

    Raises
    ------
    FileNotFoundError
        No such file.
    CsvSeriesError (a ValueError)
        Empty file, no such column (the message lists the columns), a cell
        that is empty or missing (a gap), not a number or not finite (the
        message gives the line number in the file and the column), fewer
        than ``warmup + 2`` data rows, or a constant warm-up prefix.
    """
    path = Path(path)
    warmup = check_int("warmup", warmup, low=2)
    if max_rows is not None:
        max_rows = check_int("max_rows", max_rows, low=1)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {str(path)!r}" + (" (it is a directory)" if path.is_dir() else ""))
    values = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise CsvSeriesError(f"{path}: the file is empty (expected a header row naming the columns)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CsvSeriesError(f"{path}, line 1: cannot read the header row as CSV text: {exc}") from None
        names = [h.strip() for h in header]
        if column not in names:
            hint = difflib.get_close_matches(column, names, n=1)
            raise CsvSeriesError(
                f"{path}: no column {column!r} in the header row; the columns are {', '.join(map(repr, names))}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        col = names.index(column)
        blank_at = None
        try:
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    blank_at = blank_at or reader.line_num
                    continue
                line = reader.line_num
                if blank_at is not None:
                    raise CsvSeriesError(
                        f"{path}, line {blank_at}, column {column!r}: empty line inside the data (a gap in the series); "
                        "remove it or fill in the missing row"
                    )
                where = f"{path}, line {line} (data row {len(values) + 1}), column {column!r}"
                if col >= len(row):
                    raise CsvSeriesError(
                        f"{where}: missing cell (the row has {len(row)} fields, the header {len(names)}); "
                        "the series has a gap there"
                    )
                cell = row[col].strip()
                if not cell:
                    raise CsvSeriesError(f"{where}: empty cell (a gap in the series); fill it or drop the row")
                try:
                    v = float(cell)
                except ValueError:
                    raise CsvSeriesError(f"{where}: {cell!r} is not a number") from None
                if not math.isfinite(v):
                    raise CsvSeriesError(f"{where}: {cell!r} is not a finite number (treat it as a gap: fill it or drop the row)")
                values.append(v)
                if max_rows is not None and len(values) >= max_rows:
                    break
        except csv.Error as exc:
            raise CsvSeriesError(f"{path}, line {reader.line_num}: malformed CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise CsvSeriesError(f"{path}: not UTF-8 text near data row {len(values) + 1}: {exc}") from None
    need = warmup + 2
    if len(values) < need:
        raise CsvSeriesError(
            f"{path}, column {column!r}: {len(values)} data rows, too few: need at least {need} "
            f"(a warm-up of {warmup} rows to fit the z-score, then at least 2 to forecast); "
            "use a longer file or a shorter warm-up"
        )
    arr = np.asarray(values, dtype=np.float64)
    head = arr[:warmup]
    mean, std = float(head.mean()), float(head.std())
    if not std > 0.0:
        raise CsvSeriesError(
            f"{path}, column {column!r}: constant over the first {warmup} rows of the warm-up (value {head[0]!r}); "
            "the z-score needs spread, use a longer warm-up"
        )
    out = (arr - mean) / std
    return (out, mean, std) if return_scaling else out
