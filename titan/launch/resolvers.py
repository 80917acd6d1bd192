"""OmegaConf resolvers used by conf/: bundled asset paths, deterministic run names and groups."""

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from titan.assets import asset_path
from titan.launch.rundir import run_name_from_overrides


def run_group() -> str:
    """The experiment's name when one is chosen, else the model's."""
    choices = HydraConfig.get().runtime.choices
    return choices.get("experiment") or choices.get("model") or "default"


def first_set(*values):
    return next((v for v in values if v is not None), None)


def register() -> None:
    OmegaConf.register_new_resolver("titan_asset", lambda rel: str(asset_path(rel)), replace=True)
    OmegaConf.register_new_resolver("titan_run_name", run_name_from_overrides, replace=True)
    OmegaConf.register_new_resolver("titan_run_group", run_group, replace=True)
    OmegaConf.register_new_resolver("titan_first_set", first_set, replace=True)
