"""The fused pipeline round against today's pipeline and an idiomatic NumPy one, in the same run.

One round of the time-series pipeline for one policy (MEMOA) and one server
rule (hedge, eta = 0.5, alpha = 0.01), N clients, d = 1, lags p = 2, with
the per-client squared errors recorded every round, three ways:

``today``
    the public API exactly as ``memoa_fast/experiment.py`` runs it:
    ``ClientForecasters.observe`` (NumPy PCG64 draws passed into the Numba
    kernel), the signal score, ``Population.step``, ``Server.predict``, the
    state score, ``Server.update``;
``round-1``, ``round-2``
    :class:`memoa_fast.timeseries.pipeline.Pipeline` on 1 and 2 threads, one
    ``Pipeline.round`` call per target (two passes over the clients per round,
    the noise drawn inside the kernel): the embedding user's call;
``fused-1``, ``fused-2``
    the same rounds through one ``Pipeline.run`` call on the whole series
    (the same bits; pass B of a round and pass A of the next in one sweep);
``numpy``
    an idiomatic NumPy-only pipeline: preallocated arrays, in-place ufuncs,
    ``Generator.standard_normal(out=...)``, the hedge weights kept as ``p``
    (one ``exp`` per client, as the fused kernel does when ``alpha > 0``;
    ``scipy.special.logsumexp`` only in a round where every weight
    underflows), the worst client ``argmax J`` every round (the step's
    definition, as the kernels report it); its BLAS on one thread (``OPENBLAS_NUM_THREADS=1`` unless set), like its ufuncs;
``jax``
    the same round with ``jax.jit`` in float64 (only when JAX is importable): the whole series as one jitted
    ``jax.lax.scan``, the state donated, normals from ``jax.random.normal`` (JAX's default PRNG, threefry),
    compiled for the series' length before the timed runs (the compile time is printed apart); XLA may use both
    cores. :func:`check_jax_pipeline` runs it beside ``numpy`` on the same normals (to 1e-10) before the timing;
``jax-rbg``
    the same with the ``'rbg'`` PRNG (XLA's RngBitGenerator), faster on a quiet machine. ``--jax-variants`` adds
    ``jax-round`` (one jitted round per target, its prediction read back each round: slower). The best peer
    printed is the fastest of ``numpy`` and the JAX contenders timed.

The contenders run interleaved (one timed run of each per repetition, a fresh
object each time, JIT warmed before); the table gives the medians of whole
runs in client-steps per second and the ratios of the medians, then the
median *round* of each contender over all its runs (robust to the
preemptions of a shared machine, which inflate whole runs); the load average
is printed before and after. On this shared 2-core machine, compare ratios.

Where the fused round's time goes: ``--passes`` times pass A (server step,
errors, noise, forecasters, signal sums) and pass B (share, move, mixture)
separately, and the in-kernel normals alone. ``--floor`` times a sweep that
only reads and writes the round's state (13 rows of N doubles read, 12
written): no round can take less. ``--parts`` times, on one thread with
4096 clients (everything in L2), three of the kernel's loops alone (the
``exp``, the normals, the NLMS update): their arithmetic, without the memory
traffic; and what a second thread gives on pure arithmetic (two exp loops in
L1, one after the other against both at once). ``--budget`` adds the cost of
a parallel region and the round with its transcendental functions taken out
(:func:`probe_kernel`: the kernel's own source with ``exp`` and the normals'
``log``, ``sqrt``, ``sin`` and ``cos`` replaced by one FMA each), against the
budget that 15x NumPy leaves. ``--placement`` times the ``Pipeline`` with its
state as built (each array on its own cache line of a page,
:mod:`memoa_fast._memory`) against the same values all at one page offset and
as ``np.zeros`` happened to place them (the same bits).

Run from the repository root, against the installed package::

    python -P bench/bench_fused_pipeline.py                          # 10^5 clients x 1000 rounds
    python -P bench/bench_fused_pipeline.py --rounds 100 --reps 5    # the short variant
    python -P bench/bench_fused_pipeline.py --passes --budget        # and where the time goes
    python -P bench/bench_fused_pipeline.py --jax-variants           # and the JAX pipeline's slower variant
    python -P -m pytest bench/bench_fused_pipeline.py -p no:cacheprovider   # the ratio guard, seconds
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path

# The NumPy contender runs on one core, like its ufuncs (as in bench/guard.py): with a multithreaded
# OpenBLAS its one BLAS call per round (the mixture's dot product) waits for a second thread, and on a
# loaded 2-core machine its rounds took 150-225 ns per client instead of 44-62 ns (measured 2026-11-29,
# load 2.7). Set before NumPy loads OpenBLAS; a value the user set wins.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numba
import numpy as np
import pytest
from scipy.special import logsumexp

from memoa_fast import Game, Population, Server
from memoa_fast.kernels import SQUARE_CAP
from memoa_fast.kernels import _pipeline_numba as _pipe
from memoa_fast.kernels import _pipeline_reference as _pipe_ref
from memoa_fast.kernels._threads import Threads
from memoa_fast.timeseries.forecasters import ClientForecasters, SquaredErrors
from memoa_fast.timeseries.pipeline import Pipeline
from memoa_fast.timeseries.streams import make_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script with -P, bench/ is not on sys.path
import peers  # noqa: E402
from conftest import median_seconds  # noqa: E402

GAME = Game(q=1.0, kappa=1.0, r=0.1, gamma=0.9)
ETA, ALPHA, MU, LAGS, NOISE = 0.5, 0.01, 0.1, 2, (0.02, 1.0)
CONTENDERS = ("today", "round-1", "round-2", "fused-1", "fused-2", "numpy")
# Added when JAX is importable (a benchmark-only extra, absent on CI): JAX's default PRNG and the 'rbg' one, 1.15-1.17x
# faster on a quiet machine (bench/README.md). --jax-variants adds one jitted call per round (slower than one scan).
JAX_CONTENDERS = ("jax", "jax-rbg")
JAX_VARIANTS = ("jax-round",)


def all_contenders(jax_variants: bool = False) -> tuple:
    """:data:`CONTENDERS`, then the JAX ones when JAX can be imported."""
    if not peers.have_jax():
        return CONTENDERS
    return CONTENDERS + JAX_CONTENDERS + (JAX_VARIANTS if jax_variants else ())


# --------------------------------------------------------------------------- today (experiment.py, one policy)
class Today:
    """``experiment.run_experiment``'s loop for one policy and one rule (same calls, same order)."""

    def __init__(self, n: int, threads: int | None = 1, seed: int = 0):
        self.n = n
        self.forecasters = ClientForecasters(n, 1, lags=LAGS, noise_range=NOISE, mu=MU, seed=seed, threads=threads)
        self.population = Population(GAME, n, 1, threads=threads)
        self.server = Server(n, 1, rule="hedge", eta=ETA, alpha=ALPHA, threads=threads)
        self.score_signals = SquaredErrors(n, 1, threads=threads)
        self.score_states = SquaredErrors(n, 1, threads=threads)

    def run(self, y: np.ndarray, times: list | None = None) -> float:
        fc, pop, server = self.forecasters, self.population, self.server
        err = 0.0
        clock = time.perf_counter
        for t in range(len(y) - 1):
            t0 = clock()
            s = fc.observe(y[t])
            target = y[t + 1]
            self.score_signals.add(s, target, True)
            x = pop.step(s)
            diff = server.predict(x) - target
            err += float(diff @ diff)
            self.score_states.add(x, target, True)
            server.update(x, target)
            if times is not None:
                times.append(clock() - t0)
        fc.close()
        return err


