"""Weight initialization that gives the same weights under every parallel layout.

A sharded parameter drawn with the global RNG gets values that depend on how it is sharded (torch's
layout-independent DTensor RNG covers CUDA only), and a pipeline stage drawing only its own layers
would get another model. So for sharded models and stages each initialization unit (embeddings,
one block, norm, output) is drawn whole, on an unsharded twin, in the order a single device draws
it, and each rank keeps what it holds. Peak extra memory: one unit.
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.models.llama.args import ModelArgs
from titan.models.llama.model import Transformer


@torch.no_grad()
def init_weights(model: Transformer, args: ModelArgs, *, seed: int, device: torch.device) -> None:
    """Initialize `model` (a whole model or a pipeline stage, sharded or not) as one device would."""
    torch.manual_seed(seed)
    whole = (
        model.tok_embeddings is not None and model.output is not None and len(model.layers) == args.n_layers
    )
    if whole and not any(isinstance(p, DTensor) for p in model.parameters()):
        model.init_weights(buffer_device=device)
        return
    model.init_rope(buffer_device=device)
    units = {_name_of(model, unit): unit for unit, _ in model.weight_init_plan()}
    with torch.device("meta"):
        twin = Transformer(args)
    # Every unit of the whole model is drawn, also those of other pipeline stages, so the RNG
    # sequence (and thus each unit's values) is the one a single device sees.
    for twin_unit, init in twin.weight_init_plan():
        twin_unit.to_empty(device=device, recurse=True)
        init(twin_unit)
        unit = units.get(_name_of(twin, twin_unit))
        if unit is not None:
            _copy_into(unit, twin_unit)
        twin_unit.to_empty(device="meta")


def _name_of(model: nn.Module, unit: nn.Module) -> str:
    return _unwrapped(next(name for name, m in model.named_modules() if m is unit))


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
