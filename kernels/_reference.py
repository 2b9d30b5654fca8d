"""Slow, obviously correct NumPy references of every kernel.

Same signatures as the compiled kernels (``work`` and ``threads`` are
accepted and ignored) so each can stand in for the others; the tests compare
the compiled kernels against these, and ``backend="numpy"`` runs them.
"""
import numpy as np

RULE_EG, RULE_HEDGE = 0, 1


def finite_rows(s):
    """Agents whose whole signal row is finite."""
    return np.isfinite(s).all(axis=1)


def mean_field(x, s, J, work, out_mean_x, out_mean_s, threads):
    """Mean state, mean of the finite signals and the worst agent.

    Returns ``(n_finite, max_J, argmax_J)``; ``out_mean_s`` is left as it was
    when no signal is finite.
    """
    ok = finite_rows(s)
    out_mean_x[:] = x.mean(axis=0)
    n_finite = int(ok.sum())
    if n_finite:
        out_mean_s[:] = s[ok].mean(axis=0)
    worst = int(np.argmax(J))
    return n_finite, float(J[worst]), worst


def policy_update(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, discount, threads):
    """One step of ``u = -gain (x - c_signal s - c_signal_mean sbar - c_state_mean m)``, in place.

    ``J_i += discount/2 (q|x_i - s_i|^2 + kappa|x_i - m|^2 + r|u_i|^2)`` evaluated
    before the move, then ``x_i += u_i``. An agent whose signal has a
    non-finite entry holds (``u_i = 0``) and pays only the mean-field term.
    """
    ok = finite_rows(s)
    s_ok = np.where(ok[:, None], s, 0.0)
    offset = c_signal_mean * mean_s + c_state_mean * mean_x
    u = np.where(ok[:, None], -gain * (x - c_signal * s_ok - offset), 0.0)
    track = np.where(ok, ((x - s_ok) ** 2).sum(axis=1), 0.0)
    cost = q * track + kappa * ((x - mean_x) ** 2).sum(axis=1) + r * (u**2).sum(axis=1)
    J += 0.5 * discount * cost
    x += u


def mixture_predict(log_p, x, work, out, threads):
    """``out = sum_i p_i x_i`` with ``p = exp(log_p)``."""
    out[:] = np.exp(log_p) @ x


def mixture_update(log_p, x, y, yhat, rule, eta, alpha, work, threads):
    """Online reweighting of the mixture in the log domain, in place.

    ``eg``: ``log p_i -= eta * 2 <yhat - y, x_i>``; ``hedge``:
    ``log p_i -= eta |x_i - y|^2``; then normalise by log-sum-exp and apply
    fixed share ``p <- (1 - alpha) p + alpha / N``.
    """
    if rule == RULE_EG:
        loss = 2.0 * (x @ (yhat - y))
    else:
        loss = ((x - y) ** 2).sum(axis=1)
    log_p -= eta * loss
    top = log_p.max()
    log_p -= top + np.log(np.exp(log_p - top).sum())
    if alpha == 1.0:
        log_p[:] = -np.log(log_p.shape[0])
    elif alpha > 0.0:
        log_p[:] = np.logaddexp(np.log1p(-alpha) + log_p, np.log(alpha / log_p.shape[0]))


def fused_step(x, s, J, work, gain, c_signal, c_signal_mean, c_state_mean, q, kappa, r, discount,
               mean_x, mean_s, next_mean_x, have_mean_x, log_p, yhat, threads):
    """One whole population step: the mean field, the policy, and what step t+1 needs.

    Equivalent to :func:`mean_field` then :func:`policy_update` (with
    ``mean_x`` as the mean state), then :func:`mixture_predict` on the moved
    states. In detail:

    - ``mean_x`` (IN/OUT, ``(d,)``): ``m(t)``. If ``have_mean_x`` is true it is
      taken as given (the previous step's ``next_mean_x``); otherwise it is
      computed from ``x`` and written.
    - ``mean_s`` (OUT, ``(d,)``): the mean of the finite signals; left as it
      was when no signal is finite.
    - ``next_mean_x`` (OUT, ``(d,)``): ``m(t+1)``, the mean of the moved states.
    - ``log_p`` (IN, ``(N,)`` or ``(0,)``) and ``yhat`` (OUT, ``(d,)``): when
      ``log_p`` has N entries, ``yhat = sum_i exp(log_p_i) x_i(t+1)``, the
      server's prediction of the new states; with an empty ``log_p``,
      ``yhat`` is not touched.

    Returns ``(n_finite, max_J, argmax_J)`` of the *updated* costs (the worst
    client after this step; first index on ties).
    """
    if not have_mean_x:
        mean_x[:] = x.mean(axis=0)
    ok = finite_rows(s)
    n_finite = int(ok.sum())
    if n_finite:
        mean_s[:] = s[ok].mean(axis=0)
    policy_update(x, s, J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, discount, threads)
    next_mean_x[:] = x.mean(axis=0)
    if log_p.shape[0] == x.shape[0]:
        mixture_predict(log_p, x, work, yhat, threads)
    worst = int(np.argmax(J))
    return n_finite, float(J[worst]), worst
