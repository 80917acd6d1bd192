"""RunConfig's classes as Hydra schemas: the root of conf/train.yaml, and `base` in each config group.

Every option in conf/<group>/ starts from its group's `base` (`defaults: [base, _self_]`) and states
only what differs, so each default lives once, in titan/config/schema.py, and Hydra checks every
value's type and key while it composes.
"""

import dataclasses
from typing import get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from titan.config.schema import RunConfig

ROOT_SCHEMA = "titan_schema"
GROUP_SCHEMA = "base"
# The config groups: RunConfig's dataclass fields (a plain value such as `dry_run` is a key, not a group).
GROUP_TYPES = {name: cls for name, cls in get_type_hints(RunConfig).items() if dataclasses.is_dataclass(cls)}


def writable_schema(cls: type) -> DictConfig:
    """`OmegaConf.structured(cls)` that Hydra can merge options into.

    The classes are frozen, and OmegaConf marks every node of a frozen dataclass read-only (each
    node on its own, so clearing the root is not enough): composing onto them would fail with
    ReadonlyConfigError.
    """
    node = OmegaConf.structured(cls)
    _clear_readonly(node)
    return node


def _clear_readonly(node: DictConfig | ListConfig) -> None:
    OmegaConf.set_readonly(node, None)
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node._get_node(key)  # the node itself: item access would resolve or raise on "???"
        if isinstance(child, (DictConfig, ListConfig)):
            _clear_readonly(child)


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name=ROOT_SCHEMA, node=writable_schema(RunConfig))
    for group, cls in GROUP_TYPES.items():
        store.store(group=group, name=GROUP_SCHEMA, node=writable_schema(cls))
