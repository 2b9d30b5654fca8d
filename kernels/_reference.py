"""Slow, obviously correct NumPy references of every kernel: the specification.

Every backend module (``_numba``, ``_cython``, this one) has the same public
functions with the same signatures and the same semantics (all of ``__all__``
here but :func:`valid_rows`, this module's definition of a valid row, which
the tests use); the compiled ones are tested against these, and
``backend="numpy"`` runs them. ``work``
and ``threads`` are accepted (and ``work`` is written where the semantics
say so, so a sharded run can merge this backend's partials too). The names
of the small arrays' rows and columns are in :mod:`._layout`.

The population step is two passes over the agents with a merge between
them, the same for one machine (:func:`fused_step`) and for a Dask shard
(:func:`signal_pass`, then the client's :func:`merge_signals`, then
:func:`move_pass` and :func:`merge_move`):

1. signal pass: per class, the sum and count of the *valid* signals (every
   entry finite and ``|s| <= SIGNAL_LIMIT``) and, when the mean state is not
   known yet, the sum of the states;
2. merge: class means, the global means and the policy offset of each class,
   ``offset_j = sum_l mix[0, j, l] sbar_l + mix[1, j, l] m_l + mix[0, j, K] sbar + mix[1, j, K] m``;
3. move pass: ``u_i = -gain_j (x_i - signal_j s_i - offset_j)`` for an agent
   of class ``j`` with a valid signal (others hold, ``u_i = 0``), the cost
   ``J_i += gamma^t/2 (q_j |x_i - s_i|^2 + kappa_j |x_i - m|^2 + r_j |u_i|^2)``
   (an agent without a valid signal pays the ``kappa_j`` term only), then
   ``x_i += u_i``; and, on the moved states, the per-class state sums (the
   next step's mean field), the largest cost and its first agent, and the
   server's mixture ``sum_i p_i x_i`` when log-weights are given.
"""
import numpy as np

from ._config import CHUNK
from ._layout import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, RULE_EG, RULE_HEDGE, SIGNAL, SIGNAL_LIMIT, SIZE, STEP_LIMIT, Q, R, padded

__all__ = [
    "RULE_EG", "RULE_HEDGE", "valid_rows", "signal_pass", "merge_signals", "move_pass", "merge_move", "fold_rows",
    "fused_step", "mixture_predict", "mixture_reweight", "merge_log_sum_exp", "mixture_share", "mixture_update",
    "max_threads",
]



def max_threads():
    """The reference runs on one thread."""
    return 1


def valid_rows(s):
    """Agents whose whole signal row is finite and at most ``SIGNAL_LIMIT`` in magnitude."""
    return (np.abs(s) <= SIGNAL_LIMIT).all(axis=1)


def _classes(labels, n):
    return np.zeros(n, dtype=np.int64) if labels.shape[0] == 0 else labels


def signal_pass(x, s, labels, work, lay, want_states, threads):
    """Pass 1: write each chunk's class signal sums and counts (and state sums if ``want_states``) to ``work``."""
    n, d = x.shape
    K, dp = lay.n_classes, padded(d)
    cls = _classes(labels, n)
    ok = valid_rows(s)
    for c in range(work.shape[0]):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        for l in range(K):
            mine = cls[lo:hi] == l
            good = mine & ok[lo:hi]
            work[c, lay.signal + l * dp:lay.signal + l * dp + d] = s[lo:hi][good].sum(axis=0)
            work[c, lay.count + l] = good.sum()
            if want_states:
                work[c, lay.state + l * dp:lay.state + l * dp + d] = x[lo:hi][mine].sum(axis=0)


def merge_signals(work, lay, coef, mix, field, want_states):
    """Merge pass 1's rows: class and global means into ``field``, then the class offsets; returns the valid count.

    Reads ``work`` rows in chunk order. Writes ``field[class_signal + l]``
    (left as it was for a class with no valid signal) and
    ``field[field_signal]`` (left as it was when no signal is valid); with
    ``want_states``, ``field[class_state + l]`` (``0`` for an empty class) and
    ``field[field_state]``; always ``field[offset + j]``.
    """
    K, d = lay.n_classes, lay.dim
    dp = padded(d)
    counts = work[:, lay.count:lay.count + K].sum(axis=0)
    total = counts.sum()
    for l in range(K):
        if counts[l] > 0:
            field[lay.class_signal + l] = work[:, lay.signal + l * dp:lay.signal + l * dp + d].sum(axis=0) / counts[l]
    if total > 0:
        sums = sum(work[:, lay.signal + l * dp:lay.signal + l * dp + d].sum(axis=0) for l in range(K))
        field[lay.field_signal] = sums / total
    if want_states:
        _merge_states(work, lay, coef, field, lay.class_state, lay.field_state)
    sbar = field[lay.class_signal:lay.class_signal + K]
    m = field[lay.class_state:lay.class_state + K]
    on_classes = mix[MIX_SIGNAL, :, :K] @ sbar + mix[MIX_STATE, :, :K] @ m
    on_all = np.outer(mix[MIX_SIGNAL, :, K], field[lay.field_signal]) + np.outer(mix[MIX_STATE, :, K], field[lay.field_state])
    field[lay.offset:lay.offset + K] = on_classes + on_all
    return int(total)


