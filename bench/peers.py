"""Peers: the best code a user would write for the same work without memoa-fast.

The speed-ups in ``bench/README.md`` are against these, never against the
package's own NumPy reference (``backend="numpy"``, which is written for
clarity and is 2-3x slower than an idiomatic in-place NumPy). Nothing here
calls the package's kernels: the only thing taken from ``memoa_fast`` is the
policy's coefficients (:func:`coefficients`, the closed-form Riccati solution
of MODEL.md section 2, solved once) and the signal limit, so that the peers
compute exactly what the package computes.

What each peer does (MODEL.md sections 1, 2, 5 and 6):

:class:`NumpyPopulation`
    One MEMOA population step of N agents in dimension d, single class:
    mean signal, the policy ``u_i = -g (x_i - c s_i - a sbar - b m)``, the
    discounted stage cost, ``x += u``, the next mean state and the worst
    client. Preallocated buffers, ``out=`` everywhere, no per-step temporary
    of size N on the clean path. A signal row is *valid* when every entry is
    finite and at most ``SIGNAL_LIMIT`` in magnitude (as in the package): an
    agent with an invalid row holds, stays out of the signal mean and pays
    the mean-field term only. The clean case is detected by two reductions
    (``s.max()``, ``s.min()``; NaN propagates), which is what a careful user
    writes; only a step with an invalid row pays for the row mask.
:class:`NumpyServer`
    The hedge server: ``yhat = p @ x``, ``log p -= eta |x - y|^2``,
    normalised with ``scipy.special.logsumexp``, then fixed share
    ``p <- (1 - alpha) p + alpha / N`` (in the probability domain: faster
    than ``np.logaddexp`` and exact, since ``p >= alpha / N``).
:class:`NumpyForecasters`, :class:`NumpyPipeline`
    The time-series pipeline (MODEL.md section 6) in NumPy only: noisy
    observations from one ``numpy.random.Generator``, a normalised-LMS
    forecaster on ``[lags, min(lags^2, SQUARE_CAP), 1]`` per client and coordinate, then the
    population step and the server round above.
:func:`jax_population`, :func:`jax_server`
    The same step and server round as ``jax.jit`` functions in float64
    (only when JAX is importable: JAX is a benchmark-only extra, never a
    dependency of the package). Buffers are donated, so XLA may update in
    place.

:func:`self_check` runs each peer beside ``memoa_fast.Population`` /
``Server`` / ``ClientForecasters`` on a small case (with invalid signal rows)
and asserts agreement to ``1e-10``: the comparison is honest only if the
peers compute the same thing. ``python -P bench/peers.py`` runs it.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

try:  # the constants shared with the package (a signal beyond SIGNAL_LIMIT is treated as missing; the capped squares)
    from memoa_fast.kernels import SIGNAL_LIMIT, SQUARE_CAP
except ImportError:  # pragma: no cover - peers stay usable without the package
    SIGNAL_LIMIT, SQUARE_CAP = 1e50, 64.0

TOLERANCE = 1e-10


# --------------------------------------------------------------------------- coefficients
def coefficients(game) -> dict:
    """The single-class policy and cost weights of a ``memoa_fast.Game`` as plain floats.

    Returns ``gain, signal, signal_mean, state_mean, q, kappa, r, gamma`` with
    ``u_i = -gain (x_i - signal s_i - signal_mean sbar - state_mean m)``.
    """
    from memoa_fast.kernels import GAIN, KAPPA, MIX_SIGNAL, MIX_STATE, SIGNAL, Q, R

    if game.n_classes != 1:
        raise ValueError(f"the peers play single-class games, got n_classes={game.n_classes}")
    coef, mix = game.table.coef[0], game.table.mix
    return {"gain": float(coef[GAIN]), "signal": float(coef[SIGNAL]), "signal_mean": float(mix[MIX_SIGNAL, 0, 0]),
            "state_mean": float(mix[MIX_STATE, 0, 0]), "q": float(coef[Q]), "kappa": float(coef[KAPPA]),
            "r": float(coef[R]), "gamma": float(game.gamma)}


def _row_dot(a, b, out):
    """``out_i = sum_j a_ij b_ij`` without an (N, d) temporary (d = 1: one multiply)."""
    if a.shape[1] == 1:
        return np.multiply(a[:, 0], b[:, 0], out=out)
    return np.einsum("ij,ij->i", a, b, out=out)


# --------------------------------------------------------------------------- NumPy population
class NumpyPopulation:
    """One MEMOA population, stepped in place with NumPy (single class).

    Parameters
    ----------
    gain, signal, signal_mean, state_mean, q, kappa, r, gamma : float
        The policy ``u_i = -gain (x_i - signal s_i - signal_mean sbar - state_mean m)``
        and the weights of the stage cost
        ``l_i = 1/2 (q |x_i - s_i|^2 + kappa |x_i - m|^2 + r |u_i|^2)``
        (see :func:`coefficients`).
    x0 : numpy.ndarray, shape (N, d)
        Initial states (copied).
    """

    def __init__(self, x0, *, gain, signal, signal_mean, state_mean, q, kappa, r, gamma):
        self.x = np.array(x0, dtype=np.float64, order="C", copy=True)
        n, d = self.x.shape
        self.g, self.c, self.a, self.b = gain, signal, signal_mean, state_mean
        self.q, self.kappa, self.r, self.gamma = q, kappa, r, gamma
        self.J = np.zeros(n)
        self.u = np.empty((n, d))
        self.tmp = np.empty((n, d))
        self.row = np.empty(n)
        self.row2 = np.empty(n)
        self.m = self.x.mean(axis=0)
        self.sbar = np.zeros(d)
        self.discount = 1.0
        self.worst = -1
        self.n_valid = 0

    def step(self, s):
        """Advance every agent one round on its signal row ``s[i]`` (see the class docstring)."""
        x, u, tmp, row, row2 = self.x, self.u, self.tmp, self.row, self.row2
        n = x.shape[0]
        clean = s.max() <= SIGNAL_LIMIT and s.min() >= -SIGNAL_LIMIT  # False as soon as one entry is NaN
        if clean:
            ok = None
            self.sbar = s.mean(axis=0)
            self.n_valid = n
        else:
            ok = (np.abs(s) <= SIGNAL_LIMIT).all(axis=1)
            self.n_valid = int(ok.sum())
            s = np.where(ok[:, None], s, 0.0)
            if self.n_valid:
                self.sbar = s.sum(axis=0) / self.n_valid
        m = self.m
        offset = self.a * self.sbar + self.b * m
        # u = -g (x - c s - offset)
        np.multiply(s, self.c, out=u)
        np.subtract(x, u, out=u)
        u -= offset
        u *= -self.g
        # cost: q |x - s|^2 (valid rows) + kappa |x - m|^2 + r |u|^2
        np.subtract(x, s, out=tmp)
        _row_dot(tmp, tmp, row)
        if ok is not None:
            u[~ok] = 0.0
            row[~ok] = 0.0
        row *= self.q
        np.subtract(x, m, out=tmp)
        _row_dot(tmp, tmp, row2)
        row2 *= self.kappa
        row += row2
        _row_dot(u, u, row2)
        row2 *= self.r
        row += row2
        row *= 0.5 * self.discount
        self.J += row
        x += u
        self.m = x.mean(axis=0)
        self.worst = int(np.argmax(self.J))
        self.discount *= self.gamma
        return x


# --------------------------------------------------------------------------- NumPy server
class NumpyServer:
    """Hedge with fixed share, in place with NumPy and ``scipy.special.logsumexp``.

    Keeps the log-weights (plain weights underflow at large N) and the weights
    ``p`` themselves, so a prediction is one ``dot`` with no ``exp``. The
    fixed share runs in the probability domain, ``p = (1 - alpha) exp(log p -
    lse) + alpha / N`` then ``log p = log(p)`` (``p >= alpha / N`` never
    underflows): one ``exp`` and one ``log`` per client, 1.3-3x faster here
    than ``np.logaddexp`` on the log-weights (measured, same results to 1e-14).
    """

    def __init__(self, n, d, *, eta, alpha):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) for this peer, got {alpha!r}")
        self.eta, self.alpha = eta, alpha
        self.log_p = np.full(n, -math.log(n))
        self.p = np.full(n, 1.0 / n)
        self.loss = np.empty(n)
        self.tmp = np.empty((n, d))
        self.yhat = np.empty(d)
        self.keep = 1.0 - alpha
        self.floor = alpha / n

    def predict(self, x):
        """``yhat = sum_i p_i x_i``."""
        np.dot(self.p, x, out=self.yhat)
        return self.yhat

    def update(self, x, y):
        """``log p -= eta |x - y|^2``, normalise with ``logsumexp``, fixed share."""
        np.subtract(x, y, out=self.tmp)
        _row_dot(self.tmp, self.tmp, self.loss)
        self.loss *= self.eta
        log_p, p = self.log_p, self.p
        log_p -= self.loss
        log_p -= logsumexp(log_p)
        np.exp(log_p, out=p)
        p *= self.keep
        p += self.floor
        np.log(p, out=log_p)

    def round(self, x, y):
        """One server round: predict, then update on ``y``."""
        yhat = self.predict(x)
        self.update(x, y)
        return yhat


# --------------------------------------------------------------------------- NumPy pipeline
class NumpyForecasters:
    """Every client's normalised-LMS forecaster, in NumPy only (MODEL.md section 6).

    Client ``i`` observes ``z_i = y + sigma_i eps_i`` (``sigma_i`` log-uniform
    on ``noise_range``), updates ``w_i += mu e_i phi_i / |phi_i|^2`` on the
    a-priori error of its last forecast (from the second call on), shifts
    ``z_i`` into its lags and forecasts ``s_i = w_i . phi_i`` with
    ``phi = [lags, min(lags^2, SQUARE_CAP), 1]`` (newest lag first; persistence weights and
    zero lags at start). Each (client, coordinate) pair is an independent
    row, sharing its client's ``sigma``. The arrays are stored feature-major,
    ``(2p + 1, n d)``, so every operation runs over long contiguous rows
    (``einsum("fr,fr->r")`` is about 4x faster here than the row-major
    ``einsum("rf,rf->r")``).
    """

    def __init__(self, n, d=1, *, lags=2, noise_range=(0.02, 1.0), mu=0.1, seed=0, sigma=None):
        self.n, self.d, self.p, self.mu = n, d, lags, mu
        self.rng = np.random.default_rng(seed)
        lo, hi = noise_range
        if sigma is None:
            sigma = np.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * self.rng.random(n))
        self.sigma = np.repeat(np.asarray(sigma, dtype=np.float64), d)  # one per (client, coordinate) row
        rows, f = n * d, 2 * lags + 1
        self.w = np.zeros((f, rows))
        self.w[0] = 1.0
        self.phi = np.zeros((f, rows))
        self.phi[2 * lags] = 1.0
        self.tmp = np.empty((f, rows))
        self.eps = np.empty(rows)
        self.z = np.empty(rows)
        self.err = np.empty(rows)
        self.norm = np.empty(rows)
        self.out = np.empty(rows)
        self.t = 0

    def observe(self, y):
        """Observe ``y(t)``, learn, and return the forecasts of ``y(t+1)``, shape (n, d) (a live buffer)."""
        p, phi, z = self.p, self.phi, self.z
        self.rng.standard_normal(out=self.eps)
        np.multiply(self.eps, self.sigma, out=z)
        z.reshape(self.n, self.d)[...] += y
        if self.t > 0:
            np.einsum("fr,fr->r", self.w, phi, out=self.err)
            np.subtract(z, self.err, out=self.err)
            np.einsum("fr,fr->r", phi, phi, out=self.norm)
            np.divide(self.err, self.norm, out=self.err)
            self.err *= self.mu
            np.multiply(phi, self.err, out=self.tmp)
            self.w += self.tmp
        if p > 1:
            phi[1:p] = phi[0:p - 1]
            phi[p + 1:2 * p] = phi[p:2 * p - 1]
        phi[0] = z
        np.multiply(z, z, out=phi[p])
        np.minimum(phi[p], SQUARE_CAP, out=phi[p])  # the capped squares, as the kernels (memoa_fast.kernels.SQUARE_CAP)
        np.einsum("fr,fr->r", self.w, phi, out=self.out)
        self.t += 1
        return self.out.reshape(self.n, self.d)


class StagedPipeline:
    """A pipeline round in three timed stages: ``forecasters.observe``, ``population.step``, ``server_round``.

    Subclasses set ``forecasters``, ``population``, ``stage_s`` and ``server_round(x, y) -> mixture``; the
    NumPy peer here and memoa_fast's public API (``bench_pipeline.MemoaPipeline``) share this loop.
    """

    def run(self, y, *, timed_stages=False):
        """Play ``len(y) - 1`` rounds of the stream ``y`` (shape (T,) or (T, d)); returns the last mixture."""
        import time

        fc, pop, server_round = self.forecasters, self.population, self.server_round
        yhat = None
        clock = time.perf_counter
        for t in range(len(y) - 1):
            t0 = clock()
            s = fc.observe(y[t])
            t1 = clock()
            x = pop.step(s)
            t2 = clock()
            yhat = server_round(x, y[t + 1])
            if timed_stages:
                t3 = clock()
                self.stage_s["forecast"] += t1 - t0
                self.stage_s["step"] += t2 - t1
                self.stage_s["server"] += t3 - t2
        return yhat


class NumpyPipeline(StagedPipeline):
    """Forecasters, population and hedge server of ``n`` clients, NumPy only; ``run(y)`` plays the stream."""

    def __init__(self, n, game, *, d=1, seed=0, eta=0.5, alpha=0.01, forecaster_kwargs=None):
        self.forecasters = NumpyForecasters(n, d, seed=seed, **(forecaster_kwargs or {}))
        self.population = NumpyPopulation(np.zeros((n, d)), **coefficients(game))
        self.server = NumpyServer(n, d, eta=eta, alpha=alpha)
        self.server_round = self.server.round
        self.stage_s = {"forecast": 0.0, "step": 0.0, "server": 0.0}


# --------------------------------------------------------------------------- JAX
def have_jax() -> bool:
    """True when JAX can be imported (a benchmark-only extra)."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


