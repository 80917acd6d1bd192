"""The run directory: resume policy, provenance files, and per-rank logs."""

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from titan.checkpoint.format import (
    checkpoint_folder,
    describe_broken,
    owner_problem,
    read_owner,
    scan,
    warn_skipped,
)
from titan.config.errors import ConfigError
from titan.config.plain import flatten, to_plain
from titan.config.schema import RunConfig
from titan.files import write_atomic
from titan.launch.identity import is_identity_key, with_absolute_paths
from titan.launch.report import read_metrics
from titan.launch.safety import SECRET_NAME

log = logging.getLogger("titan")

# env.txt records only the variables that shape how a run executes (an allow-list: a deny-list of
# secret-looking names lets DATABASE_URL, *_PASSWD or GITHUB_PAT through), and of those none whose name
# looks like a secret.
REPRODUCIBILITY_ENV = re.compile(
    r"^(CUDA|NCCL|TORCH|PYTORCH|OMP|MKL|KMP|GLOO|SLURM|SUBMITIT|PYTHON|TITAN|HYDRA|TRITON|NVIDIA|CUBLAS|CUDNN)"
    r"|^(MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|ROLE_RANK"
    r"|TORCHELASTIC_RUN_ID|LD_LIBRARY_PATH|PATH|VIRTUAL_ENV|CONDA_PREFIX|HOSTNAME|TZ|LANG|LC_ALL)$"
)
DEFAULTS = flatten(to_plain(RunConfig()))


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each key whose value differs.

    A config saved by an older titan may name classes in `_target_` keys and lack keys added since:
    `_target_` keys are not compared, and a key the saved config lacks is unchanged when its new
    value is the key's default, so adding a key never blocks resuming an older run. `hydra.*` (the
    saved config's own run dir pattern) is not part of the run.
    """
    a, b = with_absolute_paths(flatten(saved)), with_absolute_paths(flatten(new))
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if key.startswith("hydra.") or key.rpartition(".")[2] == "_target_" or a.get(key) == b.get(key):
            continue
        if key not in a and key in DEFAULTS and b[key] == DEFAULTS[key]:
            continue
        changes.append((key, a.get(key), b.get(key)))
    return changes


class ResumeRefused(ValueError):
    pass


def check_resume(run_dir: Path, config: dict, resume: str) -> int | None:
    """Apply `run.resume` to a run dir; returns the step to resume from, or None for a fresh start.

    Refused first: a checkpoint folder that is another run's, unreadable, or has lost what the run
    saved (`_checkpoints`); a run dir or (when the run saves) checkpoint folder it cannot write.
    """
    checkpoint = config.get("checkpoint") or {}
    folder = checkpoint_folder(run_dir, checkpoint.get("folder"))
    steps = _checkpoints(run_dir, folder, resume)
    if resume == "never" and steps:
        raise ResumeRefused(
            f"{folder} already holds checkpoints (steps {steps}) and run.resume=never; "
            f"choose another run.name, delete the directory, or use run.resume=auto"
        )
    if resume == "must" and not steps:
        raise ResumeRefused(f"run.resume=must but {folder} holds no complete checkpoint to resume from")
    _check_writable(run_dir, "run.root")
    if checkpoint.get("enable", True):
        _check_writable(folder, "checkpoint.folder")
    if not steps:
        return None
    saved_file = run_dir / "config.yaml"
    if saved_file.exists():
        changes = config_changes(yaml.safe_load(saved_file.read_text()), config)
        refused = [c for c in changes if is_identity_key(c[0])]  # all else may change (identity.py)
        if refused:
            diff = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in refused)
            raise ResumeRefused(
                f"{run_dir} holds a checkpoint of a run with another configuration:\n{diff}\n"
                "Resume with the saved values, or start a new run with another run.name (run.resume=never "
                "refuses a folder that holds checkpoints)."
            )
        for key, old, new in changes:
            log.info("resuming with a changed setting: %s: %r -> %r", key, old, new)
    return checkpoint["load_step"] if checkpoint.get("load_step") is not None else steps[-1]


def _checkpoints(run_dir: Path, folder: Path, resume: str) -> list[int]:
    """The complete steps in `folder`, once it is known to be this run's and to hold what the run saved.

    Refused instead of starting again from step 0 (and dropping the logged steps from metrics.jsonl):
    a folder that cannot be read, a newest `step-N` that is a dangling symlink, and a folder that lost
    the checkpoints of a run that logged steps. Whether there were any: the folder's owner mark says
    so, or else (a folder emptied or gone with its mark) the last launch's checkpoint.enable.
    `run.resume=never` is the explicit way to start again.
    """
    try:
        problem = owner_problem(folder, run_dir)
        found, owner = scan(folder), read_owner(folder)
    except OSError as e:
        raise ResumeRefused(
            f"cannot read the checkpoint folder {folder} ({e.strerror or e}): make it readable by this user, "
            "or set checkpoint.folder to another place"
        ) from e
    except ValueError as e:  # an owner mark that names no run
        raise ResumeRefused(str(e)) from e
    if problem:
        raise ResumeRefused(problem)
    steps = found.steps
    dangling = [p for s, p in found.broken.items() if not steps or s > steps[-1]]
    if dangling and resume != "never":
        older = (
            f"to resume from step {steps[-1]}"
            if steps
            else "and start again from step 0 with run.resume=never"
        )
        link = dangling[-1]
        raise ResumeRefused(f"{link} is {describe_broken(link)}: restore it, or remove it {older}")
    warn_skipped(found)
    if resume == "never":
        return steps
    logged = _last_logged_step(run_dir)
    if steps or not logged:
        return steps
    if owner.get("saved") if owner is not None else _last_launch_saved(run_dir):
        what = "holds no complete checkpoint" if folder.exists() else "does not exist"
        raise ResumeRefused(
            f"the checkpoint folder {folder} {what}, but this run logged steps up to {logged} "
            f"({run_dir / 'metrics.jsonl'}): restore its checkpoints, start a new run with another run.name, "
            "or start this one again from step 0 with run.resume=never (its logged steps are dropped)"
        )
    log.warning(
        "%s logged steps up to %d but saved no checkpoint: it starts again from step 0", run_dir, logged
    )
    return steps


def _last_logged_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (0: none)."""
    return max((r.get("step", 0) for r in read_metrics(run_dir) if isinstance(r, dict)), default=0)


