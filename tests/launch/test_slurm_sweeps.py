"""Sweeps through titan's Hydra launchers: one Slurm job per point (waiting or not), and locally."""

import re
import time

import pytest
import yaml

from tests.launch.slurm_utils import TINY, job_ids, launch, metrics, requires_slurm, slurm, wait_for_job
from titan.launch import report
from titan.launch.identity import run_name
from titan.tools import report as report_tool

ONE_RANK = [*TINY, "parallelism=single", "cluster.nproc_per_node=1", "training.steps=6"]


def points(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir())


def named_from_overrides(run_dir) -> bool:
    """A sweep point is named by its overrides (launch/identity.py): the readable part of its name."""
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    expected = run_name(hydra["overrides"]["task"], {}, [], in_sweep=True)
    return run_dir.name.rpartition("-")[0] == expected.rpartition("-")[0]


@pytest.mark.slow
@requires_slurm
def test_a_named_sweep_waits_for_its_jobs_and_the_report_lists_them(tmp_path):
    proc = launch(
        "-m",
        "+sweeps=layouts",
        "hydra/launcher=slurm",
        "hydra.launcher.wait=true",
        "hydra.launcher.poll_s=1",
        *TINY,
        "training.steps=6",
        root=tmp_path,
    )
    jobs = job_ids(proc.stdout)
    sweep = tmp_path / "sweeps" / "layouts"
    runs = points(sweep)
    layouts = ["fsdp", "ddp", "tp2", "pp2", "cp2_fsdp"]  # sweeps/layouts.yaml
    assert len(jobs) == len(runs) == len(layouts) and all(named_from_overrides(r) for r in runs)
    # wait=true returned each job's final loss: the last line of its metrics
    returned = dict(re.findall(r"job (\d+): done, loss (\S+)", proc.stdout))
    rows = report.report(sweep)
    assert sorted(r["job"] for r in rows) == sorted(jobs) == sorted(returned)
    for row in rows:
        run = sweep / row["run"]
        assert row["state"] == "done" and row["steps"] == 6 and row["attempts"] == 1
        assert row["last_loss"] == metrics(run)[-1]["loss"] == float(returned[row["job"]])
        assert row["best_loss"] == min(m["loss"] for m in metrics(run))
        assert row["overrides"][:1] in ([f"parallelism={layout}"] for layout in layouts)
    # the layouts agree (bf16 compute: to a few digits)
    for row in rows[1:]:
        assert row["last_loss"] == pytest.approx(rows[0]["last_loss"], abs=2e-2)
    assert report_tool.main([str(sweep), "--sort", "last_loss"]) == 0
    fig = report.plot(rows, tmp_path / "curves.png")
    curves = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]  # not markers
    assert len(curves) == len(layouts) and (sweep / "report.png").exists()


@pytest.mark.slow
@requires_slurm
def test_without_wait_it_returns_at_once_and_max_concurrent_holds(tmp_path):
    start = time.monotonic()
    proc = launch(
        "-m",
        "hydra/launcher=slurm",
        "cluster=slurm",
        "cluster.max_concurrent=1",
        "optimizer.lr=1e-3,3e-3",
        *ONE_RANK,
        root=tmp_path,
    )
    first, second = job_ids(proc.stdout)
    queued = slurm("squeue", "-h", "-j", second, "-o", "%T %r").split()
    assert queued == ["PENDING", "Dependency"]  # waits for the first: one at a time
    assert time.monotonic() - start < 120
    a, b = wait_for_job(first)[-1], wait_for_job(second)[-1]
    assert a["state"] == b["state"] == "COMPLETED" and b["start"] >= a["end"]
    for run in points(tmp_path / "sweeps" / "llama3_debug"):
        assert len(metrics(run)) == 6 and named_from_overrides(run)


@pytest.mark.slow
def test_the_local_launcher_runs_points_here(tmp_path):
    proc = launch("-m", "hydra/launcher=local", "optimizer.lr=1e-3,3e-3", *ONE_RANK, root=tmp_path)
    runs = points(tmp_path / "sweeps" / "llama3_debug")
    assert len(runs) == 2 and not job_ids(proc.stdout)
    losses = [float(x) for x in re.findall(r": loss (\S+)", proc.stdout)]
    assert sorted(losses) == sorted(metrics(r)[-1]["loss"] for r in runs)
    assert {r["state"] for r in report.report(tmp_path)} == {"done"}
    refused = launch("-m", "hydra/launcher=local", "cluster=slurm", *ONE_RANK, root=tmp_path, check=False)
    assert refused.returncode != 0 and "hydra/launcher=local runs points on this machine" in refused.stderr
