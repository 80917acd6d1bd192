"""A run's life as events (`<run dir>/events.jsonl`), and its state for the report and the launchers.

Several processes write here, each at its own moment: the submitting process (`submitted`), the batch
script before and after srun (`started`, `retry`, `failed`, `done`), the ranks (`crashed`, and from
rank 0 `finished`, `stopped`, `requeued`), launch.py's local path (`started`, `finished`, `stopped`,
`crashed`).
One JSON object per line, appended with a single write, so concurrent writers do not tear lines.

The state (pending, running, requeued, done, failed, cancelled) joins these events with what Slurm
says now (squeue, then sacct for jobs that left the queue). This module imports nothing heavy: the
batch script runs it before and after every attempt.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EVENTS = "events.jsonl"
STATES = ("pending", "running", "requeued", "done", "failed", "cancelled", "incomplete")
# Slurm job states that mean "will run (again)" and "runs now" (squeue/sacct spellings).
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"}
ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def record(run_dir: Path, event: str, **fields) -> dict:
    """Append one event; the Slurm job id and attempt are taken from the environment when set."""
    entry = {"event": event, "time": round(time.time(), 3), "host": socket.gethostname()}
    if "SLURM_JOB_ID" in os.environ and "job_id" not in fields:
        entry["job_id"] = os.environ["SLURM_JOB_ID"]
        entry["attempt"] = int(os.environ.get("SLURM_RESTART_COUNT", 0)) + 1
    entry.update(fields)
    path = Path(run_dir) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # O_APPEND: one write per line, so writers on several nodes do not interleave
        f.write(json.dumps(entry) + "\n")
    return entry


def record_result(run_dir: Path, result: dict) -> None:
    """Rank 0's end of training: `stopped` by a signal (TERM: a cancel) or `finished`."""
    if result.get("preempted"):
        record(
            run_dir,
            "stopped",
            step=result.get("step"),
            signal=result["preempted"],
            checkpoint=result.get("checkpoint"),
        )
    else:
        record(run_dir, "finished", step=result.get("step"), loss=result.get("loss"))


class RunEnded(Exception):
    """A run on this machine ended before its last step (a stop, a rank's error), its event recorded:
    launch.py prints the message, one line, and exits with `status`."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def tracked(run_dir: Path, enabled: bool = True) -> Iterator[Callable[[dict], dict]]:
    """Record a run on this machine: `started` (with its pid), then its result or its crash."""

    def finish(result: dict) -> dict:
        if enabled:
            record_result(run_dir, result)
        return result

    if enabled:
        record(run_dir, "started", pid=os.getpid())
    try:
        yield finish
    except RunEnded:
        raise
    except Exception as e:
        if enabled:
            record(run_dir, "crashed", reason=f"{type(e).__name__}: {e}")
        raise


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return events


def current_job(events: list[dict]) -> str | None:
    """The job id of the newest submission."""
    submitted = [e for e in events if e["event"] == "submitted"]
    return submitted[-1]["job_id"] if submitted else None


def since_submission(events: list[dict]) -> list[dict]:
    """The events of the newest submission (or all, for a run never submitted to Slurm)."""
    starts = [i for i, e in enumerate(events) if e["event"] == "submitted"]
    return events[starts[-1] :] if starts else events


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job: squeue for queued and running jobs, sacct for those that left it.

    Empty when Slurm's commands are absent. sacct lists one line per attempt of a requeued job; the
    newest wins.
    """
    ids = sorted({j for j in job_ids if j})
    if not ids or shutil.which("squeue") is None:
        return {}
    states = {}
    out = _run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(ids)])
    for line in out.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.strip()
    missing = [j for j in ids if j not in states]
    if missing and shutil.which("sacct"):
        out = _run(["sacct", "-X", "-n", "-P", "--duplicates", "-o", "JobID,State", "-j", ",".join(missing)])
        for line in out.splitlines():
            job, _, state = line.partition("|")
            states[job.strip()] = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0"
    return states


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


@dataclass(frozen=True)
class RunState:
    state: str  # one of STATES
    attempts: int  # attempts started (all submissions)
    job_id: str | None
    reason: str | None = None  # why it failed, or which signal stopped it


def run_state(run_dir: Path, slurm: dict[str, str] | None = None, *, complete: bool = False) -> RunState:
    """The run's state from its events and Slurm's view of its job (`slurm`: from slurm_states).

    `complete` (the metrics reached training.steps) decides for runs that left no events.
    """
    events = read(run_dir)
    attempts = sum(e["event"] == "started" for e in events)
    job = current_job(events)
    recent = since_submission(events)
    kinds = [e["event"] for e in recent]
    failure = next((e for e in reversed(recent) if e["event"] == "failed"), None)
    crash = next((e for e in recent if e["event"] == "crashed"), None)
    stop = next((e for e in reversed(recent) if e["event"] == "stopped"), None)
    reason = (failure or crash or {}).get("reason") or (stop or {}).get("signal")

    def state(name: str) -> RunState:
        return RunState(name, attempts, job, reason if name in ("failed", "cancelled", "requeued") else None)

    live = (slurm or {}).get(job) if job else None
    if live in QUEUED:
        return state("requeued" if attempts else "pending")
    if live in ACTIVE:  # between a retry decision and the requeue, the job is still COMPLETING
        return state("requeued" if kinds[-1] in ("retry", "requeued") else "running")
    if failure:
        return state("failed")
    if live == "CANCELLED" or (live is None and kinds and kinds[-1] == "stopped"):
        return state("cancelled")
    if "done" in kinds or "finished" in kinds:
        return state("done")
    if crash:
        return state("failed")
    if live is not None and live not in ("COMPLETED", "UNKNOWN"):  # FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY
        reason = reason or f"Slurm job state {live}"
        return state("failed")
    if job is not None:  # Slurm cannot tell (no sacct, or the job is too old for it)
        return state("incomplete" if attempts else "pending")
    started = next((e for e in reversed(recent) if e["event"] == "started"), None)
    if started and started.get("host") == socket.gethostname() and _alive(started.get("pid")):
        return state("running")
    return state("done" if complete else "incomplete")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
