"""This rank's model: built on the meta device, parallelized from outside, materialized and initialized;
and the loss it trains with."""

import torch

from titan.config.schema import RunConfig
from titan.distributed.mesh import ParallelDims
from titan.models.llama.cp import apply_cp
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.models.llama.parallelize import parallelize_llama
from titan.models.llama.pipeline import build_pipeline
from titan.train.loss import loss_function


def build_loss(cfg: RunConfig):
    """The loss `training.cross_entropy` names, compiled with the blocks: the fp32 upcast and the
    log-softmax over the vocabulary fuse."""
    loss = loss_function(cfg.training.cross_entropy)
    if cfg.training.compile:
        return torch.compile(loss, backend=cfg.training.compile_backend)
    return loss


def build_model(cfg: RunConfig, dims: ParallelDims, meshes: dict, device: torch.device, loss_fn):
    """This rank's model parts (the whole model, or its pipeline stages), parallelized, materialized
    and initialized; and the pipeline that runs them (None without PP)."""
    pipeline = None
    if dims.pp > 1:
        local_batch = cfg.training.global_batch_size // dims.dp
        pipeline = build_pipeline(cfg.model, cfg.parallelism, meshes["pp"], local_batch=local_batch)
        parts = pipeline.model_parts
    else:
        with torch.device("meta"):
            parts = [Transformer(cfg.model)]
    # FSDP's CPU offload keeps the sharded parameters (and gradients, optimizer state) in host memory,
    # pinned on CUDA, and refuses parameters materialized elsewhere. The rotary table is a buffer,
    # not offloaded: init_weights puts it on `device`.
    param_device = torch.device("cpu") if cfg.parallelism.cpu_offload else device
    for i, part in enumerate(parts):
        part = parallelize_llama(
            part, dims, meshes, cfg.training, cfg.parallelism, pipeline=pipeline is not None, device=device
        )
        part.to_empty(device=param_device)
        init_weights(part, cfg.model, seed=cfg.training.seed, device=device)
        if dims.cp > 1:  # needs the materialized rope table, so after init
            apply_cp(part, meshes["cp"], cfg.training.seq_len)
        part.train()
        parts[i] = part
    if pipeline is not None:
        pipeline.build_schedule(device, loss_fn)
    return parts, pipeline
