"""`hydra/launcher=local`: the sweep's points one after another on this machine (cluster=local).

Hydra's basic launcher does the same; this one also refuses cluster=slurm (which would submit each
point) and ends with one line per point: its final loss or why it failed.
"""

from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log

from hydra_plugins.titan_launchers._points import SweepLauncher, describe, point_config, run_point


class LocalLauncher(SweepLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.start_sweep()
        if self.config.hydra.runtime.choices.get("cluster") == "slurm":
            raise ValueError("hydra/launcher=local runs points on this machine: drop cluster=slurm")
        returns = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            print(f"#{idx} {describe(overrides)}", flush=True)
            returns.append(run_point(self, point_config(self, overrides, idx)))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for idx, (overrides, ret) in enumerate(zip(job_overrides, returns), initial_job_idx):
            ok = ret.status == JobStatus.COMPLETED
            outcome = f"loss {ret._return_value}" if ok else f"failed: {ret._return_value}"
            print(f"#{idx} {describe(overrides)}: {outcome}", flush=True)
        return returns
