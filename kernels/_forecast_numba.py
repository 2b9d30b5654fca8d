"""Numba kernels of the time-series pipeline: client forecasters and scoring.

Two hot loops of ``memoa run`` besides the core's three:

- :func:`forecast_step`: every client's noisy observation, normalised-LMS
  update and next forecast (MODEL.md section 6), in place;
- :func:`score_step`: the uniform mean of the published forecasts, every
  client's squared error against the target (accumulated in place) and the
  largest accumulated total.

Same conventions as :mod:`memoa_fast.kernels._numba`: the kernels trust their
inputs (C-contiguous float64, shapes checked by :mod:`memoa_fast.forecasters`
and :mod:`memoa_fast.experiment`); work runs over fixed chunks of ``CHUNK``
clients; ``threads == 1`` runs the serial driver, more runs the ``prange``
driver on exactly that many threads (the global Numba setting is restored).
Both drivers call the same chunk function, so they agree bitwise, and the one
reduction (:func:`score_step`) merges per-chunk partials serially in chunk
order, so its result does not depend on the thread count either. Randomness
never enters a kernel: the caller passes standard normal draws in.

The NumPy reference of each kernel is in :mod:`._forecast_reference`.
"""
import numpy as np
from numba import njit, prange

from ._config import CACHE, CHUNK, FASTMATH, PAD, SQUARE_CAP
from ._seal import seal
from ._threads import Threads as _Threads

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)


# --------------------------------------------------------------------------- forecasters
@njit(**_jit)
def _forecast_chunk(y, eps, sigma, weights, lags, out, mu, update, c):
    """One chunk of :func:`forecast_step`: the p = 2 fast path or the general one (writes ``weights``, ``lags``, ``out``)."""
    n = weights.shape[0]
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    if lags.shape[2] == 2:
        _forecast_rows_p2(y, eps, sigma, weights, lags, out, mu, update, lo, hi)
    else:
        _forecast_rows(y, eps, sigma, weights, lags, out, mu, update, lo, hi)


@njit(**_jit)
def _forecast_rows_p2(y, eps, sigma, weights, lags, out, mu, update, lo, hi):
    """``p = 2`` written out (the default): about 3x faster than the general loop."""
    d = weights.shape[1]
    for i in range(lo, hi):
        scale = sigma[i]
        for j in range(d):
            z = y[j] + scale * eps[i, j]
            a = lags[i, j, 0]
            b = lags[i, j, 1]
            a2 = a * a
            b2 = b * b
            qa = min(a2, SQUARE_CAP)  # the capped squares (the plain ones within 8: same bits)
            qb = min(b2, SQUARE_CAP)
            w0 = weights[i, j, 0]
            w1 = weights[i, j, 1]
            w2 = weights[i, j, 2]
            w3 = weights[i, j, 3]
            w4 = weights[i, j, 4]
            if update:
                pred = w4 + w0 * a + w2 * qa + w1 * b + w3 * qb
                norm = 1.0 + (a2 + qa * qa) + (b2 + qb * qb)
                step = mu * (z - pred) / norm
                w0 += step * a
                w1 += step * b
                w2 += step * qa
                w3 += step * qb
                w4 += step
                weights[i, j, 0] = w0
                weights[i, j, 1] = w1
                weights[i, j, 2] = w2
                weights[i, j, 3] = w3
                weights[i, j, 4] = w4
            lags[i, j, 1] = a
            lags[i, j, 0] = z
            out[i, j] = w4 + w0 * z + w2 * min(z * z, SQUARE_CAP) + w1 * a + w3 * qa


@njit(**_jit)
def _forecast_rows(y, eps, sigma, weights, lags, out, mu, update, lo, hi):
    """General p: every client's NLMS update and next forecast for rows ``[lo, hi)``, in place."""
    d, F = weights.shape[1], weights.shape[2]
    p = lags.shape[2]
    for i in range(lo, hi):
        scale = sigma[i]
        for j in range(d):
            z = y[j] + scale * eps[i, j]
            w = weights[i, j]
            lag = lags[i, j]
            if update:
                # a-priori error of the forecast made from the previous features
                pred = w[F - 1]
                norm = 1.0
                for k in range(p):
                    v = lag[k]
                    v2 = v * v
                    q = min(v2, SQUARE_CAP)
                    pred += w[k] * v + w[p + k] * q
                    norm += v2 + q * q
                step = mu * (z - pred) / norm
                for k in range(p):
                    v = lag[k]
                    w[k] += step * v
                    w[p + k] += step * min(v * v, SQUARE_CAP)
                w[F - 1] += step
            for k in range(p - 1, 0, -1):
                lag[k] = lag[k - 1]
            lag[0] = z
            f = w[F - 1]
            for k in range(p):
                v = lag[k]
                f += w[k] * v + w[p + k] * min(v * v, SQUARE_CAP)
            out[i, j] = f


