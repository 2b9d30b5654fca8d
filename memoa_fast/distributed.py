"""Populations sharded on a Dask cluster (``dask.distributed``).

A :class:`DaskPopulation` splits its N agents into shards of whole
``CHUNK``-agent blocks. Each shard lives on one worker for the whole run, as
a Dask actor holding its states, costs, signal buffer, server log-weights
and (optionally) its own signal source; the compiled kernels step it in
place. Per step the client sends each shard a handful of scalars and the two
mean fields (O(d) numbers) and gathers per-shard partial sums (sums of states
and of finite signals, counts, the worst client, log-sum-exp pieces): agent
arrays never cross the network unless you ask for them (:attr:`states`,
:attr:`costs`, a checkpoint) or pass the signals from the client.

The API is :class:`~memoa_fast.Population`'s (``step``, ``run``, ``states``,
``costs``, ``regret``, ``worst_agent``, ``mean_state``, ``mean_signal``,
``state_dict``/``load_state_dict``), and :class:`DaskServer` is
:class:`~memoa_fast.Server`'s with its weights sharded beside the states.
:func:`make_population` picks the engine from one argument, ``client``.

Exactness. The kernels reduce over fixed chunks of ``CHUNK`` agents and merge
the chunk partials serially in chunk order; shard boundaries here are
multiples of ``CHUNK``. With ``exact=True`` the client gathers one partial
row per chunk and merges them in the same order, so a sharded run is bitwise
the single-process one (``(2d + 1) N / CHUNK`` numbers per step, 0.02 % of
the states). By default each shard merges its own chunks and sends one row
(``(2d + 1)`` numbers per shard, whatever N): sums then round differently in
the last bit, and results agree with the single-process run to about
``1e-15`` relative (the tests require ``1e-12``).

Signals generated on the workers. A signal source is made on each worker by
a picklable factory ``factory(lo, hi, seed)`` for the agents ``[lo, hi)``; it
must reproduce the slice ``[lo, hi)`` of the full population's source, so
that results do not depend on the sharding. It has

- ``next() -> ndarray (hi - lo, d)``: the signals of the step about to be
  taken (valid until the next call);
- ``observe(y)`` (optional): the newly revealed target, sent by
  :meth:`DaskPopulation.observe` (O(d) numbers);
- ``state_dict()`` / ``load_state_dict(state)`` (optional, for checkpoints):
  ``{"agents": {name: array (hi - lo, ...)}, "shared": {name: array}}``; per-agent
  arrays are concatenated across shards in a checkpoint and re-split on
  restore, shared ones must agree across shards.

:class:`NoisyLastValueSignals` is such a source.

Faults. A shard whose worker is lost (or that does not answer within
``timeout``) raises :class:`ShardLostError` naming the shard, its agents, its
worker, the step, and the last good checkpoint; the population then refuses
to step until :meth:`DaskPopulation.restore` rebuilds the shards on the live
workers (any number of them) from a checkpoint.
"""
from __future__ import annotations

import math
import os
import time
import uuid
import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from . import _backends
from ._validation import as_float_array, check_choice, check_int, check_real
from .game import Game
from .population import MeanFieldSummary, Population, _readonly, population_shape
from .kernels import CACHE, CHUNK, FASTMATH, padded, work_shape
from .server import _RULE_CODES, RULES

# Private pieces of the Numba kernels, on purpose:
# - the client merges the shards' chunk rows with the kernels' own merge
#   functions, so that the divisions and exponentials round as in a
#   single-process run (the kernels compile with 'arcp', so m = sum/N is not
#   the correctly rounded quotient a NumPy division would give);
# - the sharded mixture needs the global log-sum-exp between its two passes,
#   so a shard drives the chunk-level reweighting itself (the public
#   ``mixture_update`` normalises with a local one), and fixed share spreads
#   alpha over the whole population (``mixture_share`` with N, not the shard size).
#   Jitted code that calls into _numba lives in _numba: Numba's cache checks
#   only the caller's file, so a driver here would keep stale inlined kernels.
from .kernels._numba import (
    _log_sum_exp_merge,
    _mean_field_merge,
    _predict_merge,
    _Threads,
    mixture_reweight,
    mixture_share,
)

__all__ = [
    "DaskPopulation",
    "DaskServer",
    "ForecasterSignals",
    "NoisyLastValueSignals",
    "ShardLostError",
    "ShardedStates",
    "make_population",
    "shard_bounds",
]

_jit = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy", boundscheck=False)

DEFAULT_TIMEOUT = 600.0


class ShardLostError(RuntimeError):
    """A shard's worker was lost (or stopped answering); the population must be restored.

    Attributes
    ----------
    shard : int
        Index of the (first) lost shard.
    lo, hi : int
        Its agents, ``[lo, hi)``.
    worker : str
        Address of the worker that held it.
    step : int
        The population's step counter when the loss was seen.
    checkpoint : str or None
        The last checkpoint this population saved or restored, if any.
    """

    def __init__(self, message, *, shard, lo, hi, worker, step, checkpoint):
        super().__init__(message)
        self.shard, self.lo, self.hi, self.worker = shard, lo, hi, worker
        self.step, self.checkpoint = step, checkpoint


