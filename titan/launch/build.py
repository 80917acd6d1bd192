"""From a composed Hydra config to one frozen RunConfig, with a one-line error naming the key.

This module and launch/main.py are the only places that see a DictConfig. There is no `_target_` and
no `instantiate`: the schema is the type, so a config can only ever build RunConfig.
"""

import dataclasses
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from titan.config.errors import ConfigError
from titan.config.schema import RunConfig
from titan.launch.safety import INSTANTIATE_KEYS
from titan.launch.schemas import writable_schema


def build_run_config(cfg: DictConfig) -> RunConfig:
    try:
        # Composed from conf/train.yaml the config is typed already; a saved config.yaml started as a
        # primary config is not, and merging it onto the schema checks it the same way.
        _refuse_instantiate_keys(OmegaConf.to_container(cfg, resolve=False))
        typed = OmegaConf.merge(writable_schema(RunConfig), cfg)
        _refuse_unknown_keys(typed, RunConfig)
        return _tuples(OmegaConf.to_object(typed))
    except OmegaConfBaseException as e:
        raise ConfigError(describe_config_error(e)) from e
    except ValueError as e:  # a dataclass's own check (ModelArgs' shape rules)
        raise ConfigError(str(e)) from e


def _refuse_instantiate_keys(node: Any, prefix: str = "") -> None:
    """Also where a field takes any value (cluster.sbatch_args): nothing built from a config names code."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if key in INSTANTIATE_KEYS:
            raise ConfigError(f"{prefix}{key}: names code to run; a titan config holds values only")
        _refuse_instantiate_keys(value, f"{prefix}{key}.")


def _refuse_unknown_keys(node: DictConfig, cls: type, prefix: str = "") -> None:
    """Keys added with `+group.key=...` pass composition (Hydra opens the node to append them)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: no such key; valid keys of {prefix.rstrip('.') or 'the config'}: "
                f"{', '.join(fields)}"
            )
        child_type = get_type_hints(cls)[key]
        if dataclasses.is_dataclass(child_type):
            _refuse_unknown_keys(node[key], child_type, f"{prefix}{key}.")


def describe_config_error(e: OmegaConfBaseException) -> str:
    """OmegaConf's error as one line that names the key: its messages carry the key on a later line."""
    key = getattr(e, "full_key", None) or "config"
    if isinstance(e, MissingMandatoryValue):
        return f"{key} must be set (e.g. {key}=...)"
    message = str(getattr(e, "msg", None) or e).splitlines()[0].rstrip(".")
    schema = getattr(e, "object_type", None)
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(schema):
        group = key.rpartition(".")[0] or "the config"
        message += f"; valid keys of {group}: {', '.join(f.name for f in dataclasses.fields(schema))}"
    return f"{key}: {message}"


def _tuples(obj: Any) -> Any:
    """OmegaConf gives lists where the frozen dataclasses hold tuples (hashable, comparable)."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            changes[f.name] = tuple(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _tuples(value)
    return dataclasses.replace(obj, **changes) if changes else obj
