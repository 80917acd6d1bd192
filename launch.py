"""titan's entry point: compose the config -> validate -> run directory -> ranks.

python launch.py model=llama3_8b parallelism=fsdp optimizer.lr=3e-4 training.steps=1000
torchrun --nproc_per_node 8 launch.py model=llama3_8b
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

from titan.cluster.rundir import ResumeRefused, check_resume, write_provenance
from titan.config import resolvers
from titan.config.build import ConfigError, build_run_config
from titan.config.sweeps import register_sweeps
from titan.config.validate import nproc_per_node, validate, validate_data

resolvers.register()
register_sweeps(Path(__file__).parent / "sweeps")
log = logging.getLogger("titan")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
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


def launch(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_cfg = build_run_config(cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    run_cfg = dataclasses.replace(run_cfg, run=dataclasses.replace(run_cfg.run, dir=str(run_dir)))

    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    gpus = torch.cuda.device_count()
    world = (
        int(os.environ["WORLD_SIZE"])
        if under_torchrun
        else run_cfg.cluster.nodes * nproc_per_node(run_cfg, gpus)
    )
    validate(run_cfg, world)
    validate_data(run_cfg)
    if run_cfg.cluster.nodes > 1 and not under_torchrun:
        raise ConfigError(
            f"cluster.nodes={run_cfg.cluster.nodes} with the local launcher: start each node with "
            "`torchrun --nnodes ... launch.py ...`, or use a cluster launcher"
        )

    config = OmegaConf.to_container(cfg, resolve=True)
    config["run"]["dir"] = str(run_dir)
    start = check_resume(run_dir, config, run_cfg.run.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        write_provenance(run_dir, config, list(hydra_cfg.overrides.task), sys.argv)
    log.info("run directory: %s%s", run_dir, f" (resuming from step {start})" if start else "")

    from titan.train import trainer

    if under_torchrun or world == 1:
        result = trainer.run(run_cfg)
    else:
        from titan.cluster.local import launch_local

        result = launch_local(run_cfg, world)
    return result.get("loss")


if __name__ == "__main__":
    main()
