"""Float8 matmuls through torchao: each chosen nn.Linear becomes a Float8Linear, before TP and FSDP.

Recipes (torchao's names): `tensorwise`, one scale per tensor; `rowwise`, one per row (power-of-two
scales). Weights, gradients and the optimizer stay in their own dtype; only the matmul inputs are cast.

Under FSDP on CUDA the tensorwise recipe also all-gathers weights in float8 (half the bytes of bf16);
their scales are then computed for all weights at once after each optimizer step
(`precompute_float8_scales`), one all-reduce instead of one per weight. gloo has no float8 dtypes
("Invalid scalar type"), so on CPU FSDP gathers the weights in their own dtype and Float8Linear casts
them after the gather. Float8 TP styles (float8 collectives too) are not used: TP keeps titan's plain
styles, under which Float8Linear casts the local shards.
"""

import dataclasses

import torch
from torch import nn

from titan.config.errors import ConfigError

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
# The output projection stays in bf16: float8 logits cost loss for little speed (torchtitan, torchao
# recipes keep it out too).
KEPT_IN_HIGH_PRECISION = ("output",)
# torch._scaled_mm needs both matrix dims in multiples of 16 (the float8 tensor-core tile).
FLOAT8_DIM_MULTIPLE = 16
# Float8 tensor cores: Ada (SM 8.9) and Hopper (SM 9.0) onwards.
MIN_CUDA_CAPABILITY = (8, 9)


def converts_to_float8(module: nn.Module, fqn: str) -> bool:
    """torchao's module filter: which Linears become Float8Linear."""
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] in KEPT_IN_HIGH_PRECISION:
        return False
    return module.in_features % FLOAT8_DIM_MULTIPLE == 0 and module.out_features % FLOAT8_DIM_MULTIPLE == 0


def fsdp_float8_all_gather(recipe: str, *, fsdp: bool, cpu_offload: bool, device_type: str) -> bool:
    """Whether FSDP all-gathers weights in float8: tensorwise scales only (torchao), NCCL only (gloo
    has no float8 dtypes), and not with CPU offload (the scales would be computed on host shards)."""
    return recipe == "tensorwise" and fsdp and not cpu_offload and device_type == "cuda"


def float8_hardware_problem(device: torch.device) -> str | None:
    """Why Float8 cannot run on `device`, or None. On CPU torchao's Float8Linear runs (tests)."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability >= MIN_CUDA_CAPABILITY:
        return None
    name = torch.cuda.get_device_name(device)
    return (
        f"training.float8 needs a GPU with float8 tensor cores (SM 8.9+, Ada/Hopper or newer); {name} is "
        f"SM {capability[0]}.{capability[1]}: set training.float8=none"
    )


def apply_float8(model: nn.Module, recipe: str, *, fsdp_float8_all_gather: bool, device: torch.device) -> int:
    """Swap the chosen Linears of `model` (on the meta device, before TP and FSDP) for Float8Linear.

    Returns how many were swapped. Raises ConfigError on hardware without float8 matmuls.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    problem = float8_hardware_problem(device)
    if problem:
        raise ConfigError(problem)
    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(model, config=config, module_filter_fn=converts_to_float8)
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def precompute_float8_scales(model_parts: list[nn.Module]) -> None:
    """After each optimizer step, with the FSDP float8 all-gather on: the next step's weight scales,
    for every weight in one all-reduce (torchao's `precompute_float8_dynamic_scale_for_fsdp`)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
