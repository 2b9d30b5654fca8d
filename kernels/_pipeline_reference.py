"""Slow, obviously correct NumPy reference of the fused pipeline round: the specification.

One round of the time-series pipeline (MODEL.md sections 5 and 6) for N
clients in dimension d, called when the target ``y(t)`` arrives. With
``x(t)`` the states published last round (each client's forecast of ``y(t)``),
``log p`` the server's log-weights and ``yhat(t) = sum_i p_i x_i(t)``:

Pass A (needs ``y(t)``)

1. if ``reweight``: the server's update on ``x(t)``, ``log p_i -= clip(eta
   loss_i)`` with ``loss_i = |x_i(t) - y(t)|^2`` (hedge) or
   ``2 <e, x_i(t) - y(t)>`` (eg) with ``e = dev - (y(t) - c)``, ``dev =
   sum_k p_k (x_k(t) - c)`` and ``c = y(t-1)`` (``field[FIELD_DEV]`` and
   ``field[FIELD_CENTRE]``, written by the previous round's pass B): the
   mixture's error ``yhat(t) - y(t)`` from differences only, as
   :func:`memoa_fast.kernels._reference._steps` takes it (its zero-factor and
   overflow rules too), so a common shift of the states and the targets
   changes no weight beyond its own rounding;
2. if ``record``: ``sq_err_i += |x_i(t) - y(t)|^2`` and ``sq_sig_i +=
   |s_i(t-1) - y(t)|^2`` (the raw forecasts' errors), with their totals;
3. every client observes ``z_i = y(t) + sigma_i eps_i(t)`` with the
   counter-based normals of :func:`normals`, updates its normalised-LMS
   weights on the a-priori error (if ``update``) and forecasts ``s_i(t)``
   (exactly :func:`memoa_fast.kernels._forecast_reference.forecast_step`);
4. the count and the sum of the valid signals (finite, ``|s| <= SIGNAL_LIMIT``).

Merge: ``log sum_i p_i = top + log_total``; ``sbar(t)`` (kept when no signal
is valid); the policy offset ``mix_s sbar + mix_m m(t)``.

Pass B

5. if ``reweight``: ``log p <- (log p - top) - log_total`` then fixed share
   ``p <- (1 - alpha) p + alpha / N``;
6. the population step of :func:`memoa_fast.kernels._reference.move_pass`
   (one class): ``u_i = -g (x_i - c s_i - offset)`` for a valid signal (else
   ``u_i = 0``), ``J_i += gamma^t / 2 (q |x_i - s_i|^2 + kappa |x_i - m|^2 +
   r |u_i|^2)`` (``q`` term only with a valid signal), ``x_i += u_i``;
7. ``m(t+1)``, the worst client ``max_i J_i`` (first on ties) and the
   mixture ``yhat(t+1) = sum_i p_i x_i(t+1)`` with the new weights; eg
   also ``field[FIELD_DEV] = sum_i p_i (x_i(t+1) - y(t))`` (a client of
   weight 0 adds 0, even beside an overflowed difference) and
   ``field[FIELD_CENTRE] = y(t)``, the next round's ``dev`` and ``c``.

Linear weights: with ``flags[F_LINEAR]`` the weights between rounds are
kept as ``p`` in ``ebuf`` (``log_p`` is then scratch: the compiled kernel does not touch it), which
spares the compiled kernel one ``log`` per client and round (pass A needs an
``exp`` of the step anyway). Allowed only when ``alpha / N >=``
:data:`LINEAR_FLOOR`: every weight is then at least the share's floor
``alpha / N``, so no weight underflows and ``log p`` is recovered as
``log(ebuf)`` to a few ulps. Here (the specification) it only means
``log_p = log(ebuf)`` before pass A and ``ebuf = exp(log_p)`` after pass B.

Arrays (C-contiguous float64 unless said; the caller checks shapes):
``x``, ``s`` (N, d); ``J``, ``log_p``, ``ebuf`` (scratch kept from pass A to pass
B), ``sigma``, ``sq_err``, ``sq_sig`` (N,);
``weights`` (2p + 1, N, d) and ``lags`` (p, N, d), *structure of arrays*
(feature ``f`` of every client is one contiguous plane, so the compiled loops
run unit-stride): features ordered ``[lags, lags^2, 1]``, lags newest first;
``y`` (d,), the target; ``yhat`` (d,), ``yhat(t+1)`` out (what it holds in is not read);
``field`` (:data:`FIELD_ROWS`, d; its eg rows ``FIELD_CENTRE`` and ``FIELD_DEV``
are state kept between rounds, the others are rewritten each round); ``work`` (chunks, :func:`work_width`);
``params`` (:data:`N_PARAMS`,) float64; ``flags`` (:data:`N_FLAGS`,) int64;
``stats`` (:data:`N_STATS`,) float64, written.
"""
import numpy as np

