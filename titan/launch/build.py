"""From a composed Hydra config to one frozen RunConfig: target allow-list, key check, instantiate.

This module and launch.py are the only places that see a DictConfig.
"""

import dataclasses
import importlib
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from titan.config.errors import ConfigError
from titan.config.schema import RunConfig

# A config may only build titan's own objects and torch optimizers: a YAML file or an override must
# not be able to run arbitrary code through `_target_`.
ALLOWED_TARGETS = ("titan.", "torch.optim.")
GROUPS = tuple(f.name for f in dataclasses.fields(RunConfig))


def _import_target(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _check_node(group: str, node: DictConfig) -> None:
    target = node.get("_target_")
    if target is None:
        raise ConfigError(f"config group '{group}' has no _target_; every group node names a titan dataclass")
    if not str(target).startswith(ALLOWED_TARGETS):
        raise ConfigError(
            f"{group}._target_={target} is not allowed: targets must start with one of {ALLOWED_TARGETS}"
        )
    cls = _import_target(str(target))
    if dataclasses.is_dataclass(cls):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in node.keys() if not str(k).startswith("_") and k not in fields)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}; valid keys of {group}: "
                f"{', '.join(sorted(fields))}"
            )


def build_run_config(cfg: DictConfig) -> RunConfig:
    missing = [g for g in GROUPS if g not in cfg]
    if missing:
        raise ConfigError(f"the config lacks the group(s) {missing}; compose from conf/train.yaml")
    extra = sorted(k for k in cfg.keys() if k not in GROUPS and k != "hydra")
    if extra:
        raise ConfigError(f"unknown top-level key(s) {extra}; valid: {', '.join(GROUPS)}")
    groups = {}
    for group in GROUPS:
        node = cfg[group]
        _check_node(group, node)
        missing_values = [k for k in node.keys() if OmegaConf.is_missing(node, k)]
        if missing_values:
            raise ConfigError(
                f"{', '.join(f'{group}.{k}' for k in missing_values)} must be set (e.g. {group}.{missing_values[0]}=...)"
            )
        try:
            obj = instantiate(node, _convert_="all")
        except InstantiationException as e:  # the dataclass's own check (e.g. ModelArgs) failed
            raise ConfigError(str(e.__cause__ or e)) from e
        groups[group] = _tuples(obj)
    return RunConfig(**groups)


def _tuples(obj: Any) -> Any:
    """YAML gives lists; the frozen dataclasses hold tuples so they stay hashable and comparable."""
    changes = {
        f.name: tuple(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if isinstance(getattr(obj, f.name), list)
    }
    return dataclasses.replace(obj, **changes) if changes else obj
