"""The README's Python examples run as written (with their free names bound)."""
import re
from pathlib import Path

import numpy as np
import pytest

import memoa_fast as mf

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_examples():
    assert len(python_blocks()) >= 3


def test_trust_example_runs():
    block = next(b for b in python_blocks() if "shares=" in b)
    namespace = {}
    exec(block, namespace)
    assert namespace["pop"].n_classes == 3 and namespace["game"].classes.spectral_radius < 1


def test_api_example_runs():
    # The example's code as written, on 20 000 agents instead of 10^6 (still past the parallel threshold, so the same
    # parallel kernels): at 10^6 it took 9 s of the suite, most of it NumPy's normal draws.
    block = python_blocks()[0]
    assert block.count("1_000_000") == 3, "the README example's size changed: update this test"
    namespace = {}
    exec(block.replace("1_000_000", "20_000"), namespace)
    pop = namespace["pop"]
    assert pop.t == 100 and np.isfinite(pop.costs).all()
    assert namespace["server"].weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_certificates_example_runs(rng):
    block = next(b for b in python_blocks() if "epsilon_nash" in b)
    namespace = {"game": mf.Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95), "s": rng.normal(size=(1000, 2)), "x0": rng.normal(size=(1000, 2))}
    exec(block, namespace)
    assert 0 < namespace["cert"].max_relative < 1e-4
    assert namespace["eq"].own_gain.shape == (20,)


def test_checkpoint_example_runs_without_a_cluster(tmp_path, monkeypatch, rng):
    # The same lines with a single-process population: restore goes to any engine.
    block = next(b for b in python_blocks() if "save_checkpoint" in b)
    block = "\n".join(line for line in block.splitlines() if "Client" not in line and "Dask" not in line)
    monkeypatch.chdir(tmp_path)
    game = mf.Game()
    pop, server = mf.Population(game, 100, 1), mf.Server(100, 1)
    pop.step(rng.normal(size=(100, 1)))
    before = pop.states.copy()
    exec(block, {"mf": mf, "game": game, "pop": pop, "server": server})
    np.testing.assert_array_equal(pop.states, before)
    assert (tmp_path / "run.npz").is_file()


def package_modules():
    """Every module of the installed package but ``__main__`` (importing it runs the CLI)."""
    import pkgutil

    names = ["memoa_fast"] + [m.name for m in pkgutil.walk_packages(mf.__path__, "memoa_fast.")]
    return [name for name in names if not name.endswith("__main__")]


@pytest.mark.parametrize("name", package_modules())
def test_docstring_examples_run(name):
    """The ``>>>`` examples of every docstring give what they show.

    ``python -m pytest --doctest-modules`` found one that imported a module that does not exist.
    """
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"


# =========================================================================== what a reader copies
# Every command, option, path, name and default the two READMEs give is read from the READMEs themselves and
# checked against the code: the parsers (`memoa run`, the bench scripts' argparse calls), the repository's files,
# the package's names and signatures, the constants the prose quotes, and the result tables the prose restates.
ROOT = README.parent
BENCH_README = ROOT / "bench" / "README.md"
DOCS = (README, BENCH_README)
SHARED = ROOT.parent / "shared"


