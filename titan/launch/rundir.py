"""The run directory: resume policy, provenance files, and per-rank logs."""

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from titan.checkpoint.format import checkpoint_folder, complete_steps
from titan.config.plain import flatten, to_plain
from titan.config.schema import RunConfig
from titan.files import write_atomic

log = logging.getLogger("titan")

# Keys that may differ from the saved config when a run resumes: they change where and how the run
# is watched or how it is laid out on the hardware, not what it computes (layout changes agree within
# the parallel-layout tolerance).
RESUMABLE_CHANGES = (
    "hydra.",
    "run.",
    "metrics.",
    "checkpoint.",  # where state is saved and which step is loaded, not what the run computes
    "training.steps",
    "training.micro_batch_size",
    "training.compile",
    "training.ac",
    "training.gc_freq",
    "parallelism.",
    "cluster.",
    "data.num_workers",
)
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
DEFAULTS = flatten(to_plain(RunConfig()))


def run_name_from_overrides(override_dirname: str) -> str:
    """A deterministic, readable directory name for a set of overrides (never a timestamp)."""
    if not override_dirname:
        return "default"
    slug = re.sub(r"[^A-Za-z0-9_.+-]", "_", override_dirname)[:120]
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each key whose value differs.

    A config saved by an older titan may name classes in `_target_` keys and lack keys added since:
    `_target_` keys are not compared, and a key the saved config lacks is unchanged when its new
    value is the key's default, so adding a key never blocks resuming an older run.
    """
    a, b = flatten(saved), flatten(new)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if key.rpartition(".")[2] == "_target_" or a.get(key) == b.get(key):
            continue
        if key not in a and key in DEFAULTS and b[key] == DEFAULTS[key]:
            continue
        changes.append((key, a.get(key), b.get(key)))
    return changes


class ResumeRefused(ValueError):
    pass


def check_resume(run_dir: Path, config: dict, resume: str) -> int | None:
    """Apply `run.resume` to a run dir; returns the step to resume from, or None for a fresh start."""
    checkpoint = config.get("checkpoint") or {}
    folder = checkpoint_folder(run_dir, checkpoint.get("folder"))
    steps = complete_steps(folder)
    if resume == "never" and steps:
        raise ResumeRefused(
            f"{folder} already holds checkpoints (steps {steps}) and run.resume=never; "
            f"choose another run.name, delete the directory, or use run.resume=auto"
        )
    if resume == "must" and not steps:
        raise ResumeRefused(f"run.resume=must but {folder} holds no complete checkpoint to resume from")
    if not steps:
        return None
    saved_file = run_dir / "config.yaml"
    if saved_file.exists():
        changes = config_changes(yaml.safe_load(saved_file.read_text()), config)
        refused = [c for c in changes if not c[0].startswith(RESUMABLE_CHANGES)]
        if refused:
            diff = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in refused)
            raise ResumeRefused(
                f"{run_dir} holds a checkpoint of a run with another configuration:\n{diff}\n"
                f"Resume with the saved values, or start a new run (another run.name, or run.resume=never)."
            )
        for key, old, new in changes:
            log.info("resuming with a changed setting: %s: %r -> %r", key, old, new)
    return checkpoint["load_step"] if checkpoint.get("load_step") is not None else steps[-1]


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
        "# environment (names containing KEY, TOKEN, SECRET or PASSWORD are left out)",
        *sorted(f"{k}={v}" for k, v in os.environ.items() if not any(m in k.upper() for m in SECRET_MARKERS)),
    ]
    return "\n".join(lines) + "\n"


def write_provenance(run_dir: Path, config: dict, overrides: list[str], argv: list[str]) -> None:
    """config.yaml (resolved), overrides.yaml, git.txt, env.txt, cmd.txt. Rank 0 / the launcher only."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
