"""Apply titan's parallelisms to a Llama Transformer from outside, in order: AC -> compile -> FSDP/DDP."""

from torch.distributed.device_mesh import DeviceMesh

from titan.config.schema import ParallelismConfig, TrainingConfig
from titan.models.llama.model import Transformer
from titan.parallel.ac import apply_ac
from titan.parallel.compile import compile_blocks
from titan.parallel.fsdp import apply_ddp, apply_fsdp
from titan.parallel.mesh import ParallelDims


def parallelize_llama(
    model: Transformer,
    dims: ParallelDims,
    meshes: dict[str, DeviceMesh],
    training: TrainingConfig,
    parallelism: ParallelismConfig,
) -> Transformer:
    apply_ac(model.layers, training.ac, training.ac_layer_freq)
    if training.compile:
        compile_blocks(model.layers, training.compile_backend)
    if dims.fsdp_enabled:
        apply_fsdp(
            model,
            list(model.layers.values()),
            meshes["fsdp"],
            param_dtype=training.param_dtype,
            reduce_dtype=training.reduce_dtype,
            reshard_after_forward=parallelism.reshard_after_forward,
            cpu_offload=parallelism.cpu_offload,
        )
    elif dims.ddp_enabled:
        apply_ddp(model, meshes["dp_replicate"])
    return model
