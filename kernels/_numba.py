"""Numba kernels: the default backend.

Each reduction runs over fixed chunks of ``CHUNK`` agents, one partial row
per chunk in ``work`` (see :func:`memoa_fast.kernels.work_shape`), merged
serially in chunk order: the same input gives bitwise the same result
whatever the thread count. Serial and ``prange`` drivers share one chunk
function, so they agree bitwise too.

The public functions take ``threads``: 1 runs the serial driver, more runs
the parallel one under ``numba.set_num_threads(threads)``, restored after.
"""
import math

import numba
import numpy as np
from numba import njit, prange

from ._config import CACHE, CHUNK, FASTMATH, PAD

RULE_EG, RULE_HEDGE = 0, 1

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)


@njit(**_jit)
def _padded(d):
    return -(-d // PAD) * PAD


# --------------------------------------------------------------------------- mean field
@njit(**_jit)
def _mean_field_chunk(x, s, J, work, c):
    n, d = x.shape
    dp = _padded(d)
    row = work[c]
    for j in range(row.shape[0]):
        row[j] = 0.0
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    count = 0
    jmax = -np.inf
    jarg = -1
    for i in range(lo, hi):
        finite = True
        for j in range(d):
            if not math.isfinite(s[i, j]):
                finite = False
        for j in range(d):
            row[j] += x[i, j]
        if finite:
            count += 1
            for j in range(d):
                row[dp + j] += s[i, j]
        if J[i] > jmax:
            jmax = J[i]
            jarg = i
    row[2 * dp] = count
    row[2 * dp + 1] = jmax
    row[2 * dp + 2] = jarg


@njit(**_jit)
def _mean_field_merge(work, n, d, out_mean_x, out_mean_s):
    dp = _padded(d)
    n_chunks = work.shape[0]
    count = 0.0
    jmax = -np.inf
    jarg = -1.0
    for j in range(d):
        out_mean_x[j] = 0.0
    for c in range(n_chunks):
        for j in range(d):
            out_mean_x[j] += work[c, j]
        count += work[c, 2 * dp]
        if work[c, 2 * dp + 1] > jmax:
            jmax = work[c, 2 * dp + 1]
            jarg = work[c, 2 * dp + 2]
    for j in range(d):
        out_mean_x[j] /= n
    if count > 0:
        for j in range(d):
            total = 0.0
            for c in range(n_chunks):
                total += work[c, dp + j]
            out_mean_s[j] = total / count
    return int(count), jmax, int(jarg)


@njit(**_jit)
def _mean_field_serial(x, s, J, work, out_mean_x, out_mean_s):
    for c in range(work.shape[0]):
        _mean_field_chunk(x, s, J, work, c)
    return _mean_field_merge(work, x.shape[0], x.shape[1], out_mean_x, out_mean_s)


@njit(parallel=True, **_jit)
def _mean_field_parallel(x, s, J, work, out_mean_x, out_mean_s):
    for c in prange(work.shape[0]):
        _mean_field_chunk(x, s, J, work, c)
    return _mean_field_merge(work, x.shape[0], x.shape[1], out_mean_x, out_mean_s)


# --------------------------------------------------------------------------- policy
@njit(**_jit)
def _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c):
    n, d = x.shape
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    for i in range(lo, hi):
        finite = True
        for j in range(d):
            if not math.isfinite(s[i, j]):
                finite = False
        cost = 0.0
        if finite:
            for j in range(d):
                xi = x[i, j]
                si = s[i, j]
                u = -gain * (xi - c_signal * si - c_signal_mean * mean_s[j] - c_state_mean * mean_x[j])
                e_s = xi - si
                e_m = xi - mean_x[j]
                cost += q * e_s * e_s + kappa * e_m * e_m + r * u * u
                x[i, j] = xi + u
        else:
            for j in range(d):
                e_m = x[i, j] - mean_x[j]
                cost += kappa * e_m * e_m
        J[i] += half_discount * cost


@njit(**_jit)
def _policy_serial(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount):
    for c in range((x.shape[0] + CHUNK - 1) // CHUNK):
        _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c)


@njit(parallel=True, **_jit)
def _policy_parallel(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount):
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c)


# --------------------------------------------------------------------------- server
@njit(**_jit)
def _predict_chunk(log_p, x, work, c):
    n, d = x.shape
    row = work[c]
    for j in range(d):
        row[j] = 0.0
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    for i in range(lo, hi):
        p = math.exp(log_p[i])
        for j in range(d):
            row[j] += p * x[i, j]