@njit(**_jit)
def _forecast_serial(y, eps, sigma, weights, lags, out, mu, update):
    """Every chunk of :func:`forecast_step` on one thread."""
    for c in range((weights.shape[0] + CHUNK - 1) // CHUNK):
        _forecast_chunk(y, eps, sigma, weights, lags, out, mu, update, c)


@njit(parallel=True, **_jit)
def _forecast_parallel(y, eps, sigma, weights, lags, out, mu, update):
    """Every chunk of :func:`forecast_step` spread over the threads (the same bits)."""
    for c in prange((weights.shape[0] + CHUNK - 1) // CHUNK):
        _forecast_chunk(y, eps, sigma, weights, lags, out, mu, update, np.int64(c))


# --------------------------------------------------------------------------- scoring
@njit(**_jit)
def _score_chunk(x, y, record, sq_err, work, c):
    """Partials of chunk ``c``: column sums of ``x``, ``sum_i |x_i - y|^2`` and ``max_i sq_err_i``.

    Reads ``x`` (n, d), ``y`` (d,); adds ``|x_i - y|^2`` to ``sq_err_i`` if
    ``record`` (modified in place); writes row ``c`` of ``work``: columns
    ``[0, d)`` the sums of the chunk's states, ``W - 2`` the chunk's summed
    squared error, ``W - 1`` the largest ``sq_err_i`` of the chunk after the
    update (``W = work.shape[1]``).
    """
    n, d = x.shape
    row = work[c]
    for j in range(row.shape[0]):
        row[j] = 0.0
    lo = c * CHUNK
    hi = min(lo + CHUNK, n)
    total = 0.0
    top = 0.0
    for i in range(lo, hi):
        e2 = 0.0
        for j in range(d):
            xi = x[i, j]
            row[j] += xi
            e = xi - y[j]
            e2 += e * e
        if record:
            sq_err[i] += e2
        if sq_err[i] > top:
            top = sq_err[i]
        total += e2
    row[work.shape[1] - 2] = total
    row[work.shape[1] - 1] = top


@njit(**_jit)
def _score_merge(work, n, d, out_mean):
    """Merge the chunk rows in chunk order: ``out_mean = sum / n``; returns (total, largest sq_err)."""
    total = 0.0
    top = 0.0
    W = work.shape[1]
    for j in range(d):
        out_mean[j] = 0.0
    for c in range(work.shape[0]):
        for j in range(d):
            out_mean[j] += work[c, j]
        total += work[c, W - 2]
        if work[c, W - 1] > top:
            top = work[c, W - 1]
    for j in range(d):
        out_mean[j] /= n
    return total, top


@njit(**_jit)
def _score_serial(x, y, record, sq_err, work, out_mean):
    """Every chunk of :func:`score_step` on one thread, then the chunk partials merged in order."""
    for c in range(work.shape[0]):
        _score_chunk(x, y, record, sq_err, work, c)
    return _score_merge(work, x.shape[0], x.shape[1], out_mean)


@njit(parallel=True, **_jit)
def _score_parallel(x, y, record, sq_err, work, out_mean):
    """:func:`_score_serial` with the chunks spread over the threads (the same bits)."""
    for c in prange(work.shape[0]):
        _score_chunk(x, y, record, sq_err, work, np.int64(c))
    return _score_merge(work, x.shape[0], x.shape[1], out_mean)


# --------------------------------------------------------------------------- dispatch
def score_work_shape(n, d):
    """Shape of :func:`score_step`'s work array: one padded row per chunk (sums, total, largest)."""
    return -(-n // CHUNK), -(-(d + 2) // PAD) * PAD


def forecast_step(y, eps, sigma, weights, lags, out, mu, update, threads):
    """One round of every client's forecaster, in place (see ``_forecast_reference.forecast_step``)."""
    if threads == 1:
        return _forecast_serial(y, eps, sigma, weights, lags, out, mu, update)
    with _Threads(threads):
        return _forecast_parallel(y, eps, sigma, weights, lags, out, mu, update)


def score_step(x, y, record, sq_err, work, out_mean, threads):
    """Mean of ``x`` into ``out_mean``; ``sq_err += |x_i - y|^2`` if ``record``.

    Returns ``(sum_i |x_i - y|^2, max_i sq_err_i)`` (the largest total after
    the update). See ``_forecast_reference.score_step``.
    """
    if threads == 1:
        return _score_serial(x, y, record, sq_err, work, out_mean)
    with _Threads(threads):
        return _score_parallel(x, y, record, sq_err, work, out_mean)


# Numba's cache of this module also checks the files it takes values from (kernels/_seal.py).
seal(globals())
