"""Checkpoints of a population and its server that lose nothing.

A checkpoint is one ``.npz`` file (read back with ``allow_pickle=False``)
holding everything a run needs to continue bit for bit: the game's weights
and policy, the agents' states and online costs, the mean fields of the last
step, the step counter and discount, the server's rule, parameters,
log-weights and update count, the state of worker-side signal sources if any,
and a format name and version.

Writes are atomic: the file is written to a temporary file in the same
folder, flushed and ``fsync``-ed, then renamed over the target with
``os.replace``; a crash at any point leaves the previous checkpoint whole
(at worst a stray ``.<name>.*.tmp`` file beside it, safe to delete).

Reads check everything (zip CRCs, format and version, every key, dtype,
shape, finiteness, the normalisation of the weights, the consistency of the
step counter and discount) before anything is changed: a corrupt, truncated
or mismatched file raises :class:`CheckpointError` and the population and
server are left as they were.

A checkpoint does not depend on how the population was run: one saved from
a :class:`~memoa_fast.Population` restores onto a
:class:`~memoa_fast.distributed.DaskPopulation` on any number of workers,
and back.

Examples
--------
>>> save_checkpoint("run.npz", population, server)          # doctest: +SKIP
>>> restore_checkpoint("run.npz", population, server)       # doctest: +SKIP
>>> ckpt = load_checkpoint("run.npz")                        # doctest: +SKIP
>>> population = ckpt.make_population(backend="numba")       # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .game import POLICIES, Game
from .server import RULES

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint", "restore_checkpoint", "save_checkpoint"]

FORMAT = "memoa-fast checkpoint"
FORMAT_VERSION = 1

_SOURCE_AGENTS, _SOURCE_SHARED = "source_agents__", "source_shared__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, corrupt, truncated, or for another population."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The checked contents of a checkpoint file.

    Attributes
    ----------
    path : str or None
        Where it was read from.
    format_version : int
    game : Game
    population : dict
        In :meth:`Population.state_dict` form.
    server : dict or None
        In :meth:`Server.state_dict` form, if a server was saved.
    source : dict or None
        ``{"agents": {name: array (N, ...)}, "shared": {name: array}}``: the
        state of the signal sources, if the population had stateful ones.
    created_by : str
    """

    path: str | None
    format_version: int
    game: Game
    population: dict
    server: dict | None
    source: dict | None
    created_by: str

    @property
    def n_agents(self) -> int:
        return self.population["states"].shape[0]

    @property
    def dim(self) -> int:
        return self.population["states"].shape[1]

    @property
    def t(self) -> int:
        return self.population["t"]

    def check_compatible(self, population, server=None, source=None) -> None:
        """Raise :class:`CheckpointError` unless this checkpoint can be loaded into these objects."""
        where = self.path or "checkpoint"
        n, d = self.n_agents, self.dim
        if (population.n_agents, population.dim) != (n, d):
            raise CheckpointError(
                f"{where} holds {n} agents of dimension {d}, the population has {population.n_agents} of dimension "
                f"{population.dim}"
            )
        if population.game != self.game:
            raise CheckpointError(f"{where} was saved for {self.game!r}, the population plays {population.game!r}")
        if server is not None:
            if self.server is None:
                raise CheckpointError(f"{where} holds no server state; restore without server=")
            if (server.n_agents, server.dim) != (n, d):
                raise CheckpointError(f"{where} holds {n} agents of dimension {d}, the server mixes {server.n_agents} of dimension {server.dim}")
            for key in ("rule", "eta", "alpha"):
                if self.server[key] != getattr(server, key):
                    raise CheckpointError(f"{where} was saved with server {key}={self.server[key]!r}, this server has {key}={getattr(server, key)!r}")
        factory = getattr(population, "signal_factory", None)
        if self.source is not None and factory is None and source is None and hasattr(population, "signal_factory"):
            raise CheckpointError(
                f"{where} holds the state of worker-side signal sources, but this population has no signals= factory"
            )
        if source is not None and self.source is None:
            raise CheckpointError(f"{where} holds no signal-source state to load into source=")

    def make_population(self, *, client=None, **kwargs):
        """A new population in this checkpoint's state: a :class:`~memoa_fast.Population`, or a
        :class:`~memoa_fast.distributed.DaskPopulation` when ``client`` is given (``kwargs`` go to the class)."""
        from .distributed import make_population

        population = make_population(self.game, self.n_agents, self.dim, client=client, **kwargs)
        restore_checkpoint(self, population)
        return population

    def make_server(self, population=None, **kwargs):
        """A new server in this checkpoint's state: a :class:`~memoa_fast.Server`, or a
        :class:`~memoa_fast.distributed.DaskServer` for a sharded ``population``."""
        if self.server is None:
            raise CheckpointError(f"{self.path or 'checkpoint'} holds no server state")
        params = {k: self.server[k] for k in ("rule", "eta", "alpha")}
        from .distributed import DaskPopulation

        if isinstance(population, DaskPopulation):
            from .distributed import DaskServer

            server = DaskServer(population, **params, **kwargs)
        else:
            from .server import Server

            server = Server(self.n_agents, self.dim, **params, **kwargs)
        server.load_state_dict(self.server)
        return server