# --------------------------------------------------------------------------- fused
class Fused:
    """:class:`Pipeline` over the same rounds (its round t scores ``x(t)`` on ``y(t)`` and reweights).

    ``batch``: one ``Pipeline.run`` call on the series (its per-round time is the mean round);
    else one ``Pipeline.round`` call per target.
    """

    def __init__(self, n: int, threads: int, batch: bool, seed: int = 0):
        self.batch = batch
        self.pipe = Pipeline(n, 1, game=GAME, rule="hedge", eta=ETA, alpha=ALPHA, lags=LAGS, noise_range=NOISE, mu=MU,
                             seed=seed, threads=threads)

    def run(self, y: np.ndarray, times: list | None = None) -> float:
        pipe = self.pipe
        clock = time.perf_counter
        rounds = len(y) - 1  # as many rounds as the others
        if self.batch:
            t0 = clock()
            diff = pipe.run(y[:rounds])[:, 0] - y[1:, 0]
            err = float(diff @ diff)
            if times is not None:
                times.extend([(clock() - t0) / rounds] * rounds)
            return err
        err = 0.0
        for t in range(rounds):
            t0 = clock()
            yhat = pipe.round(y[t])
            diff = yhat[0] - y[t + 1, 0]
            err += diff * diff
            if times is not None:
                times.append(clock() - t0)
        return err


