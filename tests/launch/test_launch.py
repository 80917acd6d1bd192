"""launch.py as users run it: a subprocess per command, on the bundled data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.checkpoint.common import names

REPO = Path(__file__).resolve().parents[2]
# A small, fast model and run: everything else is the `make train` default (FSDP over 2 ranks).
SMALL = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128"]
SMALL += ["training.seq_len=32", "metrics.log_freq=2", "checkpoint.interval=2", "optimizer.warmup_steps=1"]


def command(*cmd: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command in the repository as a user would, one thread per rank."""
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def launch(*args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    return command(sys.executable, "launch.py", *args, f"run.root={root}", check=check)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_help_lists_the_config_groups(tmp_path):
    out = launch("--help", root=tmp_path).stdout
    for group in ("model:", "parallelism:", "optimizer:", "data:", "checkpoint:", "cluster:"):
        assert group in out
    assert "llama3_8b" in out and "c4_test" in out


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = launch("--cfg", "job", "model=llama3_8b", root=tmp_path).stdout
    cfg = yaml.safe_load(out)
    assert cfg["model"]["dim"] == 4096 and cfg["model"]["n_layers"] == 32


@pytest.mark.slow
def test_train_resume_and_reproduce(tmp_path):
    # A constant LR, so that the run can be extended (a decayed WSD schedule cannot: test_extend.py).
    first = launch("training.steps=4", *SMALL, "optimizer.schedule=constant", root=tmp_path)
    run_dir = tmp_path / "llama3_debug"
    (run_dir,) = [d for d in run_dir.iterdir()]  # one deterministic directory
    assert "step" in first.stderr and "loss" in first.stderr
    for name in ("config.yaml", "overrides.yaml", ".hydra", "git.txt", "env.txt", "cmd.txt", "tb"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "logs" / "rank0.log").exists() and (run_dir / "logs" / "rank1.log").exists()
    assert names(run_dir / "checkpoints") == ["step-2", "step-4"]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 4]

    # The saved config is a primary config: launching it into a new name reproduces the run.
    command(
        sys.executable, "launch.py", "--config-dir", str(run_dir), "--config-name", "config", "run.name=repro"
    )
    original, reproduced = metrics(run_dir), metrics(tmp_path / "llama3_debug" / "repro")
    assert [m["step"] for m in reproduced] == [1, 2, 4]
    assert [m["loss"] for m in reproduced] == pytest.approx([m["loss"] for m in original], rel=1e-6)

    # The same command again: the run is complete, nothing starts and nothing is written.
    done = launch("training.steps=4", *SMALL, "optimizer.schedule=constant", root=tmp_path)
    assert "is complete: step 4 of training.steps=4" in done.stdout
    assert len((run_dir / "cmd.txt").read_text().splitlines()) == 1

    # With more steps, on another layout and micro-batch, it finds the same directory and goes on.
    again = launch(
        "training.steps=6",
        *SMALL,
        "optimizer.schedule=constant",
        "parallelism=ddp",
        "training.micro_batch_size=1",
        root=tmp_path,
    )
    assert "resuming from step 4" in again.stderr
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "llama3_debug").iterdir()) == sorted([run_dir.name, "repro"])

    # A change to what the run computes is refused, with the difference.
    refused = launch(
        "training.steps=6",
        *SMALL,
        "optimizer.schedule=constant",
        f"run.name={run_dir.name}",
        "optimizer.lr=1e-2",
        root=tmp_path,
        check=False,
    )
    assert refused.returncode == 2
    assert "optimizer.lr: 0.0003 -> 0.01" in refused.stderr
    assert "optimizer.lr=1e-2" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the run's record


def test_bad_config_fails_before_training_with_the_fix(tmp_path):
    proc = launch("training.global_batch_size=10", root=tmp_path, check=False)
    assert proc.returncode == 2
    assert (
        "training.global_batch_size=10 is not divisible by dp=2 x training.micro_batch_size=2; use 8 or 12"
        in (proc.stderr)
    )
    assert not (tmp_path / "llama3_debug").exists()  # nothing was created


ONE_LINE_ERRORS = [
    (
        "training.steps=abc",
        "error: training.steps: Value 'abc' of type 'str' could not be converted to Integer",
    ),
    ("+training.stepz=5", "error: training.stepz: no such key; valid keys of training: steps, "),
    (
        "training.stepz=5",
        "error: training.stepz: Key 'stepz' not in 'TrainingConfig'; valid keys of training: ",
    ),
    ("run.root=/proc", "error: cannot create the run directory ("),
    ("training.device=cuda", "error: training.device=cuda but this machine has no CUDA device"),
    ("training.micro_batch_size=0", "error: training.micro_batch_size=0 must be >= 1"),
    ("cluster.nodes=0", "error: cluster.nodes=0 must be >= 1"),
    ("run.name=../../escape", "error: run.name='../../escape' must be a plain directory name"),
    ("run.name=..", "error: run.name='..' must be a plain directory name"),
    ("training.steps=100000000000000000000", "error: training.steps=100000000000000000000 is more than"),
    ("optimizer.lr=inf", "error: optimizer.lr=inf must be a finite number"),
]


@pytest.mark.parametrize("override, line", ONE_LINE_ERRORS)
def test_a_config_error_is_one_line_naming_the_key(tmp_path, override, line):
    root = Path(override.partition("=")[2]) if override.startswith("run.root=") else tmp_path / "runs"
    proc = launch(override, root=root, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(line), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()  # nothing created


def test_a_refused_sweep_leaves_nothing_behind(tmp_path):
    proc = launch("-m", "training.micro_batch_size=0,1", root=tmp_path / "runs", check=False)
    assert proc.returncode == 2 and "training.micro_batch_size=0 must be >= 1" in proc.stderr
    assert not (tmp_path / "runs").exists()  # no sweep directory with a lone multirun.yaml


def test_missing_data_file_is_named(tmp_path):
    proc = launch("data=jsonl", f"data.path={tmp_path}/nope.jsonl", root=tmp_path, check=False)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr


@pytest.mark.slow
def test_multirun_sweep_with_the_basic_launcher(tmp_path):
    launch(
        "-m",
        "optimizer.lr=1e-3,2e-3",
        "training.steps=2",
        "parallelism=single",
        "cluster.nproc_per_node=1",
        *SMALL,
        root=tmp_path,
    )
    points = sorted(p.name for p in (tmp_path / "sweeps" / "llama3_debug").iterdir() if p.is_dir())
    assert len(points) == 2 and all("optimizer.lr-" in p for p in points)
    for p in points:
        assert len(metrics(tmp_path / "sweeps" / "llama3_debug" / p)) == 2


@pytest.mark.slow
def test_torchrun_launches_the_same_run(tmp_path):
    """Under torchrun every rank composes the same config and finds the same run directory."""
    command(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "launch.py",
        "training.steps=2",
        *SMALL,
        f"run.root={tmp_path}",
        "run.name=torchrun",
    )
    run_dir = tmp_path / "llama3_debug" / "torchrun"
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]
    assert (run_dir / "logs" / "rank1.log").exists() and (run_dir / "checkpoints" / "step-2").is_dir()


@pytest.mark.slow
def test_make_train(tmp_path):
    """`make train` as the README shows it (shortened): the default layout, 2 ranks, the bundled data."""
    args = " ".join(["training.steps=3", "metrics.log_freq=1", *SMALL, f"run.root={tmp_path}"])
    command("make", "train", f"ARGS={args}", timeout=600)
    (run_dir,) = (tmp_path / "llama3_debug").iterdir()
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 3 and losses[0] == pytest.approx(7.74, abs=0.3)  # ln(2304) at the start
