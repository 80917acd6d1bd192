"""Configs and state as plain values: nested dicts and lists, and their dotted keys."""

import dataclasses
from typing import Any


def to_plain(obj: Any) -> Any:
    """Dataclasses, dicts, tuples and lists as plain dicts and lists (for YAML, JSON and comparisons)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    """The leaves of nested dicts under dotted keys: {"a": {"b": 1}} -> {"a.b": 1}.

    The names of config keys (`training.steps`) and of DCP's state-dict entries
    (`model.layers.0.attention.wq.weight`) alike.
    """
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
