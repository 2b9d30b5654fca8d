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

The cache is also made safe in the places Numba's is not (:func:`seal`
installs :func:`_checked_classes` on each sealed dispatcher's cache, and
``_config.CACHE`` asks :func:`cache_usable` before any kernel is
decorated). Where Numba finds no writable cache folder (a read-only install
and home, an unusable ``NUMBA_CACHE_DIR``) it raised at import; the kernels
are now compiled in memory instead, with one warning per process naming
``NUMBA_CACHE_DIR`` and ``MEMOA_FAST_CACHE=0``. A cache file that cannot be
read or does not hold what its name promises (truncated, empty, random
bytes, a directory, zeros inside, written by another version of the files
or of Numba, or for another signature) is a miss: compiled, then overwritten. A write
that fails (a full disk, a folder made read-only) keeps the code in memory,
with that one warning, and never leaves an index that points at old code:
each data file carries a CRC-32 of its contents, the Numba version, the
stamp and the key it was written for, and is written before the index that
names it.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import pickle
import re
import warnings
import zlib

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
        checked = _checked_classes(type(cache), type(cache_file)) if hasattr(cache_file, "_source_stamp") else None
        if key is not None and checked is not None:
            cache_file._source_stamp = ("memoa_fast.kernels", cache_file._source_stamp, key)
            cache.__class__, cache_file.__class__ = checked
            sealed += 1
        else:  # another Numba's layout, or an unreadable file: never risk stale code
            cache.disable()
            off = True
    if off:
        warnings.warn(f"memoa_fast: {reason.format(namespace['__name__'])}", RuntimeWarning, stacklevel=2)
    return sealed


# Causes already warned about in this process: at most one warning per cause, whatever the number of kernels.
_WARNED: set[str] = set()


def _warn_once(cause: str, message: str, stacklevel: int) -> None:
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


_FIX = ("point NUMBA_CACHE_DIR at a writable folder with free space to keep the compiled kernels between runs, "
        "or set MEMOA_FAST_CACHE=0 to compile in memory without this warning")


def cache_usable(path: str) -> bool:
    """Whether Numba can keep an on-disk cache for the functions of the file ``path``; warns once if not.

    Numba looks for a writable folder (``NUMBA_CACHE_DIR``, ``__pycache__``
    beside the file, the user-wide cache folder) when a function is decorated
    with ``cache=True`` and raises ``RuntimeError: cannot cache function ...:
    no locator available`` when there is none (a read-only install used with
    a read-only home): the import of every kernel failed. Numba itself is
    asked here, for a function of that file, before its kernels are decorated
    (``_config.CACHE``): ``False`` lets them compile in memory.

    Parameters
    ----------
    path : str
        A source file of the jitted modules' folder (all its files share the answer).

    Returns
    -------
    bool
        True when Numba found a cache folder (or cannot be asked: it decides then, as it always did).
    """
    try:
        from numba.core import config
        from numba.core.caching import FunctionCache
    except ImportError:  # another Numba's layout: decorate as before
        return True
    if config.DISABLE_JIT:  # no dispatcher, no cache: nothing to ask
        return True
    namespace: dict = {}
    exec(compile("def _probe():\n    pass\n", path, "exec"), namespace)  # a function "of" that file
    try:
        FunctionCache(namespace["_probe"])
    except Exception as e:  # RuntimeError: no locator; OSError: the file cannot be read
        tried = [f"NUMBA_CACHE_DIR={config.CACHE_DIR!r}" if config.CACHE_DIR else "NUMBA_CACHE_DIR (unset)",
                 os.path.join(os.path.dirname(os.path.abspath(path)), "__pycache__")]
        try:
            from numba.misc.appdirs import AppDirs

            tried.append(AppDirs(appname="numba", appauthor=False).user_cache_dir)
        except Exception:  # the folder is only named in the message
            pass
        if getattr(config, "CACHE_LOCATOR_CLASSES", None):
            tried.append(f"NUMBA_CACHE_LOCATOR_CLASSES={config.CACHE_LOCATOR_CLASSES!r}")
        # Numba's own words unless it found no folder (an unknown class in NUMBA_CACHE_LOCATOR_CLASSES is not a folder)
        cause = "no writable folder" if "no locator available" in str(e) else f"{type(e).__name__}: {e}"
        _warn_once("cache", f"memoa_fast: Numba cannot keep its on-disk cache of the kernels here ({cause}; tried "
                            f"{', '.join(tried)}): they are compiled in memory, again in every process (seconds "
                            f"at first use); {_FIX}", stacklevel=3)  # the jitted module's ``from ._config import CACHE``
        return False
    return True


