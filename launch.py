"""titan's entry point: compose the config -> validate -> run directory -> ranks, or a Slurm job.

python launch.py model=llama3_8b parallelism=fsdp optimizer.lr=3e-4 training.steps=1000
python launch.py cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 model=llama3_8b
torchrun --nproc_per_node 8 launch.py model=llama3_8b      (or srun inside an salloc allocation)
"""

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from titan.config.errors import ConfigError
from titan.launch import jobstate, resolvers
from titan.launch.build import build_run_config
from titan.launch.rundir import ResumeRefused, check_resume, write_provenance
from titan.launch.slurm import SubmittedJob, export_srun_task_env, preflight, submit
from titan.launch.sweeps import register_sweeps
from titan.launch.validate import nproc_per_node, validate, validate_data

resolvers.register()
register_sweeps(Path(__file__).parent / "sweeps")
log = logging.getLogger("titan")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | SubmittedJob | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    created_by_hydra = {p.name for p in run_dir.iterdir()} <= {".hydra"}  # Hydra makes it before main()
    try:
        return launch(cfg)
    except (ConfigError, ResumeRefused) as e:  # the user's to fix: the message, not a traceback
        if created_by_hydra:  # a refused config leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # the group directory, when it holds no other run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def launch(cfg: DictConfig) -> float | SubmittedJob | None:
    hydra_cfg = HydraConfig.get()
    run_cfg = build_run_config(cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    run_cfg = dataclasses.replace(run_cfg, run=dataclasses.replace(run_cfg.run, dir=str(run_dir)))

    # This process is one rank when torchrun or srun (inside an allocation) started it; otherwise it
    # starts the ranks here, or submits a Slurm job that starts them.
    is_rank = "TORCHELASTIC_RUN_ID" in os.environ or export_srun_task_env()
    to_slurm = run_cfg.cluster.launcher == "slurm" and not is_rank
    gpus = torch.cuda.device_count()
    world = (
        int(os.environ["WORLD_SIZE"]) if is_rank else run_cfg.cluster.nodes * nproc_per_node(run_cfg, gpus)
    )
    validate(run_cfg, world)
    validate_data(run_cfg)
    if to_slurm:
        preflight(run_cfg, run_dir)
    elif run_cfg.cluster.nodes > 1 and not is_rank:
        raise ConfigError(
            f"cluster.nodes={run_cfg.cluster.nodes} with the local launcher: start each node with "
            "`torchrun --nnodes ... launch.py ...`, or use cluster=slurm"
        )

    config = OmegaConf.to_container(cfg, resolve=True)
    config["run"]["dir"] = str(run_dir)
    start = check_resume(run_dir, config, run_cfg.run.resume)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        write_provenance(run_dir, config, list(hydra_cfg.overrides.task), sys.argv)
    log.info("run directory: %s%s", run_dir, f" (resuming from step {start})" if start is not None else "")
    if to_slurm:
        job = submit(run_cfg, run_dir)
        print(job, flush=True)
        return job

    from titan.train import trainer

    with jobstate.tracked(run_dir, enabled=rank0) as track:
        if is_rank or world == 1:
            result = track(trainer.run(run_cfg))
        else:
            from titan.launch.local import launch_local

            result = track(launch_local(run_cfg, world))
    return result.get("loss")


if __name__ == "__main__":
    main()
