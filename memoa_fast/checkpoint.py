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
points to is replaced and the link is kept.

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

Examples
--------
>>> save_checkpoint("run.npz", population, server)          # doctest: +SKIP
>>> restore_checkpoint("run.npz", population, server)       # doctest: +SKIP
>>> ckpt = load_checkpoint("run.npz")                        # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._state import RULES, check_population_state, check_server_state, check_source_layout, n_classes_of
from ._validation import available_memory
from .game import POLICIES, Game

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint", "restore_checkpoint", "save_checkpoint"]

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
    "class_mean_signal": ("K", "d"), "server_log_weights": ("N",),
}
_STR_CHARS = 1024
# A signal source keeps small shared arrays and a few numbers per agent: these
# bounds (in values) refuse a source member before it is inflated.
_SOURCE_SHARED_MAX = 1 << 20
_SOURCE_PER_AGENT_MAX = 1 << 16
_GAME_CHARS = 1 << 24
_MAX_MEMBERS = 4096
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
def save_checkpoint(path, population, server=None, *, source=None) -> Path:
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

    Raises
    ------
    ValueError
        If a state does not pass its validator (then the file could not be
        restored, so none is written); the previous checkpoint is untouched.

    Notes
    -----
    The file is written as ``.<name>.XXXXXXXX.tmp`` beside the target,
    ``fsync``-ed and renamed with ``os.replace``, then the folder is
    ``fsync``-ed. After the rename, temporary files of the same target name
    that are older than this save (left by saves that were killed) are
    deleted. Two processes saving to the same path at the same time are not
    supported.
    """
    given = Path(path)
    target = Path(os.path.realpath(given))  # follow a symlink: replace the file, keep the link
    started = time.time()
    state = population.state_dict()
    game = population.game
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
    if server is not None:
        if (server.n_agents, server.dim) != (population.n_agents, population.dim):
            raise ValueError(
                f"server mixes {server.n_agents} agents of dimension {server.dim}, the population has "
                f"{population.n_agents} of dimension {population.dim}"
            )
        try:
            sstate = check_server_state(server.state_dict(), n_agents=server.n_agents, rule=server.rule, eta=server.eta, alpha=server.alpha)
        except ValueError as exc:
            raise ValueError(f"cannot save a checkpoint of this server: {exc}") from None
        arrays.update(
            server_rule=np.array(sstate["rule"]),
            server_eta=np.array(sstate["eta"], dtype=np.float64),
            server_alpha=np.array(sstate["alpha"], dtype=np.float64),
            server_n_updates=np.array(sstate["n_updates"], dtype=np.int64),
            server_log_weights=sstate["log_weights"],
        )
    source_state = source.state_dict() if source is not None else state.get("source")
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
    record = getattr(population, "_record_checkpoint", None)
    if record is not None:
        record(given, pop["t"])
    return given


def _created_by() -> str:
    try:
        version = importlib.metadata.version("memoa-fast")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"memoa-fast {version}"


def _atomic_savez(path: Path, arrays: dict) -> None:
    """``np.savez`` to a temporary file in ``path``'s folder, fsync, then ``os.replace`` over ``path``."""
    folder = path.parent
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