@njit(**_jit)
def _predict_merge(work, d, out):
    for j in range(d):
        total = 0.0
        for c in range(work.shape[0]):
            total += work[c, j]
        out[j] = total


@njit(**_jit)
def _predict_serial(log_p, x, work, out):
    for c in range(work.shape[0]):
        _predict_chunk(log_p, x, work, c)
    _predict_merge(work, x.shape[1], out)


@njit(parallel=True, **_jit)
def _predict_parallel(log_p, x, work, out):
    for c in prange(work.shape[0]):
        _predict_chunk(log_p, x, work, c)
    _predict_merge(work, x.shape[1], out)


@njit(**_jit)
def _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c):
    """Gradient step on the log-weights of one chunk and its online log-sum-exp."""
    n, d = x.shape
    col = 2 * _padded(d)
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    top = -np.inf
    scaled = 0.0
    for i in range(lo, hi):
        loss = 0.0
        if rule == RULE_EG:
            for j in range(d):
                loss += (yhat[j] - y[j]) * x[i, j]
            loss *= 2.0
        else:
            for j in range(d):
                e = x[i, j] - y[j]
                loss += e * e
        v = log_p[i] - eta * loss
        log_p[i] = v
        if v > top:
            scaled = scaled * math.exp(top - v) + 1.0
            top = v
        else:
            scaled += math.exp(v - top)
    work[c, col + 1] = top
    work[c, col + 2] = scaled


@njit(**_jit)
def _log_sum_exp_merge(work, d):
    col = 2 * _padded(d)
    top = -np.inf
    for c in range(work.shape[0]):
        top = max(top, work[c, col + 1])
    total = 0.0
    for c in range(work.shape[0]):
        total += work[c, col + 2] * math.exp(work[c, col + 1] - top)
    return top + math.log(total)


@njit(**_jit)
def _share_chunk(log_p, lse, alpha, c):
    """Normalise and mix with the uniform law: ``p <- (1-alpha) p + alpha/N``."""
    n = log_p.shape[0]
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    if alpha == 0.0:
        for i in range(lo, hi):
            log_p[i] -= lse
    elif alpha == 1.0:
        for i in range(lo, hi):
            log_p[i] = -math.log(n)
    else:
        keep = math.log1p(-alpha)
        spread = math.log(alpha / n)
        for i in range(lo, hi):
            a = keep + log_p[i] - lse
            top = max(a, spread)
            log_p[i] = top + math.log1p(math.exp(-abs(a - spread)))


@njit(**_jit)
def _update_serial(log_p, x, y, yhat, rule, eta, alpha, work):
    for c in range(work.shape[0]):
        _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c)
    lse = _log_sum_exp_merge(work, x.shape[1])
    for c in range(work.shape[0]):
        _share_chunk(log_p, lse, alpha, c)


@njit(parallel=True, **_jit)
def _update_parallel(log_p, x, y, yhat, rule, eta, alpha, work):
    for c in prange(work.shape[0]):
        _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c)
    lse = _log_sum_exp_merge(work, x.shape[1])
    for c in prange(work.shape[0]):
        _share_chunk(log_p, lse, alpha, c)


# --------------------------------------------------------------------------- dispatch
class _Threads:
    """Run a parallel kernel on exactly ``threads`` threads, restoring the global setting."""

    __slots__ = ("threads", "previous")

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        self.previous = numba.get_num_threads()
        if self.previous != self.threads:
            numba.set_num_threads(self.threads)

    def __exit__(self, *exc):
        if self.previous != self.threads:
            numba.set_num_threads(self.previous)


def max_threads():
    return numba.config.NUMBA_NUM_THREADS


def mean_field(x, s, J, work, out_mean_x, out_mean_s, threads):
    if threads == 1:
        return _mean_field_serial(x, s, J, work, out_mean_x, out_mean_s)
    with _Threads(threads):
        return _mean_field_parallel(x, s, J, work, out_mean_x, out_mean_s)


def policy_update(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, discount, threads):
    if threads == 1:
        return _policy_serial(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, 0.5 * discount)
    with _Threads(threads):
        return _policy_parallel(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, 0.5 * discount)


def mixture_predict(log_p, x, work, out, threads):
    if threads == 1:
        return _predict_serial(log_p, x, work, out)
    with _Threads(threads):
        return _predict_parallel(log_p, x, work, out)


def mixture_update(log_p, x, y, yhat, rule, eta, alpha, work, threads):
    if threads == 1:
        return _update_serial(log_p, x, y, yhat, rule, eta, alpha, work)
    with _Threads(threads):
        return _update_parallel(log_p, x, y, yhat, rule, eta, alpha, work)
