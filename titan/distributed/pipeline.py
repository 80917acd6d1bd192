"""Pipeline parallelism: torch.distributed.pipelining stages and schedules around a model's parts.

Model-agnostic: a model's planner decides which blocks each stage holds and builds a stage's module
(for Llama: models/llama/pipeline.py); this module places the stages on ranks, cuts the batch
into microbatches, refuses the wrappings the schedules run wrong, and runs the schedule.

Three steps, in this order (the trainer's parallelisms go in the middle):
1. the model's `build_pipeline(...)` plans the stages and builds this rank's parts on the meta device
   through `Pipeline(plan, pp_mesh, build_stage)` (`pipeline.model_parts`);
2. the trainer applies TP -> AC -> compile -> FSDP to each part, `to_empty`s and initialises it;
3. `pipeline.build_schedule(device, loss_fn)` wraps the parts in `PipelineStage`s and the schedule;
then `pipeline.step(inputs, labels, grad_scale=..., **side_inputs)` once per optimizer step.

Side inputs are per-sequence tensors every stage's forward takes as keyword arguments (the document
ids of block-causal attention): only the first stage sees the tokens, so each pipeline rank, which
holds the same batch, hands them to its own stages. torch's schedules cut keyword tensors into
microbatches along dim 0 like the inputs, give microbatch i's to every stage's forward of microbatch
i, and neither send them between stages nor return gradients for them.

Schedules (torch's names): GPipe and 1F1B run one stage per rank; Interleaved1F1B, LoopedBFS and
InterleavedZeroBubble run `v` stages per rank in a loop (rank r holds stages r, r+pp, r+2pp, ...);
ZBVZeroBubble and DualPipeV run two stages per rank in a V (rank r holds stages r and 2pp-1-r, so
rank 0 holds both the first and the last stage).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._composable.replicate import replicate as ddp_replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class
from torch.nn import Module

from titan.config.schema import ParallelismConfig

SINGLE_STAGE = ("GPipe", "1F1B")
LOOPED = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
SCHEDULES = SINGLE_STAGE + LOOPED + V_SHAPED
# Backward split into input-grad (I) and weight-grad (W) passes. The W pass runs outside FSDP's
# backward hooks; gradients are right only while FSDP keeps the gathered parameters from forward
# until the schedule's final reduce (reshard_after_forward off, the default under PP; tested).
# Compiled blocks and op-level activation checkpointing refuse a second backward pass.
SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
# torch refuses fewer microbatches than stages for these (checked here, before any process group);
# the others run with fewer (measured exact on 2 ranks down to one microbatch), only with more bubble.
NEEDS_MICROBATCH_PER_STAGE = ("1F1B", "DualPipeV")
# Keywords of torch's `schedule.step` itself: a side input of one of these names would not reach the model.
SCHEDULE_STEP_KEYWORDS = ("target", "losses", "return_outputs", "loss_kwargs")


@dataclass(frozen=True)
class PipelinePlan:
    """Where every stage lives and how the local batch is cut; pure data, no process group."""

    schedule: str
    pp: int
    layers: list[list[int]]  # block indices of each stage, stage order
    n_microbatches: int
    microbatch_size: int  # sequences per forward: local batch / n_microbatches

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def stage_ids(self, pp_rank: int) -> list[int]:
        return stage_ids(self.schedule, pp_rank, self.pp, self.num_stages)


def stage_ids(schedule: str, pp_rank: int, pp: int, num_stages: int) -> list[int]:
    """The stages pipeline rank `pp_rank` holds, in the order the schedule expects them."""
    if schedule in V_SHAPED:
        return [pp_rank, num_stages - 1 - pp_rank]
    return list(range(pp_rank, num_stages, pp))


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"parallelism.pp_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")


def default_num_stages(schedule: str, pp: int) -> int:
    """One stage per rank for GPipe and 1F1B, two for the looped and V schedules."""
    return (1 if schedule in SINGLE_STAGE else 2) * pp


def stage_count_needed(schedule: str, pp: int, num_stages: int) -> str | None:
    """What `schedule` on `pp` ranks needs when `num_stages` stages do not fit it; None when they do."""
    if schedule in SINGLE_STAGE:
        fits, want = num_stages == pp, f"exactly parallelism.pp={pp} stages"
    elif schedule in V_SHAPED:
        fits, want = num_stages == 2 * pp, f"exactly 2 x parallelism.pp = {2 * pp} stages"
    else:
        fits, want = num_stages % pp == 0, f"a multiple of parallelism.pp={pp} stages"
    return None if fits else want


def plan_microbatches(cfg: ParallelismConfig, layers: list[list[int]], *, local_batch: int) -> PipelinePlan:
    """The plan for stages holding `layers`, with the local batch cut into microbatches.

    local_batch: sequences per optimizer step on one data-parallel rank (global batch / dp).
    Microbatches (`parallelism.pp_microbatches`, default: one per stage, the fewest that keep every
    stage busy) split the local batch; each holds local_batch / n_microbatches sequences, which
    replaces `training.micro_batch_size` under pipeline parallelism.
    """
    num_stages = len(layers)
    n_microbatches = cfg.pp_microbatches if cfg.pp_microbatches is not None else num_stages
    if n_microbatches < 1:
        raise ValueError(
            f"parallelism.pp_microbatches={n_microbatches} must be >= 1 (or null: one per stage)"
        )
    if cfg.pp_schedule in NEEDS_MICROBATCH_PER_STAGE and n_microbatches < num_stages:
        raise ValueError(
            f"parallelism.pp_schedule={cfg.pp_schedule} needs at least one microbatch per stage, but "
            f"parallelism.pp_microbatches={n_microbatches} < {num_stages} stages; raise it to >= {num_stages} "
            "(or null)"
        )
    if local_batch % n_microbatches:
        divisors = [d for d in range(num_stages, local_batch + 1) if local_batch % d == 0]
        raise ValueError(
            f"the local batch of {local_batch} sequences (training.global_batch_size / dp) does not split into "
            f"parallelism.pp_microbatches={n_microbatches} equal microbatches; set parallelism.pp_microbatches "
            f"to one of {divisors or [local_batch]} or change training.global_batch_size"
        )
    return PipelinePlan(cfg.pp_schedule, cfg.pp, layers, n_microbatches, local_batch // n_microbatches)


def layout_problems(
    schedule: str, *, ddp: bool, reshards_after_forward: bool, backward_once: bool
) -> list[str]:
    """The wrappings of the stages that torch's pipelining runs wrong or breaks on mid-step (each measured).

    ddp: the parts are replicated by composable DDP (`replicate`); reshards_after_forward: FSDP frees
    the gathered parameters after forward; backward_once: compiled blocks or op-level activation
    checkpointing. The launch checks these from the config, `Pipeline.build_schedule` from the parts.
    """
    problems = []
    if ddp:
        problems.append(
            "DDP (parallelism.dp_replicate > 1 with dp_shard=1) with parallelism.pp > 1 gives wrong gradients "
            "(the pipeline's backward bypasses DDP's all-reduce hooks); use parallelism.dp_shard > 1 (FSDP or HSDP)"
        )
    if schedule in SPLIT_BACKWARD and reshards_after_forward:
        problems.append(
            f"parallelism.pp_schedule={schedule} with parallelism.reshard_after_forward=always loses "
            "gradients (the separate weight-gradient pass runs after FSDP freed the parameters); use "
            "reshard_after_forward=default or a non-zero-bubble schedule (1F1B, GPipe, Interleaved1F1B)"
        )
    if schedule in SPLIT_BACKWARD and backward_once:
        problems.append(
            f"parallelism.pp_schedule={schedule} runs backward in two passes, which compiled blocks and "
            "training.ac=op refuse; set training.compile=false and training.ac to none, full or layer, or "
            "use 1F1B, GPipe, Interleaved1F1B or LoopedBFS"
        )
    return problems


class Pipeline:
    """This rank's stages of the pipeline, and the schedule that runs them."""

    def __init__(self, plan: PipelinePlan, pp_mesh: DeviceMesh, build_stage: Callable[[int], Module]):
        """build_stage(stage_id) -> that stage's module on the meta device (the model's planner gives it)."""
        if pp_mesh.size() != plan.pp:
            raise ValueError(f"the pp mesh has {pp_mesh.size()} ranks but parallelism.pp={plan.pp}")
        self.plan = plan
        self.pp_mesh = pp_mesh
        self.stage_ids = plan.stage_ids(pp_mesh.get_local_rank())
        last = plan.num_stages - 1
        # Meta-device parts: the trainer parallelises and materialises each one, and may replace an
        # entry with its wrapped module before `build_schedule`.
        self.model_parts: list[Module] = [build_stage(s) for s in self.stage_ids]
        self.has_first_stage = 0 in self.stage_ids
        self.has_last_stage = last in self.stage_ids
        self.schedule = None
        self._loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._device: torch.device | None = None
        self._grad_scale = 1.0
        self._loss_sums: list[torch.Tensor] = []

    def build_schedule(
        self, device: torch.device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ):
        """Wrap the materialised parts in stages and build the schedule.

        loss_fn(logits, labels) -> the microbatch's loss summed over its tokens (unscaled), e.g.
        `cross_entropy_sum`; `step` multiplies it by its `grad_scale`.
        """
        self._check_parts(device)
        self._loss_fn, self._device = loss_fn, device
        group = self.pp_mesh.get_group()
        stages = [
            PipelineStage(part, stage_id, self.plan.num_stages, device, group=group)
            for part, stage_id in zip(self.model_parts, self.stage_ids, strict=True)
        ]
        schedule_class = get_schedule_class(self.plan.schedule)
        # scale_grads=False: the loss is already a sum scaled by grad_scale (1 / tokens of the whole
        # step, times dp), so microbatch gradients must add up, not be averaged over microbatches.
        common = dict(n_microbatches=self.plan.n_microbatches, loss_fn=self._scaled_loss, scale_grads=False)
        if self.plan.schedule in SINGLE_STAGE:
            self.schedule = schedule_class(stages[0], **common)
        else:
            self.schedule = schedule_class(stages, **common)

    def _check_parts(self, device: torch.device) -> None:
        """Refuse the wrapped parts that `layout_problems` names (the launch refused their config already)."""
        schedule = self.plan.schedule
        problems = layout_problems(
            schedule,
            ddp=any(ddp_replicate.state(part) is not None for part in self.model_parts),
            # a collective, so taken only where a split backward makes resharding matter
            reshards_after_forward=schedule in SPLIT_BACKWARD
            and self._any_rank_reshards_after_forward(device),
            backward_once=any(_runs_backward_once(part) for part in self.model_parts),
        )
        if problems:
            raise ValueError("\n".join(problems))

    def _any_rank_reshards_after_forward(self, device: torch.device) -> bool:
        # Decided together: a rank that refused alone would leave the others waiting in the schedule.
        flag = torch.tensor(
            float(any(_reshards_after_forward(part) for part in self.model_parts)), device=device
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pp_mesh.get_group())
        return bool(flag.item())

    def _scaled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self._loss_fn(logits, labels)
        self._loss_sums.append(loss_sum.detach())
        return loss_sum * self._grad_scale

    def step(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        grad_scale: float,
        **side_inputs: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Forward and backward over this rank's local batch (gradients accumulate into .grad).

        Every rank of the pipeline passes the same batch; the first stage reads the inputs, the last
        the labels. Each microbatch's backward starts from loss_fn(...) * grad_scale, so with
        grad_scale = dp / global_tokens the gradients equal the single-process ones. Returns the
        unscaled loss summed over the local batch on the rank holding the last stage, else None.

        side_inputs: tensors [local batch, ...] that every stage's forward takes as keyword arguments,
        cut into microbatches like the inputs (e.g. `documents=document_ids(inputs, bos_id)`); one
        given as None is left out, so the stages run with their default.
        """
        self._grad_scale = grad_scale
        args, target, side = self._schedule_inputs(inputs, labels, side_inputs)
        self.schedule.step(*args, target=target, return_outputs=False, **side)
        return self._local_batch_loss()

    @torch.no_grad()
    def evaluate(
        self, inputs: torch.Tensor, labels: torch.Tensor, **side_inputs: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Forward only (torch's `schedule.eval`), as `step` takes its inputs: the unscaled loss summed
        over the local batch on the rank holding the last stage, else None. No gradient is touched."""
        args, target, side = self._schedule_inputs(inputs, labels, side_inputs)
        self.schedule.eval(*args, target=target, **side)
        return self._local_batch_loss()

    def _schedule_inputs(
        self, inputs: torch.Tensor, labels: torch.Tensor, side_inputs: dict[str, torch.Tensor | None]
    ) -> tuple[tuple, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The schedule's positional args (the first stage's inputs), target (the last stage's labels) and
        keyword side inputs, on the device; the losses of the coming run start anew."""
        if self.schedule is None:
            raise RuntimeError("call build_schedule(device, loss_fn) before running the pipeline")
        device = self._device
        side = {name: t.to(device) for name, t in side_inputs.items() if t is not None}
        for name, t in side.items():
            if name in SCHEDULE_STEP_KEYWORDS:
                raise ValueError(f"side input {name!r} is a keyword of the schedule's step; rename it")
            if t.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"side input {name!r} holds {t.shape[0]} sequences, the inputs {inputs.shape[0]}"
                )
        self._loss_sums = []
        args = (inputs.to(device),) if self.has_first_stage else ()
        target = labels.to(device) if self.has_last_stage else None
        return args, target, side

    def _local_batch_loss(self) -> torch.Tensor | None:
        if not self.has_last_stage:
            return None
        # On the first step torch infers the stages' shapes with one extra forward/backward of
        # microbatch 0 (its loss included, not accumulated into .grad): the last n losses are the step's.
        return torch.stack(self._loss_sums[-self.plan.n_microbatches :]).sum()


def _runs_backward_once(part: Module) -> bool:
    # In-place `Module.compile` (titan's way) hides from torch's own check, which looks for
    # OptimizedModule wrappers; op-level AC is a checkpoint wrapper given a context_fn.
    return any(
        getattr(m, "_compiled_call_impl", None) is not None
        or (isinstance(m, CheckpointWrapper) and "context_fn" in m.checkpoint_fn.keywords)
        for m in part.modules()
    )


def _reshards_after_forward(part: Module) -> bool:
    # No public getter in torch 2.13: FSDP's param groups keep a post-forward mesh only when they reshard.
    return any(
        group._reshard_after_forward
        for m in part.modules()
        if isinstance(m, FSDPModule)
        for group in m._get_fsdp_state()._fsdp_param_groups
    )
