"""Single runs on the real two-node Slurm cluster: layouts, preemption, crashes, cancels, salloc + srun.

All jobs are submitted at once by one fixture (they run side by side, as on a real cluster) and each test
checks one of them. The uninterrupted local 2-rank run is the reference every loss curve must equal
bitwise (CPU, training.deterministic=true, the same world size).
"""

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from tests.launch.slurm_utils import (
    REPO,
    TINY,
    env,
    events,
    job_ids,
    launch,
    metrics,
    requires_slurm,
    run_dir_of,
    slurm,
    wait_for_job,
    when,
)
from titan.tools import report

pytestmark = [pytest.mark.slow, requires_slurm]
STEPS = 40
RUN = [*TINY, f"training.steps={STEPS}"]
JOBS = {
    "two_nodes": ["cluster.nodes=2", "cluster.nproc_per_node=1"],
    "one_node": ["cluster.nodes=1", "cluster.nproc_per_node=2"],
    "preempt": ["cluster.nodes=2", "cluster.nproc_per_node=1"],
    "killed": ["cluster.nproc_per_node=2", "checkpoint.interval=4", "cluster.max_retries=1"],
    # a learning rate that makes the gradients NaN at step 2 on every attempt, and no skipped step allowed
    "crash": [
        "training.max_nonfinite_steps=0",
        "cluster.nproc_per_node=1",
        "parallelism=single",
        "optimizer=sgd",
        "optimizer.lr=1e30",
        "checkpoint.interval=1",
        "cluster.max_retries=1",
        "training.steps=5",
    ],
    "cancelled": ["cluster.nproc_per_node=1", "parallelism=single", "training.steps=100000"],
}


# What happens to a job once its run got far enough: (condition on the run dir, scancel arguments).
INTERVENTIONS = {
    "preempt": (lambda run: len(metrics(run)) >= 3, lambda job: ["--signal=USR2", job]),
    # the ranks only (step 0), not the batch script: what an OOM kill does
    "killed": (
        lambda run: (run / "checkpoints" / "step-8").is_dir(),
        lambda job: ["--signal=KILL", f"{job}.0"],
    ),
    "cancelled": (lambda run: len(metrics(run)) >= 2, lambda job: [job]),
}