def _remove_stale_temporaries(path: Path, started: float) -> list[str]:
    """Delete ``.<name>.XXXXXXXX.tmp`` files beside ``path`` last modified before ``started``; return their names."""
    pattern = re.compile(_TMP_NAME.format(name=re.escape(path.name)) + r"\Z")
    removed = []
    with contextlib.suppress(OSError):
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if not pattern.match(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < started:
                        os.unlink(entry.path)
                        removed.append(entry.name)
    return removed


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    where = str(path)
    try:
        with open(path, "rb") as fh:
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


def _fail(where, message):
    raise CheckpointError(f"{where}: {message}")


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """``(shape, dtype, fortran_order, header_bytes)`` of one ``.npy`` member, inflating only its first bytes."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")
        return shape, dtype, fortran, f.tell()


def _read_members(fh, where, n_agents, dim) -> dict:
    """The members' data, each checked by name, header and size before it is read (see :func:`load_checkpoint`)."""
    with zipfile.ZipFile(fh) as zf:
        infos = zf.infolist()
        if len(infos) > _MAX_MEMBERS:
            _fail(where, f"holds {len(infos)} members, more than a checkpoint ever has ({_MAX_MEMBERS})")
        members = {}
        for info in infos:
            name = info.filename
            key = name[:-4] if name.endswith(".npy") else None
            known = key is not None and (key in _SCALARS or key in _ARRAYS or key.startswith((_SOURCE_AGENTS, _SOURCE_SHARED)))
            if not known or key in (_SOURCE_AGENTS, _SOURCE_SHARED):
                _fail(where, f"has an unknown member {name[:100]!r}: not a memoa-fast checkpoint, or tampered with")
            if key in members:
                _fail(where, f"has the member {name!r} twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                _fail(where, f"member {name!r} uses zip compression method {info.compress_type}; accepted: stored or deflate")
            members[key] = info

        headers = {key: _member_header(zf, info) for key, info in members.items()}
        for key, (shape, dtype, _, offset) in headers.items():
            if dtype.hasobject or dtype.kind not in "iufU" or dtype.fields is not None or dtype.subdtype is not None:
                _fail(where, f"member {key!r} has dtype {dtype}; a checkpoint holds only numbers and strings")
            declared = members[key].file_size
            needed = offset + math.prod(shape) * dtype.itemsize
            if declared != needed:
                _fail(where, f"member {key!r} is {declared} bytes in the zip directory, but its header ({dtype}, "
                             f"shape {shape}) needs {needed}: truncated or tampered with")

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
        if n_agents is not None and dim is not None and shape != (n_agents, dim):
            raise CheckpointError(
                f"{where} holds {shape[0]} agents of dimension {shape[1]}, the population has {n_agents} of dimension {dim}"
            )
        sizes = {"N": shape[0], "d": shape[1]}

        data = {}

        def read(key):
            if key not in data:
                shape, dtype, fortran, offset = headers[key]
                with zf.open(members[key]) as f:
                    f.read(offset)
                    nbytes = math.prod(shape) * dtype.itemsize
                    raw = f.read(nbytes)
                    if len(raw) != nbytes or f.read(1):  # the last read also checks the CRC
                        _fail(where, f"member {key!r} has {len(raw)} data bytes, its header needs {nbytes}")
                arr = np.frombuffer(raw, dtype=dtype) if nbytes else np.empty(0, dtype=dtype)
                data[key] = arr.reshape(shape, order="F" if fortran else "C")
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
            kind_ok = dtype.kind in "iu" and dtype.itemsize <= 8 if key == "labels" else dtype == np.float64
            if not kind_ok:
                _fail(where, f"entry {key!r} must be {'an integer array' if key == 'labels' else 'float64'}, got {dtype}")
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

    population = {key: data[key] for key in ("states", "costs", "labels", "mean_state", "mean_signal", "class_mean_signal") if key in data}
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


# =========================================================================== restore
def restore_checkpoint(checkpoint, population, server=None, *, source=None) -> Checkpoint:
    """Load a checkpoint (a path or a :class:`Checkpoint`) into ``population`` (and ``server``, ``source``).

    Everything is read and checked against the targets first: the
    population's and the server's states by their validators, the signal
    source's by its own ``validate_state_dict`` when it has one. A bad or
    mismatched checkpoint raises :class:`CheckpointError` and changes
    nothing. Returns the checkpoint.

    A source without ``validate_state_dict`` cannot be checked in advance: its
    ``load_state_dict`` then runs first, and if it fails the source gets its
    previous state back (from its ``state_dict()``), the population and the
    server are not touched, and :class:`CheckpointError` is raised.
    """
    if isinstance(checkpoint, Checkpoint):
        ckpt = checkpoint
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
    if source is not None:
        source.load_state_dict(source_state)
    record = getattr(population, "_record_checkpoint", None)
    if record is not None and ckpt.path is not None:
        record(ckpt.path, ckpt.t)
    return ckpt
