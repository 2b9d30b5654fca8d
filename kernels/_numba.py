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

K classes
---------
With labels the class of each agent picks its coefficients, so the passes go
agent by agent (a class-dependent pattern per block, as the one-class loops
use, costs more to build than the arithmetic it saves). What keeps them
within 1.5x of the one-class step (bench/bench_kernels.py, issue 10):

- each class's coefficients and policy offset sit in one short row of a
  per-chunk table (:func:`_class_table`);
- the class sums go into ``P = 4`` interleaved copies (row ``k`` of a chunk
  into copy ``k mod 4``, :func:`_copies`), folded at the end of the chunk:
  consecutive agents of one class (sorted labels) no longer chain their
  additions through memory; the scratch starts on a cache line
  (:func:`_zeros_aligned`);
- the signal pass tests each row's validity in the same loop that adds it
  (a separate vectorised check would serialise a stream from memory and a
  loop from cache);
- the stage cost is summed per kind, ``q E + kappa F + r U``;
- ``d = 1`` and ``d = 4`` have unrolled loops, and every index in these loops
  is unsigned: Numba then leaves out the negative-index wrap-around (a sign
  test and a select per access), which kept the generic coordinate loops
  scalar and was a fifth of the ``d = 4`` loop's instructions.

Fused step
----------
:func:`fused_step` is the whole population step in two passes over memory
instead of four (see its docstring for why two is the minimum).
"""
import math

import numpy as np
from numba import njit, prange

from ._config import CACHE, CHUNK, FASTMATH, PAD
from ._layout import (
    GAIN,
    KAPPA,
    LAY_ARG_COST,
    LAY_CLASS_NEXT,
    LAY_CLASS_SIGNAL,
    LAY_CLASS_STATE,
    LAY_COUNT,
    LAY_DIM,
    LAY_FIELD_NEXT,
    LAY_FIELD_SIGNAL,
    LAY_FIELD_STATE,
    LAY_LSE_SUM,
    LAY_LSE_TOP,
    LAY_MAX_COST,
    LAY_MIXTURE,
    LAY_N_CLASSES,
    LAY_OFFSET,
    LAY_SIGNAL,
    LAY_STATE,
    MIX_SIGNAL,
    MIX_STATE,
    RULE_EG,
    RULE_HEDGE,
    SIGNAL,
    SIGNAL_LIMIT,
    SIZE,
    STEP_LIMIT,
    Q,
)
from ._layout import R as R_
from ._seal import seal
from ._threads import Threads, max_threads

# The kernel API, the same in every backend module (see _reference.py).
__all__ = [
    "RULE_EG", "RULE_HEDGE", "signal_pass", "merge_signals", "move_pass", "merge_move", "fold_rows", "fused_step",
    "mixture_predict", "mixture_reweight", "merge_log_sum_exp", "mixture_share", "mixture_update", "max_threads",
]

# Values per block (a block is R = max(1, LANES // d) whole rows): small
# enough that the block's lanes and patterns sit in L1, long enough that the
# vectorised inner loops run many iterations.
LANES = 256
# Lanes of the (max, argmax) tracker.
MAX_LANES = 32
# Interleaved copies of the class accumulators (K > 1; see _copies).
COPIES = 4
# Unsigned index constants (see _move_rows_classes4).
_U0, _U1, _U2, _U3, _U4, _U5, _U6, _U7, _U8, _U9 = (np.uint64(v) for v in range(10))
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
# One class, pass 1: a chunk whose signals are all at most this in magnitude passes the exact test of
# _lane_sums_abs (each lane adds at most CHUNK of them, so its sum of magnitudes stays below SIGNAL_LIMIT).
_SIGNAL_SAFE = SIGNAL_LIMIT / (2.0 * CHUNK)

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)


@njit(**_jit)
def _padded(d):
    """``d`` rounded up to whole cache lines of doubles (``PAD``): the stride of a class block in ``work``."""
    return -(-d // PAD) * PAD


@njit(**_jit)
def _block_rows(d):
    """Rows per block, ``R = max(1, LANES // d)``: a block of ``R d`` values sits in L1."""
    return max(1, LANES // d)


@njit(**_jit)
def _chunk_bounds(n, c):
    """Agents ``[lo, hi)`` of chunk ``c`` in a population of ``n``."""
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
def _weighted_lane_sums(log_p, xf, lo, hi, d, R, lanes, scratch, centre):
    """Lanes of ``sum_i exp(log_p[i]) x[i, :]`` over rows ``[lo, hi)`` (``scratch``: ``3 _exp_rows(R)`` doubles).

    With a non-empty ``centre`` (the point, ``d`` doubles) the lanes sum ``exp(log_p[i]) (x[i, :] - centre)`` (eg's mixture
    error, one subtraction per value). Weights are exponentiated
    ``_exp_rows(R)`` rows at a time in one vectorised sweep (long loops
    amortise :func:`_exp_into`'s three passes).
    """
    E = _exp_rows(R)
    p = scratch[:E]
    tmp = scratch[E:3 * E]
    for l in range(R * d):
        lanes[l] = 0.0
    centred = centre.shape[0] != 0
    for eb in range(lo, hi, E):
        e_hi = min(eb + E, hi)
        _exp_into(log_p[eb:e_hi], p, tmp)
        for rb in range(eb, e_hi, R):
            rows = min(R, e_hi - rb)
            seg = xf[rb * d:(rb + rows) * d]
            pb = p[rb - eb:rb - eb + rows]
            if centred:  # a zero weight adds 0, as uncentred: not 0 * inf = NaN where x - centre overflows
                if d == 1:
                    c0 = centre[0]
                    for k in range(rows):
                        lanes[k] += pb[k] * (seg[k] - c0 if pb[k] != 0.0 else 0.0)
                else:
                    for k in range(rows):
                        pk = pb[k]
                        lane = lanes[k * d:(k + 1) * d]
                        row = seg[k * d:(k + 1) * d]
                        for j in range(d):
                            lane[j] += pk * (row[j] - centre[j] if pk != 0.0 else 0.0)
            elif d == 1:
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
    """Largest ``J[i]`` over ``[lo, hi)`` and its first index (``(-inf, -1)`` if none is > -inf).

    The lanes keep their indices as integers (``varg``'s storage viewed as int64): a ``float(b + k)`` in the
    loop made LLVM convert each lane in a scalar register (AVX2 has no vector int64-to-double conversion),
    1.2-1.4x slower on 2^20 values.
    """
    W = vmax.shape[0]
    iarg = varg.view(np.int64)
    for k in range(W):
        vmax[k] = -np.inf
        iarg[k] = -1
    for b in range(lo, hi, W):
        seg = J[b:min(b + W, hi)]
        for k in range(seg.shape[0]):
            v = seg[k]
            m = vmax[k]
            up = v > m
            vmax[k] = v if up else m
            iarg[k] = b + k if up else iarg[k]
    best = -np.inf
    arg = -1
    for k in range(W):
        if vmax[k] > best:
            best = vmax[k]
            arg = iarg[k]
        elif vmax[k] == best and iarg[k] < arg:
            arg = iarg[k]
    return best, float(arg)


@njit(**_jit)
def _count_nonfinite(flat, lo, hi):
    """How many of ``flat[lo:hi]`` are NaN or infinite (a vectorised count; reads only)."""
    bad = 0
    seg = flat[lo:hi]
    for k in range(seg.shape[0]):
        bad += not math.isfinite(seg[k])
    return bad


@njit(**_jit)
def _exp_into(src, dst, tmp):
    """``dst[k] = exp(src[k])`` for ``k < len(src)``, vectorised (``tmp``: scratch of ``2 len(src)``).

    LLVM cannot vectorise a call to libm's ``exp`` (Numba has no vector math
    library here), which costs 5 ns per call on this machine; this one runs
    at about 1.4 ns (NumPy's AVX-512 ``exp``: 0.9 ns). Cody-Waite reduction and a degree-13 Taylor polynomial on
    ``|r| <= ln(2)/2``: within 0.85 ulp of the exact value on [-745, 709]
    (measured against ``numpy.longdouble`` on 5.5e5 draws; tested < 1 ulp), 0 below -745.5 (and at -inf),
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
    ``k ln 2`` in Cody-Waite halves: within 0.81 ulp of the exact value (tested < 1 ulp). Any other
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


# --------------------------------------------------------------------------- signal pass
@njit(**_jit)
def _signal_chunk(x, s, labels, work, lay, c, want_states):
    """Pass 1 on chunk ``c``: class sums and counts of the valid signals, and the class state sums if asked.

    Parameters
    ----------
    x, s : ndarray (N, d)
        States and signals; only read.
    labels : ndarray (N,) int64 or (0,)
        Class of each agent; empty means every agent is class 0.
    work : ndarray (chunks, lay[LAY_WIDTH])
        Row ``c`` is written: ``signal + l dp`` (sums of valid signals of class
        ``l``), ``count + l`` (their count) and, with ``want_states``,
        ``state + l dp`` (sums of the states of class ``l``).
    lay : Layout
        Offsets (:mod:`._layout`).
    c : int
        The chunk.
    want_states : bool
        Also sum the states (the first step after a reset or a restore).

    Notes
    -----
    One class: the signals are summed in lanes (vectorised) while a register
    counts those over ``_SIGNAL_SAFE`` (:func:`_lane_sums_safe`); none, the
    common case, proves the chunk all valid. Otherwise the exact test runs
    (:func:`_lane_sums_abs`: every lane sum finite and every lane's sum of
    magnitudes at most ``SIGNAL_LIMIT``), and a chunk that fails it is summed
    again row by row, skipping invalid rows. Several classes: one row-by-row pass (:func:`_class_signal_sums`)
    that tests each row and adds a valid one to its class, in ``P``
    interleaved copies of the class sums (:func:`_copies`) folded at the end
    (:func:`_fold_copies`); the order of additions is fixed by the agents'
    order and ``K``, never by the thread count.
    """
    n, d = x.shape
    K = lay[LAY_N_CLASSES]
    lo, hi = _chunk_bounds(n, c)
    row = work[c]
    if K == 1 and labels.shape[0] == 0:
        R = _block_rows(d)
        L = R * d
        scratch = np.empty(2 * L)
        lanes = scratch[:L]
        magnitude = scratch[L:]
        sf = s.reshape(-1)
        if _lane_sums_safe(sf, lo * d, hi * d, L, lanes) == 0:
            valid = True
        else:  # the exact test (rare: the chunk is in cache now)
            _lane_sums_abs(sf, lo * d, hi * d, L, lanes, magnitude)
            valid = _count_nonfinite(lanes, 0, L) == 0 and _count_over(magnitude, 0, L) == 0
        if valid:
            count = hi - lo
            _lane_columns(lanes, d, R, row[lay[LAY_SIGNAL]:lay[LAY_SIGNAL] + d])
        else:
            count = 0
            for j in range(d):
                lanes[j] = 0.0
            for i in range(lo, hi):
                if _row_valid(s, i, d):
                    count += 1
                    for j in range(d):
                        lanes[j] += s[i, j]
            for j in range(d):
                row[lay[LAY_SIGNAL] + j] = lanes[j]
        row[lay[LAY_COUNT]] = count
        if want_states:
            _lane_sums(x.reshape(-1), lo * d, hi * d, L, lanes)
            _lane_columns(lanes, d, R, row[lay[LAY_STATE]:lay[LAY_STATE] + d])
        return
    P = _copies(K)
    width = P * K * d
    scratch = _zeros_aligned(2 * width + 2 * P * K)
    acc_s = scratch[:width]
    acc_x = scratch[width:2 * width]
    count = scratch[2 * width:2 * width + P * K]
    spare = scratch[2 * width + P * K:]  # the state pass's counts (not used)
    _class_signal_sums(s, labels, lo, hi, K, P, acc_s, count)
    if want_states:
        if labels.shape[0] > 0:
            _class_row_sums(x.reshape(-1), labels, lo, hi, lo, d, K, P, acc_x, spare)
        else:
            for i in range(lo, hi):
                a = ((i - lo) & (P - 1)) * K * d
                for j in range(d):
                    acc_x[a + j] += x[i, j]
    for l in range(K):
        total = 0.0
        for p in range(P):
            total += count[p * K + l]
        row[lay[LAY_COUNT] + l] = total
    _fold_copies(acc_s, K, d, P, row[lay[LAY_SIGNAL]:])
    if want_states:
        _fold_copies(acc_x, K, d, P, row[lay[LAY_STATE]:])


@njit(**_jit)
def _zeros_aligned(n):
    """``n`` zeros starting on a cache line (64 bytes): the class accumulators' rows never straddle two lines.

    A 32-byte row of ``d = 4`` sums that crosses a line costs split loads and
    stores, and measured up to 2x on the class signal sums.
    """
    big = np.zeros(n + PAD)
    start = (-(big.ctypes.data // 8)) % PAD
    return big[start:start + n]


@njit(**_jit)
def _copies(K):
    """Interleaved copies ``P`` of the class accumulators: row ``i`` of a chunk adds to copy ``i mod P``.

    Four copies break the store-to-load chains of consecutive rows of the same
    class (sorted labels); more than 64 classes take one (the copies would
    cost more to clear and fold than they save). Depends on ``K`` alone, so
    the order of additions does not depend on the thread count.
    """
    return COPIES if K <= 64 else 1


@njit(**_jit)
def _class_signal_sums(s, labels, lo, hi, K, P, acc, count):
    """Class sums and counts of the valid signal rows ``[lo, hi)`` (a chunk), in ``P`` interleaved copies.

    Row ``i`` of class ``l`` (``labels[i]``, or 0 when ``labels`` is empty)
    with a valid signal adds ``s[i]`` to ``acc[(p K + l) d : (p K + l + 1) d]``
    and 1 to ``count[p K + l]``, ``p = (i - lo) mod P``. The validity test is
    folded into the same loop (a separate vectorised pass over the chunk, or
    over each block, would serialise a stream from memory and a loop from
    cache; measured 0.6-1 ms per 10^6 rows more): at ``d = 4``,
    ``sum_j |s_ij| <= SIGNAL_LIMIT`` (false for NaN and infinities) proves a
    row valid, and a row that fails it is checked exactly (:func:`_row_valid`),
    so rows whose entries are each at most the limit but sum over it still
    count; other ``d`` count the row's invalid entries (:func:`_flat_row_bad`, no
    chain of dependent additions). ``d = 1`` and ``d = 4`` have
    their own loops (unsigned indices, see :func:`_move_rows_classes4`).
    """
    d = s.shape[1]
    sf = s.reshape(-1)
    m = P - 1
    if d == 4 and labels.shape[0] > 0:  # unsigned indices: see _move_rows_classes4
        base = np.uint64(lo)
        mask = np.uint64(m)
        k = np.uint64(K)
        for i in range(base, np.uint64(hi)):
            b = i * _U4
            s0 = sf[b]
            s1 = sf[b + _U1]
            s2 = sf[b + _U2]
            s3 = sf[b + _U3]
            if (abs(s0) + abs(s1)) + (abs(s2) + abs(s3)) <= SIGNAL_LIMIT or _row_valid(s, i, 4):
                c = ((i - base) & mask) * k + np.uint64(labels[i])
                count[c] += 1.0
                a = c * _U4
                acc[a] += s0
                acc[a + _U1] += s1
                acc[a + _U2] += s2
                acc[a + _U3] += s3
        return
    if d == 1 and labels.shape[0] > 0:
        base = np.uint64(lo)
        mask = np.uint64(m)
        k = np.uint64(K)
        for i in range(base, np.uint64(hi)):
            v = sf[i]
            if abs(v) <= SIGNAL_LIMIT:
                c = ((i - base) & mask) * k + np.uint64(labels[i])
                count[c] += 1.0
                acc[c] += v
        return
    has_labels = labels.shape[0] > 0  # empty labels: every agent is class 0
    base = np.uint64(lo)
    mask = np.uint64(m)
    k = np.uint64(K)
    ud = np.uint64(d)
    for i in range(base, np.uint64(hi)):
        b = i * ud
        if _flat_row_bad(sf, b, ud) == 0:
            l = np.uint64(labels[i]) if has_labels else _U0
            c = ((i - base) & mask) * k + l
            count[c] += 1.0
            a = c * ud
            for j in range(ud):
                acc[a + j] += sf[b + j]


@njit(**_jit)
def _class_row_sums(flat, labels, lo, hi, base, d, K, P, acc, count):
    """Class sums of rows ``[lo, hi)`` of ``flat`` (``(N, d)`` flattened), in ``P`` interleaved copies.

    Row ``i`` of class ``l = labels[i]`` adds ``flat[i d + j]`` to
    ``acc[(p K + l) d + j]`` and 1 to ``count[p K + l]``, ``p = (i - base) mod P``
    (``P`` a power of two, ``base`` the chunk's first row). Flat indices,
    scalars only; ``d = 4`` is unrolled (a row is four loads and four adds,
    no inner loop).
    """
    m = P - 1
    if d == 4:
        for i in range(lo, hi):
            l = labels[i]
            p = (i - base) & m
            count[p * K + l] += 1.0
            a = (p * K + l) * 4
            b = i * 4
            acc[a] += flat[b]
            acc[a + 1] += flat[b + 1]
            acc[a + 2] += flat[b + 2]
            acc[a + 3] += flat[b + 3]
    else:
        for i in range(lo, hi):
            l = labels[i]
            p = (i - base) & m
            count[p * K + l] += 1.0
            a = (p * K + l) * d
            b = i * d
            for j in range(d):
                acc[a + j] += flat[b + j]


@njit(**_jit)
def _fold_copies(acc, K, d, P, out):
    """``out[l dp + j] = sum_p acc[(p K + l) d + j]``, ``dp = _padded(d)``: the copies of each class sum, folded.

    Four copies are folded as ``(c0 + c1) + (c2 + c3)``.
    """
    dp = _padded(d)
    for l in range(K):
        for j in range(d):
            if P == 4:
                v = (acc[l * d + j] + acc[(K + l) * d + j]) + (acc[(2 * K + l) * d + j] + acc[(3 * K + l) * d + j])
            else:
                v = 0.0
                for p in range(P):
                    v += acc[(p * K + l) * d + j]
            out[l * dp + j] = v


@njit(**_jit)
def _lane_sums_abs(flat, lo, hi, L, lanes, magnitude):
    """:func:`_lane_sums` of ``flat[lo:hi]``, and ``magnitude[l]`` the sum of ``|value|`` of each lane.

    Every value is valid when every ``magnitude`` is at most ``SIGNAL_LIMIT`` (a
    sufficient test: a sum of magnitudes bounds each one; NaN and infinities
    make it fail too). Sums vectorise where a running maximum does not.
    """
    for l in range(L):
        lanes[l] = 0.0
        magnitude[l] = 0.0
    for b in range(lo, hi, L):
        seg = flat[b:min(b + L, hi)]
        for l in range(seg.shape[0]):
            v = seg[l]
            lanes[l] += v
            magnitude[l] += abs(v)


@njit(**_jit)
def _lane_sums_safe(flat, lo, hi, L, lanes):
    """:func:`_lane_sums` of ``flat[lo:hi]``; returns how many values are not at most ``_SIGNAL_SAFE`` in magnitude (NaN counts).

    A return of 0 implies :func:`_lane_sums_abs`'s test (every lane sum finite,
    every lane's sum of magnitudes at most ``SIGNAL_LIMIT``): a lane adds at most
    ``CHUNK`` values, each at most ``SIGNAL_LIMIT / (2 CHUNK)``. The count is a
    register reduction, where the magnitudes' lanes cost a load and a store per
    value (measured at N = 10^6, one thread: pass 1 at ``d = 1`` took 1.75x the old one-class kernel's
    plain lane sums with the magnitudes' lanes, 1.0-1.05x with this count).
    """
    for l in range(L):
        lanes[l] = 0.0
    bad = 0
    for b in range(lo, hi, L):
        seg = flat[b:min(b + L, hi)]
        for l in range(seg.shape[0]):
            v = seg[l]
            lanes[l] += v
            bad += 0 if abs(v) <= _SIGNAL_SAFE else 1
    return bad


@njit(**_jit)
def _count_over(flat, lo, hi):
    """How many of ``flat[lo:hi]`` are not at most ``SIGNAL_LIMIT`` in magnitude (NaN counts)."""
    bad = 0
    seg = flat[lo:hi]
    for k in range(seg.shape[0]):
        bad += 0 if abs(seg[k]) <= SIGNAL_LIMIT else 1
    return bad


@njit(**_jit)
def _flat_row_bad(sf, b, d):
    """How many of ``sf[b:b + d]`` are not at most ``SIGNAL_LIMIT`` in magnitude (NaN counts).

    Indexes the flat array instead of slicing it: a slice per agent would cost
    a reference-count update (an atomic) per agent.
    """
    bad = 0
    for j in range(d):
        bad += 0 if abs(sf[b + j]) <= SIGNAL_LIMIT else 1
    return bad


@njit(**_jit)
def _row_valid(s, i, d):
    """Row ``i`` of ``s`` is valid: every entry finite and at most ``SIGNAL_LIMIT`` in magnitude."""
    ok = True
    for j in range(d):
        if not abs(s[i, j]) <= SIGNAL_LIMIT:
            ok = False
    return ok


@njit(**_jit)
def _signal_serial(x, s, labels, work, lay, want_states):
    """Pass 1 on one thread: :func:`_signal_chunk` for every chunk, in order (writes ``work``)."""
    for c in range(work.shape[0]):
        _signal_chunk(x, s, labels, work, lay, c, want_states)


@njit(parallel=True, **_jit)
def _signal_parallel(x, s, labels, work, lay, want_states):
    """Pass 1 with the chunks spread over the threads (``prange``); the same rows as :func:`_signal_serial`."""
    for c in prange(work.shape[0]):
        _signal_chunk(x, s, labels, work, lay, np.int64(c), want_states)


# --------------------------------------------------------------------------- merges
@njit(**_jit)
def _merge_class_states(work, lay, coef, field, class_row, global_row):
    """Class means ``field[class_row + l] = sum_c state sums / size_l`` (0 for an empty class) and ``field[global_row]``.

    Reads the ``state`` columns of every ``work`` row in chunk order and
    ``coef[:, SIZE]``; the global mean is the sum over classes of the class
    sums divided by ``N = sum_l size_l``.
    """
    K, d = lay[LAY_N_CLASSES], lay[LAY_DIM]
    dp = _padded(d)
    n_total = 0.0
    for l in range(K):
        n_total += coef[l, SIZE]
    for j in range(d):
        field[global_row, j] = 0.0
    for l in range(K):
        size = coef[l, SIZE]
        for j in range(d):
            total = 0.0
            for c in range(work.shape[0]):
                total += work[c, lay[LAY_STATE] + l * dp + j]
            field[class_row + l, j] = total / size if size > 0 else 0.0
            field[global_row, j] += total
    for j in range(d):
        field[global_row, j] /= n_total


@njit(**_jit)
def _merge_signals(work, lay, coef, mix, field, want_states):
    """Merge pass 1 (see :func:`merge_signals`); returns the number of valid signals."""
    K, d = lay[LAY_N_CLASSES], lay[LAY_DIM]
    dp = _padded(d)
    total_count = 0.0
    for l in range(K):
        total_count += _column_sum(work, lay[LAY_COUNT] + l)
    for j in range(d):
        acc = 0.0
        for l in range(K):
            count = _column_sum(work, lay[LAY_COUNT] + l)
            total = _column_sum(work, lay[LAY_SIGNAL] + l * dp + j)
            if count > 0:
                field[lay[LAY_CLASS_SIGNAL] + l, j] = total / count
            acc += total
        if total_count > 0:
            field[lay[LAY_FIELD_SIGNAL], j] = acc / total_count
    if want_states:
        _merge_class_states(work, lay, coef, field, lay[LAY_CLASS_STATE], lay[LAY_FIELD_STATE])
    for k in range(K):
        for j in range(d):
            acc = 0.0
            for l in range(K):
                sbar_l = field[lay[LAY_CLASS_SIGNAL] + l, j]
                m_l = field[lay[LAY_CLASS_STATE] + l, j]
                acc += mix[MIX_SIGNAL, k, l] * sbar_l + mix[MIX_STATE, k, l] * m_l
            # Column K: the means over all agents (see _layout); added after the classes' terms, as the reference does.
            acc += mix[MIX_SIGNAL, k, K] * field[lay[LAY_FIELD_SIGNAL], j] + mix[MIX_STATE, k, K] * field[lay[LAY_FIELD_STATE], j]
            field[lay[LAY_OFFSET] + k, j] = acc
    return int(total_count)


@njit(**_jit)
def _column_sum(work, col):
    """``sum_c work[c, col]`` in chunk order."""
    total = 0.0
    for c in range(work.shape[0]):
        total += work[c, col]
    return total


@njit(**_jit)
def _merge_move(work, lay, coef, field, predict, yhat):
    """Merge pass 2 (see :func:`merge_move`); returns ``(max_J, argmax_J)``."""
    _merge_class_states(work, lay, coef, field, lay[LAY_CLASS_NEXT], lay[LAY_FIELD_NEXT])
    if predict:
        for j in range(lay[LAY_DIM]):
            yhat[j] = _column_sum(work, lay[LAY_MIXTURE] + j)
    jmax = -np.inf
    jarg = -1.0
    for c in range(work.shape[0]):
        if work[c, lay[LAY_MAX_COST]] > jmax:
            jmax = work[c, lay[LAY_MAX_COST]]
            jarg = work[c, lay[LAY_ARG_COST]]
    return jmax, int(jarg)


@njit(**_jit)
def _fold_rows(work, lay, out):
    """Fold every row of ``work`` into ``out`` (sums in row order; the worst cost over rows, first on ties)."""
    for k in range(out.shape[0]):
        out[k] = _column_sum(work, k)
    jmax = -np.inf
    jarg = -1.0
    for c in range(work.shape[0]):
        if work[c, lay[LAY_MAX_COST]] > jmax:
            jmax = work[c, lay[LAY_MAX_COST]]
            jarg = work[c, lay[LAY_ARG_COST]]
    out[lay[LAY_MAX_COST]] = jmax
    out[lay[LAY_ARG_COST]] = jarg


# --------------------------------------------------------------------------- move pass
@njit(**_jit)
def _move_rows(x, s, labels, J, lay, coef, field, half_discount, lo, hi, all_valid, lanes):
    """One class: policy step and stage cost of rows ``[lo, hi)``, in place (``x`` and ``J`` written).

    Reads row 0 of ``coef`` (gain, signal weight, q, kappa, r), ``field[offset]``
    (the policy offset) and ``field[field_state]`` (``m(t)``, the centre of the
    kappa term). ``all_valid``: every signal of these rows is known to be
    valid; otherwise each block is checked (in L1, vectorised) and a block
    holding an invalid row is done row by row.

    The block loop is element-wise over ``L = R d`` contiguous values; the
    per-coordinate offset and centre are replicated once into length-``L``
    patterns and the five coefficients stay scalars, so LLVM vectorises it
    (per-value coefficient patterns, as a K-class version would need, cost
    more to fill than they save: several classes take :func:`_move_rows_classes`).

    ``lanes`` (``L`` values) gets :func:`_lane_sums` of the moved states of
    these rows, block by block as each block is moved: the same additions in the
    same order as a sweep after the move, without reading the rows again.
    """
    n, d = x.shape
    R = _block_rows(d)
    L = R * d
    xf = x.reshape(-1)
    sf = s.reshape(-1)
    gain = coef[0, GAIN]
    weight = coef[0, SIGNAL]
    q = coef[0, Q]
    kappa = coef[0, KAPPA]
    r = coef[0, R_]
    scratch = np.empty(3 * L)
    offset = scratch[:L]       # the policy offset of coordinate j, replicated
    centre = scratch[L:2 * L]  # m_j, replicated
    terms = scratch[2 * L:]    # per-coordinate stage costs of the current block
    for k in range(R):
        for j in range(d):
            offset[k * d + j] = field[lay[LAY_OFFSET], j]
            centre[k * d + j] = field[lay[LAY_FIELD_STATE], j]
    for v in range(L):
        lanes[v] = 0.0
    for rb in range(lo, hi, R):
        rows = min(R, hi - rb)
        xb = xf[rb * d:(rb + rows) * d]
        sb = sf[rb * d:(rb + rows) * d]
        if all_valid or _count_over(sb, 0, sb.shape[0]) == 0:
            for v in range(xb.shape[0]):
                xi = xb[v]
                si = sb[v]
                u = -gain * (xi - weight * si - offset[v])
                e_s = xi - si
                e_m = xi - centre[v]
                terms[v] = q * e_s * e_s + kappa * e_m * e_m + r * u * u
                xn = xi + u
                xb[v] = xn
                lanes[v] += xn
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
        else:  # an agent without a valid signal holds and pays only the kappa term
            for k in range(rows):
                i = rb + k
                cost = 0.0
                if _row_valid(s, i, d):
                    for j in range(d):
                        xi = x[i, j]
                        si = s[i, j]
                        u = -gain * (xi - weight * si - offset[j])
                        e_s = xi - si
                        e_m = xi - centre[j]
                        cost += q * e_s * e_s + kappa * e_m * e_m + r * u * u
                        x[i, j] = xi + u
                else:
                    for j in range(d):
                        e_m = x[i, j] - centre[j]
                        cost += kappa * e_m * e_m
                J[i] += half_discount * cost
            for v in range(xb.shape[0]):
                lanes[v] += xb[v]


@njit(**_jit)
def _class_table(lay, coef, field, K, d, table):
    """Each class's policy and cost coefficients in one contiguous row of ``table`` (``K x (5 + d)``).

    Row ``l``: ``gain_l, signal_l, q_l, kappa_l, r_l`` and the ``d`` values of
    ``field[offset + l]``, so an agent's coefficients are one short run of
    memory (one cache line for ``d <= 3``, two for ``d <= 11``).
    """
    w = 5 + d
    for l in range(K):
        table[l * w] = coef[l, GAIN]
        table[l * w + 1] = coef[l, SIGNAL]
        table[l * w + 2] = coef[l, Q]
        table[l * w + 3] = coef[l, KAPPA]
        table[l * w + 4] = coef[l, R_]
        for j in range(d):
            table[l * w + 5 + j] = field[lay[LAY_OFFSET] + l, j]


@njit(**_jit)
def _move_rows_classes(x, s, labels, J, lay, field, half_discount, lo, hi, table, P, acc, all_valid):
    """:func:`_move_rows` for several classes, agent by agent, also summing the moved states per class.

    Reads ``labels[i]`` (the class ``l`` of agent ``i``; empty: class 0) and
    row ``l`` of ``table`` (:func:`_class_table`); writes ``x`` and ``J`` in
    place and adds each moved state to ``acc[(p K + l) d : (p K + l + 1) d]``,
    ``p = (i - lo) mod P`` (:func:`_copies`; agent order: deterministic). One
    loop over the rows, so the class sums cost no second read of the chunk.
    ``all_valid``: pass 1 found every signal of these rows valid (no per-row check).

    The stage cost is summed per kind, ``J_i += gamma^t/2 (q_l E + kappa_l F + r_l U)``
    with ``E = sum_j (x_ij - s_ij)^2``, ``F = sum_j (x_ij - m_j)^2``,
    ``U = sum_j u_ij^2``: three multiplications by the class's weights per
    agent instead of three per coordinate. ``d = 1`` and ``d = 4`` with labels
    and every signal valid have their own loops (:func:`_move_rows_classes1`,
    :func:`_move_rows_classes4`).
    """
    d = x.shape[1]
    K = lay[LAY_N_CLASSES]
    fs = lay[LAY_FIELD_STATE]
    has_labels = labels.shape[0] > 0  # empty labels: every agent is class 0
    if d == 1 and has_labels and all_valid:
        _move_rows_classes1(x.reshape(-1), s.reshape(-1), labels, J, field[fs, 0], half_discount, lo, hi, table, K, P, acc)
        return
    if d == 4 and has_labels and all_valid:
        _move_rows_classes4(x.reshape(-1), s.reshape(-1), labels, J, field[fs], half_discount, lo, hi, table, K, P, acc)
        return
    xf = x.reshape(-1)
    sf = s.reshape(-1)
    centre = field[fs]
    # Unsigned indices (see _move_rows_classes4); scalars and flat indexing only inside the
    # loop: a row view per agent would cost a reference-count update (an atomic) per agent.
    base = np.uint64(lo)
    mask = np.uint64(P - 1)
    k = np.uint64(K)
    ud = np.uint64(d)
    w = np.uint64(5 + d)
    for i in range(base, np.uint64(hi)):
        l = np.uint64(labels[i]) if has_labels else _U0
        t = l * w
        a = (((i - base) & mask) * k + l) * ud
        b = i * ud
        if all_valid or _flat_row_bad(sf, b, ud) == 0:
            gain = table[t]
            weight = table[t + _U1]
            o = t + _U5
            # four partial sums per kind (coordinates j mod 4), added as (p0 + p1) + (p2 + p3): one running sum
            # per kind would chain d dependent additions per agent
            E0 = F0 = U0 = E1 = F1 = U1 = E2 = F2 = U2 = E3 = F3 = U3 = 0.0
            j = _U0
            while j + _U4 <= ud:
                e, f, u = _class_coordinate(xf, sf, b + j, table[o + j], centre[j], gain, weight, acc, a + j)
                E0 += e
                F0 += f
                U0 += u
                e, f, u = _class_coordinate(xf, sf, b + j + _U1, table[o + j + _U1], centre[j + _U1], gain, weight, acc,
                                            a + j + _U1)
                E1 += e
                F1 += f
                U1 += u
                e, f, u = _class_coordinate(xf, sf, b + j + _U2, table[o + j + _U2], centre[j + _U2], gain, weight, acc,
                                            a + j + _U2)
                E2 += e
                F2 += f
                U2 += u
                e, f, u = _class_coordinate(xf, sf, b + j + _U3, table[o + j + _U3], centre[j + _U3], gain, weight, acc,
                                            a + j + _U3)
                E3 += e
                F3 += f
                U3 += u
                j += _U4
            while j < ud:
                e, f, u = _class_coordinate(xf, sf, b + j, table[o + j], centre[j], gain, weight, acc, a + j)
                E0 += e
                F0 += f
                U0 += u
                j += _U1
            E = (E0 + E1) + (E2 + E3)
            F = (F0 + F1) + (F2 + F3)
            U = (U0 + U1) + (U2 + U3)
            J[i] += half_discount * (table[t + _U2] * E + table[t + _U3] * F + table[t + _U4] * U)
        else:  # an agent without a valid signal holds and pays only the kappa term
            F = 0.0
            for j in range(ud):
                xi = xf[b + j]
                e_m = xi - centre[j]
                F += e_m * e_m
                acc[a + j] += xi
            J[i] += half_discount * (table[t + _U3] * F)


@njit(**_jit)
def _class_coordinate(xf, sf, v, offset, centre, gain, weight, acc, a):
    """Coordinate ``v`` of the flat states: move it, add it to ``acc[a]``; returns ``(e^2, f^2, u^2)``.

    ``u = -gain (x - weight s - offset)``, ``e = x - s``, ``f = x - centre``
    (``x`` before the move), then ``x += u``.
    """
    xi = xf[v]
    si = sf[v]
    u = -gain * (xi - weight * si - offset)
    e = xi - si
    f = xi - centre
    xi += u
    xf[v] = xi
    acc[a] += xi
    return e * e, f * f, u * u


@njit(**_jit)
def _move_rows_classes1(xf, sf, labels, J, centre, half_discount, lo, hi, table, K, P, acc):
    """:func:`_move_rows_classes` for ``d = 1``, every signal valid (``centre``: ``m(t)``, a number).

    No coordinate loop; unsigned indices (see :func:`_move_rows_classes4`).
    """
    base = np.uint64(lo)
    mask = np.uint64(P - 1)
    k = np.uint64(K)
    for i in range(base, np.uint64(hi)):
        l = np.uint64(labels[i])
        t = l * _U6
        x0 = xf[i]
        s0 = sf[i]
        u = -table[t] * (x0 - table[t + _U1] * s0 - table[t + _U5])
        e = x0 - s0
        f = x0 - centre
        J[i] += half_discount * (table[t + _U2] * (e * e) + table[t + _U3] * (f * f) + table[t + _U4] * (u * u))
        x0 += u
        xf[i] = x0
        acc[((i - base) & mask) * k + l] += x0


@njit(**_jit)
def _move_rows_classes4(xf, sf, labels, J, centre, half_discount, lo, hi, table, K, P, acc):
    """:func:`_move_rows_classes` for ``d = 4``, every signal valid: the coordinate loop unrolled.

    Same formulas; the per-kind sums are ``(v_0 + v_1) + (v_2 + v_3)``.
    ``xf``, ``sf``: the flat states and signals; ``centre``: ``m(t)``. Every
    index is unsigned (``_U*`` constants): Numba then drops its negative-index
    wrap-around (a sign test and a select per access), a fifth of the loop's
    instructions, and this loop is bound by instructions, not memory.
    """
    m0 = centre[0]
    m1 = centre[1]
    m2 = centre[2]
    m3 = centre[3]
    base = np.uint64(lo)
    mask = np.uint64(P - 1)
    k = np.uint64(K)
    for i in range(base, np.uint64(hi)):
        l = np.uint64(labels[i])
        t = l * _U9
        gain = table[t]
        weight = table[t + _U1]
        b = i * _U4
        x0 = xf[b]
        x1 = xf[b + _U1]
        x2 = xf[b + _U2]
        x3 = xf[b + _U3]
        s0 = sf[b]
        s1 = sf[b + _U1]
        s2 = sf[b + _U2]
        s3 = sf[b + _U3]
        u0 = -gain * (x0 - weight * s0 - table[t + _U5])
        u1 = -gain * (x1 - weight * s1 - table[t + _U6])
        u2 = -gain * (x2 - weight * s2 - table[t + _U7])
        u3 = -gain * (x3 - weight * s3 - table[t + _U8])
        e0 = x0 - s0
        e1 = x1 - s1
        e2 = x2 - s2
        e3 = x3 - s3
        f0 = x0 - m0
        f1 = x1 - m1
        f2 = x2 - m2
        f3 = x3 - m3
        E = (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
        F = (f0 * f0 + f1 * f1) + (f2 * f2 + f3 * f3)
        U = (u0 * u0 + u1 * u1) + (u2 * u2 + u3 * u3)
        J[i] += half_discount * (table[t + _U2] * E + table[t + _U3] * F + table[t + _U4] * U)
        x0 += u0
        x1 += u1
        x2 += u2
        x3 += u3
        xf[b] = x0
        xf[b + _U1] = x1
        xf[b + _U2] = x2
        xf[b + _U3] = x3
        a = (((i - base) & mask) * k + l) * _U4
        acc[a] += x0
        acc[a + _U1] += x1
        acc[a + _U2] += x2
        acc[a + _U3] += x3


@njit(**_jit)
def _move_chunk(x, s, labels, J, work, lay, coef, field, half_discount, log_p, c):
    """Pass 2 on chunk ``c``: :func:`_move_rows`, then (chunk in cache) its partials for step t+1.

    Writes row ``c`` of ``work``: ``state + l dp`` (class sums of the moved
    states), ``max_cost``/``arg_cost`` (largest updated cost, first agent)
    and, when ``log_p`` has one entry per agent, ``mixture`` (``sum_i
    exp(log_p_i) x_i(t+1)``). Reads ``count`` (left by pass 1) to know whether
    the whole chunk's signals are valid.
    """
    n, d = x.shape
    K = lay[LAY_N_CLASSES]
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    row = work[c]
    predict = log_p.shape[0] == n
    extra = 3 * _exp_rows(R) if predict else 0
    scratch = np.empty(L + 2 * MAX_LANES + extra)
    lanes = scratch[:L]
    xf = x.reshape(-1)
    if K == 1 and labels.shape[0] == 0:
        _move_rows(x, s, labels, J, lay, coef, field, half_discount, lo, hi, row[lay[LAY_COUNT]] == hi - lo, lanes)
        _lane_columns(lanes, d, R, row[lay[LAY_STATE]:lay[LAY_STATE] + d])
    else:
        P = _copies(K)
        space = _zeros_aligned(P * K * d + K * (5 + d))
        acc = space[:P * K * d]
        table = space[P * K * d:]
        _class_table(lay, coef, field, K, d, table)
        valid = 0.0
        for l in range(K):
            valid += row[lay[LAY_COUNT] + l]
        _move_rows_classes(x, s, labels, J, lay, field, half_discount, lo, hi, table, P, acc, valid == hi - lo)
        _fold_copies(acc, K, d, P, row[lay[LAY_STATE]:])
    jmax, jarg = _max_arg(J, lo, hi, scratch[L:L + MAX_LANES], scratch[L + MAX_LANES:L + 2 * MAX_LANES])
    row[lay[LAY_MAX_COST]] = jmax
    row[lay[LAY_ARG_COST]] = jarg
    if predict:
        _weighted_lane_sums(log_p, xf, lo, hi, d, R, lanes, scratch[L + 2 * MAX_LANES:], scratch[:0])
        _lane_columns(lanes, d, R, row[lay[LAY_MIXTURE]:lay[LAY_MIXTURE] + d])


@njit(**_jit)
def _move_serial(x, s, labels, J, work, lay, coef, field, half_discount, log_p):
    """Pass 2 on one thread: :func:`_move_chunk` for every chunk (writes ``x``, ``J``, ``work``)."""
    for c in range(work.shape[0]):
        _move_chunk(x, s, labels, J, work, lay, coef, field, half_discount, log_p, c)


@njit(parallel=True, **_jit)
def _move_parallel(x, s, labels, J, work, lay, coef, field, half_discount, log_p):
    """Pass 2 with the chunks spread over the threads; bitwise the same as :func:`_move_serial`."""
    for c in prange(work.shape[0]):
        _move_chunk(x, s, labels, J, work, lay, coef, field, half_discount, log_p, np.int64(c))


@njit(**_jit)
def _fused_serial(x, s, labels, J, work, lay, coef, mix, field, have_mean, half_discount, log_p, yhat):
    """Both passes and both merges on one thread (the same functions the two-pass API runs)."""
    for c in range(work.shape[0]):
        _signal_chunk(x, s, labels, work, lay, c, not have_mean)
    n_valid = _merge_signals(work, lay, coef, mix, field, not have_mean)
    for c in range(work.shape[0]):
        _move_chunk(x, s, labels, J, work, lay, coef, field, half_discount, log_p, c)
    jmax, jarg = _merge_move(work, lay, coef, field, log_p.shape[0] == x.shape[0], yhat)
    return n_valid, jmax, jarg


@njit(parallel=True, **_jit)
def _fused_parallel(x, s, labels, J, work, lay, coef, mix, field, have_mean, half_discount, log_p, yhat):
    """:func:`_fused_serial` with each pass's chunks spread over the threads."""
    for c in prange(work.shape[0]):
        _signal_chunk(x, s, labels, work, lay, np.int64(c), not have_mean)
    n_valid = _merge_signals(work, lay, coef, mix, field, not have_mean)
    for c in prange(work.shape[0]):
        _move_chunk(x, s, labels, J, work, lay, coef, field, half_discount, log_p, np.int64(c))
    jmax, jarg = _merge_move(work, lay, coef, field, log_p.shape[0] == x.shape[0], yhat)
    return n_valid, jmax, jarg


# --------------------------------------------------------------------------- server
@njit(**_jit)
def _predict_chunk(log_p, x, centre, work, lay, c):
    """Row ``c`` of ``work`` at ``mixture``: ``sum_i exp(log_p_i) (x_i - centre)`` over chunk ``c`` (lanes, vectorised exp).

    ``centre``: (d,), or empty for ``sum_i exp(log_p_i) x_i``.
    """
    n, d = x.shape
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    scratch = np.empty(L + 3 * _exp_rows(R))
    _weighted_lane_sums(log_p, x.reshape(-1), lo, hi, d, R, scratch[:L], scratch[L:], centre)
    _lane_columns(scratch[:L], d, R, work[c, lay[LAY_MIXTURE]:lay[LAY_MIXTURE] + d])


@njit(**_jit)
def _predict_serial(log_p, x, centre, work, lay, out):
    """``out = sum_i exp(log_p_i) (x_i - centre)``: each chunk's partial into ``work``, then summed in chunk order."""
    for c in range(work.shape[0]):
        _predict_chunk(log_p, x, centre, work, lay, c)
    for j in range(x.shape[1]):
        out[j] = _column_sum(work, lay[LAY_MIXTURE] + j)


@njit(parallel=True, **_jit)
def _predict_parallel(log_p, x, centre, work, lay, out):
    """:func:`_predict_serial` with the chunks spread over the threads (the same bits)."""
    for c in prange(work.shape[0]):
        _predict_chunk(log_p, x, centre, work, lay, np.int64(c))
    for j in range(x.shape[1]):
        out[j] = _column_sum(work, lay[LAY_MIXTURE] + j)


@njit(**_jit)
def _clip_step(v):
    """``eta * loss`` clipped to ``[-STEP_LIMIT, STEP_LIMIT]``, the finite doubles (only +-inf is clipped).

    NaN (an overflow, inf - inf) becomes ``STEP_LIMIT``.
    """
    if v > STEP_LIMIT or v != v:
        return STEP_LIMIT
    return -STEP_LIMIT if v < -STEP_LIMIT else v


@njit(**_jit)
def _reweight_chunk(log_p, x, y, err, rule, eta, work, lay, c):
    """Gradient step on the log-weights of chunk ``c`` (in place), and the chunk's log-sum-exp pieces.

    ``log_p_i -= clip(eta loss_i)`` (see :func:`_clip_step`; no step when
    ``eta == 0``): hedge ``|x_i - y|^2``, eg ``2 <err, x_i - centre>`` with
    ``err`` the mixture's error ``sum_k p_k (x_k - y)`` and ``centre`` the
    reference's ``eg_centre(y, err)`` (``y_j``, 0 where ``err_j = 0``): one
    subtraction per value more than ``2 <err, x_i>``, and no rounding at
    the level of the values. ``work[c, lse_top]`` gets the largest stepped log-weight of
    the chunk and ``work[c, lse_sum]`` the sum of ``exp(log_p_i - top)``: per
    block of rows, the block's maximum, then its exponentials (vectorised),
    folded into the chunk's running pair in block order.
    """
    n, d = x.shape
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    xf = x.reshape(-1)
    scratch = np.empty(3 * L + 4 * R)
    ref = scratch[:L]              # y_j (hedge) or err_j (eg), replicated
    terms = scratch[L:2 * L]       # per-coordinate losses of the block
    cen = scratch[2 * L:3 * L]     # eg's centre, replicated
    shifted = scratch[3 * L:3 * L + R]
    tmp = scratch[3 * L + R:]      # exp's scratch (2 R) and its output (R)
    for k in range(R):
        for j in range(d):
            ref[k * d + j] = err[j] if rule == RULE_EG else y[j]
            cen[k * d + j] = y[j] if err[j] != 0.0 else 0.0
    scale = 2.0 if rule == RULE_EG else 1.0
    top = -np.inf
    scaled = 0.0
    for rb in range(lo, hi, R):
        rows = min(R, hi - rb)
        lp = log_p[rb:rb + rows]
        if eta != 0.0:
            xb = xf[rb * d:(rb + rows) * d]
            if rule == RULE_EG:
                for v in range(xb.shape[0]):  # a zero factor, a zero term: x at the centre adds 0 (not 0 * inf)
                    dv = xb[v] - cen[v]
                    terms[v] = ref[v] * dv if dv != 0.0 else 0.0
            else:
                for v in range(xb.shape[0]):
                    e = xb[v] - ref[v]
                    terms[v] = e * e
            # eg's factor 2 after the sum, as the reference and Cython: 2 err_j alone may overflow where the step does not
            if d == 1:
                for k in range(rows):
                    lp[k] -= _clip_step(eta * (scale * terms[k]))
            else:
                for k in range(rows):
                    loss = 0.0
                    for j in range(d):
                        loss += terms[k * d + j]
                    lp[k] -= _clip_step(eta * (scale * loss))
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
    work[c, lay[LAY_LSE_TOP]] = top
    work[c, lay[LAY_LSE_SUM]] = scaled


@njit(**_jit)
def _merge_log_sum_exp(work, lay):
    """``(top, log_total)``: ``log sum_i p_i = top + log_total`` from the chunks' pieces, in chunk order."""
    top = -np.inf
    for c in range(work.shape[0]):
        top = max(top, work[c, lay[LAY_LSE_TOP]])
    total = 0.0
    if top == -np.inf:
        return top, 0.0
    for c in range(work.shape[0]):
        if work[c, lay[LAY_LSE_TOP]] != -np.inf:
            total += work[c, lay[LAY_LSE_SUM]] * math.exp(work[c, lay[LAY_LSE_TOP]] - top)
    return top, math.log(total)


@njit(**_jit)
def _share_range(log_p, top, log_total, alpha, n_total, lo, hi):
    """Normalise rows ``[lo, hi)`` and mix with the uniform law over ``n_total`` agents, in place.

    ``log p <- (log p - top) - log_total`` (``top`` first: exact when the
    log-weights are large and nearly tied), then ``p <- (1-alpha) p + alpha/N``
    in the log domain. ``n_total`` is the whole population's N, which a Dask
    shard (holding a slice) passes in.

    For ``0 < alpha < 1``: ``log((1-alpha) exp(log_p) + alpha/N)``, in
    sweeps of ``SHARE_ROWS`` rows through the vectorised :func:`_exp_into`
    and :func:`_log_into`. Both are element-wise, so each result depends on
    its own input alone, not on ``lo``/``hi`` or the sweep boundaries (the
    Dask backend's exact mode relies on this). The sum is at least
    ``alpha/N``, a normal number unless ``alpha/N < _SHARE_FLOOR_MIN``, where
    the scalar ``max + log1p(exp(-|.|))`` form is used instead.
    """
    if top == -np.inf:  # every weight was 0: nothing to normalise (cannot happen from normalised weights)
        top, log_total = 0.0, 0.0
    if alpha == 0.0:
        for i in range(lo, hi):
            log_p[i] = (log_p[i] - top) - log_total
    elif alpha == 1.0:
        uniform = -math.log(n_total)
        for i in range(lo, hi):
            log_p[i] = uniform
    elif alpha / n_total < _SHARE_FLOOR_MIN:
        keep = math.log1p(-alpha)
        spread = math.log(alpha / n_total)
        for i in range(lo, hi):
            a = keep + ((log_p[i] - top) - log_total)
            hi_ = max(a, spread)
            log_p[i] = hi_ + math.log1p(math.exp(-abs(a - spread)))
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
                sb[k] = (lp[k] - top) - log_total
            wb = w[:m]
            _exp_into(sb, wb, tmp[:2 * m])
            for k in range(m):
                wb[k] = keep * wb[k] + floor
            _log_into(wb, lp, tmp[:2 * m])


@njit(**_jit)
def _reweight_serial(log_p, x, y, err, rule, eta, work, lay):
    """The server's gradient step on every chunk (:func:`_reweight_chunk`): writes ``log_p`` and ``work``."""
    for c in range(work.shape[0]):
        _reweight_chunk(log_p, x, y, err, rule, eta, work, lay, c)


@njit(parallel=True, **_jit)
def _reweight_parallel(log_p, x, y, err, rule, eta, work, lay):
    """:func:`_reweight_serial` with the chunks spread over the threads (the same bits)."""
    for c in prange(work.shape[0]):
        _reweight_chunk(log_p, x, y, err, rule, eta, work, lay, np.int64(c))


@njit(**_jit)
def _share_serial(log_p, top, log_total, alpha, n_total):
    """Normalise and fixed-share every chunk of ``log_p`` in place (:func:`_share_range`)."""
    for c in range(-(-log_p.shape[0] // CHUNK)):
        lo, hi = _chunk_bounds(log_p.shape[0], c)
        _share_range(log_p, top, log_total, alpha, n_total, lo, hi)


@njit(parallel=True, **_jit)
def _share_parallel(log_p, top, log_total, alpha, n_total):
    """:func:`_share_serial` with the chunks spread over the threads (element-wise: the same bits)."""
    for c in prange(-(-log_p.shape[0] // CHUNK)):
        lo, hi = _chunk_bounds(log_p.shape[0], np.int64(c))
        _share_range(log_p, top, log_total, alpha, n_total, lo, hi)


# --------------------------------------------------------------------------- public (see _reference for semantics)
def signal_pass(x, s, labels, work, lay, want_states, threads):
    """Pass 1 of the population step; semantics: :func:`memoa_fast.kernels._reference.signal_pass`."""
    if threads == 1:
        return _signal_serial(x, s, labels, work, lay[:], bool(want_states))
    with Threads(threads):
        return _signal_parallel(x, s, labels, work, lay[:], bool(want_states))


def merge_signals(work, lay, coef, mix, field, want_states):
    """Merge of pass 1; semantics: :func:`memoa_fast.kernels._reference.merge_signals`."""
    return _merge_signals(work, lay[:], coef, mix, field, bool(want_states))


def move_pass(x, s, labels, J, work, lay, coef, field, discount, log_p, threads):
    """Pass 2 of the population step; semantics: :func:`memoa_fast.kernels._reference.move_pass`."""
    if threads == 1:
        return _move_serial(x, s, labels, J, work, lay[:], coef, field, 0.5 * discount, log_p)
    with Threads(threads):
        return _move_parallel(x, s, labels, J, work, lay[:], coef, field, 0.5 * discount, log_p)


def merge_move(work, lay, coef, field, predict, yhat):
    """Merge of pass 2; semantics: :func:`memoa_fast.kernels._reference.merge_move`."""
    return _merge_move(work, lay[:], coef, field, bool(predict), yhat)


def fold_rows(work, lay, out):
    """Fold a shard's chunk rows into one; semantics: :func:`memoa_fast.kernels._reference.fold_rows`."""
    _fold_rows(work, lay[:], out)


def fused_step(x, s, labels, J, work, lay, coef, mix, field, have_mean, discount, log_p, yhat, threads):
    """One whole population step in two passes over memory; returns ``(n_valid, max_J, argmax_J)``.

    Semantics: :func:`memoa_fast.kernels._reference.fused_step`. The same
    chunk and merge functions as :func:`signal_pass`, :func:`merge_signals`,
    :func:`move_pass` and :func:`merge_move` (which a Dask shard and its client
    run), in one compiled call.

    Why two passes and not one: every ``u_i`` needs ``sbar(t)``, the mean of
    all this step's signals, which arrive with the step, so all signals are
    read once before any state may move. ``m(t)`` costs no pass: it was
    summed by the previous step's pass 2. The server's reweighting cannot
    join pass 2: it needs the target ``y(t+1)``, which arrives after the
    step, and its normalisation needs the total over all agents before any
    weight can be written. Bytes moved per agent: ``8 d`` (pass 1) +
    ``24 d + 16`` (pass 2) + ``8`` with the mixture.
    """
    if threads == 1:
        return _fused_serial(x, s, labels, J, work, lay[:], coef, mix, field, bool(have_mean), 0.5 * discount, log_p, yhat)
    with Threads(threads):
        return _fused_parallel(x, s, labels, J, work, lay[:], coef, mix, field, bool(have_mean), 0.5 * discount, log_p, yhat)


def mixture_predict(log_p, x, work, lay, out, threads, centre=None):
    """``out = sum_i exp(log_p_i) (x_i - centre)``; semantics: :func:`memoa_fast.kernels._reference.mixture_predict`."""
    centre = _NO_CENTRE if centre is None else centre
    if threads == 1:
        return _predict_serial(log_p, x, centre, work, lay[:], out)
    with Threads(threads):
        return _predict_parallel(log_p, x, centre, work, lay[:], out)


_NO_CENTRE = np.empty(0)  # mixture_predict without a centre: sum_i p_i x_i (no subtraction in the loop)


def mixture_reweight(log_p, x, y, err, rule, eta, work, lay, threads):
    """First pass of a server update; semantics: :func:`memoa_fast.kernels._reference.mixture_reweight`."""
    if threads == 1:
        return _reweight_serial(log_p, x, y, err, rule, eta, work, lay[:])
    with Threads(threads):
        return _reweight_parallel(log_p, x, y, err, rule, eta, work, lay[:])


def merge_log_sum_exp(work, lay):
    """``(top, log_total)``; semantics: :func:`memoa_fast.kernels._reference.merge_log_sum_exp`."""
    return _merge_log_sum_exp(work, lay[:])


def mixture_share(log_p, top, log_total, alpha, n_total, threads):
    """Second pass of a server update; semantics: :func:`memoa_fast.kernels._reference.mixture_share`."""
    if threads == 1:
        return _share_serial(log_p, top, log_total, alpha, n_total)
    with Threads(threads):
        return _share_parallel(log_p, top, log_total, alpha, n_total)


def mixture_update(log_p, x, y, err, rule, eta, alpha, work, lay, threads):
    """Both passes of a server update; semantics: :func:`memoa_fast.kernels._reference.mixture_update`."""
    mixture_reweight(log_p, x, y, err, rule, eta, work, lay, threads)
    top, log_total = _merge_log_sum_exp(work, lay[:])
    mixture_share(log_p, top, log_total, alpha, log_p.shape[0], threads)


# Numba's cache of this module also checks the files it takes values from (kernels/_seal.py).
seal(globals())
