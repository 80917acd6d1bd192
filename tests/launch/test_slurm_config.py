"""The Slurm cluster config and the sbatch script it becomes (no Slurm needed)."""

from pathlib import Path

from submitit.slurm.slurm import _make_sbatch_string

from tests.launch.compose import compose_config
from titan.config.schema import ClusterConfig
from titan.launch.build import build_run_config
from titan.launch.slurm import _gpus_in_gres, sbatch_parameters, start_after
from titan.launch.validate import world_size


def test_nproc_per_node_defaults_to_the_gpus_else_one():
    assert ClusterConfig(launcher="slurm", gpus_per_node=8).nproc_per_node == 8
    assert ClusterConfig(launcher="slurm").nproc_per_node == 1
    assert ClusterConfig(launcher="slurm", gpus_per_node=8, nproc_per_node=2).nproc_per_node == 2


def test_cluster_slurm_composes_hashes_and_sets_the_world_size():
    cfg = build_run_config(
        compose_config(
            ["cluster=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8", "+cluster.sbatch_args.x=1"]
        )
    )
    assert cfg.cluster.launcher == "slurm"
    assert world_size(cfg, gpus_on_machine=0) == 32  # the partition's GPUs, not this machine's
    assert cfg.cluster.sbatch_args == {"x": 1}
    hash(cfg)


def test_every_key_reaches_the_sbatch_script(tmp_path):
    cfg = build_run_config(
        compose_config(
            [
                "cluster=slurm",
                "cluster.nodes=2",
                "cluster.gpus_per_node=4",
                "cluster.nproc_per_node=2",
                "cluster.partition=gpu",
                "cluster.account=proj",
                "cluster.qos=high",
                "cluster.time_min=90",
                "cluster.cpus_per_task=6",
                "cluster.mem_gb=200",
                "cluster.constraint=h100",
                "cluster.exclude=node7",
                "cluster.signal_delay_s=150",
                "cluster.max_retries=5",
                "cluster.setup=['module load cuda','export NCCL_DEBUG=WARN']",
                "+cluster.sbatch_args.mail-type=END",
            ]
        )
    )
    run_dir = tmp_path / "run"
    with start_after(["11", "12"]):
        params = sbatch_parameters(cfg, run_dir, run_dir / "code")
    script = _make_sbatch_string(
        command="python -m submitit.core._submit x", folder=run_dir / "slurm", **params
    )
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --time=90",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=200G",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclude=node7",
        "#SBATCH --signal=USR2@150",
        "#SBATCH --mail-type=END",
        "#SBATCH --dependency=afterany:11:12",
        "#SBATCH --requeue",
        "module load cuda",
        "export NCCL_DEBUG=WARN",
    ):
        assert line in script.splitlines(), line
    assert "--kill-on-bad-exit=1" in script
    # the code snapshot comes first on the path, then the attempt hooks run around srun with srun's status
    setup, teardown = script.index("export PYTHONPATH="), script.index("titan.launch.attempt end")
    assert f"export PYTHONPATH={run_dir / 'code'}" in script and "PYTHONSAFEPATH=1" in script
    assert setup < script.index("titan.launch.attempt begin") < script.index("srun ") < teardown
    assert script[teardown:].split()[1:5] == ["end", str(run_dir), "$?", "5"]


def test_cpu_defaults_ask_for_no_gpus_and_no_dependency(tmp_path):
    cfg = build_run_config(compose_config(["cluster=slurm"]))
    params = sbatch_parameters(cfg, Path(tmp_path), Path(tmp_path) / "code")
    assert "gpus_per_node" not in params and "dependency" not in params["additional_parameters"]
    assert params["ntasks_per_node"] == 1 and params["signal_delay_s"] == 120


def test_gpus_in_gres():
    assert _gpus_in_gres("(null)") == 0
    assert _gpus_in_gres("gpu:8") == 8
    assert _gpus_in_gres("gpu:h100:4(S:0-1)") == 4
    assert _gpus_in_gres("gpu:a100:2,shard:8") == 2
