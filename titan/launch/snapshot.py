"""The code a Slurm job runs: a copy of titan's Python sources taken at submission.

A job may wait in the queue for days and be requeued many times; if it imported titan from the
checkout, an edit (or a `git pull`) made meanwhile would change the code of a run that already
started. So the submitting process copies the package's `.py` files (not the bundled data) to
`<run dir>/code/`, and the batch script puts that folder first on PYTHONPATH. `git.txt` beside it
records the commit and diff they came from. Installed packages (torch, ...) are not copied: the job
uses the submitting Python environment.
"""

import shutil
from pathlib import Path

import titan


def _only_python(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))}


def snapshot_code(dest: Path) -> Path:
    """Copy the running titan package's sources to `dest/titan`; returns `dest` (for PYTHONPATH)."""
    dest = Path(dest)
    source = Path(titan.__file__).resolve().parent
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp / "titan", ignore=_only_python)
    shutil.rmtree(dest, ignore_errors=True)  # a new submission into this run dir brings its own code
    tmp.rename(dest)
    return dest
