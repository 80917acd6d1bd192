"""titan's checkpoints on disk: the names in a checkpoint folder, the files of a step directory, and
how a directory is committed.

Checkpoints live in `<run dir>/checkpoints` or in `checkpoint.folder` (a relative folder is taken
relative to the run dir). Every directory is written as `<name>.partial/` and renamed to `<name>/`
once all of it is on disk, so a directory named `step-N` is always complete: a crash mid-write leaves
only a `.partial` directory, which a resume skips with a warning.

Layout of one step directory:
  `*.distcp`, `.metadata`      model and optimizer (DCP; reshardable to any layout)
  `train_state.json`           step, tokens seen, LR schedule, whether the model is all it holds
  `model.json`                 the model's hyper-parameters (ModelArgs), for conversions
  `loader/stream-NNNNN.json`   each logical data stream's position
  `rng/rank-NNNNN.json`        each rank's torch RNG state
titan's own non-tensor state is JSON, so reading it never unpickles anything; DCP's `.metadata` file
and the optimizer's hyper-parameters inside DCP are pickles: load checkpoints only from sources you
trust. Beside the step directories, `hf-step-N/` is a Hugging Face export of step N.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader

from titan.files import fsync_dir, write_atomic

log = logging.getLogger("titan")

PARTIAL_SUFFIX = ".partial"
# A directory being replaced or purged is renamed first, so a crash mid-delete never leaves a
# damaged `step-N`; what such a crash leaves is deleted with the next purge.
PURGING_SUFFIX = ".purging"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL_DIR = re.compile(r"^step-(\d+)\.partial$")


def checkpoint_folder(run_dir: Path | str, folder: str | None) -> Path:
    """`checkpoint.folder`, or `<run dir>/checkpoints`; a relative folder is relative to the run dir."""
    if not folder:
        return Path(run_dir) / "checkpoints"
    return Path(run_dir) / folder if not Path(folder).is_absolute() else Path(folder)


def step_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step}"


def hf_dir(folder: Path, step: int) -> Path:
    """Where the Hugging Face export of a run's final step goes."""
    return Path(folder) / f"hf-step-{step}"


def partial_dir(final: Path) -> Path:
    """The directory that becomes `final` once committed."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def scan(folder: Path) -> tuple[list[int], dict[int, Path]]:
    """(complete steps ascending, {step: its interrupted `.partial` directory})."""
    if not Path(folder).is_dir():
        return [], {}
    steps, partial = [], {}
    for entry in Path(folder).iterdir():
        if m := _PARTIAL_DIR.match(entry.name):
            partial[int(m.group(1))] = entry
        elif (m := _STEP_DIR.match(entry.name)) and entry.is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps), dict(sorted(partial.items()))


def complete_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending. Warns about partial (interrupted) saves."""
    steps, partial = scan(folder)
    for entry in partial.values():
        log.warning("skipping incomplete checkpoint %s (a save that did not finish)", entry)
    return steps


def begin(final: Path) -> Path:
    """An empty `.partial` directory to write `final` into (what an interrupted write left is removed)."""
    partial = partial_dir(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def set_aside(path: Path) -> Path:
    """Rename a directory to `*.purging` (instant), for deletion later; returns the new path."""
    aside = path.with_name(path.name + PURGING_SUFFIX)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def commit(partial: Path, final: Path) -> Path | None:
    """Rename a completely written `.partial` directory to `final`, durably. A `final` that exists
    (a re-save of the same step, a repeated export) is set aside first; returns where it went."""
    aside = set_aside(final) if final.exists() else None
    os.replace(partial, final)
    fsync_dir(final.parent)
    return aside


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj))


def write_train_state(step: Path, state: dict) -> None:
    _write_json(Path(step) / "train_state.json", state)


def read_train_state(step: Path) -> dict:
    return json.loads((Path(step) / "train_state.json").read_text())


def write_model_args(step: Path, args: Any) -> None:
    """`model.json`: the fields of a model's hyper-parameter dataclass."""
    _write_json(Path(step) / "model.json", dataclasses.asdict(args))


def read_model_args(step: Path) -> dict | None:
    """The fields in `model.json`, or None when the step directory has none."""
    file = Path(step) / "model.json"
    return json.loads(file.read_text()) if file.is_file() else None


def write_loader_state(step: Path, stream: str, state: dict) -> None:
    _write_json(Path(step) / "loader" / f"{stream}.json", state)


def read_loader_states(step: Path) -> dict[str, dict]:
    """{stream name: its position} of every data stream saved."""
    return {p.stem: json.loads(p.read_text()) for p in (Path(step) / "loader").glob("stream-*.json")}


def write_rng_state(step: Path, rank: int, state: dict) -> None:
    _write_json(Path(step) / "rng" / f"rank-{rank:05d}.json", state)


def read_rng_state(step: Path, rank: int) -> dict | None:
    """A rank's RNG state, or None (resuming on more ranks than saved, and in seeds)."""
    file = Path(step) / "rng" / f"rank-{rank:05d}.json"
    return json.loads(file.read_text()) if file.exists() else None


def read_metadata(step: Path):
    """DCP's metadata of a step directory (a pickle: see the module docstring)."""
    if not (Path(step) / ".metadata").is_file():
        raise FileNotFoundError(f"{step} has no .metadata file")
    return FileSystemReader(str(step)).read_metadata()
