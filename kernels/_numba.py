"""Numba kernels: the default backend.

Determinism
-----------
Each reduction runs over fixed chunks of ``CHUNK`` agents, one partial row
per chunk in ``work`` (see :func:`memoa_fast.kernels.work_shape`), merged
serially in chunk order: the same input gives bitwise the same result
whatever the thread count. Serial and ``prange`` drivers share one chunk
function, so they agree bitwise too.

Speed
-----
The kernels are written for LLVM's loop vectoriser (Numba leaves the SLP
vectoriser off, and a loop over ``j < d`` with a run-time ``d`` that
accumulates into an array neither vectorises nor keeps its sums in
registers). A chunk is walked as a flat run of ``CHUNK * d`` contiguous
doubles, in *blocks* of ``R = max(1, LANES // d)`` whole rows (``L = R d``
values, a few KiB, in L1):

- element-wise work (the policy, the per-coordinate stage cost) is one
  unit-stride loop over the block, with the per-coordinate constants
  (``m_j``, the policy offset) replicated once per chunk into a length-``L``
  pattern, so the loop vectorises;
- sums over agents (mean state, mean signal, the mixture) go into ``L``
  *lanes*: ``lane[l] += v[l]`` block after block, again an element-wise,
  vectorised loop; at the end of the chunk, column ``j`` is the sum of
  ``lane[j], lane[d + j], ..., lane[(R-1) d + j]`` in that order. The order
  of every addition is fixed by the code and by ``d`` alone, never by the
  thread count, so the results stay bitwise reproducible (no ``reassoc``
  flag is needed, and none is used);
- the per-agent cost is the sum of its ``d`` stage-cost terms in the order
  ``j = 0..d-1`` (as the reference), done in a short scalar loop per row;
- the largest cost is tracked in 32 lanes of (value, first index), which
  returns the first index of the maximum like ``numpy.argmax``.

Non-finite signals are rare, so each chunk first checks (vectorised) that all
its signals are finite and then takes the branch-free path; a chunk with a
NaN or an infinity takes the row-by-row path with per-agent checks.

The public functions take ``threads``: 1 runs the serial driver, more runs
the parallel one under ``numba.set_num_threads(threads)``, restored after.

Fused step
----------
:func:`fused_step` is the whole population step in two passes over memory
instead of four (see its docstring for why two is the minimum).
"""
import math

import numba
import numpy as np
from numba import njit, prange

from ._config import CACHE, CHUNK, FASTMATH, PAD

RULE_EG, RULE_HEDGE = 0, 1

# Values per block (a block is R = max(1, LANES // d) whole rows): small
# enough that the block's lanes and patterns sit in L1, long enough that the
# vectorised inner loops run many iterations.
LANES = 256
# Lanes of the (max, argmax) tracker.
MAX_LANES = 32
# Log-weights exponentiated per vectorised sweep (scratch: 3 x 8 KiB).
EXP_ROWS = 1024

# exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2)/2 (Cody-Waite split of ln 2, fdlibm's constants).
_LOG2E = 1.4426950408889634
_SHIFT = 6755399441055744.0  # 1.5 * 2^52: x / ln 2 + _SHIFT holds round(x / ln 2) in its low mantissa bits
_SHIFT_BITS = int(np.float64(_SHIFT).view(np.int64))
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10

# log(x) = k ln 2 + log(z), z = x / 2^k in [sqrt(1/2), sqrt(2)) (musl's bit split), log(z) = log(1 + f) with
# s = f / (2 + f) and fdlibm's minimax R(s^2) (|error| < 2^-58.45 on |s| <= 0.1716).
_LOG_OFF = 0x3FE6A09E667F3BCD          # bits of sqrt(1/2) (rounded down)
_EXP_FIELD = -(1 << 52)                # 0xFFF0000000000000: sign + exponent bits
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_TINY = 2.2250738585072014e-308        # smallest normal double
_HUGE = 1.7976931348623157e308         # largest finite double
# Rows per vectorised sweep of the fixed-share pass (scratch: 4 x 4 KiB).
SHARE_ROWS = 512
# Below this alpha / N the share pass keeps its scalar log1p(exp(.)) form (subnormal sums would lose bits).
_SHARE_FLOOR_MIN = 1e-290

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)