# --------------------------------------------------------------------------- NumPy only
class NumpyPipeline:
    """The same round in idiomatic NumPy (d = 1, p = 2): in-place ufuncs on preallocated arrays."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.rng = np.random.default_rng(seed)
        lo, hi = NOISE
        self.sigma = np.exp(self.rng.uniform(math.log(lo), math.log(hi), n))
        self.w = np.zeros((5, n))
        self.w[0] = 1.0
        self.lag = np.zeros((2, n))
        self.x = np.zeros(n)
        self.J = np.zeros(n)
        self.p = np.full(n, 1.0 / n)  # weights kept as p: with alpha > 0, p >= alpha / N never underflows
        self.sq_err = np.zeros(n)
        self.sq_sig = np.zeros(n)
        self.eps = np.empty(n)
        self.z = np.empty(n)
        self.s = np.empty(n)
        self.a = [np.empty(n) for _ in range(6)]
        g = GAME.table
        self.gain, self.csig = g.coef[0, 0], g.coef[0, 1]
        self.mix_s, self.mix_m = g.mix[0, 0, 0], g.mix[1, 0, 0]
        self.t = 0
        self.discount = 1.0

    def run(self, y: np.ndarray, times: list | None = None) -> float:
        yv = y[:, 0]
        clock = time.perf_counter
        w0, w1, w2, w3, w4 = self.w
        A0, A1 = self.lag
        x, J, p, s, z, eps = self.x, self.J, self.p, self.s, self.z, self.eps
        t0, t1, t2, t3, t4, t5 = self.a
        q, kappa, r = GAME.q, GAME.kappa, GAME.r
        share = ALPHA / self.n
        err = 0.0
        for t in range(len(yv) - 1):
            t_start = clock()
            # forecasters
            self.rng.standard_normal(out=eps)
            np.multiply(self.sigma, eps, out=z)
            z += yv[t]
            np.multiply(A0, A0, out=t0)  # a^2
            np.multiply(A1, A1, out=t1)  # b^2
            if self.t > 0:
                np.add(t0, t1, out=t3)  # |phi|^2: a^2 + b^2, then the capped squares' squares and 1
                np.minimum(t0, SQUARE_CAP, out=t0)  # the capped squares, as the kernels
                np.minimum(t1, SQUARE_CAP, out=t1)
                np.multiply(w0, A0, out=t2)
                t2 += w4
                t2 += w2 * t0
                t2 += w1 * A1
                t2 += w3 * t1
                np.subtract(z, t2, out=t2)  # error
                t3 += t0 * t0
                t3 += t1 * t1
                t3 += 1.0
                np.divide(t2, t3, out=t2)
                t2 *= MU  # step
                w0 += t2 * A0
                w1 += t2 * A1
                w2 += t2 * t0
                w3 += t2 * t1
                w4 += t2
            A1[:] = A0
            A0[:] = z
            np.multiply(w0, z, out=s)
            s += w4
            s += w2 * np.minimum(z * z, SQUARE_CAP)
            s += w1 * A1
            s += w3 * np.minimum(A1 * A1, SQUARE_CAP)
            target = yv[t + 1]
            np.subtract(s, target, out=t4)
            np.square(t4, out=t4)
            self.sq_sig += t4
            # population step (MEMOA policy, one class)
            sbar, m = s.mean(), x.mean()
            offset = self.mix_s * sbar + self.mix_m * m
            np.multiply(s, self.csig, out=t5)
            np.subtract(x, t5, out=t5)
            t5 -= offset
            t5 *= -self.gain  # u
            np.subtract(x, s, out=t4)
            np.square(t4, out=t4)
            t4 *= q
            np.subtract(x, m, out=t3)
            np.square(t3, out=t3)
            t4 += kappa * t3
            t4 += r * (t5 * t5)
            t4 *= 0.5 * self.discount
            J += t4
            self.worst = int(J.argmax())  # the worst client, as the kernels report every round
            x += t5
            # server: predict, score, hedge update with fixed share
            yhat = float(p @ x)
            err += (yhat - target) ** 2
            np.subtract(x, target, out=t1)
            np.square(t1, out=t1)
            self.sq_err += t1
            # hedge in the probability domain, one exp per client: p <- (1 - alpha) p e^{-eta l} / sum + alpha / N
            np.multiply(t1, -ETA, out=t0)
            np.exp(t0, out=t0)
            t0 *= p
            total = float(t0.sum())
            if total > 0.0:
                np.multiply(t0, (1.0 - ALPHA) / total, out=p)
            else:  # every weight underflowed this round (a huge loss): the same update through the logs
                np.log(p, out=t0)
                t0 -= ETA * t1
                t0 -= logsumexp(t0)
                np.exp(t0, out=p)
                p *= 1.0 - ALPHA
            p += share
            self.t += 1
            self.discount *= GAME.gamma
            if times is not None:
                times.append(clock() - t_start)
        return err


# --------------------------------------------------------------------------- JAX
_JAX = {}


def _jax_functions() -> dict:
    """The JAX pipeline's jitted functions, built once per process (so each shape compiles once).

    ``run`` / ``run_given``: the whole series as one ``jax.lax.scan`` (normals drawn with ``jax.random``, or
    given as a ``(T, N)`` array); ``round`` / ``round_given``: one round. The state ``(w0, ..., w4, a0, a1, x, J,
    p, sq_err, sq_sig, t, discount)`` is donated, so XLA updates it in place.
    """
    if _JAX:
        return _JAX
    jax = peers._jax()  # float64 (jax_enable_x64)
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp as jlse

    g = GAME.table
    gain, csig = float(g.coef[0, 0]), float(g.coef[0, 1])
    mix_s, mix_m = float(g.mix[0, 0, 0]), float(g.mix[1, 0, 0])
    q, kappa, r, gamma = GAME.q, GAME.kappa, GAME.r, GAME.gamma
    keep = 1.0 - ALPHA

    def argmax(J):
        """``np.argmax(J)`` (the first maximum, or the first NaN) as two plain reductions.

        ``jnp.argmax`` is one (value, index) reduction, 5.1 ns per client here against 2.6 for this form (alone),
        about a tenth of the round (16.5 against 12.1 ns per client-step, the normals given): we give the peer
        the faster form.
        """
        first = (J == J.max()) | jnp.isnan(J)
        return jnp.where(first, jnp.arange(J.shape[0]), J.shape[0]).min()

    def step(state, sigma, eps, y_t, target):
        """One round, what :meth:`NumpyPipeline.run` does per round; returns the state, yhat, worst client, underflow."""
        w0, w1, w2, w3, w4, a0, a1, x, J, p, sq_err, sq_sig, t, discount = state
        # forecasters on phi = [a0, a1, b0, b1, 1] (b: the squares capped at SQUARE_CAP): observe z, NLMS update on the
        # last forecast's error (from the second round on), shift z into the lags, forecast. Written out term by
        # term: the (5, N) form (w * phi).sum(axis=0), or einsum("fr,fr->r"), took 42-46 ns per client on XLA's CPU backend, the
        # written-out sum 1.1 ns.
        z = sigma * eps + y_t
        s0, s1 = a0 * a0, a1 * a1
        b0, b1 = jnp.minimum(s0, SQUARE_CAP), jnp.minimum(s1, SQUARE_CAP)  # the capped squares, as the kernels
        e = z - (w0 * a0 + w4 + w2 * b0 + w1 * a1 + w3 * b1)
        g = jnp.where(t > 0, MU * (e / (b0 * b0 + s0 + s1 + b1 * b1 + 1.0)), 0.0)
        w0, w1, w2, w3, w4 = w0 + g * a0, w1 + g * a1, w2 + g * b0, w3 + g * b1, w4 + g
        a0, a1 = z, a0
        s = w0 * z + w4 + w2 * jnp.minimum(z * z, SQUARE_CAP) + w1 * a1 + w3 * jnp.minimum(a1 * a1, SQUARE_CAP)
        sq_sig = sq_sig + (s - target) ** 2
        # population step (MEMOA, one class)
        sbar, m = s.mean(), x.mean()
        u = -gain * (x - csig * s - (mix_s * sbar + mix_m * m))
        J = J + (0.5 * discount) * (q * (x - s) ** 2 + kappa * (x - m) ** 2 + r * u * u)
        worst = argmax(J)
        x = x + u
        # server: predict, score, hedge with fixed share in the probability domain (logs if every weight underflows)
        yhat = p @ x
        loss = (x - target) ** 2
        sq_err = sq_err + loss
        pe = jnp.exp(-ETA * loss) * p
        total = pe.sum()

        def through_logs(_):
            lp = jnp.log(p) - ETA * loss
            return keep * jnp.exp(lp - jlse(lp))

        p = jax.lax.cond(total > 0.0, lambda _: pe * (keep / total), through_logs, None) + ALPHA / x.shape[0]
        return (w0, w1, w2, w3, w4, a0, a1, x, J, p, sq_err, sq_sig, t + 1, discount * gamma), (yhat, worst, total == 0.0)

    def normal(key, n):
        key, sub = jax.random.split(key)
        return key, jax.random.normal(sub, (n,), dtype=jnp.float64)

    def run(state, sigma, key, y):
        def body(carry, yy):
            state, key = carry
            key, eps = normal(key, sigma.shape[0])
            state, out = step(state, sigma, eps, yy[0], yy[1])
            return (state, key), out

        (state, key), out = jax.lax.scan(body, (state, key), (y[:-1], y[1:]))
        return state, key, out

    def run_given(state, sigma, normals, y):
        def body(state, xs):
            eps, y_t, target = xs
            return step(state, sigma, eps, y_t, target)

        return jax.lax.scan(body, state, (normals, y[:-1], y[1:]))

    def round_(state, sigma, key, y_t, target):
        key, eps = normal(key, sigma.shape[0])
        state, out = step(state, sigma, eps, y_t, target)
        return state, key, out

    _JAX.update(jax=jax, jnp=jnp, run=jax.jit(run, donate_argnums=(0,)), run_given=jax.jit(run_given, donate_argnums=(0,)),
                round=jax.jit(round_, donate_argnums=(0,)), round_given=jax.jit(step, donate_argnums=(0,)))
    return _JAX


class JaxPipeline:
    """The same round as :class:`NumpyPipeline` with ``jax.jit`` in float64, as a competent JAX user writes it.

    ``batch``: the whole series as one jitted ``jax.lax.scan`` (one call per series; its per-round time is the mean
    round); else one jitted round per target, whose prediction is read back each round (the embedding user's
    call, like ``round-1``). Normals from ``jax.random.normal`` with the PRNG ``impl`` (``None``: JAX's default,
    threefry; ``"rbg"``: XLA's RngBitGenerator), keys split in the loop. ``sigma``: the noise scales (default:
    log-uniform on ``NOISE`` from ``jax.random``). After a run, ``yhat``, ``worst`` and ``underflow`` (every
    weight underflowed: the log-domain branch ran) hold one entry per round; ``x``, ``J``, ``p``, ``w``, ``lag``,
    ``sq_err``, ``sq_sig`` the state. XLA may use both cores.
    """

    def __init__(self, n: int, seed: int = 0, *, batch: bool = True, impl: str | None = None, sigma=None):
        fns = self.fns = _jax_functions()
        jax, jnp = fns["jax"], fns["jnp"]
        self.n, self.batch = n, batch
        key, sub = jax.random.split(jax.random.key(seed, impl=impl))
        if sigma is None:
            lo, hi = NOISE
            sigma = jnp.exp(jax.random.uniform(sub, (n,), jnp.float64, math.log(lo), math.log(hi)))
        self.sigma = jnp.asarray(sigma, dtype=jnp.float64)
        self.key = key
        f64 = jnp.float64  # every entry strongly typed, as the rounds return them: no second compile from round 2 on
        self.state = (jnp.ones(n, f64),) + tuple(jnp.zeros(n, f64) for _ in range(8)) + (
            jnp.full(n, 1.0 / n, f64), jnp.zeros(n, f64), jnp.zeros(n, f64), jnp.asarray(0, jnp.int64), jnp.asarray(1.0, f64))

    def __getattr__(self, name):
        """The state as NumPy arrays: ``w`` (5, N) and ``lag`` (2, N) as :class:`NumpyPipeline` keeps them, ``x``, ..."""
        names = ("x", "J", "p", "sq_err", "sq_sig")
        if name == "w":
            return np.array(self.state[:5])
        if name == "lag":
            return np.array(self.state[5:7])
        if name in names:
            return np.asarray(self.state[7 + names.index(name)])
        raise AttributeError(name)

    def compile(self, y: np.ndarray) -> float:
        """Trace and compile what :meth:`run` calls on ``y`` (drawn normals), ahead of time; returns the seconds.

        The compiled function lands in ``jax.jit``'s cache, so the next ``run`` on a series of that length (on any
        pipeline of this size, PRNG and mode) does not compile again.
        """
        fns, jnp = self.fns, self.fns["jnp"]
        yv = np.ascontiguousarray(y[:, 0], dtype=np.float64)
        t0 = time.perf_counter()
        if self.batch:
            fns["run"].lower(self.state, self.sigma, self.key, jnp.asarray(yv)).compile()
        else:
            fns["round"].lower(self.state, self.sigma, self.key, yv[0], yv[1]).compile()
        return time.perf_counter() - t0

    def run(self, y: np.ndarray, times: list | None = None, normals: np.ndarray | None = None) -> float:
        """Play ``len(y) - 1`` rounds; returns the mixture's summed squared error. ``normals``: (rounds, N), given."""
        fns, jnp = self.fns, self.fns["jnp"]
        clock = time.perf_counter
        yv = np.ascontiguousarray(y[:, 0], dtype=np.float64)
        rounds = len(yv) - 1
        t0 = clock()
        if self.batch:
            if normals is None:
                self.state, self.key, out = fns["run"](self.state, self.sigma, self.key, jnp.asarray(yv))
            else:
                self.state, out = fns["run_given"](self.state, self.sigma, jnp.asarray(normals), jnp.asarray(yv))
            yhat, worst, under = (np.asarray(o) for o in out)  # waits for the scan
            if times is not None:
                times.extend([(clock() - t0) / rounds] * rounds)
        else:
            yhat, worst, under = np.empty(rounds), np.empty(rounds, dtype=np.int64), np.empty(rounds, dtype=bool)
            for t in range(rounds):
                t1 = clock()
                if normals is None:
                    self.state, self.key, out = fns["round"](self.state, self.sigma, self.key, yv[t], yv[t + 1])
                else:
                    self.state, out = fns["round_given"](self.state, self.sigma, jnp.asarray(normals[t]), yv[t], yv[t + 1])
                yhat[t] = float(out[0])  # the embedding user reads the prediction every round: this waits for it
                worst[t], under[t] = out[1], out[2]
                if times is not None:
                    times.append(clock() - t1)
        self.yhat, self.worst, self.underflow = yhat, worst, under
        diff = yhat - yv[1:]
        return float(diff @ diff)


