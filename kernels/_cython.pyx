# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels: same functions, signatures and chunking as :mod:`._numba`.

Each reduction runs over fixed chunks of ``CHUNK`` agents, one partial row per
chunk in ``work`` (same column layout as the Numba backend, see
:func:`memoa_fast.kernels.work_shape`), merged serially in chunk order: the
same input gives bitwise the same result whatever the thread count. The serial
(``threads == 1``, no OpenMP team) and ``prange`` drivers call the same
``nogil`` chunk function, so they agree bitwise too.

The kernels trust their inputs: C-contiguous float64, shapes checked by the
caller. Arguments marked IN are read only; OUT are written; IN/OUT are updated
in place.
"""
from cython.parallel cimport prange
from libc.math cimport INFINITY, exp, fabs, isfinite, log, log1p
cimport openmp

RULE_EG = 0
RULE_HEDGE = 1

# Mirrors ._config.CHUNK and ._config.PAD (compile-time constants here); checked at import below.
cdef enum:
    _CHUNK = 4096
    _PAD = 8

from ._config import CHUNK as _CONFIG_CHUNK, PAD as _CONFIG_PAD

if _CONFIG_CHUNK != _CHUNK or _CONFIG_PAD != _PAD:  # pragma: no cover
    raise ImportError(
        f"memoa_fast.kernels._cython was compiled with CHUNK={_CHUNK}, PAD={_PAD} but _config says "
        f"CHUNK={_CONFIG_CHUNK}, PAD={_CONFIG_PAD}: rebuild with `pip install .`"
    )


cdef inline Py_ssize_t _padded(Py_ssize_t d) noexcept nogil:
    return ((d + _PAD - 1) // _PAD) * _PAD


cdef inline Py_ssize_t _n_chunks(Py_ssize_t n) noexcept nogil:
    return (n + _CHUNK - 1) // _CHUNK


def max_threads():
    """Threads an OpenMP parallel region may use (``omp_get_max_threads()``)."""
    return openmp.omp_get_max_threads()


# --------------------------------------------------------------------------- mean field
cdef void _mean_field_chunk(
    const double[:, ::1] x,   # IN  (n, d) states
    const double[:, ::1] s,   # IN  (n, d) signals, may hold NaN/inf
    const double[::1] J,      # IN  (n,) online costs
    double[:, ::1] work,      # OUT row c: chunk partials
    Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t dp = _padded(d)
    cdef Py_ssize_t i, j
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef Py_ssize_t count = 0, jarg = -1
    cdef double jmax = -INFINITY
    cdef bint finite
    cdef double* row = &work[c, 0]
    if hi > n:
        hi = n
    for j in range(work.shape[1]):
        row[j] = 0.0
    for i in range(lo, hi):
        finite = True
        for j in range(d):
            if not isfinite(s[i, j]):
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
    row[2 * dp] = <double>count
    row[2 * dp + 1] = jmax
    row[2 * dp + 2] = <double>jarg


cdef void _mean_field_merge(
    const double[:, ::1] work,  # IN  chunk partials
    Py_ssize_t n,
    Py_ssize_t d,
    double[::1] out_mean_x,     # OUT (d,)
    double[::1] out_mean_s,     # OUT (d,), untouched when no signal is finite
    double* count_out,
    double* jmax_out,
    double* jarg_out,
) noexcept nogil:
    cdef Py_ssize_t dp = _padded(d)
    cdef Py_ssize_t n_chunks = work.shape[0]
    cdef Py_ssize_t c, j
    cdef double count = 0.0, jmax = -INFINITY, jarg = -1.0, total
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
    count_out[0] = count
    jmax_out[0] = jmax
    jarg_out[0] = jarg


def mean_field(
    const double[:, ::1] x,   # IN  (n, d)
    const double[:, ::1] s,   # IN  (n, d)
    const double[::1] J,      # IN  (n,)
    double[:, ::1] work,      # OUT work_shape(n, d)
    double[::1] out_mean_x,   # OUT (d,)
    double[::1] out_mean_s,   # OUT (d,)
    int threads,
):
    """Mean state, mean of the finite signals and the worst agent.

    Returns ``(n_finite, max_J, argmax_J)``; ``out_mean_s`` is left as it was
    when no signal is finite; ties in ``J`` go to the first index.
    """
    cdef Py_ssize_t c, n_chunks = work.shape[0]
    cdef double count, jmax, jarg
    with nogil:
        if threads <= 1:
            for c in range(n_chunks):
                _mean_field_chunk(x, s, J, work, c)
        else:
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _mean_field_chunk(x, s, J, work, c)
        _mean_field_merge(work, x.shape[0], x.shape[1], out_mean_x, out_mean_s, &count, &jmax, &jarg)
    return int(count), float(jmax), int(jarg)


# --------------------------------------------------------------------------- policy
cdef void _policy_chunk(
    double[:, ::1] x,               # IN/OUT (n, d) states, moved by u
    const double[:, ::1] s,         # IN  (n, d) signals
    double[::1] J,                  # IN/OUT (n,) online costs
    double gain,
    double c_signal,
    double c_signal_mean,
    double c_state_mean,
    const double[::1] mean_s,       # IN  (d,)
    double q,
    double kappa,
    double r,
    const double[::1] mean_x,       # IN  (d,)
    double half_discount,
    Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef bint finite
    cdef double cost, xi, si, u, e_s, e_m
    if hi > n:
        hi = n
    for i in range(lo, hi):
        finite = True
        for j in range(d):
            if not isfinite(s[i, j]):
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


def policy_update(
    double[:, ::1] x,           # IN/OUT (n, d)
    const double[:, ::1] s,     # IN  (n, d)
    double[::1] J,              # IN/OUT (n,)
    double gain,
    double c_signal,
    double c_signal_mean,
    double c_state_mean,
    const double[::1] mean_s,   # IN  (d,)
    double q,
    double kappa,
    double r,
    const double[::1] mean_x,   # IN  (d,)
    double discount,
    int threads,
):
    """One policy step in place: ``J_i`` pays the stage cost (before the move), then ``x_i += u_i``.

    An agent whose signal has a non-finite entry holds and pays only the kappa term.
    """
    cdef Py_ssize_t c, n_chunks = _n_chunks(x.shape[0])
    cdef double half_discount = 0.5 * discount
    with nogil:
        if threads <= 1:
            for c in range(n_chunks):
                _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s,
                              q, kappa, r, mean_x, half_discount, c)
        else:
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s,
                              q, kappa, r, mean_x, half_discount, c)


# --------------------------------------------------------------------------- server
cdef void _predict_chunk(
    const double[::1] log_p,    # IN  (n,) log-weights
    const double[:, ::1] x,     # IN  (n, d)
    double[:, ::1] work,        # OUT row c, columns [0, d)
    Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef double p
    cdef double* row = &work[c, 0]
    if hi > n:
        hi = n
    for j in range(d):
        row[j] = 0.0
    for i in range(lo, hi):
        p = exp(log_p[i])
        for j in range(d):
            row[j] += p * x[i, j]


cdef void _predict_merge(
    const double[:, ::1] work,  # IN  chunk partials
    Py_ssize_t d,
    double[::1] out,            # OUT (d,)
) noexcept nogil:
    cdef Py_ssize_t c, j
    cdef double total
    for j in range(d):
        total = 0.0
        for c in range(work.shape[0]):
            total += work[c, j]
        out[j] = total


def mixture_predict(
    const double[::1] log_p,    # IN  (n,)
    const double[:, ::1] x,     # IN  (n, d)
    double[:, ::1] work,        # OUT work_shape(n, d)
    double[::1] out,            # OUT (d,)
    int threads,
):
    """``out = sum_i p_i x_i`` with ``p = exp(log_p)``."""
    cdef Py_ssize_t c, n_chunks = work.shape[0]
    with nogil:
        if threads <= 1:
            for c in range(n_chunks):
                _predict_chunk(log_p, x, work, c)
        else:
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _predict_chunk(log_p, x, work, c)
        _predict_merge(work, x.shape[1], out)


cdef void _reweight_chunk(
    double[::1] log_p,          # IN/OUT (n,) log-weights, stepped (not yet normalised)
    const double[:, ::1] x,     # IN  (n, d)
    const double[::1] y,        # IN  (d,) target
    const double[::1] yhat,     # IN  (d,) mixture prediction
    int rule,
    double eta,
    double[:, ::1] work,        # OUT row c: [2 dp + 1] chunk max, [2 dp + 2] scaled sum
    Py_ssize_t c,
) noexcept nogil:
    """Gradient step on the log-weights of one chunk and its online log-sum-exp."""
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t col = 2 * _padded(d)
    cdef Py_ssize_t i, j
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef double top = -INFINITY, scaled = 0.0, loss, e, v
    if hi > n:
        hi = n
    for i in range(lo, hi):
        loss = 0.0
        if rule == 0:
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
            scaled = scaled * exp(top - v) + 1.0
            top = v
        elif v != -INFINITY:
            # A zero weight (v = -inf) adds nothing; without this test a chunk
            # starting with zero weights would add exp(-inf - -inf) = NaN.
            scaled += exp(v - top)
    work[c, col + 1] = top
    work[c, col + 2] = scaled


cdef double _log_sum_exp_merge(
    const double[:, ::1] work,  # IN  chunk (max, scaled sum) pairs
    Py_ssize_t d,
) noexcept nogil:
    cdef Py_ssize_t col = 2 * _padded(d)
    cdef Py_ssize_t c
    cdef double top = -INFINITY, total = 0.0
    for c in range(work.shape[0]):
        if work[c, col + 1] > top:
            top = work[c, col + 1]
    for c in range(work.shape[0]):
        total += work[c, col + 2] * exp(work[c, col + 1] - top)
    return top + log(total)


cdef void _share_chunk(
    double[::1] log_p,  # IN/OUT (n,) log-weights: normalised, then mixed with the uniform law
    double lse,
    double alpha,
    Py_ssize_t c,
) noexcept nogil:
    """Normalise and mix with the uniform law: ``p <- (1-alpha) p + alpha/N``."""
    cdef Py_ssize_t n = log_p.shape[0]
    cdef Py_ssize_t i
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef double keep, spread, a, top, uniform
    if hi > n:
        hi = n
    if alpha == 0.0:
        for i in range(lo, hi):
            log_p[i] -= lse
    elif alpha == 1.0:
        uniform = -log(<double>n)
        for i in range(lo, hi):
            log_p[i] = uniform
    else:
        keep = log1p(-alpha)
        spread = log(alpha / n)
        for i in range(lo, hi):
            a = keep + log_p[i] - lse
            top = a if a > spread else spread
            log_p[i] = top + log1p(exp(-fabs(a - spread)))


def mixture_update(
    double[::1] log_p,          # IN/OUT (n,)
    const double[:, ::1] x,     # IN  (n, d)
    const double[::1] y,        # IN  (d,)
    const double[::1] yhat,     # IN  (d,)
    int rule,
    double eta,
    double alpha,
    double[:, ::1] work,        # OUT work_shape(n, d)
    int threads,
):
    """Online reweighting of the mixture in the log domain, in place.

    ``rule`` 0 (eg): ``log p_i -= eta * 2 <yhat - y, x_i>``; 1 (hedge):
    ``log p_i -= eta |x_i - y|^2``; then normalise by log-sum-exp and apply
    fixed share ``p <- (1 - alpha) p + alpha / N``.
    """
    cdef Py_ssize_t c, n_chunks = work.shape[0]
    cdef double lse
    with nogil:
        if threads <= 1:
            for c in range(n_chunks):
                _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c)
            lse = _log_sum_exp_merge(work, x.shape[1])
            for c in range(n_chunks):
                _share_chunk(log_p, lse, alpha, c)
        else:
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _reweight_chunk(log_p, x, y, yhat, rule, eta, work, c)
            lse = _log_sum_exp_merge(work, x.shape[1])
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _share_chunk(log_p, lse, alpha, c)


# --------------------------------------------------------------------------- fused step
# Appended by the performance work (issue 4): mirrors ``_numba.fused_step``
# (same signature and semantics; see ``_reference.fused_step``), written in
# this module's row-by-row style. Two passes over memory: the signals (their
# mean is needed before any state moves), then the states and costs, with
# the next step's partial sums taken while the chunk is in cache.
cdef void _fused_signal_chunk(
    const double[:, ::1] x,   # IN  (n, d) states
    const double[:, ::1] s,   # IN  (n, d) signals, may hold NaN/inf
    double[:, ::1] work,      # OUT row c: [0, d) state sums (if want_x), [dp, dp + d) finite-signal sums, [2 dp] count
    bint want_x,
    Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t dp = _padded(d)
    cdef Py_ssize_t i, j
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef Py_ssize_t count = 0
    cdef bint finite
    cdef double* row = &work[c, 0]
    if hi > n:
        hi = n
    for j in range(work.shape[1]):
        row[j] = 0.0
    for i in range(lo, hi):
        finite = True
        for j in range(d):
            if not isfinite(s[i, j]):
                finite = False
        if want_x:
            for j in range(d):
                row[j] += x[i, j]
        if finite:
            count += 1
            for j in range(d):
                row[dp + j] += s[i, j]
    row[2 * dp] = <double>count


cdef void _fused_move_chunk(
    double[:, ::1] x,               # IN/OUT (n, d) states, moved by u
    const double[:, ::1] s,         # IN  (n, d) signals
    double[::1] J,                  # IN/OUT (n,) online costs
    double[:, ::1] work,            # OUT row c: [0, d) sums of x(t+1), [dp, dp + d) mixture partials, [2 dp + 1, 2 dp + 2] max cost, its index
    double gain,
    double c_signal,
    double c_signal_mean,
    double c_state_mean,
    const double[::1] mean_s,       # IN  (d,)
    double q,
    double kappa,
    double r,
    const double[::1] mean_x,       # IN  (d,)
    double half_discount,
    const double[::1] log_p,        # IN  (n,) log-weights, or (0,)
    bint predict,
    Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t dp = _padded(d)
    cdef Py_ssize_t i, j
    cdef Py_ssize_t lo = c * _CHUNK
    cdef Py_ssize_t hi = lo + _CHUNK
    cdef Py_ssize_t jarg = -1
    cdef double jmax = -INFINITY, p
    cdef double* row = &work[c, 0]
    if hi > n:
        hi = n
    _policy_chunk(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, half_discount, c)
    for j in range(d):
        row[j] = 0.0
        row[dp + j] = 0.0
    for i in range(lo, hi):  # the chunk is in cache now
        for j in range(d):
            row[j] += x[i, j]
        if predict:
            p = exp(log_p[i])
            for j in range(d):
                row[dp + j] += p * x[i, j]
        if J[i] > jmax:
            jmax = J[i]
            jarg = i
    row[2 * dp + 1] = jmax
    row[2 * dp + 2] = <double>jarg


def fused_step(
    double[:, ::1] x,               # IN/OUT (n, d)
    const double[:, ::1] s,         # IN  (n, d)
    double[::1] J,                  # IN/OUT (n,)
    double[:, ::1] work,            # OUT work_shape(n, d)
    double gain,
    double c_signal,
    double c_signal_mean,
    double c_state_mean,
    double q,
    double kappa,
    double r,
    double discount,
    double[::1] mean_x,             # IN m(t) if have_mean_x, else OUT
    double[::1] mean_s,             # OUT (d,), untouched when no signal is finite
    double[::1] next_mean_x,        # OUT (d,) m(t+1)
    bint have_mean_x,
    const double[::1] log_p,        # IN  (n,) log-weights, or (0,): no mixture
    double[::1] yhat,               # OUT (d,) sum_i exp(log_p_i) x_i(t+1), when log_p has n entries
    int threads,
):
    """One whole population step in two passes; see ``_reference.fused_step``.

    Returns ``(n_finite, max_J, argmax_J)`` of the updated costs (first index on ties).
    """
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t dp = _padded(d)
    cdef Py_ssize_t c, j, n_chunks = work.shape[0]
    cdef double half_discount = 0.5 * discount
    cdef double count = 0.0, total, jmax = -INFINITY, jarg = -1.0
    cdef bint predict = log_p.shape[0] == n
    with nogil:
        if threads <= 1:
            for c in range(n_chunks):
                _fused_signal_chunk(x, s, work, not have_mean_x, c)
        else:
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _fused_signal_chunk(x, s, work, not have_mean_x, c)
        for c in range(n_chunks):
            count += work[c, 2 * dp]
        if count > 0:
            for j in range(d):
                total = 0.0
                for c in range(n_chunks):
                    total += work[c, dp + j]
                mean_s[j] = total / count
        if not have_mean_x:
            for j in range(d):
                total = 0.0
                for c in range(n_chunks):
                    total += work[c, j]
                mean_x[j] = total / n
        if threads <= 1:
            for c in range(n_chunks):
                _fused_move_chunk(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r,
                                  mean_x, half_discount, log_p, predict, c)
        else:
            for c in prange(n_chunks, schedule="static", num_threads=threads):
                _fused_move_chunk(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r,
                                  mean_x, half_discount, log_p, predict, c)
        for j in range(d):
            total = 0.0
            for c in range(n_chunks):
                total += work[c, j]
            next_mean_x[j] = total / n
            if predict:
                total = 0.0
                for c in range(n_chunks):
                    total += work[c, dp + j]
                yhat[j] = total
        for c in range(n_chunks):
            if work[c, 2 * dp + 1] > jmax:
                jmax = work[c, 2 * dp + 1]
                jarg = work[c, 2 * dp + 2]
    return int(count), float(jmax), int(jarg)
