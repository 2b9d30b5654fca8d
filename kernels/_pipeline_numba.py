"""Numba kernel of the fused pipeline round: forecasters, server and population in two passes.

Semantics: :mod:`._pipeline_reference` (the specification, whose docstring
lists the arrays). One round is two passes over the clients, in chunks of
``CHUNK`` clients with one ``work`` row of partials per chunk, merged serially
in chunk order, so every result is bitwise the same on any thread count:

- pass A (:func:`_pass_a_chunk`): the server's step on the previous states
  and its log-sum-exp pieces, the clients' squared errors, the counter-based
  normals, the NLMS update and forecast, the valid-signal sums;
- merge A (:func:`_merge_a`): ``(top, log_total)``, ``sbar``, the policy offset;
- pass B (:func:`_pass_b_chunk`): normalisation and fixed share of the
  weights, the population move and costs, the sums of the moved states,
  the worst client and the mixture ``sum_i p_i x_i(t+1)`` with the new weights;
- merge B (:func:`_merge_b`): ``m(t+1)``, ``yhat(t+1)``, ``max_i J_i`` (eg: the mixture centred on ``y(t)``).

:func:`run_rounds` runs T rounds in one call (``Pipeline.round`` is T = 1).
With the hedge rule pass A needs nothing from merge B, so each chunk runs
pass B of round ``k`` and then pass A of round ``k + 1`` in one sweep
(:func:`_rounds`): one pass over the clients per round, the same bits.

Linear weights (``flags[F_LINEAR]``, whenever ``alpha / N >= LINEAR_FLOOR``):
the weights ``p`` live in ``ebuf``. Pass A writes ``q_i = p_i exp(-step_i -
top_c)`` there (``top_c`` the chunk's largest ``-step``, so ``q_i <= p_i``;
``-step_i`` waits in a chunk-sized scratch between its two sweeps, ``log_p``
is not touched), pass B writes ``keep q_i scale + alpha / N`` (``scale =
exp((top_c - top) - log_total)``, one ``exp`` per chunk). One ``exp`` per
client and round, no ``log``: the log-domain path needs a ``log`` per client
in pass B to store ``log p``. It stays for ``alpha = 0`` (weights may
underflow there).

Speed
-----
Each chunk is walked in blocks of ``R = max(1, LANES // d)`` whole clients
(``R d`` values, in L1). Every loop over a block is element-wise over
contiguous values (the forecaster's weights and lags are stored as planes,
``(2p + 1, N, d)`` and ``(p, N, d)``), so LLVM vectorises it for the CPU it runs on (AVX2 or AVX-512);
the benchmarked case (``d = 1``, hedge, recording, linear weights, ``p = 2``)
runs one loop per block and sweep: :func:`_sweep1_d1` (errors, records, step,
lane maxima) followed by :func:`_normals_into` on the same block (the chunk's
normals, compute-bound, drawn while the records stream from memory), the
``exp`` sweep, :func:`_forecast_block_p2` (NLMS, forecast, signal sums), and in pass B
:func:`_pass_b_block_d1` (share, move, cost, sums, mixture). The
transcendental functions are scalar, branch-free and inlined into those
loops; the float/int reinterpretations they need are LLVM bitcasts
(:func:`_as_int`, :func:`_as_float`), not round trips through memory:

- :func:`_exp1`, :func:`_log1` (:func:`_exp_into`, :func:`_log_into`): the
  same operations as ``kernels/_numba.py``'s vectorised ``exp`` and ``log``
  (within 0.85 and 0.81 ulp of the exact values on [-745, 709] and the positive normals);
- :func:`_sincos_2pi`: ``cos`` and ``sin`` of ``2 pi u`` for ``u`` in
  ``[0, 1)``: an exact reduction of ``u`` to ``r`` in ``[-1/8, 1/8]`` plus a
  quadrant (``u`` is a multiple of ``2^-53``, so ``u - round(4u)/4`` is
  exact), ``a = 2 pi r`` (one rounding), and fdlibm's minimax polynomials on
  ``|a| <= pi/4`` (``__kernel_sin``, degree 13, and ``__kernel_cos``, degree
  14, each within ``2^-58`` of the function): below 2 ulp of the true values
  (measured 1.79), tested against ``numpy.longdouble``.

Noise: SplitMix64 of ``(key, round, pair of flat indices)``, two uniforms
per pair and Box-Muller with both outputs, so each normal depends on
``(seed, client, round, coordinate)`` only (see :func:`_normals_into`).

Every jitted helper used here is defined in this file (Numba's cache checks
only the file of the function it compiles). The index constants come from
:mod:`._pipeline_reference` (plain Python); :func:`._seal.seal` on the last
line makes this module's cache check that file too (and every other file it
imports values from), so a changed index recompiles: no cache to clear.
"""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ._config import CACHE, CHUNK, FASTMATH, PAD, SQUARE_CAP
from ._layout import MIN_NORMAL, RULE_EG, SIGNAL_LIMIT, STEP_LIMIT
from ._pipeline_reference import (
    F_FIRST,
    F_LINEAR,
    F_RECORD,
    F_REWEIGHT,
    F_RULE,
    F_T,
    F_UPDATE,
    FIELD_CENTRE,
    FIELD_DEV,
    FIELD_NEXT,
    FIELD_OFFSET,
    FIELD_ROWS,
    FIELD_ROWS_BEFORE_CENTRE,
    FIELD_SIGNAL,
    FIELD_STATE,
    LINEAR_FLOOR,
    N_FLAGS,
    N_PARAMS,
    N_STATS,
    P_ALPHA,
    P_ETA,
    P_GAIN,
    P_HALF_DISCOUNT,
    P_KAPPA,
    P_MIX_SIGNAL,
    P_MIX_STATE,
    P_MU,
    P_Q,
    P_R,
    P_SIGNAL,
    S_ARG_COST,
    S_ERR,
    S_LOG_TOTAL,
    S_MAX_COST,
    S_SIG_ERR,
    S_TOP,
    S_VALID,
    noise_scales,
    round_key,
    seed_keys,
    work_shape,
    work_width,
)
from ._seal import seal
from ._threads import Threads, max_threads

__all__ = [
    "F_FIRST", "F_LINEAR", "F_RECORD", "F_REWEIGHT", "F_RULE", "F_T", "F_UPDATE", "FIELD_CENTRE", "FIELD_DEV", "FIELD_NEXT",
    "FIELD_OFFSET", "FIELD_ROWS", "FIELD_ROWS_BEFORE_CENTRE",
    "FIELD_SIGNAL", "FIELD_STATE", "LINEAR_FLOOR", "N_FLAGS", "N_PARAMS", "N_STATS", "P_ALPHA", "P_ETA", "P_GAIN",
    "P_HALF_DISCOUNT", "P_KAPPA", "P_MIX_SIGNAL", "P_MIX_STATE", "P_MU", "P_Q", "P_R", "P_SIGNAL", "S_ARG_COST",
    "S_ERR", "S_LOG_TOTAL", "S_MAX_COST", "S_SIG_ERR", "S_TOP", "S_VALID", "noise_scales", "round_key", "seed_keys",
    "work_shape", "work_width", "max_threads", "pass_a", "pass_b", "run_rounds", "normals", "exp", "log",
    "sincos_2pi",
]

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)

# Values per block: R = max(1, LANES // d) whole clients. 256 (2 KB per array) beat 512 and 1024 by 8-10% on pass A
# and B at 32768 clients (a block's dozen scratch and state rows stay in L1); 128 was no better than 256.
LANES = 256
# Below this alpha / N the share keeps its scalar log1p(exp(.)) form (subnormal sums would lose bits).
_SHARE_FLOOR_MIN = LINEAR_FLOOR

# ``work`` columns, for dp = d rounded up to PAD: signal sums [0, dp), state sums [dp, 2dp), mixture [2dp, 3dp),
# then the scalars at 3 dp + (COUNT, TOP, SUM, MAX, ARG, ERR, SIG_ERR), then eg's centred mixture at [3dp + PAD, 4dp + PAD).
W_COUNT, W_TOP, W_SUM, W_MAX, W_ARG, W_ERR, W_SIG_ERR = range(7)

# ---- SplitMix64 (kernels/_noise.py)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S1, _S30, _S27, _S31, _S11 = np.uint64(1), np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_S12 = np.uint64(12)
_TWO_M53 = 1.0 / 9007199254740992.0
_TWO_52 = 4503599627370496.0
_TWO_52_BITS = int(np.float64(_TWO_52).view(np.int64))  # 0x4330000000000000

