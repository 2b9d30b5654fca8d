"""The module guard of ``tests/conftest.py``: which threads it counts as this repository's (left running: an error)."""
import logging
import logging.handlers
import os
import queue
import sys
import threading
from pathlib import Path

# the conftest pytest loaded (the importlib import mode names it as it likes; an import would load a second copy)
_FILE = str(Path(__file__).resolve().with_name("conftest.py"))
conftest = next(m for m in list(sys.modules.values()) if os.path.realpath(getattr(m, "__file__", None) or "") == _FILE)


def _started_from(path, target):
    """A thread started by code whose file is ``path`` (as Python names it in tracebacks)."""
    thread = threading.Thread(target=target)
    exec(compile("thread.start()", str(path), "exec"), {"thread": thread})
    return thread


def test_the_guard_counts_threads_started_here_and_named_memoa_but_not_a_librarys(tmp_path):
    before = set(threading.enumerate())
    stop = threading.Event()
    mine = threading.Thread(target=stop.wait)
    mine.start()
    named = _started_from(tmp_path / "elsewhere.py", stop.wait)
    named.name = "memoa-probe"
    foreign = _started_from(tmp_path / "elsewhere.py", stop.wait)  # another project's code started it
    listener = logging.handlers.QueueListener(queue.Queue())  # the logging module starts its own thread
    listener.start()
    try:
        left = conftest._ours_left_running(before)
        assert mine in left and named in left
        assert foreign not in left and listener._thread not in left
    finally:
        stop.set()
        listener.stop()
        for t in (mine, named, foreign):
            t.join()
    assert conftest._ours_left_running(before) == []


def test_the_guard_counts_a_thread_started_through_a_symlink_to_the_checkout(tmp_path):
    """Python names a file by the path it was imported through; the guard compares resolved paths."""
    link = tmp_path / "checkout"
    os.symlink(conftest.ROOT, link)
    before = set(threading.enumerate())
    stop = threading.Event()
    thread = _started_from(link / "tests" / "a_test.py", stop.wait)
    try:
        assert thread in conftest._ours_left_running(before)
    finally:
        stop.set()
        thread.join()


def test_the_guard_does_not_count_a_thread_started_by_execd_code(monkeypatch):
    """Code compiled from a string is named "<string>", no file: not this checkout's, whatever the working directory.
    Resolved as a path, it was put in the working directory, so from the checkout (where pytest runs) it counted.
    """
    monkeypatch.chdir(conftest.ROOT)
    before = set(threading.enumerate())
    stop = threading.Event()
    thread = _started_from("<string>", stop.wait)
    try:
        assert thread not in conftest._ours_left_running(before)
    finally:
        stop.set()
        thread.join()
