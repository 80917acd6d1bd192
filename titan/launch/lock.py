"""One launch at a time per run directory: `<run dir>/launch.lock`, held (flock) by the process that runs
the run on this machine: launch.py's local launcher, or rank 0 under torchrun or srun.

The kernel drops the lock when its holder ends, however it ends (a crash, SIGKILL), so no launch leaves
it stuck; the file's text only names the holder in the refusal. A Slurm job takes none: while it is
queued or running its run directory is its own (a second submission is refused by slurm.preflight),
and each requeued attempt of it starts afresh.
"""

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("titan")

LOCK_FILE = "launch.lock"
_held: dict[Path, int] = {}  # run directory -> the open lock file, for this process's lifetime


class RunDirInUse(Exception):
    """Another process holds the run directory; launch.py prints the message, one line."""

    status = 2


def hold(run_dir: Path) -> None:
    """Lock `run_dir` until this process ends, or raise RunDirInUse naming the process that holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise RunDirInUse(
            f"error: {run_dir} is in use by another launch ({holder}); wait for it to end or stop it "
            "(Ctrl-C, or kill -TERM its pid: it saves first), or give this run another run.name"
        ) from None
    except OSError as e:  # a file system without locks (some network mounts): run unguarded
        os.close(fd)
        log.warning("cannot lock %s (%s): a second launch into it would not be refused", run_dir, e)
        return
    os.ftruncate(fd, 0)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.pwrite(fd, holder.encode() + b"\n", 0)
    _held[run_dir] = fd


def _release_in_child() -> None:
    """A forked child (a data-loader worker) lets go of its copy: the lock then ends with its holder,
    not with the last of its children."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_release_in_child)
