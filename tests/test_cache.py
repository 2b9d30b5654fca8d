"""Numba's on-disk cache never serves code compiled with old values of another file (kernels/_seal.py).

Numba freezes the module-level values a jitted function reads into its machine
code, and its cache checks only the function's own file. The reproducer is a
tiny package built like ``kernels/``: a jitted module with ``cache=True`` that
imports a constant from a sibling file. Changing the sibling alone used to
leave the old constant in use (the unsealed control below still shows it);
``seal(globals())`` on the jitted module's last line makes Numba see the change.
"""
import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memoa_fast.kernels import _seal

KERNELS = Path(_seal.__file__).parent
ROOT = KERNELS.parent

# One process runs every case: numba.config.CACHE_DIR is read each time a
# dispatcher's cache is made, and re-importing a purged module builds new
# dispatchers that read the index files from disk, as a new process would.
SCRIPT = textwrap.dedent(
    r"""
    import importlib, json, sys
    import numba
    sys.path.insert(0, sys.argv[1])
    out = {}

    def run(pkg):
        for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        mod = importlib.import_module(pkg + "._kern")
        value = int(mod.get())
        stats = mod.get.stats
        return value, sum(stats.cache_hits.values()), sum(stats.cache_misses.values())

    def write_const(pkg, value):
        with open(f"{sys.argv[1]}/{pkg}/_const.py", "w") as f:
            f.write(f"VALUE = {value}\n")  # the same size for every digit: a stamp of (mtime, size) cannot tell

    for cache_dir in ("", sys.argv[2]):
        numba.config.CACHE_DIR = cache_dir
        for pkg in sys.argv[3:]:
            if not pkg.endswith("_" + ("dir" if cache_dir else "tree")):
                continue
            write_const(pkg, 1)
            first = run(pkg)
            write_const(pkg, 2)
            changed = run(pkg)
            same = run(pkg)
            out[pkg] = [first, changed, same]
    print(json.dumps(out))
    """
)

KERN = textwrap.dedent(
    """
    from numba import njit

    from ._const import VALUE


    @njit(cache=True)
    def get():
        return VALUE
    """
)


def _package(root, name, sealed):
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "_const.py").write_text("VALUE = 0\n")
    tail = "\nfrom memoa_fast.kernels._seal import seal\n\nseal(globals())\n" if sealed else ""
    (folder / "_kern.py").write_text(KERN + tail)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "MEMOA_FAST_CACHE", "NUMBA_DISABLE_JIT")}
    env.update(extra)
    return env


def test_a_changed_sibling_constant_is_never_served_stale_by_the_cache(tmp_path):
    """A constant imported from another file changes: sealed code recompiles (in-tree and NUMBA_CACHE_DIR), unsealed is stale."""
    import json

    names = ["plain_tree", "sealed_tree", "plain_dir", "sealed_dir"]
    for name in names:
        _package(tmp_path, name, sealed=name.startswith("sealed"))
    cache_dir = tmp_path / "numba-cache"
    cache_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(cache_dir), *names],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # (value, cache hits, cache misses) for: first import, after the sibling changed, again unchanged
    for where in ("tree", "dir"):
        first, changed, same = out[f"plain_{where}"]
        assert first == [1, 0, 1]
        # The defect class in Numba itself: the old constant is loaded from the cache.
        assert changed == [1, 1, 0], f"Numba now notices a changed sibling by itself ({where}): {changed}"
        first, changed, same = out[f"sealed_{where}"]
        assert first == [1, 0, 1]
        assert changed == [2, 0, 1], f"stale code served after the sibling changed ({where})"
        assert same == [2, 1, 0], f"recompiled although nothing changed ({where})"
    assert (tmp_path / "sealed_tree" / "__pycache__").is_dir()
    assert any(cache_dir.rglob("_kern.get-*.nbi"))


def test_two_processes_starting_at_once_after_a_change_both_get_the_new_value(tmp_path):
    """Both compile or load without a crash or an error, and neither runs the old constant."""
    _package(tmp_path, "pair", sealed=True)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import pair._kern as k; print(k.get())"
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_env(), capture_output=True, text=True).stdout.split() == ["0"]
    (tmp_path / "pair" / "_const.py").write_text("VALUE = 7\n")
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for stdout, stderr, rc in results:
        assert rc == 0, stderr
        assert stdout.split() == ["7"]
        assert "Warning" not in stderr and "Error" not in stderr, stderr


