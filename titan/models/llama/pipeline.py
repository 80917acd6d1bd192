"""Split a Llama Transformer into pipeline stages: which blocks each stage holds, and its module.

A stage is a whole `Transformer` with the blocks of other stages deleted: the first stage keeps the
token embedding, the last the final norm and output projection. Parameter names stay those of the
full model ("layers.7.attention.wq.weight"), so checkpoints, initialisation and Hugging Face
conversion see one model however it is cut. `build_pipeline` hands the stages to the model-agnostic
runner in titan/distributed/pipeline.py, which places them on ranks and runs the schedule.
Block-causal attention: every stage takes the document ids as the keyword `documents` (a side input
of `Pipeline.step`) and builds the document mask of its own blocks, as the whole model does once.
"""

import math

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan.config.schema import ParallelismConfig
from titan.distributed.pipeline import (
    Pipeline,
    PipelinePlan,
    check_schedule,
    default_num_stages,
    plan_microbatches,
    stage_count_needed,
)
from titan.models.llama.args import ModelArgs
from titan.models.llama.model import Transformer


def build_pipeline(
    args: ModelArgs, cfg: ParallelismConfig, pp_mesh: DeviceMesh, *, local_batch: int
) -> Pipeline:
    """Plan the stages (raising on bad keys) and build this rank's meta-device stage models."""
    plan = plan_pipeline(args, cfg, local_batch=local_batch)
    last = plan.num_stages - 1
    return Pipeline(
        plan, pp_mesh, lambda s: build_stage_model(args, plan.layers[s], first=s == 0, last=s == last)
    )


def plan_pipeline(args: ModelArgs, cfg: ParallelismConfig, *, local_batch: int) -> PipelinePlan:
    """Check the pipeline keys against the model and the batch, and lay out the stages.

    local_batch: sequences per optimizer step on one data-parallel rank (global batch / dp).
    Stages: pp for GPipe and 1F1B, 2*pp for the looped and V schedules, or as many as
    `parallelism.pp_layers_per_stage` makes (see `stages_for_layers_per_stage`); the microbatches
    as `plan_microbatches` cuts them.
    """
    check_schedule(cfg.pp_schedule)
    if args.tie_embeddings and cfg.pp > 1:
        raise ValueError(
            f"model.tie_embeddings=true with parallelism.pp={cfg.pp}: the shared embedding/output tensor would "
            "live on the first and the last stage; set model.tie_embeddings=false or parallelism.pp=1"
        )
    layers = split_layers(args.n_layers, _num_stages(args, cfg), cfg.pp_layers_per_stage)
    return plan_microbatches(cfg, layers, local_batch=local_batch)


def _num_stages(args: ModelArgs, cfg: ParallelismConfig) -> int:
    if cfg.pp_layers_per_stage is None:
        return default_num_stages(cfg.pp_schedule, cfg.pp)
    num_stages = stages_for_layers_per_stage(args.n_layers, cfg.pp_layers_per_stage)
    want = stage_count_needed(cfg.pp_schedule, cfg.pp, num_stages)
    if want is not None:
        raise ValueError(
            f"parallelism.pp_layers_per_stage={cfg.pp_layers_per_stage} cuts model.n_layers={args.n_layers} "
            f"(+ embedding and output, one layer each) into {num_stages} stages, but "
            f"parallelism.pp_schedule={cfg.pp_schedule} needs {want}; change parallelism.pp_layers_per_stage "
            "(null splits evenly)"
        )
    return num_stages


def stages_for_layers_per_stage(n_layers: int, layers_per_stage: int) -> int:
    """How many stages `parallelism.pp_layers_per_stage` cuts the model into.

    The token embedding and the output head (final norm + output projection) each count as one
    layer's worth of work (torchtitan's default weights): the model is the sequence
    [embedding, block 0, ..., block n-1, output] of n+2 units, cut into consecutive chunks of
    `layers_per_stage` units; the last chunk may be shorter.
    """
    if layers_per_stage < 1:
        raise ValueError(f"parallelism.pp_layers_per_stage={layers_per_stage} must be >= 1 (or null)")
    return math.ceil((n_layers + 2) / layers_per_stage)


def split_layers(n_layers: int, num_stages: int, layers_per_stage: int | None = None) -> list[list[int]]:
    """The block indices of each stage, in stage order, every block exactly once.

    layers_per_stage=None: blocks split evenly; the leftover blocks go to the middle stages first and
    then to the first, because the first and last stages also run the embedding and the output head
    (the output head, a dim x vocab matmul and the loss, is the heavier one).
    layers_per_stage=k: stage s holds units [s*k, (s+1)*k) of [embedding, blocks..., output] (see
    `stages_for_layers_per_stage`), so the first and last stages hold k-1 blocks (or fewer, last).
    """
    if layers_per_stage is None:
        base, extra = divmod(n_layers, num_stages)
        order = list(range(1, num_stages - 1)) + [0]
        counts = [base + (s in order[:extra]) for s in range(num_stages)]
    else:
        needed = stages_for_layers_per_stage(n_layers, layers_per_stage)
        if needed != num_stages:
            raise ValueError(
                f"parallelism.pp_layers_per_stage={layers_per_stage} cuts model.n_layers={n_layers} (+ embedding "
                f"and output, one layer each) into {needed} stages, but the pipeline has {num_stages}; "
                f"{_fitting_layers_per_stage(n_layers, num_stages)}"
            )
        counts = _blocks_per_stage(n_layers, num_stages, layers_per_stage)
    if min(counts) < 1:
        raise ValueError(
            f"{num_stages} pipeline stages with model.n_layers={n_layers} leave a stage without a transformer "
            f"block (blocks per stage: {counts}); lower parallelism.pp, use a single-stage schedule "
            "(parallelism.pp_schedule=1F1B) or change parallelism.pp_layers_per_stage"
        )
    starts = [sum(counts[:s]) for s in range(num_stages)]
    return [list(range(start, start + count)) for start, count in zip(starts, counts)]


def _blocks_per_stage(n_layers: int, num_stages: int, layers_per_stage: int) -> list[int]:
    # unit u of [embedding, block 0, ..., block n-1, output] is block u-1
    k = layers_per_stage
    return [len(range(max(s * k, 1), min((s + 1) * k, n_layers + 1))) for s in range(num_stages)]


def _fitting_layers_per_stage(n_layers: int, num_stages: int) -> str:
    fits = [
        k
        for k in range(1, n_layers + 3)
        if stages_for_layers_per_stage(n_layers, k) == num_stages
        and min(_blocks_per_stage(n_layers, num_stages, k)) >= 1
    ]
    if fits:
        return f"use parallelism.pp_layers_per_stage in {fits} or null (even split)"
    return "no value gives that many stages; set parallelism.pp_layers_per_stage=null (even split)"


def build_stage_model(args: ModelArgs, layer_ids: list[int], *, first: bool, last: bool) -> Transformer:
    """The stage's module on the meta device: blocks `layer_ids`, the embedding if `first`, the final
    norm and output projection if `last`. Materialise with `to_empty` and initialise as a whole model.
    Tied embeddings are refused by `plan_pipeline`."""
    with torch.device("meta"):
        model = Transformer(args)
    keep = {str(i) for i in layer_ids}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model
