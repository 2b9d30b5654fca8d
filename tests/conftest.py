"""Shared fixtures and the hypothesis profiles. The tests run against the installed package (see README).

Hypothesis profiles
-------------------
``ci`` (the default, and what CI runs)
    Derandomized: every run draws the same examples from a fixed seed, with no
    example database, so a failure in CI fails the same way on any machine.
    No deadline (the first call of a kernel JIT-compiles). A failure prints
    the blob that ``@reproduce_failure`` replays.
``random``
    Fresh random examples on every run (with the local ``.hypothesis/``
    example database, which replays earlier failures first): for hunting.

Choose one with ``python3 -m pytest --hypothesis-profile=random`` (hypothesis'
own pytest option, which wins) or ``MEMOA_HYPOTHESIS=random python3 -m pytest``.
Example counts stay per test (``@settings(max_examples=...)``); a profile sets
only how examples are drawn.
"""
import gc
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

import memoa_fast

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("random", derandomize=False, deadline=None, print_blob=True)
_PROFILE = os.environ.get("MEMOA_HYPOTHESIS", "ci")
if _PROFILE not in ("ci", "random"):
    raise pytest.UsageError(f"MEMOA_HYPOTHESIS={_PROFILE!r}: expected 'ci' (fixed seed, the default) or 'random'")
settings.load_profile(_PROFILE)


def pytest_report_header(config):
    """Name the hypothesis profile in the run's header (``--hypothesis-profile`` overrides the default)."""
    name = config.getoption("hypothesis_profile", default=None) or _PROFILE
    return f"hypothesis profile: {name} (select with --hypothesis-profile=ci|random or MEMOA_HYPOTHESIS)"

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
    """A NumPy generator with a fixed seed, fresh for each test."""
    return np.random.default_rng(20261121)


@pytest.fixture
def datasets_dir():
    """``../shared/datasets`` beside the checkout; skips where it is absent (package never needs it)."""
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS} (they sit beside the checkout as ../shared in CI)")
    return DATASETS



# Threads a test module may leave behind: distributed's process-wide executor (one daemon worker, idle on its queue,
# made at the first use of a Dask client and kept for the process's life by distributed itself).
_PROCESS_WIDE_THREADS = ("Dask-Offload",)


def _left_running(before: set) -> list:
    """Threads alive now that were not in ``before``, but the process-wide ones."""
    return [t for t in threading.enumerate() if t not in before and not t.name.startswith(_PROCESS_WIDE_THREADS)]


@pytest.fixture(scope="module", autouse=True)
def _no_thread_outlives_its_module(request):
    """Every test module joins the threads it starts and closes the Dask clients it opens; else its last test errors.

    A thread left running runs on during the next modules. One did: a Dask client left open by a test (a
    DaskPopulation not closed) kept reconnecting to its closed cluster from its IO-loop thread, drawing each backoff
    from the global ``random``, and hypothesis, which checks that the global random state does not change during a
    draw, failed a later module's test at random (FlakyFailure, "Do not use the random module inside strategies").
    Left-over Dask clients are closed here (so the next modules run clean) and named.
    """
    before = set(threading.enumerate())
    yield
    clients = []
    if "distributed" in sys.modules:
        Client = sys.modules["distributed"].Client
        clients = [c for c in list(Client._instances) if c.status not in ("closed", "newly-created")]
        for c in clients:
            c.close(timeout=30)
    if _left_running(before):
        gc.collect()  # objects dropped in a cycle stop their threads when collected (ClientForecasters' noise pool)
        deadline = time.monotonic() + 5.0  # a thread told to stop may take a moment to end
        while _left_running(before) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = _left_running(before)
    assert not clients and not left, (f"{request.node.nodeid} left {len(clients)} Dask client(s) open and these threads "
                                      f"running: {[t.name for t in left]}")