def _merge_states(work, lay, coef, field, class_row, global_row):
    K, d = lay.n_classes, lay.dim
    dp = padded(d)
    sums = np.array([work[:, lay.state + l * dp:lay.state + l * dp + d].sum(axis=0) for l in range(K)])
    size = coef[:, SIZE]
    field[class_row:class_row + K] = np.where(size[:, None] > 0, sums / np.where(size > 0, size, 1.0)[:, None], 0.0)
    field[global_row] = sums.sum(axis=0) / size.sum()


def move_pass(x, s, labels, J, work, lay, coef, field, discount, log_p, threads):
    """Pass 2, in place: move and pay every agent, then write each chunk's state sums, worst cost and mixture.

    ``discount`` is ``gamma^t``. ``field[offset + j]`` and ``field[field_state]``
    (``m(t)``) are read. Per chunk, ``work`` gets the class sums of the moved
    states, the largest updated cost and its first agent, and (when ``log_p``
    has one entry per agent) ``sum_i exp(log_p_i) x_i(t+1)``.

    Call it after :func:`signal_pass` on the same ``s`` and ``work``: the
    compiled kernels read the valid counts pass 1 wrote there, and move a
    chunk whose count is its number of rows without checking its rows again.
    """
    n, d = x.shape
    K = lay.n_classes
    dp = padded(d)
    cls = _classes(labels, n)
    ok = valid_rows(s)
    table = coef[cls]
    offset = field[lay.offset:lay.offset + K][cls]
    m = field[lay.field_state]
    s_ok = np.where(ok[:, None], s, 0.0)
    gain = table[:, GAIN:GAIN + 1]
    u = np.where(ok[:, None], -gain * (x - table[:, SIGNAL:SIGNAL + 1] * s_ok - offset), 0.0)
    track = np.where(ok, ((x - s_ok) ** 2).sum(axis=1), 0.0)
    # A cost past the largest double is inf (README: finite while (q + kappa + r) (2 max|x|, max|s|)^2 rounds < 1e308),
    # as in the compiled kernels, which do not warn: neither does the reference (under -W error it stopped mid-step).
    with np.errstate(over="ignore", invalid="ignore"):
        cost = table[:, Q] * track + table[:, KAPPA] * ((x - m) ** 2).sum(axis=1) + table[:, R] * (u**2).sum(axis=1)
        J += 0.5 * discount * cost
    x += u
    predict = log_p.shape[0] == n
    for c in range(work.shape[0]):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        for l in range(K):
            work[c, lay.state + l * dp:lay.state + l * dp + d] = x[lo:hi][cls[lo:hi] == l].sum(axis=0)
        top, first = _first_max(J[lo:hi])
        work[c, lay.max_cost] = top
        work[c, lay.arg_cost] = lo + first if first >= 0 else -1
        if predict:
            work[c, lay.mixture:lay.mixture + d] = np.exp(log_p[lo:hi]) @ x[lo:hi]


def _first_max(J):
    """``(max, first index)`` over the entries of ``J`` above ``-inf``, a NaN never larger (the compiled kernels' ``>``).

    ``(-inf, -1)`` when there is none (every cost NaN: ``gamma^t`` underflowed to 0 times an infinite cost).
    """
    above = J > -np.inf  # False for NaN
    if not above.any():
        return -np.inf, -1
    k = int(np.argmax(np.where(above, J, -np.inf)))
    return float(J[k]), k


