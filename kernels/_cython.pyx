# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels: the same functions, signatures and semantics as :mod:`._reference`.

The NumPy module :mod:`._reference` is the specification of every public
function here; the names of the rows and columns of the small arrays
(``coef``, ``mix``, ``field``, ``work``) are in :mod:`._layout`. Each public
function reads the :class:`~._layout.Layout` named tuple once, at the Python
level, into a C struct (:c:type:`Lay`), then runs without the GIL.

Determinism
-----------
Every reduction runs over fixed chunks of ``CHUNK`` agents, one partial row
per chunk in ``work``, merged serially in chunk order by one merge function
(the same one for the two-pass API a Dask shard uses and for
:func:`fused_step`). The order of every floating-point addition is fixed by
the code, ``d`` and ``K`` alone, never by the thread count: the same input
gives the same bytes on one thread and on many. No ``-ffast-math``: the C
compiler may not reassociate a sum.

Speed: loops the C compiler vectorises
--------------------------------------
As in :mod:`._numba` (see its module docstring), a chunk is walked as a flat
run of ``rows * d`` contiguous doubles in *blocks* of ``R = max(1, LANES // d)``
whole rows (``L = R d`` values, in L1):

- element-wise work (the policy, the stage-cost terms, the server's losses)
  is one unit-stride loop over the block, with the per-coordinate constants
  (the class offset, ``m(t)``, the target) replicated once per chunk into a
  length-``L`` *pattern*;
- sums over agents go into ``L`` *lanes* (``lane[l] += v[l]``, block after
  block: element-wise, so it vectorises without reassociation); column ``j``
  is then ``lane[j] + lane[d + j] + ... + lane[(R-1) d + j]`` in that order;
- the largest cost is tracked in ``MAX_LANES`` lanes of (value, first index);
- one class: pass 1 adds a chunk's signals into the lanes and tests them in
  the same read (an integer-or flag); only a chunk holding an invalid value
  is summed again block by block, and there only a block holding an invalid
  row row by row. Pass 2 moves a chunk that pass 1 counted all valid without
  checking it, and adds the moved states into the lanes in the same loop
  (measured at N = 10^6, d = 16, one thread: the step went from 1.46x to
  about 1.0x Numba's, which does the same);
- ``exp`` and ``log`` of the server are element-wise polynomial kernels
  (:c:func:`_exp_into`, :c:func:`_log_into`) that vectorise, where libm's
  scalar calls do not.

The innermost element-wise loops (``memoa_*``, about 15 short functions)
are written in C in the ``cdef extern`` block below, with ``restrict``
pointers, so that GCC can compile each three times (``target_clones``:
AVX-512, AVX2 + FMA, and the baseline SSE2 of any x86-64) and the CPU
picks the widest at load time: a wheel built for any x86-64 runs at the
speed of the machine, as Numba's host-compiled code does. Other compilers
and CPUs get the same C compiled once for the build's target
(``-DMEMOA_FAST_NO_CLONES`` forces that). The clones with FMA contract
``a * b + c``, so results agree across machines to rounding (as Numba's
do), and bitwise on one machine whatever the thread count. Everything else
(chunking, merges, the validity checks, the class path) is Cython.

With K > 1 classes the per-agent class lookup makes the row loop go agent by
agent (C ``memoa_class_signal_sums``, ``memoa_class_move``): each class's
coefficients and policy offset sit in one row of a per-chunk table, the class
sums go into ``P = 4`` interleaved copies (row ``k`` of a chunk into copy
``k mod 4``, folded at the end: consecutive agents of one class no longer
chain their additions through memory), the signal pass tests validity in the
loop that adds the row, and at ``d = 4`` a row is one vector (GCC/Clang
vector extensions: the whole-row arithmetic is a few vector instructions);
``d = 1`` has its own scalar loops. K = 1 (or an empty ``labels``) takes the
block path and never reads ``labels``.

The kernels trust their inputs: C-contiguous float64 arrays, int64 labels in
``[0, K)``, shapes as the reference documents (checked by the caller).
"""
from cython.parallel cimport prange
from libc.float cimport DBL_MAX
from libc.math cimport INFINITY, fabs, isfinite, log, log1p, exp
from libc.stdint cimport int64_t
cimport openmp

cdef extern from *:
    """
    /* memoa-fast: the innermost loops, in C so that each is compiled three times (AVX-512, AVX2 + FMA and the
       baseline x86-64 SSE2) and the CPU picks the widest at load time (GCC's target_clones, an ifunc on Linux).
       Elsewhere (other compilers, other CPUs) they are plain C99 compiled for the build's target. Every loop is
       element-wise and unit stride (vectorised without reassociating a sum); the argument pointers are restrict. */
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    #include <stddef.h>
    #if defined(_MSC_VER)
    #define MEMOA_RESTRICT __restrict
    #define MEMOA_INLINE __inline
    #else
    #define MEMOA_RESTRICT __restrict__
    #define MEMOA_INLINE inline
    #endif
    /* target_clones needs GCC >= 12 (the x86-64-v3/v4 names) and glibc's ifunc (musl has none). */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) \
        && __GNUC__ >= 12 && !defined(MEMOA_FAST_NO_CLONES)
    #define MEMOA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
    #else
    #define MEMOA_CLONES
    #endif
    #define MEMOA_R MEMOA_RESTRICT
    /* No FP trap is ever enabled here, so GCC may if-convert a comparison (the clamps, the selects): without
       this the baseline SSE2 clone of a loop with a select is not vectorised. Values are unchanged. */
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC push_options
    #pragma GCC optimize ("no-trapping-math")
    #endif

    static MEMOA_INLINE int64_t memoa_bits(double v) { int64_t i; memcpy(&i, &v, 8); return i; }
    static MEMOA_INLINE double memoa_from_bits(int64_t i) { double v; memcpy(&v, &i, 8); return v; }

    /* A row of d = 4 doubles as one vector (GCC and Clang vector extensions; the baseline clone splits it in two
       SSE2 halves): the class paths' d = 4 loops add, subtract and multiply whole rows. Elsewhere: scalar loops. */
    #if defined(__GNUC__) || defined(__clang__)
    #define MEMOA_V4 1
    typedef double memoa_v4 __attribute__((vector_size(32)));
    typedef int64_t memoa_i4 __attribute__((vector_size(32)));
    static MEMOA_INLINE memoa_v4 memoa_load4(const double *p) { memoa_v4 v; memcpy(&v, p, 32); return v; }
    static MEMOA_INLINE void memoa_store4(double *p, memoa_v4 v) { memcpy(p, &v, 32); }
    #endif

    /* Number of entries of v[0:m] with !(|v| <= limit) (NaN, inf, too large): float64 sums of 0/1 selects in
       8 lanes (exact below 2^53). One running sum would be a chain of dependent adds, one value per add latency;
       8 lanes are one vector add per 8 values. */
    MEMOA_CLONES static double memoa_count_invalid(const double *MEMOA_R v, ptrdiff_t m, double limit) {
        double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        ptrdiff_t k = 0;
        for (; k + 8 <= m; k += 8)
            for (int l = 0; l < 8; l++) lane[l] += fabs(v[k + l]) <= limit ? 0.0 : 1.0;
        for (; k < m; k++) lane[0] += fabs(v[k]) <= limit ? 0.0 : 1.0;
        return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }

    /* lanes[l] += v[b L + l] for every block b of L values of v[0:m], block after block; returns 1 when one of
       v[0:m] is not at most limit in magnitude (NaN, inf, too large: memoa_count_invalid's test), else 0. One read
       of each value for both (the signal pass's common case, a chunk of valid signals); the flag is an integer or,
       which vectorises (a float count would be one add latency per value: no reassociation here). */
    MEMOA_CLONES static int64_t memoa_lane_add_any_invalid(const double *MEMOA_R v, ptrdiff_t m, ptrdiff_t L,
                                                           double *MEMOA_R lanes, double limit) {
        int64_t bad = 0;
        ptrdiff_t b = 0;
        for (; b + L <= m; b += L)
            for (ptrdiff_t l = 0; l < L; l++) {
                double x = v[b + l];
                lanes[l] += x;
                bad |= fabs(x) <= limit ? 0 : 1;
            }
        for (ptrdiff_t l = 0; l < m - b; l++) {
            double x = v[b + l];
            lanes[l] += x;
            bad |= fabs(x) <= limit ? 0 : 1;
        }
        return bad;
    }

    /* lanes[l] += v[b L + l] for every block b of L values of v[0:m], block after block. */
    MEMOA_CLONES static void memoa_lane_add(const double *MEMOA_R v, ptrdiff_t m, ptrdiff_t L, double *MEMOA_R lanes) {
        ptrdiff_t b = 0;
        for (; b + L <= m; b += L)
            for (ptrdiff_t l = 0; l < L; l++) lanes[l] += v[b + l];
        for (ptrdiff_t l = 0; l < m - b; l++) lanes[l] += v[b + l];
    }

    /* lanes[l] += w[l] x[l] for l < m. */
    MEMOA_CLONES static void memoa_weighted_add(ptrdiff_t m, const double *MEMOA_R w, const double *MEMOA_R x,
                                                double *MEMOA_R lanes) {
        for (ptrdiff_t l = 0; l < m; l++) lanes[l] += w[l] * x[l];
    }

    /* lanes[l] += w[l] (x[l] - c[l]) for l < m (eg's mixture error: differences from the target); a zero weight adds
       0, as in memoa_weighted_add (not 0 * inf = NaN where x - c overflows). */
    MEMOA_CLONES static void memoa_weighted_diff_add(ptrdiff_t m, const double *MEMOA_R w, const double *MEMOA_R x,
                                                     const double *MEMOA_R c, double *MEMOA_R lanes) {
        for (ptrdiff_t l = 0; l < m; l++) lanes[l] += w[l] * (w[l] != 0.0 ? x[l] - c[l] : 0.0);
    }

    /* One block of the (max, first index) tracker: lane k takes J[k] and index[k] when J[k] > vmax[k];
       index[k] += step. The index is blended arithmetically (exact for integers below 2^53). */
    MEMOA_CLONES static void memoa_max_lanes(ptrdiff_t m, const double *MEMOA_R J, double *MEMOA_R vmax,
                                             double *MEMOA_R varg, double *MEMOA_R index, double step) {
        for (ptrdiff_t k = 0; k < m; k++) {
            double v = J[k], old = vmax[k], up = v > old ? 1.0 : 0.0;
            vmax[k] = v > old ? v : old;
            varg[k] = varg[k] + up * (index[k] - varg[k]);
            index[k] = index[k] + step;
        }
    }

    /* The policy on m values whose signals are all valid: u = -gain (x - weight s - offset), x += u,
       terms = q (x - s)^2 + kappa (x - centre)^2 + r u^2 (x before the move), and lanes[l] += the moved x
       (the state sums while the block is in registers: no second sweep of the chunk). */
    MEMOA_CLONES static void memoa_policy_block(ptrdiff_t m, double *MEMOA_R xb, const double *MEMOA_R sb,
                                                const double *MEMOA_R offset, const double *MEMOA_R centre,
                                                double *MEMOA_R terms, double gain, double weight, double q,
                                                double kappa, double r, double *MEMOA_R lanes) {
        for (ptrdiff_t l = 0; l < m; l++) {
            double xi = xb[l], si = sb[l];
            double u = -gain * (xi - weight * si - offset[l]);
            double es = xi - si, em = xi - centre[l];
            double moved = xi + u;
            terms[l] = q * es * es + kappa * em * em + r * u * u;
            xb[l] = moved;
            lanes[l] += moved;
        }
    }

    /* out[k] = terms[k d] + ... + terms[k d + d - 1] in that order, k < nr. For d in {2, 3, 4, 8, 16} the row
       length is a compile-time constant, so gcc vectorises across rows (grouped loads); otherwise the loops are
       interchanged so the rows are independent chains. The order of the adds within a row is the same in every
       branch, so the result does not depend on which one runs. */
    #define MEMOA_ROW_SUMS_FIXED(D) \
        for (ptrdiff_t k = 0; k < nr; k++) { \
            const double *row = terms + k * (D); \
            double s = row[0]; \
            for (int j = 1; j < (D); j++) s = s + row[j]; \
            out[k] = s; \
        } \
        return;
    MEMOA_CLONES static void memoa_row_sums(ptrdiff_t nr, ptrdiff_t d, const double *MEMOA_R terms,
                                            double *MEMOA_R out) {
        switch (d) {
            case 2: MEMOA_ROW_SUMS_FIXED(2)
            case 3: MEMOA_ROW_SUMS_FIXED(3)
            case 4: MEMOA_ROW_SUMS_FIXED(4)
            case 8: MEMOA_ROW_SUMS_FIXED(8)
            case 16: MEMOA_ROW_SUMS_FIXED(16)
            default: break;
        }
        for (ptrdiff_t k = 0; k < nr; k++) out[k] = terms[k * d];
        for (ptrdiff_t j = 1; j < d; j++)
            for (ptrdiff_t k = 0; k < nr; k++) out[k] = out[k] + terms[k * d + j];
    }

    /* J[k] += hd cost[k], k < nr. */
    MEMOA_CLONES static void memoa_pay(ptrdiff_t nr, double *MEMOA_R J, const double *MEMOA_R cost, double hd) {
        for (ptrdiff_t k = 0; k < nr; k++) J[k] += hd * cost[k];
    }

    /* The server's per-coordinate loss terms: (x - ref)^2 (hedge) or (x - cen) ref (eg: ref = err, cen = the
       centre, y or 0 where err = 0). */
    MEMOA_CLONES static void memoa_loss_terms(ptrdiff_t m, int hedge, const double *MEMOA_R x,
                                              const double *MEMOA_R ref, const double *MEMOA_R cen,
                                              double *MEMOA_R terms) {
        if (hedge) {
            for (ptrdiff_t l = 0; l < m; l++) { double e = x[l] - ref[l]; terms[l] = e * e; }
        } else {
            /* a zero factor, a zero term: x at the centre adds 0 where ref (err) overflowed (not 0 * inf = NaN) */
            for (ptrdiff_t l = 0; l < m; l++) { double e = x[l] - cen[l]; terms[l] = e != 0.0 ? e * ref[l] : 0.0; }
        }
    }

    /* log_p[k] -= clip(eta (scale loss[k])) (NaN or over limit -> limit, under -limit -> -limit; limit = DBL_MAX: only
       an overflow is clipped) when eta != 0;
       then mx[k] = max(mx[k], log_p[k]). */
    MEMOA_CLONES static void memoa_step(ptrdiff_t nr, double *MEMOA_R lp, const double *MEMOA_R loss, double eta,
                                        double scale, double limit, double *MEMOA_R mx) {
        if (eta != 0.0) {
            for (ptrdiff_t k = 0; k < nr; k++) {
                double st = eta * (scale * loss[k]);
                st = st <= limit ? st : limit;
                st = st < -limit ? -limit : st;
                lp[k] = lp[k] - st;
            }
        }
        for (ptrdiff_t k = 0; k < nr; k++) mx[k] = lp[k] > mx[k] ? lp[k] : mx[k];
    }

    /* dst[k] = (src[k] - a) - b. */
    MEMOA_CLONES static void memoa_shift(ptrdiff_t m, const double *src, double a, double b, double *dst) {
        for (ptrdiff_t k = 0; k < m; k++) dst[k] = (src[k] - a) - b;
    }

    /* w[k] = keep w[k] + floor. */
    MEMOA_CLONES static void memoa_affine(ptrdiff_t m, double *MEMOA_R w, double keep, double floor_) {
        for (ptrdiff_t k = 0; k < m; k++) w[k] = keep * w[k] + floor_;
    }

    /* dst[k] = exp(src[k]) (dst may be src): Cody-Waite reduction x = n ln2 + r, |r| <= ln(2)/2, the degree-13
       Taylor polynomial of exp(r), and the scale 2^n built from its bits in two halves 2^n1 2^n2,
       n1 = round(n / 2), both found with the 1.5 2^52 shift trick (so the integer work is adds and left
       shifts), so that a subnormal result rounds once. Inputs clamped to [-745.5, 710]. */
    MEMOA_CLONES static void memoa_exp_into(const double *src, double *dst, ptrdiff_t m) {
        const double log2e = 1.4426950408889634, shift = 6755399441055744.0;
        const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
        const int64_t shift_bits = 0x4338000000000000LL;
        for (ptrdiff_t k = 0; k < m; k++) {
            double x = src[k];
            x = x < -745.5 ? -745.5 : x;
            x = x > 710.0 ? 710.0 : x;
            double t = x * log2e + shift, nf = t - shift, h = nf * 0.5 + shift;
            double r = (x - nf * ln2_hi) - nf * ln2_lo;
            double p = 1.0 / 6227020800.0;
            p = p * r + 1.0 / 479001600.0;
            p = p * r + 1.0 / 39916800.0;
            p = p * r + 1.0 / 3628800.0;
            p = p * r + 1.0 / 362880.0;
            p = p * r + 1.0 / 40320.0;
            p = p * r + 1.0 / 5040.0;
            p = p * r + 1.0 / 720.0;
            p = p * r + 1.0 / 120.0;
            p = p * r + 1.0 / 24.0;
            p = p * r + 1.0 / 6.0;
            p = p * r + 0.5;
            p = p * r + 1.0;
            p = p * r + 1.0;
            int64_t n = memoa_bits(t) - shift_bits, n1 = memoa_bits(h) - shift_bits;
            dst[k] = p * memoa_from_bits((n1 + 1023) << 52) * memoa_from_bits((n - n1 + 1023) << 52);
        }
    }

    /* dst[k] = log(src[k]) (dst may be src). Positive normal finite inputs: musl's bit split x = 2^k z,
       z in [sqrt(1/2), sqrt(2)), fdlibm's log(1 + f) = f - (hfsq - s (hfsq + R(s^2))), s = f / (2 + f),
       plus k ln 2 in Cody-Waite halves; the exponent shift is made logical by a 2^62 bias. Every other input
       (0, subnormal, negative, inf, NaN) is redone by libm's log in a scalar loop, run only when the vectorised
       count finds one, so dst[k] depends on src[k] alone. */
    MEMOA_CLONES static void memoa_log_into(const double *src, double *dst, ptrdiff_t m) {
        const uint64_t off = 0x3FE6A09E667F3BCDULL, field = 0xFFF0000000000000ULL, bias = 0x4000000000000000ULL;
        const uint64_t ebits = 0x4338000000000000ULL - 1024;
        const double shift = 6755399441055744.0, tiny = 2.2250738585072014e-308, huge = 1.7976931348623157e308;
        const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
        const double lg1 = 6.666666666666735130e-01, lg2 = 3.999999999940941908e-01, lg3 = 2.857142874366239149e-01;
        const double lg4 = 2.222219843214978396e-01, lg5 = 1.818357216161805012e-01, lg6 = 1.531383769920937332e-01;
        const double lg7 = 1.479819860511658591e-01;
        double bad = 0.0;
        for (ptrdiff_t k = 0; k < m; k++) {
            double x = src[k];
            bad += ((x >= tiny) & (x <= huge)) ? 0.0 : 1.0;
            uint64_t ix = (uint64_t)memoa_bits(x), t = ix - off;
            double z = memoa_from_bits((int64_t)(ix - (t & field)));
            double e = memoa_from_bits((int64_t)(((t + bias) >> 52) + ebits)) - shift;
            double f = z - 1.0, s = f / (2.0 + f), zz = s * s, w = zz * zz;
            double r = zz * (lg1 + w * (lg3 + w * (lg5 + w * lg7))) + w * (lg2 + w * (lg4 + w * lg6));
            double hfsq = 0.5 * f * f;
            dst[k] = e * ln2_hi - ((hfsq - (s * (hfsq + r) + e * ln2_lo)) - f);
        }
        if (bad != 0.0)
            for (ptrdiff_t k = 0; k < m; k++) {
                double x = src[k];
                if (!(x >= tiny && x <= huge)) dst[k] = log(x);
            }
    }
    /* Class sums of nr rows of v (d values each) in P interleaved copies (P a power of two): row k, of class
       l = labels[k], adds v[k d + j] to acc[(p K + l) d + j] and 1 to count[p K + l], p = k mod P. The copies break
       the store-to-load chains of consecutive rows of one class; the order of the adds is fixed by the rows. d = 1
       and d = 4 have their own loops. */
    MEMOA_CLONES static void memoa_class_sums(ptrdiff_t nr, ptrdiff_t d, ptrdiff_t K, ptrdiff_t P,
                                              const int64_t *MEMOA_R labels, const double *MEMOA_R v,
                                              double *MEMOA_R acc, double *MEMOA_R count) {
        ptrdiff_t mask = P - 1;
        if (d == 4) {
            for (ptrdiff_t k = 0; k < nr; k++) {
                ptrdiff_t c = (k & mask) * K + labels[k];
                double *a = acc + 4 * c;
                const double *row = v + 4 * k;
                count[c] += 1.0;
                for (int j = 0; j < 4; j++) a[j] += row[j];
            }
            return;
        }
        if (d == 1) {
            for (ptrdiff_t k = 0; k < nr; k++) {
                ptrdiff_t c = (k & mask) * K + labels[k];
                count[c] += 1.0;
                acc[c] += v[k];
            }
            return;
        }
        for (ptrdiff_t k = 0; k < nr; k++) {
            ptrdiff_t c = (k & mask) * K + labels[k];
            double *a = acc + d * c;
            const double *row = v + d * k;
            count[c] += 1.0;
            for (ptrdiff_t j = 0; j < d; j++) a[j] += row[j];
        }
    }

    /* memoa_class_sums of the valid signal rows only (every entry finite and at most limit in magnitude). The test
       is folded into the loop (a separate vectorised pass would serialise a stream from memory and a loop from
       cache): (|s_0| + |s_1|) + ... <= limit (false for NaN and infinities) proves a row valid; a row that fails it
       is checked entry by entry, so a row whose entries are each within the limit but sum over it still counts. */
    MEMOA_CLONES static void memoa_class_signal_sums(ptrdiff_t nr, ptrdiff_t d, ptrdiff_t K, ptrdiff_t P,
                                                     const int64_t *MEMOA_R labels, const double *MEMOA_R s,
                                                     double limit, double *MEMOA_R acc, double *MEMOA_R count) {
        ptrdiff_t mask = P - 1;
    #ifdef MEMOA_V4
        if (d == 4) {  /* the exact test on whole rows: |s_j| <= limit in every lane, four rows per test */
            const memoa_i4 magnitude = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
            const memoa_v4 lim = {limit, limit, limit, limit};
            ptrdiff_t k = 0;
            for (; k + 4 <= nr; k += 4) {
                memoa_v4 v0 = memoa_load4(s + 4 * k), v1 = memoa_load4(s + 4 * k + 4);
                memoa_v4 v2 = memoa_load4(s + 4 * k + 8), v3 = memoa_load4(s + 4 * k + 12);
                memoa_i4 ok = ((memoa_v4)((memoa_i4)v0 & magnitude) <= lim) & ((memoa_v4)((memoa_i4)v1 & magnitude) <= lim)
                              & ((memoa_v4)((memoa_i4)v2 & magnitude) <= lim) & ((memoa_v4)((memoa_i4)v3 & magnitude) <= lim);
                int all = (ok[0] & ok[1]) & (ok[2] & ok[3]) ? 1 : 0;
                memoa_v4 v[4] = {v0, v1, v2, v3};
                for (int r = 0; r < 4; r++) {
                    if (!all) {  /* an invalid row among these four: test each */
                        memoa_i4 okr = (memoa_v4)((memoa_i4)v[r] & magnitude) <= lim;
                        if (!((okr[0] & okr[1]) & (okr[2] & okr[3]))) continue;
                    }
                    ptrdiff_t c = ((k + r) & mask) * K + labels[k + r];
                    count[c] += 1.0;
                    memoa_store4(acc + 4 * c, memoa_load4(acc + 4 * c) + v[r]);
                }
            }
            for (; k < nr; k++) {
                memoa_v4 v = memoa_load4(s + 4 * k);
                memoa_i4 ok = (memoa_v4)((memoa_i4)v & magnitude) <= lim;
                if (!((ok[0] & ok[1]) & (ok[2] & ok[3]))) continue;
                ptrdiff_t c = (k & mask) * K + labels[k];
                count[c] += 1.0;
                memoa_store4(acc + 4 * c, memoa_load4(acc + 4 * c) + v);
            }
            return;
        }
    #endif
        if (d == 1) {
            for (ptrdiff_t k = 0; k < nr; k++) {
                double v = s[k];
                if (!(fabs(v) <= limit)) continue;
                ptrdiff_t c = (k & mask) * K + labels[k];
                count[c] += 1.0;
                acc[c] += v;
            }
            return;
        }
        for (ptrdiff_t k = 0; k < nr; k++) {
            const double *row = s + d * k;
            double mag = 0.0;
            for (ptrdiff_t j = 0; j < d; j++) mag += fabs(row[j]);
            if (!(mag <= limit)) {
                int ok = 1;
                for (ptrdiff_t j = 0; j < d; j++) ok &= fabs(row[j]) <= limit;
                if (!ok) continue;
            }
            ptrdiff_t c = (k & mask) * K + labels[k];
            double *a = acc + d * c;
            count[c] += 1.0;
            for (ptrdiff_t j = 0; j < d; j++) a[j] += row[j];
        }
    }

    /* The policy and stage cost of nr agents of K classes, every signal valid, and the class sums of the moved states.
       Row l of table (5 + d values): gain, signal weight, q, kappa, r, then the class's policy offset o_l. For agent k
       of class l: u = -gain (x - weight s - o_l), J[k] += hd (q E + kappa F + r U) with E = sum_j (x_j - s_j)^2,
       F = sum_j (x_j - centre_j)^2, U = sum_j u_j^2 (x before the move), x += u, acc[(p K + l) d + j] += x_j,
       p = k mod P. d = 4 works on whole rows as vectors (MEMOA_V4) and sums its per-coordinate cost terms
       q e_j^2 + kappa f_j^2 + r u_j^2 instead, as (j0 + j2) + (j1 + j3). */
    MEMOA_CLONES static void memoa_class_move(ptrdiff_t nr, ptrdiff_t d, ptrdiff_t K, ptrdiff_t P,
                                              const int64_t *MEMOA_R labels, double *MEMOA_R x,
                                              const double *MEMOA_R s, double *MEMOA_R J,
                                              const double *MEMOA_R table, const double *MEMOA_R centre, double hd,
                                              double *MEMOA_R acc) {
        ptrdiff_t mask = P - 1;
    #ifdef MEMOA_V4
        if (d == 4) {  /* a row is one vector; the cost is sum_j (q e_j^2 + kappa f_j^2 + r u_j^2), (j0 + j2) + (j1 + j3) */
            const memoa_v4 m = memoa_load4(centre);
            for (ptrdiff_t k = 0; k < nr; k++) {
                ptrdiff_t l = labels[k];
                const double *t = table + 9 * l;
                memoa_v4 xv = memoa_load4(x + 4 * k), sv = memoa_load4(s + 4 * k);
                memoa_v4 u = -t[0] * (xv - t[1] * sv - memoa_load4(t + 5));
                memoa_v4 e = xv - sv, f = xv - m;
                memoa_v4 c = t[2] * e * e + t[3] * f * f + t[4] * u * u;
                J[k] += hd * ((c[0] + c[2]) + (c[1] + c[3]));
                xv += u;
                memoa_store4(x + 4 * k, xv);
                double *a = acc + 4 * ((k & mask) * K + l);
                memoa_store4(a, memoa_load4(a) + xv);
            }
            return;
        }
    #endif
        if (d == 1) {
            const double m = centre[0];
            for (ptrdiff_t k = 0; k < nr; k++) {
                ptrdiff_t l = labels[k];
                const double *t = table + 6 * l;
                double v = x[k], sv = s[k];
                double u = -t[0] * (v - t[1] * sv - t[5]), e = v - sv, f = v - m;
                J[k] += hd * (t[2] * (e * e) + t[3] * (f * f) + t[4] * (u * u));
                v += u;
                x[k] = v;
                acc[(k & mask) * K + l] += v;
            }
            return;
        }
        for (ptrdiff_t k = 0; k < nr; k++) {
            ptrdiff_t l = labels[k];
            const double *t = table + (5 + d) * l;
            double *xr = x + d * k;
            const double *sr = s + d * k;
            double *a = acc + d * ((k & mask) * K + l);
            double g = t[0], w = t[1], E = 0.0, F = 0.0, U = 0.0;
            for (ptrdiff_t j = 0; j < d; j++) {
                double v = xr[j], sv = sr[j];
                double u = -g * (v - w * sv - t[5 + j]), e = v - sv, f = v - centre[j];
                E += e * e;
                F += f * f;
                U += u * u;
                v += u;
                xr[j] = v;
                a[j] += v;
            }
            J[k] += hd * (t[2] * E + t[3] * F + t[4] * U);
        }
    }
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC pop_options
    #endif
    """
    double memoa_count_invalid(const double* v, Py_ssize_t m, double limit) noexcept nogil
    void memoa_lane_add(const double* v, Py_ssize_t m, Py_ssize_t L, double* lanes) noexcept nogil
    int64_t memoa_lane_add_any_invalid(const double* v, Py_ssize_t m, Py_ssize_t L, double* lanes, double limit) noexcept nogil
    void memoa_weighted_add(Py_ssize_t m, const double* w, const double* x, double* lanes) noexcept nogil
    void memoa_weighted_diff_add(Py_ssize_t m, const double* w, const double* x, const double* c,
                                 double* lanes) noexcept nogil
    void memoa_max_lanes(Py_ssize_t m, const double* J, double* vmax, double* varg, double* index,
                         double step) noexcept nogil
    void memoa_policy_block(Py_ssize_t m, double* xb, const double* sb, const double* offset, const double* centre,
                            double* terms, double gain, double weight, double q, double kappa, double r,
                            double* lanes) noexcept nogil
    void memoa_row_sums(Py_ssize_t nr, Py_ssize_t d, const double* terms, double* out) noexcept nogil
    void memoa_pay(Py_ssize_t nr, double* J, const double* cost, double hd) noexcept nogil
    void memoa_loss_terms(Py_ssize_t m, int hedge, const double* x, const double* ref, const double* cen,
                          double* terms) noexcept nogil
    void memoa_step(Py_ssize_t nr, double* lp, const double* loss, double eta, double scale, double limit,
                    double* mx) noexcept nogil
    void memoa_shift(Py_ssize_t m, const double* src, double a, double b, double* dst) noexcept nogil
    void memoa_affine(Py_ssize_t m, double* w, double keep, double floor_) noexcept nogil
    void memoa_exp_into(const double* src, double* dst, Py_ssize_t m) noexcept nogil
    void memoa_log_into(const double* src, double* dst, Py_ssize_t m) noexcept nogil
    void memoa_class_sums(Py_ssize_t nr, Py_ssize_t d, Py_ssize_t K, Py_ssize_t P, const int64_t* labels,
                          const double* v, double* acc, double* count) noexcept nogil
    void memoa_class_signal_sums(Py_ssize_t nr, Py_ssize_t d, Py_ssize_t K, Py_ssize_t P, const int64_t* labels,
                                 const double* s, double limit, double* acc, double* count) noexcept nogil
    void memoa_class_move(Py_ssize_t nr, Py_ssize_t d, Py_ssize_t K, Py_ssize_t P, const int64_t* labels, double* x,
                          const double* s, double* J, const double* table, const double* centre, double hd,
                          double* acc) noexcept nogil

import numpy as np

from ._config import CHUNK as _CONFIG_CHUNK, PAD as _CONFIG_PAD
from ._layout import GAIN as _L_GAIN, KAPPA as _L_KAPPA, MIX_SIGNAL as _L_MIX_SIGNAL, MIX_STATE as _L_MIX_STATE
from ._layout import N_COEF as _L_N_COEF, Q as _L_Q, R as _L_R, SIGNAL as _L_SIGNAL, SIZE as _L_SIZE
from ._layout import SIGNAL_LIMIT as _L_SIGNAL_LIMIT
from ._reference import STEP_LIMIT as _REF_STEP_LIMIT

RULE_EG = 0
RULE_HEDGE = 1

# Compile-time mirrors of ._config and ._layout, checked at import below.
cdef enum:
    _CHUNK = 4096
    _PAD = 8
    _GAIN = 0
    _SIGNAL = 1
    _Q = 2
    _KAPPA = 3
    _R = 4
    _SIZE = 5
    _N_COEF = 6
    # Values per block of whole rows, (max, first index) lanes, rows per exp sweep.
    _LANES = 256
    _MAX_LANES = 32
    _EXP_ROWS = 1024
    # Lanes of the sum of exponentials in the server's log-sum-exp.
    _SUM_LANES = 8
    # Interleaved copies of the class accumulators (K > 1, at most _COPIES_MAX_K classes; see _copies).
    _COPIES = 4
    _COPIES_MAX_K = 64

cdef double _SIGNAL_LIMIT = 1e50
cdef double _STEP_LIMIT = DBL_MAX  # only an overflowing step is clipped (see _layout.STEP_LIMIT)
# Below this alpha / N the fixed share keeps the scalar logaddexp form (subnormal sums would lose bits).
cdef double _SHARE_FLOOR_MIN = 1e-290

if (_CONFIG_CHUNK, _CONFIG_PAD) != (_CHUNK, _PAD) or (_L_GAIN, _L_SIGNAL, _L_Q, _L_KAPPA, _L_R, _L_SIZE, _L_N_COEF) != (
    0, 1, 2, 3, 4, 5, 6
) or (_L_MIX_SIGNAL, _L_MIX_STATE) != (0, 1) or _L_SIGNAL_LIMIT != _SIGNAL_LIMIT or _REF_STEP_LIMIT != _STEP_LIMIT:  # pragma: no cover
    raise ImportError(
        "memoa_fast.kernels._cython was compiled against other constants than _config/_layout now hold "
        f"(CHUNK={_CONFIG_CHUNK}, PAD={_CONFIG_PAD}, SIGNAL_LIMIT={_L_SIGNAL_LIMIT}, STEP_LIMIT={_REF_STEP_LIMIT}): "
        "rebuild with `pip install -e .`"
    )

def max_threads():
    """Threads an OpenMP parallel region may use (``omp_get_max_threads()``)."""
    return openmp.omp_get_max_threads()


# --------------------------------------------------------------------------- plumbing
cdef struct Lay:
    # The Layout named tuple as C integers (``dp``: ``d`` padded to a cache line).
    Py_ssize_t K, d, dp, width
    Py_ssize_t state, signal, mixture, count, max_cost, arg_cost, lse_top, lse_sum
    Py_ssize_t class_state, class_signal, class_next, offset, field_state, field_signal, field_next


cdef struct Pop:
    # One population step's arrays (raw pointers into C-contiguous arrays) and scalars.
    Lay lay
    Py_ssize_t n, n_chunks
    double* x              # (n, d) states
    double* s              # (n, d) signals (read only)
    int64_t* labels        # (n,) classes, or NULL (every agent in class 0)
    double* J              # (n,) costs
    double* work           # (n_chunks, lay.width) chunk partials
    double* coef           # (K, N_COEF)
    double* field          # (field_rows, d)
    double* log_p          # (n,) log-weights, or NULL (no mixture)
    double half_discount   # gamma^t / 2
    bint want_states       # pass 1 also sums the states
    double* scratch        # threads * scratch_size doubles
    Py_ssize_t scratch_size


cdef struct Mix:
    # One server pass: log-weights, client states, the replicated target, and the work rows.
    Lay lay
    Py_ssize_t n, n_chunks
    double* log_p          # (n,)
    double* x              # (n, d) (read only)
    double* ref            # (d,): y (hedge) or err = sum_i p_i (x_i - y) (eg)
    double* cen            # (d,): eg's centre, y_j (0 where err_j = 0); predict's centre (NULL: none)
    int rule
    double eta
    double* work
    double* scratch
    Py_ssize_t scratch_size


cdef Lay _read_layout(lay) except *:
    """The Layout named tuple's fields as C integers (read once, before any nogil region)."""
    cdef Lay L
    L.K = lay.n_classes
    L.d = lay.dim
    L.dp = ((L.d + _PAD - 1) // _PAD) * _PAD
    L.width = lay.width
    L.state = lay.state
    L.signal = lay.signal
    L.mixture = lay.mixture
    L.count = lay.count
    L.max_cost = lay.max_cost
    L.arg_cost = lay.arg_cost
    L.lse_top = lay.lse_top
    L.lse_sum = lay.lse_sum
    L.class_state = lay.class_state
    L.class_signal = lay.class_signal
    L.class_next = lay.class_next
    L.offset = lay.offset
    L.field_state = lay.field_state
    L.field_signal = lay.field_signal
    L.field_next = lay.field_next
    return L


cdef inline Py_ssize_t _block_rows(Py_ssize_t d) noexcept nogil:
    """Rows per block: ``R = max(1, LANES // d)``."""
    return 1 if d >= _LANES else _LANES // d


cdef inline Py_ssize_t _exp_rows(Py_ssize_t R) noexcept nogil:
    """Rows exponentiated per sweep: a whole number of blocks, about ``EXP_ROWS``."""
    return R if R >= _EXP_ROWS else R * (_EXP_ROWS // R)


cdef inline Py_ssize_t _copies(Py_ssize_t K) noexcept nogil:
    """Interleaved copies ``P`` of the class accumulators: row ``k`` of a chunk adds to copy ``k mod P``.

    Four copies break the store-to-load chains of consecutive rows of one
    class (sorted labels); more than ``_COPIES_MAX_K`` classes take one (the
    copies would cost more to clear and fold than they save). Depends on
    ``K`` alone, never on the thread count.
    """
    return _COPIES if K <= _COPIES_MAX_K else 1


cdef Py_ssize_t _step_scratch(Py_ssize_t d, Py_ssize_t K):
    """Doubles of scratch one thread needs for a population pass."""
    cdef Py_ssize_t R = _block_rows(d)
    cdef Py_ssize_t L = R * d
    cdef Py_ssize_t P = _copies(K)
    cdef Py_ssize_t classes = 2 * P * K * d + 2 * P * K + K * (5 + d)
    return 8 * L + 3 * _MAX_LANES + 3 * R + _exp_rows(R) + (classes if classes > 3 * _MAX_LANES else 3 * _MAX_LANES) + 8


cdef Py_ssize_t _server_scratch(Py_ssize_t d):
    """Doubles of scratch one thread needs for a server pass."""
    cdef Py_ssize_t R = _block_rows(d)
    cdef Py_ssize_t L = R * d
    return 3 * L + 2 * R + _exp_rows(R) + _EXP_ROWS + _SUM_LANES + 8


cdef inline void _bounds(Py_ssize_t n, Py_ssize_t c, Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """Write chunk ``c``'s rows ``[lo, hi)`` of ``n`` agents (the last chunk may be short)."""
    lo[0] = c * _CHUNK
    hi[0] = lo[0] + _CHUNK if lo[0] + _CHUNK < n else n


cdef inline double* _thread_scratch(double* scratch, Py_ssize_t size) noexcept nogil:
    """The calling OpenMP thread's ``size`` doubles of ``scratch`` (thread ``t`` owns ``[t size, (t + 1) size)``)."""
    return scratch + openmp.omp_get_thread_num() * size


# --------------------------------------------------------------------------- building blocks
cdef inline void _lane_add(const double* v, Py_ssize_t m, Py_ssize_t L, double* lanes) noexcept nogil:
    """Add ``v[b L + l]`` to ``lanes[l]`` for every block ``b``, block after block.

    Reads ``v[0:m]``; updates ``lanes[0:L]`` in place (C: ``memoa_lane_add``,
    element-wise and unit stride, so it vectorises without reassociation).
    """
    memoa_lane_add(v, m, L, lanes)


cdef void _zero(double* a, Py_ssize_t m) noexcept nogil:
    """Write ``a[0:m] = 0``."""
    cdef Py_ssize_t l
    for l in range(m):
        a[l] = 0.0


cdef void _lane_columns(const double* lanes, Py_ssize_t d, Py_ssize_t R, double* out) noexcept nogil:
    """Write ``out[j] = lanes[j] + lanes[d + j] + ... + lanes[(R-1) d + j]`` (in that order) for ``j < d``.

    Reads ``lanes[0:R d]``.
    """
    cdef Py_ssize_t j, k
    cdef double total
    for j in range(d):
        total = 0.0
        for k in range(R):
            total += lanes[k * d + j]
        out[j] = total


cdef inline Py_ssize_t _count_invalid(const double* v, Py_ssize_t m) noexcept nogil:
    """Number of entries of ``v[0:m]`` that are not valid (NaN, inf, or ``|v| > SIGNAL_LIMIT``); vectorised.

    Reads ``v[0:m]``. The count is float64 sums of 0/1 selects in 8 lanes
    (exact below 2^53; C ``memoa_count_invalid``): gcc vectorises that, but
    not an integer count of a double comparison (on SSE2), and one running
    float sum would cost an add latency per value.
    """
    return <Py_ssize_t>memoa_count_invalid(v, m, _SIGNAL_LIMIT)


cdef inline bint _row_valid(const double* row, Py_ssize_t d) noexcept nogil:
    """True when every entry of ``row[0:d]`` is finite and at most ``SIGNAL_LIMIT`` in magnitude."""
    return _count_invalid(row, d) == 0


cdef void _max_arg(const double* J, Py_ssize_t lo, Py_ssize_t hi, double* lanes, double* out_max,
                   double* out_arg) noexcept nogil:
    """Largest ``J[i]`` over ``[lo, hi)`` and its first index, written to ``out_max``/``out_arg``; a NaN is never larger.

    Reads ``J[lo:hi]``; uses ``lanes[0:3 MAX_LANES]`` as scratch: lane ``k``
    keeps the largest value seen at positions ``k mod MAX_LANES`` and its
    first index (element-wise, vectorised: C ``memoa_max_lanes``). An all
    ``-inf`` (or NaN) range gives ``(-inf, -1)``, as the Numba kernel and the
    reference (``_first_max``): :func:`_worst` then skips that chunk.
    """
    cdef double* vmax = lanes
    cdef double* varg = lanes + _MAX_LANES
    cdef double* index = lanes + 2 * _MAX_LANES
    cdef Py_ssize_t b, k, m
    cdef double best = -INFINITY, arg = -1.0
    for k in range(_MAX_LANES):
        vmax[k] = -INFINITY
        varg[k] = -1.0
        index[k] = <double>(lo + k)
    b = lo
    while b < hi:
        m = hi - b if hi - b < _MAX_LANES else _MAX_LANES
        memoa_max_lanes(m, J + b, vmax, varg, index, _MAX_LANES)
        b += _MAX_LANES
    for k in range(_MAX_LANES):
        if vmax[k] > best or (vmax[k] == best and varg[k] < arg and varg[k] >= 0.0):
            best = vmax[k]
            arg = varg[k]
    out_max[0] = best
    out_arg[0] = arg


cdef inline void _exp_into(const double* src, double* dst, Py_ssize_t m) noexcept nogil:
    """Write ``dst[k] = exp(src[k])`` for ``k < m`` (``dst`` may be ``src``); one vectorised loop (C: ``memoa_exp_into``).

    Cody-Waite reduction ``x = n ln 2 + r``, ``|r| <= ln(2)/2``, and the
    degree-13 Taylor polynomial of ``exp(r)`` (as :mod:`._numba`); the scale
    ``2^n`` is built from its bits in two halves ``2^n1 2^n2``, ``n1 =
    round(n / 2)`` (both found with the ``1.5 2^52`` shift trick, so every
    integer operation is an add or a left shift, which SSE2 has), so a
    subnormal result rounds once. Inputs are clamped to ``[-745.5, 710]``: 0
    below (and at ``-inf``), ``inf`` above 709.79, NaN for NaN. Accuracy
    (measured, and tested): within 1 ulp of the exact value (0.85 measured) where the result is
    normal, within one subnormal step (4.9e-324) below.
    """
    memoa_exp_into(src, dst, m)

cdef inline void _log_into(const double* src, double* dst, Py_ssize_t m) noexcept nogil:
    """Write ``dst[k] = log(src[k])`` for ``k < m`` (``dst`` may be ``src``); vectorised (C: ``memoa_log_into``).

    For positive normal finite inputs: the exponent/mantissa split is integer
    work (musl's: ``x = 2^k z``, ``z`` in ``[sqrt(1/2), sqrt(2))``), then
    fdlibm's ``log(1 + f) = f - (hfsq - s (hfsq + R(s^2)))``, ``s = f / (2 + f)``,
    plus ``k ln 2`` in Cody-Waite halves. Every other input (0, subnormal,
    negative, inf, NaN) is redone with libm's ``log`` in a scalar loop, run
    only when the vectorised count finds one, so ``dst[k]`` depends on
    ``src[k]`` alone. Accuracy (measured, and tested): within 1 ulp of
    the exact value (0.71 measured).
    """
    memoa_log_into(src, dst, m)

cdef void _weighted_lanes(const double* log_p, const double* x, Py_ssize_t rows, Py_ssize_t d,
                          double* lanes, double* pattern, double* p, const double* centre) noexcept nogil:
    """Lanes (``L = R d``) of ``sum_i exp(log_p[i]) x[i, :]`` over ``rows`` rows.

    Reads ``log_p[0:rows]`` and ``x[0:rows d]``; writes ``lanes[0:L]``, and uses
    ``pattern`` (``L``) and ``p`` (``_exp_rows(R)``) as scratch. With a
    ``centre`` (``L`` doubles, the point replicated per row; NULL: none) the
    lanes sum ``exp(log_p[i]) (x[i, :] - centre)``. The weights
    are exponentiated a sweep at a time (:c:func:`_exp_into`), then each
    block's weights are replicated ``d`` times into ``pattern`` so the
    multiply-add is one element-wise loop.
    """
    cdef Py_ssize_t R = _block_rows(d)
    cdef Py_ssize_t L = R * d
    cdef Py_ssize_t E = _exp_rows(R)
    cdef Py_ssize_t eb, em, rb, nr, k, j, l
    cdef const double* xb
    cdef const double* pb
    _zero(lanes, L)
    eb = 0
    while eb < rows:
        em = rows - eb if rows - eb < E else E
        _exp_into(log_p + eb, p, em)
        rb = 0
        while rb < em:
            nr = em - rb if em - rb < R else R
            xb = x + (eb + rb) * d
            pb = p + rb
            if d != 1:
                for k in range(nr):
                    for j in range(d):
                        pattern[k * d + j] = pb[k]
                pb = pattern
            if centre == NULL:
                memoa_weighted_add(nr * d, pb, xb, lanes)
            else:
                memoa_weighted_diff_add(nr * d, pb, xb, centre, lanes)
            rb += R
        eb += E


# --------------------------------------------------------------------------- pass 1: signals
cdef void _signal_chunk(const Pop* P, Py_ssize_t c, double* scratch) noexcept nogil:
    """Pass 1 on chunk ``c``.

    Reads ``s`` (and ``x`` when ``want_states``, ``labels`` when K > 1) over
    the chunk's rows. Writes row ``c`` of ``work``: ``signal + l dp`` (sums of
    the class-``l`` valid signal rows, ``d`` values), ``count + l`` (their
    number) and, when ``want_states``, ``state + l dp`` (sums of the class-``l``
    states), for every class ``l``.
    """
    cdef Lay L = P.lay
    cdef Py_ssize_t d = L.d, K = L.K, lo, hi, R, k, j, l, count, Pc
    cdef double total
    cdef double* row = P.work + c * L.width
    cdef double* lanes = scratch
    cdef double* sums
    cdef double* xsums
    cdef double* counts
    _bounds(P.n, c, &lo, &hi)
    if P.labels == NULL:
        for l in range(1, K):  # classes 1.. are empty
            row[L.count + l] = 0.0
            for j in range(d):
                row[L.signal + l * L.dp + j] = 0.0
                if P.want_states:
                    row[L.state + l * L.dp + j] = 0.0
        R = _block_rows(d)
        _zero(lanes, R * d)
        count = hi - lo
        if memoa_lane_add_any_invalid(P.s + lo * d, (hi - lo) * d, R * d, lanes, _SIGNAL_LIMIT):
            count = _signal_rows_checked(P.s, lo, hi, d, R, lanes)
        _lane_columns(lanes, d, R, row + L.signal)
        row[L.count] = <double>count
        if P.want_states:
            _zero(lanes, R * d)
            _lane_add(P.x + lo * d, (hi - lo) * d, R * d, lanes)
            _lane_columns(lanes, d, R, row + L.state)
        return
    # K classes: each row adds to its class in P interleaved copies (memoa_class_sums), folded at the end.
    Pc = _copies(K)
    sums = scratch
    xsums = scratch + Pc * K * d
    counts = scratch + 2 * Pc * K * d
    _zero(scratch, 2 * Pc * K * d + 2 * Pc * K)
    memoa_class_signal_sums(hi - lo, d, K, Pc, P.labels + lo, P.s + lo * d, _SIGNAL_LIMIT, sums, counts)
    if P.want_states:
        memoa_class_sums(hi - lo, d, K, Pc, P.labels + lo, P.x + lo * d, xsums, counts + Pc * K)
    for l in range(K):
        total = 0.0
        for k in range(Pc):
            total = total + counts[k * K + l]
        row[L.count + l] = total
    _fold_copies(sums, K, d, Pc, row + L.signal, L.dp)
    if P.want_states:
        _fold_copies(xsums, K, d, Pc, row + L.state, L.dp)


cdef Py_ssize_t _signal_rows_checked(const double* s, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t d, Py_ssize_t R,
                                     double* lanes) noexcept nogil:
    """Lane sums of the valid signal rows of ``[lo, hi)`` into ``lanes[0:R d]`` (zeroed here); returns their number.

    The signal pass's path for a chunk holding an invalid value (found by ``memoa_lane_add_any_invalid``): block by
    block, a block of valid rows is added whole, otherwise its valid rows one by one (lane ``k d + j`` takes
    coordinate ``j`` of the block's row ``k``, as in the fused sweep).
    """
    cdef Py_ssize_t count = 0, rb, nr, k, j
    cdef const double* sb
    _zero(lanes, R * d)
    rb = lo
    while rb < hi:
        nr = hi - rb if hi - rb < R else R
        sb = s + rb * d
        if _count_invalid(sb, nr * d) == 0:
            memoa_lane_add(sb, nr * d, R * d, lanes)
            count += nr
        else:
            for k in range(nr):
                if _row_valid(sb + k * d, d):
                    count += 1
                    for j in range(d):
                        lanes[k * d + j] += sb[k * d + j]
        rb += R
    return count


cdef void _fold_copies(const double* acc, Py_ssize_t K, Py_ssize_t d, Py_ssize_t Pc, double* out,
                       Py_ssize_t dp) noexcept nogil:
    """Write ``out[l dp + j] = sum_p acc[(p K + l) d + j]``: the copies of each class sum, folded.

    Four copies are folded as ``(c0 + c1) + (c2 + c3)``, otherwise in copy order.
    """
    cdef Py_ssize_t l, j, k
    cdef double v
    for l in range(K):
        for j in range(d):
            if Pc == 4:
                v = (acc[l * d + j] + acc[(K + l) * d + j]) + (acc[(2 * K + l) * d + j] + acc[(3 * K + l) * d + j])
            else:
                v = 0.0
                for k in range(Pc):
                    v = v + acc[(k * K + l) * d + j]
            out[l * dp + j] = v


# --------------------------------------------------------------------------- merges (serial, chunk order)
cdef inline double _column_sum(const double* work, Py_ssize_t n_chunks, Py_ssize_t width, Py_ssize_t col) noexcept nogil:
    """``sum_c work[c, col]`` in chunk order."""
    cdef Py_ssize_t c
    cdef double total = 0.0
    for c in range(n_chunks):
        total += work[c * width + col]
    return total


cdef void _merge_states(const Lay* L, const double* work, Py_ssize_t n_chunks, const double* coef, double* field,
                        Py_ssize_t class_row, Py_ssize_t global_row) noexcept nogil:
    """Class means and the global mean of the states from the ``state`` columns of ``work``.

    Reads ``work[:, state + l dp + j]`` and ``coef[l, SIZE]``. Writes
    ``field[class_row + l] = sums_l / size_l`` (0 for an empty class) and
    ``field[global_row] = sum_l sums_l / sum_l size_l``.
    """
    cdef Py_ssize_t K = L.K, d = L.d, l, j
    cdef double size, total_size = 0.0, s, g
    for l in range(K):
        total_size += coef[l * _N_COEF + _SIZE]
    for j in range(d):
        g = 0.0
        for l in range(K):
            s = _column_sum(work, n_chunks, L.width, L.state + l * L.dp + j)
            size = coef[l * _N_COEF + _SIZE]
            field[(class_row + l) * d + j] = s / size if size > 0 else 0.0
            g = s if l == 0 else g + s
        field[global_row * d + j] = g / total_size


cdef Py_ssize_t _merge_signals(const Lay* L, const double* work, Py_ssize_t n_chunks, const double* coef,
                               const double* mix, double* field, bint want_states) noexcept nogil:
    """Merge pass 1's rows; returns the number of valid signal rows.

    Reads ``work[:, count + l]``, ``work[:, signal + l dp + j]`` (and
    ``state`` columns with ``want_states``), ``coef[:, SIZE]``, ``mix``.
    Writes ``field[class_signal + l]`` (left alone for a class with no valid
    signal), ``field[field_signal]`` (left alone when none is valid), with
    ``want_states`` ``field[class_state + l]`` and ``field[field_state]``
    (:c:func:`_merge_states`), and always the offsets ``field[offset + j] =
    sum_l mix[0, j, l] sbar_l + mix[1, j, l] m_l + mix[0, j, K] sbar + mix[1, j, K] m``
    (``mix`` is (2, K, K + 1): column K weighs the means over all agents).
    """
    cdef Py_ssize_t K = L.K, d = L.d, l, j, col
    cdef double total = 0.0, count, s, g, a, b
    for l in range(K):
        total += _column_sum(work, n_chunks, L.width, L.count + l)
    for j in range(d):
        g = 0.0
        for l in range(K):
            s = _column_sum(work, n_chunks, L.width, L.signal + l * L.dp + j)
            count = _column_sum(work, n_chunks, L.width, L.count + l)
            if count > 0:
                field[(L.class_signal + l) * d + j] = s / count
            g = g + s
        if total > 0:
            field[L.field_signal * d + j] = g / total
    if want_states:
        _merge_states(L, work, n_chunks, coef, field, L.class_state, L.field_state)
    for j in range(K):
        for col in range(d):
            a = 0.0
            b = 0.0
            for l in range(K):
                a += mix[j * (K + 1) + l] * field[(L.class_signal + l) * d + col]
                b += mix[K * (K + 1) + j * (K + 1) + l] * field[(L.class_state + l) * d + col]
            a = a + b
            a = a + (mix[j * (K + 1) + K] * field[L.field_signal * d + col]
                     + mix[K * (K + 1) + j * (K + 1) + K] * field[L.field_state * d + col])
            field[(L.offset + j) * d + col] = a
    return <Py_ssize_t>total


cdef void _worst(const Lay* L, const double* work, Py_ssize_t n_chunks, double* max_j, double* arg_j) noexcept nogil:
    """Largest ``work[c, max_cost]`` (first chunk on ties, NaN never larger) and that row's ``arg_cost``; ``(-inf, -1)`` if none."""
    cdef Py_ssize_t c
    max_j[0] = -INFINITY
    arg_j[0] = -1.0
    for c in range(n_chunks):
        if work[c * L.width + L.max_cost] > max_j[0]:
            max_j[0] = work[c * L.width + L.max_cost]
            arg_j[0] = work[c * L.width + L.arg_cost]


cdef void _merge_move(const Lay* L, const double* work, Py_ssize_t n_chunks, const double* coef, double* field,
                      bint predict, double* yhat, double* max_j, double* arg_j) noexcept nogil:
    """Merge pass 2's rows.

    Reads ``work``'s ``state``, ``mixture``, ``max_cost``, ``arg_cost`` columns
    and ``coef[:, SIZE]``. Writes ``field[class_next + l]`` and
    ``field[field_next]`` (:c:func:`_merge_states`), ``yhat[j] = sum_c
    work[c, mixture + j]`` when ``predict``, and the worst cost and agent.
    """
    cdef Py_ssize_t j
    _merge_states(L, work, n_chunks, coef, field, L.class_next, L.field_next)
    if predict:
        for j in range(L.d):
            yhat[j] = _column_sum(work, n_chunks, L.width, L.mixture + j)
    _worst(L, work, n_chunks, max_j, arg_j)


# --------------------------------------------------------------------------- pass 2: move


cdef void _move_block_rows(const Pop* P, Py_ssize_t lo, Py_ssize_t hi, bint all_valid, double* scratch,
                           double* lanes) noexcept nogil:
    """Policy and stage cost of rows ``[lo, hi)`` of a one-class population, in place, and the lane sums of the moved states.

    Reads ``coef[0]``, ``field[offset]`` (the policy offset) and
    ``field[field_state]`` (``m(t)``), ``s``; writes ``x`` and ``J`` of the rows.
    ``u_i = -gain (x_i - signal s_i - offset)`` for a valid row (else 0), then
    ``J_i += gamma^t/2 sum_j (q (x_ij - s_ij)^2 + kappa (x_ij - m_j)^2 + r u_ij^2)``
    (only the kappa terms for an invalid row), ``x_i += u_i``. Per block of
    ``R`` rows: one element-wise loop (``memoa_policy_block``, patterns
    ``offset`` and ``centre``), the per-row sums over ``j`` in order
    (``memoa_row_sums``), then ``memoa_pay``. ``all_valid`` (pass 1's count):
    every signal of the rows is valid, and no block is checked. ``lanes``
    (``L`` values, zeroed here) gets ``lanes[l] += x[b L + l]`` of the moved
    states block after block, as the block is moved (the sums of ``memoa_lane_add``
    over the moved rows, without reading them again). Scratch: ``3 L`` values from
    ``scratch`` and ``R`` from ``scratch + 6 L``.
    """
    cdef Py_ssize_t d = P.lay.d, R = _block_rows(d), Lb = R * d, rb, nr, m, k, j, l
    cdef double* offset = scratch
    cdef double* centre = scratch + Lb
    cdef double* terms = scratch + 2 * Lb
    cdef double* cost = scratch + 6 * Lb
    cdef double gain = P.coef[_GAIN], weight = P.coef[_SIGNAL]
    cdef double q = P.coef[_Q], kappa = P.coef[_KAPPA], r = P.coef[_R], hd = P.half_discount
    cdef double em
    cdef double* xb
    cdef const double* sb
    for k in range(R):
        for j in range(d):
            offset[k * d + j] = P.field[P.lay.offset * d + j]
            centre[k * d + j] = P.field[P.lay.field_state * d + j]
    _zero(lanes, Lb)
    rb = lo
    while rb < hi:
        nr = hi - rb if hi - rb < R else R
        m = nr * d
        xb = P.x + rb * d
        sb = P.s + rb * d
        if all_valid or _count_invalid(sb, m) == 0:
            memoa_policy_block(m, xb, sb, offset, centre, terms, gain, weight, q, kappa, r, lanes)
        else:  # a row without a valid signal holds and pays the kappa term only
            for k in range(nr):
                if _row_valid(sb + k * d, d):
                    memoa_policy_block(d, xb + k * d, sb + k * d, offset, centre, terms + k * d, gain, weight, q, kappa,
                                       r, lanes + k * d)
                else:
                    for j in range(d):
                        l = k * d + j
                        em = xb[l] - centre[l]
                        terms[l] = kappa * em * em
                        lanes[l] += xb[l]
        if d == 1:
            memoa_pay(nr, P.J + rb, terms, hd)
        else:
            memoa_row_sums(nr, d, terms, cost)
            memoa_pay(nr, P.J + rb, cost, hd)
        rb += R


cdef void _move_class_rows(const Pop* P, Py_ssize_t lo, Py_ssize_t hi, bint all_valid, double* acc) noexcept nogil:
    """Policy and stage cost of rows ``[lo, hi)`` with K classes, in place, and the class sums of the moved states.

    Reads ``labels``, ``coef[l]``, ``field[offset + l]``, ``field[field_state]``,
    ``s``; writes ``x``, ``J`` of the rows and ``acc[(p K + l) d + j]`` (zeroed
    here; ``P`` interleaved copies, :c:func:`_copies`, row ``k`` of the chunk
    in copy ``k mod P``), then ``K (5 + d)`` values after it: each class's
    coefficients and offset in one row (``gain, signal, q, kappa, r, o_l``).
    ``u_i = -gain_l (x_i - signal_l s_i - o_l)`` for a valid row (else 0),
    ``J_i += gamma^t/2 (q_l E + kappa_l F + r_l U)`` with ``E = sum_j (x_ij - s_ij)^2``,
    ``F = sum_j (x_ij - m_j)^2``, ``U = sum_j u_ij^2`` (only ``kappa_l F`` for
    an invalid row), ``x_i += u_i``. ``all_valid`` (pass 1's counts): every
    signal of the rows is valid, and the rows go to C ``memoa_class_move``
    without a per-row check.
    """
    cdef Py_ssize_t d = P.lay.d, K = P.lay.K, Pc = _copies(K), i, j, l, w = 5 + d
    cdef double* table = acc + Pc * K * d
    cdef const double* t
    cdef const double* centre = P.field + P.lay.field_state * d
    cdef double* xi
    cdef double* a
    cdef const double* si
    cdef double u, es, em, v, g, wt, E, F, U
    _zero(acc, Pc * K * d)
    for l in range(K):
        table[l * w + 0] = P.coef[l * _N_COEF + _GAIN]
        table[l * w + 1] = P.coef[l * _N_COEF + _SIGNAL]
        table[l * w + 2] = P.coef[l * _N_COEF + _Q]
        table[l * w + 3] = P.coef[l * _N_COEF + _KAPPA]
        table[l * w + 4] = P.coef[l * _N_COEF + _R]
        for j in range(d):
            table[l * w + 5 + j] = P.field[(P.lay.offset + l) * d + j]
    if all_valid:
        memoa_class_move(hi - lo, d, K, Pc, P.labels + lo, P.x + lo * d, P.s + lo * d, P.J + lo, table, centre,
                         P.half_discount, acc)
        return
    for i in range(lo, hi):
        l = P.labels[i]
        t = table + l * w
        a = acc + (((i - lo) & (Pc - 1)) * K + l) * d
        xi = P.x + i * d
        si = P.s + i * d
        if _row_valid(si, d):
            g = t[0]
            wt = t[1]
            E = 0.0
            F = 0.0
            U = 0.0
            for j in range(d):
                v = xi[j]
                u = -g * (v - wt * si[j] - t[5 + j])
                es = v - si[j]
                em = v - centre[j]
                E += es * es
                F += em * em
                U += u * u
                v = v + u
                xi[j] = v
                a[j] += v
            P.J[i] += P.half_discount * (t[2] * E + t[3] * F + t[4] * U)
        else:  # holds, pays the kappa term only
            F = 0.0
            for j in range(d):
                em = xi[j] - centre[j]
                F += em * em
                a[j] += xi[j]
            P.J[i] += P.half_discount * (t[3] * F)


cdef void _move_chunk(const Pop* P, Py_ssize_t c, double* scratch) noexcept nogil:
    """Pass 2 on chunk ``c``: move and pay its agents, then (chunk in cache) its partials for step t+1.

    Reads and writes ``x``, ``J`` over the chunk's rows (see
    :c:func:`_move_block_rows`, :c:func:`_move_class_rows`); reads ``s``,
    ``labels``, ``coef``, ``field``, ``log_p``. Writes row ``c`` of ``work``:
    ``state + l dp`` (class sums of the moved states), ``max_cost`` and
    ``arg_cost`` (largest updated cost, its first agent) and, when ``log_p``
    is given, ``mixture`` (``sum_i exp(log_p_i) x_i(t+1)``).
    """
    cdef Lay L = P.lay
    cdef Py_ssize_t d = L.d, K = L.K, R = _block_rows(d), Lb = R * d, lo, hi, l, j
    cdef double valid
    cdef double* row = P.work + c * L.width
    cdef double* lanes = scratch + 5 * Lb
    cdef double* tail = scratch + 6 * Lb
    _bounds(P.n, c, &lo, &hi)
    if P.labels == NULL:
        for l in range(1, K):  # classes 1.. are empty
            for j in range(d):
                row[L.state + l * L.dp + j] = 0.0
        _move_block_rows(P, lo, hi, row[L.count] == <double>(hi - lo), scratch, lanes)
        _lane_columns(lanes, d, R, row + L.state)
    else:
        valid = 0.0
        for l in range(K):
            valid = valid + row[L.count + l]
        _move_class_rows(P, lo, hi, valid == <double>(hi - lo), tail)
        _fold_copies(tail, K, d, _copies(K), row + L.state, L.dp)
    _max_arg(P.J, lo, hi, tail, row + L.max_cost, row + L.arg_cost)
    if P.log_p != NULL:
        _weighted_lanes(P.log_p + lo, P.x + lo * d, hi - lo, d, lanes, scratch, tail, NULL)
        _lane_columns(lanes, d, R, row + L.mixture)


ctypedef void (*ChunkPass)(const Pop* P, Py_ssize_t c, double* scratch) noexcept nogil


cdef void _sweep(const Pop* P, int threads, ChunkPass chunk_pass) noexcept nogil:
    """``chunk_pass`` (:c:func:`_signal_chunk` or :c:func:`_move_chunk`) on every chunk: serially, or on
    ``threads`` OpenMP threads (static schedule), each with its own scratch."""
    cdef Py_ssize_t c
    if threads <= 1:
        for c in range(P.n_chunks):
            chunk_pass(P, c, P.scratch)
    else:
        for c in prange(P.n_chunks, schedule="static", num_threads=threads):
            chunk_pass(P, c, _thread_scratch(P.scratch, P.scratch_size))


# --------------------------------------------------------------------------- population API
cdef object _population(Pop* P, const double[:, ::1] x, const double[:, ::1] s, const int64_t[::1] labels,
                        double[:, ::1] work, lay, int threads):
    """Fill ``P`` with the pointers and layout of one call; returns the scratch array (keep it alive)."""
    P.lay = _read_layout(lay)
    P.n = x.shape[0]
    P.n_chunks = work.shape[0]
    P.lay.width = work.shape[1]
    P.x = <double*>&x[0, 0] if x.shape[0] > 0 else NULL
    P.s = <double*>&s[0, 0] if s.shape[0] > 0 else NULL
    # NULL: every agent is in class 0 (K == 1, or an empty labels array), the block path
    P.labels = <int64_t*>&labels[0] if (labels.shape[0] > 0 and P.lay.K > 1) else NULL
    P.work = &work[0, 0] if work.shape[0] > 0 else NULL
    P.J = NULL
    P.coef = NULL
    P.field = NULL
    P.log_p = NULL
    P.want_states = False
    P.half_discount = 0.0
    P.scratch_size = _step_scratch(P.lay.d, P.lay.K)
    scratch = np.empty(max(threads, 1) * P.scratch_size)
    cdef double[::1] view = scratch
    P.scratch = &view[0]
    return scratch


def signal_pass(const double[:, ::1] x, const double[:, ::1] s, const int64_t[::1] labels, double[:, ::1] work, lay,
                bint want_states, int threads):
    """Pass 1: write each chunk's class signal sums and counts (and state sums if ``want_states``) to ``work``."""
    cdef Pop P
    keep = _population(&P, x, s, labels, work, lay, threads)
    P.want_states = want_states
    with nogil:
        _sweep(&P, threads, _signal_chunk)


def merge_signals(const double[:, ::1] work, lay, const double[:, ::1] coef, const double[:, :, ::1] mix,
                  double[:, ::1] field, bint want_states):
    """Merge pass 1's rows: class and global means into ``field``, then the class offsets; returns the valid count."""
    cdef Lay L = _read_layout(lay)
    cdef Py_ssize_t total
    L.width = work.shape[1]
    with nogil:
        total = _merge_signals(&L, &work[0, 0], work.shape[0], &coef[0, 0], &mix[0, 0, 0], &field[0, 0], want_states)
    return int(total)


def move_pass(double[:, ::1] x, const double[:, ::1] s, const int64_t[::1] labels, double[::1] J, double[:, ::1] work,
              lay, const double[:, ::1] coef, const double[:, ::1] field, double discount, const double[::1] log_p,
              int threads):
    """Pass 2, in place: move and pay every agent, then write each chunk's state sums, worst cost and mixture."""
    cdef Pop P
    keep = _population(&P, x, s, labels, work, lay, threads)
    P.J = &J[0]
    P.coef = <double*>&coef[0, 0]
    P.field = <double*>&field[0, 0]
    P.half_discount = 0.5 * discount
    P.log_p = <double*>&log_p[0] if (log_p.shape[0] == x.shape[0] and x.shape[0] > 0) else NULL
    with nogil:
        _sweep(&P, threads, _move_chunk)


def merge_move(const double[:, ::1] work, lay, const double[:, ::1] coef, double[:, ::1] field, bint predict,
               double[::1] yhat):
    """Merge pass 2's rows: ``m_l(t+1)``, ``m(t+1)`` into ``field``, the mixture into ``yhat``; returns ``(max_J, argmax_J)``."""
    cdef Lay L = _read_layout(lay)
    cdef double max_j, arg_j
    cdef double* out = &yhat[0] if (predict and yhat.shape[0] > 0) else NULL
    L.width = work.shape[1]
    with nogil:
        _merge_move(&L, &work[0, 0], work.shape[0], &coef[0, 0], &field[0, 0], out != NULL, out, &max_j, &arg_j)
    return float(max_j), int(arg_j)


def fold_rows(const double[:, ::1] work, lay, double[::1] out):
    """Fold every row of ``work`` into the single row ``out`` (sums in row order; the worst over rows)."""
    cdef Lay L = _read_layout(lay)
    cdef Py_ssize_t c, k, n_chunks = work.shape[0], width = work.shape[1]
    cdef double max_j, arg_j
    L.width = width
    with nogil:
        for k in range(width):
            out[k] = work[0, k]
        for c in range(1, n_chunks):
            for k in range(width):
                out[k] += work[c, k]
        _worst(&L, &work[0, 0], n_chunks, &max_j, &arg_j)
        out[L.max_cost] = max_j
        out[L.arg_cost] = arg_j


def fused_step(double[:, ::1] x, const double[:, ::1] s, const int64_t[::1] labels, double[::1] J,
               double[:, ::1] work, lay, const double[:, ::1] coef, const double[:, :, ::1] mix, double[:, ::1] field,
               bint have_mean, double discount, const double[::1] log_p, double[::1] yhat, int threads):
    """One whole population step: :func:`signal_pass`, :func:`merge_signals`, :func:`move_pass`, :func:`merge_move`.

    The same chunk functions and merge functions as the two-pass API, in one
    nogil region. Returns ``(n_valid, max_J, argmax_J)``.
    """
    cdef Pop P
    cdef Py_ssize_t n_valid
    cdef double max_j, arg_j
    keep = _population(&P, x, s, labels, work, lay, threads)
    P.J = &J[0]
    P.coef = <double*>&coef[0, 0]
    P.field = &field[0, 0]
    P.half_discount = 0.5 * discount
    P.want_states = not have_mean
    P.log_p = <double*>&log_p[0] if (log_p.shape[0] == x.shape[0] and x.shape[0] > 0) else NULL
    cdef double* out = &yhat[0] if (P.log_p != NULL and yhat.shape[0] > 0) else NULL
    with nogil:
        _sweep(&P, threads, _signal_chunk)
        n_valid = _merge_signals(&P.lay, P.work, P.n_chunks, P.coef, &mix[0, 0, 0], P.field, P.want_states)
        _sweep(&P, threads, _move_chunk)
        _merge_move(&P.lay, P.work, P.n_chunks, P.coef, P.field, out != NULL, out, &max_j, &arg_j)
    return int(n_valid), float(max_j), int(arg_j)


# --------------------------------------------------------------------------- server
cdef void _predict_chunk(const Mix* M, Py_ssize_t c, double* scratch) noexcept nogil:
    """Chunk ``c``'s mixture: reads ``log_p``, ``x`` over the chunk; writes ``work[c, mixture + j]``."""
    cdef Py_ssize_t d = M.lay.d, R = _block_rows(d), Lb = R * d, lo, hi, k, j
    cdef double* cen = NULL
    _bounds(M.n, c, &lo, &hi)
    if M.cen != NULL:  # replicated after exp's rows
        cen = scratch + 2 * Lb + _exp_rows(R)
        for k in range(R):
            for j in range(d):
                cen[k * d + j] = M.cen[j]
    _weighted_lanes(M.log_p + lo, M.x + lo * d, hi - lo, d, scratch, scratch + Lb, scratch + 2 * Lb, cen)
    _lane_columns(scratch, d, R, M.work + c * M.lay.width + M.lay.mixture)


cdef void _reweight_chunk(const Mix* M, Py_ssize_t c, double* scratch) noexcept nogil:
    """Gradient step on chunk ``c``'s log-weights, in place, and the chunk's log-sum-exp pieces.

    Reads ``x`` over the chunk and ``ref`` (``y`` for hedge, ``err = sum_k p_k
    (x_k - y)`` for eg) and ``cen`` (eg's centre). Updates ``log_p_i -=
    clip(eta loss_i)`` (no step when ``eta == 0``; eg: ``loss_i = 2 <err,
    x_i - cen>``, hedge: ``|x_i - y|^2``). Writes
    ``work[c, lse_top]`` = the chunk's largest stepped log-weight and
    ``work[c, lse_sum]`` = ``sum exp(log_p_i - top)`` over the chunk (``-inf``
    and 0 when every weight is 0): the exponentials in vectorised sweeps,
    summed into ``SUM_LANES`` lanes combined in a fixed order.
    """
    cdef Py_ssize_t d = M.lay.d, R = _block_rows(d), Lb = R * d, lo, hi, rb, nr, k, j, l, eb, em
    cdef double* ref = scratch
    cdef double* terms = scratch + Lb
    cdef double* loss = scratch + 2 * Lb
    cdef double* mx = scratch + 2 * Lb + R
    cdef double* ex = scratch + 2 * Lb + 2 * R
    cdef double* acc = ex + _EXP_ROWS
    cdef double* cen = acc + _SUM_LANES  # eg's centre, replicated
    cdef double* lp
    cdef double top = -INFINITY, eta = M.eta, scale = 2.0 if M.rule == 0 else 1.0
    _bounds(M.n, c, &lo, &hi)
    for k in range(R):
        for j in range(d):
            ref[k * d + j] = M.ref[j]
            cen[k * d + j] = M.cen[j]
        mx[k] = -INFINITY
    rb = lo
    while rb < hi:
        nr = hi - rb if hi - rb < R else R
        lp = M.log_p + rb
        if eta != 0.0:
            memoa_loss_terms(nr * d, M.rule, M.x + rb * d, ref, cen, terms)
            memoa_row_sums(nr, d, terms, loss)
        memoa_step(nr, lp, loss, eta, scale, _STEP_LIMIT, mx)  # no step when eta == 0
        rb += R
    for k in range(R):
        top = mx[k] if mx[k] > top else top
    for l in range(_SUM_LANES):
        acc[l] = 0.0
    if top > -INFINITY:
        eb = lo
        while eb < hi:
            em = hi - eb if hi - eb < _EXP_ROWS else _EXP_ROWS
            memoa_shift(em, M.log_p + eb, top, 0.0, ex)
            _exp_into(ex, ex, em)
            _lane_add(ex, em, _SUM_LANES, acc)
            eb += _EXP_ROWS
    M.work[c * M.lay.width + M.lay.lse_top] = top
    M.work[c * M.lay.width + M.lay.lse_sum] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef void _merge_log_sum_exp(const Lay* L, const double* work, Py_ssize_t n_chunks, double* top,
                             double* log_total) noexcept nogil:
    """``top`` = the largest ``work[c, lse_top]``; ``log_total = log sum_c work[c, lse_sum] exp(work[c, lse_top] - top)``."""
    cdef Py_ssize_t c
    cdef double t = -INFINITY, total = 0.0
    for c in range(n_chunks):
        t = work[c * L.width + L.lse_top] if work[c * L.width + L.lse_top] > t else t
    for c in range(n_chunks):
        total += work[c * L.width + L.lse_sum] * exp(work[c * L.width + L.lse_top] - t)
    top[0] = t
    log_total[0] = log(total)


cdef void _share_rows(double* log_p, Py_ssize_t lo, Py_ssize_t hi, double top, double log_total, double alpha,
                      double n_total, double* scratch) noexcept nogil:
    """Normalise rows ``[lo, hi)`` of ``log_p`` in place, then apply fixed share.

    ``log p <- (log p - top) - log_total`` (``top`` first: exact when the
    log-weights are large and nearly tied), then ``p <- (1 - alpha) p + alpha /
    n_total`` in the log domain: ``log((1 - alpha) exp(log p) + alpha / N)``
    through the vectorised :c:func:`_exp_into`/:c:func:`_log_into` in sweeps
    of ``EXP_ROWS`` (each result depends on its own input only); when ``alpha
    / N < 1e-290`` the scalar ``logaddexp(log1p(-alpha) + log p, log(alpha / N))``.
    ``scratch``: ``EXP_ROWS`` doubles.
    """
    cdef Py_ssize_t i, b, m
    cdef double keep, floor, a, spread, hi_v, uniform
    memoa_shift(hi - lo, log_p + lo, top, log_total, log_p + lo)
    if alpha == 0.0:
        return
    if alpha == 1.0:
        uniform = -log(n_total)
        for i in range(lo, hi):
            log_p[i] = uniform
    elif alpha / n_total < _SHARE_FLOOR_MIN:
        keep = log1p(-alpha)
        spread = log(alpha / n_total)
        for i in range(lo, hi):
            a = keep + log_p[i]
            hi_v = a if a > spread else spread
            log_p[i] = hi_v + log1p(exp(-fabs(a - spread))) if a != spread else a + 0.6931471805599453
    else:
        keep = 1.0 - alpha
        floor = alpha / n_total
        b = lo
        while b < hi:
            m = hi - b if hi - b < _EXP_ROWS else _EXP_ROWS
            _exp_into(log_p + b, scratch, m)
            memoa_affine(m, scratch, keep, floor)
            _log_into(scratch, log_p + b, m)
            b += _EXP_ROWS


cdef object _server(Mix* M, const double[::1] log_p, const double[:, ::1] x, double[:, ::1] work, lay, int threads):
    """Fill ``M`` with the pointers and layout of one server call; returns the scratch array (keep it alive)."""
    M.lay = _read_layout(lay)
    M.lay.width = work.shape[1]
    M.n = log_p.shape[0]
    M.n_chunks = work.shape[0]
    M.log_p = <double*>&log_p[0] if log_p.shape[0] > 0 else NULL
    M.x = <double*>&x[0, 0] if x.shape[0] > 0 else NULL
    M.work = &work[0, 0] if work.shape[0] > 0 else NULL
    M.ref = NULL
    M.cen = NULL
    M.rule = 0
    M.eta = 0.0
    M.scratch_size = _server_scratch(M.lay.d)
    scratch = np.empty(max(threads, 1) * M.scratch_size + 2 * M.lay.d)
    cdef double[::1] view = scratch
    M.scratch = &view[0]
    return scratch


def mixture_predict(const double[::1] log_p, const double[:, ::1] x, double[:, ::1] work, lay, double[::1] out,
                    int threads, const double[::1] centre=None):
    """``out = sum_i exp(log_p_i) (x_i - centre)`` (no centre: ``sum_i exp(log_p_i) x_i``); each chunk's partial sums go
    to ``work[c, mixture:mixture + d]``."""
    cdef Mix M
    cdef Py_ssize_t c
    keep = _server(&M, log_p, x, work, lay, threads)
    cdef Lay* L = &M.lay
    if centre is not None:
        M.cen = M.scratch + max(threads, 1) * M.scratch_size
        for c in range(L.d):
            M.cen[c] = centre[c]
    with nogil:
        if threads <= 1:
            for c in range(M.n_chunks):
                _predict_chunk(&M, c, M.scratch)
        else:
            for c in prange(M.n_chunks, schedule="static", num_threads=threads):
                _predict_chunk(&M, c, _thread_scratch(M.scratch, M.scratch_size))
        for c in range(L.d):
            out[c] = _column_sum(M.work, M.n_chunks, L.width, L.mixture + c)


cdef void _reweight_sweep(const Mix* M, int threads) noexcept nogil:
    """:c:func:`_reweight_chunk` on every chunk: serially, or on ``threads`` OpenMP threads (static schedule)."""
    cdef Py_ssize_t c
    if threads <= 1:
        for c in range(M.n_chunks):
            _reweight_chunk(M, c, M.scratch)
    else:
        for c in prange(M.n_chunks, schedule="static", num_threads=threads):
            _reweight_chunk(M, c, _thread_scratch(M.scratch, M.scratch_size))


cdef void _share_sweep(double* log_p, Py_ssize_t n, double top, double log_total, double alpha, double n_total,
                       double* scratch, Py_ssize_t scratch_size, int threads) noexcept nogil:
    """:c:func:`_share_rows` on every chunk of ``log_p``: serially, or on ``threads`` OpenMP threads."""
    cdef Py_ssize_t c, n_chunks = (n + _CHUNK - 1) // _CHUNK
    if threads <= 1:
        for c in range(n_chunks):
            _share_rows(log_p, c * _CHUNK, min(n, (c + 1) * _CHUNK), top, log_total, alpha, n_total, scratch)
    else:
        for c in prange(n_chunks, schedule="static", num_threads=threads):
            _share_rows(log_p, c * _CHUNK, min(n, (c + 1) * _CHUNK), top, log_total, alpha, n_total,
                        _thread_scratch(scratch, scratch_size))


def mixture_reweight(double[::1] log_p, const double[:, ::1] x, const double[::1] y, const double[::1] err, int rule,
                     double eta, double[:, ::1] work, lay, int threads):
    """``log_p_i -= clip(eta loss_i)`` in place; each chunk's log-sum-exp pieces go to ``work``."""
    cdef Mix M
    keep = _server(&M, log_p, x, work, lay, threads)
    _prepare_ref(&M, keep, y, err, rule, eta, threads)
    with nogil:
        _reweight_sweep(&M, threads)


cdef void _prepare_ref(Mix* M, scratch, const double[::1] y, const double[::1] err, int rule, double eta,
                       int threads) except *:
    """Write the per-coordinate target (``y``, or ``err`` for eg) and eg's centre (``y_j``, 0 where ``err_j = 0``) after
    the threads' scratch; set rule and eta."""
    cdef Py_ssize_t j, d = M.lay.d
    M.ref = M.scratch + max(threads, 1) * M.scratch_size
    M.cen = M.ref + d
    for j in range(d):
        M.ref[j] = err[j] if rule == 0 else y[j]
        M.cen[j] = (y[j] if err[j] != 0.0 else 0.0) if rule == 0 else 0.0
    M.rule = 0 if rule == 0 else 1
    M.eta = eta


def merge_log_sum_exp(const double[:, ::1] work, lay):
    """``(top, log_total)`` with ``log sum_i exp(log_p_i) = top + log_total``, from the chunk pieces."""
    cdef Lay L = _read_layout(lay)
    cdef double top, log_total
    L.width = work.shape[1]
    with nogil:
        _merge_log_sum_exp(&L, &work[0, 0], work.shape[0], &top, &log_total)
    return float(top), float(log_total)


def mixture_share(double[::1] log_p, double top, double log_total, double alpha, n_total, int threads):
    """Normalise, ``log p <- (log p - top) - log_total``, then fixed share ``p <- (1 - alpha) p + alpha / n_total``."""
    cdef double n = float(n_total)
    cdef Py_ssize_t size = _EXP_ROWS + 8
    scratch = np.empty(max(threads, 1) * size)
    cdef double[::1] view = scratch
    if log_p.shape[0] == 0:
        return
    with nogil:
        _share_sweep(&log_p[0], log_p.shape[0], top, log_total, alpha, n, &view[0], size, threads)


def mixture_update(double[::1] log_p, const double[:, ::1] x, const double[::1] y, const double[::1] err, int rule,
                   double eta, double alpha, double[:, ::1] work, lay, int threads):
    """One server update: :func:`mixture_reweight`, :func:`merge_log_sum_exp`, :func:`mixture_share` in one nogil region."""
    cdef Mix M
    cdef double top, log_total
    keep = _server(&M, log_p, x, work, lay, threads)
    _prepare_ref(&M, keep, y, err, rule, eta, threads)
    with nogil:
        _reweight_sweep(&M, threads)
        _merge_log_sum_exp(&M.lay, M.work, M.n_chunks, &top, &log_total)
        _share_sweep(M.log_p, M.n, top, log_total, alpha, <double>M.n, M.scratch, M.scratch_size, threads)


# --------------------------------------------------------------------------- test hooks
def _exp_array(const double[::1] src, double[::1] out):
    """``out = exp(src)`` through the vectorised :c:func:`_exp_into` (for the accuracy tests)."""
    with nogil:
        _exp_into(&src[0], &out[0], src.shape[0])


def _log_array(const double[::1] src, double[::1] out):
    """``out = log(src)`` through the vectorised :c:func:`_log_into` (for the accuracy tests)."""
    with nogil:
        _log_into(&src[0], &out[0], src.shape[0])