@njit(**_jit)
def _padded(d):
    return -(-d // PAD) * PAD


@njit(**_jit)
def _block_rows(d):
    return max(1, LANES // d)


@njit(**_jit)
def _chunk_bounds(n, c):
    lo = c * CHUNK
    return lo, min(lo + CHUNK, n)


# --------------------------------------------------------------------------- building blocks
@njit(**_jit)
def _lane_sums(flat, lo, hi, L, lanes):
    """``lanes[l] = sum_k flat[lo + k L + l]``, block after block (values ``[lo, hi)``)."""
    for l in range(L):
        lanes[l] = 0.0
    for b in range(lo, hi, L):
        seg = flat[b:min(b + L, hi)]
        for l in range(seg.shape[0]):
            lanes[l] += seg[l]


@njit(**_jit)
def _lane_columns(lanes, d, R, out):
    """``out[j] = lanes[j] + lanes[d + j] + ... + lanes[(R-1) d + j]``, in that order."""
    for j in range(d):
        total = 0.0
        for k in range(R):
            total += lanes[k * d + j]
        out[j] = total


@njit(**_jit)
def _exp_rows(R):
    """Rows whose weights are exponentiated in one sweep: a whole number of blocks, about ``EXP_ROWS``."""
    return R * max(1, EXP_ROWS // R)


@njit(**_jit)
def _weighted_lane_sums(log_p, xf, lo, hi, d, R, lanes, scratch):
    """Lanes of ``sum_i exp(log_p[i]) x[i, :]`` over rows ``[lo, hi)`` (``scratch``: ``3 _exp_rows(R)`` doubles).

    Weights are exponentiated ``_exp_rows(R)`` rows at a time in one
    vectorised sweep (long loops amortise :func:`_exp_into`'s three passes).
    """
    E = _exp_rows(R)
    p = scratch[:E]
    tmp = scratch[E:3 * E]
    for l in range(R * d):
        lanes[l] = 0.0
    for eb in range(lo, hi, E):
        e_hi = min(eb + E, hi)
        _exp_into(log_p[eb:e_hi], p, tmp)
        for rb in range(eb, e_hi, R):
            rows = min(R, e_hi - rb)
            seg = xf[rb * d:(rb + rows) * d]
            pb = p[rb - eb:rb - eb + rows]
            if d == 1:
                for k in range(rows):
                    lanes[k] += pb[k] * seg[k]
            else:
                for k in range(rows):
                    pk = pb[k]
                    lane = lanes[k * d:(k + 1) * d]
                    row = seg[k * d:(k + 1) * d]
                    for j in range(d):
                        lane[j] += pk * row[j]


@njit(**_jit)
def _max_arg(J, lo, hi, vmax, varg):
    """Largest ``J[i]`` over ``[lo, hi)`` and its first index (``(-inf, -1)`` if none is > -inf)."""
    W = vmax.shape[0]
    for k in range(W):
        vmax[k] = -np.inf
        varg[k] = -1.0
    for b in range(lo, hi, W):
        seg = J[b:min(b + W, hi)]
        for k in range(seg.shape[0]):
            v = seg[k]
            m = vmax[k]
            up = v > m
            vmax[k] = v if up else m
            varg[k] = float(b + k) if up else varg[k]
    best = -np.inf
    arg = -1.0
    for k in range(W):
        if vmax[k] > best:
            best = vmax[k]
            arg = varg[k]
        elif vmax[k] == best and varg[k] < arg:
            arg = varg[k]
    return best, arg


@njit(**_jit)
def _count_nonfinite(flat, lo, hi):
    bad = 0
    seg = flat[lo:hi]
    for k in range(seg.shape[0]):
        bad += not math.isfinite(seg[k])
    return bad


@njit(**_jit)
def _row_finite(s, i, d):
    finite = True
    for j in range(d):
        if not math.isfinite(s[i, j]):
            finite = False
    return finite


@njit(**_jit)
def _exp_into(src, dst, tmp):
    """``dst[k] = exp(src[k])`` for ``k < len(src)``, vectorised (``tmp``: scratch of ``2 len(src)``).

    LLVM cannot vectorise a call to libm's ``exp`` (Numba has no vector math
    library here), which costs 5 ns per call on this machine; this one runs
    at about 1.4 ns (NumPy's AVX-512 ``exp``: 0.9 ns). Cody-Waite reduction and a degree-13 Taylor polynomial on
    ``|r| <= ln(2)/2``: within 1.01 ulp of ``numpy.exp`` on [-745, 709]
    (measured on 10^6 draws per range), 0 below -745.5 (and at -inf),
    ``inf`` above 709.79, NaN for NaN. The scale ``2^n`` is built from its
    bits in two halves, ``2^(n//2) 2^(n - n//2)``, so subnormal results round once.
    """
    m = src.shape[0]
    tb = tmp[:m]
    sb = tmp[m:2 * m]
    for k in range(m):
        x = src[k]
        x = -745.5 if x < -745.5 else x
        x = 710.0 if x > 710.0 else x
        t = x * _LOG2E + _SHIFT
        nf = t - _SHIFT
        r = (x - nf * _LN2_HI) - nf * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        dst[k] = p * r + 1.0
        tb[k] = t
    ti = tb.view(np.int64)
    si = sb.view(np.int64)
    for k in range(m):
        n = ti[k] - _SHIFT_BITS
        half = n >> 1
        ti[k] = (half + 1023) << 52
        si[k] = (n - half + 1023) << 52
    for k in range(m):
        dst[k] = dst[k] * tb[k] * sb[k]


@njit(**_jit)
def _log_into(src, dst, tmp):
    """``dst[k] = log(src[k])`` for ``k < len(src)``, vectorised (``tmp``: scratch of ``2 len(src)``).

    ``src`` must be C-contiguous (its bits are read through an int64 view). For
    positive normal finite inputs: the exponent/mantissa split is integer work
    (musl's: ``x = 2^k z``, ``z`` in ``[sqrt(1/2), sqrt(2))``), then fdlibm's
    ``log(1 + f) = f - (hfsq - s (hfsq + R(s^2)))``, ``s = f / (2 + f)``, plus
    ``k ln 2`` in Cody-Waite halves: within 1 ulp of ``numpy.log``. Any other
    input (0, subnormal, negative, inf, NaN) is redone with ``math.log`` in a
    scalar fix-up loop, run only when a vectorised count finds one, so each
    ``dst[k]`` depends on ``src[k]`` alone (not on its neighbours).
    """
    m = src.shape[0]
    zb = tmp[:m]
    eb = tmp[m:2 * m]
    xi = src.view(np.int64)
    zi = zb.view(np.int64)
    ei = eb.view(np.int64)
    for k in range(m):
        ix = xi[k]
        t = ix - _LOG_OFF
        zi[k] = ix - (t & _EXP_FIELD)
        ei[k] = (t >> 52) + _SHIFT_BITS
    bad = 0
    for k in range(m):
        x = src[k]
        bad += 0 if (x >= _TINY and x <= _HUGE) else 1
        e = eb[k] - _SHIFT
        f = zb[k] - 1.0
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
        hfsq = 0.5 * f * f
        dst[k] = e * _LN2_HI - ((hfsq - (s * (hfsq + r) + e * _LN2_LO)) - f)
    if bad:
        for k in range(m):
            x = src[k]
            if not (x >= _TINY and x <= _HUGE):
                dst[k] = math.log(x)


@njit(**_jit)
def _sum4(a):
    """``sum(a)`` with four interleaved accumulators, combined as ``(s0 + s1) + (s2 + s3)``."""
    s0 = s1 = s2 = s3 = 0.0
    m = a.shape[0]
    k = 0
    while k + 4 <= m:
        s0 += a[k]
        s1 += a[k + 1]
        s2 += a[k + 2]
        s3 += a[k + 3]
        k += 4
    while k < m:
        s0 += a[k]
        k += 1
    return (s0 + s1) + (s2 + s3)


# --------------------------------------------------------------------------- mean field
@njit(**_jit)
def _signal_chunk(x, s, J, work, c, want_x, want_J):
    """Chunk ``c``'s partials: finite-signal sums and count, and optionally state sums and max cost.

    Row ``c`` of ``work``: ``[0, d)`` state sums (if ``want_x``), ``[dp, dp + d)``
    finite-signal sums, ``2 dp`` the finite count, ``2 dp + 1, 2 dp + 2`` the
    largest cost and its index (if ``want_J``).
    """
    n, d = x.shape
    dp = _padded(d)
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    row = work[c]
    scratch = np.empty(L + 2 * MAX_LANES)
    lanes = scratch[:L]
    sf = s.reshape(-1)
    # Lanes of the signal sums. A NaN or an infinity anywhere leaves its lane
    # non-finite (and a finite overflow merely takes the exact path below).
    _lane_sums(sf, lo * d, hi * d, L, lanes)
    if _count_nonfinite(lanes, 0, L) == 0:
        count = hi - lo
        _lane_columns(lanes, d, R, row[dp:dp + d])
    else:  # row-by-row over this chunk only (it sits in cache now)
        count = 0
        for j in range(d):
            lanes[j] = 0.0
        for i in range(lo, hi):
            if _row_finite(s, i, d):
                count += 1
                for j in range(d):
                    lanes[j] += s[i, j]
        for j in range(d):
            row[dp + j] = lanes[j]
    row[2 * dp] = count
    if want_x:
        _lane_sums(x.reshape(-1), lo * d, hi * d, L, lanes)
        _lane_columns(lanes, d, R, row[:d])
    if want_J:
        jmax, jarg = _max_arg(J, lo, hi, scratch[L:L + MAX_LANES], scratch[L + MAX_LANES:])
        row[2 * dp + 1] = jmax
        row[2 * dp + 2] = jarg


@njit(**_jit)
def _signal_merge(work, d, out_mean_s):
    """Mean of the finite signals into ``out_mean_s`` (untouched if none); returns the count."""
    dp = _padded(d)
    n_chunks = work.shape[0]
    count = 0.0
    for c in range(n_chunks):
        count += work[c, 2 * dp]
    if count > 0:
        for j in range(d):
            total = 0.0
            for c in range(n_chunks):
                total += work[c, dp + j]
            out_mean_s[j] = total / count
    return int(count)


@njit(**_jit)
def _columns_merge(work, col, d, out):
    """``out[j] = sum_c work[c, col + j]`` in chunk order."""
    for j in range(d):
        total = 0.0
        for c in range(work.shape[0]):
            total += work[c, col + j]
        out[j] = total


@njit(**_jit)
def _max_merge(work, col):
    """Largest cost over the chunks (first chunk on ties) and its agent."""
    jmax = -np.inf
    jarg = -1.0
    for c in range(work.shape[0]):
        if work[c, col] > jmax:
            jmax = work[c, col]
            jarg = work[c, col + 1]
    return jmax, int(jarg)


@njit(**_jit)
def _mean_field_merge(work, n, d, out_mean_x, out_mean_s):
    dp = _padded(d)
    count = _signal_merge(work, d, out_mean_s)
    _columns_merge(work, 0, d, out_mean_x)
    for j in range(d):
        out_mean_x[j] /= n
    jmax, jarg = _max_merge(work, 2 * dp + 1)
    return count, jmax, jarg


@njit(**_jit)
def _mean_field_serial(x, s, J, work, out_mean_x, out_mean_s):
    for c in range(work.shape[0]):
        _signal_chunk(x, s, J, work, c, True, True)
    return _mean_field_merge(work, x.shape[0], x.shape[1], out_mean_x, out_mean_s)


@njit(parallel=True, **_jit)
def _mean_field_parallel(x, s, J, work, out_mean_x, out_mean_s):
    for c in prange(work.shape[0]):
        _signal_chunk(x, s, J, work, c, True, True)
    return _mean_field_merge(work, x.shape[0], x.shape[1], out_mean_x, out_mean_s)


# --------------------------------------------------------------------------- policy
@njit(**_jit)
def _move_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, lo, hi, all_finite):
    """Policy step and stage cost of rows ``[lo, hi)``, in place.

    ``all_finite``: true if every signal of these rows is known to be finite;
    otherwise each block is checked (in L1, vectorised) and a block holding a
    non-finite signal is done row by row.
    """
    n, d = x.shape
    R = _block_rows(d)
    L = R * d
    xf = x.reshape(-1)
    sf = s.reshape(-1)
    scratch = np.empty(3 * L)
    offset = scratch[:L]       # c_signal_mean * sbar_j + c_state_mean * m_j, replicated
    centre = scratch[L:2 * L]  # m_j, replicated
    terms = scratch[2 * L:]    # per-coordinate stage costs of the current block
    for k in range(R):
        for j in range(d):
            offset[k * d + j] = c_signal_mean * mean_s[j] + c_state_mean * mean_x[j]
            centre[k * d + j] = mean_x[j]
    for rb in range(lo, hi, R):
        rows = min(R, hi - rb)
        xb = xf[rb * d:(rb + rows) * d]
        sb = sf[rb * d:(rb + rows) * d]
        if all_finite or _count_nonfinite(sb, 0, sb.shape[0]) == 0:
            for l in range(xb.shape[0]):
                xi = xb[l]
                si = sb[l]
                u = -gain * (xi - c_signal * si - offset[l])
                e_s = xi - si
                e_m = xi - centre[l]
                terms[l] = q * e_s * e_s + kappa * e_m * e_m + r * u * u
                xb[l] = xi + u
            Jb = J[rb:rb + rows]
            if d == 1:
                for k in range(rows):
                    Jb[k] += half_discount * terms[k]
            else:
                for k in range(rows):
                    cost = 0.0
                    for j in range(d):
                        cost += terms[k * d + j]
                    Jb[k] += half_discount * cost
        else:  # an agent with a non-finite signal holds and pays only the kappa term
            for i in range(rb, rb + rows):
                cost = 0.0
                if _row_finite(s, i, d):
                    for j in range(d):
                        xi = x[i, j]
                        si = s[i, j]
                        u = -gain * (xi - c_signal * si - offset[j])
                        e_s = xi - si
                        e_m = xi - centre[j]
                        cost += q * e_s * e_s + kappa * e_m * e_m + r * u * u
                        x[i, j] = xi + u
                else:
                    for j in range(d):
                        e_m = x[i, j] - centre[j]
                        cost += kappa * e_m * e_m
                J[i] += half_discount * cost


@njit(**_jit)
def _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c):
    lo, hi = _chunk_bounds(x.shape[0], c)
    _move_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, lo, hi, False)


