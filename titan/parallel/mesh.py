"""ParallelDims: the parallel degrees of a run, checked against the world size, and its device mesh."""

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan.config.schema import ParallelismConfig


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def resolve(cls, cfg: ParallelismConfig, world_size: int) -> "ParallelDims":
        """Fill in `dp_shard=-1` and check that the degrees multiply to the world size."""
        if cfg.dp_replicate < 1:
            raise ValueError(f"parallelism.dp_replicate={cfg.dp_replicate} must be >= 1")
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % cfg.dp_replicate:
                raise ValueError(
                    f"parallelism.dp_replicate={cfg.dp_replicate} does not divide the world size {world_size}; "
                    f"pick a divisor of {world_size}"
                )
            dp_shard = world_size // cfg.dp_replicate
        if dp_shard < 1:
            raise ValueError(f"parallelism.dp_shard={cfg.dp_shard} must be -1 (the rest) or >= 1")
        if cfg.dp_replicate * dp_shard != world_size:
            raise ValueError(
                f"parallelism.dp_replicate={cfg.dp_replicate} x parallelism.dp_shard={dp_shard} = "
                f"{cfg.dp_replicate * dp_shard}, but the world size (cluster.nodes x cluster.nproc_per_node) "
                f"is {world_size}; set parallelism.dp_shard=-1 or change cluster.nproc_per_node"
            )
        return cls(dp_replicate=cfg.dp_replicate, dp_shard=dp_shard, world_size=world_size)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp_enabled(self) -> bool:
        return self.dp_replicate > 1

    def build_meshes(self, device_type: str) -> dict[str, DeviceMesh]:
        """One world mesh with named dims, and the sub-meshes each parallelism works on.

        `dp` is the flattened batch dimension (dp_replicate x dp_shard); `fsdp` is the mesh FSDP
        shards over (2-D for HSDP).
        """
        world = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
        return {
            "world": world,
            "dp": world[("dp_replicate", "dp_shard")]._flatten("dp"),
            "dp_replicate": world["dp_replicate"],
            "fsdp": world[("dp_replicate", "dp_shard")] if self.dp_replicate > 1 else world["dp_shard"],
        }


def device_for(kind: str) -> torch.device:
    """`training.device`: auto picks the local CUDA device when there is one."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(kind)
