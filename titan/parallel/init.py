"""Weight initialization that gives the same weights under every parallel layout.

A sharded parameter drawn with the global RNG gets values that depend on how it is sharded (torch's
layout-independent DTensor RNG covers CUDA only). So for sharded models each initialization unit
(embeddings, one block, norm, output) is drawn whole, on an unsharded twin, in the order a single
device draws it, and each rank keeps its shard. Peak extra memory: one unit.
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.models.llama.model import ModelArgs, Transformer


@torch.no_grad()
def init_weights(model: Transformer, args: ModelArgs, *, seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        model.init_weights(buffer_device=device)
        return
    model.init_rope(buffer_device=device)
    with torch.device("meta"):
        twin = Transformer(args)
    for (twin_unit, init), (unit, _) in zip(twin.weight_init_plan(), model.weight_init_plan(), strict=True):
        twin_unit.to_empty(device=device, recurse=True)
        init(twin_unit)
        _copy_into(unit, twin_unit)
        twin_unit.to_empty(device="meta")


def _copy_into(unit: nn.Module, full: nn.Module) -> None:
    full_params = dict(full.named_parameters())
    for name, param in unit.named_parameters():
        source = full_params[_unwrapped(name)]
        if isinstance(param, DTensor):
            # Every rank drew the same full tensor; src_data_rank=None keeps the local slice, no broadcast.
            shard = distribute_tensor(source, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(source)


def _unwrapped(name: str) -> str:
    """Parameter names without the prefixes that checkpoint and compile wrappers add."""
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name