from ._config import CHUNK, PAD, SQUARE_CAP
from ._layout import RULE_EG, RULE_HEDGE, SIGNAL_LIMIT, STEP_LIMIT, next_discount
from ._reference import _centred_mixture, _first_max, _steps  # the worst-agent rule, the server's step, eg's dev: one each

# ``params``: the float settings of a round.
P_ETA, P_ALPHA, P_MU, P_HALF_DISCOUNT, P_GAIN, P_SIGNAL, P_Q, P_KAPPA, P_R, P_MIX_SIGNAL, P_MIX_STATE = range(11)
N_PARAMS = 11
# ``flags``: the integer settings of a round. FIRST is the global index of row 0 (a shard's offset);
# LINEAR: the weights live in ``ebuf`` as p (see the module docstring).
F_T, F_RULE, F_REWEIGHT, F_RECORD, F_UPDATE, F_FIRST, F_LINEAR = range(7)
N_FLAGS = 7
# Linear weights need alpha / N at least this (every weight stays a normal number well above underflow).
LINEAR_FLOOR = 1e-290
# ``field`` rows: m(t) (read), sbar (kept when no signal is valid), the policy offset, m(t+1) (written); eg's centre
# c = y(t-1) and dev = sum_i p_i (x_i(t) - c), kept from pass B of one round for pass A of the next.
FIELD_STATE, FIELD_SIGNAL, FIELD_OFFSET, FIELD_NEXT, FIELD_CENTRE, FIELD_DEV = range(6)
FIELD_ROWS = 6
# The rows a Pipeline pickled before eg's centre (389e086 and earlier) holds.
FIELD_ROWS_BEFORE_CENTRE = 4
# ``stats``: what a round reports besides the arrays.
(S_VALID, S_MAX_COST, S_ARG_COST, S_ERR, S_SIG_ERR, S_TOP, S_LOG_TOTAL) = range(7)
N_STATS = 7

# SplitMix64 (see kernels/_noise.py): every normal is a function of (key, round, flat index g = client * d + j).
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1

__all__ = [
    "RULE_EG", "RULE_HEDGE", "SIGNAL_LIMIT", "STEP_LIMIT", "CHUNK", "P_ETA", "P_ALPHA", "P_MU", "P_HALF_DISCOUNT",
    "P_GAIN", "P_SIGNAL", "P_Q", "P_KAPPA", "P_R", "P_MIX_SIGNAL", "P_MIX_STATE", "N_PARAMS", "F_T", "F_RULE",
    "F_REWEIGHT", "F_RECORD", "F_UPDATE", "F_FIRST", "F_LINEAR", "N_FLAGS", "LINEAR_FLOOR", "FIELD_STATE", "FIELD_SIGNAL", "FIELD_OFFSET",
    "FIELD_NEXT", "FIELD_CENTRE", "FIELD_DEV", "FIELD_ROWS", "FIELD_ROWS_BEFORE_CENTRE", "S_VALID", "S_MAX_COST", "S_ARG_COST",
    "S_ERR", "S_SIG_ERR", "S_TOP", "S_LOG_TOTAL",
    "N_STATS", "work_width", "work_shape", "seed_keys", "noise_scales", "round_key", "normals", "pass_a", "pass_b",
    "round_step", "round_flags", "run_rounds", "max_threads",
]


