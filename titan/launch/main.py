"""What launch.py does: the composed config -> validation -> run directory -> ranks, or a Slurm job."""

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from titan.config.errors import ConfigError
from titan.launch import jobstate, resolvers
from titan.launch.build import build_run_config, describe_config_error
from titan.launch.rundir import ResumeRefused, check_resume, write_provenance
from titan.launch.schemas import register_schemas
from titan.launch.slurm import SubmittedJob, export_srun_task_env, in_srun_task, preflight, submit
from titan.launch.sweeps import register_sweeps
from titan.launch.validate import validate, validate_data, world_size

log = logging.getLogger("titan")


def register(sweeps: Path) -> list[str]:
    """What conf/ refers to and Hydra must know before it composes: schemas, resolvers, the named
    sweeps (returned)."""
    register_schemas()
    resolvers.register()
    return register_sweeps(sweeps)


@contextlib.contextmanager
def one_line_config_errors() -> Iterator[None]:
    """A wrong type or an unknown key in an override as one line naming the key, exit status 2 (as
    every config error).

    Hydra prints composition errors itself, over several lines, unless HYDRA_FULL_ERROR is set; then it
    raises them, here. The user's own HYDRA_FULL_ERROR=1 still gets the full trace.
    """
    users_choice = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as e:  # composition and override-syntax errors, as Hydra would show them
        if users_choice == "1":
            raise
        cause = e.__cause__
        print(
            f"error: {describe_config_error(cause) if isinstance(cause, OmegaConfBaseException) else e}",
            file=sys.stderr,
        )
        sys.exit(2)


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
    srun_task = in_srun_task()
    if srun_task:
        export_srun_task_env()
    is_rank = "TORCHELASTIC_RUN_ID" in os.environ or srun_task
    to_slurm = run_cfg.cluster.launcher == "slurm" and not is_rank
    gpus = torch.cuda.device_count()
    world = int(os.environ["WORLD_SIZE"]) if is_rank else world_size(run_cfg, gpus)
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
