"""Compose conf/ as launch.py does, for the tools that take launch.py's overrides."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from titan.config.schema import RunConfig
from titan.launch.build import build_run_config
from titan.launch.main import register

REPO = Path(__file__).resolve().parents[2]


def compose_run_config(
    overrides: list[str], conf: Path = REPO / "conf", sweeps: Path = REPO / "sweeps"
) -> RunConfig:
    """The RunConfig that `python launch.py <overrides>` would build (no run directory is made)."""
    register(sweeps)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # conf/ reads hydra's runtime values (the run dir)
        with open_dict(cfg):
            del cfg["hydra"]
        return build_run_config(cfg)
