"""titan's entry point: compose the config -> validate -> run directory -> ranks, or a Slurm job.

python launch.py model=llama3_8b parallelism=fsdp optimizer.lr=3e-4 training.steps=1000
python launch.py cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 model=llama3_8b
torchrun --nproc_per_node 8 launch.py model=llama3_8b      (or srun inside an salloc allocation)
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from titan.launch import main as titan_main

REPO = Path(__file__).parent
titan_main.register(sweeps=REPO / "sweeps")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    return titan_main.main(cfg)


if __name__ == "__main__":
    titan_main.run(main, conf=REPO / "conf", sweeps=REPO / "sweeps")