def submit_all(root):
    def intervene(name, run):
        condition, scancel = INTERVENTIONS[name]
        (submitted,) = [e for e in events(run) if e["event"] == "submitted"]
        slurm("scancel", *scancel(submitted["job_id"]))

    def submit(name):
        run = root / "llama3_debug" / name
        if name in INTERVENTIONS:  # watching from before the submission: the job may start at once
            when(lambda: INTERVENTIONS[name][0](run), lambda: intervene(name, run))
        proc = launch("cluster=slurm", *RUN, *JOBS[name], f"run.name={name}", root=root)
        (job,) = job_ids(proc.stdout)
        queued = slurm("squeue", "-h", "-j", job, "-o", "%T").strip()  # right after launch.py returned
        assert run_dir_of(proc) == run
        return name, {"job": job, "dir": str(run), "stdout": proc.stdout, "queued": queued}

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        submitted = dict(pool.map(submit, JOBS))
    reference = run_dir_of(launch(*RUN, "cluster.nproc_per_node=2", "run.name=reference", root=root))
    return {"root": str(root), "reference": [m["loss"] for m in metrics(reference)], **submitted}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, worker_id):
    """Submitted once per test session by whichever xdist worker needs them first (a worker may get only
    some of this module's tests, or run them between other modules' tests)."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "slurm_jobs"
    root.mkdir(exist_ok=True)
    with FileLock(root / "submit.lock"):
        state = root / "jobs.json"
        if not state.exists():
            state.write_text(json.dumps(submit_all(root)))
    jobs = json.loads(state.read_text())
    for job in jobs.values():
        if isinstance(job, dict):
            job["dir"] = Path(job["dir"])
    return {**jobs, "root": Path(jobs["root"])}


def test_submission_returns_at_once_with_the_job_the_run_dir_and_the_log(jobs):
    job = jobs["two_nodes"]
    assert job["queued"] in ("PENDING", "CONFIGURING", "RUNNING")  # launch.py did not wait for it
    assert f"follow it: tail -F {job['dir']}/slurm/{job['job']}_0_log.err" in job["stdout"]
    assert job["dir"] == jobs["root"] / "llama3_debug" / "two_nodes"


@pytest.mark.parametrize("name, nodes", [("two_nodes", "n[1-2]"), ("one_node", "n1")])
def test_layouts_train_like_the_local_run(jobs, name, nodes):
    job, run = jobs[name], jobs[name]["dir"]
    assert [a["state"] for a in wait_for_job(job["job"])] == ["COMPLETED"]
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics(run)] == jobs["reference"]  # bitwise
    for path in (
        "config.yaml",
        "overrides.yaml",
        "git.txt",
        "env.txt",
        "cmd.txt",
        "logs/rank0.log",
        "logs/rank1.log",
        f"checkpoints/step-{STEPS}",
        f"slurm/{job['job']}_submission.sh",
    ):
        assert (run / path).exists(), path
    started = [e for e in events(run) if e["event"] == "started"]
    assert len(started) == 1 and started[0]["nodes"] == nodes
    # The job ran the code copied at submission, not the checkout's.
    assert (
        started[0]["source"] == str(run / "code" / "titan") and (run / "code/titan/train/trainer.py").exists()
    )
    assert [e["event"] for e in events(run)][-2:] == ["finished", "done"]


def test_preemption_saves_requeues_and_resumes_bitwise(jobs):
    job, run = jobs["preempt"], jobs["preempt"]["dir"]
    assert [a["state"] for a in wait_for_job(job["job"])] == ["REQUEUED", "COMPLETED"]
    (stop,) = [e for e in events(run) if e["event"] == "requeued"]
    step = stop["step"]
    assert 3 <= step < STEPS
    first = run / "restarts" / "1" / "logs"
    for rank in (0, 1):  # every rank stopped after the same step, and both saved
        assert f"stopping at step {step} on SIGUSR2" in (first / f"rank{rank}.log").read_text()
    assert f"checkpoints/step-{step}" in (run / "logs" / "rank0.log").read_text()  # resumed from it
    assert "stopping" not in (run / "logs" / "rank0.log").read_text()
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))  # each step once
    assert [m["loss"] for m in metrics(run)] == jobs["reference"]


def test_a_killed_job_is_retried_from_its_checkpoint(jobs):
    job, run = jobs["killed"], jobs["killed"]["dir"]
    assert [a["state"] for a in wait_for_job(job["job"])] == ["REQUEUED", "COMPLETED"]
    (retry,) = [e for e in events(run) if e["event"] == "retry"]
    assert retry["reason"].startswith("srun exited with status 137")
    resumed = (run / "logs" / "rank0.log").read_text()
    assert "resumed from checkpoint" in resumed and "checkpoints/step-4\n" not in resumed
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics(run)] == jobs["reference"]
    (row,) = [r for r in report.report(run)]
    assert (row["state"], row["attempts"]) == ("done", 2)


def test_a_crash_is_retried_then_reported_failed_with_its_reason(jobs):
    job, run = jobs["crash"], jobs["crash"]["dir"]
    assert [a["state"] for a in wait_for_job(job["job"])] == ["REQUEUED", "FAILED"]
    kinds = [e["event"] for e in events(run)]
    assert kinds.count("started") == 2 and kinds.count("retry") == 1 and kinds[-1] == "failed"
    assert "resumed from checkpoint" in (run / "logs" / "rank0.log").read_text()
    (row,) = report.report(run)
    assert (row["state"], row["attempts"], row["job"]) == ("failed", 2, job["job"])
    assert row["reason"].startswith("NonFiniteStepsError: stopped at step 2")


def test_scancel_ends_the_run_and_the_report_says_cancelled(jobs):
    job, run = jobs["cancelled"], jobs["cancelled"]["dir"]
    assert [a["state"] for a in wait_for_job(job["job"])] == ["CANCELLED"]  # not requeued
    assert "on SIGTERM: saving a checkpoint" in (run / "logs" / "rank0.log").read_text()
    (row,) = report.report(run)
    assert (row["state"], row["attempts"], row["reason"]) == ("cancelled", 1, "SIGTERM")
    assert 2 <= row["steps"] < 100000


def test_salloc_then_srun_runs_launch_py_on_every_task(jobs):
    """The interactive debugging path: an allocation, then one launch.py per task."""
    proc = subprocess.run(
        [
            "salloc",
            "-N2",
            "--ntasks-per-node=1",
            "srun",
            sys.executable,
            "launch.py",
            *RUN,
            "cluster.nodes=2",
            "cluster.nproc_per_node=1",
            "run.name=salloc",
            f"run.root={jobs['root']}",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    run = jobs["root"] / "llama3_debug" / "salloc"
    assert [m["loss"] for m in metrics(run)] == jobs["reference"]
    assert (run / "logs" / "rank1.log").exists()
