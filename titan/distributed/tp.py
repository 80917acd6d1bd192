"""Async tensor parallelism: TP communication overlapped with matmuls, for any model's TP plan."""

import torch
from torch.distributed.device_mesh import DeviceMesh


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Overlap TP communication with matmuls (CUDA, compiled blocks): inductor's micro-pipeline TP
    fuses all-gather + matmul and matmul + reduce-scatter over symmetric memory."""
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
