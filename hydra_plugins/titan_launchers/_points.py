"""What both launchers do per sweep point: compose its config and run launch.py's task function here.

(A module whose name starts with "_" is not scanned by Hydra's plugin discovery.)
"""

from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict


class SweepLauncher(Launcher):
    """What titan's launchers share: Hydra's setup, and the sweep directory made before any point."""

    def __init__(self) -> None:
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def start_sweep(self) -> None:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)


def with_cluster(overrides: Sequence[str], cluster: str, chosen: str | None, launcher: str) -> list[str]:
    """The point's overrides with `cluster=<cluster>` (the launcher decides where points run)."""
    given = [o for o in overrides if o.split("=")[0].lstrip("+~") == "cluster"]
    if given and given[-1] != f"cluster={cluster}":
        raise ValueError(f"hydra/launcher={launcher} runs points with cluster={cluster}; drop {given[-1]}")
    return list(overrides) if given or chosen == cluster else [*overrides, f"cluster={cluster}"]


def point_config(launcher: Launcher, overrides: Sequence[str], idx: int) -> DictConfig:
    """The point's composed config, numbered as Hydra's basic launcher numbers it."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config):
        config.hydra.job.id = idx
        config.hydra.job.num = idx
    return config


def run_point(launcher: Launcher, config: DictConfig) -> JobReturn:
    """launch.py's task function on the point's config, in `<sweep dir>/<point name>`."""
    return run_job(
        hydra_context=launcher.hydra_context,
        task_function=launcher.task_function,
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def describe(overrides: Sequence[str]) -> str:
    return " ".join(filter_overrides(overrides))
