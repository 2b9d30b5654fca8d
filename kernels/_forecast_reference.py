"""Slow, obviously correct NumPy references of the time-series kernels.

Same signatures as :mod:`._forecast_numba` (``work`` and ``threads`` are
accepted and ignored, apart from the shape helper), so either can run the
pipeline; the tests compare the compiled kernels against these.
"""
import numpy as np

from ._config import CHUNK, PAD, SQUARE_CAP


def features(lags):
    """Feature map of the lag buffer ``(n, d, p)``: ``[lags, min(lags**2, SQUARE_CAP), 1]``, shape ``(n, d, 2p + 1)``."""
    ones = np.ones(lags.shape[:-1] + (1,))
    return np.concatenate([lags, np.minimum(lags**2, SQUARE_CAP), ones], axis=-1)


def forecast_step(y, eps, sigma, weights, lags, out, mu, update, threads):
    """One round of every client's normalised-LMS forecaster, in place.

    Client ``i`` observes ``z_i = y + sigma_i * eps_i`` (``eps`` are standard
    normal draws, shape at least ``(n, d)``; rows beyond ``n`` are ignored).
    With ``phi`` the features of its lag buffer before this observation
    (:func:`features`), and only if ``update``:

    .. math::

        e_i = z_i - w_i^\\top \\phi_i, \\qquad
        w_i \\leftarrow w_i + \\mu\\, e_i\\, \\phi_i / |\\phi_i|^2 ,

    (``|phi|^2 >= 1`` thanks to the constant feature). Then the buffer shifts
    in ``z_i`` (newest first) and ``out_i = w_i^T phi(new buffer)`` is the
    forecast of the next value. Each coordinate of ``y`` has its own weights.
    """
    n = weights.shape[0]
    z = y[None, :] + sigma[:, None] * eps[:n]
    if update:
        phi = features(lags)
        err = z - np.einsum("ndf,ndf->nd", weights, phi)
        weights += (mu * err / (phi**2).sum(axis=-1))[..., None] * phi
    lags[..., 1:] = lags[..., :-1].copy()
    lags[..., 0] = z
    out[...] = np.einsum("ndf,ndf->nd", weights, features(lags))


def score_work_shape(n, d):
    """Same shape as the compiled kernel's work array (unused here)."""
    return -(-n // CHUNK), -(-(d + 2) // PAD) * PAD


def score_step(x, y, record, sq_err, work, out_mean, threads):
    """Score the published forecasts ``x`` (n, d) against the target ``y`` (d,).

    .. math::

        \\bar x = \\frac1n \\sum_i x_i, \\qquad
        e_i = |x_i - y|^2, \\qquad
        \\text{if record: } E_i \\leftarrow E_i + e_i

    ``out_mean`` receives ``xbar``; ``sq_err`` (``E``) is modified in place.
    Returns ``(sum_i e_i, max_i E_i)``, the latter after the update: the largest
    total that is not NaN, and at least 0 (0 when every total is NaN), as the
    compiled kernel's running ``if E_i > top``.

    The states are not checked for finiteness, so a NaN, an ``inf`` or a state
    near the largest double is accepted and only makes its own scores
    non-finite: the arithmetic is silent about it (``np.errstate``), as the
    compiled kernel's is, so that a caller with warnings as errors gets the
    scores, not an exception between the first write and the last.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        out_mean[:] = x.mean(axis=0)
        e2 = ((x - y[None, :]) ** 2).sum(axis=1)
        if record:
            sq_err += e2
        total = float(e2.sum())
    return total, float(np.fmax.reduce(sq_err, initial=0.0))
