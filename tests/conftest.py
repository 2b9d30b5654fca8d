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

# BLAS on one thread (unless the user chose), set before NumPy loads it; the xdist workers, started after this file
# is read, inherit it. The suite runs one worker per core: a BLAS thread per core then waits for the core the other
# worker holds (scipy.linalg.svd of 180 x 60, least_squares in test_certificates: 1.3 ms on one thread, 3.2 ms on two
# beside one busy process, 0.28 s at load 4). No test is about BLAS threads. bench/guard.py does the same.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import memoa_fast  # noqa: E402

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



_ROOT_PREFIX = str(ROOT) + os.sep  # the code of this checkout (tests/, and memoa_fast/ when installed editable)
_THREAD_MACHINERY = (threading.__file__, os.path.join(os.path.dirname(os.__file__), "concurrent", "futures", ""))
_thread_start = threading.Thread.start


def _start_recording_the_starter(self, *args, **kwargs):
    """``Thread.start``, recording the file of the code that started the thread (past threading and concurrent.futures).

    A test's ``Thread(target=event.wait)`` runs a library's code but was started here; a ThreadPoolExecutor's
    worker is started by the code that submitted the first job to it; distributed's threads by distributed.
    """
    frame = sys._getframe().f_back  # (None when started from C)
    while frame is not None and frame.f_code.co_filename.startswith(_THREAD_MACHINERY):
        frame = frame.f_back
    # resolved like ROOT: a checkout reached through a symlink names its files by the link. Only a path: "<string>"
    # (exec'd code) or "<frozen ...>" is no file, and realpath would put it in the working directory (the checkout's)
    name = frame.f_code.co_filename if frame is not None else ""
    self._memoa_started_in = os.path.realpath(name) if os.path.isabs(name) else ""
    return _thread_start(self, *args, **kwargs)


_start_recording_the_starter.recording = True
if not getattr(threading.Thread.start, "recording", False):  # once, even if this file is imported again
    threading.Thread.start = _start_recording_the_starter


def _ours(thread: threading.Thread) -> bool:
    """Whether a thread is this repository's: named ``memoa*`` (memoa_fast names its threads: the ``memoa-noise``
    pools of ClientForecasters, ``memoa-close-client``) or started by code of this checkout (a test's thread).
    """
    return thread.name.startswith("memoa") or getattr(thread, "_memoa_started_in", "").startswith(_ROOT_PREFIX)


def _ours_left_running(before: set) -> list:
    """Threads alive now, not in ``before``, that are this repository's (:func:`_ours`).

    Other libraries' threads are theirs to keep: process-wide workers made at a first use and kept for the
    process's life (distributed's ``Dask-Offload`` and ``Dask-Callback-Thread`` executors, hypothesis's
    background database writer, tqdm's monitor), event loops and executors that end on their own schedule
    (``IO loop``, ``asyncio_*``, a closed LocalCluster's, possibly seconds later on a loaded machine), dummy
    entries of foreign threads. (Numba's and OpenMP's native workers are no Python threads.) A Dask client left
    open is found by itself (:func:`_open_dask_clients`), whatever its threads.
    """
    return [t for t in threading.enumerate() if t not in before and t.is_alive() and _ours(t)]


def _open_dask_clients() -> list:
    """The Dask clients of this process not closed (none when distributed was never imported)."""
    if "distributed" not in sys.modules:
        return []
    return [c for c in list(sys.modules["distributed"].Client._instances) if c.status not in ("closed", "newly-created")]


@pytest.fixture(scope="module", autouse=True)
def _no_thread_outlives_its_module(request):
    """Every test module joins the threads it starts and closes the Dask clients it opens; else its last test errors.

    A thread left running runs on during the next modules. One did: a Dask client left open by a test (a
    DaskPopulation not closed) kept reconnecting to its closed cluster from its IO-loop thread, drawing each backoff
    from the global ``random``, and hypothesis, which checks that the global random state does not change during a
    draw, failed a later module's test at random (FlakyFailure, "Do not use the random module inside strategies").
    Left-over Dask clients are closed here (so the next modules run clean) and named. Only this repository's
    threads count (see :func:`_ours_left_running`): a library's own threads must not fail a module by timing.
    Nothing is waited for when nothing is left (one thread list per module).
    """
    before = set(threading.enumerate())
    yield
    clients, left = _open_dask_clients(), _ours_left_running(before)
    if clients or left:
        # Objects dropped in a reference cycle stop their threads and close their clients when collected: a
        # ClientForecasters' noise pool, a DaskPopulation's own client (its finalizer queues it for the
        # memoa-close-client thread, which ends once it has closed every queued client: waited for below).
        gc.collect()
        deadline = time.monotonic() + 10.0  # a thread told to stop may take a moment to end (more on a loaded machine)
        while _ours_left_running(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        clients, left = _open_dask_clients(), _ours_left_running(before)
    for c in clients:
        c.close(timeout=30)
    assert not clients and not left, (f"{request.node.nodeid} left {len(clients)} Dask client(s) open and these threads "
                                      f"running: {[t.name for t in left]}")