# ---- exp (kernels/_numba.py): Cody-Waite, degree-13 Taylor on |r| <= ln(2)/2
_LOG2E = 1.4426950408889634
_SHIFT = 6755399441055744.0  # 1.5 * 2^52
_SHIFT_BITS = int(np.float64(_SHIFT).view(np.int64))
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# ---- log (kernels/_numba.py): musl's split, fdlibm's R(s^2)
_LOG_OFF = 0x3FE6A09E667F3BCD
_EXP_FIELD = -(1 << 52)
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_TINY = 2.2250738585072014e-308
_HUGE = 1.7976931348623157e308
# ---- sin/cos of 2 pi u: fdlibm's k_sin.c and k_cos.c coefficients
_TWO_PI = 6.283185307179586
_SIN1, _SIN2, _SIN3 = -1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04
_SIN4, _SIN5, _SIN6 = 2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10
_COS1, _COS2, _COS3 = 4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05
_COS4, _COS5, _COS6 = -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11


@njit(**_jit)
def _pad(d):
    """``d`` rounded up to whole cache lines of doubles."""
    return -(-d // PAD) * PAD


@njit(**_jit)
def _block_rows(d):
    """Rows per block, ``R = max(1, LANES // d)``."""
    return max(1, LANES // d)


@njit(**_jit)
def _chunk_order(i, chunks):
    """The chunk a parallel loop runs at iteration ``i``: the short last chunk moves to the middle.

    Numba splits ``prange(chunks)`` into contiguous runs, the first thread
    getting ``ceil(chunks / 2)`` on two threads; giving it the last (short)
    chunk evens the two threads' clients (10^5 clients: 50848 and 49152
    instead of 53248 and 46752). Only the order of work changes: the partials
    are merged in chunk order, so the results are the same bits.
    """
    i = np.int64(i)  # a prange index may be unsigned: keep the arithmetic in int64
    h = (np.int64(chunks) + 1) // 2
    if i < h - 1:
        return i
    if i == h - 1:
        return chunks - 1
    return i - 1


@njit(**_jit)
def _chunk_bounds(n, c):
    """Clients ``[lo, hi)`` of chunk ``c`` among ``n``."""
    lo = c * CHUNK
    return lo, min(lo + CHUNK, n)


# --------------------------------------------------------------------------- vector math
@intrinsic
def _as_int(typingctx, x):
    """The bits of a float64 as an int64 (an LLVM ``bitcast``: no memory, so loops that use it vectorise)."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return sig, codegen


@intrinsic
def _as_float(typingctx, x):
    """The float64 whose bits are an int64 (an LLVM ``bitcast``)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@njit(**_jit)
def _exp1(x):
    """``exp(x)``, branch-free (inlined into the loops that call it; see :func:`_exp_into`).

    Cody-Waite: ``n = round(x / ln 2)``, ``r = (x - n ln2_hi) - n ln2_lo``,
    ``|r| <= ln(2)/2``, Taylor to ``r^13``, times ``2^(n - n//2) 2^(n//2)``
    (two factors, so ``2^n`` below the normal range stays exact until the
    last product). ``x`` is clamped to ``[-745.5, 710]`` (0 and ``inf`` at the ends).
    """
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
    p = p * r + 1.0
    n = _as_int(t) - _SHIFT_BITS
    half = n >> 1
    return p * _as_float((half + 1023) << 52) * _as_float((n - half + 1023) << 52)


@njit(**_jit)
def _log1(x):
    """``log(x)`` for a positive normal finite ``x`` (branch-free; see :func:`_log_into`).

    musl's split ``x = 2^e z``, ``z`` in ``[sqrt(2)/2, sqrt(2))``, ``f = z - 1``,
    ``s = f / (2 + f)``, fdlibm's ``R(s^2)``.
    """
    ix = _as_int(x)
    t = ix - _LOG_OFF
    z = _as_float(ix - (t & _EXP_FIELD))
    e = _as_float((t >> 52) + _SHIFT_BITS) - _SHIFT
    f = z - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    hfsq = 0.5 * f * f
    return e * _LN2_HI - ((hfsq - (s * (hfsq + r) + e * _LN2_LO)) - f)


@njit(**_jit)
def _exp_into(src, dst):
    """``dst[k] = exp(src[k])``, vectorised; the same bits as ``kernels/_numba.py``'s ``_exp_into``."""
    for k in range(src.shape[0]):
        dst[k] = _exp1(src[k])


@njit(**_jit)
def _log_into(src, dst):
    """``dst[k] = log(src[k])``, vectorised; the same bits as ``kernels/_numba.py``'s ``_log_into``.

    Positive normal finite inputs take the polynomial path (within 1 ulp of
    ``numpy.log``); any other input is redone with ``math.log``.
    """
    bad = 0
    for k in range(src.shape[0]):
        x = src[k]
        bad += 0 if (x >= _TINY and x <= _HUGE) else 1
        dst[k] = _log1(x)
    if bad:
        for k in range(src.shape[0]):
            x = src[k]
            if not (x >= _TINY and x <= _HUGE):
                dst[k] = math.log(x)


@njit(**_jit)
def _sincos_2pi(u):
    """``(cos(2 pi u), sin(2 pi u))`` for ``u`` in ``[0, 1)`` a multiple of ``2^-53`` (branch-free).

    ``k = round(4 u)`` in ``{0, ..., 4}``, ``r = u - k/4`` in ``[-1/8, 1/8]``
    (exact), ``a = 2 pi r``, ``z = a^2``; fdlibm's kernels on ``|a| <= pi/4``:
    ``sin a = a + a z (S1 + z (S2 + ... + z S6))`` and ``cos a = 1 - z/2 +
    z^2 (C1 + z (C2 + ... + z C6))`` (minimax, within ``2^-58``: four FMAs a
    pair fewer than Taylor polynomials of the same accuracy), then the swap and signs of
    quadrant ``k mod 4`` (selects, no branch, so the loops that call it vectorise).
    """
    shifted = 4.0 * u + _SHIFT  # round(4 u) in its low bits (no float-to-int conversion: AVX2 has no vector one)
    kf = shifted - _SHIFT  # round(4 u), in {0, ..., 4}
    a = (u - 0.25 * kf) * _TWO_PI
    z = a * a
    sp = _SIN2 + z * (_SIN3 + z * (_SIN4 + z * (_SIN5 + z * _SIN6)))
    sn = a + (z * a) * (_SIN1 + z * sp)
    cp = z * (_COS1 + z * (_COS2 + z * (_COS3 + z * (_COS4 + z * (_COS5 + z * _COS6)))))
    cs = 1.0 - 0.5 * z + z * cp
    quadrant = _as_int(shifted) & 3
    c = sn if (quadrant & 1) != 0 else cs
    s = cs if (quadrant & 1) != 0 else sn
    c = -c if ((quadrant + 1) & 2) != 0 else c
    s = -s if (quadrant & 2) != 0 else s
    return c, s


@njit(**_jit)
def _sincos_into(u, c_out, s_out):
    """``sin`` and ``cos`` of ``2 pi u`` for every ``u`` of ``src`` into ``s`` and ``c`` (vectorised; bound in the module docstring)."""
    for k in range(u.shape[0]):
        c, s = _sincos_2pi(u[k])
        c_out[k] = c
        s_out[k] = s


@njit(**_jit)
def _mix64(z):
    """SplitMix64's finaliser: a bijective hash of a 64-bit word."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(**_jit)
def _round_key(key, t):
    """The 64-bit key of round ``t`` (hash of the seed key and the round)."""
    return _mix64(key ^ (_GOLDEN * np.uint64(t + 1)))


@njit(**_jit)
def _unit53(h):
    """``(h >> 11) 2^-53``, a uniform in ``[0, 1)``: the same value as ``np.float64(h >> 11) * 2^-53``.

    AVX2 has no vector conversion of a 64-bit integer to a double, so that
    form made LLVM convert each lane in a scalar register. Here both halves of
    ``h >> 11 = 2 hi + bit`` (``hi = h >> 12 < 2^52``, ``bit`` its low bit) are
    converted exactly by the ``2^52`` trick (the double whose bits are those of
    ``2^52`` or'ed with ``x < 2^52`` is ``2^52 + x``), and ``2 hi + bit < 2^53``
    is exact: the same bits, in vector registers.
    """
    hi = _as_float(np.int64(h >> _S12) | _TWO_52_BITS) - _TWO_52
    bit = _as_float(np.int64((h >> _S11) & _S1) | _TWO_52_BITS) - _TWO_52
    return (2.0 * hi + bit) * _TWO_M53


@njit(**_jit)
def _normals_into(kt, q0, m, out):
    """Normals of the pairs ``q0 .. q0 + m - 1`` of round key ``kt`` into ``out[0:2m]`` (even, odd flat index).

    One loop: both hashes, both uniforms, ``sqrt(-2 log u1)`` and ``cos``,
    ``sin`` of ``2 pi u2`` per pair, inlined (vectorised over the pairs).
    """
    base = np.uint64(q0 + 1)
    for k in range(m):
        h1 = _mix64(kt + _GOLDEN * (base + np.uint64(k)))
        h2 = _mix64(h1 + _GOLDEN)
        u1 = 1.0 - _unit53(h1)
        u2 = _unit53(h2)
        radius = math.sqrt(-2.0 * _log1(u1))
        c, s = _sincos_2pi(u2)
        out[2 * k] = radius * c
        out[2 * k + 1] = radius * s


@njit(**_jit)
def _clip_step(v):
    """``eta * loss`` clipped to ``[-STEP_LIMIT, STEP_LIMIT]``, the finite doubles (only +-inf is clipped).

    NaN (an overflow) becomes ``STEP_LIMIT``.
    """
    if v > STEP_LIMIT or v != v:
        return STEP_LIMIT
    return -STEP_LIMIT if v < -STEP_LIMIT else v


@njit(**_jit)
def _sum4(a):
    """``sum(a)`` with four interleaved accumulators, ``(s0 + s1) + (s2 + s3)``."""
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


@njit(**_jit)
def _row_sums(terms, rows, d, out):
    """``out[k] = sum_j terms[k d + j]`` in order ``j = 0 .. d-1``."""
    if d == 1:
        for k in range(rows):
            out[k] = terms[k]
    else:
        for k in range(rows):
            acc = 0.0
            for j in range(d):
                acc += terms[k * d + j]
            out[k] = acc


@njit(**_jit)
def _lane_columns(lanes, d, R, out):
    """``out[j] = lanes[j] + lanes[d + j] + ... + lanes[(R-1) d + j]``, in that order."""
    for j in range(d):
        total = 0.0
        for k in range(R):
            total += lanes[k * d + j]
        out[j] = total


@njit(**_jit)
def _index_as_float(i):
    """``float(i)`` for ``0 <= i < 2^52``, by the ``2^52`` trick of :func:`_unit53` (vectorises on AVX2; the same value)."""
    return _as_float(i | _TWO_52_BITS) - _TWO_52


@njit(**_jit)
def _keep_max(vmax, varg, k, v, row):
    """Lane ``k`` keeps the larger of ``v`` and its own, with ``v``'s row (the earlier row on ties). Inlined."""
    m = vmax[k]
    up = v > m
    vmax[k] = v if up else m
    varg[k] = _index_as_float(row) if up else varg[k]


@njit(**_jit)
def _track_max(Jb, first, rows, vmax, varg):
    """Lane ``k`` keeps the largest of ``Jb[k]`` and its own, with its row ``first + k`` (first on ties)."""
    for k in range(rows):
        _keep_max(vmax, varg, k, Jb[k], first + k)


@njit(**_jit)
def _row_valid(s, i, d):
    """Whether row ``i`` of ``s`` is a valid signal (finite, at most ``SIGNAL_LIMIT``)."""
    ok = True
    for j in range(d):
        if not abs(s[i, j]) <= SIGNAL_LIMIT:
            ok = False
    return ok


# --------------------------------------------------------------------------- pass A
@njit(**_jit)
def _record_and_step(xb, sb, qe, qs, err_l, sig_l, k, y0, eta):
    """Client ``k`` of a ``d = 1`` block: both squared errors against ``y0`` into the records and lanes; returns ``-step``.

    Inlined into the sweeps below (one copy of the arithmetic, the same bits in both).
    """
    e = xb[k] - y0
    err = e * e
    qe[k] += err
    err_l[k] += err
    es = sb[k] - y0
    sig = es * es
    qs[k] += sig
    sig_l[k] += sig
    return -_clip_step(eta * err)


@njit(**_jit)
def _sweep1_d1_exp(xb, sb, qe, qs, lp, eb, pb, y0, eta, err_l, sig_l, tmax, exp_l):
    """:func:`_sweep1_d1` with linear weights and the exponentials in the same loop, against reference 0.

    ``eb`` (``ebuf``): ``p_i`` in, ``q_i = p_i exp(-step_i)`` out (``<= p_i``:
    hedge steps are ``>= 0``); ``pb`` keeps ``p_i`` in case the chunk's
    smallest step is so large that ``q`` would lose bits to underflow (then
    :func:`_pass_a_chunk` redoes the chunk against ``top_c``).
    """
    for k in range(xb.shape[0]):
        v = _record_and_step(xb, sb, qe, qs, err_l, sig_l, k, y0, eta)
        lp[k] = v
        m = tmax[k]
        tmax[k] = v if v > m else m
        p = eb[k]
        pb[k] = p
        q = p * _exp1(v)
        eb[k] = q
        exp_l[k] += q


@njit(**_jit)
def _sweep1_d1(xb, sb, qe, qs, lp, y0, eta, linear, err_l, sig_l, tmax):
    """Sweep 1 for ``d = 1``, recording, hedge step: errors, both records, the step, the lane maxima; one loop.

    The same operations in the same order as the general sweep (the same bits). With linear weights
    ``lp`` gets ``-step``; with log weights ``log p - step`` (written ``log p + (-step)``, the same IEEE
    result). ``linear`` does not change inside the loop, so LLVM unswitches it into two loops.
    """
    for k in range(xb.shape[0]):
        v = _record_and_step(xb, sb, qe, qs, err_l, sig_l, k, y0, eta)
        if not linear:
            v = lp[k] + v
        lp[k] = v
        m = tmax[k]
        tmax[k] = v if v > m else m


@njit(**_jit)
def _forecast_block_p2(yr, sv, eps, W, A, nv, v0, mu, update, sb):
    """NLMS with ``p = 2`` on values ``[v0, v0 + nv)`` (planes ``W[f]``, ``A[k]``), one loop.

    ``sb`` gets the forecasts; returns how many are not valid signals
    (``|s| > SIGNAL_LIMIT`` or NaN). The callers add ``sb`` to their signal
    lanes afterwards, from L1: adding them here (a load and a store per value
    in this loop) made it 1.3x slower in L2 (1.37-1.42 against 1.05 ns per
    client on 4096 clients).
    """
    bad = 0
    W0 = W[0, v0:v0 + nv]
    W1 = W[1, v0:v0 + nv]
    W2 = W[2, v0:v0 + nv]
    W3 = W[3, v0:v0 + nv]
    W4 = W[4, v0:v0 + nv]
    A0 = A[0, v0:v0 + nv]
    A1 = A[1, v0:v0 + nv]
    if update:
        for v in range(nv):
            z = yr[v] + sv[v] * eps[v]
            a = A0[v]
            b = A1[v]
            a2 = a * a
            b2 = b * b
            qa = min(a2, SQUARE_CAP)  # the capped squares (the plain ones within 8: same bits)
            qb = min(b2, SQUARE_CAP)
            w0 = W0[v]
            w1 = W1[v]
            w2 = W2[v]
            w3 = W3[v]
            w4 = W4[v]
            pred = w4 + w0 * a + w2 * qa + w1 * b + w3 * qb
            norm = 1.0 + (a2 + qa * qa) + (b2 + qb * qb)
            step = mu * (z - pred) / norm
            w0 += step * a
            w1 += step * b
            w2 += step * qa
            w3 += step * qb
            w4 += step
            W0[v] = w0
            W1[v] = w1
            W2[v] = w2
            W3[v] = w3
            W4[v] = w4
            A1[v] = a
            A0[v] = z
            val = w4 + w0 * z + w2 * min(z * z, SQUARE_CAP) + w1 * a + w3 * qa
            sb[v] = val
            bad += 0 if abs(val) <= SIGNAL_LIMIT else 1
    else:
        for v in range(nv):
            z = yr[v] + sv[v] * eps[v]
            a = A0[v]
            A1[v] = a
            A0[v] = z
            val = W4[v] + W0[v] * z + W2[v] * min(z * z, SQUARE_CAP) + W1[v] * a + W3[v] * min(a * a, SQUARE_CAP)
            sb[v] = val
            bad += 0 if abs(val) <= SIGNAL_LIMIT else 1
    return bad


@njit(**_jit)
def _forecast_block(yr, sv, eps, W, A, nv, v0, mu, update, sb, zb, pred, norm):
    """NLMS with any ``p`` on values ``[v0, v0 + nv)``, one loop per feature plane (scratch ``zb``, ``pred``, ``norm``)."""
    p = A.shape[0]
    F = 2 * p + 1
    for v in range(nv):
        zb[v] = yr[v] + sv[v] * eps[v]
    Wc = W[F - 1, v0:v0 + nv]
    if update:
        for v in range(nv):
            pred[v] = Wc[v]
            norm[v] = 1.0
        for k in range(p):
            Ak = A[k, v0:v0 + nv]
            Wk = W[k, v0:v0 + nv]
            Wq = W[p + k, v0:v0 + nv]
            for v in range(nv):
                a = Ak[v]
                a2 = a * a
                qa = min(a2, SQUARE_CAP)
                pred[v] += Wk[v] * a + Wq[v] * qa
                norm[v] += a2 + qa * qa
        for v in range(nv):
            pred[v] = mu * (zb[v] - pred[v]) / norm[v]  # the step
        for k in range(p):
            Ak = A[k, v0:v0 + nv]
            Wk = W[k, v0:v0 + nv]
            Wq = W[p + k, v0:v0 + nv]
            for v in range(nv):
                a = Ak[v]
                Wk[v] += pred[v] * a
                Wq[v] += pred[v] * min(a * a, SQUARE_CAP)
        for v in range(nv):
            Wc[v] += pred[v]
    for k in range(p - 1, 0, -1):
        Ak = A[k, v0:v0 + nv]
        Ap = A[k - 1, v0:v0 + nv]
        for v in range(nv):
            Ak[v] = Ap[v]
    A0 = A[0, v0:v0 + nv]
    for v in range(nv):
        A0[v] = zb[v]
        sb[v] = Wc[v]
    for k in range(p):
        Ak = A[k, v0:v0 + nv]
        Wk = W[k, v0:v0 + nv]
        Wq = W[p + k, v0:v0 + nv]
        for v in range(nv):
            a = Ak[v]
            sb[v] += Wk[v] * a + Wq[v] * min(a * a, SQUARE_CAP)


@njit(**_jit)
def _pass_a_chunk(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, field, work, params, kt, flags, c):
    """Pass A on chunk ``c``: server step and log-sum-exp pieces, errors, noise, forecasters, signal sums.

    Reads ``x`` (the states ``x(t)``), ``y``, ``field``'s eg rows (``FIELD_DEV``
    and ``FIELD_CENTRE``: eg's error ``e = dev - (y - c)``, every chunk the same),
    ``sigma``, ``params`` and ``flags``. Modified in place on the chunk's rows:
    ``log_p`` (stepped, not normalised), ``ebuf`` (``exp(log_p_i - top_c)``,
    ``top_c`` the chunk's largest stepped log-weight, for pass B; with linear
    weights ``log_p`` is left alone and ``ebuf`` goes from ``p_i`` to
    ``p_i exp(-step_i - top_c)``, ``top_c`` the largest ``-step_i``), ``W`` and
    ``A`` (planes ``(2p+1, N d)`` and ``(p, N d)``), ``s`` (``s(t)``),
    ``sq_err``/``sq_sig`` (when recording). Row ``c`` of ``work`` gets the
    signal sums (valid rows) and their count, ``(top_c, sum_i exp(log_p_i -
    top_c))`` and the two error totals.

    Three sweeps over the chunk (its rows stay in L2): the server's step and
    the errors, block by block, with a lane-wise running maximum (and, in the
    fused ``d = 1`` case, the chunk's normals); the exponentials against the
    chunk's maximum; the forecasters, block by block.
    """
    n, d = x.shape
    p = A.shape[0]
    R = _block_rows(d)
    L = R * d
    H = L // 2 + 2
    lo, hi = _chunk_bounds(n, c)
    rule = flags[F_RULE]
    reweight = flags[F_REWEIGHT] != 0
    record = flags[F_RECORD] != 0
    update = flags[F_UPDATE] != 0
    linear = flags[F_LINEAR] != 0
    first = flags[F_FIRST]
    eta = params[P_ETA]
    mu = params[P_MU]
    step_server = reweight and eta != 0.0
    xf = x.reshape(-1)
    sf = s.reshape(-1)
    scratch = np.empty(8 * L + 2 * H + 6 * R)
    yr = scratch[:L]
    gr = scratch[L:2 * L]
    terms = scratch[2 * L:3 * L]
    sv = scratch[3 * L:4 * L]
    lanes = scratch[4 * L:5 * L]
    zb = scratch[5 * L:6 * L]
    pred = scratch[6 * L:7 * L]
    norm = scratch[7 * L:8 * L]
    noise = scratch[8 * L:8 * L + 2 * H]
    base = 8 * L + 2 * H
    rowerr = scratch[base:base + R]
    shifted = scratch[base + R:base + 2 * R]
    tmax = scratch[base + 2 * R:base + 3 * R]
    for k in range(R):
        tmax[k] = -np.inf
        for j in range(d):
            yr[k * d + j] = y[j]
    if rule == RULE_EG:
        # e = yhat(t) - y(t) as sum_i p_i (x_i(t) - c) - (y(t) - c), c = y(t-1): differences only, so a common shift of
        # the states and targets moves no bit (the rounded yhat(t) carried eps |level|); centre y_j, or 0 where e_j = 0
        # (then 0 x_ij = 0, not 0 (x_ij - y_j) = 0 inf), as the Server's kernels
        for j in range(d):
            e = field[FIELD_DEV, j] - (y[j] - field[FIELD_CENTRE, j])
            for k in range(R):
                gr[k * d + j] = e
                zb[k * d + j] = y[j] if e != 0.0 else 0.0  # the centre, replicated (zb is sweep 3's scratch)
    for v in range(L):
        lanes[v] = 0.0
    # per-row lanes of the chunk's totals (element-wise adds vectorise; a running scalar sum would not)
    err_l = scratch[base + 3 * R:base + 4 * R]
    sig_l = scratch[base + 4 * R:base + 5 * R]
    exp_l = scratch[base + 5 * R:base + 6 * R]
    for k in range(R):
        err_l[k] = 0.0
        sig_l[k] = 0.0
        exp_l[k] = 0.0
    # the stepped log-weights: log_p itself, or (linear weights) this round's -step_i in an L2-sized scratch
    if linear:
        steps = np.empty(hi - lo)
        slo = lo
    else:
        steps = log_p
        slo = 0
    # sweep 1: the clients' errors against y(t), the server's step on x(t), the running maximum
    # the chunk's normals, flat values [g_lo, g_hi) = pairs [Q0, ...): drawn here in the fused sweep 1
    # (compute-bound work next to memory-bound work), else block by block in sweep 3
    g_lo = (first + lo) * d
    Q0 = g_lo >> 1
    pre_noise = d == 1 and record and step_server and rule != RULE_EG
    # linear weights there: the exponentials too, against reference 0 instead of top_c (sweep 2 then only checks)
    pre_exp = pre_noise and linear
    eps_c = noise
    pbuf = noise
    if pre_exp:
        pbuf = np.empty(hi - lo)
    if pre_noise:
        y0 = y[0]
        eps_c = np.empty(2 * (((g_lo + (hi - lo) * d + 1) >> 1) - Q0))
        for rb in range(lo, hi, R):
            rows = min(R, hi - rb)
            if pre_exp:
                _sweep1_d1_exp(xf[rb:rb + rows], sf[rb:rb + rows], sq_err[rb:rb + rows], sq_sig[rb:rb + rows],
                               steps[rb - slo:rb - slo + rows], ebuf[rb:rb + rows], pbuf[rb - lo:rb - lo + rows], y0, eta,
                               err_l, sig_l, tmax, exp_l)
            else:
                _sweep1_d1(xf[rb:rb + rows], sf[rb:rb + rows], sq_err[rb:rb + rows], sq_sig[rb:rb + rows],
                           steps[rb - slo:rb - slo + rows], y0, eta, linear, err_l, sig_l, tmax)
            g0 = (first + rb) * d
            q0 = g0 >> 1
            m = ((g0 + rows * d + 1) >> 1) - q0
            _normals_into(kt, q0, m, eps_c[2 * (q0 - Q0):2 * (q0 - Q0 + m)])
    elif record or reweight:
        for rb in range(lo, hi, R):
            rows = min(R, hi - rb)
            v0 = rb * d
            nv = rows * d
            xb = xf[v0:v0 + nv]
            err = rowerr[:rows]
            if record or (step_server and rule != RULE_EG):
                for v in range(nv):
                    e = xb[v] - yr[v]
                    terms[v] = e * e
                if d == 1:
                    err = terms[:rows]
                else:
                    _row_sums(terms, rows, d, rowerr)
            if record:
                eb = sq_err[rb:rb + rows]
                for k in range(rows):
                    eb[k] += err[k]
                for k in range(rows):
                    err_l[k] += err[k]
                sb = sf[v0:v0 + nv]
                for v in range(nv):
                    e = sb[v] - yr[v]
                    pred[v] = e * e
                sig = pred[:rows]
                if d != 1:
                    _row_sums(pred, rows, d, shifted)
                    sig = shifted[:rows]
                eb = sq_sig[rb:rb + rows]
                for k in range(rows):
                    eb[k] += sig[k]
                for k in range(rows):
                    sig_l[k] += sig[k]
            if reweight:
                lp = steps[rb - slo:rb - slo + rows]
                if step_server:
                    if rule == RULE_EG:
                        for v in range(nv):  # a zero factor, a zero term: x at the centre adds 0 (not 0 * inf)
                            dv = xb[v] - zb[v]
                            pred[v] = gr[v] * dv if dv != 0.0 else 0.0
                        _row_sums(pred, rows, d, rowerr)
                        for k in range(rows):  # the factor 2 after the sum: 2 e_j alone may overflow where the step does not
                            rowerr[k] = 2.0 * rowerr[k]
                        err = rowerr[:rows]
                    if linear:  # log_p: this round's -step only (the weights are in ebuf)
                        for k in range(rows):
                            lp[k] = -_clip_step(eta * err[k])
                    else:
                        for k in range(rows):
                            lp[k] -= _clip_step(eta * err[k])
                elif linear:
                    for k in range(rows):
                        lp[k] = 0.0
                for k in range(rows):
                    v = lp[k]
                    m = tmax[k]
                    tmax[k] = v if v > m else m
    # sweep 2: exp(log_p - top_c) and their sum
    top = -np.inf
    if reweight:
        for k in range(R):
            top = tmax[k] if tmax[k] > top else top
    if pre_exp:
        # Sweep 1's q_i = p_i exp(-step_i) stand if every q_i that can matter is a normal number: q_i / sum q
        # >= 2^-60 floor (floor = alpha / n, the least shared weight) with sum q >= floor e^top_c needs
        # floor^2 e^top_c 2^-60 >= 2^-1022, i.e. top_c >= -666.8 - 2 log(floor); -650 keeps a factor 2e7.
        if top >= -650.0 - 2.0 * math.log(params[P_ALPHA] / n):
            top = 0.0  # the chunk's reference point: its partials are sum_i p_i exp(-step_i - 0)
        else:
            for k in range(R):
                exp_l[k] = 0.0
            for rb in range(lo, hi, R):
                rows = min(R, hi - rb)
                lp = steps[rb - slo:rb - slo + rows]
                pb = pbuf[rb - lo:rb - lo + rows]
                ex = ebuf[rb:rb + rows]
                for k in range(rows):
                    e = pb[k] * _exp1(lp[k] - top)
                    ex[k] = e
                    exp_l[k] += e
    elif reweight:
        for rb in range(lo, hi, R):
            rows = min(R, hi - rb)
            lp = steps[rb - slo:rb - slo + rows]
            ex = ebuf[rb:rb + rows]
            if top == -np.inf:
                for k in range(rows):
                    ex[k] = 0.0
                continue
            if linear:  # p_i exp(-step_i - top_c), top_c = -(the chunk's smallest step)
                for k in range(rows):
                    e = ex[k] * _exp1(lp[k] - top)
                    ex[k] = e
                    exp_l[k] += e
            else:
                for k in range(rows):
                    e = _exp1(lp[k] - top)
                    ex[k] = e
                    exp_l[k] += e
    err_total = _sum4(err_l)
    sig_total = _sum4(sig_l)
    scaled = _sum4(exp_l)
    # sweep 3: noise, the forecasters, the signal sums
    bad = 0
    whole = pre_noise and p == 2  # d = 1, normals drawn: one forecaster call on the whole chunk (its setup, with
    if whole:  # the run-time alias checks of 11 arrays, costs ~20% of a 256-value call)
        nc = hi - lo
        yc = np.empty(nc)
        for k in range(nc):
            yc[k] = y0
        sc = sf[lo:hi]
        bad = _forecast_block_p2(yc, sigma[lo:hi], eps_c[g_lo - 2 * Q0:g_lo - 2 * Q0 + nc], W, A, nc, lo, mu, update, sc)
        for b in range(0, nc, R):  # into the block lanes, as the block-wise loop sums them
            rows = min(R, nc - b)
            sb = sc[b:b + rows]
            for k in range(rows):
                lanes[k] += sb[k]
    for rb in range(lo, hi if not whole else lo, R):
        rows = min(R, hi - rb)
        v0 = rb * d
        nv = rows * d
        sb = sf[v0:v0 + nv]
        g0 = (first + rb) * d
        q0 = g0 >> 1
        if pre_noise:
            eps = eps_c[g0 - 2 * Q0:g0 - 2 * Q0 + nv]
        else:
            m = ((g0 + nv + 1) >> 1) - q0
            _normals_into(kt, q0, m, noise)
            off = g0 - 2 * q0
            eps = noise[off:off + nv]
        scales = sigma[rb:rb + rows]  # d = 1: the clients' scales as they are
        if d != 1:
            for k in range(rows):
                for j in range(d):
                    sv[k * d + j] = sigma[rb + k]
            scales = sv[:nv]
        if p == 2:
            bad += _forecast_block_p2(yr, scales, eps, W, A, nv, v0, mu, update, sb)
            for v in range(nv):
                lanes[v] += sb[v]
        else:
            _forecast_block(yr, scales, eps, W, A, nv, v0, mu, update, sb, zb, pred, norm)
            for v in range(nv):
                val = sb[v]
                lanes[v] += val
                bad += 0 if abs(val) <= SIGNAL_LIMIT else 1
    dp = _pad(d)
    row = work[c]
    scal = 3 * dp
    if bad == 0:
        _lane_columns(lanes, d, R, row[0:d])
        row[scal + W_COUNT] = hi - lo
    else:
        count = 0
        for j in range(d):
            row[j] = 0.0
        for i in range(lo, hi):
            if _row_valid(s, i, d):
                count += 1
                for j in range(d):
                    row[j] += s[i, j]
        row[scal + W_COUNT] = count
    row[scal + W_TOP] = top
    row[scal + W_SUM] = scaled
    row[scal + W_ERR] = err_total
    row[scal + W_SIG_ERR] = sig_total


@njit(**_jit)
def _merge_a(work, field, params, flags, stats, d):
    """Merge pass A's rows in chunk order: ``(top, log_total)``, ``sbar``, the offset, the error totals."""
    dp = _pad(d)
    scal = 3 * dp
    chunks = work.shape[0]
    count = 0.0
    err = 0.0
    sig = 0.0
    top = -np.inf
    for c in range(chunks):
        count += work[c, scal + W_COUNT]
        err += work[c, scal + W_ERR]
        sig += work[c, scal + W_SIG_ERR]
        top = max(top, work[c, scal + W_TOP])
    log_total = 0.0
    if flags[F_REWEIGHT] != 0 and top != -np.inf:
        total = 0.0
        for c in range(chunks):
            if work[c, scal + W_TOP] != -np.inf:
                total += work[c, scal + W_SUM] * math.exp(work[c, scal + W_TOP] - top)
        log_total = math.log(total)
    if flags[F_REWEIGHT] == 0:
        top = 0.0
    if count > 0:
        for j in range(d):
            acc = 0.0
            for c in range(chunks):
                acc += work[c, j]
            field[FIELD_SIGNAL, j] = acc / count
    for j in range(d):
        field[FIELD_OFFSET, j] = params[P_MIX_SIGNAL] * field[FIELD_SIGNAL, j] + params[P_MIX_STATE] * field[FIELD_STATE, j]
    stats[S_VALID] = count
    stats[S_ERR] = err
    stats[S_SIG_ERR] = sig
    stats[S_TOP] = top
    stats[S_LOG_TOTAL] = log_total


# --------------------------------------------------------------------------- pass B
@njit(**_jit)
def _move_and_pay(xi, si, off, ctr, gain, weight, q, kappa, r):
    """One coordinate's move and stage cost: ``(x + u, q (x - s)^2 + kappa (x - ctr)^2 + r u^2)``, ``u = -g (x - w s - off)``.

    Inlined into every pass B loop (one copy of the arithmetic, the same bits in each).
    """
    u = -gain * (xi - weight * si - off)
    e_s = xi - si
    e_m = xi - ctr
    return xi + u, q * (e_s * e_s) + kappa * (e_m * e_m) + r * (u * u)


@njit(**_jit)
def _pass_b_block_d1(xb, sb, Jb, eb, first, keep, scale, floor, gain, weight, off, ctr, q, kappa, r, half, jmax_l, jarg_l,
                     lane_x, lane_m):
    """Pass B on a ``d = 1`` block of valid signals with linear weights: share, move, cost, worst client, sums; one loop.

    The same operations in the same order as :func:`_pass_b_chunk`'s general block (the same bits), with the
    policy offset ``off`` and the mean state ``ctr`` as scalars: ``p_i = keep (q_i scale) + alpha / N`` into
    ``eb``, ``u_i = -g (x_i - w s_i - off)``, ``J_i += half (q (x_i - s_i)^2 + kappa (x_i - ctr)^2 + r u_i^2)``,
    ``x_i += u_i``, then lane ``k`` adds ``x_i`` and ``p_i x_i`` and keeps its largest ``J_i`` with its row.
    """
    for k in range(xb.shape[0]):
        pk = keep * (eb[k] * scale) + floor
        eb[k] = pk
        xn, cost = _move_and_pay(xb[k], sb[k], off, ctr, gain, weight, q, kappa, r)
        xb[k] = xn
        j = Jb[k] + half * cost
        Jb[k] = j
        _keep_max(jmax_l, jarg_l, k, j, first + k)
        lane_x[k] += xn
        lane_m[k] += pk * xn


@njit(**_jit)
def _centred_lanes(xb, wv, yr, lane_d):
    """eg: ``lane_d[v] += wv[v] (xb[v] - yr[v])``, the mixture centred on the round's target; a weight 0 adds 0 (not ``0 * inf``)."""
    for v in range(xb.shape[0]):
        pv = wv[v]
        lane_d[v] += pv * (xb[v] - yr[v]) if pv != 0.0 else 0.0


@njit(**_jit)
def _pass_b_chunk(x, s, J, log_p, ebuf, y, work, field, params, flags, top, log_total, n_total, c):
    """Pass B on chunk ``c``: share the weights, move and pay, then the chunk's sums for ``t + 1``.

    Modified in place on the chunk's rows: ``log_p`` (normalised and shared
    when ``flags[F_REWEIGHT]``; with linear weights ``ebuf`` instead gets the
    shared ``p``), ``x`` (``x(t+1)``), ``J``. Reads ``s``,
    ``ebuf`` and the chunk's ``top_c`` (pass A's exponentials: the normalised
    weight is ``ebuf_i exp((top_c - top) - log_total)``, no ``exp`` per client),
    ``field[FIELD_OFFSET]``, ``field[FIELD_STATE]`` and the chunk's valid
    count from ``work``. Row ``c`` of ``work`` gets the sums of the moved
    states, ``sum_i p_i x_i(t+1)`` (``p`` the new weights), with eg
    ``sum_i p_i (x_i(t+1) - y)`` (``y`` = this round's target ``y(t)``; a
    weight 0 adds 0, even beside an overflowed difference) and the largest
    cost with its first client.
    """
    n, d = x.shape
    R = _block_rows(d)
    L = R * d
    lo, hi = _chunk_bounds(n, c)
    dp = _pad(d)
    scal = 3 * dp
    row = work[c]
    all_valid = row[scal + W_COUNT] == hi - lo
    reweight = flags[F_REWEIGHT] != 0
    linear = flags[F_LINEAR] != 0
    alpha = params[P_ALPHA]
    gain = params[P_GAIN]
    weight = params[P_SIGNAL]
    q = params[P_Q]
    kappa = params[P_KAPPA]
    r = params[P_R]
    half = params[P_HALF_DISCOUNT]
    if top == -np.inf:
        top, log_total = 0.0, 0.0
    xf = x.reshape(-1)
    sf = s.reshape(-1)
    eg = flags[F_RULE] == RULE_EG
    scratch = np.empty(8 * L + 4 * R)
    offset = scratch[:L]
    centre = scratch[L:2 * L]
    terms = scratch[2 * L:3 * L]
    lane_x = scratch[3 * L:4 * L]
    lane_m = scratch[4 * L:5 * L]
    lane_d = scratch[5 * L:6 * L]  # eg: sum_i p_i (x_i - y), the next round's error from differences
    yr = scratch[6 * L:7 * L]
    wide = scratch[7 * L:8 * L]
    w = scratch[8 * L:8 * L + R]
    cost_row = scratch[8 * L + R:8 * L + 2 * R]
    jmax_l = scratch[8 * L + 2 * R:8 * L + 3 * R]  # lane k: the largest cost among rows lo + k + R i, and its row
    jarg_l = scratch[8 * L + 3 * R:8 * L + 4 * R]
    for k in range(R):
        jmax_l[k] = -np.inf
        jarg_l[k] = -1.0
    for k in range(R):
        for j in range(d):
            offset[k * d + j] = field[FIELD_OFFSET, j]
            centre[k * d + j] = field[FIELD_STATE, j]
    for v in range(L):
        lane_x[v] = 0.0
        lane_m[v] = 0.0
    if eg:
        for k in range(R):
            for j in range(d):
                yr[k * d + j] = y[j]
        for v in range(L):
            lane_d[v] = 0.0
    keep = 1.0 - alpha
    floor = alpha / n_total
    uniform = -math.log(n_total)
    top_c = row[scal + W_TOP]
    scale = math.exp((top_c - top) - log_total) if top_c != -np.inf else 0.0
    # the benchmarked case (d = 1, every signal valid, linear weights shared): one loop per block
    fused_d1 = d == 1 and all_valid and linear and reweight and alpha != 1.0
    off0 = field[FIELD_OFFSET, 0]
    ctr0 = field[FIELD_STATE, 0]
    for rb in range(lo, hi, R):
        rows = min(R, hi - rb)
        v0 = rb * d
        nv = rows * d
        if fused_d1:
            _pass_b_block_d1(xf[rb:rb + rows], sf[rb:rb + rows], J[rb:rb + rows], ebuf[rb:rb + rows], rb, keep, scale, floor,
                             gain, weight, off0, ctr0, q, kappa, r, half, jmax_l, jarg_l, lane_x, lane_m)
            if eg:  # a second loop over the block (in L1): hedge's loop above stays the one it was
                _centred_lanes(xf[rb:rb + rows], ebuf[rb:rb + rows], yr, lane_d)
            continue
        lp = log_p[rb:rb + rows]
        eb = ebuf[rb:rb + rows]
        wb = w[:rows]
        # 5. normalise and share the weights; wb = the new p
        if linear:  # the weights live in ebuf: no log, no exp
            wb = eb
            if not reweight:
                pass
            elif alpha == 1.0:
                for k in range(rows):
                    eb[k] = floor
            else:
                for k in range(rows):
                    eb[k] = keep * (eb[k] * scale) + floor
        elif not reweight:
            _exp_into(lp, wb)
        elif alpha == 0.0:
            for k in range(rows):
                lp[k] = (lp[k] - top) - log_total
                wb[k] = eb[k] * scale
        elif alpha == 1.0:
            for k in range(rows):
                lp[k] = uniform
            _exp_into(lp, wb)
        elif floor < _SHARE_FLOOR_MIN:
            lkeep = math.log1p(-alpha)
            spread = math.log(floor)
            for k in range(rows):
                a = lkeep + ((lp[k] - top) - log_total)
                big = max(a, spread)
                lp[k] = big + math.log1p(math.exp(-abs(a - spread)))
            _exp_into(lp, wb)
        else:
            for k in range(rows):
                wb[k] = keep * (eb[k] * scale) + floor
            _log_into(wb, lp)
        # 6. move and pay
        xb = xf[v0:v0 + nv]
        sb = sf[v0:v0 + nv]
        Jb = J[rb:rb + rows]
        block_ok = all_valid
        if not block_ok:
            block_ok = True
            for v in range(nv):
                if not abs(sb[v]) <= SIGNAL_LIMIT:
                    block_ok = False
        if block_ok:
            for v in range(nv):
                xb[v], terms[v] = _move_and_pay(xb[v], sb[v], offset[v], centre[v], gain, weight, q, kappa, r)
            cost = terms[:rows]
            if d != 1:
                _row_sums(terms, rows, d, cost_row)
                cost = cost_row[:rows]
            for k in range(rows):
                Jb[k] += half * cost[k]
            _track_max(Jb, rb, rows, jmax_l, jarg_l)
        else:
            for k in range(rows):
                i = rb + k
                cost = 0.0
                if _row_valid(s, i, d):
                    for j in range(d):
                        x[i, j], c_ij = _move_and_pay(x[i, j], s[i, j], offset[k * d + j], centre[k * d + j], gain, weight,
                                                      q, kappa, r)
                        cost += c_ij
                else:
                    for j in range(d):
                        e_m = x[i, j] - centre[k * d + j]
                        cost += kappa * (e_m * e_m)
                J[i] += half * cost
            _track_max(Jb, rb, rows, jmax_l, jarg_l)
        # 7. sums of the moved states and the mixture
        for v in range(nv):
            lane_x[v] += xb[v]
        if d == 1:
            for k in range(rows):
                lane_m[k] += wb[k] * xb[k]
        else:
            for k in range(rows):
                pk = wb[k]
                for j in range(d):
                    lane_m[k * d + j] += pk * xb[k * d + j]
        if eg:  # d > 1: the weights spread over their values first (a flat loop vectorises)
            wv = wb
            if d != 1:
                wv = wide[:nv]
                for k in range(rows):
                    pk = wb[k]
                    for j in range(d):
                        wv[k * d + j] = pk
            _centred_lanes(xb, wv, yr, lane_d)
    _lane_columns(lane_x, d, R, row[dp:dp + d])
    _lane_columns(lane_m, d, R, row[2 * dp:2 * dp + d])
    if eg:
        _lane_columns(lane_d, d, R, row[scal + PAD:scal + PAD + d])
    jmax = -np.inf
    jarg = -1.0
    for k in range(R):  # the largest lane, the first client among equal lanes
        if jmax_l[k] > jmax or (jmax_l[k] == jmax and jarg_l[k] < jarg):
            jmax = jmax_l[k]
            jarg = jarg_l[k]
    row[scal + W_MAX] = jmax
    row[scal + W_ARG] = jarg


@njit(**_jit)
def _merge_b(work, field, yhat, y, stats, flags, n, d):
    """Merge pass B's rows in chunk order: ``m(t+1)`` into ``field[FIELD_NEXT]``, ``yhat(t+1)``, the worst client.

    eg: ``field[FIELD_DEV]`` (the centred mixture) and ``field[FIELD_CENTRE] = y``, for the next round's pass A.
    """
    dp = _pad(d)
    scal = 3 * dp
    chunks = work.shape[0]
    for j in range(d):
        acc = 0.0
        mix = 0.0
        for c in range(chunks):
            acc += work[c, dp + j]
            mix += work[c, 2 * dp + j]
        field[FIELD_NEXT, j] = acc / n
        yhat[j] = mix
    if flags[F_RULE] == RULE_EG:
        for j in range(d):
            dev = 0.0
            for c in range(chunks):
                dev += work[c, scal + PAD + j]
            field[FIELD_DEV, j] = dev
            field[FIELD_CENTRE, j] = y[j]
    jmax = -np.inf
    jarg = -1.0
    for c in range(chunks):
        if work[c, scal + W_MAX] > jmax:
            jmax = work[c, scal + W_MAX]
            jarg = work[c, scal + W_ARG]
    stats[S_MAX_COST] = jmax
    stats[S_ARG_COST] = jarg


# --------------------------------------------------------------------------- drivers
@njit(**_jit)
def _pass_a_serial(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats):
    """Pass A on every chunk, one thread (see :func:`pass_a`)."""
    kt = _round_key(key, flags[F_T])
    for c in range(work.shape[0]):
        _pass_a_chunk(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, field, work, params, kt, flags, c)
    _merge_a(work, field, params, flags, stats, x.shape[1])


# The parallel passes of a round per target are run's parallel sweep with one of its two passes: one prange loop (and
# one compile of its body, about 18 s of CPU) serves both calls; each had a parallel loop of its own before.
@njit(**_jit)
def _pass_a_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats,
                     threads):
    """Pass A with the chunks spread over the threads (the same bits): :func:`_sweep_parallel` without pass B."""
    kt = _round_key(key, flags[F_T])
    # do_b, do_a computed at run time (False, True), as in _rounds_pass_a: the same specialisation as run's sweep
    _sweep_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, work, field, params, flags, flags,
                    stats[S_TOP], stats[S_LOG_TOTAL], kt, threads < 1, threads > 1)
    _merge_a(work, field, params, flags, stats, x.shape[1])


@njit(**_jit)
def _pass_b_serial(x, s, J, log_p, ebuf, y, yhat, field, work, params, flags, stats):
    """Pass B on every chunk, one thread (see :func:`pass_b`)."""
    n = x.shape[0]
    top, log_total = stats[S_TOP], stats[S_LOG_TOTAL]
    chunks = work.shape[0]
    for k in range(chunks):  # last chunk first: pass A's last chunks are still in cache
        _pass_b_chunk(x, s, J, log_p, ebuf, y, work, field, params, flags, top, log_total, float(n), chunks - 1 - k)
    _merge_b(work, field, yhat, y, stats, flags, n, x.shape[1])


@njit(**_jit)
def _pass_b_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, field, work, params, flags, stats, threads):
    """Pass B with the chunks spread over the threads (the same bits): :func:`_sweep_parallel` without pass A.

    Pass A's chunk order: each thread gets back the chunks it had in pass A (its L2).
    """
    _sweep_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, work, field, params, flags, flags,
                    stats[S_TOP], stats[S_LOG_TOTAL], np.uint64(0), threads > 1, threads < 1)
    _merge_b(work, field, yhat, y, stats, flags, x.shape[0], x.shape[1])