@njit(**_jit)
def _policy_serial(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount):
    for c in range((x.shape[0] + CHUNK - 1) // CHUNK):
        _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c)


@njit(parallel=True, **_jit)
def _policy_parallel(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount):
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c)


# --------------------------------------------------------------------------- fused step
@njit(**_jit)
def _fused_move_chunk(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, log_p, c):
    """Pass 2 of :func:`fused_step` on chunk ``c``: move, pay, then (chunk in cache) the partials of step t+1."""
    n, d = x.shape
    dp = _padded(d)
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    row = work[c]
    all_finite = row[2 * dp] == hi - lo  # the signal pass left the chunk's finite count there
    _move_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, lo, hi, all_finite)
    predict = log_p.shape[0] == n
    extra = 3 * _exp_rows(R) if predict else 0
    scratch = np.empty(L + 2 * MAX_LANES + extra)
    lanes = scratch[:L]
    xf = x.reshape(-1)
    _lane_sums(xf, lo * d, hi * d, L, lanes)
    _lane_columns(lanes, d, R, row[:d])
    jmax, jarg = _max_arg(J, lo, hi, scratch[L:L + MAX_LANES], scratch[L + MAX_LANES:L + 2 * MAX_LANES])
    row[2 * dp + 1] = jmax
    row[2 * dp + 2] = jarg
    if predict:
        _weighted_lane_sums(log_p, xf, lo, hi, d, R, lanes, scratch[L + 2 * MAX_LANES:])
        _lane_columns(lanes, d, R, row[dp:dp + d])