class _GivenNormals:
    """Stands in for :class:`NumpyPipeline`'s generator: ``standard_normal(out=)`` copies the next given row."""

    def __init__(self, normals: np.ndarray):
        self.normals, self.t = normals, 0

    def standard_normal(self, out):
        out[...] = self.normals[self.t]
        self.t += 1


def _agree(name: str, got, want) -> float:
    """Largest difference of ``got`` (JAX) from ``want`` (NumPy) relative to ``max(1, max |want|)``; raise beyond 1e-10."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    err = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
    if not err <= peers.TOLERANCE:
        raise AssertionError(f"{name}: the JAX pipeline differs from the NumPy one by {err:.3g} (relative), more than "
                             f"{peers.TOLERANCE:g}")
    return err


def check_jax_pipeline(n: int = 3000, rounds: int = 40, batch: bool = True, seed: int = 3) -> float:
    """:class:`JaxPipeline` beside :class:`NumpyPipeline` on the same normals and noise scales; raise beyond 1e-10.

    Two ``run`` calls of ``rounds / 2`` rounds each (the state carries over); the stream has a spike of 50 as one
    round's target, where every hedge weight underflows (``exp(-eta loss)`` with ``eta loss > 1000``) and the
    log-domain branch runs (checked; it runs in the next few rounds too, while the forecasts chase the spike).
    Per round: the mixture's squared error and the worst client; after each call: states, costs, weights, NLMS
    weights and lags, both error records. Returns the largest difference, relative to the largest magnitude (at
    least 1).
    """
    y = make_stream("logistic", rounds + 1, seed=0)[:, None].copy()
    spike = rounds // 2 + 5
    y[spike, 0] = 50.0
    normals = np.random.default_rng(seed).standard_normal((rounds, n))
    ref = NumpyPipeline(n)
    ref.rng = _GivenNormals(normals)
    mine = JaxPipeline(n, batch=batch, sigma=ref.sigma)
    worst_err = 0.0
    half = rounds // 2
    for lo, hi in ((0, half), (half, rounds)):
        sq_mix, worst = [], []
        for t in range(lo, hi):
            sq_mix.append(ref.run(y[t:t + 2]))  # one round: its mixture's squared error
            worst.append(ref.worst)
        mine.run(y[lo:hi + 1], normals=normals[lo:hi])
        sq_mix_jax = (mine.yhat - y[lo + 1:hi + 1, 0]) ** 2
        worst_err = max(worst_err, _agree(f"mixture squared errors, rounds {lo}-{hi - 1}", sq_mix_jax, sq_mix))
        if not np.array_equal(mine.worst, worst):
            raise AssertionError(f"worst clients, rounds {lo}-{hi - 1}: jax {mine.worst.tolist()}, numpy {worst}")
        for name, want in (("x", ref.x), ("J", ref.J), ("p", ref.p), ("w", ref.w), ("lag", ref.lag), ("sq_err", ref.sq_err),
                           ("sq_sig", ref.sq_sig)):
            worst_err = max(worst_err, _agree(f"{name} after round {hi - 1}", getattr(mine, name), want))
    if not mine.underflow[spike - 1 - half] or mine.underflow.all():
        raise AssertionError(f"the log-domain branch ran in rounds {np.flatnonzero(mine.underflow) + half} of {half}-{rounds - 1}: "
                             f"it should in round {spike - 1} (the spike), and not in every round")
    return worst_err


# --------------------------------------------------------------------------- running
def build(name: str, n: int):
    if name == "today":
        return Today(n, threads=1)
    if name.startswith(("round-", "fused-")):
        return Fused(n, threads=int(name[-1]), batch=name.startswith("fused"))
    if name == "numpy":
        return NumpyPipeline(n)
    if name.startswith("jax"):
        return JaxPipeline(n, batch=name != "jax-round", impl="rbg" if name == "jax-rbg" else None)
    raise ValueError(name)


def warm():
    y = make_stream("logistic", 4, seed=0)[:, None]
    for n in (10, 20_000):
        for name in CONTENDERS:
            if name != "numpy":
                build(name, n).run(y)


def time_once(name: str, n: int, y: np.ndarray, times: list | None = None) -> float:
    obj = build(name, n)
    t0 = time.perf_counter()
    obj.run(y, times)
    return time.perf_counter() - t0


def compare(n: int, rounds: int, reps: int, numpy_rounds: int, contenders=CONTENDERS, jax_rounds: int | None = None,
            compile_s: dict | None = None):
    """Interleaved repetitions.

    Returns ``({name: [client-steps/s of each whole run]}, {name: client-steps/s
    of the median round over all runs})``. The median round is robust to the
    preemptions of a shared machine, which a whole run's time is not. The JAX
    contenders play ``jax_rounds`` rounds (default ``rounds``) and are compiled
    for that shape first, untimed; ``compile_s`` receives those seconds.
    """
    y = make_stream("logistic", rounds + 1, seed=0)[:, None]
    y_np = y[: numpy_rounds + 1]
    y_jax = make_stream("logistic", (jax_rounds or rounds) + 1, seed=0)[:, None]
    series_of = {name: y_np if name == "numpy" else y_jax if name.startswith("jax") else y for name in contenders}
    for name in contenders:
        if name.startswith("jax"):
            sec = build(name, n).compile(series_of[name])
            if compile_s is not None:
                compile_s[name] = sec
    rates = {name: [] for name in contenders}
    rounds_s = {name: [] for name in contenders}
    for _ in range(reps):
        for name in contenders:
            series = series_of[name]
            sec = time_once(name, n, series, rounds_s[name])
            rates[name].append(n * (len(series) - 1) / sec)
    per_round = {name: n / statistics.median(v) for name, v in rounds_s.items()}
    return rates, per_round


def time_passes(n: int, rounds: int, threads: int):
    """Seconds per round of pass A and pass B (medians), and of the in-kernel normals alone."""
    pipe = Pipeline(n, 1, game=GAME, rule="hedge", eta=ETA, alpha=ALPHA, lags=LAGS, noise_range=NOISE, mu=MU,
                    threads=threads)
    k = pipe._kern
    y = make_stream("logistic", rounds + 1, seed=0)[:, None]
    pipe.round(y[0])
    ta, tb, tn = [], [], []
    clock = time.perf_counter
    for t in range(1, rounds + 1):
        pipe._y[...] = y[t]
        f = pipe._flags
        _pipe_ref.round_flags(f, pipe.t, True)  # the kernels' own rule for round t >= 1: reweight, update, record
        pipe._params[k.P_HALF_DISCOUNT] = 0.5 * pipe._discount
        t0 = clock()
        k.pass_a(pipe._x, pipe._s, pipe._log_p, pipe._ebuf, pipe._sigma, pipe._weights, pipe._lag_buf, pipe._sq_err,
                 pipe._sq_sig, pipe._y, pipe._yhat, pipe._field, pipe._work, pipe._params, pipe._key, f, pipe._stats,
                 pipe._threads_used)
        t1 = clock()
        k.pass_b(pipe._x, pipe._s, pipe._J, pipe._log_p, pipe._ebuf, pipe._y, pipe._yhat, pipe._field, pipe._work,
                 pipe._params, f, pipe._stats, pipe._threads_used)
        t2 = clock()
        pipe._field[k.FIELD_STATE] = pipe._field[k.FIELD_NEXT]
        pipe.t += 1
        pipe._discount *= GAME.gamma
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    for t in range(min(rounds, 50)):
        t0 = clock()
        k.normals(pipe._key, 0, t, n, 1)
        tn.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(tn)


# The pipeline state a round must read and write per client (d = 1, p = 2): x, s, J, p, five NLMS weights, two lags,
# two error records, plus sigma read. The floor below streams exactly that through the cores and does nothing else.
STATE_ROWS = 13


@numba.njit(parallel=True, cache=False)
def _touch_state(state, c, parts):
    """``state[k, i] = state[k, i] * c + 1e-9 state[12, i]`` for rows ``k < 12``: 13 rows read, 12 written.

    One contiguous part of the clients per thread, row by row in blocks of 512 (unit stride, vectorised):
    the fastest of three layouts tried (clients outer and rows inner was 2-4x slower, 4096-client chunks 1.2x).
    """
    rows, n = state.shape
    for h in numba.prange(parts):
        lo0 = h * n // parts
        hi0 = (h + 1) * n // parts
        for lo in range(lo0, hi0, 512):
            hi = min(lo + 512, hi0)
            sigma = state[rows - 1, lo:hi]
            for k in range(rows - 1):
                row = state[k, lo:hi]
                for i in range(hi - lo):
                    row[i] = row[i] * c + 1e-9 * sigma[i]


def state_traffic_floor(n: int, threads: int, reps: int = 200) -> float:
    """Seconds per sweep (median) that only reads and writes the round's state: the memory floor of any round."""
    state = np.ones((STATE_ROWS, n))
    with Threads(threads):
        return median_seconds(lambda: _touch_state(state, 0.999, threads), reps)