@njit(**_jit)
def _round_flags(flags, t, record):
    """Round ``t``'s flags (see :func:`memoa_fast.kernels._pipeline_reference.round_flags`)."""
    later = 1 if t > 0 else 0
    flags[F_T] = t
    flags[F_REWEIGHT] = later
    flags[F_UPDATE] = later
    flags[F_RECORD] = later if record else 0


@njit(**_jit)
def _rounds(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys, yhat, yhats, field, work, params, key, flags, stats,
            threads, record, gamma, discount):
    """Rounds ``ys[0], ys[1], ...`` (see :func:`run_rounds`): pass B of round ``k`` and pass A of round ``k + 1`` in one sweep.

    Both passes touch only their own chunk's rows (and ``work[c]``'s disjoint
    columns), and pass A needs nothing from pass B's merge unless the rule is
    eg (its loss uses the centred mixture ``field[FIELD_DEV]`` that merge B writes): so with hedge each chunk runs pass B of
    round ``k`` then pass A of round ``k + 1`` while its rows are in L2, and the
    merges follow the sweep. Every client's arithmetic and every merge is the
    one a round per target does (pass A, merge, pass B, merge), in the same order: the same bits.
    One sweep and (on two threads) one parallel region per round instead of two.
    """
    T = ys.shape[0]
    n, d = x.shape
    chunks = work.shape[0]
    fuse = flags[F_RULE] != RULE_EG
    t0 = flags[F_T]
    fa = flags.copy()  # the flags of the round whose pass A runs next
    fb = flags.copy()  # the flags of the round whose pass B runs next
    recorded = 0  # rounds that recorded their errors
    _round_flags(fa, t0, record)
    _rounds_pass_a(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys[0], yhat, field, work, params, key, fa, fb, stats,
                   threads)
    for k in range(T):
        for j in range(fa.shape[0]):  # not fb[:] = fa: its shape check's error message costs 3 s of compile
            fb[j] = fa[j]
        params[P_HALF_DISCOUNT] = 0.5 * discount
        top, log_total = stats[S_TOP], stats[S_LOG_TOTAL]
        nxt = k + 1 < T and fuse
        if k + 1 < T:
            _round_flags(fa, t0 + k + 1, record)
        kt = _round_key(key, fa[F_T]) if nxt else np.uint64(0)
        if threads == 1:
            for i in range(chunks):
                # pass B alone goes last chunk first (pass A's last chunks are still in cache); the merge is in chunk order
                c = i if nxt else chunks - 1 - i
                _pass_b_chunk(x, s, J, log_p, ebuf, ys[k], work, field, params, fb, top, log_total, float(n), c)
                if nxt:
                    _pass_a_chunk(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys[k + 1], field, work, params, kt, fa,
                                  c)
        else:
            _sweep_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys[k + 1] if nxt else ys[k], yhat, work,
                            field, params, fa, fb, top, log_total, kt, threads > 1, nxt)  # a bool, see _rounds_pass_a
        _merge_b(work, field, yhat, ys[k], stats, fb, n, d)
        for j in range(d):
            field[FIELD_STATE, j] = field[FIELD_NEXT, j]
            yhats[k, j] = yhat[j]
        discount *= gamma  # _layout.next_discount, inlined: below MIN_NORMAL the product stalls for gamma > 1/2
        if discount > 0.0 and discount < MIN_NORMAL:
            discount = math.pow(gamma, np.float64(t0 + k + 1))
        recorded += fb[F_RECORD]
        if nxt:
            _merge_a(work, field, params, fa, stats, d)
        elif k + 1 < T:  # eg: pass A of round k + 1 needs the centred mixture, merged above
            _rounds_pass_a(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys[k + 1], yhat, field, work, params, key, fa,
                           fb, stats, threads)
    for j in range(fb.shape[0]):
        flags[j] = fb[j]
    return discount, recorded


