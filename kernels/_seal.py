"""Numba's on-disk cache made to see the files a jitted module takes values from.

Numba compiles a module-level value a jitted function reads (``CHUNK``, an
index of :mod:`._layout`, the ``fastmath`` flags) into the machine code as a
constant, and its cache (``cache=True``) decides whether cached code is fresh
from the stamp of the function's own source file and its bytecode only. A
change to a file the module imports values from (``git checkout``, an edited
constant) then leaves stale code in use: wrong indices, with bounds checks off
a crash.

:func:`seal`, called on the last line of every jitted module, adds to the
stamp Numba stores in each cache index (``*.nbi``) and compares before it
loads anything (``IndexDataCacheFile._source_stamp``) a SHA-256 digest of the
module's own source and of every sibling module it imports from, transitively
(``from .x import ...``, ``from . import x``). A cache written under other
contents of any of these files no longer matches: Numba ignores it, compiles
and overwrites it, as it does for an edit of the module itself. Nothing is
deleted and nothing but Numba writes the cache, so every locator
(``__pycache__``, ``NUMBA_CACHE_DIR``, the user-wide folder) and two
processes starting at once behave as Numba makes them (at worst both
compile). Unchanged files give the same digest: warm starts stay warm. The
cost is reading the few files once per process (well under a millisecond).

The digest is of the files as they are when the module is sealed; the
values are those of the sibling modules as they were imported, perhaps
long before (``import memoa_fast`` reads ``_config`` and ``_layout``, the
jitted modules are read on first use). So the package records the state of
its files first thing (:func:`snapshot`), and a module sealed after one of
its dependencies changed (a ``git checkout`` in a running notebook) gets no
on-disk cache in that process, with a warning to restart it: the old
values are never saved under the new files' digest.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings

# ``from .name import ...`` (a sibling module) and ``from . import a, b`` (sibling
# modules, or names of the package's __init__), at the start of a line. Only
# relative imports can reach the kernels' own files; tests/test_cache.py checks
# this reading against the AST. The literal prefix keeps the scan fast (~0.1 ms
# for _numba.py; a line-anchored pattern takes 0.6 ms).
_FROM_RELATIVE = re.compile(rb"from[ \t]+\.(\w*)[ \t]+import\b")


def _read(path: str, loader) -> bytes:
    """The bytes of ``path``, read afresh (through the module's loader when it has one: zip archives)."""
    if loader is not None and hasattr(loader, "get_data"):
        return loader.get_data(path)
    with open(path, "rb") as f:
        return f.read()


def _exists(path: str, loader) -> bool:
    """Whether ``path`` can be read as :func:`_read` reads it (inside a zip archive too, where ``os.path`` sees nothing)."""
    if loader is not None and hasattr(loader, "get_data"):
        try:
            loader.get_data(path)
        except OSError:
            return False
        return True
    return os.path.isfile(path)


def _imported_siblings(source: bytes, folder: str, loader=None) -> list[str]:
    """The files of the sibling modules ``source`` imports from (``__init__.py`` for names of the package)."""
    found = []
    for m in _FROM_RELATIVE.finditer(source):
        if source[source.rfind(b"\n", 0, m.start()) + 1:m.start()].strip():
            continue  # not at the start of a line
        if m.group(1):
            found.append(m.group(1).decode())
            continue
        for name in _imported_names(source, m.end()):
            found.append(name if _exists(os.path.join(folder, name + ".py"), loader) else "__init__")
    return [os.path.join(folder, name + ".py") for name in found]


def _imported_names(source: bytes, start: int) -> list[str]:
    """The names of ``from . import a as b, c`` whose ``import`` ends at ``start`` (``a``, ``c``), as Python reads them.

    Parenthesised (up to the closing parenthesis) or the logical line (backslash continuations); comments dropped.
    """
    j = start
    while source[j:j + 1] in (b" ", b"\t"):
        j += 1
    if source[j:j + 1] == b"(":  # up to the first ')' outside a comment ("_c,  # see f(x)" does not end it)
        lines, k = [], j + 1
        while True:
            end = source.find(b"\n", k)
            line = (source[k:] if end < 0 else source[k:end]).split(b"#", 1)[0]
            close = line.find(b")")
            if close >= 0 or end < 0:
                lines.append(line if close < 0 else line[:close])
                break
            lines.append(line)
            k = end + 1
        body = b"\n".join(lines)
    else:
        end = start
        while True:
            end = source.find(b"\n", end)
            if end < 0:
                end = len(source)
                break
            if not source[max(0, end - 2):end].rstrip(b"\r").endswith(b"\\"):
                break
            end += 1
        body = source[start:end]
    names = []
    for item in re.sub(rb"#[^\n]*", b"", body).split(b","):
        words = item.replace(b"\\", b" ").split()  # "a as b": the module is "a"
        if words and words[0].decode().isidentifier():
            names.append(words[0].decode())
    return names


def dependencies(path: str, loader=None) -> list[str]:
    """``path`` and the files of every sibling module it imports from, transitively, sorted.

    Parameters
    ----------
    path : str
        A module's source file.
    loader : importlib loader, optional
        The module's loader (reads files inside a zip archive too).

    Returns
    -------
    list of str
        Absolute paths.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    seen, todo = set(), [path]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(_imported_siblings(_read(file, loader), folder, loader))
    return sorted(seen)


def digest(path: str, loader=None) -> str:
    """SHA-256 over the names and contents of :func:`dependencies` of ``path``."""
    return _digest_files(dependencies(path, loader), loader)


def _digest_files(files: list[str], loader) -> str:
    h = hashlib.sha256()
    for file in files:
        data = _read(file, loader)
        h.update(os.path.basename(file).encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


# The state ``(mtime_ns, size)`` of each source file of a package when the package was imported, before any of
# its modules was read (``kernels/__init__.py`` imports this module first, which records its own folder). A file
# changed since may be loaded in its old version: ``import memoa_fast`` reads _config and _layout at once, the
# jitted modules on first use. A jitted module imported after a ``git checkout`` would compile the old values
# and save them under the digest of the new files, for every later process to load; seal() turns its cache off
# in this process instead.
_LOADED: dict[str, tuple[int, int]] = {}


def snapshot(init_file: str) -> None:
    """Record the state of every ``.py`` file beside ``init_file``, a package's ``__init__``, before any is imported."""
    try:
        with os.scandir(os.path.dirname(os.path.abspath(init_file))) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    _LOADED[entry.path] = (st.st_mtime_ns, st.st_size)
    except OSError:  # not a folder (a zip archive): nothing recorded, nothing compared
        pass


def changed_since_import(files: list[str]) -> list[str]:
    """The recorded ``files`` (:func:`snapshot`) whose state changed since: their modules may hold the old contents."""
    changed = []
    for file in files:
        before = _LOADED.get(file)
        if before is not None:
            try:
                st = os.stat(file)
            except OSError:
                changed.append(file)
                continue
            if (st.st_mtime_ns, st.st_size) != before:
                changed.append(file)
    return changed


def sealed_stamp(dispatcher):
    """The stamp a sealed dispatcher's cache compares with its index's, or None when not sealed (or caching is off)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    stamp = getattr(cache_file, "_source_stamp", None)
    return stamp if isinstance(stamp, tuple) and len(stamp) == 3 and stamp[0] == "memoa_fast.kernels" else None


def seal(namespace: dict) -> int:
    """Make every cached dispatcher defined in a jitted module depend on its dependency files.

    Call on the module's last line, ``seal(globals())``, before any of its
    functions runs (a first call loads or compiles).

    Parameters
    ----------
    namespace : dict
        The module's ``globals()``.

    Returns
    -------
    int
        How many dispatchers were sealed (0 with the cache off).
    """
    from numba.core.dispatcher import Dispatcher

    path = namespace["__file__"]
    loader = getattr(namespace.get("__spec__"), "loader", None)
    reason = "cannot tie Numba's cache of {} to the files it takes values from; its on-disk cache is off (every process compiles)"
    try:
        files = dependencies(path, loader)
        key = _digest_files(files, loader)
    except OSError:  # a source file cannot be read: no way to tell stale code, so no cache
        key = None
    else:
        changed = changed_since_import([f for f in files if f != os.path.abspath(path)])  # its own file was just read
        if changed:  # its values may be the old ones: compiled code must not be saved under the new digest
            key = None
            reason = (f"{', '.join(os.path.basename(f) for f in changed)} changed since memoa_fast.kernels was imported "
                      "in this process (its modules may hold the old values): {}'s on-disk cache is off in this process; "
                      "restart it to use the new files")
    sealed, off = 0, False
    for value in list(namespace.values()):
        if not isinstance(value, Dispatcher) or getattr(value.py_func, "__module__", None) != namespace["__name__"]:
            continue
        cache = getattr(value, "_cache", None)
        cache_file = getattr(cache, "_cache_file", None)
        if cache_file is None and type(cache).__name__ == "NullCache":
            continue  # cache=False
        if value.overloads:
            raise RuntimeError(f"seal() must run before any call of {value.py_func.__qualname__}: its code is already loaded")
        if key is not None and hasattr(cache_file, "_source_stamp"):
            cache_file._source_stamp = ("memoa_fast.kernels", cache_file._source_stamp, key)
            sealed += 1
        else:  # another Numba's layout, or an unreadable file: never risk stale code
            cache.disable()
            off = True
    if off:
        warnings.warn(f"memoa_fast: {reason.format(namespace['__name__'])}", RuntimeWarning, stacklevel=2)
    return sealed


snapshot(__file__)  # kernels/__init__.py imports this module before any other
