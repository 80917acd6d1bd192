"""The model weights of a titan step directory, on one process: read one transformer block at a time
(memory stays near one block), or written as a model-only step 0 that runs of any layout start from.
"""

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from titan.checkpoint.format import (
    begin,
    commit,
    read_metadata,
    read_model_args,
    write_model_args,
    write_train_state,
)
from titan.models.llama.args import ModelArgs


def model_args_of(step: Path) -> ModelArgs:
    saved = read_model_args(step)
    if saved is None:
        raise FileNotFoundError(f"{step} has no model.json (the model's hyper-parameters); give --model")
    return ModelArgs(**saved)


def _block_of(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.", name)
    return m.group(0) if m else name


def iter_dcp_model(step: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The model weights of a DCP step directory, one transformer block (or top-level tensor) at a time."""
    saved = read_metadata(step).state_dict_metadata
    names = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    if not names:
        raise ValueError(f"{step} holds no model weights")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_block_of(name), []).append(name)
    for group in groups.values():
        state = {
            "model": {
                n: torch.empty(saved[f"model.{n}"].size, dtype=saved[f"model.{n}"].properties.dtype)
                for n in group
            }
        }
        with warnings.catch_warnings():  # that it runs in one process is the point, not news
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=step, no_dist=True)
        yield state["model"]


def read_dcp_model(step: Path) -> dict[str, torch.Tensor]:
    return {k: v for group in iter_dcp_model(step) for k, v in group.items()}


def write_dcp_model(out: Path, weights: dict[str, torch.Tensor], args: ModelArgs) -> Path:
    """A model-only titan step directory of step 0, committed as the trainer's saves are."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output")
    partial = begin(out)
    with warnings.catch_warnings():  # one process, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": weights}, checkpoint_id=partial, no_dist=True)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in weights.values()}
    train_state = {
        "step": 0,
        "tokens_seen": 0,
        "model_only": True,
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
    }
    write_train_state(partial, train_state)
    write_model_args(partial, args)
    commit(partial, out)
    return out
