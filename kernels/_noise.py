"""Counter-based noise for worker-side signal sources (Numba).

Every draw is a function of ``(seed, agent, round, coordinate)`` alone, through
SplitMix64's finaliser, so any slice of agents ``[lo, hi)`` reproduces that
slice of the whole population's draws exactly, whatever the sharding or the
thread count. Used by :class:`memoa_fast.distributed.NoisyLastValueSignals`.
"""
import math

import numpy as np
from numba import njit, prange

from ._config import CACHE, FASTMATH
from ._seal import seal
from ._threads import Threads

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0


@njit(**_jit)
def _mix64(z):
    """SplitMix64's finaliser: a bijective hash of a 64-bit word."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(**_jit)
def _seed_keys(seed):
    """Two independent 64-bit keys from a seed (wrapping arithmetic, in Numba)."""
    key = _mix64(np.uint64(seed))
    return key, _mix64(key + _GOLDEN)


@njit(**_jit)
def _unit(h):
    """A uniform in [0, 1) from the top 53 bits of ``h``."""
    return np.float64(h >> _S11) * _TWO_M53


@njit(**_jit)
def _log_uniform_scales(lo, hi, key, log_low, log_high, out):
    """``out[i - lo]`` log-uniform in ``[exp(log_low), exp(log_high)]`` from the hash of ``(key, i)``."""
    key = np.uint64(key)  # a key below 2**63 arrives as int64, and int64 ^ uint64 would be float64
    for i in range(lo, hi):
        u = _unit(_mix64(key + _GOLDEN * np.uint64(i + 1)))
        out[i - lo] = math.exp(log_low + u * (log_high - log_low))


@njit(**_jit)
def _noisy_row(r, lo, kt, y, sigma, out):
    """``out[r, j] = y[j] + sigma[r] * z(key, lo + r, t, j)``, a counter-based Box-Muller normal ``z``."""
    d = out.shape[1]
    i = lo + r
    for j in range(d):
        h = _mix64(kt + _GOLDEN * np.uint64(i * d + j + 1))
        u1 = 1.0 - _unit(h)  # in (0, 1]
        u2 = _unit(_mix64(h + _GOLDEN))
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        out[r, j] = y[j] + sigma[r] * z


@njit(**_jit)
def _noisy_last_value(lo, key, t, y, sigma, out):
    """Every row of ``out``: ``y + sigma_r z(key, lo + r, t, j)`` (one thread)."""
    key = np.uint64(key)  # a key below 2**63 arrives as int64, and int64 ^ uint64 would be float64
    kt = _mix64(key ^ (_GOLDEN * np.uint64(t + 1)))
    for r in range(out.shape[0]):
        _noisy_row(r, lo, kt, y, sigma, out)


@njit(parallel=True, **_jit)
def _noisy_last_value_parallel(lo, key, t, y, sigma, out):
    """:func:`_noisy_last_value` with the rows spread over the threads (the same draws)."""
    key = np.uint64(key)
    kt = _mix64(key ^ (_GOLDEN * np.uint64(t + 1)))
    for r in prange(out.shape[0]):
        _noisy_row(np.int64(r), lo, kt, y, sigma, out)


def seed_keys(seed):
    """Two independent 64-bit keys ``(noise, scales)`` from a seed in ``[0, 2**63)``."""
    key, scale_key = _seed_keys(seed)
    return np.uint64(key), np.uint64(scale_key)


def log_uniform_scales(lo, hi, key, log_low, log_high, out):
    """``out[i - lo] = exp(log_low + u_i (log_high - log_low))`` for agents ``[lo, hi)``, ``u_i`` uniform from ``key``."""
    _log_uniform_scales(lo, hi, np.uint64(key), log_low, log_high, out)


def noisy_last_value(lo, key, t, y, sigma, out, threads):
    """``out[r, j] = y[j] + sigma[r] z(key, lo + r, t, j)`` for every row ``r`` of ``out`` (written in place).

    ``z`` is a standard normal from a counter-based Box-Muller transform of
    the hashed ``(key, agent, round, coordinate)``.
    """
    if threads == 1:
        _noisy_last_value(lo, key, t, y, sigma, out)
    else:
        with Threads(threads):
            _noisy_last_value_parallel(lo, key, t, y, sigma, out)


# Numba's cache of this module also checks the files it takes values from (kernels/_seal.py).
seal(globals())