def _jitted_modules(folder=KERNELS, package="memoa_fast.kernels"):
    """The package's modules that define a Numba dispatcher (found by importing them all, not by their text).

    A module whose jit options come from elsewhere (``@njit(**options)``) has no ``cache=`` in its text; every
    dispatcher object alive is looked at (:func:`_dispatchers`), those kept in a dict or a list included.
    """
    names = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.name not in ("__init__.py", "_seal.py")}
    for name in names:
        importlib.import_module(name)
    return sorted(names[m] for m in {d.py_func.__module__ for d in _dispatchers()} & names.keys())


def _dispatchers(module_name=None):
    """Every Numba dispatcher object in this process (of ``module_name`` only, if given): module globals or not."""
    import gc

    from numba.core.dispatcher import Dispatcher

    # type(o), not isinstance(o, ...): isinstance reads o.__class__ of every other object, which raises for a dead
    # weakref.proxy and executes a module made lazy by importlib.util.LazyLoader.
    return [o for o in gc.get_objects() if issubclass(type(o), Dispatcher) and module_name in (None, o.py_func.__module__)]


def test_the_walk_over_the_process_objects_reads_nothing_of_the_other_objects(tmp_path, monkeypatch):
    """A dead ``weakref.proxy`` or a lazily loaded module anywhere in the process: the walk neither fails nor imports it.

    ``isinstance`` looked up ``__class__`` on every object: ReferenceError for the proxy (the guard tests failed
    for an object of another test), and the lazy module's code ran (an import with side effects, from a test).
    """
    import importlib.util
    import weakref

    class Gone:
        pass

    target = Gone()
    proxy = weakref.proxy(target)
    del target
    (tmp_path / "lazy_side_effect.py").write_text("import sys\n\nsys.lazy_side_effect_ran = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.find_spec("lazy_side_effect")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    lazy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lazy)
    try:
        assert all(type(d).__name__ != "weakproxy" for d in _dispatchers())
        assert not hasattr(sys, "lazy_side_effect_ran"), "the walk executed a lazily loaded module"
    finally:
        del proxy, lazy
        if hasattr(sys, "lazy_side_effect_ran"):
            del sys.lazy_side_effect_ran


# Absolute imports of these reach the package's own files, which the seal does not follow (it reads relative imports).
FIRST_PARTY = ("memoa_fast", "kernels")


def _ast_dependencies(path):
    """What the interpreter imports: every relative ``from`` import's file, transitively (the AST, not _seal's regex).

    AssertionError for every form the seal cannot follow, in the module and in each file it reaches: an import
    of the package's own modules by absolute name (``import memoa_fast.kernels._layout``,
    ``from memoa_fast.kernels._layout import X``, ``from memoa_fast.kernels import _layout``), a relative import
    from outside the folder (``from ..``) or from a sub-package, and an import by a call (``import_module``).
    """
    seen, todo = set(), [path.resolve()]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{file.name}: a jitted module's values must come from kernels/ itself"
                if node.module:
                    assert "." not in node.module and not (file.parent / node.module).is_dir(), (
                        f"{file.name}: from .{node.module}: a sub-package, which the seal does not read")
                    todo.append(file.parent / (node.module + ".py"))
                else:
                    for a in node.names:
                        assert not (file.parent / a.name).is_dir(), f"{file.name}: from . import {a.name}: a sub-package"
                        sibling = file.parent / (a.name + ".py")
                        todo.append(sibling if sibling.exists() else file.parent / "__init__.py")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]:
                    assert name.split(".")[0] not in FIRST_PARTY, (
                        f"{file.name}: absolute import of the package's own {name}; import it relatively (from .x import)")
            elif isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                assert called not in ("import_module", "__import__"), f"{file.name}: an import by a call, which the seal cannot see"
    return sorted(str(p) for p in seen)