@njit(**_jit)
def _fused_merge(work, n, d, log_p, out_next_mean_x, out_yhat):
    dp = _padded(d)
    _columns_merge(work, 0, d, out_next_mean_x)
    for j in range(d):
        out_next_mean_x[j] /= n
    if log_p.shape[0] == n:
        _columns_merge(work, dp, d, out_yhat)
    return _max_merge(work, 2 * dp + 1)


@njit(**_jit)
def _fused_serial(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, q, kappa, r, half_discount,
                  mean_x, mean_s, next_mean_x, have_mean_x, log_p, yhat):
    n, d = x.shape
    for c in range(work.shape[0]):
        _signal_chunk(x, s, J, work, c, not have_mean_x, False)
    n_finite = _signal_merge(work, d, mean_s)
    if not have_mean_x:
        _columns_merge(work, 0, d, mean_x)
        for j in range(d):
            mean_x[j] /= n
    for c in range(work.shape[0]):
        _fused_move_chunk(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, log_p, c)
    jmax, jarg = _fused_merge(work, n, d, log_p, next_mean_x, yhat)
    return n_finite, jmax, jarg


@njit(parallel=True, **_jit)
def _fused_parallel(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, q, kappa, r, half_discount,
                    mean_x, mean_s, next_mean_x, have_mean_x, log_p, yhat):
    n, d = x.shape
    for c in prange(work.shape[0]):
        _signal_chunk(x, s, J, work, c, not have_mean_x, False)
    n_finite = _signal_merge(work, d, mean_s)
    if not have_mean_x:
        _columns_merge(work, 0, d, mean_x)
        for j in range(d):
            mean_x[j] /= n
    for c in prange(work.shape[0]):
        _fused_move_chunk(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, log_p, c)
    jmax, jarg = _fused_merge(work, n, d, log_p, next_mean_x, yhat)
    return n_finite, jmax, jarg


