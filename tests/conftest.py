"""Shared fixtures. The tests run against the installed package (see README)."""
from pathlib import Path

import numpy as np
import pytest

import memoa_fast

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

try:  # kernels/ becomes memoa_fast.kernels only through an install (editable or not)
    import memoa_fast.kernels  # noqa: F401
except ImportError:
    pytest.exit(
        "memoa_fast.kernels is not importable: install the package first, for development "
        "`python3 -m pip install -e '.[test]'` (then edits to .py files need no reinstall), and run "
        "`python3 -m pytest` from the repository root.",
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

        if hasattr(cy, "signal_pass"):  # the current kernel contract
            names.append("cython")
    except ImportError:
        pass
    return names
