"""Distributed checkpoints (DCP) of a run, committed atomically, found again by scanning.

A save writes `checkpoints/step-N.partial/` and rank 0 renames it to `checkpoints/step-N/` once every
rank has finished, so a directory named `step-N` is always complete: a crash mid-save leaves only a
`.partial` directory, which resume skips with a warning.

Layout of one step directory:
  `*.distcp`, `.metadata`      model and optimizer (DCP; reshardable to any layout)
  `train_state.json`           step, tokens seen, LR schedule (rank 0)
  `loader/stream-NNNNN.json`   each logical data stream's position (written by the rank that owns it)
  `rng/rank-NNNNN.json`        each rank's torch RNG state
Non-tensor state is JSON so that loading it never unpickles anything. DCP's own `.metadata` file is
a pickle: load checkpoints only from sources you trust.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from titan.config.schema import CheckpointConfig

log = logging.getLogger("titan")

_STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_SUFFIX = ".partial"


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step}"


def complete_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending. Warns about partial (interrupted) saves."""
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        if entry.name.endswith(PARTIAL_SUFFIX):
            log.warning("skipping incomplete checkpoint %s (a save that did not finish)", entry)
        elif (m := _STEP_DIR.match(entry.name)) and entry.is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class Checkpointer:
    """Saves and restores model, optimizer, LR schedule, data loader, train state and RNG.

    The trainer calls `load()` once before training, `maybe_save()` after every step, `save()` when it
    must stop early (preemption), and `close()` at the end.
    """

    def __init__(
        self, cfg: CheckpointConfig, run_dir: Path, *, model_parts: list, optimizer, scheduler, loader
    ) -> None:
        self.cfg = cfg
        self.folder = Path(cfg.folder) if cfg.folder else Path(run_dir) / "checkpoints"
        self.model = model_parts[0]  # one part per rank until pipeline stages come
        self.optimizer, self.scheduler, self.loader = optimizer, scheduler, loader
        self.rank = dist.get_rank()

    def maybe_save(self, step: int, train_state: dict, *, last: bool) -> None:
        if self.cfg.enable and (last or step % self.cfg.interval == 0):
            self.save(step, train_state)

    def save(self, step: int, train_state: dict) -> Path:
        final = step_dir(self.folder, step)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted save of this step
            partial.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=partial)
        for name, state in self.loader.state_dict().items():
            _write_json(partial / "loader" / f"{name}.json", state)
        _write_json(partial / "rng" / f"rank-{self.rank:05d}.json", _rng_state())
        if self.rank == 0:
            _write_json(
                partial / "train_state.json", {**train_state, "scheduler": self.scheduler.state_dict()}
            )
        dist.barrier()
        if self.rank == 0:
            if final.exists():  # a re-save of the same step (e.g. after a resume that did no step)
                shutil.rmtree(final)
            os.replace(partial, final)
        dist.barrier()
        log.info("saved checkpoint %s", final)
        return final

    def load(self) -> dict | None:
        """Restore the newest complete checkpoint; returns its train state, or None to start fresh."""
        steps = complete_steps(self.folder)
        if not steps:
            return None
        path = step_dir(self.folder, steps[-1])
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP's errors do not name the checkpoint
            raise RuntimeError(
                f"cannot load checkpoint {path}: {e}\nIf it is damaged or from another model, pick an "
                f"older one with checkpoint.load_step=<N> or start afresh with run.resume=never in a new run.name"
            ) from e
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        self.loader.load_state_dict(
            {p.stem: json.loads(p.read_text()) for p in (path / "loader").glob("stream-*.json")}
        )
        rng_file = path / "rng" / f"rank-{self.rank:05d}.json"
        if rng_file.exists():  # absent when resuming on more ranks than saved
            _set_rng_state(json.loads(rng_file.read_text()))
        train_state = json.loads((path / "train_state.json").read_text())
        self.scheduler.load_state_dict(train_state.pop("scheduler"))
        log.info("resumed from checkpoint %s", path)
        return train_state

    def close(self) -> None:
        """Wait for saves in flight (none while saving is synchronous)."""
