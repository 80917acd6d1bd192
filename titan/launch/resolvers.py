"""OmegaConf resolvers used by conf/: bundled asset paths, deterministic run names and groups."""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from titan.assets import asset_path
from titan.config.plain import flatten
from titan.launch.identity import identity_of, run_name


def run_group() -> str:
    """The experiment's name when one is chosen, else the model's."""
    choices = HydraConfig.get().runtime.choices
    return choices.get("experiment") or choices.get("model") or "default"


def name_of_run(*, _root_: DictConfig) -> str:
    """run.name: from the run's identity (launch/identity.py), so a launch of the same run finds its
    directory again whatever else changed."""
    hydra = HydraConfig.get()
    in_sweep = hydra.mode == RunMode.MULTIRUN
    config = {k: v for k, v in OmegaConf.to_container(_root_, resolve=False).items() if k != "hydra"}
    group_dir = Path(str(_root_.run.root)) / str(_root_.run.group)
    existing = [p.name for p in group_dir.iterdir()] if not in_sweep and group_dir.is_dir() else []
    return run_name(hydra.overrides.task, identity_of(flatten(config)), existing, in_sweep)


def first_set(*values):
    return next((v for v in values if v is not None), None)


def register() -> None:
    OmegaConf.register_new_resolver("titan_asset", lambda rel: str(asset_path(rel)), replace=True)
    OmegaConf.register_new_resolver("titan_run_name", name_of_run, replace=True)
    OmegaConf.register_new_resolver("titan_run_group", run_group, replace=True)
    OmegaConf.register_new_resolver("titan_first_set", first_set, replace=True)
