"""CI's script (``.ci/run``), with its commands stubbed: what it leaves running and the status it exits with."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / ".ci" / "run"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("bash") is None,
                                reason="reads /proc; runs bash")

# python3 and memoa as the script calls them: .ci/warm_pipeline.py records its pid, then sleeps WARM_SLEEP seconds and
# exits 0, or exits WARM_EXIT at once; memoa waits until the warm-up has started, then likewise with MEMOA_SLEEP and
# MEMOA_EXIT; the rest succeed.
_PYTHON3 = """#!/usr/bin/env bash
if [ "$1" = ".ci/warm_pipeline.py" ]; then
    echo $$ > "$STUB_DIR/warm.pid"
    [ "$WARM_EXIT" = 0 ] && exec sleep "$WARM_SLEEP"
    exit "$WARM_EXIT"
fi
exit 0
"""
_MEMOA = """#!/usr/bin/env bash
for _ in $(seq 200); do [ -s "$STUB_DIR/warm.pid" ] && break; sleep 0.02; done
[ "$MEMOA_EXIT" = 0 ] && exec sleep "$MEMOA_SLEEP"
exit "$MEMOA_EXIT"
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: its orphan's new parent may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("case, expected", [("memoa run fails", 7), ("Ctrl-C in memoa run", 130), ("the warm-up fails", 3)])
def test_ci_leaves_no_warm_up_running_and_exits_with_the_failure(tmp_path, case, expected):
    """The Pipeline's warm-up runs in the background beside ``memoa run``: when the job ends before waiting for it
    (``memoa run`` failed under ``set -e``, or Ctrl-C, which a script's background job ignores), it is stopped, not
    left compiling on its own beside the next run's; the status is the failure's; a failed warm-up fails the job.
    """
    for name, text in (("python3", _PYTHON3), ("memoa", _MEMOA)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, STUB_DIR=str(tmp_path), PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
               WARM_SLEEP="0" if case == "the warm-up fails" else "30", WARM_EXIT="3" if case == "the warm-up fails" else "0",
               MEMOA_SLEEP="30" if case.startswith("Ctrl-C") else "0", MEMOA_EXIT="7" if case == "memoa run fails" else "0")
    # its own process group, as a terminal's foreground job, with SIGINT as a terminal delivers it (not ignored)
    job = subprocess.Popen(["bash", str(RUN)], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid_file = tmp_path / "warm.pid"
    try:
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        warm = int(pid_file.read_text())
        if case.startswith("Ctrl-C"):
            time.sleep(0.2)  # memoa run is under way
            os.killpg(job.pid, signal.SIGINT)
        status = job.wait(10)
        assert status == expected or (case.startswith("Ctrl-C") and status == -signal.SIGINT), status
        deadline = time.monotonic() + 5  # the kill's delivery (a loaded machine may take a while to schedule it)
        while _running(warm) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _running(warm), f"the warm-up ({warm}) still runs 5 s after the job ended ({case})"
    finally:  # nothing of this test left running, whatever failed
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if pid_file.exists() and pid_file.read_text().strip() and _running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