def merge_move(work, lay, coef, field, predict, yhat):
    """Merge pass 2's rows: ``m_l(t+1)``, ``m(t+1)`` into ``field``, the mixture into ``yhat``; returns ``(max_J, argmax_J)``."""
    _merge_states(work, lay, coef, field, lay.class_next, lay.field_next)
    if predict:
        yhat[:] = work[:, lay.mixture:lay.mixture + lay.dim].sum(axis=0)
    c = int(np.argmax(work[:, lay.max_cost]))  # first chunk on ties, and each row holds its first agent
    return float(work[c, lay.max_cost]), int(work[c, lay.arg_cost])


def fold_rows(work, lay, out):
    """Fold every row of ``work`` into the single row ``out`` (sums in row order; the worst over rows)."""
    out[:] = work.sum(axis=0)
    c = int(np.argmax(work[:, lay.max_cost]))
    out[lay.max_cost] = work[c, lay.max_cost]
    out[lay.arg_cost] = work[c, lay.arg_cost]


def fused_step(x, s, labels, J, work, lay, coef, mix, field, have_mean, discount, log_p, yhat, threads):
    """One whole population step on one machine: :func:`signal_pass`, :func:`merge_signals`, :func:`move_pass`, :func:`merge_move`.

    ``field[class_state]``/``field[field_state]`` hold ``m(t)`` when
    ``have_mean`` (the previous step's ``class_next``/``field_next``, copied
    there by the caller); otherwise they are computed from ``x``. Returns
    ``(n_valid, max_J, argmax_J)`` of the updated costs (first agent on ties).
    """
    signal_pass(x, s, labels, work, lay, not have_mean, threads)
    n_valid = merge_signals(work, lay, coef, mix, field, not have_mean)
    move_pass(x, s, labels, J, work, lay, coef, field, discount, log_p, threads)
    max_j, arg = merge_move(work, lay, coef, field, log_p.shape[0] == x.shape[0], yhat)
    return n_valid, max_j, arg


# --------------------------------------------------------------------------- server
def mixture_predict(log_p, x, work, lay, out, threads, centre=None):
    """``out = sum_i exp(log_p_i) x_i``, or ``sum_i exp(log_p_i) (x_i - centre)`` when ``centre`` (d,) is given.

    The eg update asks for the mixture's error ``yhat - y`` as
    ``sum_i p_i (x_i - y)`` (``centre = y``): a weighted sum of differences, so
    no error at the level of the values (``yhat`` rounded, then ``- y``, has
    one of ``eps |yhat|``). ``x - 0`` is ``x`` exactly: no centre and a zero
    centre give the same bits. A client of weight 0 adds 0 either way (not
    ``0 * inf = NaN`` where ``x_i - centre`` overflows).
    """
    p = np.exp(log_p)
    out[:] = p @ x if centre is None else _centred_mixture(p, x, centre)


def _centred_mixture(p, x, centre):
    """``sum_i p_i (x_i - centre)`` for weights ``p`` (N,), states ``x`` (N, d) and ``centre`` (d,); a weight 0 adds 0.

    As to ``sum_i p_i x_i``, a client of weight 0 adds nothing: ``0 (x_i - centre)`` would be ``0 * inf = NaN`` where
    that difference overflows (a state or the centre beyond half the largest double). The fused pipeline's reference
    takes eg's next error from here too (one definition).
    """
    with np.errstate(over="ignore"):
        dev = x - centre
    return p @ np.where(p[:, None] != 0.0, dev, 0.0)


def eg_centre(y, err):
    """The point eg's loss measures the states from: ``y_j``, or 0 where ``err_j = 0``.

    Any common point gives the same update (it shifts every loss by one
    term); ``y`` keeps the loss a sum of differences ``x_i - y``. Where
    ``err_j = 0`` the coordinate's term is 0 whatever ``x_i``: measured from 0
    it is ``0 * x_ij = 0``, where ``x_ij - y_j`` could overflow and make it
    ``0 * inf = NaN``.
    """
    return np.where(err != 0.0, y, 0.0)


