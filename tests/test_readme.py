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
    namespace = {}
    exec(python_blocks()[0], namespace)
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
