"""Run configurations and helpers shared by the checkpoint tests."""

import shutil
from pathlib import Path

from tests.utils import tiny_config
from titan.checkpoint.format import OWNER_FILE
from titan.config.schema import RunConfig
from titan.launch.local import launch_local
from titan.train.trainer import run

STEPS = 20
RESUME_AT = 10
# fp32 AdamW with warmup and decay: every piece of state (moments, schedule, data position, RNG) counts.
OPTIMIZER = {"name": "adamw", "lr": 3e-3, "schedule": "wsd", "warmup_steps": 3, "decay_ratio": 0.3}
# Parallel layouts a checkpoint must move between: (ranks, parallelism keys). Add layouts as they land.
LAYOUTS = {
    "fsdp2": (2, {"dp_shard": -1}),
    "single": (1, {"dp_shard": 1}),
    "tp2": (2, {"dp_shard": 1, "tp": 2}),
    # two pipeline stages on each of two ranks: every rank saves and loads two model parts
    "pp2-interleaved": (2, {"dp_shard": 1, "pp": 2, "pp_schedule": "Interleaved1F1B"}),
}


def resume_config(run_dir: Path, *, mode: str = "sync", layout: str = "fsdp2", **checkpoint) -> RunConfig:
    return tiny_config(
        run_dir,
        steps=STEPS,
        optimizer=OPTIMIZER,
        parallelism=LAYOUTS[layout][1],
        checkpoint={"interval": RESUME_AT, "mode": mode, **checkpoint},
    )


def launch(cfg: RunConfig, nproc: int) -> dict:
    """One rank runs in this process (cheaper); more go through the local launcher."""
    return run(cfg) if nproc == 1 else launch_local(cfg, nproc)


def rewind(full_dir: Path, run_dir: Path, step: int) -> Path:
    """A copy of a finished run as it stood after saving `step`, three steps of metrics past it
    (a crash after those steps): later checkpoints are gone."""
    shutil.copytree(full_dir, run_dir)
    for entry in (run_dir / "checkpoints").iterdir():
        if entry.name not in (f"step-{step}", OWNER_FILE):
            shutil.rmtree(entry)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[: step + 3]))
    return run_dir


def one_rank_config(run_dir: Path, *, steps: int = 4, interval: int = 2, **checkpoint) -> RunConfig:
    """A short one-process run (in this process) that saves every `interval` steps."""
    return tiny_config(
        run_dir,
        steps=steps,
        optimizer=OPTIMIZER,
        parallelism={"dp_shard": 1},
        checkpoint={"interval": interval, **checkpoint},
    )


def relaunch(saved: Path, tmp_path: Path, *, steps: int = 6, **checkpoint) -> tuple[Path, RunConfig]:
    """A run dir holding a copy of `saved` (its checkpoints), and a config that goes on from it."""
    run_dir = tmp_path / "again"
    shutil.copytree(saved, run_dir)
    return run_dir, one_rank_config(run_dir, steps=steps, keep_latest_k=0, **checkpoint)


def names(folder: Path) -> list[str]:
    """A checkpoint folder's entries, less its owner mark."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name != OWNER_FILE)
