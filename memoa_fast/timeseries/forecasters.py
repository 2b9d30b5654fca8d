"""Online client forecasters: the private signals of a time-series population.

MODEL.md section 6: client ``i`` sees the stream plus its own noise,
``z_i(t) = y(t) + sigma_i eps_i(t)``, with a noise scale ``sigma_i`` drawn
once, log-uniform over a range (so some clients are weak), and runs a
normalised-LMS forecaster on the feature map of its last ``p`` noisy values

.. math::

    \\phi_i(t) = \\left(z_i(t), \\dots, z_i(t-p+1),\\; q(z_i(t)), \\dots, q(z_i(t-p+1)),\\; 1\\right),
    \\qquad q(v) = \\min(v^2, c^2), \\qquad s_i(t) = w_i^\\top \\phi_i(t),

(a linear-only AR model cannot learn the logistic map; the squares can).
``s_i(t)``, its forecast of ``y(t+1)``, is the client's signal. The squares
are capped at ``c^2 = SQUARE_CAP = 64``: within 8 (8 standard deviations of
the burn-in, in a run of :func:`memoa_fast.run_experiment` on a z-scored
series) they are the plain squares, bit for bit. Beyond, plain squares would
dominate ``|phi|^2``, so the normalised step on the linear weights (about
``mu e / v^2`` in forecast units) all but stops, and the forecast becomes a
quadratic in ``v`` fitted at one level, far off as soon as the series moves:
a series that leaves its burn-in's scale (a pegged rate that moves, a
growth) was forecast 9-35 times worse by the average client than by its
last value, and 8.3-27.6 times by MEMOA's hedge mixture (three such series,
``tests/test_experiment.py``; 1.2-2.7 times with the cap and the hold's
doubling reach).

One :class:`ClientForecasters` object holds every client of a population (or
of a shard of it): preallocated arrays, a compiled per-client kernel, no
Python loop over clients. :class:`SquaredErrors` scores published forecasts
against the stream in one pass (used by :func:`memoa_fast.run_experiment`).

**Magnitudes.** Every value a client uses stays finite: a target ``y(t)``
must be finite with ``|y(t)| <= TARGET_LIMIT = 1e30`` (z-scored streams are
of order 1; :func:`memoa_fast.streams.load_csv_series` refuses cells that
would z-score beyond it), and the noise scales are at most ``1e30``. With
these limits a noisy observation is below about ``1e31``, its features
below ``1e63``, the NLMS weights below ``1 + mu t max|z|`` in Euclidean norm
(the NLMS update, a relaxed projection, never increases the norm by more
than ``mu |z|/|phi|``: see :func:`weight_limit`), so every forecast stays below about ``1e107`` and its
square below ``1e214`` for up to ``10**12`` rounds: no overflow anywhere.
A saved state (:meth:`ClientForecasters.load_state_dict`, a checkpoint) is
held to the same bounds (:data:`LAG_LIMIT`, :func:`weight_limit` on the norm
of each weight vector), which the rounds keep, so a restored forecaster stays
finite and its later states load too.

**Backends.** ``numba`` (the default) runs the compiled kernels of
``memoa_fast.kernels._forecast_numba``; ``numpy`` and ``cython`` run the
NumPy reference ``memoa_fast.kernels._forecast_reference`` (there is no
Cython forecaster, and the Cython path never imports Numba).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import _backends
from .._copies import CopiesAreDeep, CopiesKeepTheirClass, build_as
from .._exclusive import Exclusive
from .._state import _real, check_source_state, source_settings
from .._validation import (
    MAX_COUNT,
    as_float_array,
    as_target_array,
    check_bool,
    check_bounded,
    check_choice,
    check_int,
    check_real,
    check_seed,
    check_sizes,
    checked_installer,
    installs_checked,
    issue_notices,
    issues_what_validated_returns,
    load_checked,
    quietly_validated,
    readonly_view,
    validates_quietly,
)
from .._validation import TARGET_LIMIT as TARGET_LIMIT  # re-exported: the stream's limit lives with the other checks
from ..kernels import SQUARE_CAP as SQUARE_CAP  # re-exported: the cap of the squared features (the kernels')

#: The name under which a saved state records its squared features' cap (:data:`SQUARE_CAP`); see :func:`check_square_cap`.
CAP_RECORD = "square_cap"


class UncappedStateWarning(UserWarning):
    """A saved forecaster state without :data:`CAP_RECORD`: saved before the squared features were capped.

    It loads, and its forecasters continue with the capped features: their
    forecasts and updates differ from those of the version that saved it
    wherever a lag exceeds ``sqrt(SQUARE_CAP) = 8`` in magnitude (elsewhere
    they are the same bits).
    """


def check_square_cap(record, key: str) -> bool:
    """Refuse a saved state recorded with another cap of the squared features; whether it records the cap at all.

    ``record[CAP_RECORD]`` must be a real number equal to :data:`SQUARE_CAP`:
    otherwise ``ValueError`` names ``state[key]`` and both values, since the state's
    later rounds would differ from the run that saved it. A ``record`` without
    it was saved before the squared features were capped: it is accepted
    (nothing a user saved is lost) and this returns False; the loader then calls
    :func:`warn_uncapped` once every other check has passed (a refused state does not load).
    """
    if CAP_RECORD not in record:
        return False
    got = _real(key, record[CAP_RECORD])
    if got != float(SQUARE_CAP):
        raise ValueError(f"state[{key!r}] is {got!r}, but this memoa-fast caps the squared features at SQUARE_CAP={SQUARE_CAP:g}: the "
                         f"state was saved with other features, and its later rounds would differ from the run that saved it")
    return True


def uncapped_notice(key: str) -> tuple[type[Warning], str]:
    """The :class:`UncappedStateWarning` that a state without ``state[key]`` loads with, as ``(category, message)``.

    A validator returns it, issued by nobody, from where no warning may be issued (see
    :func:`~memoa_fast._validation.issue_notices`); :func:`warn_uncapped` issues it.
    """
    return UncappedStateWarning, (
        f"state[{key!r}] is missing: this state was saved before memoa-fast capped the squared features at "
        f"SQUARE_CAP={SQUARE_CAP:g} (its forecasters used the plain squares). It loads and continues with the capped "
        f"features: the forecasts differ from the saving version's wherever a lag exceeds {math.sqrt(SQUARE_CAP):g} "
        f"in magnitude, and are the same bits elsewhere. Saving it again records the cap.")


def warn_uncapped(key: str) -> None:
    """Warn that a state without ``state[key]`` loads (:class:`UncappedStateWarning`; see :func:`check_square_cap`).

    At the line outside memoa_fast that loads it (:func:`~memoa_fast._validation.outside_stacklevel`).
    """
    issue_notices([uncapped_notice(key)])


#: Clients per random-number block (see :class:`ClientForecasters`).
BLOCK_SIZE = 4096

#: Largest accepted ``|y(t)|`` of a target (see the module docstring, "Magnitudes"): ``TARGET_LIMIT``, imported above.

#: Largest ``|z|`` a saved lag buffer may hold: ``100 * TARGET_LIMIT``. A lag is a noisy observation
#: ``z = y + sigma eps`` with ``|y| <= TARGET_LIMIT``, ``sigma <= 1e30`` and ``|eps| < 14`` (NumPy's
#: ziggurat normal cannot exceed ``3.66 + 53 ln 2 / 3.66``), so every lag a forecaster reaches is below
#: ``1.5e31``: the limit leaves a margin of 6.
LAG_LIMIT = 100 * TARGET_LIMIT


def weight_limit(t: int) -> float:
    """Largest Euclidean norm ``|w|`` of a client's weights of one coordinate (``2 p + 1`` numbers) after ``t`` rounds.

    ``1 + 2 t LAG_LIMIT``. The weights start as persistence (``|w(0)| = 1``)
    and the NLMS update, a relaxed projection (``0 < mu < 2``), changes ``w``
    only along ``phi``, where it maps the component ``a`` to ``(1 - mu) a + mu
    z / |phi|``: the norm grows by at most ``mu |z| / |phi| <= 2 LAG_LIMIT`` a
    round (``|phi| >= 1``). So no reachable state has a norm beyond this, and a
    state within it stays within it round after round (the new ``z`` is a
    reachable observation, ``|z| < 1.5e31``; the margin of ``1.7e32`` a round
    also covers the rounding of the update, about ``1e-16 |w|``, while ``t <
    10**15``). It is at most ``1.9e51`` (``t < 2**63``). A bound
    on each entry would not be kept: entries of ``weight_limit(t)`` with mixed
    signs (lags of 1) give an entry of ``(1 + mu (2p-1)/(2p+1)) weight_limit(t)`` one
    round later.
    """
    return 1.0 + 2.0 * float(t) * LAG_LIMIT


def signal_limit(t: int, lags: int) -> float:
    """Largest ``|s|`` of a saved forecast: ``(2 p + 1) weight_limit(t) LAG_LIMIT**2``.

    ``|s| = |w^T phi| <= |w| |phi|`` and ``|phi| <= (2 p + 1) LAG_LIMIT**2`` (each feature is at most ``LAG_LIMIT**2``).
    """
    return (2 * lags + 1) * weight_limit(t) * LAG_LIMIT**2


#: Largest accepted noise scale.
NOISE_LIMIT = 1e30

FORECAST_BACKENDS = ("numba", "numpy", "cython")
_MODULES = {
    "numba": "memoa_fast.kernels._forecast_numba",
    "numpy": "memoa_fast.kernels._forecast_reference",
    # No Cython forecaster: the NumPy reference keeps the Cython path free of Numba.
    "cython": "memoa_fast.kernels._forecast_reference",
}


def _load_kernels(backend: str):
    """The forecaster/scoring kernel module of ``backend`` (numba: compiled; numpy, cython: reference)."""
    backend = check_choice("backend", backend, FORECAST_BACKENDS)
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError as exc:
        if getattr(exc, "name", None) == "memoa_fast.kernels":
            raise ImportError(_backends.SOURCE_TREE_HINT) from exc
        raise


class ClientForecasters(CopiesKeepTheirClass):
    """The normalised-LMS forecasters of clients ``[first_client, first_client + n_clients)``.

    Parameters
    ----------
    n_clients : int
        Number of clients this object covers, ``>= 1``.
    dim : int, default 1
        Dimension d of the stream; each coordinate has its own weights and
        noise draws (a client's noise scale is shared by its coordinates).
    lags : int, default 2
        ``p``, how many past noisy values enter the features; the weight
        vector has ``2 p + 1`` entries per coordinate.
    noise_range : (float, float), default (0.02, 1.0)
        ``(low, high)``, ``0 < low <= high <= 1e30``: ``sigma_i`` is log-uniform on it.
    mu : float, default 0.1
        NLMS step size, in (0, 2) (the stable range of NLMS).
    seed : int, default 0
        Seed of every random draw (noise scales and noise), an integer in ``[0, 2**63 - 1]``
        (the one seed domain of every seeded object).
    first_client : int, default 0
        Global index of the first client covered; a multiple of ``block_size``.
    block_size : int, default 4096
        Clients per random-number block (see Notes). Every shard of one
        population must use the same value.
    backend : {"numba", "numpy", "cython"}, default "numba"
        ``numba`` runs the compiled kernel; ``numpy`` and ``cython`` run the
        NumPy reference (there is no Cython forecaster; Numba is not imported).
    threads : int, optional
        Threads for the kernel and the noise draws; default every core. Fewer
        than ``parallel_threshold`` clients run on one thread.
    parallel_threshold : int, default 8192 (``memoa_fast._backends.PARALLEL_THRESHOLD``)
        As for :class:`~memoa_fast.Population`.

    Notes
    -----
    **Contract of** :meth:`observe`. At call number ``t`` (0, 1, ...) with the
    stream value ``y(t)``:

    1. every client draws ``eps_i(t) ~ N(0, I_d)`` and observes
       ``z_i(t) = y(t) + sigma_i eps_i(t)``;
    2. if ``t >= 1``, it updates its weights on the a-priori error of the
       forecast it published at ``t - 1``:
       ``w_i += mu e_i phi_i(t-1) / |phi_i(t-1)|^2`` with
       ``e_i = z_i(t) - w_i^T phi_i(t-1)`` (the forecaster learns from its
       noisy view only; it never sees the clean ``y``);
    3. ``z_i(t)`` enters the lag buffer, and ``s_i(t) = w_i^T phi_i(t)``,
       the forecast of ``y(t+1)``, is returned.

    Before the first call the lag buffer holds zeros (the mean of a z-scored
    stream) and the weights are persistence (``1`` on the newest lag, ``0``
    elsewhere), so the first forecast is the first noisy observation.

    **Shard reproducibility.** Global client ``g`` belongs to block
    ``b = g // block_size``. Block ``b`` owns one bit generator,
    ``PCG64(SeedSequence(seed, spawn_key=(b,)))`` (the ``b``-th child of
    ``SeedSequence(seed).spawn``), whose stream is addressed by position:

    - position 0: ``block_size`` uniforms ``u``, ``sigma = exp(log low + u
      (log high - log low))`` for the block's clients in order;
    - position ``(t + 1) * 2**64``: the standard normals of call ``t``, the
      block's clients in order (``d`` per client), drawn with
      ``Generator.standard_normal`` after ``PCG64.advance`` to that position.

    An object draws only the normals of the clients it covers (a prefix of the
    block's), so a client's noise scale, noise and forecasts are a function
    of ``(seed, block_size, g, t)`` alone: an object covering ``[lo, hi)``
    (``lo`` a multiple of ``block_size``) produces bitwise the same arrays as
    rows ``[lo, hi)`` of the whole-population object, on any thread count.
    """

    def __init__(
        self,
        n_clients: int,
        dim: int = 1,
        *,
        lags: int = 2,
        noise_range: tuple[float, float] = (0.02, 1.0),
        mu: float = 0.1,
        seed: int = 0,
        first_client: int = 0,
        block_size: int = BLOCK_SIZE,
        backend: str = "numba",
        threads: int | None = None,
        parallel_threshold: int = _backends.PARALLEL_THRESHOLD,
    ):
        self.n_clients = check_int("n_clients", n_clients, low=1)
        self.dim = check_int("dim", dim, low=1)
        self.lags = check_int("lags", lags, low=1)
        self.noise_range = _check_noise_range(noise_range)
        self.mu = check_real("mu", mu, low=0.0, high=2.0, low_open=True, high_open=True)
        self.seed = check_seed("seed", seed)
        self.block_size = check_int("block_size", block_size, low=1)
        self.first_client = check_int("first_client", first_client, low=0)
        if self.first_client % self.block_size:
            raise ValueError(
                f"first_client must be a multiple of block_size={self.block_size} (shards start on a block), "
                f"got {self.first_client}"
            )
        # weights (N, d, 2p + 1), lags (N, d, p), signals and noise (N, d), sigma (N,), and one block's uniforms
        check_sizes(self.n_clients, self.dim, per_agent_vectors=3 * self.lags + 3, per_agent_scalars=1,
                    extra_bytes=16 * self.block_size, what="forecasters", names=("n_clients", "dim"),
                    detail=f", lags={self.lags}, block_size={self.block_size}")
        self.backend = check_choice("backend", backend, FORECAST_BACKENDS)
        self._kernels = _load_kernels(backend)
        self._exclusive = Exclusive("ClientForecasters")
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self.threads_used = _backends.resolve_threads(threads, self.n_clients, self.parallel_threshold)

        B = self.block_size
        self._first_block = self.first_client // B
        self._n_blocks = -(-self.n_clients // B)
        n, d, p = self.n_clients, self.dim, self.lags
        self._sigma = np.empty(n)
        self._weights = np.zeros((n, d, 2 * p + 1))
        self._lags = np.zeros((n, d, p))
        self._out = np.zeros((n, d))
        self._eps = np.zeros((n, d))
        self._y = np.zeros(d)
        self._blocks: list = []
        self._pool = None
        self._sigma_view = readonly_view(self._sigma)
        self._out_view = readonly_view(self._out)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to before the first observation: same noise scales, same noise sequence."""
        ex = self._exclusive
        with ex.restoring:  # never under another thread's observe (its kernel reads these arrays); also after an interrupt
            ex.interrupted = "reset"
            self._reset()
            ex.interrupted = None

    def _reset(self) -> None:
        B = self.block_size
        lo, hi = self.noise_range
        log_lo, log_span = math.log(lo), math.log(hi) - math.log(lo)
        self._blocks = []
        for k in range(self._n_blocks):
            b = self._first_block + k
            bitgen = np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(b,)))
            base = bitgen.state
            start, stop = k * B, min((k + 1) * B, self.n_clients)
            # The whole block's scales, computed the same way whatever this object covers.
            sigma = np.exp(log_lo + log_span * np.random.Generator(bitgen).random(B))
            self._sigma[start:stop] = sigma[: stop - start]
            self._blocks.append((bitgen, np.random.Generator(bitgen), base, self._eps[start:stop]))
        self._weights[...] = 0.0
        self._weights[:, :, 0] = 1.0  # persistence
        self._lags[...] = 0.0
        self._out[...] = 0.0
        self.t = 0

    @property
    def noise_scales(self) -> np.ndarray:
        """``sigma_i``, shape (n_clients,): a read-only view."""
        return self._sigma_view

    @property
    def signals(self) -> np.ndarray:
        """The last forecasts ``s_i(t)``, shape (n_clients, d): the read-only live buffer (no snapshot during another thread's observe)."""
        return self._out_view

    @property
    def weights(self) -> np.ndarray:
        """NLMS weights, shape (n_clients, d, 2 p + 1), ordered ``[lags, min(lags**2, SQUARE_CAP), 1]``; a copy.

        ``RuntimeError`` during another thread's :meth:`observe` (its kernel writes them in place), as every read of
        the state; :attr:`signals` is a view, which cannot refuse (not a snapshot then).
        """
        return self._exclusive.read(self._weights.copy)

    # ------------------------------------------------------------------ step
    def observe(self, y) -> np.ndarray:
        """Every client observes ``y(t)`` with its noise, learns, and forecasts ``y(t+1)``.

        Parameters
        ----------
        y : float or array_like, shape (d,)
            The stream's value at this round: finite, ``|y| <= TARGET_LIMIT``
            (``1e30``) in every coordinate.

        Returns
        -------
        numpy.ndarray
            ``s(t)``, shape (n_clients, d): the read-only live buffer
            :attr:`signals`, overwritten by the next call (copy it to keep it).

        Raises
        ------
        ValueError
            ``y`` is not finite or ``|y| > 1e30`` somewhere; nothing is
            changed (no noise drawn, no weight learned, the round counter
            stays), so the caller may skip the value or stop. Also (nothing
            changed) at round ``t = 2**63 - 1``, the last a state can hold
            (``t`` is saved as an int64; only a loaded state gets there).
        """
        y = check_target("y", y, self.dim)
        with self._exclusive:
            if self.t >= MAX_COUNT:  # the last round counter a state can hold (t is saved as an int64)
                raise ValueError(f"this forecaster is at round 2**63 - 1 = {MAX_COUNT}, the last its state can hold "
                                 "(t is saved as an int64): it observes no further round")
            ex = self._exclusive
            ex.interrupted = "observe"  # until t counts the round: an interrupt in between is refused later, not lost
            self._y[...] = y
            self._draw_noise()
            self._kernels.forecast_step(
                self._y, self._eps, self._sigma, self._weights, self._lags, self._out, self.mu, self.t > 0,
                _backends.usable_threads(self.threads_used),
            )
            self.t += 1
            ex.interrupted = None
        return self._out_view

    def _draw_noise(self) -> None:
        # Round t of block b: the block's PCG64 stream from position (t + 1) * 2**64 (an O(log) jump).
        offset = (self.t + 1) << 64
        if _backends.usable_threads(self.threads_used) > 1 and len(self._blocks) > 1:
            # Generator fills release the GIL; each block has its own generator and rows.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads_used, thread_name_prefix="memoa-noise")
            list(self._pool.map(lambda blk: _draw_block(blk, offset), self._blocks))
        else:
            for blk in self._blocks:
                _draw_block(blk, offset)

    # ------------------------------------------------------------------ persistence
    def settings(self) -> dict:
        """The arguments the later rounds depend on, which a restored state must have been saved with.

        ``{"seed": int, "noise_range": (low, high), "mu": float, "block_size": int}``: the noise scales and the noise
        of client ``g`` at round ``t`` are a function of ``(seed, noise_range, block_size, g, t)`` (class Notes,
        "Shard reproducibility") and the learning of ``mu``. Not ``first_client``: the draws depend on the *global*
        client index, so a state restored onto other shards (another ``first_client``) continues bitwise; nor
        ``n_clients``, ``dim`` and ``lags``, which the shapes of the saved arrays check; nor ``backend`` and
        ``threads``, a choice of how to compute the same rounds.
        """
        return {"seed": self.seed, "noise_range": tuple(self.noise_range), "mu": self.mu, "block_size": self.block_size}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (copies), split per client and shared.

        ``{"agents": {"weights": (n, d, 2p+1), "lags": (n, d, p), "signals": (n, d)},
        "shared": {"t": int64 scalar array, "y": (d,), "seed": int64 scalar array, "noise_range": (2,),
        "mu": float64 scalar array, "block_size": int64 scalar array, "square_cap": float64 scalar array}}``
        (``square_cap``: :data:`SQUARE_CAP`, the features' cap, see :func:`check_square_cap`). The noise scales and the noise are
        functions of ``(seed, client, t)`` (and the settings): they need no saving. The settings
        (:meth:`settings`) are recorded so that a restore into forecasters made with other ones is refused
        (:meth:`validate_state_dict`). Per-client arrays of shards concatenate into the whole population's;
        the shared part is the same on every shard.
        """
        # A snapshot of one round, never of two: a checked read (no hold), RuntimeError if another thread's observe
        # overlapped it (that observe is served).
        return self._exclusive.read(lambda: {
            "agents": {"weights": self._weights.copy(), "lags": self._lags.copy(), "signals": self._out.copy()},
            "shared": {"t": np.array(self.t, dtype=np.int64), "y": self._y.copy(), **source_settings(self.settings()),
                       CAP_RECORD: np.array(float(SQUARE_CAP))},
        })

    @issues_what_validated_returns
    def validate_state_dict(self, state: dict) -> dict:
        """Check ``state`` (the form :meth:`state_dict` writes) without changing anything; return a clean copy.

        The validator of a checkpoint's signal-source state
        (:func:`memoa_fast._state.check_source_state`): exactly the keys
        :meth:`state_dict` writes, real arrays of these clients' shapes, all
        finite, and ``t`` an integer >= 0 (a float, a string or a bool is
        refused, not rounded). ``ValueError`` names the key.

        **Settings.** The saved ``seed``, ``noise_range``, ``mu`` and
        ``block_size`` (:meth:`settings`) must equal this object's, ``seed``
        and ``block_size`` as integers (never floats): a state saved by
        forecasters with another seed would continue with other noise, and
        the run that saved it would not. The ``ValueError`` names the key, the
        saved value and this object's, e.g. ``state['source/shared/seed'] is
        1, but this source has seed=2``. ``first_client`` is not compared
        (the draws depend on the global client index, so the clients'
        rows restore onto any shards), and a state that records no settings
        (saved before they were recorded) is accepted as before.

        **Features.** ``square_cap`` must equal :data:`SQUARE_CAP`; a state
        without it (saved before the squared features were capped) loads with
        an :class:`UncappedStateWarning` (:func:`check_square_cap`).

        The magnitudes are those a forecaster can reach (module docstring,
        "Magnitudes"), so that a restored one stays finite: ``|y| <=
        TARGET_LIMIT`` (``1e30``, the last target), every lag ``|z| <=
        LAG_LIMIT`` (``1e32``), the Euclidean norm of every client's weights of
        one coordinate ``|w| <= weight_limit(t) = 1 + 2 t LAG_LIMIT`` (so every
        entry too) and every forecast ``|s| <= signal_limit(t, p) = (2 p + 1)
        weight_limit(t) LAG_LIMIT**2``. Every state a forecaster reaches is
        within them, and so is every state it reaches from one within them
        (see :func:`weight_limit`): what this accepts, a copy of it, later,
        accepts again. Within them the next rounds cannot
        overflow: features at most ``1e64``, ``|phi|^2`` at most ``(2p+1)
        1e128``, forecasts and errors at most ``(2p+1) 1.9e115`` and their
        squares (the scores) far below ``1.8e308`` for any ``p`` that fits in
        memory; beyond them (e.g. a weight of ``1e300``) the next forecasts
        were ``inf`` or NaN.
        """
        clean, notices = self._validated(state)
        issue_notices(notices)
        return clean

    def _validated(self, state: dict) -> tuple[dict, list]:
        """:meth:`validate_state_dict`'s clean copy and the warnings it issues, as ``[(category, message)]``, issued by nobody.

        For a caller in whose thread no warning may be issued nor captured: a Dask shard, which answers them to the
        client (:func:`~memoa_fast._validation.issue_notices`). The clean copy records the cap: loading it issues nothing.
        """
        d, p = self.dim, self.lags
        shared = state.get("shared") if isinstance(state, Mapping) else None
        recorded = isinstance(shared, Mapping) and CAP_RECORD in shared
        if recorded:  # checked below, after the rest: the state without it is the form check_source_state knows
            state = {**state, "shared": {k: v for k, v in shared.items() if k != CAP_RECORD}}
        clean = check_source_state(
            state, n_agents=self.n_clients, agents={"weights": (d, 2 * p + 1), "lags": (d, p), "signals": (d,)},
            shared={"t": "count", "y": (d,)}, settings=self.settings(),
        )
        cap_key = f"source/shared/{CAP_RECORD}"
        if recorded:
            check_square_cap(shared, cap_key)
        clean["shared"][CAP_RECORD] = np.array(float(SQUARE_CAP))
        agents, shared = clean["agents"], clean["shared"]
        t = int(shared["t"])
        for key, arr, limit, why in (
            ("shared/y", shared["y"], TARGET_LIMIT, "the last target, checked as every target"),
            ("agents/lags", agents["lags"], LAG_LIMIT, "a lag is a noisy observation of a target"),
            ("agents/weights", agents["weights"], weight_limit(t),
             f"each is within its weight vector's norm, at most 1 + 2 t LAG_LIMIT after t={t} rounds"),
            ("agents/signals", agents["signals"], signal_limit(t, p), f"a forecast is at most (2p+1) weight_limit(t) LAG_LIMIT**2, t={t}"),
        ):
            check_bounded(f"state['source/{key}']", arr, limit, why, advice=_NOT_SAVED)
        _check_weight_norms(agents["weights"], weight_limit(t), t)  # entries within the limit: no square overflows
        # reached only by a state that passed every check: the warning says it loads
        return clean, ([] if recorded else [uncapped_notice(cap_key)])

    def _install_checked(self, clean: dict) -> None:
        """Install ``clean``, a state :meth:`validate_state_dict` (or :meth:`_validated`) returned; checks nothing.

        For a caller that checked the state already (:func:`~memoa_fast._validation.checked_installer`): the
        check is O(n_clients), and done once per restore.
        """
        agents, shared = clean["agents"], clean["shared"]
        ex = self._exclusive
        with ex.restoring:  # also after an interrupted observe: this is the way back
            ex.interrupted = "load_state_dict"
            self._weights[...], self._lags[...], self._out[...] = agents["weights"], agents["lags"], agents["signals"]
            self._y[...] = shared["y"]
            self.t = int(shared["t"])
            ex.interrupted = None

    @installs_checked(_install_checked)
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (of the same clients and settings); checks everything first.

        Raises ``ValueError`` (see :meth:`validate_state_dict`) and changes nothing if any part is wrong,
        also when the state was saved by forecasters with another ``seed``, ``noise_range``, ``mu`` or
        ``block_size``.
        """
        # The class's own installer, not self's: a subclass's method of that private name may be anything.
        ClientForecasters._install_checked(self, self.validate_state_dict(state))

    def __reduce__(self):
        """Pickle and copies go through :meth:`state_dict` (validated on the way back): an independent object of the same class.

        A subclass's copy is of its class, with its own attributes (they were dropped, and with them, say, a stricter
        check), and loads the state with its own ``load_state_dict`` (:mod:`memoa_fast._copies`). The state and the
        own attributes are one checked read: ``RuntimeError`` if another thread's call overlapped it (that call is served).
        """
        config = dict(lags=self.lags, noise_range=self.noise_range, mu=self.mu, seed=self.seed, first_client=self.first_client,
                      block_size=self.block_size, backend=self.backend, threads=self.threads,
                      parallel_threshold=self.parallel_threshold)
        return self._reduce_keeping_class(_rebuild_forecasters, _FORECASTERS_BUILT_BY_INIT,
                                          lambda: ((self.n_clients, self.dim, config, None), self.state_dict()))

    def close(self) -> None:
        """Stop the noise-drawing threads (if any); the object stays usable."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return (
            f"ClientForecasters(n_clients={self.n_clients}, dim={self.dim}, lags={self.lags}, "
            f"noise_range={self.noise_range}, mu={self.mu}, seed={self.seed}, first_client={self.first_client}, "
            f"block_size={self.block_size}, backend={self.backend!r}, t={self.t})"
        )


class SquaredErrors(CopiesKeepTheirClass):
    """Running squared errors of ``n_clients`` published forecasts against a stream.

    Each call of :meth:`add` with states ``x`` (n, d) and the target ``y``
    (d,) makes one pass over ``x``:

    .. math::

        e_i = |x_i - y|^2, \\qquad \\bar x = \\frac1n \\sum_i x_i, \\qquad
        E_i \\leftarrow E_i + e_i \\ \\text{(only if record)},

    and returns ``sum_i e_i``, the mean state ``xbar`` and the totals ``E``.
    The per-chunk partials are merged in chunk order, so the results do not
    depend on the thread count.

    Parameters
    ----------
    n_clients : int
        Clients n, ``>= 1``.
    dim : int, default 1
        Dimension d.
    backend : {"numba", "numpy", "cython"}, default "numba"
        As for :class:`ClientForecasters` (``cython`` runs the NumPy reference).
    threads : int, optional
        Threads of the compiled kernel; default every core. Fewer than
        ``parallel_threshold`` clients run on one thread.
    parallel_threshold : int, default 8192

    Attributes
    ----------
    totals : numpy.ndarray, shape (n_clients,)
        ``E_i``, a read-only view of the live buffer (not a snapshot while
        another thread's :meth:`add` runs: a view cannot refuse; a copy or
        pickle of this object can, and does).
    max_total : float
        ``max_i E_i`` after the last :meth:`add` (0 before).
    threads_used : int
        Threads the kernel runs on.
    """

    def __init__(self, n_clients: int, dim: int = 1, *, backend: str = "numba", threads: int | None = None,
                 parallel_threshold: int = _backends.PARALLEL_THRESHOLD):
        self.n_clients, self.dim = check_sizes(n_clients, dim, per_agent_vectors=0, per_agent_scalars=1, what="squared errors",
                                               names=("n_clients", "dim"))
        self.backend = check_choice("backend", backend, FORECAST_BACKENDS)
        self._kernels = _load_kernels(backend)
        self._exclusive = Exclusive("SquaredErrors", recover="reset(), or continue from a copy or pickle taken before")
        self.parallel_threshold = check_int("parallel_threshold", parallel_threshold, low=1)
        self.threads, self.threads_used = _backends.resolve_threads(threads, self.n_clients, self.parallel_threshold)
        self._totals = np.zeros(self.n_clients)
        self._mean = np.zeros(self.dim)
        self._work = np.zeros(self._kernels.score_work_shape(self.n_clients, self.dim))
        self._totals_view = readonly_view(self._totals)
        self._mean_view = readonly_view(self._mean)
        self.max_total = 0.0

    @property
    def totals(self) -> np.ndarray:
        """``E_i``, shape (n_clients,): a read-only view of the live buffer."""
        return self._totals_view

    def add(self, states, target, record: bool = True):
        """Score one round: returns ``(sum_i |x_i - y|^2, mean state, totals)``.

        Parameters
        ----------
        states : array_like, shape (n_clients, d)
            The published forecasts ``x`` (a non-finite entry makes this
            round's sum, that client's total and the mean non-finite; nothing
            else is affected).
        target : float or array_like, shape (d,)
            ``y``; finite with ``|y| <= TARGET_LIMIT`` (``1e30``), as every target (else ``ValueError``,
            nothing changes).
        record : bool, default True
            Add ``|x_i - y|^2`` to the totals (False: burn-in rounds, scored
            for the round's sum and mean only).

        Returns
        -------
        (float, numpy.ndarray, numpy.ndarray)
            The summed squared error of this round, the mean state (shape
            (d,)) and the totals (shape (n,)); both arrays are read-only live
            buffers, overwritten by the next call.
        """
        # Not checked for finiteness (one pass saved per round): a non-finite state gives non-finite scores only.
        x = as_float_array("states", states, (self.n_clients, self.dim), allow_nonfinite=True)
        y = as_target_array("target", target, (self.dim,))  # |y| <= 1e30: a finite y cannot overflow |x_i - y|^2
        record = check_bool("record", record)
        ex = self._exclusive
        with ex:
            ex.interrupted = "add"  # until max_total is stored: an interrupt in between is refused later, not lost
            total, self.max_total = self._kernels.score_step(x, y, record, self._totals, self._work, self._mean,
                                                             _backends.usable_threads(self.threads_used))
            ex.interrupted = None
        return total, self._mean_view, self._totals_view

    def __reduce__(self):
        """Pickle and copies: a new, independent object of the same class (a subclass's own attributes kept), the totals copied in."""
        config = dict(backend=self.backend, threads=self.threads, parallel_threshold=self.parallel_threshold)
        # one checked read (RuntimeError if another thread's add overlapped it; that add is served)
        return self._reduce_keeping_class(_rebuild_squared_errors, _SCORER_BUILT_BY_INIT, lambda: (
            (self.n_clients, self.dim, config, None), (self._totals.copy(), self._mean.copy(), self.max_total)))

    def _load_saved(self, arrays) -> None:
        """Copy the pickled ``(totals, mean, max_total)`` in (shapes checked, finite or not)."""
        totals, mean, max_total = arrays
        totals = as_float_array("totals", totals, (self.n_clients,), allow_nonfinite=True)
        mean = as_float_array("mean", mean, (self.dim,), allow_nonfinite=True)
        self._totals[...], self._mean[...], self.max_total = totals, mean, float(max_total)

    def reset(self) -> None:
        """Totals back to zero."""
        ex = self._exclusive
        with ex.restoring:  # never under another thread's add; also after an interrupted one
            ex.interrupted = "reset"
            self._totals[...] = 0.0
            self._mean[...] = 0.0
            self.max_total = 0.0
            ex.interrupted = None

    def __repr__(self) -> str:
        return f"SquaredErrors(n_clients={self.n_clients}, dim={self.dim}, backend={self.backend!r})"


#: The attributes :meth:`ClientForecasters.__init__` sets: a copy builds them again; any other is a subclass's own.
_FORECASTERS_BUILT_BY_INIT = frozenset({
    "n_clients", "dim", "lags", "noise_range", "mu", "seed", "first_client", "block_size", "backend", "threads",
    "parallel_threshold", "threads_used", "t", "_blocks", "_eps", "_exclusive", "_first_block", "_kernels", "_lags",
    "_n_blocks", "_out", "_out_view", "_pool", "_sigma", "_sigma_view", "_weights", "_y"})


def _rebuild_forecasters(n_clients, dim, config, state=None, cls=ClientForecasters):
    """Unpickle :class:`ClientForecasters` or a subclass (:func:`~memoa_fast._copies.build_as`; old pickles give ``state``)."""
    return build_as(cls, ClientForecasters, (n_clients, dim), config, state)


#: The attributes :meth:`SquaredErrors.__init__` sets: a copy builds them again; any other is a subclass's own.
_SCORER_BUILT_BY_INIT = frozenset({
    "n_clients", "dim", "backend", "_kernels", "_exclusive", "parallel_threshold", "threads", "threads_used", "_totals", "_mean",
    "_work", "_totals_view", "_mean_view", "max_total"})


def _rebuild_squared_errors(n_clients, dim, config, arrays=None, cls=SquaredErrors):
    """Unpickle :class:`SquaredErrors` or a subclass (:func:`~memoa_fast._copies.build_as`; old pickles give ``arrays``)."""
    return build_as(cls, SquaredErrors, (n_clients, dim), config, arrays)


_NOT_SAVED = "This state was not saved by a ClientForecasters."

def _check_weight_norms(weights: np.ndarray, limit: float, t: int) -> None:
    """``ValueError`` unless every client's weights of one coordinate, ``weights[i, c]``, have Euclidean norm <= ``limit``.

    ``weights`` is finite with every entry within ``limit`` (``<= 1.9e51``): the squares cannot overflow.
    """
    norms = np.sqrt(np.einsum("ndf,ndf->nd", weights, weights))
    if not (norms <= limit).all():
        i, c = (int(k) for k in np.argwhere(~(norms <= limit))[0])
        raise ValueError(
            f"state['source/agents/weights'] must have a Euclidean norm <= {limit:g} for every client and coordinate "
            f"(the NLMS weights start at norm 1 and move by at most 2 LAG_LIMIT a round: 1 + 2 t LAG_LIMIT after t={t} "
            f"rounds); got {float(norms[i, c])!r} for client {i}, coordinate {c}. {_NOT_SAVED}"
        )


def check_target(name: str, value, dim: int) -> np.ndarray:
    """``value`` as a (dim,) float64 array, finite with every ``|entry| <= TARGET_LIMIT``, else ValueError."""
    return as_target_array(name, value, (dim,))


def _draw_block(block, offset: int) -> None:
    bitgen, gen, base, rows = block
    bitgen.state = base
    bitgen.advance(offset)
    gen.standard_normal(out=rows)


def _check_noise_range(noise_range) -> tuple[float, float]:
    try:
        lo, hi = noise_range
    except (TypeError, ValueError):
        raise TypeError(f"noise_range must be a pair (low, high) of positive numbers, got {noise_range!r}") from None
    lo = check_real("noise_range low", lo, low=0.0, high=NOISE_LIMIT, low_open=True)
    hi = check_real("noise_range high", hi, low=0.0, high=NOISE_LIMIT, low_open=True)
    if hi < lo:
        raise ValueError(f"noise_range must have low <= high, got ({lo!r}, {hi!r})")
    return lo, hi


class ForecasterSignals(CopiesAreDeep):
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
        Seed of every draw, an integer in ``[0, 2**63 - 1]`` (as for ``ClientForecasters``).
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
        self.forecasters = ClientForecasters(hi - lo, dim, seed=seed, first_client=lo, threads=threads, **kwargs)

    def observe(self, y) -> None:
        """Feed the stream's newest value to every client's forecaster."""
        self.forecasters.observe(y)

    def next(self) -> np.ndarray:
        """The clients' forecasts of the next value: this round's signals."""
        return self.forecasters.signals

    # The forecasters' state (NLMS weights, lag buffers, last forecasts, round
    # counter, last value); the noise is a function of (seed, client, round).
    def state_dict(self) -> dict:
        """The forecasters' state."""
        return self.forecasters.state_dict()

    @issues_what_validated_returns
    def validate_state_dict(self, state: dict) -> dict:
        """Check ``state`` (the form :meth:`state_dict` writes) without changing anything; returns a clean copy."""
        clean, notices = self._validated(state)
        issue_notices(notices)
        return clean

    def _validated(self, state: dict) -> tuple[dict, list]:
        """The clean copy and the warnings to issue about it, issued by nobody (:meth:`ClientForecasters._validated`).

        What a shard asks (its worker issues no warning): the client issues them once, at the user's line. The
        forecasters' own ``validate_state_dict`` decides (:func:`~memoa_fast._validation.quietly_validated`): one
        that checks more (a user's subclass) is called, never bypassed.
        """
        return quietly_validated(self.forecasters, state)

    def _install_checked(self, clean: dict) -> None:
        """Install ``clean``, a state :meth:`validate_state_dict` (or :meth:`_validated`) returned, into the forecasters.

        Through their installer when they have the package's (:func:`~memoa_fast._validation.checked_installer`):
        nothing checked again. Forecasters with a check or a load of their own get their ``load_state_dict``.
        """
        load_checked(self.forecasters, clean)

    @installs_checked(_install_checked)
    def load_state_dict(self, state: dict) -> None:
        """Restore the forecasters' state (all checked first, by this object's ``validate_state_dict``; nothing changes on an error)."""
        if checked_installer(self.forecasters) is None and validates_quietly(self):
            # forecasters with their own check or load, which is all this class's check is: theirs, as given
            self.forecasters.load_state_dict(state)
        else:  # a subclass's own check too, whatever forecasters it holds (then their own load, with its clean copy)
            ForecasterSignals._install_checked(self, self.validate_state_dict(state))