class JaxPopulation:
    """The population step as one ``jax.jit`` function (float64); same semantics as :class:`NumpyPopulation`."""

    def __init__(self, x0, *, gain, signal, signal_mean, state_mean, q, kappa, r, gamma):
        jax = _jax()
        import jax.numpy as jnp

        limit = SIGNAL_LIMIT
        self.gamma = gamma

        def step(x, s, J, m, sbar, discount):
            ok = jnp.all(jnp.abs(s) <= limit, axis=1)
            count = ok.sum()
            s0 = jnp.where(ok[:, None], s, 0.0)
            sbar = jnp.where(count > 0, s0.sum(axis=0) / jnp.maximum(count, 1), sbar)
            offset = signal_mean * sbar + state_mean * m
            u = jnp.where(ok[:, None], -gain * (x - signal * s0 - offset), 0.0)
            track = jnp.where(ok, ((x - s0) ** 2).sum(axis=1), 0.0)
            cost = q * track + kappa * ((x - m) ** 2).sum(axis=1) + r * (u * u).sum(axis=1)
            J = J + (0.5 * discount) * cost
            x = x + u
            worst = jnp.argmax(J)
            return x, J, x.mean(axis=0), sbar, worst, count

        self._step = jax.jit(step, donate_argnums=(0, 2))
        self.x = jnp.asarray(np.array(x0, dtype=np.float64))
        self.J = jnp.zeros(self.x.shape[0])
        self.m = self.x.mean(axis=0)
        self.sbar = jnp.zeros(self.x.shape[1])
        self.discount = 1.0
        self.worst = -1
        self.n_valid = 0

    def step(self, s):
        """One step; returns the new states (a JAX array, already computed)."""
        self.x, self.J, self.m, self.sbar, worst, count = self._step(self.x, s, self.J, self.m, self.sbar,
                                                                     self.discount)
        self.x.block_until_ready()
        self.worst, self.n_valid = int(worst), int(count)  # the user needs the worst client: this waits for it
        self.discount *= self.gamma
        return self.x


