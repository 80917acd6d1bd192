"""ParallelDims: the parallel degrees of a run, checked against the world size, and its device mesh."""

import math
import os
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan.config.schema import ParallelismConfig

# Outermost to innermost: TP talks most and gets the closest ranks (one node's NVLink), PP least.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def resolve(cls, cfg: ParallelismConfig, world_size: int) -> "ParallelDims":
        """Fill in the one degree given as -1 (dp_shard or dp_replicate) and check the product."""
        degrees = {name: getattr(cfg, name) for name in ("dp_replicate", "dp_shard", "cp", "tp", "pp")}
        free = [name for name, d in degrees.items() if d == -1]
        if len(free) > 1 or (free and free[0] not in ("dp_replicate", "dp_shard")):
            raise ValueError(
                f"parallelism.{' and parallelism.'.join(free)} = -1: only one of dp_shard or dp_replicate "
                f"may be -1 (the rest of the world size)"
            )
        for name, degree in degrees.items():
            if degree < 1 and name not in free:
                raise ValueError(f"parallelism.{name}={degree} must be >= 1")
        if free:
            others = math.prod(d for name, d in degrees.items() if name != free[0])
            if world_size % others:
                raise ValueError(
                    f"the degrees other than parallelism.{free[0]} multiply to {others}, which does not divide "
                    f"the world size {world_size} (cluster.nodes x cluster.nproc_per_node); change the degrees "
                    f"or the number of ranks"
                )
            degrees[free[0]] = world_size // others
        product = math.prod(degrees.values())
        if product != world_size:
            shown = " x ".join(f"{name}={d}" for name, d in degrees.items())
            raise ValueError(
                f"parallelism {shown} = {product}, but the world size (cluster.nodes x cluster.nproc_per_node) "
                f"is {world_size}; set parallelism.dp_shard=-1 or change cluster.nproc_per_node"
            )
        return cls(world_size=world_size, **degrees)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP shards over dp_shard x cp: context-parallel ranks hold the same weights."""
        return self.dp_shard * self.cp > 1

    @property
    def ddp_enabled(self) -> bool:
        return self.dp_replicate > 1

    def build_meshes(self, device_type: str) -> dict[str, DeviceMesh]:
        """One world mesh with named dims, and the sub-meshes each parallelism works on.

        `dp` (dp_replicate x dp_shard) splits the batch; `fsdp` (dp_shard x cp, with dp_replicate in
        front for HSDP) shards parameters; `loss` (dp x cp) sums the loss; `tp`, `cp`, `pp` as named.
        """
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        world = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        meshes = {
            "world": world,
            "dp": world[("dp_replicate", "dp_shard")]._flatten("dp"),
            "dp_shard_cp": world[("dp_shard", "cp")]._flatten("dp_shard_cp"),
            "loss": world[("dp_replicate", "dp_shard", "cp")]._flatten("dp_cp"),
            "dp_replicate": world["dp_replicate"],
            "cp": world["cp"],
            "tp": world["tp"],
            "pp": world["pp"],
        }
        meshes["fsdp"] = (
            world[("dp_replicate", "dp_shard_cp")] if self.dp_replicate > 1 else meshes["dp_shard_cp"]
        )
        return meshes


def device_for(kind: str) -> torch.device:
    """`training.device`: auto picks the local CUDA device when there is one."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(kind)