# Compile time: a parallel function compiles its prange body with the chunk functions inlined into it, about 18-19 s of
# CPU here for pass A and B. So _rounds has one parallel sweep, for pass B + A fused and for pass A alone, and
# _rounds_pass_a is inlined into _rounds as Numba IR (no compiled function of its own). The first Pipeline.run compiled
# for 63-66 s of CPU through two (_fused_sweep_parallel, and _pass_a_parallel, which only pass_a now calls) and one
# more specialisation, and for 39-47 s now (four runs; MEMOA_FAST_CACHE=0; the CPU time of the first call).
@njit(inline="always", **_jit)
def _rounds_pass_a(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, field, work, params, key, fa, fb, stats,
                   threads):
    """Pass A alone (flags ``fa``; ``fb`` only fills the sweep's arguments), on ``threads`` (1: serial), then its merge."""
    kt = _round_key(key, fa[F_T])
    if threads == 1:
        # _pass_a_serial's loop, written here: calling it compiled it with pass A inlined once more (the first
        # Pipeline.run then compiled for 51-53 s of CPU, against 45-47 measured beside it)
        for c in range(work.shape[0]):
            _pass_a_chunk(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, field, work, params, kt, fa, c)
    else:
        # do_b, do_a as bools computed at run time (False, True here): literal ones would type as Literal[bool] and
        # compile a second sweep (about 19 s of CPU)
        _sweep_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, work, field, params, fa, fb,
                        stats[S_TOP], stats[S_LOG_TOTAL], kt, threads < 1, threads > 1)
    _merge_a(work, field, params, fa, stats, x.shape[1])


