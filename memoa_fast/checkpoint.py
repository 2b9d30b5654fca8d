"""Checkpoints of a population and its server that lose nothing.

A checkpoint is one ``.npz`` file (a zip of ``.npy`` members, never a
pickle) holding everything a run needs to continue bit for bit: the game,
the agents' states and online costs (and class labels when the game has
several classes), the mean fields of the last step, the step counter and
discount, the server's rule, parameters, log-weights and update count, the
state of the signal sources if any, and a format name and version.

Writes are atomic: the file is written to a temporary file
``.<name>.XXXXXXXX.tmp`` in the same folder, flushed and ``fsync``-ed, then
renamed over the target with ``os.replace``; a crash at any point leaves the
previous checkpoint whole. Temporary files that a killed save left behind
are removed by the next successful save to the same path. A checkpoint path
that is a symbolic link is followed, on writing as on reading: the file it
points to is replaced and the link is kept. A path that is a device, a named
pipe or a socket (``/dev/null``) is refused: the rename would replace it.

Reads never inflate a member before checking it. The zip's directory is read
first; a member with an unknown name, a compression other than stored or
deflate, or a ``.npy`` header whose dtype, shape or size disagrees with what
the checkpoint (or the target) needs is refused before its data is read, so
a small file cannot make the reader allocate gigabytes (a "decompression
bomb"). Then everything is checked (zip CRCs, format and version, every key,
dtype, shape, range, the normalisation of the weights, the step counter and
discount) with the same validators as ``load_state_dict``
(:mod:`memoa_fast._state`), before anything is changed: a corrupt,
truncated or mismatched file raises :class:`CheckpointError` and the
population, the server and the signal source are left as they were.

A checkpoint does not depend on how the population was run: any engine whose
``state_dict`` has the population keys restores any other's checkpoint.

Sharded checkpoints (what a :class:`~memoa_fast.distributed.DaskPopulation`
writes by default) keep the agents out of the client: each shard writes its
rows (states, costs, labels, server log-weights, its signal source's per-agent
arrays) to its own file ``<path>.shards/<token>.<shard>.npz`` on its worker,
and the client then writes the manifest at ``path`` (format version 3): the
game, N, d, the step counter, discount, mean fields and count of valid
signals, the server's rule, parameters and update count, the sources' shared
state, and the list of shard files with their ``[lo, hi)`` ranges, sizes and
the SHA-256 of their zip directories. Every file of a save carries the save's
token in its name, so a save never touches the files the current manifest
names; the manifest, replaced atomically and last, switches from one
complete set to the next, and only then are the previous set's files (and
the debris of killed saves) deleted. A set without its manifest, or whose
files do not match it (missing, truncated, another save's, corrupt: every
member's CRC-32 is checked by streaming it to its end), is never loaded.
:func:`load_checkpoint` reads a whole set on one machine;
:func:`restore_checkpoint` onto a ``DaskPopulation`` lets each shard read the
rows it needs, from as many files as hold them, whatever the shard counts.
The folder must be visible at the same path to the client and every worker.

Examples
--------
>>> save_checkpoint("run.npz", population, server)          # doctest: +SKIP
>>> restore_checkpoint("run.npz", population, server)       # doctest: +SKIP
>>> ckpt = load_checkpoint("run.npz")                        # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._exclusive import Exclusive
from ._state import RULES, check_population_state, check_server_state, check_source_layout, n_classes_of
from ._validation import as_file_path, available_memory, check_int, load_checked, open_to_read, special_kind
from .game import POLICIES, Game

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST_VERSION", "Checkpoint", "CheckpointError", "Manifest", "load_checkpoint",
    "read_manifest", "restore_checkpoint", "save_checkpoint",
]

FORMAT = "memoa-fast checkpoint"
#: 2: the game as one JSON member ``game``, ``n_valid_signals``, and ``labels`` and
#: ``class_mean_signal`` for games of several classes. Version 1 files
#: (``game_q`` ... ``game_policy``, ``n_finite_signals``) are read too.
FORMAT_VERSION = 2

_SOURCE_AGENTS, _SOURCE_SHARED = "source_agents__", "source_shared__"

# Every member a checkpoint may hold, with the kind of its data. Scalars are
# 0-d arrays; "str" members are 0-d unicode arrays of at most _STR_CHARS
# characters (the game's JSON at most _GAME_CHARS).
_SCALARS = {
    "format": "str", "format_version": "int", "created_by": "str", "game": "str",
    "game_q": "float", "game_kappa": "float", "game_r": "float", "game_gamma": "float", "game_policy": "str",
    "t": "int", "discount": "float", "n_valid_signals": "int", "n_finite_signals": "int",
    "server_rule": "str", "server_eta": "float", "server_alpha": "float", "server_n_updates": "int",
}
# Arrays, with their shape in terms of N (agents), d (dimension) and K (classes).
_ARRAYS = {
    "states": ("N", "d"), "costs": ("N",), "labels": ("N",), "mean_state": ("d",), "mean_signal": ("d",),
    "class_mean_signal": ("K", "d"), "class_signalled": ("K",), "server_log_weights": ("N",),
}
_STR_CHARS = 1024
# A signal source keeps small shared arrays and a few numbers per agent: these
# bounds (in values) refuse a source member before it is inflated.
_SOURCE_SHARED_MAX = 1 << 20
_SOURCE_PER_AGENT_MAX = 1 << 16
_GAME_CHARS = 1 << 24
_MAX_MEMBERS = 4096
_EOCD_SIZE = 22  # a zip end-of-central-directory record without its comment
_TMP_NAME = r"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp"  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")


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
        The population state, as returned by
        :func:`~memoa_fast._state.check_population_state`.
    server : dict or None
        The server state (:func:`~memoa_fast._state.check_server_state`), if a server was saved.
    source : dict or None
        ``{"agents": {name: array (N, ...)}, "shared": {name: array}}``: the
        state of the signal source, if one was saved.
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
        """N, the number of agents saved."""
        return self.population["states"].shape[0]

    @property
    def dim(self) -> int:
        """d, the state dimension saved."""
        return self.population["states"].shape[1]

    @property
    def t(self) -> int:
        """The step counter saved: the number of steps taken before the save."""
        return self.population["t"]

    def check_compatible(self, population, server=None, source=None) -> tuple[dict, dict | None, dict | None]:
        """Check this checkpoint against the targets; return their checked states, changing nothing.

        Returns ``(population_state, server_state, source_state)`` ready for
        the targets' ``load_state_dict`` (``None`` where there is no target).
        ``source_state`` went through ``source.validate_state_dict`` when the
        source has that method. Raises :class:`CheckpointError`.
        """
        where = self.path or "checkpoint"
        n, d = self.n_agents, self.dim
        if (population.n_agents, population.dim) != (n, d):
            raise CheckpointError(
                f"{where} holds {n} agents of dimension {d}, the population has {population.n_agents} of dimension "
                f"{population.dim}"
            )
        if population.game != self.game:
            raise CheckpointError(f"{where} was saved for {self.game!r}, the population plays {population.game!r}")
        try:
            pop_state = check_population_state(self.population, game=population.game, n_agents=n, dim=d)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        server_state = None
        if server is not None:
            if self.server is None:
                raise CheckpointError(f"{where} holds no server state; restore without server=")
            if (server.n_agents, server.dim) != (n, d):
                raise CheckpointError(
                    f"{where} holds {n} agents of dimension {d}, the server mixes {server.n_agents} of dimension {server.dim}"
                )
            for key in ("rule", "eta", "alpha"):
                if self.server[key] != getattr(server, key):
                    raise CheckpointError(
                        f"{where} was saved with server {key}={self.server[key]!r}, this server has {key}={getattr(server, key)!r}"
                    )
            try:
                server_state = check_server_state(self.server, n_agents=n, rule=server.rule, eta=server.eta, alpha=server.alpha)
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
        if self.source is not None and hasattr(population, "signal_factory"):
            if population.signal_factory is None and source is None:
                raise CheckpointError(
                    f"{where} holds the state of worker-side signal sources, but this population has no signals= factory"
                )
        source_state = None
        if source is not None:
            if self.source is None:
                raise CheckpointError(f"{where} holds no signal-source state to load into source=")
            source_state = check_source_layout(self.source, n_agents=n)
            validate = getattr(source, "validate_state_dict", None)
            if validate is not None:
                try:
                    source_state = validate(source_state)
                except (ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(
                        f"{where}: the signal source refuses the saved state: {type(exc).__name__}: {exc}"
                    ) from None
        return pop_state, server_state, source_state


# =========================================================================== save
def save_checkpoint(path, population, server=None, *, source=None, sharded: bool | None = None) -> Path:
    """Write ``population`` (and ``server``, ``source``) to ``path`` atomically; return the path written.

    Parameters
    ----------
    path : str or os.PathLike
        The file (``.npz`` by convention); its folder must exist. If ``path``
        is a symbolic link, the link is followed: the file it points to is
        replaced (atomically, by a temporary file in *that* file's folder)
        and the link is left as it is, still pointing to the new file. The
        returned path is ``path`` as given.
    population : Population
        Anything with ``game``, ``n_agents``, ``dim`` and ``state_dict()`` in
        the population-state form (:func:`~memoa_fast._state.check_population_state`);
        a sharded population's arrays are gathered here.
    server : Server, optional
        Anything with ``n_agents``, ``dim`` and a server ``state_dict()``.
    source : object, optional
        A signal source with ``state_dict()`` in the ``{"agents", "shared"}``
        form (a population with worker-side sources puts theirs in its own
        state under ``"source"``).
    sharded : bool, optional
        Write a sharded checkpoint: each shard of the population writes its
        own file and ``path`` becomes the manifest (see
        :meth:`memoa_fast.distributed.DaskPopulation.save`). Default: True for
        a population whose shards can write their own files (a
        ``DaskPopulation``), False otherwise; False gathers every array here
        and writes one file.

    Raises
    ------
    ValueError
        If a state does not pass its validator (then the file could not be
        restored, so none is written), or if ``path`` is a device, a named
        pipe or a socket (the rename would replace it); the previous
        checkpoint is untouched.
    RuntimeError
        If another thread's call (a step, an update) of the population,
        server or source began or ran while their states were read: the
        states are read together in one checked read of the objects' locks,
        which takes no hold, so that call is served and the save is refused
        instead, before anything is written (save between steps). Also after
        an interrupted update, with that object's message. (A
        ``DaskPopulation`` holds its guard for the whole save instead: its
        reads message the shards.)

    Notes
    -----
    The file is written as ``.<name>.XXXXXXXX.tmp`` beside the target,
    ``fsync``-ed and renamed with ``os.replace``, then the folder is
    ``fsync``-ed. After the rename, temporary files of the same target name
    that are older than this save (left by saves that were killed) are
    deleted; a temporary file (or a sharded save's set) still being written
    is kept, where the file system supports locks. Two processes saving to
    the same path at the same time are not supported: the last to finish
    wins.
    """
    held = getattr(population, "_checkpoint_call", None)  # a DaskPopulation: one caller for the whole save
    if held is not None:
        return held("save_checkpoint", _save_checkpoint, path, population, server, source, sharded, False)
    return _save_checkpoint(path, population, server, source, sharded, True)


def _class_signalled_member(population: dict):
    """A population state's ``class_signalled`` as a file's int64 member, or None when ``t`` says as much.

    A file without the member counts every class as signalled past round 0 and none at round 0; only a class
    still silent past round 0 (or a state loaded with flags at round 0) needs it. Left out otherwise, so that
    a file is read by the versions before the member (they refuse a member they do not know as tampering).
    """
    flags = population.get("class_signalled")
    if flags is None:
        return None
    flags = np.asarray(flags, dtype=np.int64)
    return None if (flags == int(population["t"] > 0)).all() else flags


def _save_checkpoint(path, population, server, source, sharded, checked) -> Path:
    """:func:`save_checkpoint`'s body; ``checked``: take the states in one checked read (:func:`_states_of_one_round`)."""
    if sharded is not None and not isinstance(sharded, (bool, np.bool_)):
        raise TypeError(f"sharded must be True, False or None, got {sharded!r} of type {type(sharded).__name__}")
    _check_engines(population, server, source, saving=True)
    path = _checkpoint_path("path", path, reading=False)
    writer = getattr(population, "_save_shards", None)
    if sharded is None:
        sharded = writer is not None
    if sharded:
        if writer is None:
            raise ValueError(
                f"sharded=True needs a population whose shards write their own files (a DaskPopulation), "
                f"got {type(population).__name__}"
            )
        if source is not None:
            raise ValueError("a sharded checkpoint saves the shards' own signal sources: pass source=None (or sharded=False)")
        return writer(path, server)
    given = Path(path)
    target = Path(os.path.realpath(given))  # follow a symlink: replace the file, keep the link
    started = time.time()
    take = _states_of_one_round if checked else _states
    state, game, server_state, source_state = take(population, server, source)
    try:
        pop = check_population_state(state, game=game, n_agents=population.n_agents, dim=population.dim)
    except ValueError as exc:
        raise ValueError(f"cannot save a checkpoint of this population: {exc}") from None
    arrays = {
        "format": np.array(FORMAT),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "created_by": np.array(_created_by()),
        "game": np.array(json.dumps(game.to_dict(), allow_nan=False, sort_keys=True)),
        "states": pop["states"],
        "costs": pop["costs"],
        "mean_state": pop["mean_state"],
        "mean_signal": pop["mean_signal"],
        "t": np.array(pop["t"], dtype=np.int64),
        "discount": np.array(pop["discount"], dtype=np.float64),
        "n_valid_signals": np.array(pop["n_valid_signals"], dtype=np.int64),
    }
    if n_classes_of(game) > 1:
        arrays["labels"] = pop["labels"]
        arrays["class_mean_signal"] = pop["class_mean_signal"]
        flags = _class_signalled_member(pop)
        if flags is not None:
            arrays["class_signalled"] = flags
    if server is not None:
        if (server.n_agents, server.dim) != (population.n_agents, population.dim):
            raise ValueError(
                f"server mixes {server.n_agents} agents of dimension {server.dim}, the population has "
                f"{population.n_agents} of dimension {population.dim}"
            )
        try:
            sstate = check_server_state(server_state, n_agents=server.n_agents, rule=server.rule, eta=server.eta, alpha=server.alpha)
        except ValueError as exc:
            raise ValueError(f"cannot save a checkpoint of this server: {exc}") from None
        arrays.update(
            server_rule=np.array(sstate["rule"]),
            server_eta=np.array(sstate["eta"], dtype=np.float64),
            server_alpha=np.array(sstate["alpha"], dtype=np.float64),
            server_n_updates=np.array(sstate["n_updates"], dtype=np.int64),
            server_log_weights=sstate["log_weights"],
        )
    if source_state is None:
        source_state = state.get("source")
    if source_state is not None:
        try:
            source_state = check_source_layout(source_state, n_agents=population.n_agents)
        except ValueError as exc:
            raise ValueError(f"cannot save a checkpoint of this signal source: {exc}") from None
        for name, value in source_state["agents"].items():
            arrays[_SOURCE_AGENTS + name] = value
        for name, value in source_state["shared"].items():
            arrays[_SOURCE_SHARED + name] = value
    _atomic_savez(target, arrays)
    _remove_stale_temporaries(target, started)
    remove_shard_files(shard_folder(target), before=started)  # a sharded set this file replaced
    record = getattr(population, "_record_checkpoint", None)
    if record is not None:
        record(given, pop["t"])
    return given


def _states(population, server, source) -> tuple:
    """``(population state, its game, server state or None, source state or None)``: each object's ``state_dict()``.

    The game too: ``set_game`` replaces it between steps, so one read after the states could be of a later round
    than they are (the save then refused the population's own state as another game's).
    """
    return (population.state_dict(), population.game, None if server is None else server.state_dict(),
            None if source is None else source.state_dict())


def _states_of_one_round(population, server, source) -> tuple:
    """:func:`_states` in one checked read of every object's lock (nested :meth:`Exclusive.read`, no hold taken).

    A checkpoint saved from another thread than the one that steps never makes that thread's call refuse: if a
    call of any of these objects began or ran while their states were read (a population of round t with a server
    of round t + 1, or a state_dict's copy of rows of two rounds), ``RuntimeError`` naming it, before anything is
    written (the file at the path, if any, is untouched). An object without an :class:`Exclusive` (``_exclusive``)
    is read as it reads itself.
    """
    take = functools.partial(_states, population, server, source)
    guards = [ex for ex in (getattr(obj, "_exclusive", None) for obj in (population, server, source)) if isinstance(ex, Exclusive)]
    for ex in guards:
        take = functools.partial(ex.read, take)
    try:
        return take()
    except RuntimeError as exc:
        # Only a guard's refusal of an overlap is reworded: after an interrupted update its message says how to go
        # on, and a source's own RuntimeError is its own.
        if any(ex.interrupted is not None for ex in guards) or not any(str(exc).startswith(ex._busy) for ex in guards):
            raise
        raise RuntimeError(f"save_checkpoint: the state was being changed while it was read ({exc}), so no checkpoint was "
                           "written (a file already at the path is untouched): save between steps, from the thread that "
                           "steps these objects or while no thread does") from exc


def _created_by() -> str:
    try:
        version = importlib.metadata.version("memoa-fast")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"memoa-fast {version}"


def _write_npz(fileobj, arrays: dict) -> None:
    """Write ``arrays`` to ``fileobj`` as ``np.savez`` does, and close the archive whatever happens.

    The format is ``np.savez``'s: one stored member ``<key>.npy`` per array, zip64 headers. ``np.savez``
    itself is not used because NumPy before 2.0 leaves its ``ZipFile`` open when a member's write fails
    (a full disk): that object's finaliser then raises into ``sys.unraisablehook`` at some later garbage
    collection, an error under ``-W error``. No array here is an object array, so pickles are refused.
    """
    archive = zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
    try:
        for key, value in arrays.items():
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    finally:
        archive.close()


def _atomic_savez(path: Path, arrays: dict) -> None:
    """:func:`_write_npz` to a temporary file in ``path``'s folder, fsync, then ``os.replace`` over ``path``."""
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {path}: folder {folder} does not exist")
    # Locked while written, so a concurrent save of the same checkpoint (its stale-file cleanup) keeps it; renamed
    # before the lock ends (POSIX renames an open file; where there is no fcntl, after closing it).
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                os.replace(tmp, path)
        if fcntl is None:  # pragma: no cover - Windows
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


def _remove_stale_temporaries(path: Path, started: float) -> list[str]:
    """Delete ``.<name>.XXXXXXXX.tmp`` files beside ``path`` last modified before ``started``; return their names.

    A file that a live process holds a lock on (:func:`_lock_temporary`: a writer still writing it, however long
    ago it started) is not stale and is kept; so is one this process cannot open for writing (another user's).
    """
    pattern = re.compile(_TMP_NAME.format(name=re.escape(path.name)) + r"\Z")
    removed = []
    with contextlib.suppress(OSError):
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if not pattern.match(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    if (entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < started
                            and not _held_by_a_live_process(entry.path)):
                        os.unlink(entry.path)
                        removed.append(entry.name)
    return removed


def _held_by_a_live_process(path) -> bool:
    """Whether the file at ``path`` is not debris: a live process holds its :func:`_lock_temporary` lock.

    So is a file this process cannot open for writing (another user's). False where it is gone, or unlocked, or
    the file system has no locks (then the age alone decides). The temporaries' cleanup and the sharded saves'
    live marks (:func:`_save_is_live`) ask the same question.
    """
    try:
        # Opened for writing: where flock is emulated by byte-range locks (NFS, SMB) an exclusive lock needs it
        # (else EBADF, which would read as "no locks" and delete a live file).
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # its writer is alive
        return True
    except OSError:  # a file system without locks
        pass
    finally:
        os.close(fd)
    return False


def _new_temporary(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``path``, open and locked (:func:`_lock_temporary`).

    Named ``.<name>.XXXXXXXX.tmp`` (``_TMP_NAME``), the names :func:`_remove_stale_temporaries` looks for: checkpoint
    saves and ``memoa run``'s output files make theirs here.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _lock_temporary(fd)
    return fd, tmp


def _lock_temporary(fd: int) -> None:
    """Mark the temporary file open at ``fd`` as being written, until ``fd`` is closed.

    :func:`_remove_stale_temporaries` keeps it meanwhile; the lock ends with the process, so a killed writer's file
    is stale. Where there is no ``fcntl`` (Windows), an open file cannot be deleted anyway.
    """
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: unprotected, as without this mark
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# =========================================================================== load
def load_checkpoint(path, *, n_agents: int | None = None, dim: int | None = None) -> Checkpoint:
    """Read and check the checkpoint at ``path`` completely; raise :class:`CheckpointError` if it is unusable.

    Parameters
    ----------
    path : str or os.PathLike
    n_agents, dim : int, optional
        The N and d the caller needs: a file for another size is refused from
        its ``.npy`` headers, before any data is read.

    Notes
    -----
    Nothing is inflated before it is checked. The zip directory is read
    first: only the members a checkpoint may hold (by name), stored or
    deflated, at most 4096 of them. Then each member's ``.npy`` header (a
    few hundred bytes at its start): its dtype must be the one its name
    needs, its shape must agree with ``(N, d, K)`` (from the ``states``
    header, or from ``n_agents``/``dim`` when given, and from the game; a
    signal source's members may hold at most 2**16 values per agent and
    2**20 shared values), and
    its uncompressed size in the zip directory must be exactly header plus
    ``prod(shape) x itemsize``. The sum of the sizes must fit in the memory
    this process may use. Only then is the data read, exactly that many
    bytes per member, with the zip CRC checked.
    """
    n_agents, dim = _wanted_size(n_agents, dim)
    path = _checkpoint_path("path", path, reading=True)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if is_manifest(path):
        return _load_manifest_checkpoint(path, n_agents, dim)
    where = str(path)
    try:
        with _open_to_read(path, where) as fh:
            if fh.read(6) == b"\x93NUMPY":
                raise CheckpointError(f"{path} is a single .npy array, not a memoa-fast checkpoint (.npz)")
            fh.seek(0)
            data = _read_members(fh, where, n_agents, dim)
    except (CheckpointError, MemoryError):
        raise
    # A damaged zip or .npy header raises almost anything (BadZipFile, zlib.error,
    # EOFError, ValueError, NotImplementedError for a flipped compression method,
    # RuntimeError for a flipped encryption bit...): all mean the same here.
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is not a readable memoa-fast checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}. "
            "Use an earlier checkpoint."
        ) from exc
    return _parse(data, where)


def _checkpoint_path(name: str, path, *, reading: bool) -> Path:
    """``path`` as a :class:`~pathlib.Path`: a ``str`` or ``os.PathLike``, and not a folder (nor a link to one).

    Raises ``TypeError`` naming ``name``, or ``IsADirectoryError`` (its message says whether a checkpoint was
    to be read or written there).
    """
    path = as_file_path(name, path, "the checkpoint file")
    if path.is_dir():  # follows links
        if reading:
            raise IsADirectoryError(f"cannot read checkpoint {str(path)!r}: it is a folder, not a checkpoint file")
        raise IsADirectoryError(f"cannot write checkpoint {str(path)!r}: it is a folder, not a file; give a file name "
                                f"such as {os.path.join(path, 'run.npz')!r}")
    kind = special_file(path)
    if kind:
        if reading:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it is {kind}, not a checkpoint file")
        # A save renames a new file into place: /dev/null (as root), a named pipe or a socket would be replaced by it.
        raise ValueError(f"cannot write checkpoint {str(path)!r}: it is {kind}, not a regular file, and a save renames "
                         f"a new file into place, which would replace it; give a file name such as 'run.npz'")
    return path


def special_file(path) -> str:
    """What ``path`` is when it exists and is neither a regular file nor a folder (a link followed), else ``""``.

    ``"a character device"`` (``/dev/null``), ``"a block device"``, ``"a named pipe"`` or ``"a socket"``: what an atomic
    write (a new file renamed into place) must not replace. Checkpoints and ``memoa run``'s output files ask it.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # no such file (a new one), or not reachable: the folder checks name it
        return ""
    return special_kind(mode)


def _open_to_read(path, where: str):
    """``path`` opened to read (binary), refused with ``CheckpointError`` unless it is a regular file (a link followed).

    Every file a load opens comes through here (the checkpoint, a manifest, each shard file), so what is checked is
    the very file read (:func:`memoa_fast._validation.open_to_read`: one open, without blocking, then its ``fstat``).
    """
    def check(st):
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else special_kind(st.st_mode) or "not a regular file"
            raise CheckpointError(f"{where}: it is {kind}, not a checkpoint file")

    return open_to_read(path, check)[0]


def _fail(where, message):
    raise CheckpointError(f"{where}: {message}")


def _wanted_size(n_agents, dim) -> tuple[int | None, int | None]:
    """The caller's ``n_agents`` and ``dim`` (each optional), checked as integers >= 1."""
    return (None if n_agents is None else check_int("n_agents", n_agents, low=1),
            None if dim is None else check_int("dim", dim, low=1))


def _check_size(where, n, d, n_agents, dim) -> None:
    """Refuse a checkpoint of ``n`` agents of dimension ``d`` when the caller asked for another ``n_agents`` or ``dim``."""
    if (n_agents is None or n == n_agents) and (dim is None or d == dim):
        return
    if n_agents is not None and dim is not None:
        raise CheckpointError(f"{where} holds {n} agents of dimension {d}, the population has {n_agents} of dimension {dim}")
    asked = f"n_agents={n_agents}" if dim is None else f"dim={dim}"
    raise CheckpointError(f"{where} holds {n} agents of dimension {d}, not the {asked} asked for")


def _check_engine(name: str, obj, attributes: tuple[str, ...], accepted: str) -> None:
    """``TypeError`` naming ``name`` unless ``obj`` has every attribute a checkpoint uses (instead of AttributeError later)."""
    missing = [a for a in attributes if not hasattr(obj, a)]
    if missing:
        raise TypeError(f"{name} must be {accepted}, got {type(obj).__name__} (it has no {', '.join(missing)})")


def _check_engines(population, server, source, *, saving: bool) -> None:
    """What :func:`save_checkpoint` (``saving``) or :func:`restore_checkpoint` will call on each object, checked first.

    The one check of the server on every save and restore path: a population
    that binds its servers (a ``DaskPopulation``, whose servers' weights live
    on its shards) says which it takes through its ``_check_own_server``, and
    its own ``save``/``restore`` come here rather than checking beside it.
    """
    method = "state_dict" if saving else "load_state_dict"
    _check_engine("population", population, ("game", "n_agents", "dim", method),
                  f"a population engine (Population, DaskPopulation: game, n_agents, dim, {method})")
    if server is not None:
        own_check = getattr(population, "_check_own_server", None)
        if own_check is not None:
            own_check(server)
        else:
            needs = ("n_agents", "dim", "rule", "eta", "alpha") + (("state_dict",) if saving else ())
            _check_engine("server", server, needs, f"None or a Server ({', '.join(needs)})")
            owner = getattr(server, "population", None)  # a server bound to a population (DaskServer) mixes that one's states
            if owner is not None and owner is not population:
                raise TypeError(f"server must be a {type(server).__name__} of this population (or None), got one of "
                                "another population")
    if source is not None:
        _check_engine("source", source, (method,), f"None or a signal source (with {method})")


# The .npy header is a Python dict literal. NumPy reads it with ast.literal_eval, and CPython's AST constructor
# counts its depth in one per-interpreter field: two threads parsing at once (shards restored by a Dask worker's
# threads) can fail with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905), which a
# reader can only report as a corrupt file. So the header is matched here, with no ast: the three keys NumPy
# writes, each once, a dtype string, a bool and a tuple of integers (anything else is no checkpoint member).
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # bytes: NumPy's own limit on an untrusted header (np.lib.format._MAX_HEADER_SIZE)
_NPY_SHAPE = r"\(\s*(?:\d+\s*,\s*(?:\d+\s*,\s*)*(?:\d+\s*)?)?\)"  # (), (n,), (n, m), (n, m,): a tuple, never "(n)"
# a plain dtype's str, as NumPy writes it ('<f8', '|b1', '<U5', '<M8[ns]'): np.dtype of a subarray string such as
# '(2,)<f8' parses its shape with ast.literal_eval, and a checkpoint holds no subarray
_DTYPE_STR = r"[<>|][A-Za-z][0-9]*(?:\[[A-Za-z0-9]+\])?"
_DTYPE_NAME = r"[<>|=]?[A-Za-z][A-Za-z0-9]*"  # a dtype's name in a manifest's JSON: '<f8', 'float64' (no subarray either)
_NPY_DESCR = f"'{_DTYPE_STR}'"
_NPY_TYPED_ITEM = rf"'descr'\s*:\s*{_NPY_DESCR}|'fortran_order'\s*:\s*(?:True|False)|'shape'\s*:\s*{_NPY_SHAPE}"
_NPY_ITEM = rf"'(descr|fortran_order|shape)'\s*:\s*('[^'\\]*'|True|False|{_NPY_SHAPE})"  # (key, value), once matched typed
_NPY_DICT = re.compile(rf"\{{\s*(?:(?:{_NPY_TYPED_ITEM})\s*,\s*)*(?:{_NPY_TYPED_ITEM})\s*(?:,\s*)?\}}\s*")


def _npy_header(f) -> tuple:
    """``(shape, fortran_order, dtype, header_bytes)`` of the ``.npy`` stream ``f``, read without :mod:`ast`.

    Versions 1.0 and 2.0 (what NumPy writes for these arrays); the header is a
    dict of exactly ``'descr'`` (a plain dtype's string), ``'fortran_order'`` (a bool)
    and ``'shape'`` (a tuple of integers). Anything else raises ValueError.
    """
    magic = f.read(8)
    if len(magic) != 8 or magic[:6] != _NPY_MAGIC:
        raise ValueError(f"a member is not a .npy array: it starts {magic!r}, not {_NPY_MAGIC!r}")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")
    width = 2 if version == (1, 0) else 4
    size_bytes = f.read(width)
    size = int.from_bytes(size_bytes, "little")
    if len(size_bytes) != width or size > _NPY_MAX_HEADER:
        raise ValueError(f"a .npy header of {size} bytes: more than {_NPY_MAX_HEADER}, or cut short")
    raw = f.read(size)
    text = raw.decode("latin1")
    if len(raw) != size or _NPY_DICT.fullmatch(text) is None:
        raise ValueError(f"a .npy header {text[:200]!r} is not one NumPy writes for a plain array")
    pairs = re.findall(_NPY_ITEM, text)
    items = dict(pairs)
    if len(items) != 3 or len(pairs) != 3:
        raise ValueError(f"a .npy header {text[:200]!r} must name descr, fortran_order and shape once each")
    shape = tuple(int(n) for n in re.findall(r"\d+", items["shape"]))
    try:
        dtype = np.dtype(items["descr"][1:-1])
    except TypeError as exc:  # np.dtype("foo"): TypeError (NumPy's own reader says ValueError too)
        raise ValueError(f"a .npy header's descr {items['descr'][:100]} is not a dtype: {exc}") from None
    return shape, items["fortran_order"] == "True", dtype, 8 + width + size


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """``(shape, dtype, fortran_order, header_bytes)`` of one ``.npy`` member, inflating only its first bytes."""
    with zf.open(info) as f:
        shape, fortran, dtype, offset = _npy_header(f)
        return shape, dtype, fortran, offset


def _read_members(fh, where, n_agents, dim) -> dict:
    """The members' data, each checked by name, header and size before it is read (see :func:`load_checkpoint`)."""
    def known(key):
        return key not in (_SOURCE_AGENTS, _SOURCE_SHARED) and (
            key in _SCALARS or key in _ARRAYS or key.startswith((_SOURCE_AGENTS, _SOURCE_SHARED)))

    with zipfile.ZipFile(fh) as zf:
        members = _zip_members(fh, zf, where, known)
        headers = {key: _checked_header(zf, info, key, where) for key, info in members.items()}

        def header(key):
            return headers[key][:2]

        # Scalars: shape (), the dtype their name needs, short strings.
        for key, kind in _SCALARS.items():
            if key not in headers:
                continue
            shape, dtype = header(key)
            ok = shape == () and {"str": dtype.kind == "U", "int": dtype.kind in "iu", "float": dtype == np.float64}[kind]
            if not ok:
                want = {"str": "a string", "int": "an integer", "float": "a float64"}[kind]
                _fail(where, f"entry {key!r} must be {want} scalar, got dtype {dtype} shape {shape}")
            limit = _GAME_CHARS if key == "game" else _STR_CHARS
            if kind == "str" and dtype.itemsize > 4 * limit:
                _fail(where, f"entry {key!r} is a string of {dtype.itemsize // 4} characters, longer than {limit}")

        # Sizes: N and d from the caller or the states header, K from the game (read below).
        if "states" not in headers:
            _fail(where, "entry 'states' is missing (truncated or not a memoa-fast checkpoint)")
        shape, dtype = header("states")
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            _fail(where, f"entry 'states' must have shape (n_agents, dim), got {shape}")
        _check_size(where, shape[0], shape[1], n_agents, dim)
        sizes = {"N": shape[0], "d": shape[1]}

        data = {}

        def read(key):
            if key not in data:
                data[key] = _read_member(zf, members[key], headers[key], key, where)
            return data[key]

        # The game fixes K: read the (small, checked) scalars first.
        for key in _SCALARS:
            if key in headers:
                read(key)
        sizes["K"] = n_classes_of(_make_game(_game_dict(data, where), where))

        total = 0
        for key, dims in _ARRAYS.items():
            if key not in headers:
                continue
            shape, dtype = header(key)
            want = tuple(sizes[s] for s in dims)
            if shape != want:
                _fail(where, f"entry {key!r} must have shape {want} ({', '.join(dims)}), got {shape}")
            integers = key in ("labels", "class_signalled")
            kind_ok = dtype.kind in "iu" and dtype.itemsize <= 8 if integers else dtype == np.float64
            if not kind_ok:
                _fail(where, f"entry {key!r} must be {'an integer array' if integers else 'float64'}, got {dtype}")
            total += members[key].file_size
        for key in headers:
            if key.startswith((_SOURCE_AGENTS, _SOURCE_SHARED)):
                shape, dtype = header(key)
                if dtype.kind not in "iuf":
                    _fail(where, f"signal-source entry {key!r} must hold numbers, got dtype {dtype}")
                if key.startswith(_SOURCE_AGENTS):
                    name = key[len(_SOURCE_AGENTS):]
                    if len(shape) < 1 or shape[0] != sizes["N"]:
                        _fail(where, f"signal-source entry 'agents/{name}' must have {sizes['N']} rows, got shape {shape}")
                    if math.prod(shape[1:]) > _SOURCE_PER_AGENT_MAX:
                        _fail(where, f"signal-source entry 'agents/{name}' has shape {shape}: more than "
                                     f"{_SOURCE_PER_AGENT_MAX} values per agent")
                elif math.prod(shape) > _SOURCE_SHARED_MAX:
                    name = key[len(_SOURCE_SHARED):]
                    _fail(where, f"signal-source entry 'shared/{name}' has shape {shape}: more than {_SOURCE_SHARED_MAX} values")
                total += members[key].file_size
        available = available_memory()
        if available is not None and total > available:
            _fail(where, f"its arrays need {total:,} bytes, more than the {available:,} bytes this process may use")

        for key in headers:
            read(key)
        return data


def _game_dict(data, where) -> dict:
    if "game" in data:
        both = sorted(k for k in data if k.startswith("game_"))
        if both:
            _fail(where, f"holds the game twice: entry 'game' and {both}")
        try:
            game = json.loads(str(data["game"]))
        except ValueError as exc:
            _fail(where, f"entry 'game' is not valid JSON: {exc}")
        if not isinstance(game, dict):
            _fail(where, f"entry 'game' must be a JSON object, got {type(game).__name__}")
        return game
    missing = [k for k in ("game_q", "game_kappa", "game_r", "game_gamma", "game_policy") if k not in data]
    if missing:
        _fail(where, f"the game is missing (no entry 'game' nor {missing})")
    return {
        "q": float(data["game_q"]), "kappa": float(data["game_kappa"]), "r": float(data["game_r"]),
        "gamma": float(data["game_gamma"]), "policy": str(data["game_policy"]),
    }


def _make_game(spec: dict, where) -> Game:
    """The :class:`Game` of a checkpoint's game dict (``Game.from_dict`` when the class has one)."""
    policy = spec.get("policy")
    if isinstance(policy, str) and policy not in POLICIES:
        _fail(where, f"unknown policy {policy!r}; accepted: {', '.join(POLICIES)}")
    try:
        game = Game.from_dict(spec) if hasattr(Game, "from_dict") else Game(**spec)
    except (TypeError, ValueError) as exc:
        _fail(where, f"invalid game weights {spec!r}: {exc}")
    if game.to_dict() != spec:
        _fail(where, f"the game {spec!r} does not round-trip (it reads back as {game.to_dict()!r})")
    return game


def _parse(data: dict, where: str) -> Checkpoint:
    """Check the members' data with the state validators and build the :class:`Checkpoint`."""
    if "format" not in data or str(data["format"]) != FORMAT:
        _fail(where, f"not a memoa-fast checkpoint (no format marker {FORMAT!r})")
    for key in ("format_version", "created_by", "t", "discount"):
        if key not in data:
            _fail(where, f"entry {key!r} is missing (truncated or not a memoa-fast checkpoint)")
    version = int(data["format_version"])
    if version > FORMAT_VERSION:
        _fail(where, f"format version {version} was written by a newer memoa-fast; this one reads up to version {FORMAT_VERSION}")
    if version < 1:
        _fail(where, f"format version {version} is not valid")
    game = _make_game(_game_dict(data, where), where)

    population = {key: data[key] for key in ("states", "costs", "labels", "mean_state", "mean_signal", "class_mean_signal",
                                             "class_signalled") if key in data}
    population.update(t=data["t"], discount=data["discount"], game=game.to_dict())
    for key in ("n_valid_signals", "n_finite_signals"):
        if key in data:
            population[key] = data[key]
    n, d = data["states"].shape
    try:
        population = check_population_state(population, game=game, n_agents=n, dim=d)
    except ValueError as exc:
        _fail(where, str(exc))

    server = None
    if any(name.startswith("server_") for name in data):
        missing = [k for k in ("server_rule", "server_eta", "server_alpha", "server_n_updates", "server_log_weights") if k not in data]
        if missing:
            _fail(where, f"the server state is incomplete: missing {missing}")
        rule, eta, alpha = str(data["server_rule"]), float(data["server_eta"]), float(data["server_alpha"])
        if rule not in RULES:
            _fail(where, f"unknown server rule {rule!r}; accepted: {', '.join(RULES)}")
        if not (math.isfinite(eta) and eta >= 0 and 0.0 <= alpha <= 1.0):
            _fail(where, f"server eta must be finite and >= 0 and alpha in [0, 1], got eta={eta!r}, alpha={alpha!r}")
        raw = {
            "log_weights": data["server_log_weights"], "n_updates": data["server_n_updates"],
            "rule": rule, "eta": eta, "alpha": alpha,
        }
        try:
            server = check_server_state(raw, n_agents=n, rule=rule, eta=eta, alpha=alpha)
        except ValueError as exc:
            _fail(where, f"server {exc}")

    source = None
    agents = {k[len(_SOURCE_AGENTS):]: v for k, v in data.items() if k.startswith(_SOURCE_AGENTS)}
    shared = {k[len(_SOURCE_SHARED):]: v for k, v in data.items() if k.startswith(_SOURCE_SHARED)}
    if agents or shared:
        try:
            source = check_source_layout({"agents": agents, "shared": shared}, n_agents=n)
        except ValueError as exc:
            _fail(where, str(exc))

    return Checkpoint(
        path=where, format_version=version, game=game, population=population, server=server, source=source,
        created_by=str(data["created_by"]),
    )


# =========================================================================== sharded checkpoints
# A sharded checkpoint is a manifest (one small .npz at the checkpoint's path)
# and one .npz per shard in the folder <name>.shards beside it. Every file of
# one save carries the save's token in its name, so a save never overwrites a
# file that the current manifest names: the manifest, replaced atomically and
# last, switches from one complete set to the next, and only then are the
# previous set's files deleted.

#: Version of the manifest of a sharded checkpoint (single files are version 2).
MANIFEST_VERSION = 3
SHARD_FORMAT = "memoa-fast checkpoint shard"
SHARD_FORMAT_VERSION = 1
_TOKEN = re.compile(r"[0-9a-f]{16}\Z")
_SHARD_FILE = re.compile(r"(?P<token>[0-9a-f]{16})\.(?P<index>[0-9]{5,})\.npz\Z")
_SHARD_TMP = re.compile(r"\.[0-9a-f]{16}\.[0-9]{5,}\.npz\.[A-Za-z0-9_]{8}\.tmp\Z")
_SHARD_LIVE = re.compile(r"\.[0-9a-f]{16}\.live\Z")  # mark_save_live
_SHARD_SCALARS = {
    "format": "str", "format_version": "int", "token": "str", "shard": "int", "lo": "int", "hi": "int",
    "n_agents": "int", "dim": "int",
}
_MANIFEST_EXTRA = {"n_agents": "int", "dim": "int", "token": "str", "shards": "str", "source_agents": "str"}
_MANIFEST_ARRAYS = ("mean_state", "mean_signal", "class_mean_signal", "class_mean_state")
_MANIFEST_MAX_BYTES = 1 << 28
_BLOCK_BYTES = 1 << 23


def shard_folder(path) -> Path:
    """The folder holding the shard files of the sharded checkpoint at ``path``: ``<name>.shards`` beside it."""
    path = Path(os.path.realpath(path))
    return path.parent / (path.name + ".shards")


def new_token() -> str:
    """A fresh save token: 16 hex digits (time-ordered prefix, random suffix)."""
    return f"{time.time_ns() // 1000 & 0xFFFFFFFFFF:010x}{os.urandom(3).hex()}"


def shard_file_name(token: str, index: int) -> str:
    """The name of shard ``index``'s file in the save ``token``."""
    return f"{token}.{index:05d}.npz"


def _zip_digest(path) -> str:
    """SHA-256 of a zip's central directory (names, CRC-32s, sizes, offsets) and of the file's size.

    The data bytes are tied to it by the members' CRC-32s, which the reader
    checks while streaming every member to its end.
    """
    if hasattr(path, "fileno"):  # an open file: the digest of what this handle reads
        size = os.fstat(path.fileno()).st_size
        path.seek(0)
    else:
        size = os.stat(path).st_size
    h = hashlib.sha256(f"{size}\n".encode())
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            h.update(
                f"{info.filename}\0{info.CRC:08x}\0{info.compress_type}\0{info.file_size}\0{info.compress_size}"
                f"\0{info.header_offset}\n".encode()
            )
    return h.hexdigest()


def write_shard_file(folder, token: str, index: int, lo: int, hi: int, n_agents: int, arrays: dict) -> dict:
    """Write one shard's file atomically (temporary file, fsync, ``os.replace``); runs on the shard's worker.

    ``arrays`` maps member names (``states``, ``costs``, ``labels``,
    ``server_log_weights``, ``source_agents__<name>``) to arrays of
    ``hi - lo`` rows. Returns ``{"file", "lo", "hi", "size", "digest"}``, what
    the manifest records.
    """
    folder = Path(folder)
    name = shard_file_name(token, index)
    members = {
        "format": np.array(SHARD_FORMAT), "format_version": np.array(SHARD_FORMAT_VERSION, dtype=np.int64),
        "token": np.array(token), "shard": np.array(index, dtype=np.int64), "lo": np.array(lo, dtype=np.int64),
        "hi": np.array(hi, dtype=np.int64), "n_agents": np.array(n_agents, dtype=np.int64),
        "dim": np.array(arrays["states"].shape[1], dtype=np.int64),
    }
    for key, value in arrays.items():
        members[key] = np.ascontiguousarray(value)
    _atomic_savez(folder / name, members)
    path = folder / name
    return {"file": name, "lo": int(lo), "hi": int(hi), "size": os.stat(path).st_size, "digest": _zip_digest(path)}


def remove_shard_files(folder, *, keep: str | None = None, token: str | None = None, before: float | None = None) -> list[str]:
    """Delete shard files (and their temporaries) in ``folder``; return the names deleted.

    Deletes the files of save ``token`` if given, else those of every save
    but ``keep`` last modified before ``before`` - except the files of a save
    still in progress (:func:`mark_save_live`: its shard files wait for its
    manifest, however old they look) and those the current manifest names
    (a concurrent save that switched to its set after this one did).
    """
    found = []
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for entry in entries:
                m = _SHARD_FILE.match(entry.name)
                debris = _SHARD_TMP.match(entry.name) or _SHARD_LIVE.match(entry.name)
                name_token = m.group("token") if m else entry.name[1:17] if debris else None
                if name_token is not None:
                    found.append((entry, name_token))
    if token is None:
        # Live saves first, then the manifest: a save that ends in between switched the manifest before it ended.
        kept = {name_token for name_token in {t for _, t in found} if name_token != keep and _save_is_live(folder, name_token)}
        kept |= {keep, _manifest_token(folder)}
    removed = []
    for entry, name_token in found:
        if token is not None:
            doomed = name_token == token
        else:
            doomed = name_token not in kept
            with contextlib.suppress(OSError):
                doomed = doomed and (before is None or entry.stat(follow_symlinks=False).st_mtime < before)
        if doomed:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def mark_save_live(folder, token: str) -> int | None:
    """Create ``folder/.<token>.live``, locked until :func:`end_save_live`: the save ``token`` is in progress.

    :func:`remove_shard_files` keeps a live save's files; the lock ends with the process, so a killed save's files
    (and this marker) are debris. Returns the descriptor, or None where there are no locks (then the age rule alone
    decides, as without the mark).
    """
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(Path(folder) / f".{token}.live", os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        return None
    _lock_temporary(fd)
    return fd


def end_save_live(folder, token: str, fd: int | None) -> None:
    """Remove the mark of :func:`mark_save_live` (before its lock ends)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(Path(folder) / f".{token}.live")
        os.close(fd)


def _save_is_live(folder, token: str) -> bool:
    """Does a live process hold the mark of save ``token`` (:func:`mark_save_live`)? A mark it cannot open counts."""
    return _held_by_a_live_process(Path(folder) / f".{token}.live")


def _manifest_token(folder) -> str | None:
    """The token of the manifest whose shard folder is ``folder`` (``<name>.shards``), or None (none, or not readable)."""
    folder = Path(folder)
    if not folder.name.endswith(".shards"):
        return None
    try:
        manifest = folder.parent / folder.name[: -len(".shards")]
        with _open_to_read(manifest, str(manifest)) as fh, zipfile.ZipFile(fh) as zf:
            info = zf.getinfo("token.npy") if "token.npy" in zf.namelist() else None
            if info is None or info.file_size > 4096:
                return None
            header = _member_header(zf, info)
            shape, dtype = header[:2]
            if shape != () or dtype.kind != "U":
                return None
            return str(_read_member(zf, info, header, "token", str(folder))[()])
    except Exception:  # noqa: BLE001 - anything unreadable names no set
        return None


@dataclass(frozen=True, eq=False)
class Manifest:
    """The checked manifest of a sharded checkpoint (no agent array: those are in the shard files).

    Attributes
    ----------
    path : str
        The manifest file.
    folder : Path
        The folder of the shard files.
    token : str
        The save's token (in every shard file's name and contents).
    game : Game
    n_agents, dim : int
    population : dict
        ``mean_state``, ``mean_signal``, ``class_mean_signal``,
        ``class_mean_state``, ``t``, ``discount``, ``n_valid_signals`` and ``game`` (dict).
    server : dict or None
        ``rule``, ``eta``, ``alpha``, ``n_updates``.
    source_shared : dict or None
        The signal sources' shared arrays.
    source_agents : dict or None
        ``{name: (dtype, trailing shape)}`` of the sources' per-agent arrays.
    shards : list of dict
        ``{"file", "lo", "hi", "size", "digest"}`` covering ``[0, N)`` in order.
    created_by : str
    """

    path: str
    folder: Path
    token: str
    game: Game
    n_agents: int
    dim: int
    population: dict
    server: dict | None
    source_shared: dict | None
    source_agents: dict | None
    shards: list
    created_by: str

    @property
    def t(self) -> int:
        """The step counter the checkpoint was taken at."""
        return self.population["t"]

    def members(self) -> dict:
        """``{member: (trailing shape, dtype rule)}`` each shard file must hold (see :func:`read_shard_rows`)."""
        spec = {"states": ((self.dim,), "float64"), "costs": ((), "float64")}
        if n_classes_of(self.game) > 1:
            spec["labels"] = ((), "int")
        if self.server is not None:
            spec["server_log_weights"] = ((), "float64")
        for name, (dtype, trail) in (self.source_agents or {}).items():
            spec[_SOURCE_AGENTS + name] = (tuple(trail), dtype)
        return spec

    def files_for(self, lo: int, hi: int) -> list:
        """The shard files holding rows of ``[lo, hi)``, in order."""
        return [f for f in self.shards if f["lo"] < hi and f["hi"] > lo]


def write_manifest(target: Path, *, game, n_agents, dim, population: dict, server: dict | None, source_shared: dict | None,
                   source_agents: dict | None, token: str, shards: list) -> None:
    """Write the manifest of a sharded checkpoint atomically (the save's last write)."""
    arrays = {
        "format": np.array(FORMAT),
        "format_version": np.array(MANIFEST_VERSION, dtype=np.int64),
        "created_by": np.array(_created_by()),
        "game": np.array(json.dumps(game.to_dict(), allow_nan=False, sort_keys=True)),
        "n_agents": np.array(n_agents, dtype=np.int64),
        "dim": np.array(dim, dtype=np.int64),
        "t": np.array(population["t"], dtype=np.int64),
        "discount": np.array(population["discount"], dtype=np.float64),
        "n_valid_signals": np.array(population["n_valid_signals"], dtype=np.int64),
        "token": np.array(token),
        "shards": np.array(json.dumps(shards, sort_keys=True)),
    }
    for key in _MANIFEST_ARRAYS:
        arrays[key] = np.asarray(population[key], dtype=np.float64)
    flags = _class_signalled_member(population)
    if flags is not None:
        arrays["class_signalled"] = flags
    if server is not None:
        arrays.update(
            server_rule=np.array(server["rule"]), server_eta=np.array(server["eta"], dtype=np.float64),
            server_alpha=np.array(server["alpha"], dtype=np.float64),
            server_n_updates=np.array(server["n_updates"], dtype=np.int64),
        )
    if source_agents is not None:
        arrays["source_agents"] = np.array(json.dumps({k: [v[0], list(v[1])] for k, v in source_agents.items()}, sort_keys=True))
        for name, value in source_shared.items():
            arrays[_SOURCE_SHARED + name] = np.asarray(value)
    _atomic_savez(target, arrays)


def is_manifest(path) -> bool:
    """Is ``path`` the manifest of a sharded checkpoint (a zip with a ``shards`` member)? Never raises."""
    try:
        with _open_to_read(path, str(path)) as fh, zipfile.ZipFile(fh) as zf:
            return "shards.npy" in zf.namelist()
    except Exception:  # noqa: BLE001 - anything unreadable is not a manifest
        return False


def _read_small_npz(fh, where, allowed, max_bytes) -> dict:
    """Every member of a small .npz: names by ``allowed(key)``, headers and declared sizes checked before reading."""
    with zipfile.ZipFile(fh) as zf:
        members = _zip_members(fh, zf, where, allowed)
        if sum(i.file_size for i in members.values()) > max_bytes:
            _fail(where, f"its members declare more than {max_bytes:,} bytes: not a manifest, or tampered with")
        return {key: _read_member(zf, info, _checked_header(zf, info, key, where), key, where)
                for key, info in members.items()}


def _end_record_count(fh) -> int | None:
    """The number of members the end record :mod:`zipfile` reads (zip64's where present) declares; None where there is none.

    Found exactly as ``zipfile`` finds it (``_EndRecData``), so that the count is the one of the record the directory was
    read by: the file's last 22 bytes when they are a record without a comment, else the last ``PK\\5\\6`` in its final
    64 KiB, whatever its comment length says (zipfile reads a file with bytes after its end record, a padded copy); then
    a zip64 locator and record (``PK\\6\\7``, ``PK\\6\\6``) just before it, when there are. Reads only that tail.
    """
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - _EOCD_SIZE - (1 << 16)))  # zipfile's window, or one byte more (it varies by Python version)
    tail = fh.read()
    if len(tail) >= _EOCD_SIZE and tail[-_EOCD_SIZE:-_EOCD_SIZE + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        start = len(tail) - _EOCD_SIZE  # a signature in the record's own fields must not be taken for it
    else:
        start = tail.rfind(b"PK\x05\x06")
        if start < 0 or len(tail) - start < _EOCD_SIZE:
            return None
    count = int.from_bytes(tail[start + 10:start + 12], "little")
    here = size - (len(tail) - start)  # the end record's offset in the file
    if here >= 20 + 56:
        fh.seek(here - 20)
        locator = fh.read(20)
        if locator[:4] == b"PK\x06\x07":
            fh.seek(here - 20 - 56)
            record = fh.read(56)
            if record[:4] == b"PK\x06\x06":
                count = int.from_bytes(record[32:40], "little")
    return count


def _check_directory_whole(fh, zf, where) -> None:
    """Refuse a zip whose directory lists fewer (or more) members than its end record declares.

    :mod:`zipfile` stops reading the central directory once it has read as many bytes as the end record says it
    holds, without counting entries: one flipped byte (an entry's comment length, say) then swallows the entries
    after it, and the members they name vanish without an error. A checkpoint's optional members (the server's,
    the signal source's) would then read as never saved: the saved state lost in silence.
    """
    declared = _end_record_count(fh)
    found = len(zf.infolist())
    if declared is None:  # zipfile has just found one, by the same search: the file changed meanwhile
        _fail(where, "has no zip end record (it changed while read?)")
    if declared != found:
        _fail(where, f"its zip directory lists {found} members but its end record declares {declared}: "
                     "corrupt (a damaged directory entry hides the members after it). Use an earlier checkpoint.")


def _zip_members(fh, zf, where, allowed) -> dict:
    """``{key: ZipInfo}`` of every ``<key>.npy`` member: known names only (``allowed(key)``), once each, stored or deflated.

    ``zf`` is the zip open on ``fh``. Reads only the zip directory (checked whole: :func:`_check_directory_whole`):
    nothing is inflated.
    """
    _check_directory_whole(fh, zf, where)
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        _fail(where, f"holds {len(infos)} members, more than a checkpoint ever has ({_MAX_MEMBERS})")
    members = {}
    for info in infos:
        name = info.filename
        key = name[:-4] if name.endswith(".npy") else None
        if key is None or not allowed(key):
            _fail(where, f"has an unknown member {name[:100]!r}: not a memoa-fast checkpoint, or tampered with")
        if key in members:
            _fail(where, f"has the member {name!r} twice")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            _fail(where, f"member {name!r} uses zip compression method {info.compress_type}; accepted: stored or deflate")
        members[key] = info
    return members


def _checked_header(zf, info, key, where) -> tuple:
    """The member's ``.npy`` header ``(shape, dtype, fortran, offset)``, checked.

    Numbers or strings only, and a declared uncompressed size that is exactly
    header + data, so a bomb is refused before it is inflated.
    """
    shape, dtype, fortran, offset = _member_header(zf, info)
    if dtype.hasobject or dtype.kind not in "iufU" or dtype.fields is not None or dtype.subdtype is not None:
        _fail(where, f"member {key!r} has dtype {dtype}; a checkpoint holds only numbers and strings")
    needed = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != needed:
        _fail(where, f"member {key!r} is {info.file_size} bytes in the zip directory, but its header ({dtype}, "
                     f"shape {shape}) needs {needed}: truncated or tampered with")
    return shape, dtype, fortran, offset


def _read_member(zf, info, header, key, where) -> np.ndarray:
    """The member's data as an array of its header's shape; the read to the end also checks the CRC."""
    shape, dtype, fortran, offset = header
    nbytes = math.prod(shape) * dtype.itemsize
    with zf.open(info) as f:
        f.read(offset)
        raw = f.read(nbytes)
        if len(raw) != nbytes or f.read(1):
            _fail(where, f"member {key!r} has {len(raw)} data bytes, its header needs {nbytes}")
    arr = np.frombuffer(raw, dtype=dtype) if nbytes else np.empty(0, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def _scalar(data, key, kind, where, *, required=True):
    if key not in data:
        if required:
            _fail(where, f"entry {key!r} is missing (truncated or not a memoa-fast checkpoint)")
        return None
    value = data[key]
    ok = value.shape == () and {"str": value.dtype.kind == "U", "int": value.dtype.kind in "iu",
                                "float": value.dtype == np.float64}[kind]
    if not ok:
        want = {"str": "a string", "int": "an integer", "float": "a float64"}[kind]
        _fail(where, f"entry {key!r} must be {want} scalar, got dtype {value.dtype} shape {value.shape}")
    return {"str": str, "int": int, "float": float}[kind](value[()])


def _json(text, where, key):
    try:
        return json.loads(text)
    except ValueError as exc:
        _fail(where, f"entry {key!r} is not valid JSON: {exc}")


def read_manifest(path, *, n_agents: int | None = None, dim: int | None = None) -> Manifest:
    """Read and check the manifest of a sharded checkpoint (not its shard files); raise :class:`CheckpointError`.

    Checks the format and version, the game, N and d (against ``n_agents``
    and ``dim`` when given), the mean fields, step counter, discount and
    count of valid signals (with :func:`~memoa_fast._state.check_population_state`
    on a one-agent stand-in: the agents are in the shard files), the
    server's parameters, the sources' shared state, and the list of shard
    files: names of this save, ``[lo, hi)`` ranges covering ``[0, N)`` in order.
    """
    path = _checkpoint_path("path", path, reading=True)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    where = str(path)

    def allowed(key):
        return (key in _SCALARS or key in _MANIFEST_EXTRA or key in _MANIFEST_ARRAYS or key == "class_signalled"
                or (key.startswith(_SOURCE_SHARED) and key != _SOURCE_SHARED))

    try:
        with _open_to_read(path, where) as fh:
            data = _read_small_npz(fh, where, allowed, _MANIFEST_MAX_BYTES)
    except (CheckpointError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - see load_checkpoint
        raise CheckpointError(
            f"{path} is not a readable memoa-fast checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}. "
            "Use an earlier checkpoint."
        ) from exc
    if "format" not in data or _scalar(data, "format", "str", where) != FORMAT:
        _fail(where, f"not a memoa-fast checkpoint (no format marker {FORMAT!r})")
    version = _scalar(data, "format_version", "int", where)
    if version != MANIFEST_VERSION:
        _fail(where, f"manifest format version {version}: this memoa-fast reads version {MANIFEST_VERSION}")
    for key in data:
        if key in _SCALARS and _SCALARS[key] == "str" or key in ("token", "shards", "source_agents"):
            limit = _GAME_CHARS if key in ("game", "shards", "source_agents") else _STR_CHARS
            if data[key].dtype.kind == "U" and data[key].dtype.itemsize > 4 * limit:
                _fail(where, f"entry {key!r} is a string of {data[key].dtype.itemsize // 4} characters, longer than {limit}")
    game = _make_game(_game_dict({"game": _scalar(data, "game", "str", where)}, where), where)
    K = n_classes_of(game)
    n, d = _scalar(data, "n_agents", "int", where), _scalar(data, "dim", "int", where)
    if n < 1 or d < 1:
        _fail(where, f"entries 'n_agents' and 'dim' must be >= 1, got {n} and {d}")
    _check_size(where, n, d, n_agents, dim)
    shapes = {"mean_state": (d,), "mean_signal": (d,), "class_mean_signal": (K, d), "class_mean_state": (K, d)}
    for key, shape in shapes.items():
        if key not in data:
            _fail(where, f"entry {key!r} is missing (truncated or not a memoa-fast checkpoint)")
        if data[key].shape != shape or data[key].dtype != np.float64:
            _fail(where, f"entry {key!r} must be float64 of shape {shape}, got {data[key].dtype} {data[key].shape}")
    n_valid = _scalar(data, "n_valid_signals", "int", where)
    if not 0 <= n_valid <= n:
        _fail(where, f"entry 'n_valid_signals' must be an integer in [0, {n}], got {n_valid}")
    stand_in = {
        "states": np.zeros((1, d)), "costs": np.zeros(1), "mean_state": data["mean_state"],
        "mean_signal": data["mean_signal"], "class_mean_signal": data["class_mean_signal"],
        "t": _scalar(data, "t", "int", where), "discount": _scalar(data, "discount", "float", where),
        "n_valid_signals": 0, "game": game.to_dict(),
    }
    if K > 1:
        stand_in["labels"] = np.zeros(1, dtype=np.int64)
    if "class_signalled" in data:
        stand_in["class_signalled"] = data["class_signalled"]
    try:
        clean = check_population_state(stand_in, game=game, n_agents=1, dim=d)
        check_population_state(dict(stand_in, mean_state=data["class_mean_state"][0]), game=game, n_agents=1, dim=d)
    except ValueError as exc:
        _fail(where, str(exc))
    if not np.isfinite(data["class_mean_state"]).all():
        _fail(where, "entry 'class_mean_state' must be finite")
    population = {key: clean[key] for key in ("mean_state", "mean_signal", "class_mean_signal", "class_signalled", "t",
                                              "discount", "game")}
    population.update(class_mean_state=np.array(data["class_mean_state"]), n_valid_signals=n_valid)

    server = None
    if any(k.startswith("server_") for k in data):
        rule = _scalar(data, "server_rule", "str", where)
        eta, alpha = _scalar(data, "server_eta", "float", where), _scalar(data, "server_alpha", "float", where)
        n_updates = _scalar(data, "server_n_updates", "int", where)
        if rule not in RULES:
            _fail(where, f"unknown server rule {rule!r}; accepted: {', '.join(RULES)}")
        if not (math.isfinite(eta) and eta >= 0 and 0.0 <= alpha <= 1.0) or n_updates < 0:
            _fail(where, f"server eta must be finite and >= 0, alpha in [0, 1] and n_updates >= 0, got eta={eta!r}, "
                         f"alpha={alpha!r}, n_updates={n_updates}")
        server = {"rule": rule, "eta": eta, "alpha": alpha, "n_updates": n_updates}

    source_shared = source_agents = None
    shared = {k[len(_SOURCE_SHARED):]: v for k, v in data.items() if k.startswith(_SOURCE_SHARED)}
    if "source_agents" in data:
        spec = _json(_scalar(data, "source_agents", "str", where), where, "source_agents")
        if not isinstance(spec, dict):
            _fail(where, "entry 'source_agents' must be a JSON object")
        source_agents = {}
        for name, value in spec.items():
            ok = (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], list)
                  and all(isinstance(s, int) and s >= 0 for s in value[1]))
            if not ok or not name or "/" in name:
                _fail(where, f"entry 'source_agents' has an invalid entry {name!r}: {value!r}")
            try:  # a plain dtype's name first: np.dtype("(2,)<f8") would parse its shape with ast (see _DTYPE_STR)
                dtype = np.dtype(value[0]) if re.fullmatch(_DTYPE_NAME, value[0]) else None
            except TypeError:
                dtype = None
            if dtype is None:
                _fail(where, f"entry 'source_agents' names an unknown dtype {value[0]!r} (accepted: a NumPy dtype's "
                             "name, such as '<f8' or 'float64')")
            if dtype.kind not in "iuf" or math.prod(value[1]) > _SOURCE_PER_AGENT_MAX:
                _fail(where, f"signal-source entry 'agents/{name}' must hold at most {_SOURCE_PER_AGENT_MAX} numbers per "
                             f"agent, got dtype {dtype} and shape {value[1]}")
            source_agents[name] = (dtype.str, tuple(value[1]))
        for name, value in shared.items():
            if value.dtype.kind not in "iuf" or value.size > _SOURCE_SHARED_MAX:
                _fail(where, f"signal-source entry 'shared/{name}' must hold at most {_SOURCE_SHARED_MAX} numbers, "
                             f"got dtype {value.dtype} shape {value.shape}")
        try:
            source_shared = check_source_layout({"agents": {}, "shared": shared}, n_agents=n)["shared"]
        except ValueError as exc:
            _fail(where, str(exc))
    elif shared:
        _fail(where, "holds a signal source's shared state without 'source_agents'")

    token = _scalar(data, "token", "str", where)
    if not _TOKEN.match(token):
        _fail(where, f"entry 'token' must be 16 hex digits, got {token[:40]!r}")
    shards = _json(_scalar(data, "shards", "str", where), where, "shards")
    if not isinstance(shards, list) or not shards:
        _fail(where, "entry 'shards' must be a non-empty JSON list of shard files")
    clean_shards, edge = [], 0
    for k, entry in enumerate(shards):
        ok = isinstance(entry, dict) and set(entry) == {"file", "lo", "hi", "size", "digest"}
        ok = ok and isinstance(entry["file"], str) and isinstance(entry["digest"], str)
        ok = ok and all(isinstance(entry[x], int) and not isinstance(entry[x], bool) for x in ("lo", "hi", "size"))
        if not ok:
            _fail(where, f"shard entry {k} must be {{'file', 'lo', 'hi', 'size', 'digest'}}, got {str(entry)[:200]}")
        m = _SHARD_FILE.match(entry["file"])
        if m is None or m.group("token") != token or int(m.group("index")) != k:
            _fail(where, f"shard entry {k} names the file {entry['file'][:100]!r}, not shard {k} of save {token}")
        if entry["lo"] != edge or entry["hi"] <= entry["lo"] or entry["hi"] > n:
            _fail(where, f"shard entry {k} holds agents [{entry['lo']}, {entry['hi']}), but the shards must cover "
                         f"[0, {n}) in order (this one must start at {edge})")
        if not re.fullmatch(r"[0-9a-f]{64}", entry["digest"]) or entry["size"] < 1:
            _fail(where, f"shard entry {k} has an invalid size or digest")
        edge = entry["hi"]
        clean_shards.append(dict(entry))
    if edge != n:
        _fail(where, f"the shard files hold agents [0, {edge}), the checkpoint has {n}")
    return Manifest(
        path=where, folder=shard_folder(path), token=token, game=game, n_agents=n, dim=d, population=population,
        server=server, source_shared=source_shared, source_agents=source_agents, shards=clean_shards,
        created_by=_scalar(data, "created_by", "str", where),
    )


def read_shard_rows(manifest: Manifest, lo: int, hi: int, members: dict | None = None) -> dict:
    """Rows ``[lo, hi)`` of the members of a sharded checkpoint, read from the shard files that hold them.

    Runs on the worker of the shard that needs the rows (or on the client,
    for a one-machine restore). Each file is checked against the manifest
    before its data is read: its size and the digest of its zip directory,
    its members (names, compression, ``.npy`` headers: dtype, shape
    ``(hi_f - lo_f, ...)``, declared size) and its token, index, range, N and
    d. Every member is then streamed to its end in blocks of 8 MiB, so that
    its CRC-32 is checked, and the rows in ``[lo, hi)`` are kept.

    Parameters
    ----------
    manifest : Manifest
    lo, hi : int
        The rows wanted.
    members : dict, optional
        ``{member: (trailing shape, dtype rule)}``, a subset of
        :meth:`Manifest.members` (default: all of them); the rule is
        ``"float64"``, ``"int"`` (any integer dtype, returned as int64) or a
        dtype string that must match exactly.

    Returns
    -------
    dict
        ``{member: array of hi - lo rows}``.
    """
    spec = manifest.members() if members is None else members
    outputs = {}
    total = 0
    for key, (trail, rule) in spec.items():
        dtype = np.dtype(np.float64 if rule == "float64" else np.int64 if rule == "int" else rule)
        total += (hi - lo) * math.prod(trail) * dtype.itemsize
        outputs[key] = (trail, rule, dtype)
    available = available_memory()
    if available is not None and total > available:
        raise CheckpointError(f"{manifest.path}: rows [{lo}, {hi}) need {total:,} bytes, more than the {available:,} "
                              "bytes this process may use")
    out = {key: np.empty((hi - lo,) + tuple(trail), dtype=dtype) for key, (trail, _, dtype) in outputs.items()}
    for entry in manifest.files_for(lo, hi):
        path = manifest.folder / entry["file"]
        where = str(path)
        try:
            _read_one_shard_file(path, where, manifest, entry, lo, hi, outputs, out)
        except (CheckpointError, MemoryError):
            raise
        except FileNotFoundError:
            raise CheckpointError(
                f"{manifest.path}: its shard file {where} is missing (deleted, or the manifest is stale). "
                "Use an earlier checkpoint."
            ) from None
        except Exception as exc:  # noqa: BLE001 - a damaged zip raises almost anything, see load_checkpoint
            raise CheckpointError(
                f"{manifest.path}: its shard file {where} is not readable (truncated or corrupt?): "
                f"{type(exc).__name__}: {exc}. Use an earlier checkpoint."
            ) from exc
    return out


def _read_one_shard_file(path, where, manifest, entry, lo, hi, outputs, out) -> None:
    stale = f"does not match the manifest {manifest.path} (the manifest is stale, or the file was replaced)"
    with _open_to_read(path, where) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != entry["size"]:
            _fail(where, f"is {size} bytes, the manifest says {entry['size']}: truncated, or it {stale}")
        if _zip_digest(fh) != entry["digest"]:
            _fail(where, f"has a zip directory that {stale}")
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            _check_directory_whole(fh, zf, where)
            members = {}
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else None
                known = key in _SHARD_SCALARS or key in ("states", "costs", "labels", "server_log_weights")
                if key is None or not (known or (key.startswith(_SOURCE_AGENTS) and key != _SOURCE_AGENTS)):
                    _fail(where, f"has an unknown member {info.filename[:100]!r}")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    _fail(where, f"member {info.filename!r} uses zip compression method {info.compress_type}")
                members[key] = info
            rows_f = entry["hi"] - entry["lo"]
            headers = {}
            for key in list(_SHARD_SCALARS) + list(outputs):
                if key not in members:
                    _fail(where, f"member {key!r} is missing")
                shape, dtype, fortran, offset = _member_header(zf, members[key])
                if dtype.hasobject or dtype.kind not in "iufU" or dtype.fields is not None or dtype.subdtype is not None:
                    _fail(where, f"member {key!r} has dtype {dtype}; a checkpoint holds only numbers and strings")
                if members[key].file_size != offset + math.prod(shape) * dtype.itemsize:
                    _fail(where, f"member {key!r} has a size that disagrees with its header: truncated or tampered with")
                headers[key] = (shape, dtype, fortran, offset)
            scalars = {}
            for key, kind in _SHARD_SCALARS.items():
                shape, dtype, _, offset = headers[key]
                if shape != () or dtype.itemsize > 4 * _STR_CHARS:
                    _fail(where, f"entry {key!r} must be a short scalar, got dtype {dtype} shape {shape}")
                with zf.open(members[key]) as f:
                    f.read(offset)
                    raw = f.read(dtype.itemsize)
                    if f.read(1):
                        _fail(where, f"entry {key!r} is longer than its header says")
                scalars[key] = np.frombuffer(raw, dtype=dtype).reshape(())[()]
            want = {"format": SHARD_FORMAT, "format_version": SHARD_FORMAT_VERSION, "token": manifest.token,
                    "shard": int(_SHARD_FILE.match(entry["file"]).group("index")), "lo": entry["lo"], "hi": entry["hi"],
                    "n_agents": manifest.n_agents, "dim": manifest.dim}
            for key, value in want.items():
                got = str(scalars[key]) if isinstance(value, str) else scalars[key]
                if got != value:
                    _fail(where, f"holds {key}={got!r}, the manifest needs {value!r}: it {stale}")
            for key, (trail, rule, dtype) in outputs.items():
                shape, got, fortran, offset = headers[key]
                ok = got == np.float64 if rule == "float64" else got.kind in "iu" and got.itemsize <= 8 if rule == "int" else got == dtype
                if shape != (rows_f,) + tuple(trail) or not ok or (fortran and len(shape) > 1):
                    _fail(where, f"member {key!r} must be {rule} of shape {(rows_f,) + tuple(trail)} in C order, "
                                 f"got {got} {shape}")
                row_bytes = math.prod(trail) * got.itemsize
                block = max(1, _BLOCK_BYTES // max(row_bytes, 1))
                a, b = max(lo, entry["lo"]), min(hi, entry["hi"])
                with zf.open(members[key]) as f:
                    f.read(offset)
                    r = 0
                    while r < rows_f:
                        count = min(block, rows_f - r)
                        raw = f.read(count * row_bytes)
                        if len(raw) != count * row_bytes:
                            _fail(where, f"member {key!r} ends early: truncated")
                        first, last = max(a, entry["lo"] + r), min(b, entry["lo"] + r + count)
                        if first < last:
                            rows = np.frombuffer(raw, dtype=got).reshape((count,) + tuple(trail))
                            out[key][first - lo:last - lo] = rows[first - entry["lo"] - r:last - entry["lo"] - r]
                        r += count
                    if f.read(1):  # reading to the end checks the member's CRC-32
                        _fail(where, f"member {key!r} is longer than its header says")


def check_log_weight_rows(log_p: np.ndarray, key: str = "log_weights") -> tuple[float, float]:
    """The checks of :func:`~memoa_fast._state.check_server_state` that hold row by row, and the log-sum-exp pieces.

    Refuses NaN and ``+inf`` (``ValueError``); returns ``(top, sum(exp(log_p - top)))``
    (``(-inf, 0)`` for no rows or all ``-inf``), which :func:`merged_log_weights`
    merges across shards.
    """
    if np.isnan(log_p).any():
        raise ValueError(f"state[{key!r}] must not be NaN; entry {int(np.argmax(np.isnan(log_p)))} (of this shard) is nan")
    if (log_p == np.inf).any():
        raise ValueError(f"state[{key!r}] must not be +inf; entry {int(np.argmax(log_p == np.inf))} (of this shard) is inf")
    top = float(log_p.max()) if log_p.size else -math.inf
    if top == -math.inf:
        return -math.inf, 0.0
    return top, float(np.exp(log_p - top).sum())


def check_merged_server(pieces, server: dict, *, rule, eta, alpha) -> dict:
    """The whole population's server check from the shards' log-sum-exp pieces, with :func:`~memoa_fast._state.check_server_state`.

    The pieces merge into ``log sum_i p_i``; that one number, as the log-weight
    of a one-agent stand-in, goes through the server validator (normalised,
    not all ``-inf``), with the saved rule, ``eta``, ``alpha`` and update count.
    """
    top = max((t for t, _ in pieces), default=-math.inf)
    if top == -math.inf:
        lse = -math.inf
    else:
        lse = top + math.log(sum(s * math.exp(t - top) for t, s in pieces if t != -math.inf))
    stand_in = dict(server, log_weights=np.array([lse]))
    return check_server_state(stand_in, n_agents=1, rule=rule, eta=eta, alpha=alpha)


def check_rows_state(rows: dict, globals_: dict, game, dim: int) -> dict:
    """Check a shard's rows (``states``, ``costs``, ``labels``) with :func:`~memoa_fast._state.check_population_state`.

    The rows are checked as a population of ``len(rows["states"])`` agents
    with the checkpoint's mean fields, step counter and discount; the count
    of valid signals, a whole-population number, is checked by the manifest.
    Returns the clean copy.
    """
    state = {"states": rows["states"], "costs": rows["costs"], "t": globals_["t"], "discount": globals_["discount"],
             "mean_state": globals_["mean_state"], "mean_signal": globals_["mean_signal"],
             "class_mean_signal": globals_["class_mean_signal"], "n_valid_signals": 0, "game": game.to_dict()}
    if "labels" in rows:
        state["labels"] = rows["labels"]
    return check_population_state(state, game=game, n_agents=len(rows["states"]), dim=dim)


def _load_manifest_checkpoint(path, n_agents, dim) -> Checkpoint:
    """A sharded checkpoint read whole on this machine (for a one-machine restore)."""
    manifest = read_manifest(path, n_agents=n_agents, dim=dim)
    rows = read_shard_rows(manifest, 0, manifest.n_agents)
    where, n, d = manifest.path, manifest.n_agents, manifest.dim
    population = {key: manifest.population[key] for key in ("mean_state", "mean_signal", "class_mean_signal",
                                                            "class_signalled", "t", "discount", "n_valid_signals", "game")}
    population.update(states=rows["states"], costs=rows["costs"])
    if "labels" in rows:
        population["labels"] = rows["labels"]
    try:
        population = check_population_state(population, game=manifest.game, n_agents=n, dim=d)
    except ValueError as exc:
        _fail(where, str(exc))
    server = None
    if manifest.server is not None:
        s = manifest.server
        try:
            server = check_server_state(dict(s, log_weights=rows["server_log_weights"]), n_agents=n, rule=s["rule"],
                                        eta=s["eta"], alpha=s["alpha"])
        except ValueError as exc:
            _fail(where, f"server {exc}")
    source = None
    if manifest.source_agents is not None:
        agents = {name: rows[_SOURCE_AGENTS + name] for name in manifest.source_agents}
        try:
            source = check_source_layout({"agents": agents, "shared": manifest.source_shared}, n_agents=n)
        except ValueError as exc:
            _fail(where, str(exc))
    return Checkpoint(path=where, format_version=MANIFEST_VERSION, game=manifest.game, population=population,
                      server=server, source=source, created_by=manifest.created_by)


# =========================================================================== restore
def restore_checkpoint(checkpoint, population, server=None, *, source=None) -> Checkpoint:
    """Load a checkpoint (a path or a :class:`Checkpoint`) into ``population`` (and ``server``, ``source``).

    Everything is read and checked against the targets first: the
    population's and the server's states by their validators, the signal
    source's by its own ``validate_state_dict`` when it has one. A bad or
    mismatched checkpoint raises :class:`CheckpointError` and changes
    nothing. Returns the checkpoint.

    A sharded checkpoint (a manifest) restored onto a population that reads
    its own shards (a ``DaskPopulation``) is read by the shards themselves,
    each its own rows, whatever the shard counts; every shard checks its rows
    before any shard installs them, and the :class:`Manifest` is returned.
    Onto any other population it is read whole here.

    A source's state records the settings its later draws depend on (its
    seed, its noise range...): a source made with other ones refuses it
    (:func:`memoa_fast._state.check_source_state`), naming the setting, on
    every path (single file or sharded, onto any shard count). A checkpoint
    written before the settings were recorded restores as it always did.

    A source without ``validate_state_dict`` cannot be checked in advance: its
    ``load_state_dict`` then runs first, and if it fails the source gets its
    previous state back (from its ``state_dict()``), the population and the
    server are not touched, and :class:`CheckpointError` is raised.
    """
    held = getattr(population, "_checkpoint_call", None)  # a DaskPopulation: one caller for the whole restore
    if held is not None:
        return held("restore_checkpoint", _restore_checkpoint, checkpoint, population, server, source)
    return _restore_checkpoint(checkpoint, population, server, source)


def _restore_checkpoint(checkpoint, population, server, source) -> Checkpoint:
    """:func:`restore_checkpoint`'s body."""
    _check_engines(population, server, source, saving=False)
    return _restore_checked(checkpoint, population, server, source)


def _restore_checked(checkpoint, population, server, source) -> Checkpoint:
    """:func:`restore_checkpoint` after its engine checks (for a caller that made them itself, once)."""
    if not isinstance(checkpoint, Checkpoint):
        _checkpoint_path("checkpoint", checkpoint, reading=True)
    if isinstance(checkpoint, Checkpoint):
        ckpt = checkpoint
    elif getattr(population, "_restore_shards", None) is not None and is_manifest(checkpoint):
        # A sharded checkpoint onto a sharded population: the shards read their own rows.
        if source is not None:
            raise CheckpointError("a sharded population restores its own signal sources: pass source=None")
        return population._restore_shards(checkpoint, server)
    else:
        ckpt = load_checkpoint(checkpoint, n_agents=population.n_agents, dim=population.dim)
    where = ckpt.path or "checkpoint"
    pop_state, server_state, source_state = ckpt.check_compatible(population, server, source)
    if ckpt.source is not None and getattr(population, "signal_factory", None) is not None:
        pop_state["source"] = check_source_layout(ckpt.source, n_agents=ckpt.n_agents)
    # The name population engines used before n_valid_signals; the validators accept both when equal.
    pop_state["n_finite_signals"] = pop_state["n_valid_signals"]
    if source is not None and not hasattr(source, "validate_state_dict"):
        previous = source.state_dict()
        try:
            source.load_state_dict(source_state)
        except (ValueError, KeyError, TypeError) as exc:
            with contextlib.suppress(Exception):
                source.load_state_dict(previous)
            raise CheckpointError(f"{where}: the signal source refuses the saved state: {type(exc).__name__}: {exc}") from None
        source = None  # loaded
    population.load_state_dict(pop_state)
    if server is not None:
        server.load_state_dict(server_state)
    if source is not None:  # source_state is its validator's clean copy (check_compatible): not checked a second time
        load_checked(source, source_state)
    record = getattr(population, "_record_checkpoint", None)
    if record is not None and ckpt.path is not None:
        record(ckpt.path, ckpt.t)
    return ckpt