# =========================================================================== save
def save_checkpoint(path, population, server=None, *, source=None) -> Path:
    """Write ``population`` (and ``server``) to ``path`` atomically; return the path.

    Parameters
    ----------
    path : str or os.PathLike
        The file (``.npz`` by convention); its folder must exist.
    population : Population or DaskPopulation
        Anything with ``state_dict()`` in :meth:`Population.state_dict` form;
        a sharded population's arrays are gathered here (N x (d + 2) x 8 bytes).
    server : Server or DaskServer, optional
    source : object, optional
        A single-process signal source with ``state_dict()`` in the
        ``{"agents", "shared"}`` form (a :class:`DaskPopulation` saves its
        workers' sources itself).
    """
    path = Path(path)
    state = population.state_dict()
    arrays = {
        "format": np.array(FORMAT),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "created_by": np.array(_created_by()),
        "game_q": np.array(population.game.q),
        "game_kappa": np.array(population.game.kappa),
        "game_r": np.array(population.game.r),
        "game_gamma": np.array(population.game.gamma),
        "game_policy": np.array(population.game.policy),
        "states": np.asarray(state["states"], dtype=np.float64),
        "costs": np.asarray(state["costs"], dtype=np.float64),
        "mean_state": np.asarray(state["mean_state"], dtype=np.float64),
        "mean_signal": np.asarray(state["mean_signal"], dtype=np.float64),
        "t": np.array(state["t"], dtype=np.int64),
        "discount": np.array(state["discount"], dtype=np.float64),
        "n_finite_signals": np.array(state.get("n_finite_signals", 0), dtype=np.int64),
    }
    if server is not None:
        if (server.n_agents, server.dim) != (population.n_agents, population.dim):
            raise ValueError(
                f"server mixes {server.n_agents} agents of dimension {server.dim}, the population has "
                f"{population.n_agents} of dimension {population.dim}"
            )
        sstate = server.state_dict()
        arrays.update(
            server_rule=np.array(sstate["rule"]),
            server_eta=np.array(sstate["eta"], dtype=np.float64),
            server_alpha=np.array(sstate["alpha"], dtype=np.float64),
            server_n_updates=np.array(sstate["n_updates"], dtype=np.int64),
            server_log_weights=np.asarray(sstate["log_weights"], dtype=np.float64),
        )
    source_state = source.state_dict() if source is not None else state.get("source")
    if source_state is not None:
        for name, value in source_state["agents"].items():
            arrays[_SOURCE_AGENTS + name] = np.asarray(value)
        for name, value in source_state["shared"].items():
            arrays[_SOURCE_SHARED + name] = np.asarray(value)
    for name, value in arrays.items():
        if value.dtype == object:
            raise TypeError(f"checkpoint entry {name!r} is not a plain array (dtype object); it cannot be saved without pickle")
    _atomic_savez(path, arrays)
    record = getattr(population, "_record_checkpoint", None)
    if record is not None:
        record(path, state["t"])
    return path


