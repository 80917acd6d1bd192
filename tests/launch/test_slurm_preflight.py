"""Clear errors before anything is submitted (against the real cluster: partition `debug`, 2 CPU nodes)."""

import dataclasses
import os
import shutil

import pytest

from tests.launch.slurm_utils import TINY, job_ids, launch, requires_slurm, run_dir_of, slurm, wait_for_job
from tests.utils import tiny_config
from titan.config.errors import ConfigError
from titan.config.schema import ClusterConfig
from titan.launch import jobstate
from titan.launch.slurm import preflight

pytestmark = [pytest.mark.slow, requires_slurm]


def check(tmp_path, **cluster):
    cfg = tiny_config(tmp_path)
    cfg = dataclasses.replace(cfg, cluster=ClusterConfig(launcher="slurm", **cluster))
    preflight(cfg, tmp_path)


def test_a_good_config_passes(tmp_path):
    check(tmp_path, nodes=2, partition="debug")
    check(tmp_path)  # the default partition


@pytest.mark.parametrize(
    "cluster, message",
    [
        (
            {"partition": "gpu"},
            "cluster.partition=gpu is not a partition of this cluster; choose one of debug (default: debug)",
        ),
        (
            {"gpus_per_node": 8},
            "cluster.gpus_per_node=8 but the nodes of partition debug have at most 0 GPU(s)",
        ),
        ({"nodes": 3}, "cluster.nodes=3 but partition debug has 2 node(s)"),
        (
            {"cpus_per_task": 5, "nproc_per_node": 2},
            "= 10 CPUs per node, but the nodes of partition debug have at most",
        ),
        ({"mem_gb": 100000}, "cluster.mem_gb=100000 but the nodes of partition debug have at most"),
        (
            {"time_min": 1, "signal_delay_s": 120},
            "cluster.signal_delay_s=120 must be >= 0 and below cluster.time_min x 60 = 60 s",
        ),
        ({"max_retries": -1}, "cluster.max_retries=-1 must be >= 0"),
    ],
)
def test_bad_cluster_settings_name_the_key_and_the_fix(tmp_path, cluster, message):
    with pytest.raises(ConfigError, match="cannot submit to Slurm") as e:
        check(tmp_path, **cluster)
    assert message in str(e.value)


def test_no_sbatch_says_what_to_do(tmp_path, monkeypatch):
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(p, "sbatch"))]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    assert shutil.which("sbatch") is None
    with pytest.raises(ConfigError, match="cluster=slurm needs Slurm's `sbatch` on PATH.*cluster=local"):
        check(tmp_path)


def test_world_size_must_fit_the_layout_and_nothing_is_left_behind(tmp_path):
    proc = launch("cluster=slurm", "cluster.nodes=2", "parallelism=single", *TINY, root=tmp_path, check=False)
    assert proc.returncode == 2 and not job_ids(proc.stdout)
    assert "the world size (cluster.nodes x cluster.nproc_per_node) is 2" in proc.stderr
    assert not (tmp_path / "llama3_debug").exists()


def test_sbatch_refusals_are_config_errors(tmp_path):
    proc = launch("cluster=slurm", "+cluster.sbatch_args.gres=gpu:1", *TINY, root=tmp_path, check=False)
    assert proc.returncode == 2 and "sbatch refused the job" in proc.stderr
    assert "Invalid generic resource (gres) specification" in proc.stderr
    assert not (tmp_path / "llama3_debug").exists()


def test_a_run_dir_with_a_live_job_is_not_submitted_twice(tmp_path):
    hold = ["cluster=slurm", "run.name=held", "+cluster.sbatch_args.hold=true", *TINY]
    first = launch(*hold, root=tmp_path)  # held in the queue: it stays PENDING
    (job,) = job_ids(first.stdout)
    try:
        again = launch(*hold, root=tmp_path, check=False)
        assert again.returncode == 2
        assert f"already belongs to job {job} (PENDING); wait for it, `scancel {job}`" in again.stderr
        assert jobstate.run_state(run_dir_of(first), jobstate.slurm_states([job])).state == "pending"
    finally:
        slurm("scancel", job)
    assert [a["state"] for a in wait_for_job(job)] == ["CANCELLED"]
    assert jobstate.run_state(run_dir_of(first), jobstate.slurm_states([job])).state == "cancelled"
