"""Running launch.py against the real Slurm cluster that `make test` brings up (../shared/slurm)."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
requires_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="no sbatch: Slurm is not installed here (`make test` brings up ../shared/slurm)",
)
# The tiny model of tests/utils.py, deterministic (a resumed run must match bitwise), one line per step.
TINY = [
    "model.n_layers=2",
    "model.dim=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "training.seq_len=32",
    "training.deterministic=true",
    "optimizer.warmup_steps=1",
    "metrics.log_freq=1",
    "metrics.tensorboard=false",
]


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    e.setdefault("SLURM_CONF", "/tmp/slurm-ci/etc/slurm.conf")
    return e


def launch(*args: str, root: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "launch.py", *args, f"run.root={root}"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_ids(output: str) -> list[str]:
    return re.findall(r"submitted Slurm job (\d+)", output)


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    return Path(re.search(r"run directory: (\S+)", proc.stderr).group(1))


def slurm(*args: str) -> str:
    return subprocess.run(args, env=env(), capture_output=True, text=True, check=True, timeout=60).stdout


def wait_until(condition, timeout: float = 240, what: str = "a condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED")


def wait_for_job(job: str, timeout: float = 240) -> list[dict]:
    """Wait until the job left the queue and accounting has its final state; return each attempt's
    sacct record (State, Start, End).

    slurmdbd records the end of a job a moment after squeue drops it: until then sacct still says
    RUNNING, so the last attempt is polled too.
    """
    wait_until(lambda: not slurm("squeue", "-h", "-j", job, "-o", "%i").strip(), timeout, f"job {job}")
    records: list[dict] = []

    def settled() -> bool:
        out = slurm("sacct", "-X", "-n", "-P", "--duplicates", "-j", job, "-o", "JobID,State,Start,End")
        attempts = [dict(zip(("job", "state", "start", "end"), line.split("|"))) for line in out.splitlines()]
        records[:] = [
            {**a, "state": a["state"].split()[0]} for a in attempts
        ]  # "CANCELLED by 0" -> CANCELLED
        return bool(records) and records[-1]["state"] not in ACTIVE_STATES

    wait_until(settled, 60, f"the accounting of job {job}")
    return records


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def when(condition, action, timeout: float = 240) -> threading.Thread:
    """Run `action` (e.g. a scancel) as soon as `condition` holds, in the background."""

    def watch():
        try:
            wait_until(condition, timeout)
        except TimeoutError:
            return
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