def _last_launch_saved(run_dir: Path) -> bool:
    """Whether the run's last launch saved checkpoints (its config.yaml; true when there is none)."""
    saved = run_dir / "config.yaml"
    config = yaml.safe_load(saved.read_text()) if saved.exists() else None
    return bool(((config or {}).get("checkpoint") or {}).get("enable", True))


def cannot_write(path: Path, error: OSError, key: str) -> ConfigError:
    """One line: what cannot be written, why, and the setting that places it."""
    return ConfigError(
        f"cannot write {path} ({error.strerror or error}): free space there, make it writable, or set {key} "
        "to another place"
    )


@contextlib.contextmanager
def writing(path: Path, key: str) -> Iterator[None]:
    """An OSError inside (writing the run's files at start: a full disk, a read-only file system) as
    `cannot_write`'s one line naming the file, not a traceback."""
    try:
        yield
    except OSError as e:
        raise cannot_write(Path(e.filename) if e.filename else path, e, key) from e


def _check_writable(folder: Path, key: str) -> None:
    """Create `folder` and write a file there (then remove it), so that a folder this run cannot write
    is found at launch, not at the first save after hours of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        try:
            os.write(fd, b"titan")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        raise cannot_write(folder, e, key) from e


def _git_state() -> str:
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--short"], capture_output=True, text=True
        ).stdout
        diff = subprocess.run(
            ["git", "-C", str(source), "diff", "HEAD"], capture_output=True, text=True
        ).stdout
        return f"commit {commit}\nsource {source}\n\n# git status --short\n{status}\n# git diff HEAD\n{diff}"
    except (OSError, subprocess.CalledProcessError):
        return f"source {source} is not a git checkout\n"


def recorded_env_variable(name: str) -> bool:
    return bool(REPRODUCIBILITY_ENV.match(name)) and not SECRET_NAME.search(name)


def _env_report() -> str:
    lines = [
        f"host: {socket.gethostname()}",
        f"python: {sys.version.split()[0]} ({platform.platform()})",
        f"torch: {torch.__version__}",
        f"cuda: {torch.version.cuda}",
        f"nccl: {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}",
        f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ['cpu']}",
        f"cpu_count: {os.cpu_count()}",
        "",
        "# packages",
        *sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()),
        "",
        "# environment: the variables that shape how the run executes (CUDA, NCCL, torch, OMP, Slurm, Python,",
        "# titan, ranks); all others, and any whose name looks like a secret, are left out",
        *sorted(f"{k}={v}" for k, v in os.environ.items() if recorded_env_variable(k)),
    ]
    return "\n".join(lines) + "\n"


def write_provenance(
    run_dir: Path, config: dict, overrides: list[str], argv: list[str], hydra_record: dict[str, str]
) -> None:
    """config.yaml (resolved), overrides.yaml, git.txt, env.txt, cmd.txt, and Hydra's own record in
    .hydra/ (`hydra_record`: file name -> text, as Hydra writes it). Rank 0 / the launcher only, once
    the launch is accepted."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    for name, text in hydra_record.items():
        (run_dir / ".hydra" / name).write_text(text)
    # With its own hydra.run.dir, config.yaml is a primary config that launch.py can start again:
    # `python launch.py --config-dir <run dir> --config-name config` (add run.name=... for a new dir).
    saved = {**config, "hydra": {"run": {"dir": "${run.root}/${run.group}/${run.name}"}}}
    # Atomic: other ranks may read config.yaml while rank 0 writes it (under torchrun).
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (run_dir / "git.txt").write_text(_git_state())
    (run_dir / "env.txt").write_text(_env_report())
    with open(run_dir / "cmd.txt", "a") as f:  # one line per launch: the history of restarts
        f.write(json.dumps({"cwd": os.getcwd(), "argv": argv}) + "\n")