@numba.njit(cache=False)
def _loop_parts(reps, x, out, eps, sigma, W, A, s, which):
    """``reps`` times one of the kernel's own loops over 4096 clients (their rows stay in L2)."""
    n = x.shape[0]
    bad = 0
    for r in range(reps):
        if which == 0:
            _pipe._exp_into(x, out)
        elif which == 1:
            _pipe._normals_into(np.uint64(r), 0, n // 2, eps)
        else:
            bad += _pipe._forecast_block_p2(out, sigma, eps, W, A, n, 0, MU, True, s)
    return bad


@numba.njit(parallel=True, cache=False)
def _exp_on_threads(src, dst, reps, parts):
    """``reps`` times the kernel's exp loop on each row of ``src`` (its own 2048 values), the rows over the threads."""
    for h in numba.prange(parts):
        for _ in range(reps):
            _pipe._exp_into(src[h], dst[h])


def two_thread_scaling(reps: int = 20000) -> float:
    """The machine's two-thread speed-up on pure arithmetic.

    Time of two exp loops one after the other over time of both at once on two threads, each on its own 2048
    values (in its core's L1): the most a compute-bound round can gain from a second thread.
    """
    src = -np.random.default_rng(0).uniform(0.0, 5.0, (2, 2048))
    dst = np.empty_like(src)
    _exp_on_threads(src, dst, 1, 2)  # compiled
    out = {}
    for threads in (1, 2):
        with Threads(threads):
            out[threads] = median_seconds(lambda: _exp_on_threads(src, dst, reps, 2), 5)
    return out[1] / out[2]


@numba.njit(parallel=True, cache=False)
def _empty_region(a):
    """A parallel region with one add per thread: its time is the cost of waking the threads and joining them."""
    for h in numba.prange(a.shape[0]):
        a[h] += 1.0


def region_seconds(gap: float, calls: int = 400) -> float:
    """Median seconds of an empty two-thread parallel region entered ``gap`` seconds after the previous one ended.

    Back to back (``gap`` of a few microseconds, as ``Pipeline.run``'s rounds are, with the merges between
    them) the second thread is still spinning (``GOMP_SPINCOUNT``, kernels/_config.py) and the region costs
    little; after a longer gap it sleeps, and the region first wakes it. A round of ``N`` clients on two threads
    ends no sooner than this after it starts (Numba splits the chunks statically: the woken thread's half ends last).
    """
    a = np.zeros(2)
    with Threads(2):
        _empty_region(a)  # compiled
        times = []
        for _ in range(calls):
            t1 = time.perf_counter()
            while time.perf_counter() - t1 < gap:
                pass
            t0 = time.perf_counter()
            _empty_region(a)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def round_in_l2_seconds(rounds: int = 2000) -> float:
    """Seconds per client-step of ``Pipeline.run`` on one thread with 4096 clients (one chunk, every row in L2).

    The whole round's arithmetic with hardly any memory traffic: what one thread needs per client at best.
    """
    n = 4096
    pipe = Fused(n, 1, batch=True).pipe
    y = make_stream("logistic", rounds + 1, seed=0)[:, None]
    pipe.run(y[:3])
    return median_seconds(lambda: pipe.run(y), 5) / (len(y) * n)


def time_parts(reps: int = 2000) -> dict:
    """Nanoseconds per client of three of the round's loops alone, one thread, 4096 clients (in L2)."""
    n = 4096
    rng = np.random.default_rng(0)
    x = -rng.uniform(0.0, 5.0, n)
    out = np.full(n, 0.3)
    eps = np.zeros(n)
    sigma = np.exp(rng.uniform(math.log(NOISE[0]), math.log(NOISE[1]), n))
    W = np.zeros((5, n))
    W[0] = 1.0
    A = rng.normal(size=(2, n)) * 0.1
    s = np.zeros(n)
    res = {}
    for which, name in enumerate(("exp", "normals", "NLMS update and forecast")):
        seconds = median_seconds(lambda: _loop_parts(reps, x, out, eps, sigma, W, A, s, which), 7)
        res[name] = 1e9 * seconds / (reps * n)
        if which == 0:
            out[:] = 0.3  # the targets of the NLMS loop
    return res


# The probe's edits of the kernel's source: (text, replacement), each text found exactly once. exp becomes
# 1 + x^2 (one FMA; positive and finite, so the weights stay valid and every round takes the kernel's usual
# paths), the normals' radius and angle one FMA each (the hashes stay), and the probe is not cached.
_PROBE_EDITS = (
    ("    x = -745.5 if x < -745.5 else x\n", "    return x * x + 1.0  # probe\n    x = -745.5 if x < -745.5 else x\n"),
    ("        radius = math.sqrt(-2.0 * _log1(u1))\n        c, s = _sincos_2pi(u2)\n",
     "        radius = u1 * 0.5 + 0.25  # probe\n        c, s = u2 * 0.5 - 0.25, u2 * 0.25 + 0.125\n"),
    ("_jit = dict(cache=CACHE,", "_jit = dict(cache=False,"),
    ("\nseal(globals())\n", "\n"),  # nothing cached, nothing to seal (and no file for its digest)
)


def probe_kernel():
    """The pipeline kernel without its transcendental functions: a bound that no faster ``exp`` or normal can beat.

    Built from the installed kernel's own source with :data:`_PROBE_EDITS` (the same loops, the same memory
    traffic), in memory only; its numbers are meaningless, its time is the point.
    """
    name = "memoa_fast.kernels._pipeline_probe"
    if name in sys.modules:
        return sys.modules[name]
    src = Path(_pipe.__file__).read_text()
    for old, new in _PROBE_EDITS:
        if src.count(old) != 1:
            raise RuntimeError(f"the probe's edit no longer fits the kernel (found {src.count(old)} times): {old!r}")
        src = src.replace(old, new)
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "memoa_fast.kernels"
    exec(compile(src, f"<{name}>", "exec"), mod.__dict__)
    sys.modules[name] = mod
    return mod


def _interleaved_run_times(pipes: dict, y: np.ndarray, reps: int) -> dict:
    """Median ns per client-step of ``pipe.run(y)`` for each of ``pipes``, one run of each per repetition (compiled first)."""
    for pipe in pipes.values():
        pipe.run(y[:3])
    times = {k: [] for k in pipes}
    for _ in range(reps):
        for k, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.run(y)
            times[k].append(1e9 * (time.perf_counter() - t0) / (len(y) * pipe.n_clients))
    return {k: statistics.median(v) for k, v in times.items()}


def time_probe(n: int, threads: int, rounds: int, reps: int = 5) -> tuple[float, float]:
    """Median ns per client-step of ``Pipeline.run`` with the real kernel and with :func:`probe_kernel`, interleaved."""
    y = make_stream("logistic", rounds + 1, seed=0)[:, None]
    pipes = {"real": Fused(n, threads, batch=True).pipe, "probe": Fused(n, threads, batch=True).pipe}
    pipes["probe"]._kern = probe_kernel()
    times = _interleaved_run_times(pipes, y, reps)
    return times["real"], times["probe"]


# The arrays one round streams through together (Pipeline's attributes), placed by memoa_fast._memory.
PIPELINE_STATE = ("_x", "_s", "_J", "_log_p", "_ebuf", "_sigma", "_sq_err", "_sq_sig", "_weights", "_lag_buf")


def _move_state(pipe, page_offset: int | None) -> list[int]:
    """Copy the Pipeline's state arrays to new storage: all at ``page_offset`` bytes into a page, or (None) ``np.zeros``.

    Returns the arrays' new offsets in their pages. The values, and so the bits of every later round, are the same.
    """
    keep = []
    for name in PIPELINE_STATE:
        old = getattr(pipe, name)
        if page_offset is None:
            new = np.zeros(old.shape)
        else:
            raw = np.zeros(old.nbytes + 8192, dtype=np.uint8)
            start = -raw.ctypes.data % 4096 + page_offset
            new = raw[start:start + old.nbytes].view(np.float64).reshape(old.shape)
            keep.append(raw)
        new[...] = old
        setattr(pipe, name, new)
    pipe._bench_keep = keep
    return [getattr(pipe, name).ctypes.data % 4096 for name in PIPELINE_STATE]


def time_placement(n: int, threads: int, rounds: int, reps: int = 5) -> dict:
    """Median ns per client-step of ``Pipeline.run`` with its state as placed, all at one page offset, and as ``np.zeros`` put it."""
    y = make_stream("logistic", rounds + 1, seed=0)[:, None]
    pipes = {name: Fused(n, threads, batch=True).pipe for name in ("staggered", "one page offset", "np.zeros")}
    _move_state(pipes["one page offset"], 16)  # where glibc puts a fresh mmap'ed block
    offsets = _move_state(pipes["np.zeros"], None)
    res = _interleaved_run_times(pipes, y, reps)
    outs = [pipe.run(y[:5]) for pipe in pipes.values()]
    assert all(np.array_equal(outs[0], o) for o in outs[1:]), "the placement changed the bits"
    res["np.zeros offsets"] = offsets
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--numpy-rounds", type=int, default=None, help="rounds of the NumPy pipeline (default: --rounds)")
    parser.add_argument("--jax-rounds", type=int, default=None, help="rounds of the JAX pipeline (default: --rounds)")
    parser.add_argument("--jax-variants", action="store_true",
                        help="also time the JAX pipeline with one jitted call per round (jax-round)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--passes", action="store_true", help="also time pass A and pass B separately")
    parser.add_argument("--floor", action="store_true", help="also time a sweep that only reads and writes the state")
    parser.add_argument("--parts", action="store_true", help="also time three of the round's loops at 4096 clients (L2)")
    parser.add_argument("--placement", action="store_true",
                        help="also time the Pipeline with its state staggered (as built), at one page offset, and as np.zeros put it")
    parser.add_argument("--budget", action="store_true",
                        help="--parts and --floor, the cost of a parallel region, the round without its transcendental "
                             "functions, and the floors against 15x numpy")
    args = parser.parse_args(argv)
    if args.budget:
        args.parts = args.floor = True
    n, rounds = args.clients, args.rounds
    numpy_rounds = args.numpy_rounds or rounds
    jax_rounds = args.jax_rounds or rounds
    contenders = all_contenders(args.jax_variants)
    if "jax" in contenders:
        import jax

        print(f"jax {jax.__version__}: the JAX pipeline agrees with the NumPy one on the same normals to "
              f"{check_jax_pipeline():.1e} (one scan per series) and {check_jax_pipeline(batch=False):.1e} (one call per round)")
    else:
        print("jax: not importable, no JAX contender (pip install jax: benchmark-only)")
    warm()
    load0 = os.getloadavg()
    compile_s = {}
    rates, per_round = compare(n, rounds, args.reps, numpy_rounds, contenders, jax_rounds, compile_s)
    load1 = os.getloadavg()
    print(f"{n} clients x {rounds} rounds (numpy: {numpy_rounds}, jax: {jax_rounds}), {args.reps} interleaved repetitions, "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after ({os.cpu_count()} cores)")
    if compile_s:
        print("jax compile (trace, lower, compile; before the timed runs, not in them): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in compile_s.items()))
    med = {name: statistics.median(v) for name, v in rates.items()}
    top = {name: max(v) for name, v in rates.items()}
    print(f"{'contender':<9} {'median client-steps/s':>22} {'ns/client-step':>15} {'vs today':>9} {'vs numpy':>9} "
          f"{'best run':>10} {'best vs today':>14}   all runs")
    for name, v in rates.items():
        print(f"{name:<9} {med[name]:22.4g} {1e9 / med[name]:15.2f} {med[name] / med['today']:9.2f} "
              f"{med[name] / med['numpy']:9.2f} {top[name]:10.3g} {top[name] / top['today']:14.2f}   "
              + " ".join(f"{r:.3g}" for r in v))
    print("median round (robust to preemption): " + ", ".join(
        f"{name} {r:.3g} client-steps/s ({1e9 / r:.2f} ns)" for name, r in per_round.items()))
    print("  ratios of median rounds: " + ", ".join(
        f"{name}/today {r / per_round['today']:.2f}, {name}/numpy {r / per_round['numpy']:.2f}"
        for name, r in per_round.items() if name.startswith(("fused", "round"))))
    if "jax" in med:
        for label, rate in (("whole runs (medians)", med), ("median rounds", per_round)):
            best = max((k for k in rate if k == "numpy" or k.startswith("jax")), key=rate.get)
            print(f"  jax ratios, {label}: fused-2/jax {rate['fused-2'] / rate['jax']:.2f}, fused-1/jax "
                  f"{rate['fused-1'] / rate['jax']:.2f}, round-2/jax {rate['round-2'] / rate['jax']:.2f}, round-1/jax "
                  f"{rate['round-1'] / rate['jax']:.2f}, jax/numpy {rate['jax'] / rate['numpy']:.2f}"
                  + "".join(f", {v}/jax {rate[v] / rate['jax']:.2f}" for v in JAX_CONTENDERS[1:] + JAX_VARIANTS if v in rate)
                  + f"; best peer: {best} (fused-2/{best} {rate['fused-2'] / rate[best]:.2f}, "
                  f"fused-1/{best} {rate['fused-1'] / rate[best]:.2f})")
    for kind in ("round", "fused"):
        best = max(med[f"{kind}-1"], med[f"{kind}-2"])
        print(f"{kind} (best of 1 and 2 threads) / today: {best / med['today']:.2f}x; / numpy: {best / med['numpy']:.2f}x; "
              f"2 threads: {med[f'{kind}-2']:.3g} client-steps/s = {med[f'{kind}-2'] / 1e8:.2f} of 1e8")
    if args.passes:
        for threads in (1, 2):
            ta, tb, tn = time_passes(n, min(rounds, 200), threads)
            total = ta + tb
            print(f"fused-{threads} per round: pass A {ta * 1e3:.3f} ms ({1e9 * ta / n:.2f} ns/client, {100 * ta / total:.0f}%), "
                  f"pass B {tb * 1e3:.3f} ms ({1e9 * tb / n:.2f} ns/client, {100 * tb / total:.0f}%); "
                  f"normals alone (1 thread) {1e9 * tn / n:.2f} ns/client")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.parts:
        parts = time_parts()
        scaling = two_thread_scaling()
        print("one thread, 4096 clients (in L2), ns per client: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        print(f"two threads on pure arithmetic (the exp loop in L1): {scaling:.2f}x one thread")
    if args.placement:
        for n_place, threads, place_rounds in ((n, 1, min(rounds, 100)), (n, 2, min(rounds, 200)), (131072, 1, 100),
                                               (131072, 2, 200)):
            res = time_placement(n_place, threads, place_rounds)
            base = res["staggered"]
            print(f"placement, {n_place} clients, {threads} thread(s): staggered {base:.2f} ns/client-step; all at one page "
                  f"offset {res['one page offset']:.2f} ({base / res['one page offset']:.2f}x); as np.zeros put them "
                  f"{res['np.zeros']:.2f} ({base / res['np.zeros']:.2f}x; offsets {res['np.zeros offsets']})")
    floors = {}
    if args.floor:
        for threads in (1, 2):
            sec = floors[threads] = state_traffic_floor(n, threads)
            best = med[f"fused-{threads}"]
            print(f"state traffic floor, {threads} thread(s): {1e9 * sec / n:.2f} ns/client "
                  f"({(2 * STATE_ROWS - 1) * 8 * n / sec / 1e9:.0f} GB/s); fused-{threads} takes {1e9 / best:.2f} ns, "
                  f"{1e9 / best / (1e9 * sec / n):.1f}x the floor; 15x numpy would need {1e9 / med['numpy'] / 15:.2f} ns")
    if args.budget:
        # Lower bounds of a two-thread round, each measured above in this run: the region's cost (it cannot
        # overlap the second thread's half), then the larger of the state traffic and the three loops' arithmetic
        # over the two-thread speed-up (the round's other loops, errors, records, move, mixture, left out).
        region = region_seconds(0.0)  # run's regions follow each other after the merges (microseconds)
        asleep = region_seconds(300e-6)
        arithmetic = sum(parts.values()) / scaling
        traffic = 1e9 * floors[2] / n
        bound = 1e9 * region / n + max(traffic, arithmetic)
        need = 1e9 / med["numpy"] / 15
        whole = 1e9 * round_in_l2_seconds()
        whole_bound = whole / scaling + 1e9 * region / n
        print(f"budget, 2 threads, {n} clients: 15x numpy needs <= {need:.2f} ns/client-step; lower bounds: "
              f"parallel region {1e6 * region:.1f} us = {1e9 * region / n:.2f} ns (after 300 us asleep: {1e6 * asleep:.1f} us), "
              f"state traffic {traffic:.2f} ns, arithmetic of exp + normals + NLMS {arithmetic:.2f} ns; "
              f"region + max(traffic, arithmetic) = {bound:.2f} ns "
              f"({bound / need:.2f}x the budget); fused-2 takes {1e9 / med['fused-2']:.2f} ns")
        print(f"  the whole round in L2 (4096 clients, 1 thread): {whole:.2f} ns/client-step; over the two-thread "
              f"speed-up, plus the region: {whole_bound:.2f} ns ({whole_bound / need:.2f}x the budget)")
        for n_probe, threads, probe_rounds in ((4096, 1, 3000), (n, 2, min(rounds, 300))):
            real, free = time_probe(n_probe, threads, probe_rounds)
            print(f"  without exp and the normals' log, sqrt, sin, cos ({n_probe} clients, {threads} thread(s)): "
                  f"{free:.2f} against {real:.2f} ns/client-step ({free / real:.2f}x)"
                  + (f"; fused-2 at that ratio: {free / real * 1e9 / med['fused-2']:.2f} ns "
                     f"({free / real * 1e9 / med['fused-2'] / need:.2f}x the budget)" if threads == 2 else ""))


# --------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def warmed():
    warm()


def test_fused_beats_today_and_numpy(warmed):
    """Guard by ratios measured in this run, at 10^4 clients x 100 rounds (seconds)."""
    rates, _ = compare(10_000, 100, 3, 100)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print({k: f"{v:.3g}" for k, v in med.items()})
    assert med["round-1"] > 1.5 * med["today"], med
    # At 10^4 clients the NumPy contender (p kept as weights, BLAS on one thread, argmax J) is 3.3-3.4x slower than
    # round-1 and 3.8x slower than fused-1 (2026-11-29, four runs). This asserted 4.0x, written against the
    # log-weight contender; it failed since that contender was made honest, unnoticed (bench only, not in CI).
    assert med["round-1"] > 2.5 * med["numpy"], med
    assert med["fused-1"] > 2.5 * med["numpy"], med


@pytest.mark.parametrize("batch", [True, False], ids=["scan", "per-round"])
def test_jax_pipeline_agrees_with_numpy(batch):
    """The JAX contender computes what the NumPy one computes, on the same normals (to 1e-10), log branch included."""
    if not peers.have_jax():
        pytest.skip("JAX is not installed (pip install jax: benchmark-only)")
    assert check_jax_pipeline(batch=batch) <= peers.TOLERANCE


def test_probe_kernel_fits_and_takes_the_usual_paths():
    """The probe's edits still fit the kernel, and its rounds stay valid (every signal valid, finite weights)."""
    pipe = Fused(256, 1, batch=True).pipe
    pipe._kern = probe_kernel()
    out = pipe.run(make_stream("logistic", 20, seed=0)[:, None])
    assert np.isfinite(out).all() and pipe.n_valid_signals == 256 and np.isfinite(pipe.weights).all()


if __name__ == "__main__":
    main()