@njit(parallel=True, **_jit)
def _sweep_parallel(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, work, field, params, fa, fb, top,
                    log_total, kt, do_b, do_a):
    """Chunk by chunk over the threads: (``do_b``) pass B with flags ``fb``, then (``do_a``) pass A on ``y``.

    Pass B alone (eg) takes ``y`` as its centre, the round's own target; fused with pass A (hedge) it does not read it.

    Pass B of round ``k`` and pass A of round ``k + 1`` (flags ``fa``) fused, or either alone (the same bits).
    """
    n = x.shape[0]
    chunks = work.shape[0]
    for i in prange(chunks):
        c = _chunk_order(i, chunks)
        if do_b:
            _pass_b_chunk(x, s, J, log_p, ebuf, y, work, field, params, fb, top, log_total, float(n), c)
        if do_a:
            _pass_a_chunk(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, field, work, params, kt, fa, c)


@njit(**_jit)
def _normals_rows(key, first, t, out):
    """``out[r, j]`` = the normal of client ``first + r``, coordinate ``j``, round ``t``."""
    n, d = out.shape
    kt = _round_key(key, t)
    g0 = first * d
    q0 = g0 >> 1
    m = ((g0 + n * d + 1) >> 1) - q0
    buf = np.empty(2 * m)
    _normals_into(kt, q0, m, buf)
    flat = out.reshape(-1)
    off = g0 - 2 * q0
    for k in range(n * d):
        flat[k] = buf[off + k]


