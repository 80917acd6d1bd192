"""Start one node's ranks with torch's elastic launcher (the API behind torchrun)."""

import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from titan.config.schema import RunConfig
from titan.train import trainer


def launch_local(cfg: RunConfig, nproc: int) -> dict:
    """Run `trainer.run(cfg)` on `nproc` local ranks; returns rank 0's result."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone` picks
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(cfg.run.dir) / "logs" / "elastic")),
    )
    results = elastic_launch(config, trainer.run)(cfg)
    return results[0]
