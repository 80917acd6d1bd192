"""One launch per run directory: a second is refused, naming the first; a killed holder leaves no lock."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from titan.launch.lock import LOCK_FILE, RunDirInUse, hold

# A holder that forks a child (as a data loader does), then waits to be killed. The child prints its
# pid once it runs, that is after the fork hooks (which let go of the lock's copy) have run in it: the
# test must not race a child that has not been scheduled yet.
HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from titan.launch.lock import hold
    hold(sys.argv[1])
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
    time.sleep(60)
    """
)


def test_a_held_run_dir_is_refused_until_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunDirInUse) as refused:
            hold(tmp_path)
        message = str(refused.value)
        assert message.startswith(f"error: {tmp_path} is in use by another launch (pid {holder.pid} on ")
        assert "\n" not in message and refused.value.status == 2
        holder.kill()  # SIGKILL: nothing of it runs, and its forked child lives on
        holder.wait()
        hold(tmp_path)  # the child let go of its copy when it was forked
        assert f"pid {os.getpid()} on " in (tmp_path / LOCK_FILE).read_text()
        hold(tmp_path)  # this process holds it already
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)