def _inline_spans(path):
    """Inline code spans (joined across line breaks), fenced blocks left out."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def _block_lines(path):
    """Lines of fenced blocks and of 4-space indented code, comments dropped."""
    text = path.read_text()
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    lines += [line[4:] for line in text.splitlines() if re.match(r"    (memoa |python)", line)]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines]


_COMMAND = re.compile(r"^([A-Z_]+=\S+ )*(memoa |python3? |\w+\.py --)")


def doc_commands():
    """``(doc, command, whole)``: every shell command the READMEs give; ``whole`` for a block (a command to run as is)
    rather than an inline span (which may name an option without its value).
    """
    out = []
    for doc in DOCS:
        for whole, texts in ((True, _block_lines(doc)), (False, _inline_spans(doc))):
            for text in texts:
                for part in text.split("&&"):
                    part = part.strip()
                    if _COMMAND.match(part):
                        out.append((doc.name if doc == README else "bench/README.md", part, whole))
    return out


def _words(command):
    import shlex

    words = shlex.split(command)
    while words and re.match(r"[A-Z_]+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words


def _run_parser():
    from memoa_fast.timeseries import cli

    return cli.build_parser().run_parser


def _script_options(path):
    """``{option: choices or None}`` of every ``add_argument``/``addoption`` call in a script (read, not run)."""
    import ast

    options = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("add_argument", "addoption"):
            choices = next((kw.value for kw in node.keywords if kw.arg == "choices"), None)
            try:
                choices = None if choices is None else ast.literal_eval(choices)
            except ValueError:
                choices = None
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    options[arg.value] = choices
    return options


def _check_options(words, options, where):
    """Every ``--option`` in ``words`` is one of ``options``; a value given to an option with choices is one of them."""
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, _, value = word.partition("=")
        assert name in options, f"{where}: {name} is not an option (known: {sorted(options)})"
        if not value and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value = words[i + 1]
        if options[name] is not None and value:
            assert value in options[name], f"{where}: {name} {value} is not one of {options[name]}"


def _bench_script(words):
    """The bench script a command runs, its arguments, and whether it runs with ``-P``; None if it runs none."""
    flags = []
    while words and words[0] in ("python", "python3", "-P", "-X", "importtime"):
        flags.append(words.pop(0))
    if words and re.fullmatch(r"(bench/)?\w+\.py", words[0]):
        name = words[0] if words[0].startswith("bench/") else f"bench/{words[0]}"
        return ROOT / name, words[1:], "-P" in flags
    return None


def _paths_in(words):
    """Arguments that name a repository file (inputs only: an output's folder must exist)."""
    outputs = {"--out", "--json", "--plot", "--bench-summary"}
    for i, word in enumerate(words):
        if word.startswith("-") or "/" not in word and not re.search(r"\.(py|json|md|csv|txt)$", word):
            continue
        if word.startswith("path/to/") or word.startswith("../shared/") and not SHARED.is_dir():
            continue
        yield word, i > 0 and words[i - 1] in outputs


def test_the_readmes_give_the_commands_checked_here():
    commands = doc_commands()
    assert sum(c.startswith("memoa run") for _, c, whole in commands if whole) >= 6
    assert sum(bool(_bench_script(_words(c))) for _, c, _ in commands) >= 10


@pytest.mark.parametrize("doc, command, whole", [c for c in doc_commands() if c[1].startswith("memoa")],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_memoa_run_command_parses_and_passes_the_up_front_checks(doc, command, whole, monkeypatch):
    """Block commands parse and pass ``memoa run``'s up-front checks (the stream is loaded, nothing runs); an inline
    span's options exist (it may name an option without its value, such as `memoa run --seed`).
    """
    from memoa_fast.timeseries import cli

    words = _words(command)
    assert words[:2] == ["memoa", "run"], f"{doc}: {command!r}: `memoa` has one command, run"
    run = _run_parser()
    if not whole:
        _check_options(words[2:], {o: a.choices for o, a in run._option_string_actions.items()}, f"{doc}: {command!r}")
        return
    args = cli.build_parser().parse_args(words[1:])
    if any(w.startswith("path/to/") or w.startswith("../shared/") and not SHARED.is_dir() for w in words):
        return  # a placeholder for the reader's own copy: parsed only
    monkeypatch.chdir(ROOT)  # the README's relative paths (../shared/datasets) are from the checkout
    cli._resolve(run, args)


@pytest.mark.parametrize("doc, command, whole", [c for c in doc_commands() if _bench_script(_words(c[1]))],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_bench_script_command_names_a_script_its_options_and_its_files(doc, command, whole):
    script, args, isolated = _bench_script(_words(command))
    assert script.is_file(), f"{doc}: {command!r}: no {script.relative_to(ROOT)}"
    _check_options(args, _script_options(script), f"{doc}: {command!r}")
    for path, output in _paths_in(args):
        target = ROOT / path
        assert (target.parent if output else target).exists(), f"{doc}: {command!r}: no {path}"
    if isolated:  # `python -P`: the script's folder is not on sys.path, so a sibling import needs the script's own insert
        import ast

        tree = ast.parse(script.read_text())
        siblings = {p.stem for p in script.parent.glob("*.py")}
        inserted = False
        for node in tree.body:
            inserted = inserted or "sys.path.insert" in ast.unparse(node)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(
                node, ast.ImportFrom) else []
            assert inserted or not siblings & {n.split(".")[0] for n in names}, \
                f"{doc}: {command!r}: with -P, {script.name} cannot import {names} (bench/ is not on sys.path)"


def _pytest_options():
    options = set()
    for conftest in (ROOT / "tests" / "conftest.py", ROOT / "bench" / "conftest.py"):
        options |= set(_script_options(conftest))
    return options | {"--hypothesis-profile"}  # hypothesis' own pytest plugin


def _markers():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    names = {m.split(":")[0] for m in config["markers"]}
    return names | set(re.findall(r"addinivalue_line\(\s*\"markers\",\s*\"(\w+)", (ROOT / "bench" / "conftest.py").read_text()))


@pytest.mark.parametrize("doc, command, whole", [c for c in doc_commands() if re.search(r"-m (pytest|pip)\b", c[1])],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_pytest_and_pip_command_names_files_options_markers_and_extras_that_exist(doc, command, whole):
    import tomllib

    words = _words(command)
    where = f"{doc}: {command!r}"
    if "pip" in words:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for word in words:
            for group in re.findall(r"\[([\w,]+)\]", word):
                assert set(group.split(",")) <= extras, f"{where}: extras {group} (known: {sorted(extras)})"
        return
    args = words[words.index("pytest") + 1:]
    tests = ""
    for i, word in enumerate(args):
        if word.startswith("--"):
            assert word.split("=")[0] in _pytest_options(), f"{where}: {word} is not a pytest option here"
        elif word == "-m":
            assert set(re.findall(r"\w+", args[i + 1])) - {"not", "and", "or"} <= _markers(), f"{where}: marker {args[i + 1]}"
        elif re.search(r"\.py$|^tests/|^bench/", word) and not args[i - 1].startswith("--"):
            assert (ROOT / word).exists(), f"{where}: no {word}"
            tests += (ROOT / word).read_text()
    if "-k" in args:
        for name in set(re.findall(r"\w+", args[args.index("-k") + 1])) - {"not", "and", "or"}:
            assert re.search(rf"def test_\w*{name}", tests), f"{where}: -k {name} selects no test"
    profile = next((w.split("=")[1] for w in args if w.startswith("--hypothesis-profile=")), None)
    if profile:
        assert f'register_profile("{profile}"' in (ROOT / "tests" / "conftest.py").read_text(), f"{where}: profile {profile}"


def test_every_option_named_alone_is_an_option_of_memoa_run_or_a_bench_script():
    options = set(_run_parser()._option_string_actions)
    for script in (ROOT / "bench").glob("*.py"):
        options |= set(_script_options(script))
    for doc in DOCS:
        for span in _inline_spans(doc):
            if span.startswith("--"):
                for word in _words(span):
                    if word.startswith("--"):
                        assert word.split("=")[0] in options, f"{doc.name}: `{span}`: {word} is no option of memoa run or bench/"


def _architecture():
    """``(path, description)`` of each file the README's architecture block names (a folder carries to the next lines)."""
    block = re.search(r"```text\n(.*?)```", README.read_text(), flags=re.S).group(1)
    folder, out = "", []
    for line in block.splitlines():
        tokens = list(re.finditer(r"[\w/*]+\.pyx?\b|(?:memoa_fast|kernels)(?:/\w+)*/", line))
        for i, token in enumerate(tokens):
            word = token.group()
            if word.endswith("/"):
                folder = word
                continue
            if "/" in word:
                folder = word.rsplit("/", 1)[0] + "/"
                path = word
            else:
                path = folder + word
            end = tokens[i + 1].start() if i + 1 < len(tokens) else len(line)
            out.append((path, line[token.end():end].strip(" ,;")))
    return out


def _named_paths(path):
    """Repository paths a README names in code spans (and, for the README, in its architecture block)."""
    names = [s for s in _inline_spans(path) if re.fullmatch(r"[\w./*-]+", s) and re.search(r"(/|\.(py|txt|json|md|toml|pyx|png|csv))$", s)]
    return names + ([p for p, _ in _architecture()] if path == README else [])


def _exists(name, doc):
    if name.startswith(("/", ".")) or name == "MODEL.md" or name.startswith(("run.npz", "ETT-small")):  # devices; the shared spec; examples
        return True
    if name.endswith(".csv"):  # a dataset: in ../shared/datasets where that is present (the package never needs it)
        return not SHARED.is_dir() or any(True for _ in (SHARED / "datasets").glob(f"**/{name}"))
    if "/" not in name.rstrip("/"):  # a bare file name: somewhere in the repository
        return any(True for _ in ROOT.glob(f"**/{name}") if ".git" not in _.parts)
    return any(True for _ in ROOT.glob(name.rstrip("/")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_every_repository_path_the_readmes_name_exists(doc):
    names = _named_paths(doc)
    assert len(names) >= 10
    missing = sorted({n for n in names if not _exists(n, doc)})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_the_architecture_block_names_what_its_modules_define():
    """``forecasters.py ClientForecasters (NLMS per client), SquaredErrors, ...``: each name is in that module."""
    import importlib

    checked = 0
    for path, description in _architecture():
        if not path.startswith("memoa_fast/") or not path.endswith(".py"):
            continue
        module = importlib.import_module(path[:-3].replace("/", "."))
        for part in description.split(":")[0].split(","):
            name = (part.split() or [""])[0]
            if re.fullmatch(r"[A-Z][A-Za-z]+|[a-z]+_[a-z_]+", name):
                assert hasattr(module, name), f"{module.__name__} has no {name}"
                checked += 1
    assert checked >= 15


def test_every_memoa_fast_name_the_readmes_use_exists():
    import importlib

    checked = 0
    for doc in DOCS:
        text = doc.read_text()
        for dotted in set(re.findall(r"\b(?:memoa_fast|mf)(?:\.\w+)+", text)):
            parts = dotted.replace("mf.", "memoa_fast.", 1).split(".")
            obj, i = importlib.import_module(parts[0]), 1
            while i < len(parts):
                try:
                    obj = importlib.import_module(".".join(parts[:i + 1]))
                except ModuleNotFoundError:
                    assert hasattr(obj, parts[i]), f"{doc.name}: {dotted}: no {parts[i]}"
                    obj = getattr(obj, parts[i])
                i += 1
            checked += 1
    assert checked >= 10


def _callables():
    import memoa_fast as mf
    from memoa_fast import certificates, checkpoint, distributed, game
    from memoa_fast.timeseries import experiment, forecasters, pipeline, streams, trust

    out = {}
    for module in (streams, forecasters, trust, pipeline, experiment, checkpoint, game, certificates, distributed, mf):
        out.update({k: v for k, v in vars(module).items() if callable(v) and not k.startswith("_")})
    for cls in (mf.Population, mf.Server, mf.Pipeline):
        out.update({k: v for k, v in vars(cls).items() if callable(v) and not k.startswith("_") and k not in out})
    return out


def test_every_call_the_readmes_write_uses_parameters_the_callable_has():
    """``Population(game, n_agents, dim, labels=..., backend=...)``, ``load_checkpoint(path, n_agents=, dim=)``:
    each keyword and each positional name (where the README writes names) is a parameter of that callable.
    """
    import inspect

    known, checked = _callables(), 0
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for name, args in re.findall(r"`(?:\w+\.)*(\w+)\(([^`()]*)\)`", text):
            if name not in known:
                continue
            params = inspect.signature(known[name]).parameters
            if any(p.kind == p.VAR_KEYWORD for p in params.values()):
                continue
            for arg in (a.strip() for a in " ".join(args.split()).split(",")):
                word = re.match(r"(\w+)\s*=", arg)  # a keyword (positional names in prose are descriptive)
                if word:
                    assert word.group(1) in params, f"{doc.name}: `{name}({args})`: {name} has no parameter {word.group(1)}"
                    checked += 1
    assert checked >= 10


def test_every_memoa_environment_variable_the_readmes_name_is_read_by_the_code():
    sources = "".join(p.read_text() for p in [*ROOT.glob("memoa_fast/**/*.py"), *ROOT.glob("kernels/*.py"), ROOT / "setup.py",
                                              ROOT / "tests" / "conftest.py"])
    names = {n for doc in DOCS for n in re.findall(r"\bMEMOA_[A-Z_]+\b", doc.read_text())}
    assert names
    for name in names:
        assert f'"{name}"' in sources, f"{name} is read nowhere"


# --------------------------------------------------------------------------- defaults and constants the prose quotes
def _find(pattern, doc=README):
    text = " ".join(doc.read_text().split())
    found = re.search(pattern, text)
    assert found, f"{doc.name} no longer says {pattern!r}: update this test with the text"
    return found


def test_the_defaults_the_readme_quotes_are_the_codes():
    import inspect

    from memoa_fast import Population, _backends
    from memoa_fast._validation import TARGET_LIMIT
    from memoa_fast.certificates import NASH_MAX_AGENTS
    from memoa_fast.kernels import CHUNK, SIGNAL_LIMIT, _config
    from memoa_fast.timeseries import cli
    from memoa_fast.timeseries.trust import TrustPopulation

    D = cli.DEFAULTS
    quoted = _find(r"with `memoa run`'s defaults \(([^)]*)\)").group(1)
    pairs = dict(re.findall(r"(\w+) = ([\d.]+)", quoted))
    assert {k: float(v) for k, v in pairs.items()} == {k: float(D[k]) for k in pairs} and len(pairs) == 6
    low, high, lags, bound = _find(r"noise ([\d.]+)\.\.([\d.]+), lags (\d+), outlier bound ([\d.]+)\)").groups()
    assert (float(low), float(high), int(lags), float(bound)) == (*D["noise"], D["lags"], D["outlier_bound"])
    clients, rounds = _find(r"# built-in default: logistic map, (\d+) clients, (\d+) rounds").groups()
    assert (int(clients), int(rounds), D["stream"]) == (D["clients"], D["rounds"], "logistic")
    assert int(_find(r"a logistic-map stream forecast by (\d+) clients").group(1)) == D["clients"]
    assert float(_find(r"The default kappa of `memoa run` is now (\d+)").group(1)) == D["kappa"]

    trust = inspect.signature(TrustPopulation).parameters
    assert int(_find(r"\(`--reclass`, default (\d+)\)").group(1)) == D["reclass"] == trust["reclass"].default
    assert int(_find(r"\(`--classes`, default (\d+),").group(1)) == trust["n_classes"].default
    assert float(_find(r"squared error `v_i` of its forecast \(half-life (\d+) rounds\)").group(1)) == trust["half_life"].default
    assert float(_find(r"exponentially weighted, half-life (\d+) rounds").group(1)) == trust["cost_half_life"].default
    powers = _find(r"one K-class population runs per beta in ([\d., ]+?) \(").group(1)
    assert tuple(float(p) for p in powers.split(",")) == tuple(trust["powers"].default)
    assert float(_find(r"\*\*beta = ([\d.]+)\*\*").group(1)) == trust["power"].default
    assert _find(r"\(`--trust-rule minimax`, the default\)") and D["trust_rule"] == trust["rule"].default == "minimax"

    threshold = int(_find(r"`threads=k` uses k threads for at least `parallel_threshold` \((\d+)\)").group(1))
    assert threshold == inspect.signature(Population).parameters["parallel_threshold"].default == _backends.PARALLEL_THRESHOLD
    assert 2 ** int(_find(r"only for steps of at least 2\^(\d+) values").group(1)) == _backends.DEFAULT_PARALLEL_WORK
    assert 2 ** int(_find(r"goes parallel by default from 2\^(\d+) values").group(1)) == _backends.PIPELINE_PARALLEL_WORK
    assert int(_find(r"\(`GOMP_SPINCOUNT=(\d+)`").group(1)) == _config.SPIN_COUNT
    assert float(_find(r"`SIGNAL_LIMIT = ([\de.]+)`").group(1)) == SIGNAL_LIMIT
    assert float(_find(r"`\|y\| <= ([\de.]+)` \(`TARGET_LIMIT`\)").group(1)) == TARGET_LIMIT
    for found in re.findall(r"fixed chunks of (\d+) agents", README.read_text()):
        assert int(found) == CHUNK
    assert int(_find(r"exact feedback Nash, N <= (\d+)").group(1)) == NASH_MAX_AGENTS


def test_the_constants_bench_readme_quotes_are_the_codes():
    import ast
    import sys

    from memoa_fast import _backends
    from memoa_fast.kernels import CHUNK

    assert int(_find(r"`PARALLEL_THRESHOLD` \(`memoa_fast/_backends.py`\) is now \*\*(\d+)\*\*", BENCH_README).group(1)) == \
        _backends.PARALLEL_THRESHOLD
    assert int(_find(r"walks a chunk of `CHUNK = (\d+)` agents", BENCH_README).group(1)) == CHUNK
    numba_src = (ROOT / "kernels" / "_numba.py").read_text()
    lanes = int(_find(r"blocks of `R = max\(1, (\d+) // d\)` whole rows", BENCH_README).group(1))
    assert re.search(rf"^LANES = {lanes}$", numba_src, re.M)
    max_lanes = int(_find(r"tracks the worst client in (\d+) \(max, first index\) lanes", BENCH_README).group(1))
    assert re.search(rf"^MAX_LANES = {max_lanes}$", numba_src, re.M)
    # tests/test_allocation.py "asserts net < 16 KiB over 100 steps ... and a peak below a tenth of one (N, d) array"
    consts = {t.id: eval(compile(ast.Expression(node.value), "test_allocation.py", "eval"))
              for node in ast.parse((ROOT / "tests" / "test_allocation.py").read_text()).body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("NET_LIMIT", "PEAK_LIMIT")}
    net, steps = _find(r"asserts net < (\d+) KiB over (\d+) steps", BENCH_README).groups()
    source = (ROOT / "tests" / "test_allocation.py").read_text()
    n, d, s = re.search(r"^N, D, STEPS = ([\d_]+), (\d+), (\d+)", source, re.M).groups()
    assert int(net) * 1024 == consts["NET_LIMIT"] and int(steps) == int(s)
    assert _find(r"a peak below a tenth of one \(N, d\) array", BENCH_README) and consts["PEAK_LIMIT"] * 10 == pytest.approx(int(n) * int(d) * 8, rel=0.05)

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import guard
    finally:
        sys.path.remove(str(ROOT / "bench"))
    margin = float(_find(r"\(`--update-floors --repeat k --margin ([\d.]+)`\)", BENCH_README).group(1))
    assert margin == guard.MARGIN and _find(r"Floors are half the median speedup", BENCH_README) and guard.MARGIN == 2
    assert _find(r"measured up to twice more \(the second time in a fresh process\)", BENCH_README) and guard.RETRIES == 2
    assert _find(r"each floor is the median of three runs divided by 2") and (guard.REPEAT, guard.MARGIN) == (3, 2)
    assert _find(r"re-measured twice \(once in a fresh process\)") and guard.RETRIES == 2
    assert float(_find(r"against `threads=1`, alone and with two processes at once \(limit ([\d.]+)x\)").group(1)) == guard.THREADS_LIMIT
    # the short guard's cases: every (kernel, d, backend) of guard.cases(short=True) it can time (the fused Pipeline is Numba's)
    timed = [c for c in guard.cases(short=True) if not (c[0] == "pipeline_run" and c[3] != "numba")]
    assert int(_find(r"one thread, Numba and Cython, (\d+) cases", BENCH_README).group(1)) == len(timed)
    exempt = _find(r"no floor is below 1\.0 except `(\w+)`").group(1)
    assert set(guard.MAY_TRAIL_NUMPY) == {exempt}


def test_every_stored_floor_names_a_case_the_guard_times(tmp_path):
    """``bench/floors.json`` holds a floor only for cases ``guard.py`` times; rewriting the floors drops any other.

    It once kept 12 floors of kernels long gone.
    """
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import guard
    finally:
        sys.path.remove(str(ROOT / "bench"))
    timed = {guard.key(*c[:4], c[5]) for c in guard.cases(short=False) if guard.timed_case(guard.key(*c[:4], c[5]))}
    assert {"fused_step/numba-1/N1e+05/d4", "pipeline_run/numba-1/N1e+05/d1"} <= timed
    assert not any(guard.timed_case(k) for k in ("pipeline_run/cython-1/N1e+05/d1", "mean_field/numba-1/N1e+05/d1"))
    stored = guard.read_floors(ROOT / "bench" / "floors.json")
    assert set(stored) <= timed, sorted(set(stored) - timed)
    guard.write_floors(tmp_path / "floors.json", {**stored, "policy_update/numba-1/N1e+05/d1": {"floor": 1.0}}, guard.MARGIN)
    assert guard.read_floors(tmp_path / "floors.json") == stored


# --------------------------------------------------------------------------- the results the prose restates
def _results_sections(text):
    """``{series: (values, command, table)}`` of ``### name (N values)`` / ``#### ...`` sections."""
    found = re.finditer(r"^#{3,4} (.+?) \((\d+) values\)\n\n    (.*)\n\n((?:\|.*\n)+)", text, flags=re.M)
    return {m.group(1): (int(m.group(2)), m.group(3), m.group(4)) for m in found}


def _table(markdown):
    rows = [[c.strip().strip("*") for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()]
    return {row[0]: {h: float(v) for h, v in zip(rows[0][1:], row[1:])} for row in rows[2:]}


RESULTS = ROOT / "bench" / "results.md"


def test_the_readme_result_tables_are_those_of_bench_results():
    """The README's tables are sections of ``bench/results.md`` (``results_tables.py``'s output), whole."""
    mine, made = _results_sections(README.read_text()), _results_sections(RESULTS.read_text())
    assert len(mine) == 6 and len(made) == 22
    for name, section in mine.items():
        assert section == made[name], f"README's {name} table differs from bench/results.md"


def test_the_summary_table_and_its_prose_restate_bench_results():
    """Each row of the 22-series summary (memoa-trust's worst / average / hedge, the best other policy on each, the
    ✗ marks, trust worst / MEMOA worst) is what ``bench/results.md`` gives, and so are the counts and median the
    prose quotes from it.
    """
    import statistics

    made = {name: _table(table) for name, (_, _, table) in _results_sections(RESULTS.read_text()).items()}
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) / ([\d.]+) / ([\d.]+) \| (.+) \| ([\d.]+) \|$", README.read_text(), flags=re.M)
    assert {r[0] for r in rows} == set(made)
    columns = ("worst client", "average client", "mixture hedge")
    ratios = {}
    for name, w, a, h, best, ratio in rows:
        table = made[name]
        trust = table["memoa-trust"]
        for column, value in zip(columns, (w, a, h)):
            assert abs(float(value) - trust[column]) <= 5.1e-4, f"{name}: memoa-trust {column} {value} vs {trust[column]}"
        for column, cell in zip(columns, best.split(" / ")):
            value, policy, worse = re.fullmatch(r"([\d.]+) \(([\w-]+)\)( ✗)?", cell.strip()).groups()
            others = {p: v[column] for p, v in table.items() if p != "memoa-trust"}
            top = min(others, key=others.get)
            assert policy == top and abs(float(value) - others[top]) <= 5.1e-4, f"{name}: best {column} {cell} vs {top} {others[top]}"
            assert bool(worse) == (trust[column] > 1.1 * others[top]), f"{name}: the ✗ of {column}"
        ratios[name] = trust["worst client"] / table["memoa"]["worst client"]
        assert abs(float(ratio) - ratios[name]) <= 6e-3, f"{name}: trust worst / MEMOA worst {ratio} vs {ratios[name]:.4f}"
    at_most, of, median = _find(r"at most 0\.75x MEMOA's on (\d+) of (\d+) series \(median ([\d.]+)\)").groups()
    assert int(at_most) == sum(r <= 0.75 for r in ratios.values()) and int(of) == len(ratios)
    assert abs(float(median) - statistics.median(ratios.values())) <= 5e-3
    prose = " ".join(README.read_text().split())
    named = re.search(r"but not on (\w+) \(([\d.]+)\) and the (\w+) series \(([\d.]+)\)", prose).groups()
    for name, quoted in (named[:2], named[2:]):
        assert abs(float(quoted) - ratios[name]) <= 5e-3, f"{name}: {quoted} vs {ratios[name]:.4f}"


def _series_quoted(text):
    """``{series: number}`` of a list such as "CAD (0.84), FRED Canada (0.82) and the airline series (0.95)", named as
    ``bench/results.md`` names them ("CAD" is exchange/CAD, "FRED Canada" FRED/Canada).
    """
    out = {}
    for name, value in re.findall(r"([\w ]+?) \(([\d.]+)\)", text):
        name = re.sub(r"^(?:and |nor on |the )+", "", name.strip()).removesuffix(" series")
        out[name.replace("FRED ", "FRED/") if name.startswith("FRED ") else f"exchange/{name}" if name.isupper() else name] = float(value)
    return out


def test_the_prose_names_each_series_beyond_075x_and_its_floor_as_bench_gives_them():
    """The series where memoa-trust's worst client is more than 0.75x MEMOA's (``bench/results.md``) are those the
    prose names, each with its ratio; those ``bench/trust_bound.txt`` finds unreachable ("no") are those it says the
    floor is above 0.75x on, and the rest of them below, each with its floor / MEMOA. This prose went stale once:
    "periodic is the only one above 0.75x" outlived the run that said so.
    """
    made = {name: _table(table) for name, (_, _, table) in _results_sections(RESULTS.read_text()).items()}
    ratios = {n: t["memoa-trust"]["worst client"] / t["memoa"]["worst client"] for n, t in made.items()}
    named = _series_quoted(_find(r"but not on (.+?)\. Before the squares").group(1))
    assert set(named) == {n for n, r in ratios.items() if r > 0.75}, named
    for name, value in named.items():
        assert abs(value - ratios[name]) <= 5e-3, (name, value, ratios[name])
    rows = re.findall(r"^\| (.+?) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| (yes|no) \|$",
                      (ROOT / "bench" / "trust_bound.txt").read_text(), flags=re.M)
    floor = {name: (float(r), ok == "yes") for name, r, ok in rows}
    assert len(floor) == len(made)
    prose = _find(r"it is above 0\.75x MEMOA's worst client on (.+?), so no static setting .*?; on (.+?) it is below").groups()
    for text, reachable in zip(prose, (False, True)):
        said = _series_quoted(text)
        want = {n for n, (_, ok) in floor.items() if ok == reachable and (not reachable or n in named)}
        assert set(said) == want, (said, want)
        for name, value in said.items():
            assert abs(value - floor[name][0]) <= 5e-3, (name, value, floor[name])


def _study_outputs():
    """``(options, output file)`` of each ``bench/trust_study.py`` output the README cites."""
    prose = " ".join(README.read_text().split())
    cited = [(m.group(2), m.group(1)) for m in re.finditer(r"`(bench/trust_\w+\.txt)` is its output with `([^`]+)`", prose)]
    cited += [(m.group(1) or "", m.group(2)) for m in
              re.finditer(r"`python3 bench/trust_study\.py(?: ([^`]+))?`, output in `(bench/trust_\w+\.txt)`", prose)]
    return cited


@pytest.mark.parametrize("options, output", _study_outputs())
def test_each_cited_trust_study_output_is_what_its_cited_options_make(options, output, monkeypatch):
    """The file's variants are those the cited options make, over the 20 series the README's means are over."""
    import argparse
    import sys

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import trust_study

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", ["trust_study.py", *_words(options)])
    with pytest.raises(Parsed) as parsed:
        trust_study.main()
    a = parsed.value.args[0]
    made = trust_study.variants(a.kappa, 1.0, 0.1, 0.9, 10, a.classes, a.reclass, tuple(float(k) for k in a.trust_kappas.split(",")),
                                tuple({"on": True, "off": False}[f] for f in a.feedforward.split(",")),
                                tuple(float(p) for p in a.powers.split(",")), a.minimax)
    text = (ROOT / output).read_text()
    summary = text.split("mean over series", 1)[1].splitlines()[1:]
    assert [line.split(" worst ")[0].strip() for line in summary if " worst " in line] == list(made), output
    series = re.findall(r"^\S.* \((\d+) rows, [\d.]+ s\) best baseline", text, flags=re.M)
    assert len(series) == int(_find(r"on the mean over (\d+) series").group(1)), output


def test_every_trust_study_output_the_readme_names_is_cited_with_its_options():
    """Each file the README names that ``bench/trust_study.py`` wrote (per-series "best baseline" rows and a "mean over
    series" summary) is among :func:`_study_outputs`, so the test above checks it: a reworded citation ("is the
    output of it with ...") left that file without a case, and the READMEs' tests passed whatever options it named.
    """
    prose = " ".join(README.read_text().split())
    named = {name for name in re.findall(r"`(bench/\w+\.txt)`", prose) if (ROOT / name).is_file()
             and re.search(r"\) best baseline .*mean over series", (ROOT / name).read_text(), flags=re.S)}
    assert len(named) >= 2 and named == {output for _, output in _study_outputs()}, named


def test_the_outlier_bound_default_is_the_studys_best():
    """``OUTLIER_BOUND`` is the bound with the lowest mean of the three columns in ``bench/outlier_study.txt``, and that
    file is what ``outlier_study.py --summary`` prints from the saved JSON (the README quotes both).
    """
    import subprocess
    import sys

    from memoa_fast.timeseries.streams import OUTLIER_BOUND

    text = (ROOT / "bench" / "outlier_study.txt").read_text()
    means = {float(b): float(m) for b, m in re.findall(r"^  b=([\d.]+): .*; the three: ([\d.]+);", text, flags=re.M)}
    assert len(means) >= 5 and min(means, key=means.get) == OUTLIER_BOUND
    printed = subprocess.run([sys.executable, str(ROOT / "bench" / "outlier_study.py"), "--summary",
                              str(ROOT / "bench" / "outlier_study.json")], capture_output=True, text=True, check=True).stdout
    assert printed == text


def test_the_readmes_spike_table_is_what_run_experiment_gives():
    """Each row of the README's spike table (MEMOA's worst client on ``make_stream("logistic", 1001, seed=0)``, 30
    clients, value 600 raised by h): unheld, held at the default, held at 2 (to 3 significant digits), and the floor
    ``sqrt(0.437^2 + h^2 / 800)``; a "(not held)" cell is one where the default holds nothing.
    """
    import math

    from memoa_fast import run_experiment
    from memoa_fast.timeseries.streams import OUTLIER_BOUND, make_stream

    text = README.read_text()
    assert f"| h | unheld | held at {OUTLIER_BOUND:g} (default) | held at 2 | floor |" in text
    rows = re.findall(r"^  \| (\d+) sd \| ([\d.]+) \| ([\d.]+)( \(not held\))? \| ([\d.]+) \| ([\d.]+) \|$", text, flags=re.M)
    assert len(rows) >= 3, rows
    y = make_stream("logistic", 1001, seed=0)
    kw = dict(n_clients=30, policies=("memoa",), rules=("hedge",), threads=1)
    for h, unheld, held, not_held, held2, floor in rows:
        spiked = y.copy()
        spiked[600] += float(h)
        runs = {b: run_experiment(spiked, outlier_bound=b, **kw) for b in (None, OUTLIER_BOUND, 2.0)}
        worst = {b: f"{r.scores['memoa'].worst_client_rmse:.3g}" for b, r in runs.items()}
        assert (worst[None], worst[OUTLIER_BOUND], worst[2.0]) == (unheld, held, held2), (h, worst)
        assert (runs[OUTLIER_BOUND].outliers_held == 0) == bool(not_held), h
        assert f"{math.sqrt(0.437**2 + float(h) ** 2 / 800):.3g}" == floor


def test_the_readme_quotes_the_outlier_studys_means():
    """The README's mean ratios (worst / average / hedge, to 3 decimals) for bounds 2 to 64 and the default are
    ``bench/outlier_study.txt``'s, and its spike table's held column is headed by the default.
    """
    from memoa_fast.timeseries.streams import OUTLIER_BOUND

    text = (ROOT / "bench" / "outlier_study.txt").read_text()
    readme = " ".join(README.read_text().split())
    assert f"(`--outlier-bound SD`, default {OUTLIER_BOUND:g};" in readme and f"| held at {OUTLIER_BOUND:g} (default) |" in readme
    for bound in sorted({"2", "12", "16", "24", "32", "64", f"{OUTLIER_BOUND:g}"}, key=float):
        cols = re.search(rf"^  b={bound}: worst ([\d.]+) .*average ([\d.]+) .*hedge ([\d.]+) ", text, flags=re.M).groups()
        quoted = f"bound {bound} " + " / ".join(f"{float(c):.3f}" for c in cols)
        assert quoted in readme, quoted


def test_outlier_study_runs_of_other_bounds_merge_into_one_and_must_agree_where_they_overlap(monkeypatch):
    """``outlier_study.py --merge``: two saved runs (bounds 1, 2 and 2, 4) give one run with bounds 1, 2, 4 whose summary
    is each run's for its own bounds; a disagreement on a bound both ran, or on the unbounded run, is refused, named.
    """
    import copy
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("outlier_study_under_test", ROOT / "bench" / "outlier_study.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec.loader.exec_module(study)

    def scores(x):
        return {p: {"worst": x, "average": x + 1, "hedge": x + 2} for p in ("memoa", "greedy")}

    low = {"a": {"rows": 300, "held": {"1.0": 3, "2.0": 1}, "none": scores(1.0), "1.0": scores(0.5), "2.0": scores(2.0)},
           "b": {"rows": 200, "held": {"1.0": 0, "2.0": 0}}}
    high = {"a": {"rows": 300, "held": {"2.0": 1, "4.0": 0}, "none": scores(1.0), "2.0": scores(2.0)},
            "b": {"rows": 200, "held": {"2.0": 0, "4.0": 2}, "none": scores(3.0), "4.0": scores(6.0)}}
    merged = study.merge(low, high)
    assert list(merged) == ["a", "b"] and list(merged["a"]["held"]) == ["1.0", "2.0", "4.0"]
    assert merged["b"] == {"rows": 200, "held": {"1.0": 0, "2.0": 0, "4.0": 2}, "none": scores(3.0), "4.0": scores(6.0)}
    lines = study.summary(merged).splitlines()
    for run in (low, high):
        for line in study.summary(run).splitlines():
            if line.startswith("  b="):
                assert line in lines, line
    for where, change in ((("a", "2.0"), 1.5), (("a", "none"), 1.1)):
        other = copy.deepcopy(high)
        other[where[0]][where[1]]["memoa"]["worst"] = change
        with pytest.raises(ValueError, match=rf"^a: the runs disagree at bound {where[1]} \(scores\)"):
            study.merge(low, other)
    other = copy.deepcopy(high)
    other["a"]["held"]["2.0"] = 2
    with pytest.raises(ValueError, match=r"^a: the runs disagree at bound 2.0 \(values held\): 1 against 2"):
        study.merge(low, other)
    with pytest.raises(ValueError, match="the runs hold other series"):
        study.merge(low, {"b": high["b"], "a": high["a"]})
    # the bounds in increasing order whatever the order of the runs (the JSON too), and the row counts checked
    assert json.dumps(study.merge(high, low)) == json.dumps(merged)
    other = copy.deepcopy(high)
    other["b"]["rows"] = 201
    with pytest.raises(ValueError, match=r"^b: 201 rows in one run, 200 in another"):
        study.merge(low, other)


def test_a_stopped_outlier_study_resumes_where_it_stopped(tmp_path, monkeypatch):
    """``outlier_study.py --json`` saves each finished series to ``PATH.partial``: a run started again with the same
    bounds and clients measures only the series not saved there, and one with other settings is refused, naming both.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("outlier_study_under_test", ROOT / "bench" / "outlier_study.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec.loader.exec_module(study)
    series = {"a": np.arange(300.0), "b": np.sin(np.arange(300.0))}
    measured = []
    monkeypatch.setattr(study, "every_series", lambda: dict(series))
    monkeypatch.setattr(study, "held_feed", lambda y, burn_in, b: (measured.append(float(y[1, 0])), (y, 0))[1])
    partial = tmp_path / "study.json.partial"
    first = study.study([2.0], 10, partial)
    assert list(first) == ["a", "b"] and measured == [1.0, np.sin(1.0)]
    series["c"] = np.cos(np.arange(300.0))
    measured.clear()
    again = study.study([2.0], 10, partial)
    assert list(again) == ["a", "b", "c"] and again["a"] == first["a"] and measured == [np.cos(1.0)]
    del series["a"]  # a series no longer studied is not reported from the partial file
    assert list(study.study([2.0], 10, partial)) == ["b", "c"]
    with pytest.raises(ValueError, match=r"bounds=\[2\.0\] and clients=10, not bounds=\[3\.0\] and clients=10"):
        study.study([3.0], 10, partial)


def _trust_summary(name):
    """``{variant: ([worst, average, hedge] as printed, (within-10% counts))}`` of a ``bench/trust_study.py`` output."""
    text = (ROOT / "bench" / name).read_text()
    rows = re.findall(r"^  (\S.*?)\s+worst ([\d.]+)  average ([\d.]+)  hedge ([\d.]+) .* on (\d+)/(\d+)/(\d+) of 20$", text, flags=re.M)
    return text, {v: ([w, a, h], (int(i), int(j), int(k))) for v, w, a, h, i, j, k in rows}


def test_the_readmes_memoa_trust_numbers_are_the_studys():
    """Every number the README quotes from ``bench/trust_study.txt`` and ``bench/trust_kappa1.txt`` (the choices of
    feed-forward off, beta 1.5, the minimax rule and kappa 3, and the 19 of 20 series at most 0.75x MEMOA at kappa 1)
    is the files'. Passes on 672db22 (the prose is right); a re-run of either study that moves a number fails it.
    """
    _, A = _trust_summary("trust_study.txt")
    text_b, B = _trust_summary("trust_kappa1.txt")
    prose = " ".join(README.read_text().split())

    def three(v, table=A, sep=" / "):
        return sep.join(table[v][0])

    def mean3(v, table, digits):
        return f"{sum(float(x) for x in table[v][0]) / 3:.{digits}f}"

    def two(v, table):
        return " / ".join(f"{float(x):.2f}" for x in table[v][0])

    on, off = "trust k3 ff ", "trust k3 noff "
    (w, a, h), (fw, fa, fh) = A[off + "p1.5"][0], A[on + "p1.5"][0]
    phrases = [
        f"(beta = 1.5: worst client {w} vs {fw}, average {a} vs {fa}, mixture {h} vs {fh} at kappa = 3; with the minimax rule "
        f"{three(off + 'minimax')} vs {three(on + 'minimax')})",
        f"mean ratios {three(off + 'p1.5')} against {three(off + 'p1')} for beta = 1 and {three(off + 'p2')} for beta = 2. beta = 1.5 "
        f"and 2 tie on the mean of the three columns ({mean3(off + 'p1.5', A, 3)} and {mean3(off + 'p2', A, 3)};",
        f"mean ratios to the best baseline {three(off + 'minimax')} against {three(off + 'p1.5')} for beta = 1.5, within 10% of the "
        f"best on {' / '.join(map(str, A[off + 'minimax'][1]))} of 20 series, as beta = 1.5",
        f"MEMOA's mean ratios to the best baseline (of the run at that kappa) are {two('memoa', B)} at kappa = 1 and {two('memoa', A)} at kappa = 3 (mean of "
        f"the three {mean3('memoa', B, 2)} and {mean3('memoa', A, 2)}), and memoa-trust's (minimax) {two('trust k1 noff minimax', B)} "
        f"and {two(off + 'minimax', B)} ({mean3('trust k1 noff minimax', B, 3)} and {mean3(off + 'minimax', B, 3)}, both",
    ]
    for phrase in phrases:
        assert phrase in prose, phrase
    assert A[off + "minimax"][1] == A[off + "p1.5"][1]
    # every choice the README states: feed-forward off lowers every column at every beta; 1.5's worst client is the lowest
    for beta in ("p1", "p1.5", "p2", "minimax"):
        assert all(float(x) < float(y) for x, y in zip(A[off + beta][0], A[on + beta][0])), beta
    assert min(("p1", "p1.5", "p2"), key=lambda b: float(A[off + b][0][0])) == "p1.5"
    assert all(float(x) < float(y) for x, y in zip(A[off + "minimax"][0], A[off + "p1.5"][0]))
    # memoa-trust (minimax, kappa 3) over MEMOA at kappa 1, worst client, per series
    ratio = {}
    for block in re.split(r"\n(?=\S)", text_b.split("\n\nmean over series", 1)[0]):
        name = block.split(" (", 1)[0]
        worst = dict(re.findall(r"(memoa|trust k3 noff minimax): ([\d.]+)/", block))
        ratio[name] = float(worst["trust k3 noff minimax"]) / float(worst["memoa"])
    assert len(ratio) == 20
    below = sum(r <= 0.75 for r in ratio.values())
    assert (f"memoa-trust is at most 0.75x on {below} of the study's 20 series (`bench/trust_kappa1.txt`: "
            f"{min(ratio.values()):.2f}-{max(ratio.values()):.2f}x; the airline series is the one above, at {ratio['airline']:.2f}") in prose
    assert [n for n, r in ratio.items() if r > 0.75] == ["airline"]
