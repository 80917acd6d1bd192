"""What both launchers do per sweep point: compose its config and run launch.py's task function here.

(A module whose name starts with "_" is not scanned by Hydra's plugin discovery.)
"""

from collections.abc import Sequence

from hydra.core.utils import JobReturn, filter_overrides, run_job
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict


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