@njit(**_jit)
def _exp_public(src, dst):
    """Jitted entry to the vectorised exp, for the accuracy tests."""
    _exp_into(src, dst)


@njit(**_jit)
def _log_public(src, dst):
    """Jitted entry to the vectorised log, for the accuracy tests."""
    _log_into(src, dst)


# --------------------------------------------------------------------------- public (semantics: _pipeline_reference)
def _flat(weights, lags):
    """A 1-D view of a C-contiguous array."""
    F, n, d = weights.shape
    return weights.reshape(F, n * d), lags.reshape(lags.shape[0], n * d)


def pass_a(x, s, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats,
           threads):
    """Pass A and its merge; semantics: :func:`memoa_fast.kernels._pipeline_reference.pass_a`."""
    W, A = _flat(weights, lags)
    key = np.uint64(key)
    if threads == 1:
        return _pass_a_serial(x, s, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, field, work, params, key, flags, stats)
    with Threads(threads):  # (pass A reads no cost: ebuf fills the sweep's J, of the same type)
        return _pass_a_parallel(x, s, ebuf, log_p, ebuf, sigma, W, A, sq_err, sq_sig, y, yhat, field, work, params, key,
                                flags, stats, threads)


# Pass B reads none of pass A's own arrays: these fill the sweep's places for them, with the same types (so both passes
# and run share one compiled sweep).
_NO_ROWS = np.empty((0, 0))