def test_the_seal_covers_every_file_a_jitted_module_imports_from():
    """For each jitted module, _seal's dependency list is the AST's: every sibling it (transitively) imports a name from."""
    modules = _jitted_modules()
    assert {p.name for p in modules} >= {"_numba.py", "_pipeline_numba.py", "_noise.py", "_forecast_numba.py"}
    for path in modules:
        deps = _seal.dependencies(str(path))
        assert deps == _ast_dependencies(path), path.name
        assert len(deps) >= 2, path.name  # the module and at least _config (CACHE, FASTMATH)


def test_every_cached_kernel_is_sealed_with_the_digest_of_its_files():
    """Importing the jitted modules seals each cached dispatcher, before any call, with the current digest."""
    modules = _jitted_modules()  # imports them all
    alive = _dispatchers()  # one walk over the process's objects (tens of ms in a long test session)
    for path in modules:
        tree = ast.parse(path.read_text())
        last = tree.body[-1]
        assert ast.unparse(last) == "seal(globals())", f"{path.name} must end with seal(globals())"
        dispatchers = [d for d in alive if d.py_func.__module__ == f"memoa_fast.kernels.{path.stem}"]
        assert dispatchers, path.name
        for d in dispatchers:
            assert _unsealed(d, _seal.digest(str(path))) is None, f"{path.name}: {d.py_func.__name__} not sealed"


def _unsealed(dispatcher, digest):
    """None when ``dispatcher`` cannot serve stale code: no on-disk cache, or one sealed with ``digest``; else its stamp.

    Sealed means both: the stamp, and the cache classes that check each data file and survive broken files.
    """
    if type(dispatcher._cache).__name__ == "NullCache":  # cache=False, or MEMOA_FAST_CACHE=0
        return None
    stamp = _seal.sealed_stamp(dispatcher)
    checked = (type(dispatcher._cache).__name__, type(dispatcher._cache._cache_file).__name__) == ("CheckedCache", "CheckedCacheFile")
    return None if stamp is not None and stamp[2] == digest and checked else dispatcher._cache._cache_file._source_stamp


def test_the_digest_follows_each_dependency_and_nothing_else(tmp_path):
    """Any byte of the module or of a file it imports from changes the digest; an unrelated sibling does not."""
    (tmp_path / "__init__.py").write_text("X = 1\n")
    (tmp_path / "_a.py").write_text("from ._b import B\nfrom . import X\nA = 1\n")
    (tmp_path / "_b.py").write_text("B = 2\n")
    (tmp_path / "_other.py").write_text("C = 3\n")
    (tmp_path / "_k.py").write_text("from ._a import (\n    A,\n)\nfrom . import _b\n")
    path = str(tmp_path / "_k.py")
    assert [Path(p).name for p in _seal.dependencies(path)] == ["__init__.py", "_a.py", "_b.py", "_k.py"]
    before = _seal.digest(path)
    assert _seal.digest(path) == before
    (tmp_path / "_other.py").write_text("C = 4\n")
    assert _seal.digest(path) == before
    for name in ("__init__.py", "_a.py", "_b.py", "_k.py"):
        text = (tmp_path / name).read_text()
        (tmp_path / name).write_text(text + "#\n")
        assert _seal.digest(path) != before, name
        (tmp_path / name).write_text(text)
        assert _seal.digest(path) == before


def test_a_sibling_module_imported_by_name_is_a_dependency_inside_a_zip_archive_too(tmp_path):
    """``from . import _const`` in a zip-imported package: the digest reads ``_const.py`` (os.path sees no file there).

    Numba caches zip-imported functions (its ZipCacheLocator); the scan took ``_const`` for a name of the package's
    ``__init__`` there, so a changed ``_const.py`` was served stale.
    """
    import zipfile
    import zipimport

    def archive(value):
        path = tmp_path / f"pkg{value}.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("pkg/__init__.py", "")
            z.writestr("pkg/_const.py", f"VALUE = {value}\n")
            z.writestr("pkg/_kern.py", "from . import _const\n")
        return str(path), zipimport.zipimporter(str(path))

    digests = []
    for value in (1, 2):
        path, loader = archive(value)
        deps = _seal.dependencies(f"{path}/pkg/_kern.py", loader)
        assert [os.path.basename(p) for p in deps] == ["_const.py", "_kern.py"]
        digests.append(_seal.digest(f"{path}/pkg/_kern.py", loader))
    assert digests[0] != digests[1]  # the archive's own name is not hashed: the change in _const.py is what counts