# --------------------------------------------------------------------------- server
@njit(**_jit)
def _predict_chunk(log_p, x, work, c):
    n, d = x.shape
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    scratch = np.empty(L + 3 * _exp_rows(R))
    _weighted_lane_sums(log_p, x.reshape(-1), lo, hi, d, R, scratch[:L], scratch[L:])
    _lane_columns(scratch[:L], d, R, work[c, :d])


@njit(**_jit)
def _predict_merge(work, d, out):
    _columns_merge(work, 0, d, out)


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
    """Gradient step on the log-weights of one chunk, and the chunk's log-sum-exp pieces.

    ``work[c, 2 dp + 1]`` gets ``top``, the largest stepped log-weight of the
    chunk, and ``work[c, 2 dp + 2]`` the sum of ``exp(v_i - top)``: per block
    of rows, the block's maximum, then its exponentials (vectorised), folded
    into the chunk's running pair in block order.
    """
    n, d = x.shape
    col = 2 * _padded(d)
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    xf = x.reshape(-1)
    scratch = np.empty(2 * L + 4 * R)
    ref = scratch[:L]              # y_j (hedge) or 2 (yhat_j - y_j) (eg), replicated
    terms = scratch[L:2 * L]       # per-coordinate losses of the block
    shifted = scratch[2 * L:2 * L + R]
    tmp = scratch[2 * L + R:]      # exp's scratch (2 R) and its output (R)
    for k in range(R):
        for j in range(d):
            ref[k * d + j] = 2.0 * (yhat[j] - y[j]) if rule == RULE_EG else y[j]
    top = -np.inf
    scaled = 0.0
    for rb in range(lo, hi, R):
        rows = min(R, hi - rb)
        xb = xf[rb * d:(rb + rows) * d]
        if rule == RULE_EG:
            for l in range(xb.shape[0]):
                terms[l] = ref[l] * xb[l]
        else:
            for l in range(xb.shape[0]):
                e = xb[l] - ref[l]
                terms[l] = e * e
        lp = log_p[rb:rb + rows]
        if d == 1:
            for k in range(rows):
                lp[k] -= eta * terms[k]
        else:
            for k in range(rows):
                loss = 0.0
                for j in range(d):
                    loss += terms[k * d + j]
                lp[k] -= eta * loss
        block_top = -np.inf
        for k in range(rows):
            block_top = max(block_top, lp[k])
        if block_top == -np.inf:
            continue
        for k in range(rows):
            shifted[k] = lp[k] - block_top
        ex = tmp[2 * R:2 * R + rows]
        _exp_into(shifted[:rows], ex, tmp[:2 * R])
        block_sum = _sum4(ex)
        if block_top > top:
            scaled = scaled * math.exp(top - block_top) + block_sum
            top = block_top
        else:
            scaled += block_sum * math.exp(block_top - top)
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
def _share_range(log_p, lse, alpha, n_total, lo, hi):
    """Normalise rows ``[lo, hi)`` and mix with the uniform law over ``n_total`` agents.

    ``p <- (1-alpha) p + alpha/N`` in the log domain. ``n_total`` is the
    whole population's N, which a Dask shard (holding a slice) passes in.

    For ``0 < alpha < 1``: ``log((1-alpha) exp(log_p - lse) + alpha/N)``, in
    sweeps of ``SHARE_ROWS`` rows through the vectorised :func:`_exp_into`
    and :func:`_log_into`. Both are element-wise, so each result depends on
    its own input alone, not on ``lo``/``hi`` or the sweep boundaries (the
    Dask backend's exact mode relies on this). The sum is at least
    ``alpha/N``, a normal number unless ``alpha/N < _SHARE_FLOOR_MIN``, where
    the scalar ``max + log1p(exp(-|.|))`` form is used instead.
    """
    if alpha == 0.0:
        for i in range(lo, hi):
            log_p[i] -= lse
    elif alpha == 1.0:
        uniform = -math.log(n_total)
        for i in range(lo, hi):
            log_p[i] = uniform
    elif alpha / n_total < _SHARE_FLOOR_MIN:
        keep = math.log1p(-alpha)
        spread = math.log(alpha / n_total)
        for i in range(lo, hi):
            a = keep + log_p[i] - lse
            top = max(a, spread)
            log_p[i] = top + math.log1p(math.exp(-abs(a - spread)))
    else:
        keep = 1.0 - alpha
        floor = alpha / n_total
        B = SHARE_ROWS
        scratch = np.empty(4 * B)
        shifted = scratch[:B]
        w = scratch[B:2 * B]
        tmp = scratch[2 * B:4 * B]
        for b in range(lo, hi, B):
            m = min(B, hi - b)
            lp = log_p[b:b + m]
            sb = shifted[:m]
            for k in range(m):
                sb[k] = lp[k] - lse
            wb = w[:m]
            _exp_into(sb, wb, tmp[:2 * m])
            for k in range(m):
                wb[k] = keep * wb[k] + floor
            _log_into(wb, lp, tmp[:2 * m])


