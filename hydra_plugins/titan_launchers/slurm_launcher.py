"""`hydra/launcher=slurm`: every sweep point becomes its own Slurm job.

Each point runs launch.py's task function here, in the launching process (compose -> validate -> run
dir -> submit), so a point is submitted exactly as `cluster=slurm` submits a single run, into the
deterministic directory `<sweep dir>/<point's overrides>`. `cluster.max_concurrent` caps the sweep's
jobs running at once with Slurm dependencies (point i starts after point i - max_concurrent ended),
so nothing has to stay alive on the login node. `hydra.launcher.wait=true` waits for every job and
returns each point's final loss, for sweepers that optimize it.
"""

import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log

from hydra_plugins.titan_launchers._points import (
    SweepLauncher,
    describe,
    point_config,
    run_point,
    with_cluster,
)

FINAL = ("done", "failed", "cancelled", "incomplete")


class SlurmLauncher(SweepLauncher):
    def __init__(self, wait: bool = False, poll_s: float = 5.0) -> None:
        super().__init__()
        self.wait, self.poll_s = wait, poll_s
        self.job_ids: list[str] = []  # this sweep's jobs, in order (the max_concurrent chain spans batches)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from titan.launch.slurm import SubmittedJob, start_after

        self.start_sweep()
        chosen = self.config.hydra.runtime.choices.get("cluster")
        print(f"Submitting {len(job_overrides)} jobs to Slurm", flush=True)
        returns = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            overrides = with_cluster(overrides, "slurm", chosen, "slurm")
            config = point_config(self, overrides, idx)
            limit = config.cluster.max_concurrent
            after = [self.job_ids[-limit]] if limit and len(self.job_ids) >= limit else []
            with start_after(after):
                ret = run_point(self, config)
            if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, SubmittedJob):
                self.job_ids.append(ret._return_value.job_id)
                print(f"#{idx} {describe(overrides)}: job {ret._return_value.job_id}", flush=True)
            returns.append(ret)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if self.wait:
            self._wait(returns)
        return returns

    def _wait(self, returns: list[JobReturn]) -> None:
        """Replace each submitted point's return value by its final loss; failures become FAILED."""
        from titan.launch import jobstate
        from titan.launch.report import read_metrics

        waiting = {i: r._return_value for i, r in enumerate(returns) if r.status == JobStatus.COMPLETED}
        print(f"Waiting for {len(waiting)} jobs", flush=True)
        while waiting:
            slurm = jobstate.slurm_states([job.job_id for job in waiting.values()])
            for i, job in list(waiting.items()):
                state = jobstate.run_state(Path(job.run_dir), slurm)
                if state.state not in FINAL:
                    continue
                del waiting[i]
                records = read_metrics(Path(job.run_dir))
                if state.state == "done" and records:
                    returns[i].return_value = records[-1].get("loss")  # the run's last logged loss
                    print(f"job {job.job_id}: done, loss {returns[i].return_value!r}", flush=True)
                else:
                    print(f"job {job.job_id}: {state.state} ({state.reason})", flush=True)
                    returns[i].status = JobStatus.FAILED
                    returns[i].return_value = RuntimeError(
                        f"Slurm job {job.job_id} ({job.run_dir}) {state.state}: {state.reason or 'no result'}"
                    )
            if waiting:
                time.sleep(self.poll_s)
