"""Slurm through submitit: one job per run, one Slurm task per rank, requeued on preemption.

launch.py calls `preflight(cfg, run_dir)` before it writes anything, then `submit(cfg, run_dir)`, which
returns at once. In the job every task runs `SlurmTrain()`: rank, world size and master address come
from submitit's TorchDistributedEnvironment (no torchrun inside Slurm).

What happens to a job (each step leaves an event in `<run dir>/events.jsonl`):
  USR2 (Slurm's notice `signal_delay_s` before the time limit, or a preemption notice): the trainer's
  PreemptionWatcher sets a flag, all ranks stop after the same step and save; rank 0 then hands the
  stop to submitit, which calls `SlurmTrain.checkpoint` and requeues the job (at most
  MAX_TIMEOUT_REQUEUES time-outs). The next attempt resumes from the newest complete checkpoint.
  TERM (scancel, or a preemption that Slurm requeues by itself): save if there is time, exit; titan does
  not requeue, so a user's scancel ends the run.
  A crash (an exception, an OOM kill): srun ends the other ranks (--kill-on-bad-exit) and the batch
  script's teardown (`titan.launch.attempt end`) requeues the job, up to cluster.max_retries times.
Each attempt begins with `titan.launch.attempt begin`, which moves the previous attempt's logs to
`restarts/`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan.config.errors import ConfigError
from titan.config.schema import RunConfig
from titan.launch import jobstate
from titan.launch.snapshot import snapshot_code

# submitit's max_num_timeout: requeues after a time-out USR2 before the job gives up (preemptions that
# come well before the time limit are not counted; with time_min <= 10 every USR2 counts). 100 chunks
# of a 24-hour limit is three months: enough for a real run, finite for a job that cannot progress.
MAX_TIMEOUT_REQUEUES = 100


# ---- before submitting: checks with the fix in each message ------------------------------------------


def _partitions() -> dict[str, dict]:
    """Each partition's nodes, most CPUs, memory (MB) and GPUs on one node, and whether it is the default."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(
            f"cannot list Slurm partitions with sinfo ({e}); is Slurm's client configured?"
        ) from e
    parts: dict[str, dict] = {}
    for line in out.splitlines():
        name, node, cpus, mem_mb, gres = line.split("|")
        p = parts.setdefault(name.rstrip("*"), {"nodes": set(), "default": name.endswith("*")})
        p["nodes"].add(node)
        for key, value in (("cpus", cpus), ("mem_mb", mem_mb), ("gpus", _gpus_in_gres(gres))):
            p[key] = max(p.get(key, 0), int(str(value).rstrip("+")))  # "8+": at least 8
    return parts