@njit(**_jit)
def _reweight_serial(log_p, x, y, yhat, rule, eta, work):
    for c in range(work.shape[0]):
        _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c)


@njit(parallel=True, **_jit)
def _reweight_parallel(log_p, x, y, yhat, rule, eta, work):
    for c in prange(work.shape[0]):
        _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c)


@njit(**_jit)
def _share_serial(log_p, lse, alpha, n_total):
    for c in range(-(-log_p.shape[0] // CHUNK)):
        lo, hi = _chunk_bounds(log_p.shape[0], c)
        _share_range(log_p, lse, alpha, n_total, lo, hi)


@njit(parallel=True, **_jit)
def _share_parallel(log_p, lse, alpha, n_total):
    for c in prange(-(-log_p.shape[0] // CHUNK)):
        lo, hi = _chunk_bounds(log_p.shape[0], c)
        _share_range(log_p, lse, alpha, n_total, lo, hi)


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


def fused_step(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, q, kappa, r, discount,
               mean_x, mean_s, next_mean_x, have_mean_x, log_p, yhat, threads):
    """One whole population step (policy, costs, next mean field, worst agent, mixture) in two passes.

    Semantics: :func:`memoa_fast.kernels._reference.fused_step`. Returns
    ``(n_finite, max_J, argmax_J)`` of the updated costs.

    Pass 1 reads the signals: per chunk the sums of the finite signals and
    the finite count (plus the state sums when ``have_mean_x`` is false,
    i.e. on the first step after a reset or a restore). Pass 2 reads and
    writes the states and costs: per chunk, the policy and the stage cost
    in one streaming sweep, then, while the chunk is still in L2, the partial
    sums of ``x(t+1)`` (the next step's ``m``), of ``exp(log_p_i) x_i(t+1)``
    (the server's mixture, when ``log_p`` is not empty) and the largest
    cost with its first index (the worst client).

    Why two passes and not one: every ``u_i`` needs ``sbar(t)``, the mean of
    all this step's signals, which arrive with the step, so all signals are
    read once before any state may move. ``m(t)`` costs no pass: it was
    summed by the previous step's pass 2. The server's reweighting cannot
    join pass 2: it needs the target ``y(t+1)``, which arrives after the
    step, and its log-sum-exp normalisation needs the total over all agents
    before any weight can be written, hence its own two passes
    (:func:`mixture_update`). Bytes moved per agent: ``8 d`` (pass 1) +
    ``24 d + 16`` (pass 2) + ``8`` with the mixture, against ``40 d + 24``
    for :func:`mean_field` + :func:`policy_update` (+ ``8 d + 8`` for
    :func:`mixture_predict`).
    """
    if threads == 1:
        return _fused_serial(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, q, kappa, r, 0.5 * discount,
                             mean_x, mean_s, next_mean_x, bool(have_mean_x), log_p, yhat)
    with _Threads(threads):
        return _fused_parallel(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, q, kappa, r, 0.5 * discount,
                               mean_x, mean_s, next_mean_x, bool(have_mean_x), log_p, yhat)


def mixture_predict(log_p, x, work, out, threads):
    if threads == 1:
        return _predict_serial(log_p, x, work, out)
    with _Threads(threads):
        return _predict_parallel(log_p, x, work, out)


def mixture_reweight(log_p, x, y, yhat, rule, eta, work, threads):
    """First half of :func:`mixture_update` for a shard: the gradient step and per-chunk log-sum-exp pieces."""
    if threads == 1:
        return _reweight_serial(log_p, x, y, yhat, rule, eta, work)
    with _Threads(threads):
        return _reweight_parallel(log_p, x, y, yhat, rule, eta, work)


def mixture_share(log_p, lse, alpha, n_total, threads):
    """Second half of :func:`mixture_update` for a shard of a population of ``n_total`` agents."""
    if threads == 1:
        return _share_serial(log_p, lse, alpha, n_total)
    with _Threads(threads):
        return _share_parallel(log_p, lse, alpha, n_total)


def mixture_update(log_p, x, y, yhat, rule, eta, alpha, work, threads):
    """Both passes of the reweighting: :func:`mixture_reweight`, the log-sum-exp, :func:`mixture_share`."""
    mixture_reweight(log_p, x, y, yhat, rule, eta, work, threads)
    mixture_share(log_p, _log_sum_exp_merge(work, x.shape[1]), alpha, log_p.shape[0], threads)
