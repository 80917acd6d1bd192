"""The global gradient norm of a model held in parts: sharded (FSDP, TP) and/or split into pipeline stages."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn import Module


def grad_norm(model_parts: list[Module], pp_mesh: DeviceMesh) -> torch.Tensor:
    """The L2 norm of all gradients of the whole model, on every rank of the pipeline.

    Each part's gradients may be DTensors (FSDP, TP); `full_tensor` sums their squares over those
    meshes, then the squares are summed over the pipeline ranks, each holding other blocks.
    """
    grads = [p.grad for part in model_parts for p in part.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    squares = norm.float() ** 2
    dist.all_reduce(squares, group=pp_mesh.get_group())
    return squares.sqrt()
