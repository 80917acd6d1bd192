"""What launch.py does: the composed config -> validation -> run directory -> ranks, or a Slurm job."""

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from titan.config.errors import ConfigError
from titan.launch import jobstate, resolvers
from titan.launch.build import build_run_config, describe_config_error
from titan.launch.extend import check_lr_continues, is_complete
from titan.launch.identity import PATH_KEYS, absolute_path_value
from titan.launch.lock import RunDirInUse, hold
from titan.launch.rundir import ResumeRefused, check_resume, write_provenance, writing
from titan.launch.safety import check_config_files, check_overrides, config_dirs
from titan.launch.schemas import register_schemas
from titan.launch.slurm import SubmittedJob, export_srun_task_env, in_srun_task, preflight, submit
from titan.launch.sweeps import register_sweeps
from titan.launch.validate import validate, validate_data, world_size

log = logging.getLogger("titan")
# Set once Hydra has made the run directory and called main(): an OSError before is the directory's.
JOB_STARTED = threading.Event()


def register(sweeps: Path) -> list[str]:
    """What conf/ refers to and Hydra must know before it composes: schemas, resolvers, the named
    sweeps (returned)."""
    register_schemas()
    resolvers.register()
    return register_sweeps(sweeps)


def run(hydra_main: Callable[[], Any], *, conf: Path, sweeps: Path) -> None:
    """launch.py's command line: what can be refused without composing, then Hydra's main."""
    os.umask(os.umask(0) | 0o007)  # a run's files (config, logs, checkpoints) are not world-readable
    with one_line_config_errors():
        argv = sys.argv[1:]
        check_overrides(argv)
        check_config_files([conf, sweeps, *config_dirs(argv)])
        try:
            hydra_main()
        except KeyboardInterrupt:  # Ctrl-C before training started (composing, validating): nothing to save
            print("stopped on SIGINT before training started", file=sys.stderr)
            sys.exit(130)


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
    except ConfigError as e:  # refused before Hydra composed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # Hydra could not make the run directory (run.root unwritable, disk full)
        if JOB_STARTED.is_set():
            raise
        print(f"error: cannot create the run directory ({e}); check run.root", file=sys.stderr)
        sys.exit(2)


def main(cfg: DictConfig) -> float | SubmittedJob | None:
    JOB_STARTED.set()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    created_by_hydra = {p.name for p in run_dir.iterdir()} <= {".hydra"}  # Hydra makes it before main()
    try:
        result = launch(cfg)
        if cfg.get("dry_run") and created_by_hydra:  # a dry run leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
            _remove_empty_parents(run_dir, Path(str(cfg.run.root)))
        return result
    except (ConfigError, ResumeRefused) as e:  # the user's to fix: the message, not a traceback
        if created_by_hydra:  # a refused config leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
            _remove_empty_parents(run_dir, Path(str(cfg.run.root)))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (jobstate.RunEnded, RunDirInUse) as e:  # a stop, a rank's error, a run dir in use: one line
        print(e, file=sys.stderr)
        sys.exit(e.status)


def _remove_empty_parents(run_dir: Path, root: Path) -> None:
    """The directories above a refused run's, up to run.root, while they hold nothing else; in a sweep,
    the sweep directory too when it holds nothing but the multirun.yaml Hydra wrote before this, its
    first point, was refused."""
    parent = run_dir.parent
    if HydraConfig.get().mode == RunMode.MULTIRUN and {p.name for p in parent.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(parent, ignore_errors=True)
        parent = parent.parent
    root = root.resolve()
    for folder in (parent.resolve(), *parent.resolve().parents):
        if folder != root and root not in folder.parents:
            break
        try:
            folder.rmdir()
        except OSError:  # not empty: another run's
            break


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes to <run dir>/.hydra/ by itself (`hydra.output_subdir`, off in conf/train.yaml)."""
    hydra_cfg = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))),
    }


def absolute_data_paths(cfg: DictConfig) -> None:
    """data.path and data.tokenizer as absolute paths in the config that is built, saved and compared on
    resume (the run name already hashes them so: identity.py)."""
    source = OmegaConf.select(cfg, "data.source")
    with open_dict(cfg):
        for key in PATH_KEYS:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
            absolute = absolute_path_value(key, value, source)
            if absolute != value:
                OmegaConf.update(cfg, key, absolute, merge=False)
        for source in OmegaConf.select(cfg, "data.sources") or []:
            absolute = absolute_path_value("data.path", source.path, source.source)
            if absolute != source.path:
                source.path = absolute


def launch(cfg: DictConfig) -> float | SubmittedJob | None:
    hydra_cfg = HydraConfig.get()
    absolute_data_paths(cfg)
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
    if run_cfg.dry_run:
        world = world_size(run_cfg, torch.cuda.device_count())
        validate(run_cfg, world)
        validate_data(run_cfg)
        from titan.launch.dry_run import dry_run_report  # torch's fake process group: only here

        print(dry_run_report(run_cfg, world), flush=True)
        return None
    if not to_slurm and int(os.environ.get("RANK", 0)) == 0:  # under torchrun or srun, rank 0 holds it
        hold(run_dir)  # one launch at a time, until this process ends
    gpus = torch.cuda.device_count()
    world = int(os.environ["WORLD_SIZE"]) if is_rank else world_size(run_cfg, gpus)
    validate(run_cfg, world)
    cores = os.cpu_count() or 1
    if gpus == 0 and not is_rank and not to_slurm and world > cores:
        log.warning(
            "warning: %d ranks on %d CPU cores: each rank gets a fraction of a core and the run will be slow; "
            "lower cluster.nproc_per_node",
            world,
            cores,
        )
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
    if is_complete(run_cfg, start):
        print(f"{run_dir} is complete: step {start} of training.steps={run_cfg.training.steps}", flush=True)
        return None
    if start is not None and (run_dir / "config.yaml").exists():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        check_lr_continues(saved, run_cfg, start, str(run_dir))
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        with writing(run_dir, "run.root"):
            write_provenance(run_dir, config, list(hydra_cfg.overrides.task), sys.argv, hydra_record(cfg))
    log.info("run directory: %s%s", run_dir, f" (resuming from step {start})" if start is not None else "")
    if to_slurm:
        job = submit(run_cfg, run_dir)
        print(job, flush=True)
        return job

    from titan.launch.local import run_local  # imported before `started`: a stop is handled from then on
    from titan.train import trainer

    with jobstate.tracked(run_dir, enabled=rank0) as track:
        result = track(trainer.run(run_cfg) if is_rank else run_local(run_cfg, world))
    return result.get("loss")