def max_threads():
    """The reference runs on one thread."""
    return 1


def work_width(d):
    """Columns of ``work``: signal sums, state sums and mixture (``d`` each, padded), 8 scalars, then eg's ``dev`` (``d``, padded)."""
    return 4 * (-(-d // PAD) * PAD) + PAD


def work_shape(n, d):
    """``(chunks, work_width(d))``: one row of partials per chunk of ``CHUNK`` clients."""
    return -(-n // CHUNK), work_width(d)


def _mix64_int(z):
    """SplitMix64's finaliser on a Python int (mod 2^64)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _mix64(z):
    """SplitMix64's finaliser on a uint64 array (NumPy wraps array arithmetic modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def seed_keys(seed):
    """``(noise key, scale key)`` of a seed in ``[0, 2^63)``: ``k = mix64(seed)``, ``mix64(k + golden)``.

    The same keys as :func:`memoa_fast.kernels._noise.seed_keys`, so a
    pipeline's noise scales are those of ``NoisyLastValueSignals``.
    """
    key = _mix64_int(int(seed))
    return key, _mix64_int(key + GOLDEN)


def noise_scales(scale_key, first, n, low, high):
    """``sigma_i = exp(log low + u_i (log high - log low))`` of clients ``[first, first + n)``.

    ``u_i = 2^{-53} floor(mix64(scale_key + golden (i + 1)) / 2^11)``: log-uniform
    on ``[low, high]``, a function of ``(scale_key, i)`` alone.
    """
    i = np.arange(first, first + n, dtype=np.uint64)
    u = (_mix64(np.uint64(scale_key) + np.uint64(GOLDEN) * (i + np.uint64(1))) >> np.uint64(11)).astype(np.float64)
    log_low, log_high = np.log(low), np.log(high)
    return np.exp(log_low + u * 2.0**-53 * (log_high - log_low))


def round_key(key, t):
    """The key of round ``t``: ``mix64(key ^ (golden (t + 1)))``."""
    return _mix64_int(int(key) ^ ((GOLDEN * (t + 1)) & _MASK))


def normals(key, first, t, n, d):
    """The standard normals ``eps_i(t)`` of clients ``[first, first + n)``, shape ``(n, d)``.

    Flat index ``g = i d + j`` of client ``i``, coordinate ``j``; pair
    ``q = g // 2``. With ``k_t`` = :func:`round_key`,

    .. math::

        h_1 = \\mathrm{mix64}(k_t + \\phi (q + 1)), \\quad h_2 = \\mathrm{mix64}(h_1 + \\phi),\\quad
        u_1 = 1 - 2^{-53} \\lfloor h_1 / 2^{11} \\rfloor \\in (0, 1], \\quad u_2 = 2^{-53} \\lfloor h_2 / 2^{11} \\rfloor,

    and Box-Muller with both outputs: ``eps = sqrt(-2 log u1) cos(2 pi u2)`` for
    even ``g``, ``sqrt(-2 log u1) sin(2 pi u2)`` for odd ``g`` (``phi`` the
    golden-ratio constant). A function of ``(key, i, t, j)`` alone.
    """
    g = np.arange(first * d, (first + n) * d, dtype=np.uint64)
    q = g >> np.uint64(1)
    kt = np.uint64(round_key(key, t))
    h1 = _mix64(kt + np.uint64(GOLDEN) * (q + np.uint64(1)))
    h2 = _mix64(h1 + np.uint64(GOLDEN))
    u1 = 1.0 - (h1 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    z = np.where((g & np.uint64(1)) == 1, radius * np.sin(angle), radius * np.cos(angle))
    return z.reshape(n, d)


def _features(lags):
    """``[lags, lags^2, 1]`` of a lag buffer ``(p, N, d)``, shape ``(2p + 1, N, d)``."""
    return np.concatenate([lags, np.minimum(lags**2, SQUARE_CAP), np.ones((1,) + lags.shape[1:])], axis=0)


def _valid(s):
    return (np.abs(s) <= SIGNAL_LIMIT).all(axis=1)


def pass_a(x, s, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats, threads):
    """Steps 1-4 and the merge (see the module docstring); ``threads`` is ignored.

    ``ebuf`` holds the weights ``p`` when ``flags[F_LINEAR]`` (read here into
    ``log_p``), else it is a compiled kernel's scratch and is ignored.
    """
    n, d = x.shape
    if flags[F_LINEAR]:
        log_p[:] = np.log(ebuf)
    t, rule = int(flags[F_T]), int(flags[F_RULE])
    eta = params[P_ETA]
    err = ((x - y[None, :]) ** 2).sum(axis=1)
    stats[S_ERR] = stats[S_SIG_ERR] = 0.0
    if flags[F_RECORD]:
        sig_err = ((s - y[None, :]) ** 2).sum(axis=1)
        sq_err += err
        sq_sig += sig_err
        stats[S_ERR] = err.sum()
        stats[S_SIG_ERR] = sig_err.sum()
    stats[S_TOP], stats[S_LOG_TOTAL] = 0.0, 0.0
    if flags[F_REWEIGHT]:
        if eta != 0.0:
            if rule == RULE_EG:
                with np.errstate(over="ignore", invalid="ignore"):  # e = yhat(t) - y(t), from differences only
                    e = field[FIELD_DEV] - (y - field[FIELD_CENTRE])
                step = _steps(log_p, x, y, e, RULE_EG, eta)
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    step = eta * err
                step = np.clip(np.where(np.isnan(step), STEP_LIMIT, step), -STEP_LIMIT, STEP_LIMIT)
            with np.errstate(over="ignore"):  # to -inf (a zero weight) beside a step near 1.8e308: never NaN
                log_p -= step
        top = log_p.max()
        stats[S_TOP] = top
        with np.errstate(over="ignore"):
            stats[S_LOG_TOTAL] = np.log(np.exp(log_p - top).sum()) if np.isfinite(top) else 0.0
    # the forecasters: forecast_step on structure-of-arrays buffers
    eps = normals(key, int(flags[F_FIRST]), t, n, d)
    z = y[None, :] + sigma[:, None] * eps
    if flags[F_UPDATE]:
        phi = _features(lags)
        e = z - (weights * phi).sum(axis=0)
        weights += (params[P_MU] * e / (phi**2).sum(axis=0))[None] * phi
    lags[1:] = lags[:-1].copy()
    lags[0] = z
    s[...] = (weights * _features(lags)).sum(axis=0)
    ok = _valid(s)
    count = int(ok.sum())
    stats[S_VALID] = count
    if count:
        field[FIELD_SIGNAL] = s[ok].sum(axis=0) / count
    field[FIELD_OFFSET] = params[P_MIX_SIGNAL] * field[FIELD_SIGNAL] + params[P_MIX_STATE] * field[FIELD_STATE]
    work[...] = 0.0


def pass_b(x, s, J, log_p, ebuf, y, yhat, field, work, params, flags, stats, threads):
    """Steps 5-7 (see the module docstring); writes ``yhat``, ``field[FIELD_NEXT]`` (and ``ebuf = p`` when ``flags[F_LINEAR]``).

    eg also writes ``field[FIELD_DEV]`` and ``field[FIELD_CENTRE]`` (``y`` is this round's target, their centre).
    """
    n, d = x.shape
    if flags[F_REWEIGHT]:
        top, log_total = stats[S_TOP], stats[S_LOG_TOTAL]
        if not np.isfinite(top):
            top, log_total = 0.0, 0.0
        with np.errstate(over="ignore"):  # log p - top may overflow to -inf: a zero weight
            log_p -= top
        log_p -= log_total
        alpha = params[P_ALPHA]
        if alpha == 1.0:
            log_p[:] = -np.log(n)
        elif alpha > 0.0:
            with np.errstate(divide="ignore"):  # a share alpha / N below the smallest double is 0: log 0 = -inf
                log_share = np.log(alpha / n)
            log_p[:] = np.logaddexp(np.log1p(-alpha) + log_p, log_share)
    ok = _valid(s)
    s_ok = np.where(ok[:, None], s, 0.0)
    m = field[FIELD_STATE]
    u = np.where(ok[:, None], -params[P_GAIN] * (x - params[P_SIGNAL] * s_ok - field[FIELD_OFFSET]), 0.0)
    track = np.where(ok, ((x - s_ok) ** 2).sum(axis=1), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # a cost past the largest double is inf, as in the Numba kernel
        cost = params[P_Q] * track + params[P_KAPPA] * ((x - m) ** 2).sum(axis=1) + params[P_R] * (u**2).sum(axis=1)
        J += params[P_HALF_DISCOUNT] * cost
    x += u
    field[FIELD_NEXT] = x.sum(axis=0) / n
    stats[S_MAX_COST], stats[S_ARG_COST] = _first_max(J)
    p = np.exp(log_p)
    yhat[:] = p @ x
    if flags[F_RULE] == RULE_EG:  # the next round's e, from differences: centred on this round's target
        with np.errstate(invalid="ignore"):  # inf - inf in a state: NaN, without a warning, as the compiled kernel
            field[FIELD_DEV] = _centred_mixture(p, x, y)
        field[FIELD_CENTRE] = y
    if flags[F_LINEAR]:
        ebuf[:] = np.exp(log_p)


def round_step(x, s, J, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats,
               threads):
    """One whole round: :func:`pass_a` then :func:`pass_b`."""
    pass_a(x, s, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats,
           threads)
    pass_b(x, s, J, log_p, ebuf, y, yhat, field, work, params, flags, stats, threads)


def round_flags(flags, t, record):
    """Round ``t``'s flags: ``F_T = t``; round 0 neither reweights, updates the forecasters nor records.

    Round 0 has no states to score (``x(0)`` are the zeros the population
    starts from) and no forecast of ``y(0)``; every later round reweights,
    updates and (if ``record``) records.
    """
    later = int(t > 0)
    flags[F_T] = t
    flags[F_REWEIGHT] = later
    flags[F_UPDATE] = later
    flags[F_RECORD] = later if record else 0


def run_rounds(x, s, J, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, ys, yhat, yhats, field, work, params, key,
               flags, stats, threads, record, gamma, discount):
    """:func:`round_step` on each target ``ys[k]`` (shape (T, d), T >= 1) in turn; returns ``(discount, recorded)``.

    Round ``k`` is round ``t = flags[F_T] + k`` of the pipeline: its flags
    are :func:`round_flags` of ``t`` (the others, rule, first client and
    linear weights, stay as ``flags`` has them) and its half discount is
    ``params[P_HALF_DISCOUNT] = discount / 2``, with ``discount *= gamma``
    after it, or ``discount = gamma^(t+1)`` (pow) where that product is subnormal
    (the product alone stalls there for ``gamma > 1/2``; see
    ``kernels._layout.next_discount``). After round ``k``, ``yhats[k] = yhat`` (``yhat(t+1)``) and
    ``m(t+1)`` becomes the state mean ``field[FIELD_STATE]``. ``flags`` ends
    as the last round's. Returns the discount after the last round and how
    many of the rounds recorded their errors.

    ``flags`` itself is written once, last (the rounds run on a copy), as the
    compiled kernel does: until the call completes, whatever the caller left
    in ``flags`` stays there (``Pipeline`` leaves a marker in ``F_RECORD`` to
    tell a completed call from an interrupted one).
    """
    t0 = int(flags[F_T])
    recorded = 0
    f = flags.copy()
    for k in range(ys.shape[0]):
        round_flags(f, t0 + k, record)
        params[P_HALF_DISCOUNT] = 0.5 * discount
        round_step(x, s, J, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, ys[k], yhat, field, work, params, key,
                   f, stats, threads)
        field[FIELD_STATE] = field[FIELD_NEXT]
        yhats[k] = yhat
        discount = next_discount(discount, gamma, t0 + k + 1)
        recorded += int(f[F_RECORD])
    flags[:] = f
    return discount, recorded