def pass_b(x, s, J, log_p, ebuf, y, yhat, field, work, params, flags, stats, threads):
    """Pass B and its merge; semantics: :func:`memoa_fast.kernels._pipeline_reference.pass_b`."""
    if threads == 1:
        return _pass_b_serial(x, s, J, log_p, ebuf, y, yhat, field, work, params, flags, stats)
    with Threads(threads):
        return _pass_b_parallel(x, s, J, log_p, ebuf, ebuf, _NO_ROWS, _NO_ROWS, ebuf, ebuf, y, yhat, field, work, params,
                                flags, stats, threads)


def run_rounds(x, s, J, log_p, ebuf, sigma, weights, lags, sq_err, sq_sig, ys, yhat, yhats, field, work, params, key,
               flags, stats, threads, record, gamma, discount):
    """Rounds on the targets ``ys`` (T >= 1, d) in one compiled call; returns ``(discount, rounds recorded)``.

    Semantics: :func:`memoa_fast.kernels._pipeline_reference.run_rounds`. The call runs whole or not at all
    (Python cannot interrupt compiled code), and copying the last round's flags into ``flags`` is its last write:
    ``Pipeline`` tells from ``flags[F_RECORD]`` whether an interrupted call had run. One call's work is bounded
    by the caller (``Pipeline.run`` splits a long series), so that Ctrl-C acts soon.
    """
    W, A = _flat(weights, lags)
    key = np.uint64(key)
    if threads == 1:
        return _rounds(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys, yhat, yhats, field, work, params, key, flags,
                       stats, 1, record, gamma, discount)
    with Threads(threads):
        return _rounds(x, s, J, log_p, ebuf, sigma, W, A, sq_err, sq_sig, ys, yhat, yhats, field, work, params, key, flags,
                       stats, threads, record, gamma, discount)


def normals(key, first, t, n, d):
    """The normals of clients ``[first, first + n)`` at round ``t``, shape ``(n, d)`` (the kernel's own stream)."""
    out = np.empty((n, d))
    _normals_rows(np.uint64(key), first, t, out)
    return out


def exp(src):
    """The kernel's vectorised ``exp`` of a 1-D float64 array (for the accuracy tests)."""
    src = np.ascontiguousarray(src, dtype=np.float64)
    out = np.empty_like(src)
    _exp_public(src, out)
    return out


def log(src):
    """The kernel's vectorised ``log`` of a 1-D float64 array (for the accuracy tests)."""
    src = np.ascontiguousarray(src, dtype=np.float64)
    out = np.empty_like(src)
    _log_public(src, out)
    return out


def sincos_2pi(u):
    """The kernel's ``(cos(2 pi u), sin(2 pi u))`` of a 1-D float64 array in ``[0, 1)`` (for the accuracy tests)."""
    u = np.ascontiguousarray(u, dtype=np.float64)
    c, s = np.empty_like(u), np.empty_like(u)
    _sincos_into(u, c, s)
    return c, s


# Numba's cache of this module also checks the files it takes values from (kernels/_seal.py).
seal(globals())