class JaxServer:
    """The hedge server round (predict, update, normalise, fixed share) as one ``jax.jit`` function."""

    def __init__(self, n, d, *, eta, alpha):
        jax = _jax()
        import jax.numpy as jnp
        from jax.scipy.special import logsumexp as jlse

        keep, floor = 1.0 - alpha, alpha / n

        def server_round(log_p, p, x, y):
            yhat = p @ x
            log_p = log_p - eta * ((x - y) ** 2).sum(axis=1)
            p = keep * jnp.exp(log_p - jlse(log_p)) + floor
            return jnp.log(p), p, yhat

        self._round = jax.jit(server_round, donate_argnums=(0, 1))
        self.log_p = jnp.full(n, -math.log(n))
        self.p = jnp.full(n, 1.0 / n)

    def round(self, x, y):
        """Predict, then update on ``y``; returns the prediction (NumPy, so it has been computed)."""
        self.log_p, self.p, yhat = self._round(self.log_p, self.p, x, y)
        return np.asarray(yhat)


def jax_population(x0, **coef):
    """A :class:`JaxPopulation` (imports JAX in float64 mode)."""
    return JaxPopulation(x0, **coef)


def jax_server(n, d, *, eta, alpha):
    """A :class:`JaxServer` (imports JAX in float64 mode)."""
    return JaxServer(n, d, eta=eta, alpha=alpha)


