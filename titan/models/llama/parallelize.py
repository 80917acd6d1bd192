"""Apply titan's parallelisms to a Llama Transformer from outside, in order:
Float8 -> TP -> AC -> compile -> FSDP/DDP.

Float8 comes first: torchao swaps whole nn.Linear modules, which TP and FSDP then shard like any other.

Context parallelism needs the materialized rope table, so the trainer applies it after init.
"""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan.config.schema import ParallelismConfig, TrainingConfig
from titan.distributed.ac import apply_ac
from titan.distributed.compile import compile_blocks
from titan.distributed.float8 import apply_float8, fsdp_float8_all_gather
from titan.distributed.fsdp import apply_ddp, apply_fsdp
from titan.distributed.mesh import ParallelDims
from titan.distributed.tp import enable_async_tp
from titan.models.llama.model import Transformer
from titan.models.llama.tp import apply_tp

CPU = torch.device("cpu")


def parallelize_llama(
    model: Transformer,
    dims: ParallelDims,
    meshes: dict[str, DeviceMesh],
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    *,
    pipeline: bool = False,
    device: torch.device = CPU,
) -> Transformer:
    """`model` is a whole Transformer or one pipeline stage of it (on the meta device); `device` is
    where it will train."""
    if training.float8 != "none":
        all_gather = fsdp_float8_all_gather(
            training.float8,
            fsdp=dims.fsdp_enabled,
            cpu_offload=parallelism.cpu_offload,
            device_type=device.type,
        )
        apply_float8(model, training.float8, fsdp_float8_all_gather=all_gather, device=device)
    if dims.tp > 1:
        apply_tp(model, meshes["tp"], loss_parallel=parallelism.loss_parallel)
        if parallelism.async_tp:
            enable_async_tp(meshes["tp"])
    apply_ac(model.layers, training.ac, training.ac_layer_freq)
    if training.compile:
        # A whole compiled block of DTensors fails in backward on torch 2.13 ('_local_tensor');
        # attention and feed-forward compiled apart work, and hold nearly all the compute.
        parts = ("attention", "feed_forward") if dims.tp > 1 else ()
        compile_blocks(model.layers, training.compile_backend, parts=parts)
    if dims.fsdp_enabled:
        apply_fsdp(
            model,
            list(model.layers.values()),
            meshes["fsdp"],
            param_dtype=training.param_dtype,
            reduce_dtype=training.reduce_dtype,
            reshard_after_forward=parallelism.reshard_after_forward,
            cpu_offload=parallelism.cpu_offload,
            pipeline=pipeline,
        )
    elif dims.ddp_enabled:
        apply_ddp(model, meshes["dp_replicate"])
    return model