# =========================================================================== sharding
def shard_bounds(n_agents: int, n_shards: int) -> list[tuple[int, int]]:
    """Split ``[0, n_agents)`` into ``n_shards`` ranges of whole ``CHUNK``-agent blocks.

    Blocks are spread as evenly as possible (shard sizes differ by at most one
    block); every boundary but the last is a multiple of ``CHUNK``, which keeps
    each shard's chunk partials identical to the single-process ones.
    """
    n_agents = check_int("n_agents", n_agents, low=1)
    n_chunks = -(-n_agents // CHUNK)
    n_shards = check_int("n_shards", n_shards, low=1)
    if n_shards > n_chunks:
        raise ValueError(
            f"n_shards={n_shards} is more than the {n_chunks} blocks of {CHUNK} agents in a population of "
            f"{n_agents}: a shard holds whole blocks, so use n_shards <= {n_chunks}"
        )
    edges = [(k * n_chunks) // n_shards for k in range(n_shards + 1)]
    return [(a * CHUNK, min(b * CHUNK, n_agents)) for a, b in zip(edges[:-1], edges[1:])]


# =========================================================================== shard-side kernels
@njit(**_jit)
def _fold_rows(rows, out):
    """``out[j] = (((0 + rows[0, j]) + rows[1, j]) + ...)``: the kernels' serial chunk merge."""
    for j in range(rows.shape[1]):
        out[j] = 0.0
    for c in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            out[j] += rows[c, j]


@njit(**_jit)
def _lse_pieces(tops, scaled):
    """Merge log-sum-exp pieces ``(top_c, sum_i exp(v_i - top_c))`` in order, as the kernel does.

    Returns ``(top, total)`` with ``log sum_i exp(v_i) = top + log(total)``.
    """
    top = -np.inf
    for c in range(tops.shape[0]):
        top = max(top, tops[c])
    total = 0.0
    for c in range(tops.shape[0]):
        total += scaled[c] * math.exp(tops[c] - top)
    return top, total


# =========================================================================== a worker-side signal source
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0


@njit(**_jit)
def _mix64(z):
    """SplitMix64's finaliser: a bijective hash of a 64-bit word."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(**_jit)
def _seed_keys(seed):
    """Two independent 64-bit keys from a seed (wrapping arithmetic, in Numba)."""
    key = _mix64(np.uint64(seed))
    return key, _mix64(key + _GOLDEN)


@njit(**_jit)
def _unit(h):
    """A uniform in [0, 1) from the top 53 bits of ``h``."""
    return np.float64(h >> _S11) * _TWO_M53


@njit(**_jit)
def _log_uniform_scales(lo, hi, key, log_low, log_high, out):
    key = np.uint64(key)  # a key below 2**63 arrives as int64, and int64 ^ uint64 would be float64
    for i in range(lo, hi):
        u = _unit(_mix64(key + _GOLDEN * np.uint64(i + 1)))
        out[i - lo] = math.exp(log_low + u * (log_high - log_low))


@njit(**_jit)
def _noisy_row(r, lo, kt, y, sigma, out):
    """``out[r, j] = y[j] + sigma[r] * z(key, lo + r, t, j)``, a counter-based Box-Muller normal ``z``."""
    d = out.shape[1]
    i = lo + r
    for j in range(d):
        h = _mix64(kt + _GOLDEN * np.uint64(i * d + j + 1))
        u1 = 1.0 - _unit(h)  # in (0, 1]
        u2 = _unit(_mix64(h + _GOLDEN))
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        out[r, j] = y[j] + sigma[r] * z


@njit(**_jit)
def _noisy_last_value(lo, key, t, y, sigma, out):
    key = np.uint64(key)  # a key below 2**63 arrives as int64, and int64 ^ uint64 would be float64
    kt = _mix64(key ^ (_GOLDEN * np.uint64(t + 1)))
    for r in range(out.shape[0]):
        _noisy_row(r, lo, kt, y, sigma, out)


@njit(parallel=True, **_jit)
def _noisy_last_value_parallel(lo, key, t, y, sigma, out):
    key = np.uint64(key)
    kt = _mix64(key ^ (_GOLDEN * np.uint64(t + 1)))
    for r in prange(out.shape[0]):
        _noisy_row(r, lo, kt, y, sigma, out)


class NoisyLastValueSignals:
    """Clients that forecast ``y(t+1)`` by their own noisy view of ``y(t)``.

    Client i observes ``y(t) + sigma_i z_i(t)``, with ``sigma_i`` log-uniform
    in ``[low, high]`` and ``z_i(t)`` standard normal, and publishes it as its
    signal: the martingale forecast of MODEL.md's planning model. Draws come
    from a counter-based hash of ``(seed, i, t, coordinate)``, so the source
    for clients ``[lo, hi)`` reproduces that slice of the full population's
    source exactly, whatever the sharding, at a few ns per draw.

    Parameters
    ----------
    lo, hi : int
        The clients ``[lo, hi)`` this object serves.
    seed : int
        Seed in ``[0, 2**63)``.
    dim : int, default 1
        Dimension d of the stream.
    low, high : float, default 0.02, 1.0
        Range of the noise scales.
    threads : int, default 1
        Threads drawing the signals (the draws do not depend on it).

    Examples
    --------
    Worker-side signals for a sharded population (a factory called on each
    worker as ``factory(lo, hi, seed)``)::

        factory = functools.partial(NoisyLastValueSignals, dim=2)
        pop = DaskPopulation(game, 10**7, 2, client=client, signals=factory, seed=7)
    """

    def __init__(
        self, lo: int, hi: int, seed: int = 0, *, dim: int = 1, low: float = 0.02, high: float = 1.0, threads: int = 1
    ):
        self.lo = check_int("lo", lo, low=0)
        self.hi = check_int("hi", hi, low=self.lo + 1)
        self.seed = check_int("seed", seed, low=0)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed!r}")
        self.dim = check_int("dim", dim, low=1)
        self.threads = check_int("threads", threads, low=1)
        low = check_real("low", low, low=0.0, low_open=True)
        high = check_real("high", high, low=low)
        key, scale_key = _seed_keys(self.seed)
        self._key = np.uint64(key)
        self.sigma = np.empty(self.hi - self.lo)
        _log_uniform_scales(self.lo, self.hi, np.uint64(scale_key), math.log(low), math.log(high), self.sigma)
        self._out = np.empty((self.hi - self.lo, self.dim))
        self._y = np.zeros(self.dim)
        self.t = 0

    def next(self) -> np.ndarray:
        """The signals of this round, shape (hi - lo, d); the buffer is reused by the next call."""
        args = (self.lo, self._key, self.t, self._y, self.sigma, self._out)
        if self.threads == 1:
            _noisy_last_value(*args)
        else:
            with _Threads(self.threads):
                _noisy_last_value_parallel(*args)
        self.t += 1
        return self._out

    def observe(self, y) -> None:
        """The stream's newest value ``y``, shape (d,)."""
        self._y[...] = as_float_array("y", y, (self.dim,))

    def state_dict(self) -> dict:
        return {"agents": {}, "shared": {"t": np.array(self.t, dtype=np.int64), "y": self._y.copy()}}

    def load_state_dict(self, state: dict) -> None:
        shared = state["shared"]
        y = as_float_array("source state 'y'", shared["y"], (self.dim,))
        t = check_int("source state 't'", int(shared["t"]), low=0)
        self._y[...] = y
        self.t = t


class ForecasterSignals:
    """Worker-side signals from :class:`~memoa_fast.forecasters.ClientForecasters` (MODEL.md section 6).

    The clients ``[lo, hi)`` of a time-series population: :meth:`observe`
    feeds them the stream's value ``y(t)`` (each adds its own noise, learns
    and forecasts ``y(t+1)``), :meth:`next` returns those forecasts. The
    forecasters draw their noise per block of 4096 clients, addressed by
    position, so a shard reproduces its slice of the full population exactly.

    Parameters
    ----------
    lo, hi : int
        The clients served; ``lo`` a multiple of 4096 (shards always are).
    seed : int
        Seed of every draw.
    dim : int, default 1
        Dimension d of the stream.
    threads : int, default 1
        Threads of the forecaster kernel on the worker.
    **kwargs
        ``lags``, ``noise_range``, ``mu``, ``backend``: as for ``ClientForecasters``.

    Examples
    --------
    ::

        factory = functools.partial(ForecasterSignals, dim=1, lags=2)
        pop = DaskPopulation(game, 10**7, client=client, signals=factory, seed=1)
        for t in range(T - 1):
            pop.observe(y[t])          # d numbers to each shard
            x = pop.step()             # the shards forecast, then step
            yhat = server.predict(x)
            server.update(x, y[t + 1])
    """

    def __init__(self, lo: int, hi: int, seed: int = 0, *, dim: int = 1, threads: int = 1, **kwargs):
        from .forecasters import ClientForecasters

        self.forecasters = ClientForecasters(hi - lo, dim, seed=seed, first_client=lo, threads=threads, **kwargs)

    def observe(self, y) -> None:
        self.forecasters.observe(y)

    def next(self) -> np.ndarray:
        return self.forecasters.signals

    # The forecasters' state (NLMS weights, lag buffers, last forecasts, round
    # counter, last value); the noise is a function of (seed, client, round).
    def state_dict(self) -> dict:
        return self.forecasters.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.forecasters.load_state_dict(state)


# =========================================================================== the shard (a Dask actor)
class _Shard:
    """Agents ``[lo, hi)`` of a population, resident on one worker.

    Driven by :meth:`run`, which executes a list of ``(op, args)`` in order
    and returns the last op's result: the client queues ops that need no
    answer and sends them with the next one that does (one message per
    round trip).
    """

    _OPS = frozenset(
        ["partials", "policy", "observe", "predict", "reweight", "share", "add_server", "drop_server", "load",
         "gather", "worst", "state_sums", "info"]
    )

    def __init__(self, index, lo, hi, n_agents, dim, threads, parallel_threshold, exact, factory, seed, initial_states):
        self.index, self.lo, self.hi, self.n_agents, self.dim, self.exact = index, lo, hi, n_agents, dim, exact
        n = hi - lo
        if threads is None:
            try:
                from distributed import get_worker

                worker = get_worker()
                threads = max(1, min(getattr(worker, "state", worker).nthreads, os.cpu_count() or 1))
            except (ImportError, ValueError):
                threads = 1
        self.threads, self._threads_used = _backends.resolve_threads(threads, n, parallel_threshold)
        self.kern = _backends.load("numba")
        self.x = np.zeros((n, dim))
        if initial_states is not None:
            self.x[...] = initial_states
        self.J = np.zeros(n)
        self.s = np.zeros((n, dim))
        self.work = np.zeros(work_shape(n, dim))
        self._mx, self._ms = np.zeros(dim), np.zeros(dim)
        self.log_p: dict[str, np.ndarray] = {}
        self.source = None if factory is None else factory(lo, hi, seed)

    # ------------------------------------------------------------------ driver
    def run(self, ops):
        result = None
        for name, args in ops:
            if name not in self._OPS:
                raise ValueError(f"unknown shard op {name!r}")
            result = getattr(self, "_" + name)(*args)
        return result

    # ------------------------------------------------------------------ population
    def _partials(self, signals):
        """Take this step's signals and return the mean-field partial rows ``[sum x, sum s, count]``."""
        n, d = self.x.shape
        if signals is None:
            if self.source is None:
                raise ValueError("this population has no worker-side signal source: pass signals to step()")
            signals = self.source.next()
            signals = as_float_array(f"signals of shard {self.index} (agents [{self.lo}, {self.hi}))", signals, (n, d), allow_nonfinite=True)
        self.s[...] = signals
        self.kern.mean_field(self.x, self.s, self.J, self.work, self._mx, self._ms, self._threads_used)
        dp = padded(d)
        rows = np.empty((self.work.shape[0], 2 * d + 1))
        rows[:, :d] = self.work[:, :d]
        rows[:, d : 2 * d] = self.work[:, dp : dp + d]
        rows[:, 2 * d] = self.work[:, 2 * dp]
        return self._rows_or_fold(rows)

    def _rows_or_fold(self, rows):
        if self.exact:
            return rows
        out = np.empty(rows.shape[1])
        _fold_rows(rows, out)
        return out[None, :]

    def _policy(self, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x, discount):
        # Arrays arrive as read-only buffers; writable copies keep one compiled signature.
        mean_s, mean_x = np.array(mean_s, dtype=np.float64), np.array(mean_x, dtype=np.float64)
        self.kern.policy_update(
            self.x, self.s, self.J, gain, c_signal, c_signal_mean, c_state_mean, mean_s, q, kappa, r, mean_x,
            discount, self._threads_used,
        )

    def _observe(self, y):
        if self.source is not None and hasattr(self.source, "observe"):
            self.source.observe(y)

    def _worst(self):
        i = int(np.argmax(self.J))
        return float(self.J[i]), self.lo + i

    def _state_sums(self):
        return self.x.sum(axis=0)

    # ------------------------------------------------------------------ server
    def _add_server(self, sid):
        self.log_p[sid] = np.full(self.hi - self.lo, -math.log(self.n_agents))

    def _drop_server(self, sid):
        self.log_p.pop(sid, None)

    def _predict(self, sid):
        out = np.empty(self.dim)
        self.kern.mixture_predict(self.log_p[sid], self.x, self.work, out, self._threads_used)
        return self._rows_or_fold(self.work[:, : self.dim].copy())

    def _reweight(self, sid, y, yhat, rule, eta):
        """Gradient step on the log-weights; returns log-sum-exp pieces ``(top, scaled)`` per chunk or shard."""
        y, yhat = np.array(y, dtype=np.float64), np.array(yhat, dtype=np.float64)
        mixture_reweight(self.log_p[sid], self.x, y, yhat, rule, eta, self.work, self._threads_used)
        col = 2 * padded(self.dim)
        tops, scaled = self.work[:, col + 1].copy(), self.work[:, col + 2].copy()
        if self.exact:
            return tops, scaled
        top, total = _lse_pieces(tops, scaled)
        return np.array([top]), np.array([total])

    def _share(self, sid, lse, alpha):
        mixture_share(self.log_p[sid], lse, alpha, self.n_agents, self._threads_used)

    # ------------------------------------------------------------------ bulk state
    def _load(self, states, costs, log_p, source_state):
        """Replace everything at once (all inputs were checked by the client)."""
        if states is not None:
            self.x[...] = states
        if costs is not None:
            self.J[...] = costs
        for sid, value in log_p.items():
            if value is None:
                self._add_server(sid)
            else:
                self.log_p[sid] = np.array(value, dtype=np.float64)
        if source_state is not None:
            self.source.load_state_dict(source_state)

    def _gather(self, what, sid=None):
        if what == "states":
            return self.x
        if what == "costs":
            return self.J
        if what == "log_p":
            return self.log_p[sid]
        if what == "source":
            if self.source is None or not hasattr(self.source, "state_dict"):
                return None
            return self.source.state_dict()
        raise ValueError(f"cannot gather {what!r}")

    def _info(self):
        return {"pid": os.getpid(), "lo": self.lo, "hi": self.hi, "threads": self._threads_used}


# =========================================================================== client side
@dataclass
class CommStats:
    """What the client exchanged with the shards: payload sizes (array bytes + 8 per scalar).

    ``bytes_sent`` counts the ops' arguments, ``bytes_received`` the results,
    ``round_trips`` the messages that waited for an answer from every shard.
    The wire adds Dask's framing (a few hundred bytes per message).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.round_trips = 0


def _payload_nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_payload_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_payload_nbytes(k) + _payload_nbytes(v) for k, v in obj.items())
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if obj is None:
        return 0
    return 8


class ShardedStates:
    """A handle on a :class:`DaskPopulation`'s states, which stay on the workers.

    What :meth:`DaskPopulation.step` returns (the live states, like
    :attr:`Population.states`). A :class:`DaskServer` mixes them where they
    are; ``np.asarray(handle)`` (or :meth:`gather`) copies them to the client.
    """

    def __init__(self, population: "DaskPopulation"):
        self.population = population

    @property
    def shape(self) -> tuple[int, int]:
        return (self.population.n_agents, self.population.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self):
        return np.dtype(np.float64)

    def __len__(self) -> int:
        return self.population.n_agents

    def gather(self) -> np.ndarray:
        """The states, copied to the client (N x d x 8 bytes)."""
        return self.population._gather_agents("states", (self.population.n_agents, self.population.dim))

    def __array__(self, dtype=None, copy=None):
        arr = self.gather()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"<ShardedStates shape={self.shape} on {self.population.n_shards} shards>"


def _default_client(client):
    try:
        from distributed import Client, get_client
    except ImportError as exc:  # pragma: no cover - exercised only without dask
        raise ImportError(
            "DaskPopulation needs dask.distributed: install memoa-fast with the 'dask' extra "
            "(pip install 'memoa-fast[dask]')"
        ) from exc
    if client is None:
        try:
            return get_client()
        except ValueError:
            raise ValueError(
                "no Dask client: pass client=dask.distributed.Client(...) (or create one first, it becomes the default)"
            ) from None
    if not isinstance(client, Client):
        raise TypeError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    return client


def _direct_client(client, timeout):
    """A client on ``client``'s scheduler that calls the workers directly."""
    from distributed import Client

    return Client(
        client.scheduler.address, direct_to_workers=True, security=client.security, set_as_default=False,
        timeout=timeout,
    )


class DaskPopulation(MeanFieldSummary):
    """N online agents sharded over the workers of a Dask cluster.

    Same model, API and results as :class:`~memoa_fast.Population` (see its
    Notes for the step); the states live on the workers.

    Parameters
    ----------
    game : Game
        Weights, gains and policy.
    n_agents : int, optional
        Number of agents N (taken from ``initial_states`` if given).
    dim : int, default 1
        State dimension d (taken from ``initial_states`` if given).
    client : dask.distributed.Client, optional
        The cluster to run on; default: the current default client.
    n_shards : int, optional
        Number of shards, each a whole number of ``CHUNK``-agent blocks placed
        round-robin on the workers; default: one per worker (at most one per block).
    initial_states : array_like, shape (N, d), optional
        ``x_i(0)``; zeros by default (then nothing of size N is sent).
    signals : callable, optional
        A picklable factory ``signals(lo, hi, seed)`` run on each worker to
        make the shard's signal source (see the module docstring); then
        ``step()`` takes no signals.
    seed : int, default 0
        Passed to the signal factory.
    threads : int, optional
        Kernel threads per shard; default: the worker's thread count.
    parallel_threshold : int, default 8192 (``memoa_fast._backends.PARALLEL_THRESHOLD``)
        Shards smaller than this run on one thread.
    exact : bool, default False
        Gather one partial row per chunk instead of per shard, which makes
        the run bitwise identical to the single-process Numba one at
        ``(2d + 1) N / CHUNK`` numbers per step instead of ``(2d + 1)`` per shard.
    timeout : float, default 600
        Seconds to wait for a shard's answer before declaring it lost.
    direct : bool, default True
        Talk to the shards' workers directly rather than through the
        scheduler (Dask's ``direct_to_workers``): when ``client`` does not
        already, the population opens its own client on the same scheduler
        (closed by :meth:`close`). About 30 % less latency per round trip on
        a LocalCluster, and agent arrays (client-side signals, gathers,
        checkpoints) do not transit the scheduler. Use False where the client
        cannot reach the workers.

    Notes
    -----
    One :meth:`step` is one round trip: the client sends each shard its
    signals (or nothing, with a source), gets back the partial rows
    ``[sum_i x_i, sum_i s_i, #finite s_i]``, merges them into ``m`` and
    ``sbar`` and queues the policy update (``gain``, four coefficients, the
    weights, ``m``, ``sbar``, ``gamma^t``), which travels with the next message.
    """

    backend = "numba"

    def __init__(
        self,
        game: Game,
        n_agents: int | None = None,
        dim: int | None = None,
        *,
        client=None,
        n_shards: int | None = None,
        initial_states=None,
        signals=None,
        seed: int = 0,
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
        exact: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        direct: bool = True,
    ):
        self.n_agents, self.dim = population_shape(game, n_agents, dim, initial_states)
        x0 = None
        if initial_states is not None:
            x0 = as_float_array("initial_states", initial_states, (self.n_agents, self.dim))
        if signals is not None and not callable(signals):
            raise TypeError(f"signals must be a factory signals(lo, hi, seed) returning a signal source, got {signals!r}")
        self.game = game
        self.signal_factory = signals
        self.seed = check_int("seed", seed, low=0)
        self.threads = None if threads is None else check_int("threads", threads, low=1)
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        if not isinstance(exact, bool):
            raise TypeError(f"exact must be True or False, got {exact!r}")
        self.exact = exact
        self.timeout = check_real("timeout", timeout, low=0.0, low_open=True)
        self.client = _default_client(client)
        self._own_client = None
        if direct and not self.client.direct_to_workers:
            self._own_client = _direct_client(self.client, self.timeout)
        self.comm = CommStats()
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step: int | None = None
        self._servers: "weakref.WeakValueDictionary[str, DaskServer]" = weakref.WeakValueDictionary()
        self._pending: list = []
        self._broken: str | None = None
        self._lost_shard: int | None = None
        self._handle = ShardedStates(self)
        self._mean_x = np.zeros(self.dim)
        self._mean_s = np.zeros(self.dim)
        self._n_finite = 0
        self.t = 0
        self._discount = 1.0
        self._version = 0
        self._actors: list = []
        try:
            self._build(n_shards, x0)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ shards
    def _workers(self) -> list[str]:
        workers = sorted(self._client.nthreads())
        if not workers:
            raise RuntimeError("the Dask cluster has no workers")
        return workers

    def _build(self, n_shards, x0) -> None:
        """(Re)create the shards on the live workers: zero costs, uniform weights, fresh sources."""
        workers = self._workers()
        n_chunks = -(-self.n_agents // CHUNK)
        n_shards = min(len(workers), n_chunks) if n_shards is None else check_int("n_shards", n_shards, low=1)
        bounds = shard_bounds(self.n_agents, n_shards)
        self._release_shards()
        futures = []
        for k, (lo, hi) in enumerate(bounds):
            worker = workers[k % len(workers)]
            futures.append(
                self._client.submit(
                    _Shard, k, lo, hi, self.n_agents, self.dim, self.threads, self.parallel_threshold, self.exact,
                    self.signal_factory, self.seed, None if x0 is None else x0[lo:hi],
                    actor=True, workers=[worker], allow_other_workers=False, pure=False,
                    key=f"memoa-shard-{k}-{uuid.uuid4().hex}",
                )
            )
        self.bounds, self.shard_workers = bounds, [workers[k % len(workers)] for k in range(len(bounds))]
        self._futures = futures
        try:
            # An actor handle binds to the current client when it is made: ours.
            with self._client.as_current():
                self._actors = [f.result(timeout=self.timeout) for f in futures]
        except Exception as exc:
            self._broken = f"shards could not be created: {exc}"
            raise
        self._broken = self._lost_shard = None
        self._pending = []
        for sid in list(self._servers):
            self._queue(("add_server", (sid,)))
        self._update_mean_state()

    @property
    def n_shards(self) -> int:
        return len(self.bounds)

    @property
    def _client(self):
        """The client that holds the shards: our direct one if we opened it."""
        return self.client if self._own_client is None else self._own_client

    def _release_shards(self) -> None:
        self._actors = []
        self._futures = []

    def close(self) -> None:
        """Release the shards (the workers drop their arrays) and our own client, if any. Safe to call twice."""
        self._release_shards()
        if self._own_client is not None:
            self._own_client.close(timeout=self.timeout)
            self._own_client = None
        self._broken = self._broken or "closed"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ messaging
    def _queue(self, op) -> None:
        """An op for every shard that needs no answer: it travels with the next message."""
        self._pending.append(op)

    def _call(self, op, per_shard_args=None) -> list:
        """Send the queued ops plus ``op`` to every shard and return each shard's answer, in shard order.

        ``per_shard_args[k]`` replaces ``op``'s arguments for shard k.
        """
        self._check_usable()
        ops, self._pending = self._pending, []
        messages = []
        for k in range(len(self._actors)):
            last = op if per_shard_args is None else (op[0], per_shard_args[k])
            messages.append(ops + [last])
        self.comm.bytes_sent += sum(_payload_nbytes(m) for m in messages)
        try:
            futures = [actor.run(msg) for actor, msg in zip(self._actors, messages)]
        except RuntimeError as exc:  # the proxy refuses calls once its worker is known lost
            self._lost(0, exc, find_lost=True)
        results, failure = [], None
        deadline = time.monotonic() + self.timeout
        for k, fut in enumerate(futures):
            try:
                results.append(fut.result(timeout=max(deadline - time.monotonic(), 0.001)))
            except BaseException as exc:  # noqa: BLE001 - every failure makes the shards inconsistent
                if failure is None:
                    failure = (k, exc)
                results.append(None)
        if failure is not None:
            k, exc = failure
            if _is_loss(exc, self.shard_workers[k] in self._workers_or_empty()):
                self._lost(k, exc)
            self._broken = f"shard {k} failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, Exception):
                lo, hi = self.bounds[k]
                exc.add_note(f"in shard {k} (agents [{lo}, {hi})) on worker {self.shard_workers[k]}, step {self.t}")
            raise exc
        self.comm.round_trips += 1
        self.comm.bytes_received += sum(_payload_nbytes(r) for r in results)
        return results

    def flush(self) -> None:
        """Send the queued ops now (they are sent with the next call anyway)."""
        if self._pending:
            self._call(("info", ()))

    def _check_usable(self) -> None:
        if self._lost_shard is not None:
            k = self._lost_shard
            lo, hi = self.bounds[k]
            raise ShardLostError(
                f"this DaskPopulation is unusable: {self._broken}; {self._resume_hint()}",
                shard=k, lo=lo, hi=hi, worker=self.shard_workers[k], step=self.t, checkpoint=self.last_checkpoint,
            )
        if self._broken is not None:
            raise RuntimeError(f"this DaskPopulation is unusable ({self._broken}); {self._resume_hint()}")

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was saved by this population, so the run must start over"
        return (
            f"the last good checkpoint is {self.last_checkpoint!r} (step {self.last_checkpoint_step}): "
            f"resume with population.restore({self.last_checkpoint!r}, server=...)"
        )

    def _lost(self, k, exc, find_lost=False):
        if find_lost:
            alive = set(self._workers_or_empty())
            k = next((i for i, w in enumerate(self.shard_workers) if w not in alive), k)
        lo, hi = self.bounds[k]
        worker = self.shard_workers[k]
        self._broken = f"shard {k} (agents [{lo}, {hi})) on worker {worker} was lost at step {self.t}"
        self._lost_shard = k
        message = (
            f"shard {k} (agents [{lo}, {hi})) on worker {worker} was lost at step {self.t} "
            f"({type(exc).__name__}: {exc}); {self._resume_hint()}"
        )
        raise ShardLostError(
            message, shard=k, lo=lo, hi=hi, worker=worker, step=self.t, checkpoint=self.last_checkpoint
        ) from exc

    def _workers_or_empty(self) -> list[str]:
        try:
            return list(self._client.nthreads())
        except Exception:  # noqa: BLE001 - only used to improve an error message
            return []

    # ------------------------------------------------------------------ state
    def reset(self, initial_states=None) -> None:
        """Back to round 0: states to ``initial_states`` (zeros if None), costs to 0 (servers are left alone)."""
        if initial_states is None:
            x0 = np.zeros((self.n_agents, self.dim))
        else:
            x0 = as_float_array("initial_states", initial_states, (self.n_agents, self.dim))
        self._load_all(x0, np.zeros(self.n_agents))
        self._mean_s[...] = 0.0
        self._n_finite = 0
        self.t = 0
        self._discount = 1.0

    def _load_all(self, states, costs, source=None) -> None:
        """Scatter full arrays (checked by the caller) to the shards and recompute ``m``."""
        args = [
            (states[lo:hi], costs[lo:hi], {}, None if source is None else _slice_source(source, lo, hi))
            for lo, hi in self.bounds
        ]
        self._version += 1
        self._call(("load", None), per_shard_args=args)
        self._update_mean_state()

    def _update_mean_state(self) -> None:
        total = np.zeros(self.dim)
        for s in self._call(("state_sums", ())):
            total += s
        self._mean_x[...] = total / self.n_agents

    @property
    def states(self) -> np.ndarray:
        """``x(t)``, shape (N, d), gathered from the workers (a read-only copy: N x d x 8 bytes cross the network)."""
        return _readonly(self._handle.gather())

    @property
    def resident_states(self) -> ShardedStates:
        """The live states as a handle that stays on the workers (what :meth:`step` returns)."""
        return self._handle

    @property
    def costs(self) -> np.ndarray:
        """Discounted online costs ``J_i``, gathered (a read-only copy)."""
        return _readonly(self._gather_agents("costs", (self.n_agents,)))

    def _worst(self) -> tuple[float, int]:
        best, arg = -np.inf, -1
        for value, index in self._call(("worst", ())):
            if value > best:
                best, arg = value, index
        return best, arg

    @property
    def worst_agent(self) -> int:
        """Index of the agent with the largest online cost (first one on ties); 2 numbers per shard."""
        return self._worst()[1]

    @property
    def regret(self) -> float:
        """Under-performer regret ``max_i J_i``: the worst client's online cost; 2 numbers per shard."""
        return float(self._worst()[0])

    def _gather_agents(self, what, shape, sid=None) -> np.ndarray:
        out = np.empty(shape)
        for (lo, hi), part in zip(self.bounds, self._call(("gather", (what, sid)))):
            out[lo:hi] = part
        return out

    # ------------------------------------------------------------------ step
    def step(self, signals=None) -> ShardedStates:
        """Advance every agent one round.

        Parameters
        ----------
        signals : array_like, shape (N, d), optional
            ``s_i(t)`` from the client (N x d numbers are then sent); None
            when the shards generate them (``signals=`` factory at construction).

        Returns
        -------
        ShardedStates
            The live states, a handle on the workers.
        """
        self._check_usable()
        if signals is None:
            if self.signal_factory is None:
                raise ValueError(
                    "step() without signals needs a worker-side signal source: create the population with "
                    "signals=factory (called on each worker as factory(lo, hi, seed)), or pass signals of shape (N, d)"
                )
            rows = self._call(("partials", (None,)))
        else:
            s = as_float_array("signals", signals, (self.n_agents, self.dim), allow_nonfinite=True)
            rows = self._call(("partials", None), per_shard_args=[(s[lo:hi],) for lo, hi in self.bounds])
        rows = np.concatenate(rows)
        d, dp = self.dim, padded(self.dim)
        work = np.zeros(work_shape(rows.shape[0] * CHUNK, d))
        work[:, :d] = rows[:, :d]
        work[:, dp : dp + d] = rows[:, d : 2 * d]
        work[:, 2 * dp] = rows[:, 2 * d]
        work[:, 2 * dp + 1] = -np.inf
        self._n_finite, _, _ = _mean_field_merge(work, self.n_agents, d, self._mean_x, self._mean_s)
        g = self.game
        coef = g.coefficients
        self._queue((
            "policy",
            (coef.gain, coef.signal, coef.signal_mean, coef.state_mean, self._mean_s.copy(), g.q, g.kappa, g.r,
             self._mean_x.copy(), self._discount),
        ))
        self.t += 1
        self._discount *= g.gamma
        self._version += 1
        return self._handle

    def observe(self, target) -> None:
        """Give the worker-side signal sources the stream's newest value (d numbers per shard, sent with the next message)."""
        y = as_float_array("target", target, (self.dim,))
        self._check_usable()
        self._queue(("observe", (y.copy(),)))

    def run(self, signals=None, *, steps: int | None = None) -> ShardedStates:
        """Step through ``signals`` of shape (T, N, d), or ``steps`` times on worker-side signals."""
        if signals is not None:
            signals = np.asarray(signals)
            if signals.ndim not in (2, 3):
                raise ValueError(f"signals must have shape (T, n_agents, dim), got shape {signals.shape}")
            for s in signals:
                self.step(s)
        else:
            for _ in range(check_int("steps", steps if steps is not None else 0, low=0)):
                self.step()
        return self._handle

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: :meth:`Population.state_dict`'s keys, gathered.

        With a worker-side source that has ``state_dict``, also ``source``:
        ``{"agents": {...}, "shared": {...}}`` concatenated over the shards.
        """
        state = {
            "states": self._gather_agents("states", (self.n_agents, self.dim)),
            "costs": self._gather_agents("costs", (self.n_agents,)),
            "mean_state": self._mean_x.copy(),
            "mean_signal": self._mean_s.copy(),
            "t": self.t,
            "discount": self._discount,
            "n_finite_signals": self._n_finite,
            "game": self.game.to_dict(),
        }
        source = self._gather_source()
        if source is not None:
            state["source"] = source
        return state

    def _gather_source(self):
        parts = self._call(("gather", ("source", None)))
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise RuntimeError("some shards' signal sources have no state_dict(): cannot checkpoint them")
        agents = {name: np.concatenate([p["agents"][name] for p in parts]) for name in parts[0]["agents"]}
        shared = {name: np.asarray(v) for name, v in parts[0]["shared"].items()}
        for k, p in enumerate(parts[1:], start=1):
            for name, v in shared.items():
                if not np.array_equal(np.asarray(p["shared"][name]), v):
                    raise RuntimeError(f"signal sources disagree on shared state {name!r} (shard 0 vs shard {k})")
        return {"agents": agents, "shared": shared}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (of this class or of :class:`Population`); checks everything first."""
        checked = _check_population_state(state, self.game, self.n_agents, self.dim)
        source = state.get("source")
        if source is not None:
            source = _check_source_state(source, self.n_agents)
            if self.signal_factory is None:
                raise ValueError("state has a signal source's state but this population has no signals= factory")
        self._load_all(checked["states"], checked["costs"], source)
        self._mean_x[...] = checked["mean_state"]
        self._mean_s[...] = checked["mean_signal"]
        self._n_finite = checked["n_finite_signals"]
        self.t = checked["t"]
        self._discount = checked["discount"]

    def restore(self, path, server: "DaskServer | None" = None, *, n_shards: int | None = None):
        """Rebuild the shards on the live workers and load the checkpoint at ``path``.

        This is how a run resumes after :class:`ShardLostError`, on any number
        of workers (``n_shards`` defaults to one per live worker). The
        checkpoint is read and checked completely before anything changes.
        Servers of this population other than ``server`` restart from uniform
        weights. Returns the :class:`~memoa_fast.checkpoint.Checkpoint`.
        """
        from .checkpoint import load_checkpoint, restore_checkpoint

        ckpt = load_checkpoint(path)
        ckpt.check_compatible(self, server)
        self._build(n_shards, None)
        return restore_checkpoint(ckpt, self, server)

    def save(self, path, server: "DaskServer | None" = None):
        """Write a checkpoint of this population (and ``server``) atomically; see :func:`~memoa_fast.checkpoint.save_checkpoint`."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(path, self, server)

    def _record_checkpoint(self, path, t) -> None:
        self.last_checkpoint, self.last_checkpoint_step = str(path), int(t)

    def info(self) -> list[dict]:
        """Per shard: agents ``[lo, hi)``, worker address, process id and kernel threads."""
        return [dict(shard=k, worker=w, **i) for k, (w, i) in enumerate(zip(self.shard_workers, self._call(("info", ()))))]

    def __repr__(self) -> str:
        return (
            f"DaskPopulation({self.game!r}, n_agents={self.n_agents}, dim={self.dim}, n_shards={self.n_shards}, "
            f"exact={self.exact}, t={self.t})"
        )


def _is_loss(exc, worker_alive: bool) -> bool:
    """Did this failure come from a lost or silent worker (rather than from the shard's own code)?"""
    from distributed.comm.core import CommClosedError

    if isinstance(exc, (CommClosedError, TimeoutError)):
        return True
    if isinstance(exc, RuntimeError) and "Worker holding Actor was lost" in str(exc):
        return True
    return isinstance(exc, OSError) and (not worker_alive or "Unable to contact Actor's worker" in str(exc))


def _slice_source(source, lo, hi):
    return {"agents": {k: v[lo:hi] for k, v in source["agents"].items()}, "shared": dict(source["shared"])}


def _check_source_state(source, n_agents) -> dict:
    if not isinstance(source, dict) or set(source) != {"agents", "shared"}:
        raise ValueError("a signal source's state must be {'agents': {...}, 'shared': {...}}")
    agents = {}
    for name, value in source["agents"].items():
        arr = np.asarray(value)
        if arr.ndim < 1 or arr.shape[0] != n_agents:
            raise ValueError(f"source state 'agents/{name}' must have {n_agents} rows, got shape {arr.shape}")
        agents[name] = arr
    return {"agents": agents, "shared": {k: np.asarray(v) for k, v in source["shared"].items()}}


def _check_population_state(state: dict, game: Game, n_agents: int, dim: int) -> dict:
    """Check a population state dict against a population; return the checked values (nothing is changed)."""
    saved = state.get("game")
    if saved != game.to_dict():
        raise ValueError(f"state was saved for game {saved!r}, this population plays {game.to_dict()!r}")
    missing = [k for k in ("states", "costs", "mean_state", "mean_signal", "t", "discount") if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}")
    discount = float(state["discount"])
    if not (0.0 <= discount <= 1.0):
        raise ValueError(f"state['discount'] must be in [0, 1], got {discount!r}")
    return {
        "states": as_float_array("state['states']", state["states"], (n_agents, dim)),
        "costs": as_float_array("state['costs']", state["costs"], (n_agents,)),
        "mean_state": as_float_array("state['mean_state']", state["mean_state"], (dim,)),
        "mean_signal": as_float_array("state['mean_signal']", state["mean_signal"], (dim,)),
        "t": check_int("state['t']", int(state["t"]), low=0),
        "discount": discount,
        "n_finite_signals": check_int("state['n_finite_signals']", int(state.get("n_finite_signals", 0)), low=0),
    }


class DaskServer:
    """:class:`~memoa_fast.Server` for a :class:`DaskPopulation`: log-weights live on the shards.

    Parameters
    ----------
    population : DaskPopulation
        Whose resident states this server mixes.
    rule, eta, alpha
        As for :class:`~memoa_fast.Server`.

    Notes
    -----
    :meth:`predict` gathers d numbers per shard (``sum_i p_i x_i``);
    :meth:`update` gathers two per shard, the log-sum-exp pieces
    ``(top_k, sum_{i in k} exp(v_i - top_k))`` of ``v_i = log p_i - eta g_i``,
    merges them into

    .. math:: \\mathrm{lse} = T + \\log \\sum_k s_k e^{t_k - T}, \\qquad T = \\max_k t_k,

    and queues the normalisation and fixed share (one scalar) for the next
    message. Rule ``eg`` needs ``yhat`` of the states being scored: it reuses
    the last :meth:`predict` when nothing changed since, else costs one more
    round trip.
    """

    def __init__(self, population: DaskPopulation, *, rule: str = "hedge", eta: float = 1.0, alpha: float = 0.0):
        if not isinstance(population, DaskPopulation):
            raise TypeError(f"population must be a DaskPopulation, got {type(population).__name__}")
        self.population = population
        self.n_agents, self.dim = population.n_agents, population.dim
        self.rule = check_choice("rule", rule, RULES)
        self.eta = check_real("eta", eta, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        self.sid = uuid.uuid4().hex
        self.n_updates = 0
        self._yhat = np.zeros(self.dim)
        self._yhat_version = None
        self._weights_version = 0
        population._servers[self.sid] = self
        population._queue(("add_server", (self.sid,)))
        # When this object goes, its weights leave the workers with the next message.
        weakref.finalize(self, population._queue, ("drop_server", (self.sid,)))

    def reset(self) -> None:
        """Uniform weights ``p = 1/N``; the update counter back to 0."""
        self.population._queue(("add_server", (self.sid,)))
        self.n_updates = 0
        self._weights_version += 1

    def _states(self, states) -> None:
        pop = self.population
        if states is None or states is pop or (isinstance(states, ShardedStates) and states.population is pop):
            return
        raise TypeError(
            "a DaskServer mixes the states resident on its population's workers: pass population.step()'s result, "
            f"population.resident_states or None, not {type(states).__name__}"
        )

    @property
    def log_weights(self) -> np.ndarray:
        """``log p``, gathered from the workers (a read-only copy)."""
        return _readonly(self.population._gather_agents("log_p", (self.n_agents,), sid=self.sid))

    @property
    def weights(self) -> np.ndarray:
        """``p = exp(log p)`` (a new array)."""
        return np.exp(self.log_weights)

    def predict(self, states=None) -> np.ndarray:
        """The mixture ``yhat = sum_i p_i x_i`` of the population's current states (read-only, shape (d,))."""
        self._states(states)
        rows = np.concatenate(self.population._call(("predict", (self.sid,))))
        work = np.zeros(work_shape(rows.shape[0] * CHUNK, self.dim))
        work[:, : self.dim] = rows
        _predict_merge(work, self.dim, self._yhat)
        self._yhat_version = (self.population._version, self._weights_version)
        return _readonly(self._yhat.copy())

    def update(self, states, target) -> None:
        """Reweight the clients once the target ``y`` of the current states is known (shape (d,))."""
        self._states(states)
        y = as_float_array("target", target, (self.dim,))
        pop = self.population
        if self.rule == "eg" and self._yhat_version != (pop._version, self._weights_version):
            self.predict()
        pieces = pop._call(("reweight", (self.sid, y.copy(), self._yhat.copy(), _RULE_CODES[self.rule], self.eta)))
        tops = np.concatenate([p[0] for p in pieces])
        work = np.zeros(work_shape(tops.shape[0] * CHUNK, self.dim))
        col = 2 * padded(self.dim)
        work[:, col + 1] = tops
        work[:, col + 2] = np.concatenate([p[1] for p in pieces])
        lse = _log_sum_exp_merge(work, self.dim)
        pop._queue(("share", (self.sid, lse, self.alpha)))
        self.n_updates += 1
        self._weights_version += 1

    def state_dict(self) -> dict:
        """Everything needed to resume this server exactly (:meth:`Server.state_dict`'s keys, gathered)."""
        return {
            "log_weights": self.log_weights.copy(),
            "n_updates": self.n_updates,
            "rule": self.rule,
            "eta": self.eta,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; checks everything before changing anything."""
        log_p, n_updates = _check_server_state(state, self.rule, self.eta, self.alpha, self.n_agents)
        pop = self.population
        args = [((None, None, {self.sid: log_p[lo:hi]}, None)) for lo, hi in pop.bounds]
        pop._call(("load", None), per_shard_args=args)
        self.n_updates = n_updates
        self._weights_version += 1

    def __repr__(self) -> str:
        return f"DaskServer(n_agents={self.n_agents}, dim={self.dim}, rule={self.rule!r}, eta={self.eta!r}, alpha={self.alpha!r})"


def _check_server_state(state: dict, rule, eta, alpha, n_agents) -> tuple[np.ndarray, int]:
    for key, mine in (("rule", rule), ("eta", eta), ("alpha", alpha)):
        if state.get(key) != mine:
            raise ValueError(f"state was saved with {key}={state.get(key)!r}, this server has {key}={mine!r}")
    log_p = as_float_array("state['log_weights']", state["log_weights"], (n_agents,))
    total = float(np.logaddexp.reduce(log_p))
    if abs(total) > 1e-9:
        raise ValueError(f"state['log_weights'] must be normalised (log-sum-exp 0), got {total!r}")
    return log_p, check_int("state['n_updates']", int(state["n_updates"]), low=0)


def make_population(game: Game, n_agents: int | None = None, dim: int | None = None, *, client=None, **kwargs):
    """A :class:`~memoa_fast.Population`, or a :class:`DaskPopulation` when ``client`` is given.

    ``kwargs`` go to the chosen class (``backend``/``threads`` for the
    former; ``n_shards``, ``signals``, ``seed``, ``exact``, ``timeout`` for the latter).
    """
    if client is None:
        return Population(game, n_agents, dim, **kwargs)
    return DaskPopulation(game, n_agents, dim, client=client, **kwargs)

