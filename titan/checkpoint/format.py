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
trust. Beside the step directories, `hf-step-N/` is a Hugging Face export of step N, and `owner.json`
names the run the folder belongs to: another run refuses the folder (it would resume that run's
state and purge its checkpoints).
"""

from __future__ import annotations

import contextlib
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
# damaged `step-N`; what such a crash leaves is deleted when the run next starts or purges.
PURGING_SUFFIX = ".purging"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL_DIR = re.compile(r"^step-(\d+)\.partial$")
OWNER_FILE = "owner.json"


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


def read_owner(folder: Path) -> dict | None:
    """The folder's owner mark, {"run_dir": ..., "saved": whether a checkpoint was ever committed
    there}, or None when it has none. A mark that names no run raises ValueError."""
    file = Path(folder) / OWNER_FILE
    try:
        owner = json.loads(file.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not JSON ({e}): fix it or remove it") from e
    if not isinstance(owner, dict) or not isinstance(owner.get("run_dir"), str):
        raise ValueError(f'{file} names no run (expected {{"run_dir": "..."}}): fix it or remove it')
    return owner


def owner_problem(folder: Path, run_dir: Path) -> str | None:
    """Why `folder` may not hold `run_dir`'s checkpoints, or None.

    A folder belongs to the run its owner file names. One inside the run dir is that run's whatever
    its mark says: a run dir copied or moved takes its checkpoints along (and an older titan left no
    mark). An unmarked folder elsewhere is free while it holds no checkpoint.
    """
    folder, run_dir = Path(folder).resolve(), Path(run_dir).resolve()
    if folder.is_relative_to(run_dir):
        return None
    owner = read_owner(folder)
    if owner is not None and owner["run_dir"] == str(run_dir):
        return None
    steps = scan(folder).steps
    if owner is None and not steps:
        return None
    own = "give this run a folder of its own (another checkpoint.folder, or none for <run dir>/checkpoints)"
    mark = folder / OWNER_FILE
    if owner is None:
        return (
            f"checkpoint.folder {folder} holds checkpoints (steps {steps}) but no {OWNER_FILE} naming the run "
            f'they belong to: if they are this run\'s, write {{"run_dir": "{run_dir}"}} to {mark}; '
            f"otherwise {own}"
        )
    start = (
        f"; to start from its weights, set checkpoint.initial_load_path={folder}/step-{steps[-1]}"
        if steps
        else ""
    )
    return (
        f"checkpoint.folder {folder} belongs to another run, {owner['run_dir']} (named in {mark}): {own}{start}; "
        f"if that run's directory was moved here, write this one in {mark}"
    )


def claim(folder: Path, run_dir: Path, *, saved: bool) -> bool:
    """Mark `folder` as `run_dir`'s, noting whether a checkpoint was ever committed there (`saved`, or
    an earlier mark saying so); returns that. Raises ValueError when the folder is another run's."""
    problem = owner_problem(folder, run_dir)
    if problem:
        raise ValueError(problem)
    owner = read_owner(folder) or {}
    mark = {"run_dir": str(Path(run_dir).resolve()), "saved": bool(saved or owner.get("saved"))}
    if owner != mark:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(folder) / OWNER_FILE, json.dumps(mark))
    return mark["saved"]


@dataclasses.dataclass
class Contents:
    """What a checkpoint folder holds (see `scan`)."""

    steps: list[int]  # complete checkpoints, ascending
    partial: dict[int, Path]  # interrupted saves, by step
    broken: dict[int, Path]  # `step-N` entries that are not directories: a dangling symlink, a file
    purging: list[Path]  # set aside for deletion


def scan(folder: Path) -> Contents:
    """The checkpoints in `folder` (none when it does not exist). A folder that cannot be read raises
    (PermissionError): that is not the same as holding no checkpoint."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except (FileNotFoundError, NotADirectoryError):
        return Contents([], {}, {}, [])
    found = Contents([], {}, {}, [])
    for entry in entries:
        if m := _PARTIAL_DIR.match(entry.name):
            found.partial[int(m.group(1))] = Path(entry.path)
        elif m := _STEP_DIR.match(entry.name):
            if entry.is_dir():  # follows a symlink
                found.steps.append(int(m.group(1)))
            else:
                found.broken[int(m.group(1))] = Path(entry.path)
        elif entry.name.endswith(PURGING_SUFFIX):
            found.purging.append(Path(entry.path))
    found.steps.sort()
    found.partial = dict(sorted(found.partial.items()))
    found.broken = dict(sorted(found.broken.items()))
    return found


def describe_broken(path: Path) -> str:
    """What a `step-N` entry that is no checkpoint is instead ("<path> is <this>")."""
    if path.is_symlink():
        return f"a symlink to {os.readlink(path)}, which is not a directory (missing, or not mounted)"
    return "not a directory"


def complete_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending. Warns about partial (interrupted) saves and
    `step-N` entries that are not checkpoints."""
    found = scan(folder)
    warn_skipped(found)
    return found.steps


def warn_skipped(found: Contents) -> None:
    """A warning for each entry a resume skips: partial saves, `step-N` entries that are no checkpoint."""
    for entry in found.partial.values():
        log.warning("skipping incomplete checkpoint %s (a save that did not finish)", entry)
    for entry in found.broken.values():
        log.warning("skipping %s: it is %s, not a checkpoint", entry, describe_broken(entry))


def begin(final: Path) -> Path:
    """An empty `.partial` directory to write `final` into (what an interrupted write left is removed)."""
    partial = partial_dir(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def remove(path: Path) -> None:
    """Delete a directory tree, or a symlink or file (a dangling `step-N` link that was set aside: the
    link goes, never what it points to). Errors are ignored: this is housekeeping."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Rename a directory (or a link) to `*.purging` (instant), for deletion later; returns the new path."""
    aside = path.with_name(path.name + PURGING_SUFFIX)
    remove(aside)
    os.replace(path, aside)
    return aside


def commit(partial: Path, final: Path) -> Path | None:
    """Rename a completely written `.partial` directory to `final`, durably. A `final` that exists
    (a re-save of the same step, a repeated export, a dangling link) is set aside first; returns where
    it went."""
    aside = set_aside(final) if final.is_symlink() or final.exists() else None
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
