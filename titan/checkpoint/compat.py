"""Whether a checkpoint fits the model (and optimizer) about to load it: every tensor's name and
global shape, and the model hyper-parameters it was saved with."""

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan.checkpoint.format import read_metadata, read_model_args
from titan.config.plain import flatten


def _shape(value: Any) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def compare_with_checkpoint(path: Path, state: dict, *, group=None) -> list[str]:
    """What differs between a state dict to load and a checkpoint's metadata, one line per tensor.

    Every tensor to load must be in the checkpoint with the same global shape, and the checkpoint
    must hold no model tensor that the model lacks (DCP would silently leave it out). With a process
    group the ranks pool what they hold (a pipeline stage holds some of the model) and all get the
    same answer.
    """
    saved = read_metadata(path).state_dict_metadata
    wanted = flatten(state)
    lines = []
    for key, value in wanted.items():
        if key not in saved:
            lines.append(f"{key}: not in the checkpoint")
        elif isinstance(value, torch.Tensor):
            meta = saved[key]
            if not isinstance(meta, TensorStorageMetadata):
                lines.append(f"{key}: the checkpoint holds a non-tensor value")
            elif list(meta.size) != _shape(value):
                lines.append(f"{key}: saved shape {list(meta.size)}, this run's {_shape(value)}")
    held = [key for key in wanted if key.startswith("model.")]
    if group is not None:
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (lines, held), group=group)
        lines = list(dict.fromkeys(line for rank_lines, _ in everyone for line in rank_lines))
        held = [key for _, rank_held in everyone for key in rank_held]
    if held:
        held_set = set(held)
        lines += [
            f"{key}: in the checkpoint, not in this model"
            for key in saved
            if key.startswith("model.") and key not in held_set
        ]
    return lines


def model_args_diff(path: Path, model) -> list[str]:
    """ModelArgs fields that differ from those the checkpoint was saved with (its model.json)."""
    args = getattr(model, "args", None)
    saved = read_model_args(path)
    if args is None or saved is None:
        return []
    current = dataclasses.asdict(args)
    return [
        f"model.{k}: saved {saved.get(k)!r}, this run {current.get(k)!r}"
        for k in current
        if saved.get(k) != current.get(k)
    ]
