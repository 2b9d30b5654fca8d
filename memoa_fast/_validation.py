"""Input checks shared by the public layer.

Every error names the argument, shows the value it got and says what is
accepted, so that the caller can fix the input without reading the source.
"""
from __future__ import annotations

import numbers
import os

import numpy as np

BACKENDS = ("numba", "cython", "numpy")


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """Return ``value`` as a float after checking it is a finite real in the given range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = ("(" if low_open or low is None else "[") + f"{left}, {right}" + (")" if high_open or high is None else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_int(name: str, value, *, low: int = 1) -> int:
    """Return ``value`` as an int after checking it is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {low}, got {value!r} of type {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_backend(backend) -> str:
    return check_choice("backend", backend, BACKENDS)


def check_threads(threads) -> int:
    """``None`` means every core Numba sees; otherwise an int in [1, os.cpu_count()]."""
    n_cpu = os.cpu_count() or 1
    if threads is None:
        return n_cpu
    threads = check_int("threads", threads, low=1)
    if threads > n_cpu:
        raise ValueError(f"threads must be in [1, {n_cpu}] (the cores this machine has), got {threads}")
    return threads


def as_float_array(name: str, value, shape: tuple[int, ...], *, allow_nonfinite: bool = False) -> np.ndarray:
    """Return ``value`` as a C-contiguous float64 array of exactly ``shape``.

    No copy is made when ``value`` already is one; ``(N,)`` is accepted for
    ``(N, 1)`` so scalar streams need no reshaping.
    """
    if isinstance(value, np.ndarray) and value.dtype == np.float64 and value.flags.c_contiguous:
        arr = value
    else:
        try:
            arr = np.ascontiguousarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            kind = getattr(value, "dtype", type(value).__name__)
            raise TypeError(f"{name} must be an array of real numbers, got {kind}: {exc}") from None
    if arr.shape != shape:
        if len(shape) == 2 and shape[1] == 1 and arr.shape == shape[:1]:
            arr = arr.reshape(shape)
        elif len(shape) == 1 and shape == (1,) and arr.ndim == 0:
            arr = arr.reshape(shape)
        else:
            raise ValueError(f"{name} must have shape {shape} (ndim {len(shape)}), got shape {arr.shape} (ndim {arr.ndim})")
    # The sum is finite when every entry is (bar overflow, checked exactly
    # below): one pass and no N-sized mask in the common case.
    if not allow_nonfinite and not np.isfinite(np.add.reduce(arr, axis=None)) and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite; first non-finite entry at index {tuple(int(b) for b in bad)}: {arr[tuple(bad)]!r}")
    return arr