def _created_by() -> str:
    from . import __version__

    return f"memoa-fast {__version__}"


def _atomic_savez(path: Path, arrays: dict) -> None:
    """``np.savez`` to a temporary file in ``path``'s folder, fsync, then ``os.replace`` over ``path``."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (not possible on every file system).
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# =========================================================================== load
def load_checkpoint(path) -> Checkpoint:
    """Read and check the checkpoint at ``path`` completely; raise :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        # Our own handle: np.load leaks its file when a truncated zip makes it fail.
        with open(path, "rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path} is a single .npy array, not a memoa-fast checkpoint (.npz)")
            with npz:
                data = {name: npz[name] for name in npz.files}  # reads every member: zip CRCs are checked here
    except CheckpointError:
        raise
    # A damaged zip or .npy header raises almost anything (BadZipFile, zlib.error,
    # EOFError, ValueError, NotImplementedError for a flipped compression method,
    # RuntimeError for a flipped encryption bit...): all mean the same here.
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is not a readable memoa-fast checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}. "
            "Use an earlier checkpoint."
        ) from exc
    return _parse(data, str(path))


def _parse(data: dict, where: str) -> Checkpoint:
    def fail(message):
        raise CheckpointError(f"{where}: {message}")

    def get(name, kind, shape=None):
        if name not in data:
            fail(f"entry {name!r} is missing (truncated or not a memoa-fast checkpoint)")
        arr = data[name]
        if kind == "str":
            if arr.dtype.kind != "U" or arr.ndim != 0:
                fail(f"entry {name!r} must be a string, got dtype {arr.dtype} shape {arr.shape}")
            return str(arr)
        if kind == "int":
            if arr.dtype.kind not in "iu" or arr.ndim != 0:
                fail(f"entry {name!r} must be an integer, got dtype {arr.dtype} shape {arr.shape}")
            return int(arr)
        if arr.dtype != np.float64:
            fail(f"entry {name!r} must be float64, got {arr.dtype}")
        if kind == "float":
            if arr.ndim != 0:
                fail(f"entry {name!r} must be a scalar, got shape {arr.shape}")
            value = float(arr)
            if not math.isfinite(value):
                fail(f"entry {name!r} must be finite, got {value!r}")
            return value
        if shape is not None and arr.shape != shape:
            fail(f"entry {name!r} must have shape {shape}, got {arr.shape}")
        if not np.isfinite(arr).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            fail(f"entry {name!r} has a non-finite value at index {bad}")
        return np.ascontiguousarray(arr)

    if "format" not in data or data["format"].dtype.kind != "U" or str(data["format"]) != FORMAT:
        fail(f"not a memoa-fast checkpoint (no format marker {FORMAT!r})")
    version = get("format_version", "int")
    if version > FORMAT_VERSION:
        fail(f"format version {version} was written by a newer memoa-fast; this one reads up to version {FORMAT_VERSION}")
    if version < 1:
        fail(f"format version {version} is not valid")
    created_by = get("created_by", "str")

    policy = get("game_policy", "str")
    if policy not in POLICIES:
        fail(f"unknown policy {policy!r}")
    try:
        game = Game(get("game_q", "float"), get("game_kappa", "float"), get("game_r", "float"), get("game_gamma", "float"), policy)
    except (TypeError, ValueError) as exc:
        fail(f"invalid game weights: {exc}")

    states = data.get("states")
    if states is None or states.ndim != 2 or states.shape[0] < 1 or states.shape[1] < 1:
        fail(f"entry 'states' must have shape (n_agents, dim), got {None if states is None else states.shape}")
    n, d = states.shape
    states = get("states", "array", (n, d))
    costs = get("costs", "array", (n,))
    if (costs < 0).any():
        fail(f"entry 'costs' has a negative online cost at agent {int(np.argmax(costs < 0))}")
    t = get("t", "int")
    if t < 0:
        fail(f"step counter t must be >= 0, got {t}")
    discount = get("discount", "float")
    expected = game.gamma**t
    if not (0.0 <= discount <= 1.0) or not math.isclose(discount, expected, rel_tol=1e-9, abs_tol=1e-300):
        fail(f"discount {discount!r} does not match gamma**t = {game.gamma!r}**{t} = {expected!r}")
    n_finite = get("n_finite_signals", "int")
    if not 0 <= n_finite <= n:
        fail(f"n_finite_signals must be in [0, {n}], got {n_finite}")
    population = {
        "states": states,
        "costs": costs,
        "mean_state": get("mean_state", "array", (d,)),
        "mean_signal": get("mean_signal", "array", (d,)),
        "t": t,
        "discount": discount,
        "n_finite_signals": n_finite,
        "game": game.to_dict(),
    }

    server = None
    if any(name.startswith("server_") for name in data):
        rule = get("server_rule", "str")
        if rule not in RULES:
            fail(f"unknown server rule {rule!r}")
        eta, alpha = get("server_eta", "float"), get("server_alpha", "float")
        if eta < 0 or not 0.0 <= alpha <= 1.0:
            fail(f"server eta must be >= 0 and alpha in [0, 1], got eta={eta!r}, alpha={alpha!r}")
        n_updates = get("server_n_updates", "int")
        if n_updates < 0:
            fail(f"server n_updates must be >= 0, got {n_updates}")
        log_p = get("server_log_weights", "array", (n,))
        total = float(np.logaddexp.reduce(log_p))
        if abs(total) > 1e-9:
            fail(f"server log-weights are not normalised (log-sum-exp {total!r}, expected 0)")
        server = {"log_weights": log_p, "n_updates": n_updates, "rule": rule, "eta": eta, "alpha": alpha}

    source = None
    agents = {k[len(_SOURCE_AGENTS):]: v for k, v in data.items() if k.startswith(_SOURCE_AGENTS)}
    shared = {k[len(_SOURCE_SHARED):]: v for k, v in data.items() if k.startswith(_SOURCE_SHARED)}
    if agents or shared:
        for name, value in agents.items():
            if value.ndim < 1 or value.shape[0] != n:
                fail(f"signal-source entry 'agents/{name}' must have {n} rows, got shape {value.shape}")
        source = {"agents": agents, "shared": shared}

    return Checkpoint(
        path=where, format_version=version, game=game, population=population, server=server, source=source,
        created_by=created_by,
    )


# =========================================================================== restore
def restore_checkpoint(checkpoint, population, server=None, *, source=None) -> Checkpoint:
    """Load a checkpoint (a path or a :class:`Checkpoint`) into ``population`` (and ``server``, ``source``).

    Everything is read and checked against the targets first; a bad or
    mismatched checkpoint raises :class:`CheckpointError` and changes nothing.
    A :class:`~memoa_fast.distributed.DaskPopulation` takes the checkpoint on
    its current shards, whatever their number. Returns the checkpoint.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    ckpt.check_compatible(population, server, source)
    state = dict(ckpt.population)
    if ckpt.source is not None and getattr(population, "signal_factory", None) is not None:
        state["source"] = ckpt.source
    population.load_state_dict(state)
    if server is not None:
        server.load_state_dict(ckpt.server)
    if source is not None:
        source.load_state_dict(ckpt.source)
    record = getattr(population, "_record_checkpoint", None)
    if record is not None and ckpt.path is not None:
        record(ckpt.path, ckpt.t)
    return ckpt
