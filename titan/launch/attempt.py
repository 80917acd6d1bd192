"""The batch script's hooks around srun, run once per attempt of a Slurm job (see slurm.py).

  python -m titan.launch.attempt begin RUN_DIR
      moves what the previous attempt left (rank logs, task logs, result files) to restarts/<n>/,
      so logs/ and metrics.jsonl only ever describe one history; records `started`.
  python -m titan.launch.attempt end RUN_DIR SRUN_STATUS MAX_RETRIES
      after srun: a clean exit is recorded; a crash is retried by requeueing the job (same id; the
      next attempt resumes from the newest complete checkpoint) until MAX_RETRIES retries were used
      since the submission, then recorded as failed with its reason. Exits with the job's status.

Only the standard library and jobstate are imported: this runs before every attempt.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from titan.launch import jobstate

# What an attempt leaves behind that the next one would append to or confuse with its own.
LEFTOVERS = ("logs", "slurm/*_[0-9]*_log.out", "slurm/*_[0-9]*_log.err", "slurm/*_result.pkl")


def begin(run_dir: Path) -> None:
    found = [p for pattern in LEFTOVERS for p in sorted(run_dir.glob(pattern)) if p.exists()]
    if found:
        restarts = run_dir / "restarts"
        index = 1 + sum(1 for p in restarts.iterdir() if p.name.isdigit()) if restarts.exists() else 1
        dest = restarts / str(index)
        for path in found:
            target = dest / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
    # `source`: where titan was imported from (the code snapshot, not the checkout)
    source = str(Path(jobstate.__file__).resolve().parents[1])
    jobstate.record(run_dir, "started", nodes=os.environ.get("SLURM_JOB_NODELIST"), source=source)


def end(run_dir: Path, status: int, max_retries: int) -> int:
    job = os.environ["SLURM_JOB_ID"]
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0)) + 1
    recent = jobstate.since_submission(jobstate.read(run_dir))
    this_attempt = [e for e in recent if e.get("job_id") == job and e.get("attempt") == attempt]
    kinds = {e["event"] for e in this_attempt}
    if "requeued" in kinds:  # rank 0 handed a USR2 stop to submitit, which requeues the job
        return 0
    if "finished" in kinds:  # trained to the end and saved: a rank dying on its way out changes nothing
        jobstate.record(run_dir, "done")
        return 0
    if status == 0:
        return 0
    crash = next((e for e in this_attempt if e["event"] == "crashed"), None)
    reason = (
        crash["reason"]
        if crash
        else (
            f"srun exited with status {status}: a rank was killed (out of memory, a signal) or its node failed"
        )
    )
    retries = sum(e["event"] == "retry" for e in recent)
    if retries < max_retries:
        jobstate.record(run_dir, "retry", retry=retries + 1, of=max_retries, reason=reason)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        return 0
    jobstate.record(run_dir, "failed", reason=reason, retries=retries)
    return status


def main(argv: list[str]) -> int:
    command, run_dir = argv[0], Path(argv[1])
    if command == "begin":
        begin(run_dir)
        return 0
    if command == "end":
        return end(run_dir, int(argv[2]), int(argv[3]))
    raise SystemExit(
        f"usage: python -m titan.launch.attempt begin|end RUN_DIR [STATUS MAX_RETRIES]; got {argv}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
