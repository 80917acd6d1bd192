"""FSDP2 (`fully_shard`) per transformer block, HSDP on a 2-D mesh, and DDP through `replicate`."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
RESHARD_CHOICES = ("default", "always", "never")


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    *,
    param_dtype: str,
    reduce_dtype: str,
    reshard_after_forward: str,
    cpu_offload: bool,
    pipeline: bool = False,
) -> None:
    """Shard each block, then the root (embeddings, final norm, output) on `mesh` (1-D FSDP or 2-D HSDP)."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    # Offloaded parameters live in host memory: pinned on CUDA, so the copies to and from the device
    # are fast and asynchronous; pinning needs CUDA, so not on a CPU mesh (gloo).
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    # Under pipeline parallelism each microbatch would re-gather parameters; keep them gathered.
    reshard = {"default": not pipeline, "always": True, "never": False}[reshard_after_forward]
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: resharding them is wasted work.
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp,
            offload_policy=offload,
            reshard_after_forward=reshard and i < len(blocks) - 1,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> None:
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=mesh)
