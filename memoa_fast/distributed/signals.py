"""Signal sources that run on the workers, beside their shard (no N-sized traffic per step).

A source serves the agents ``[lo, hi)``; it is made on each worker by a picklable
factory ``factory(lo, hi, seed)`` and must reproduce the slice ``[lo, hi)`` of
the full population's source, so that results do not depend on the sharding.
It has

- ``next() -> ndarray (hi - lo, d)``: the signals of the step about to be
  taken (valid until the next call);
- ``observe(y)`` (optional): the newly revealed target, sent by
  :meth:`DaskPopulation.observe` (O(d) numbers);
- ``state_dict()`` / ``load_state_dict(state)`` (optional, for checkpoints):
  ``{"agents": {name: array (hi - lo, ...)}, "shared": {name: array}}``; per-agent
  arrays are concatenated across shards in a checkpoint and re-split on
  restore, shared ones must agree across shards;
- ``validate_state_dict(state)`` (optional): the same checks as
  ``load_state_dict``, changing nothing (every shard's source is asked before
  any loads). The sources here record in ``"shared"`` the settings their later
  draws depend on (the seed, the noise range: not ``lo`` and ``hi``, since the
  draws depend on the global client index) with
  :func:`memoa_fast._state.source_settings`, and their validator refuses a
  state saved with other ones (:func:`memoa_fast._state.check_source_state`,
  ``settings=``), as a population refuses a state of another game. A warning
  it issues (e.g. a state in an old format that still loads) is issued where
  it runs, on the worker, once per shard and per check: shown in the worker's
  log, or, with workers as threads (``processes=False``), under the user's
  process's filters (an ``error`` filter makes it the shard's exception). It
  is not captured and sent to the client: capturing
  (``warnings.catch_warnings``) swaps the warning state of the whole process,
  and is not thread-safe. The sources of this package report theirs as data
  instead (a private ``_validated(state) -> (clean, [(category, message)])``),
  and the client issues each once, at the line that restores. They also
  install a clean copy without checking it again (a private installer,
  :func:`memoa_fast._validation.checked_installer`): a shard checks its O(N)
  slice once where the restore asks it and at most once where it loads it.

The time-series application's forecasters come as such a source too:
:class:`memoa_fast.timeseries.forecasters.ForecasterSignals`.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _backends
from .._copies import CopiesKeepTheirClass, build_as
from .._exclusive import Exclusive
from .._state import check_source_state, source_settings
from .._validation import MAX_COUNT, TARGET_LIMIT, as_target_array, check_bounded, check_int, check_real, check_seed


class NoisyLastValueSignals(CopiesKeepTheirClass):
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
        The clients ``[lo, hi)`` this object serves, ``0 <= lo < hi <= 2**63 - 1``.
    seed : int
        Seed, an integer in ``[0, 2**63 - 1]``.
    dim : int, default 1
        Dimension d of the stream.
    low, high : float, default 0.02, 1.0
        Range of the noise scales.
    threads : int, default 1
        Threads drawing the signals (the draws do not depend on it).

    Like every object of the package that owns state, it is not thread-safe: a call while another thread is inside
    one (``next``, ``observe``, ``load_state_dict``) raises ``RuntimeError`` instead of drawing into the same buffer
    or losing a round (:class:`~memoa_fast._exclusive.Exclusive`). ``state_dict``, a copy and a pickle are checked
    reads: they raise ``RuntimeError`` if such a call overlapped them, and never make that call refuse.
    Interrupted (Ctrl-C) in ``next`` or ``observe``, it is at a round boundary; in ``load_state_dict``, between
    its writes, it refuses every call until a load completes.

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
        # client indices of a population (N <= 2**63 - 1): the counter-based draws hash them as 64-bit words
        self.lo = check_int("lo", lo, low=0, high=MAX_COUNT - 1)
        self.hi = check_int("hi", hi, low=self.lo + 1, high=MAX_COUNT)
        self.seed = check_seed("seed", seed)
        self.dim = check_int("dim", dim, low=1)
        self.threads = check_int("threads", threads, low=1)
        self.low = low = check_real("low", low, low=0.0, low_open=True)
        self.high = high = check_real("high", high, low=low)
        self._noise = _backends.load_noise()
        self._key, scale_key = self._noise.seed_keys(self.seed)
        self.sigma = np.empty(self.hi - self.lo)
        self._noise.log_uniform_scales(self.lo, self.hi, scale_key, math.log(low), math.log(high), self.sigma)
        self._out = np.empty((self.hi - self.lo, self.dim))
        self._y = np.zeros(self.dim)
        self.t = 0
        # next and observe need no interrupted mark: a round cut short between the draws and t += 1 is drawn again, the
        # same bits (the draws are a function of (seed, client, t, y)), and observe is one write. load_state_dict
        # writes two (y, t), so it marks the source around them.
        self._exclusive = Exclusive("NoisyLastValueSignals", "load_state_dict(...) of a state_dict taken before")

    def next(self) -> np.ndarray:
        """The signals of this round, shape (hi - lo, d); the buffer is reused by the next call.

        ``ValueError`` (nothing changed) at round ``t = 2**63 - 1``, the last a state can hold (``t`` is saved as an
        int64; only a loaded state gets there).
        """
        with self._exclusive:
            if self.t >= MAX_COUNT:
                raise ValueError(f"this signal source is at round 2**63 - 1 = {self.t}, the last its state can hold (t is "
                                 "saved as an int64): it makes no further round")
            self._noise.noisy_last_value(self.lo, self._key, self.t, self._y, self.sigma, self._out, self.threads)
            self.t += 1
            return self._out

    def observe(self, y) -> None:
        """The stream's newest value ``y``, shape (d,): finite, ``|y| <= TARGET_LIMIT`` (``1e30``)."""
        y = as_target_array("y", y, (self.dim,))
        with self._exclusive:
            self._y[...] = y

    def settings(self) -> dict:
        """The arguments the draws depend on, which a restored state must have been saved with.

        ``{"seed": int, "low": float, "high": float}``. Not ``lo`` and ``hi``: the draws are a function of the
        *global* client index, so a state restores onto any sharding bitwise; nor ``dim`` (the shape of ``y``
        checks it) and ``threads`` (the draws do not depend on it).
        """
        return {"seed": self.seed, "low": self.low, "high": self.high}

    def state_dict(self) -> dict:
        """The round counter and the last value (the draws are a function of them), and the :meth:`settings`.

        ``{"agents": {}, "shared": {"t": int64 scalar array, "y": (d,), "seed": int64 scalar array,
        "low": float64 scalar array, "high": float64 scalar array}}``.
        """
        return self._exclusive.read(lambda: {"agents": {}, "shared": {"t": np.array(self.t, dtype=np.int64), "y": self._y.copy(),
                                                                      **source_settings(self.settings())}})

    def validate_state_dict(self, state: dict) -> dict:
        """Check ``state`` (the form :meth:`state_dict` writes) without changing anything; returns a clean copy.

        ``y`` is held to what :meth:`observe` accepts (finite, ``|y| <= TARGET_LIMIT``): a state this source
        cannot reach is refused, as every target beyond the limit is. The saved ``seed``, ``low`` and ``high``
        must equal this source's (``seed`` an integer, never a float): a state saved by a source with other
        ones would continue with other noise. The ``ValueError`` names the key, the saved value and this
        source's. A state that records no settings (saved before they were recorded) is accepted as before.
        """
        clean = check_source_state(state, n_agents=self.hi - self.lo, agents={}, shared={"t": "count", "y": (self.dim,)},
                                   settings=self.settings())
        check_bounded("state['source/shared/y']", clean["shared"]["y"], TARGET_LIMIT, "the last target, checked as every target",
                      advice="This state was not saved by a NoisyLastValueSignals.")
        return clean

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (all checked first: :meth:`validate_state_dict`; nothing changes on an error)."""
        clean = self.validate_state_dict(state)["shared"]
        t = int(clean["t"])
        ex = self._exclusive
        with ex.restoring:  # (entered after an interrupted load too: a completed one clears the mark)
            ex.interrupted = "load_state_dict"  # cut short between the two writes, y and t are of two states
            self._y[...] = clean["y"]
            self.t = t
            ex.interrupted = None

    def __reduce__(self):
        """Pickle and copies go through :meth:`state_dict` (loaded on the way back): an independent source of the same class.

        The default failed for pickle and deepcopy (the noise kernels are a module), and copy.copy shared the
        last value ``y``: observing one of the two changed the other's draws. A subclass's copy is of its class,
        with its own attributes, and loads the state with its own ``load_state_dict`` (:mod:`memoa_fast._copies`).
        """
        config = dict(dim=self.dim, low=self.low, high=self.high, threads=self.threads)
        return self._reduce_keeping_class(_rebuild_noisy_last_value, _BUILT_BY_INIT,
                                          lambda: ((self.lo, self.hi, self.seed, config, None), self.state_dict()))


#: The attributes :meth:`NoisyLastValueSignals.__init__` sets: a copy builds them again; any other is a subclass's own.
_BUILT_BY_INIT = frozenset({"lo", "hi", "seed", "dim", "threads", "low", "high", "_noise", "_key", "sigma", "_out", "_y", "t",
                            "_exclusive"})


def _rebuild_noisy_last_value(lo, hi, seed, config, state=None, cls=NoisyLastValueSignals):
    """Unpickle :class:`NoisyLastValueSignals` or a subclass (:func:`~memoa_fast._copies.build_as`; old pickles give ``state``)."""
    return build_as(cls, NoisyLastValueSignals, (lo, hi, seed), config, state)