def _steps(log_p, x, y, err, rule, eta):
    """The server steps ``eta loss_i``, only overflows clipped (see :data:`STEP_LIMIT`).

    ``err`` (eg only) is the mixture's error ``yhat - y``, computed as
    ``sum_i p_i (x_i - y)`` (:func:`mixture_predict` with ``centre = y``).
    A finite step is applied as it is (``|step| <= STEP_LIMIT``, the largest
    double), so finite steps keep their order however large they are; ``+-inf``
    becomes ``+-STEP_LIMIT`` and NaN (``inf - inf`` in eg's dot product, an
    overflow of either sign) ``+STEP_LIMIT``. eg's differences ``x_ij - y_j``
    (and so ``err``) overflow only where a state or the target is beyond
    half the largest double; their product wherever ``|err| |x_ij - y_j|``
    is (a target far from every state: ``1e160`` from states near 0).
    """
    if eta == 0.0:
        return np.zeros(log_p.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):
        if rule == RULE_EG:
            dev = x - eg_centre(y, err)
            loss = 2.0 * (dev @ err)
            bad = np.isnan(loss)
            if bad.any():  # a zero factor gives a zero term: x_ij at the centre adds 0 beside err_j = inf (not NaN)
                loss[bad] = 2.0 * np.where(dev[bad] != 0.0, dev[bad] * err, 0.0).sum(axis=1)
        else:
            loss = ((x - y) ** 2).sum(axis=1)
        step = eta * loss
    step = np.where(np.isnan(step), STEP_LIMIT, step)  # inf - inf in a dot product: an overflow too
    return np.clip(step, -STEP_LIMIT, STEP_LIMIT)


def mixture_reweight(log_p, x, y, err, rule, eta, work, lay, threads):
    """``log_p_i -= clip(eta loss_i)`` in place; each chunk's log-sum-exp pieces go to ``work``.

    ``clip`` only maps an overflow to the largest double (see :func:`_steps`).
    ``eg``: ``loss_i = 2 <err, x_i - y>`` with ``err = yhat - y`` given as
    ``sum_k p_k (x_k - y)`` (where ``err_j = 0`` or ``x_ij = y_j``,
    coordinate j adds 0, even if the other factor overflowed); in
    exact arithmetic ``2 <yhat - y, x_i>`` less the common ``2 <yhat - y, y>``,
    which the normalisation removes, but made of differences only: a common
    shift of the states and the target changes nothing beyond its own
    rounding. ``hedge``: ``loss_i = |x_i - y|^2`` (``err`` unused).
    Row ``c`` gets ``lse_top`` = the chunk's largest stepped log-weight and
    ``lse_sum`` = ``sum exp(log_p_i - lse_top)`` over the chunk (``-inf`` and 0
    when every weight of the chunk is 0).
    """
    with np.errstate(over="ignore"):  # log p - step, and that - top, may overflow to -inf (a zero weight): never NaN
        log_p -= _steps(log_p, x, y, err, rule, eta)
        n = log_p.shape[0]
        for c in range(work.shape[0]):
            seg = log_p[c * CHUNK:min((c + 1) * CHUNK, n)]
            top = seg.max()
            work[c, lay.lse_top] = top
            work[c, lay.lse_sum] = np.exp(seg - top).sum() if np.isfinite(top) else 0.0


def merge_log_sum_exp(work, lay):
    """``(top, log_total)`` with ``log sum_i exp(log_p_i) = top + log_total``, from the chunk pieces."""
    top = work[:, lay.lse_top].max()
    with np.errstate(over="ignore"):  # top_c - top may overflow to -inf (with top_c, steps of both signs near 1.8e308)
        total = (work[:, lay.lse_sum] * np.exp(work[:, lay.lse_top] - top)).sum()
    return float(top), float(np.log(total))


def mixture_share(log_p, top, log_total, alpha, n_total, threads):
    """Normalise, ``log p <- (log p - top) - log_total``, then fixed share ``p <- (1 - alpha) p + alpha / n_total``.

    Subtracting ``top`` first keeps the normalisation exact when the
    log-weights are large and nearly tied. ``n_total`` is the whole
    population's N (a Dask shard holds a slice of it).
    """
    with np.errstate(over="ignore"):  # log p - top may overflow to -inf: a zero weight
        log_p -= top
    log_p -= log_total
    if alpha == 1.0:
        log_p[:] = -np.log(n_total)
    elif alpha > 0.0:
        with np.errstate(divide="ignore"):  # a share alpha / N below the smallest double is 0: log 0 = -inf, no share
            log_share = np.log(alpha / n_total)
        log_p[:] = np.logaddexp(np.log1p(-alpha) + log_p, log_share)


def mixture_update(log_p, x, y, err, rule, eta, alpha, work, lay, threads):
    """One server update: :func:`mixture_reweight`, :func:`merge_log_sum_exp`, :func:`mixture_share`."""
    mixture_reweight(log_p, x, y, err, rule, eta, work, lay, threads)
    top, log_total = merge_log_sum_exp(work, lay)
    mixture_share(log_p, top, log_total, alpha, log_p.shape[0], threads)