@pytest.mark.parametrize("where", ["module", "dependency"])
@pytest.mark.parametrize(
    "line",
    [
        "import memoa_fast.kernels._layout",
        "from memoa_fast.kernels._layout import Q",
        "from memoa_fast.kernels import _layout",
        "from .._validation import MAX_COUNT",
        "from .sub import X",
        "from . import sub",
        "L = importlib.import_module('memoa_fast.kernels._layout')",
    ],
)
def test_the_guard_refuses_every_import_the_seal_cannot_follow(tmp_path, line, where):
    """The AST side of the seal's check fails on each import form the seal's scan does not read.

    It refused only ``import memoa_fast...``: ``from memoa_fast.kernels._layout import Q`` in a jitted module passed
    the check, and a change to ``_layout.py`` was then served stale.
    """
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "_dep.py").write_text("import math\n\nfrom numba import njit\n" + (line + "\n" if where == "dependency" else ""))
    (tmp_path / "_k.py").write_text("from ._dep import math\n" + (line + "\n" if where == "module" else ""))
    try:
        _ast_dependencies(tmp_path / "_k.py")
    except AssertionError:
        return
    raise AssertionError(f"the guard let through {line!r} in the {where}")


def test_the_guard_finds_a_cached_dispatcher_by_its_object_wherever_it_is_kept(tmp_path, monkeypatch):
    """A module whose jit options come from another file and whose dispatcher sits in a dict is found and unsealed.

    The check looked for ``cache=`` in a module's text and at the dispatchers bound to its names: this module has
    neither, so its unsealed cache (stale after a change of ``_opts.py``) passed.
    """
    folder = tmp_path / "hidden_jit_pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "_opts.py").write_text("OPTS = {'cache': True}\n")  # no 'cache=' in any text
    (folder / "_kern.py").write_text(
        "from numba import njit\n\nfrom ._opts import OPTS\n\n\ndef _get():\n    return 1\n\n\nKERNELS = {'get': njit(**OPTS)(_get)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert [p.name for p in _jitted_modules(folder, "hidden_jit_pkg")] == ["_kern.py"]
        (found,) = _dispatchers("hidden_jit_pkg._kern")
        assert _unsealed(found, _seal.digest(str(folder / "_kern.py"))) is not None
    finally:
        for name in [m for m in sys.modules if m.startswith("hidden_jit_pkg")]:
            del sys.modules[name]


def test_the_scan_reads_every_form_of_from_dot_import_as_the_ast_does(tmp_path):
    """``as`` aliases, comments in parentheses, backslash continuations, a statement on the next line: the AST's files.

    The scan took ``B`` of ``from . import _b as B`` and ``VALUE`` of the next line for names of ``__init__``
    (a digest over a file the module does not read), and missed ``_d`` after a comment.
    """
    (tmp_path / "__init__.py").write_text("X = 1\n")
    for name in "bcdef":
        (tmp_path / f"_{name}.py").write_text(f"{name.upper()} = 1\n")
    (tmp_path / "_k.py").write_text(
        "from . import _b as B\nfrom . import (\n    _c,  # a comment, _x\n    _d as D,\n)\nfrom . import _e, \\\n    _f\nVALUE = 1\n")
    deps = _seal.dependencies(str(tmp_path / "_k.py"))
    assert deps == _ast_dependencies(tmp_path / "_k.py")
    assert [Path(p).name for p in deps] == ["_b.py", "_c.py", "_d.py", "_e.py", "_f.py", "_k.py"]
    # A ')' inside a comment does not close the parentheses: the scan ended at "f(x)" and missed _d.
    (tmp_path / "_k.py").write_text("from . import (  # the (two) modules\n    _c,  # see f(x)\n    _d)\n")
    deps = _seal.dependencies(str(tmp_path / "_k.py"))
    assert deps == _ast_dependencies(tmp_path / "_k.py")
    assert [Path(p).name for p in deps] == ["_c.py", "_d.py", "_k.py"]


RACE = textwrap.dedent(
    r"""
    import importlib, json, sys, warnings
    sys.path.insert(0, sys.argv[1])
    import race  # `import memoa_fast`: the package and the sibling the kernel takes a value from, VALUE = 1

    with open(sys.argv[1] + "/race/_const.py", "w") as f:
        f.write("VALUE = 2\n")  # a git checkout while the process runs, before the kernel's first use
    out = []
    for _ in range(2):  # in this process (its old _const), then as a fresh process would (a new import of all)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = importlib.import_module("race._kern")
            value = int(mod.get())
        stats = mod.get.stats
        out.append([value, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), [str(w.message) for w in caught]])
        for m in [m for m in sys.modules if m == "race" or m.startswith("race.")]:
            del sys.modules[m]
        importlib.invalidate_caches()
    print(json.dumps(out))
    """
)


def test_a_sibling_changed_after_the_package_was_imported_never_poisons_the_cache(tmp_path):
    """A kernel first used after a git checkout in a running process: the old values are not saved for the new files.

    ``import memoa_fast`` reads _config and _layout, the jitted modules are read on first use: after a checkout in
    between, the process compiled the old constants and saved them under the digest of the new files, and every
    later process loaded them (hits, the old value) until a file changed again.
    """
    import json

    folder = tmp_path / "race"
    folder.mkdir()
    # Built like kernels/__init__.py: the files' state recorded before any sibling is read (getattr: the test also
    # runs against a _seal without snapshot(), where it shows the old value loaded by the later process).
    (folder / "__init__.py").write_text(
        "from memoa_fast.kernels import _seal\n\ngetattr(_seal, 'snapshot', id)(__file__)\nfrom ._const import VALUE  # noqa\n")
    (folder / "_const.py").write_text("VALUE = 1\n")
    (folder / "_kern.py").write_text(KERN + "\nfrom memoa_fast.kernels._seal import seal\n\nseal(globals())\n")
    done = subprocess.run([sys.executable, "-c", RACE, str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    (in_process, later) = json.loads(done.stdout.strip().splitlines()[-1])
    assert later == [2, 0, 1, []], f"code compiled from the old value was saved under the new files' digest: {later}"
    assert in_process[:3] == [1, 0, 1]  # Python's own semantics: the module holds the old value
    assert len(in_process[3]) == 1 and "_const.py changed since memoa_fast.kernels was imported" in in_process[3][0]


def test_the_kernels_package_records_its_files_before_reading_any():
    """``kernels/__init__.py`` imports _seal (which records the files' state) before any other sibling."""
    body = ast.parse((KERNELS / "__init__.py").read_text()).body
    first = next(node for node in body if isinstance(node, (ast.Import, ast.ImportFrom)))
    assert ast.unparse(first).startswith("from . import _seal"), ast.unparse(first)
    assert str(KERNELS / "_layout.py") in _seal._LOADED


# Environments where Numba's on-disk cache cannot be used as it expects: the kernels still run, correct, with at
# most one warning per process; never a crash, never stale or wrong code. Tiny packages built like kernels/ with
# copies of the real _config.py and _seal.py (what kernels/__init__.py and a jitted module do, in a few lines).
TINY_KERN = textwrap.dedent(
    """
    from numba import njit

    from ._config import CACHE
    from ._const import VALUE
    from ._seal import seal


    @njit(cache=CACHE)
    def get():
        return VALUE


    @njit(cache=CACHE)
    def twice(x):
        return 2 * x


    seal(globals())
    """
)


def _tiny_package(root, name, kern_modules=("_kern",)):
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("from . import _seal as _seal\n")
    for file in ("_config.py", "_seal.py"):
        (folder / file).write_text((KERNELS / file).read_text())
    (folder / "_const.py").write_text("VALUE = 1\n")
    for module in kern_modules:
        (folder / f"{module}.py").write_text(TINY_KERN)
    return folder


NO_FOLDER = textwrap.dedent(
    r"""
    import json, sys, warnings
    sys.path.insert(0, sys.argv[1])
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import nofolder._kern as a, nofolder._kern2 as b
            out["values"] = [int(a.get()), int(b.get())]
            out["caches"] = [type(a.get._cache).__name__, type(b.get._cache).__name__]
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
    out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    print(json.dumps(out))
    """
)


def test_no_writable_cache_folder_compiles_in_memory_with_one_warning(tmp_path):
    """No folder Numba could cache in (read-only install and home, NUMBA_CACHE_DIR unusable): no crash at import.

    Numba raised ``RuntimeError: cannot cache function ...: no locator available`` when a kernel module was
    decorated, so ``memoa run`` died. Here ``__pycache__``, ``NUMBA_CACHE_DIR`` and the user-wide folder's parent
    are regular files (as unusable as read-only folders, without root); two jitted modules, one warning.
    """
    import json

    folder = _tiny_package(tmp_path, "nofolder", ("_kern", "_kern2"))
    (folder / "__pycache__").write_text("")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    env = _env(NUMBA_CACHE_DIR=str(blocker), XDG_CACHE_HOME=str(blocker / "cache"), HOME=str(blocker))
    done = subprocess.run([sys.executable, "-c", NO_FOLDER, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    assert out["values"] == [1, 1] and out["caches"] == ["NullCache", "NullCache"]
    (warning,) = out["warnings"]  # one per process, not one per module
    assert warning.startswith("RuntimeWarning: memoa_fast: Numba cannot keep its on-disk cache"), warning
    assert "NUMBA_CACHE_DIR" in warning and "MEMOA_FAST_CACHE=0" in warning and str(blocker) in warning, warning


def test_the_warning_names_numbas_reason_when_it_is_not_a_missing_folder(monkeypatch):
    """An unknown class in NUMBA_CACHE_LOCATOR_CLASSES is not 'no writable folder': the warning says what Numba said.

    The probe took any RuntimeError for "no writable folder" (and advised a writable NUMBA_CACHE_DIR, which cannot help).
    """
    from numba.core import config

    if not hasattr(config, "CACHE_LOCATOR_CLASSES"):
        pytest.skip("this Numba has no NUMBA_CACHE_LOCATOR_CLASSES")
    monkeypatch.setattr(config, "CACHE_LOCATOR_CLASSES", "NoSuchLocator")
    monkeypatch.setattr(_seal, "_WARNED", set())
    with pytest.warns(RuntimeWarning) as caught:
        assert _seal.cache_usable(str(KERNELS / "_config.py")) is False
    (warning,) = [str(w.message) for w in caught]
    assert "NoSuchLocator" in warning and "no writable folder" not in warning, warning


BROKEN = textwrap.dedent(
    r"""
    import glob, importlib, json, os, resource, shutil, signal, sys, warnings
    root, cache = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)

    def run(numba_version=None):
        for name in [m for m in sys.modules if m == "broken" or m.startswith("broken.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mod = importlib.import_module("broken._kern")
                if numba_version is not None:  # what the cache file of a process of another Numba version is
                    mod.get._cache._cache_file._version = numba_version
                value = int(mod.get())
            except Exception as e:
                return f"{type(e).__name__}: {e}"
        stats = mod.get.stats
        return [value, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), [str(w.message) for w in caught]]

    def files():
        (index,) = glob.glob(f"{cache}/*/_kern.get-*.nbi")
        (data,) = glob.glob(f"{cache}/*/_kern.get-*.1.nbc")
        return index, data

    def keep(tag):
        for path in files():
            shutil.copyfile(path, f"{root}/{tag}{os.path.splitext(path)[1]}")

    def restore(tag):
        for path in files():
            if os.path.isdir(path):
                os.rmdir(path)
            shutil.copyfile(f"{root}/{tag}{os.path.splitext(path)[1]}", path)

    def write_const(value):
        with open(f"{root}/broken/_const.py", "w") as f:
            f.write(f"VALUE = {value}\n")

    def truncate(path, size):
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:size])

    def zeros(path):
        with open(path, "rb") as f:
            data = bytearray(f.read())
        n = len(data) // 3
        data[n:n + 512] = bytes(512)
        with open(path, "wb") as f:
            f.write(data)

    def as_folder(path):
        os.remove(path)
        os.mkdir(path)

    def another_numba():
        # A process of another Numba version (content-hash stamps since 0.68: the same stamp) shares the folder:
        # it refuses this index, compiles, writes its data file, then its index; this process read its own
        # index before that (or the other process stopped between its two writes): the index names its file.
        run(numba_version="0.0.other")
        shutil.copyfile(f"{root}/new.nbi", index)

    out = {}
    run(); keep("old")  # VALUE = 1
    write_const(2)
    run(); keep("new")  # VALUE = 2: what every case below must return
    index, data = files()
    cases = {
        "truncated index": lambda: truncate(index, 20),
        "empty index": lambda: truncate(index, 0),
        "garbage index": lambda: open(index, "wb").write(os.urandom(300)),
        "truncated data": lambda: truncate(data, 200),
        "empty data": lambda: truncate(data, 0),
        "garbage data": lambda: open(data, "wb").write(os.urandom(3000)),
        "a folder as data": lambda: as_folder(data),
        "the old files' data under the new index": lambda: shutil.copyfile(f"{root}/old.nbc", data),
        "another Numba's data under this Numba's index": another_numba,
        "zeros inside the data": lambda: zeros(data),  # last: a segmentation fault on Numba's cache
    }
    for name, corrupt in cases.items():
        restore("new")
        corrupt()
        out[name] = [run(), run()]
        print(json.dumps(out), flush=True)
    # A write that fails after the files changed (a full disk; here a file size limit): the old index and data
    # stay, and must not be taken for the new files' code.
    restore("old")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails (EFBIG) instead of killing the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(index) + 200, hard))
    failed = run()
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["a failed write"] = [failed, run()]
    print(json.dumps(out), flush=True)
    # Another signature's data under this signature's name (two processes saving different signatures at once).
    mod = sys.modules["broken._kern"]
    mod.twice(1), mod.twice(0.5)  # int64 -> .1.nbc, float64 -> .2.nbc
    (int_data,) = glob.glob(f"{cache}/*/_kern.twice-*.1.nbc")
    shutil.copyfile(int_data.replace(".1.nbc", ".2.nbc"), int_data)
    run()
    mod = sys.modules["broken._kern"]
    value = mod.twice(3)
    stats = mod.twice.stats
    out["another signature's data"] = [repr(value), sum(stats.cache_hits.values()), sum(stats.cache_misses.values())]
    print(json.dumps(out), flush=True)
    """
)


@pytest.fixture(scope="module")
def broken_cache_runs(tmp_path_factory):
    """One subprocess: each way a cache file can be broken, then the same import again (see BROKEN)."""
    import json

    root = tmp_path_factory.mktemp("broken")
    _tiny_package(root, "broken")
    cache = root / "numba-cache"
    cache.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", BROKEN, str(root), str(cache)], capture_output=True, text=True, env=_env(NUMBA_CACHE_DIR=str(cache)),
        timeout=120,
    )
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}, done


@pytest.mark.parametrize(
    "case",
    ["truncated index", "empty index", "garbage index", "truncated data", "empty data", "garbage data",
     "the old files' data under the new index", "another Numba's data under this Numba's index", "zeros inside the data"],
)
def test_a_broken_cache_file_is_a_miss_that_is_compiled_and_overwritten(broken_cache_runs, case):
    """Truncated, empty or random bytes, zeros inside, or another version's (files, Numba) data under the index: the new value.

    Numba raised from ``_load_index``/``_load_data`` (UnpicklingError, EOFError, ValueError) in every later run
    until the file was deleted by hand, loaded the old files' code, or ran zeroed machine code (a segfault).
    """
    out, done = broken_cache_runs
    assert case in out, f"the subprocess ended before this case (exit {done.returncode}): {done.stderr[-2000:]}"
    broken, again = out[case]
    assert broken == [2, 0, 1, []], f"{case}: {broken}"  # a miss, compiled, without a word
    assert again == [2, 1, 0, []], f"{case}: not overwritten: {again}"


def test_a_cache_file_that_cannot_be_written_warns_once_and_runs(broken_cache_runs):
    """A folder where the data file should be: every run compiles in memory, with one warning naming the path."""
    out, done = broken_cache_runs
    assert "a folder as data" in out, done.stderr[-2000:]
    for value, hits, misses, caught in out["a folder as data"]:
        assert [value, hits, misses] == [2, 0, 1]
        (warning,) = caught
        assert "could not be written" in warning and ".nbc" in warning and "NUMBA_CACHE_DIR" in warning, warning


def test_the_data_of_another_signature_is_never_loaded(broken_cache_runs):
    """``twice(3)``'s data file holding the float64 signature's code: a miss, and the integer 6 (not 6.0)."""
    out, done = broken_cache_runs
    assert "another signature's data" in out, done.stderr[-2000:]
    assert out["another signature's data"] == ["6", 0, 1]


def test_a_failed_write_never_leaves_the_old_code_for_the_next_process(broken_cache_runs):
    """The files changed and the cache write fails (a full disk): the next process must not load the old code.

    Numba wrote the new index first: it named the old data file when the data write failed, and every later
    process loaded the old value (1 where the file says 2), a cache hit.
    """
    out, done = broken_cache_runs
    assert "a failed write" in out, done.stderr[-2000:]
    failed, later = out["a failed write"]
    assert failed[:3] == [2, 0, 1] and len(failed[3]) == 1 and "could not be written" in failed[3][0], failed
    assert later == [2, 0, 1, []], f"the old code was loaded after a failed write: {later}"


REAL = textwrap.dedent(
    r"""
    import json, warnings
    import numpy as np
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from numba.core.dispatcher import Dispatcher
        from memoa_fast import kernels
        import memoa_fast.kernels._noise as noise
        caches = sorted({type(d._cache).__name__ for d in vars(noise).values() if isinstance(d, Dispatcher)})
        mixed = int(noise._mix64(np.uint64(123456789)))
    print(json.dumps([caches, mixed, bool(kernels.CACHE), [f"{w.category.__name__}: {w.message}" for w in caught]]))
    """
)


def _mix64(z):
    """SplitMix64's finaliser in Python integers (the specification of kernels._noise._mix64)."""
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_the_real_kernels_import_and_run_read_only_with_no_cache_folder(tmp_path):
    """A read-only install whose user has no writable cache folder: the kernel modules import and run, one warning.

    The reported failure: ``memoa run`` died with ``RuntimeError: cannot cache function '_forecast_chunk': no locator
    available``. kernels/ is made read-only by a bind mount in a private mount namespace (``unshare``; as root a
    chmod does not stop writes); without it, where Numba has ``NUMBA_CACHE_LOCATOR_CLASSES``, its in-tree locator
    is left out instead. ``NUMBA_CACHE_DIR`` and the user-wide folder are unusable (regular files in the way).
    """
    import json
    import shutil

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    env = _env(NUMBA_CACHE_DIR=str(blocker), XDG_CACHE_HOME=str(blocker / "cache"), HOME=str(blocker), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-c", REAL]
    unshare = shutil.which("unshare")
    mounted = f"mount --bind {KERNELS} {KERNELS} && mount -o remount,bind,ro {KERNELS}"
    if unshare and subprocess.run([unshare, "-rm", "sh", "-c", mounted], capture_output=True).returncode == 0:
        command = [unshare, "-rm", "sh", "-c", mounted + ' && exec "$0" "$@"', *command]
    else:
        import numba.core.config

        if not hasattr(numba.core.config, "CACHE_LOCATOR_CLASSES"):
            pytest.skip("no way to make kernels/__pycache__ unusable here: unshare -rm is not permitted and this Numba "
                        "has no NUMBA_CACHE_LOCATOR_CLASSES")
        env["NUMBA_CACHE_LOCATOR_CLASSES"] = "UserProvidedCacheLocator,UserWideCacheLocator"
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    caches, mixed, cache_flag, caught = json.loads(done.stdout.strip().splitlines()[-1])
    assert caches == ["NullCache"] and cache_flag is False
    assert mixed == _mix64(123456789)
    (warning,) = caught
    assert "Numba cannot keep its on-disk cache" in warning and "NUMBA_CACHE_DIR" in warning, warning