# Marks a data file written by _checked_classes()'s cache file: MAGIC, the CRC-32 of the body (4 bytes, big-endian), the body.
# A CRC, not a cryptographic hash: it finds accidental damage (a torn copy, zeroed blocks) at 1/7 of SHA-256's cost
# (0.2 against 1.2 ms for the largest kernel's 0.8 MB), and the cache folder is trusted as Numba trusts it.
_MAGIC = b"memoa_fast.kernels cached code v2\n"
_CLASSES: dict[tuple[type, type], tuple[type, type] | None] = {}


def _checked_classes(cache_type: type, file_type: type) -> tuple[type, type] | None:
    """Subclasses of a dispatcher's cache class and of its cache file class that tolerate what Numba's do not.

    - The index (``*.nbi``) that cannot be read or unpickled is empty (Numba raised from ``_load_index``:
      every later run died until the file was deleted by hand); the next save overwrites it.
    - A data file (``*.nbc``) is ``MAGIC + crc32(body) + body``, the body three pickles: the Numba version,
      ``(stamp, key)``, the data. It is loaded only if intact and written by this Numba for this very stamp
      and key (all that the index is checked for, and the key it names the file under), each read before
      the next is unpickled. Numba loaded whatever the file held: zeros inside gave a segmentation fault, a
      file another process (other files, another signature, another Numba sharing the folder) wrote between
      the index and the data gave its code.
    - The data file is written before the index that names it: a write that fails (a full disk) leaves the
      old index, whose stamp no longer matches. Numba wrote the index first: after a failed data write the
      new index named the old file, and the old constants were loaded by every later process.
    - Any error while loading is a miss; any error while saving keeps the compiled code in memory, with one
      warning per process (Numba raised both out of the kernel's first call).

    None when Numba's classes lack what the subclasses use (another Numba's layout).
    """
    key = (cache_type, file_type)
    if key in _CLASSES:
        return _CLASSES[key]
    needed = {file_type: ("_load_index", "_save_index", "_data_name", "_data_path", "_dump", "_open_for_write", "load", "save"),
              cache_type: ("load_overload", "save_overload")}
    if not all(callable(getattr(t, name, None)) for t, names in needed.items() for name in names):
        _CLASSES[key] = None
        return None

    class CheckedCacheFile(file_type):
        def _load_index(self):
            try:
                overloads = super()._load_index()
            except Exception:  # truncated, empty, garbage, a directory, unreadable: nothing cached
                return {}
            return overloads if isinstance(overloads, dict) else {}

        def load(self, key):
            name = self._load_index().get(key)
            if name is None:
                return None
            try:
                with open(self._data_path(name), "rb") as f:
                    raw = f.read()
            except OSError:
                return None
            body = raw[len(_MAGIC) + 4:]
            if raw[:len(_MAGIC)] != _MAGIC or raw[len(_MAGIC):len(_MAGIC) + 4] != zlib.crc32(body).to_bytes(4, "big"):
                return None
            try:
                f = io.BytesIO(body)
                if pickle.load(f) != self._version or pickle.load(f) != (self._source_stamp, key):
                    return None  # another Numba's code (its stamps may be equal: content hashes), other files, another key
                return pickle.load(f)
            except Exception:  # intact but unreadable by this Python or Numba: a miss
                return None

        def save(self, key, data):
            overloads = self._load_index()
            name = overloads.get(key)
            new = name is None
            if new:
                used = set(overloads.values())
                name = next(n for n in map(self._data_name, itertools.count(1)) if n not in used)
                overloads[key] = name
            body = pickle.dumps(self._version, protocol=-1) + self._dump((self._source_stamp, key)) + self._dump(data)
            with self._open_for_write(self._data_path(name)) as f:
                f.write(_MAGIC + zlib.crc32(body).to_bytes(4, "big") + body)
            if new:
                self._save_index(overloads)

    class CheckedCache(cache_type):
        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception:  # a cache that cannot be read is a miss: compiled, then overwritten
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception as e:  # the compiled code is in memory: the run goes on
                _warn_once("cache", f"memoa_fast: Numba's on-disk cache could not be written in {self._cache_path} "
                                    f"({type(e).__name__}: {e}): the kernels compiled in this process are kept in "
                                    f"memory only; {_FIX}", stacklevel=2)

    _CLASSES[key] = (CheckedCache, CheckedCacheFile)
    return _CLASSES[key]


snapshot(__file__)  # kernels/__init__.py imports this module before any other