# --------------------------------------------------------------------------- self check
def _close(name, got, want, tol=TOLERANCE):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    if not err <= tol:
        raise AssertionError(f"{name}: peer differs from memoa_fast by {err:.3g} (relative), more than {tol:g}")
    return err


def check_population(peer: str = "numpy", n: int = 9000, d: int = 3, steps: int = 6, seed: int = 1) -> float:
    """Step ``peer`` ("numpy" or "jax") beside ``memoa_fast.Population``; raise if they differ by more than 1e-10.

    The signals include rows with a NaN, an infinity and a value beyond
    ``SIGNAL_LIMIT`` in two of the steps, and a step with no valid row at all.
    Returns the largest relative difference seen.
    """
    from memoa_fast import Game, Population

    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, d))
    ref = Population(game, initial_states=x0, threads=1)
    make = NumpyPopulation if peer == "numpy" else jax_population
    mine = make(x0, **coefficients(game))
    worst_err = 0.0
    for t in range(steps):
        s = rng.standard_normal((n, d)) + 0.3 * t
        if t in (2, 4):
            s[5, 1 % d] = np.nan
            s[17, 0] = np.inf
            s[n - 1, d - 1] = 1e60
        if t == 3:
            s[...] = np.nan
        ref.step(s)
        mine.step(s)
        worst_err = max(worst_err, _close(f"{peer} states, step {t}", np.asarray(mine.x), ref.states))
        worst_err = max(worst_err, _close(f"{peer} costs, step {t}", np.asarray(mine.J), ref.costs))
        worst_err = max(worst_err, _close(f"{peer} mean state, step {t}", np.asarray(mine.m), ref.mean_state))
        if mine.worst != ref.worst_agent or mine.n_valid != ref.n_valid_signals:
            raise AssertionError(f"{peer} step {t}: worst client {mine.worst} / valid {mine.n_valid}, memoa_fast "
                                 f"{ref.worst_agent} / {ref.n_valid_signals}")
    return worst_err


