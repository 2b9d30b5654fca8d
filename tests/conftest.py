"""Shared fixtures. The tests run against the installed package (see README)."""
from pathlib import Path

import numpy as np
import pytest

import memoa_fast

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

if Path(memoa_fast.__file__).resolve().parents[1] == ROOT:
    pytest.exit(
        "memoa_fast was imported from the source tree, not the installed package; "
        "install it (python3 -m pip install '.[test]') and run `python3 -P -m pytest` from the repository root.",
        returncode=4,
    )
DATASETS = SHARED / "datasets"


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)


@pytest.fixture
def datasets_dir():
    """``../shared/datasets`` beside the checkout; skips where it is absent (package never needs it)."""
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS} (they sit beside the checkout as ../shared in CI)")
    return DATASETS


def available_backends():
    """Compiled backends importable here; 'cython' is absent only if the extension was not built."""
    names = ["numpy", "numba"]
    try:
        import memoa_fast.kernels._cython as cy  # noqa: F401

        if hasattr(cy, "mean_field"):
            names.append("cython")
    except ImportError:
        pass
    return names