def _gpus_in_gres(gres: str) -> int:
    """'gpu:8', 'gpu:h100:8(S:0-1)', 'gpu:a100:4,shard:8' -> GPUs; '(null)' -> 0."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def preflight(cfg: RunConfig, run_dir: Path) -> None:
    """Raise ConfigError (all problems at once) before anything is written or submitted."""
    c = cfg.cluster
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "cluster=slurm needs Slurm's `sbatch` on PATH: run on a login node of the cluster (or load its "
            "Slurm module); without Slurm use cluster=local, or torchrun --nnodes for several machines"
        )
    errors = []
    for key, minimum in (("time_min", 1), ("gpus_per_node", 0), ("max_retries", 0), ("max_concurrent", 0)):
        if getattr(c, key) < minimum:
            errors.append(f"cluster.{key}={getattr(c, key)} must be >= {minimum}")
    if c.signal_delay_s < 0 or c.signal_delay_s >= c.time_min * 60:
        errors.append(
            f"cluster.signal_delay_s={c.signal_delay_s} must be >= 0 and below cluster.time_min x 60 = "
            f"{c.time_min * 60} s, or USR2 comes at once"
        )
    parts = _partitions()
    default = next((n for n, p in parts.items() if p["default"]), None)
    name = c.partition or default
    if name not in parts:
        errors.append(
            f"cluster.partition={c.partition} is not a partition of this cluster; choose one of "
            f"{', '.join(sorted(parts))}" + (f" (default: {default})" if default else "")
        )
    else:
        p = parts[name]
        if c.nodes > len(p["nodes"]):
            errors.append(
                f"cluster.nodes={c.nodes} but partition {name} has {len(p['nodes'])} node(s); lower "
                f"cluster.nodes or choose another cluster.partition"
            )
        cpus = (c.cpus_per_task or 1) * c.nproc_per_node
        if cpus > p["cpus"]:  # Slurm would accept the job and keep it pending forever
            errors.append(
                f"cluster.cpus_per_task={c.cpus_per_task} x cluster.nproc_per_node={c.nproc_per_node} = {cpus} "
                f"CPUs per node, but the nodes of partition {name} have at most {p['cpus']}; lower either"
            )
        if c.mem_gb and c.mem_gb * 1024 > p["mem_mb"]:
            errors.append(
                f"cluster.mem_gb={c.mem_gb:g} but the nodes of partition {name} have at most "
                f"{p['mem_mb'] / 1024:.0f} GB; lower it (or leave it null for the partition's default)"
            )
        if c.gpus_per_node > p["gpus"]:  # only when GPUs are asked for: 0 always fits
            errors.append(
                f"cluster.gpus_per_node={c.gpus_per_node} but the nodes of partition {name} have at most "
                f"{p['gpus']} GPU(s); use cluster.gpus_per_node<={p['gpus']} (0 on a CPU-only partition) "
                "or another cluster.partition"
            )
    job = jobstate.current_job(jobstate.read(run_dir))
    live = jobstate.slurm_states([job]).get(job) if job else None
    if live in jobstate.QUEUED | jobstate.ACTIVE:  # two jobs writing one run directory would corrupt it
        errors.append(
            f"{run_dir} already belongs to job {job} ({live}); wait for it, `scancel {job}`, or choose "
            "another run.name"
        )
    if errors:
        raise ConfigError("cannot submit to Slurm:\n" + "\n".join(f"  - {e}" for e in errors))


# ---- submission -------------------------------------------------------------------------------------

# Jobs the next submission must wait for (`afterany`): a sweep launcher's way to cap the jobs running at
# once without a process that stays alive (see hydra_plugins/titan_launchers).
_AFTER: ContextVar[tuple[str, ...]] = ContextVar("titan_slurm_after", default=())


@contextlib.contextmanager
def start_after(job_ids: list[str]) -> Iterator[None]:
    token = _AFTER.set(tuple(job_ids))
    try:
        yield
    finally:
        _AFTER.reset(token)


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    run_dir: str
    log: str  # rank 0's stderr: titan's console log and any traceback

    def __str__(self) -> str:  # launch.py has logged the run directory already
        return f"submitted Slurm job {self.job_id}; follow it: tail -F {self.log}"


def sbatch_parameters(cfg: RunConfig, run_dir: Path, code: Path) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for a run (the sbatch script is `slurm/<job>_submission.sh`)."""
    c = cfg.cluster
    hooks = f"{shlex.quote(sys.executable)} -m titan.launch.attempt"
    run = shlex.quote(str(run_dir))
    extra: dict[str, Any] = {
        "requeue": True,  # Slurm may requeue it after a node failure; titan requeues it after a stop
        "output": str(run_dir / "slurm" / "%j_batch.log"),  # the batch script's own output, apart
        "error": str(run_dir / "slurm" / "%j_batch.log"),  # from the ranks' %j_<rank>_log.{out,err}
    }
    if _AFTER.get():
        extra["dependency"] = "afterany:" + ":".join(_AFTER.get())
    extra.update(dict(c.sbatch_args))
    params = {
        "job_name": f"titan-{cfg.run.group}-{cfg.run.name}"[:128],
        "nodes": c.nodes,
        "ntasks_per_node": c.nproc_per_node,
        "time": c.time_min,
        "signal_delay_s": c.signal_delay_s,
        "srun_args": ["--kill-on-bad-exit=1"],  # one rank's crash ends the others instead of a hang
        "setup": [
            *c.setup,
            # the snapshot first; PYTHONSAFEPATH (Python >= 3.11): `python -m` must not put the submit
            # directory (often the checkout) in front of it
            f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}} PYTHONSAFEPATH=1",
            f"{hooks} begin {run}",
        ],
        # $? is srun's status: the lines between it and this one are blank or comments
        "teardown": [f"{hooks} end {run} $? {c.max_retries}"],
        "additional_parameters": extra,
    }
    optional = {
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "cpus_per_task": c.cpus_per_task,
        "gpus_per_node": c.gpus_per_node or None,
        "mem": f"{c.mem_gb:g}G" if c.mem_gb else None,
        "constraint": c.constraint,
        "exclude": c.exclude,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def submit(cfg: RunConfig, run_dir: Path) -> SubmittedJob:
    """Submit the run as one job; returns without waiting for it to start."""
    import submitit

    run_dir = Path(run_dir).resolve()
    code = snapshot_code(run_dir / "code")
    executor = submitit.SlurmExecutor(folder=run_dir / "slurm", max_num_timeout=MAX_TIMEOUT_REQUEUES)
    executor.update_parameters(**sbatch_parameters(cfg, run_dir, code))
    try:
        job = executor.submit(SlurmTrain(cfg))
    except Exception as e:  # sbatch refused it (e.g. more CPUs or memory than a node has): its message
        raise ConfigError(f"sbatch refused the job: {e}") from e
    c = cfg.cluster
    jobstate.record(
        run_dir,
        "submitted",
        job_id=job.job_id,
        nodes=c.nodes,
        tasks_per_node=c.nproc_per_node,
        after=list(_AFTER.get()),
    )
    return SubmittedJob(job.job_id, str(run_dir), str(job.paths.stderr))


# ---- in the job -------------------------------------------------------------------------------------


class SlurmTrain:
    """What every Slurm task runs (pickled by submitit): this task's rank of the run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> dict:
        from submitit.core.utils import UncompletedJobError
        from submitit.helpers import TorchDistributedEnvironment

        from titan.train import trainer

        # MASTER_ADDR (the first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK. All
        # GPUs of the node stay visible: the trainer picks cuda:LOCAL_RANK.
        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        run_dir = Path(self.cfg.run.dir)
        try:
            result = trainer.run(self.cfg)
        except Exception as e:
            jobstate.record(run_dir, "crashed", rank=env.rank, reason=f"{type(e).__name__}: {e}")
            raise
        if env.rank != 0:
            return result
        if result.get("preempted") != "SIGUSR2":
            jobstate.record_result(run_dir, result)
            return result
        jobstate.record(run_dir, "requeued", step=result.get("step"), signal="SIGUSR2")
        try:  # the trainer's watcher gave USR2 back to submitit: checkpoint() + scontrol requeue + exit
            signal.raise_signal(signal.SIGUSR2)
        except UncompletedJobError as e:  # requeued too many times
            jobstate.record(run_dir, "failed", reason=str(e))
            raise
        return result

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook: the same call; the trainer resumes from the run dir's checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SlurmTrain(self.cfg))


def in_srun_task() -> bool:
    """Whether this process is a task of an `srun` step with several tasks (e.g. in an salloc session),
    and so one rank. An interactive shell that Slurm starts as a one-task step of a bigger allocation
    is not a rank: it counts the step's tasks, not the job's."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", 1)) >= 2


def export_srun_task_env() -> None:
    """Export this srun task's rank, world size and master address for torch.distributed."""
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # submitit reads Slurm's variables then
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