def check_server(peer: str = "numpy", n: int = 9000, d: int = 3, rounds: int = 6, seed: int = 2) -> float:
    """Run ``peer``'s server round beside ``memoa_fast.Server`` (hedge, fixed share); raise beyond 1e-10."""
    from memoa_fast import Server

    eta, alpha = 0.5, 0.01
    rng = np.random.default_rng(seed)
    ref = Server(n, d, rule="hedge", eta=eta, alpha=alpha, threads=1)
    mine = NumpyServer(n, d, eta=eta, alpha=alpha) if peer == "numpy" else jax_server(n, d, eta=eta, alpha=alpha)
    worst_err = 0.0
    for t in range(rounds):
        x = rng.standard_normal((n, d))
        y = rng.standard_normal(d)
        want = ref.predict(x)
        ref.update(x, y)
        got = mine.round(x, y)
        worst_err = max(worst_err, _close(f"{peer} server prediction, round {t}", got, want))
        worst_err = max(worst_err, _close(f"{peer} server log-weights, round {t}", np.asarray(mine.log_p),
                                          ref.log_weights))
    return worst_err


def check_pipeline(n: int = 5000, rounds: int = 30) -> float:
    """The NumPy pipeline beside memoa_fast's (ClientForecasters + Population + Server), noise switched off.

    The two pipelines draw their noise from different generators, so they are
    compared with noise scales of ``1e-300`` (the observation is the stream
    value itself): forecasts, states and the mixture must agree to 1e-10.
    """
    from memoa_fast import Game, Population, Server
    from memoa_fast.timeseries.forecasters import ClientForecasters
    from memoa_fast.timeseries.streams import make_stream

    game = Game(q=1.0, kappa=1.0, r=0.1, gamma=0.9)
    y = make_stream("logistic", rounds + 1, seed=0)
    fc = ClientForecasters(n, noise_range=(1e-300, 1e-300), threads=1)
    pop = Population(game, n, 1, threads=1)
    server = Server(n, 1, rule="hedge", eta=0.5, alpha=0.01, threads=1)
    mine = NumpyPipeline(n, game, forecaster_kwargs={"noise_range": (1e-300, 1e-300)})
    worst_err = 0.0
    for t in range(rounds):
        s_ref = fc.observe(y[t])
        x_ref = pop.step(s_ref)
        yhat_ref = server.predict(x_ref)
        server.update(x_ref, y[t + 1])
        s = mine.forecasters.observe(y[t])
        x = mine.population.step(s)
        yhat = mine.server.round(x, y[t + 1])
        worst_err = max(worst_err, _close(f"pipeline forecasts, round {t}", s, s_ref))
        worst_err = max(worst_err, _close(f"pipeline states, round {t}", x, x_ref))
        worst_err = max(worst_err, _close(f"pipeline mixture, round {t}", yhat, yhat_ref))
    return worst_err


def self_check(with_jax: bool | None = None) -> dict:
    """Every peer against memoa_fast on a small case; returns ``{check: largest relative difference}``."""
    if with_jax is None:
        with_jax = have_jax()
    out = {
        "numpy population": check_population("numpy"),
        "numpy server": check_server("numpy"),
        "numpy pipeline": check_pipeline(),
    }
    if with_jax:
        out["jax population"] = check_population("jax")
        out["jax server"] = check_server("jax")
    return out


if __name__ == "__main__":
    for name, err in self_check().items():
        print(f"{name:<18} agrees with memoa_fast to {err:.2e} (tolerance {TOLERANCE:g})")
