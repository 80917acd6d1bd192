"""Compose conf/ through Hydra's Compose API, as launch.py would (with the runtime `hydra:` node)."""

import os

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from titan.launch.main import register

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(REPO, "conf")
SWEEPS = register(os.path.join(REPO, "sweeps"))


def compose_config(overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg


def group_options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))
