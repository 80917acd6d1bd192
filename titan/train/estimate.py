"""Memory and throughput of a run before it starts, for any layout at any scale, on one CPU.

Each distinct rank role (a pipeline stage; without PP every rank is alike) is estimated on one process
that plays that rank in a fake process group of the full world size (torch's `fake` backend: every
collective returns at once). Its model parts are built on the meta device and parallelized by titan's
real plan; then, on fake tensors (`FakeTensorMode`: shapes and dtypes, no storage), they are
materialized and one micro-batch runs forward, backward and an optimizer step under torch's
`MemTracker` (`FSDPMemTracker` with FSDP), which counts live tensor bytes by kind. Nothing is
allocated, so a 405B model on 512 ranks takes seconds.

Parameters, gradients and optimizer state are exact (the local shards' sizes). Activations are the
tracker's peak for one micro-batch, times the micro-batches a pipeline stage holds at once. Compile is
not applied (fake tensors are not compiled): a compiled run fuses and saves somewhat less.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor

from titan.config.schema import RunConfig
from titan.distributed.mesh import ParallelDims
from titan.distributed.pipeline import stage_ids
from titan.models.llama.args import flops_per_token, num_params
from titan.models.llama.cp import apply_cp
from titan.models.llama.model import Transformer
from titan.models.llama.parallelize import parallelize_llama
from titan.models.llama.pipeline import build_stage_model, plan_pipeline

GIB = 1024**3


@dataclass(frozen=True)
class RoleEstimate:
    """One rank role's memory, in bytes, and the work of one of its forward passes."""

    role: str
    ranks: int  # how many ranks play it
    params: int  # this rank's parameter count (its shards)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # all the micro-batches it holds at once
    other_bytes: int  # gathered parameters, buffers, communication and temporary tensors at the peak
    microbatch: int  # sequences per forward
    seq_len: int  # tokens per sequence on this rank (after context parallelism)
    inflight: int  # micro-batches whose activations are alive together

    @property
    def peak_bytes(self) -> int:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.other_bytes
        )


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    """This process as `rank` of `world` in a process group whose collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("estimating needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _plan(cfg: RunConfig, dims: ParallelDims):
    """The pipeline's stages and micro-batches (pure arithmetic, as the trainer plans them)."""
    return plan_pipeline(cfg.model, cfg.parallelism, local_batch=cfg.training.global_batch_size // dims.dp)


def _stage_parts(
    cfg: RunConfig, dims: ParallelDims, pp_rank: int
) -> tuple[list[Transformer], list[tuple[bool, bool]], int]:
    """This pp rank's model parts on the meta device, whether each is the first and the last stage, and
    the micro-batch size."""
    if dims.pp == 1:
        with torch.device("meta"):
            return [Transformer(cfg.model)], [(True, True)], cfg.training.micro_batch_size
    plan = _plan(cfg, dims)
    ids = stage_ids(plan.schedule, pp_rank, plan.pp, plan.num_stages)
    last = plan.num_stages - 1
    parts = [build_stage_model(cfg.model, plan.layers[s], first=s == 0, last=s == last) for s in ids]
    return parts, [(s == 0, s == last) for s in ids], plan.microbatch_size


def _inflight(cfg: RunConfig, dims: ParallelDims, pp_rank: int) -> int:
    """Micro-batches whose activations a rank holds at its peak: one without PP (accumulation runs
    backward after each forward); under PP, GPipe holds all of them, 1F1B-style schedules the stages
    ahead of this one (pp - pp_rank), at most all."""
    if dims.pp == 1:
        return 1
    plan = _plan(cfg, dims)
    if plan.schedule == "GPipe":
        return plan.n_microbatches
    per_rank = plan.num_stages // plan.pp
    return min(plan.n_microbatches * per_rank, (dims.pp - pp_rank) * per_rank)


def _optimizer_bytes(cfg: RunConfig, params: list[torch.Tensor]) -> int:
    """AdamW: two moments shaped and typed as each parameter, and a float32 step counter per tensor;
    SGD: a momentum buffer when momentum is on."""
    param_bytes = local_bytes(params)
    if cfg.optimizer.name == "adamw":
        return 2 * param_bytes + 4 * len(params)
    return param_bytes if cfg.optimizer.momentum else 0


def _blocks(cfg: RunConfig, n: int, first: bool, last: bool) -> Transformer:
    """A stage like this rank's, with `n` blocks."""
    return build_stage_model(
        dataclasses.replace(cfg.model, n_layers=n), list(range(n)), first=first, last=last
    )


def _measure(cfg, dims, meshes, part, first: bool, microbatch: int) -> tuple[int, int]:
    """(activation bytes, transient bytes) of one forward + backward of `part` (meta, parallelized) on
    fake tensors, by torch's memory tracker: what the forward leaves alive for backward, and at the
    peak, what is neither that nor the persistent parameters and gradients (gathered parameters,
    unsharded gradients, communication buffers, temporaries)."""
    seq_len = cfg.training.seq_len // dims.cp
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        part.to_empty(device="cpu")
        part.init_rope()
    if dims.cp > 1:  # outside: torch's causal bias is a tensor subclass a fake tensor cannot become
        apply_cp(part, meshes["cp"], cfg.training.seq_len)
    with fake:
        tracker = FSDPMemTracker(part) if dims.fsdp_enabled else MemTracker()
        tracker.track_external(part)
        with tracker:
            if first:
                x = torch.randint(0, cfg.model.vocab_size, (microbatch, seq_len))
            else:  # the previous stage's hidden states; under TP, sequence-parallel shards of them
                x = torch.randn(microbatch, seq_len // dims.tp, cfg.model.dim)
            out = part(x)
            out = out.to_local() if isinstance(out, DTensor) else out
            (after_forward,) = tracker.get_tracker_snapshot("current").values()
            out.float().sum().backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    at_peak = by_kind(peak)
    persistent = sum(at_peak.get(k, 0) for k in STATE_KINDS) + at_peak.get("Activation", 0)
    return by_kind(after_forward).get("Activation", 0), max(at_peak["Total"] - persistent, 0)


# MemTracker's and FSDPMemTracker's names for parameters, gradients and optimizer state.
STATE_KINDS = ("Parameter", "Sharded Param", "Gradient", "Sharded Grad", "Optstate", "OptState")


def by_kind(snapshot: dict) -> dict[str, int]:
    return {str(getattr(k, "value", k)): v for k, v in snapshot.items()}


def _extrapolate(measured: list[int], blocks: int) -> int:
    """The value for `blocks` blocks from those measured with 1, 2, 3 blocks: the last one plus the
    last step per block for each further block. Every block saves the same activations, so they grow
    by a constant step; gathered parameters grow while FSDP keeps them (reshard_after_forward off, as
    under PP) and stop growing by the third block when it reshards (one gathered, one prefetched)."""
    if blocks <= len(measured):
        return measured[blocks - 1]
    return measured[-1] + (measured[-1] - measured[-2]) * (blocks - len(measured))


def estimate_role(cfg: RunConfig, world: int, pp_rank: int) -> RoleEstimate:
    """Parameters, gradients and optimizer state from this role's whole (meta) model; activations and
    transient buffers from fake runs of the same stage with 1, 2 and 3 blocks, extrapolated to its
    blocks: a 126-layer model costs three small runs."""
    dims = ParallelDims.resolve(cfg.parallelism, world)
    rank = pp_rank * (world // dims.pp)  # pp is the outermost mesh dimension (mesh.py)
    training = dataclasses.replace(cfg.training, compile=False)
    with fake_rank(rank, world):
        meshes = dims.build_meshes("cpu")
        parts, ends, microbatch = _stage_parts(cfg, dims, pp_rank)
        pipeline = dims.pp > 1

        def parallelize(model: Transformer) -> Transformer:
            return parallelize_llama(model, dims, meshes, training, cfg.parallelism, pipeline=pipeline)

        params = [p for part in parts for p in parallelize(part).parameters()]
        activations, other = 0, 0
        for part, (first, last) in zip(parts, ends, strict=True):
            runs = [
                _measure(cfg, dims, meshes, parallelize(_blocks(cfg, n, first, last)), first, microbatch)
                for n in range(1, min(3, len(part.layers)) + 1)
            ]
            activations += _extrapolate([a for a, _ in runs], len(part.layers))
            other += _extrapolate([o for _, o in runs], len(part.layers))
    param_bytes = local_bytes(params)
    inflight = _inflight(cfg, dims, pp_rank)
    return RoleEstimate(
        role=f"pp stage {pp_rank}" if dims.pp > 1 else "every rank",
        ranks=world // dims.pp,
        params=sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
        param_bytes=param_bytes,
        grad_bytes=param_bytes,  # gradients are kept in the parameters' dtype and sharding
        optimizer_bytes=_optimizer_bytes(cfg, params),
        activation_bytes=activations * inflight,
        other_bytes=other,
        microbatch=microbatch,
        seq_len=cfg.training.seq_len // dims.cp,
        inflight=inflight,
    )


def estimate(cfg: RunConfig, world: int) -> list[RoleEstimate]:
    """One estimate per distinct rank role, each in a fresh process: DTensor caches redistribution plans
    by mesh shape across process groups, so a second fake group in one process finds the first's."""
    dims = ParallelDims.resolve(cfg.parallelism, world)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return list(pool.map(estimate_role, [cfg] * dims.pp, [world] * dims.pp, range(dims.pp)))


@dataclass(frozen=True)
class StepWork:
    flops_per_device: float
    tokens_per_step: int


def step_work(cfg: RunConfig, world: int) -> StepWork:
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    return StepWork(flops_per_token(cfg.model, cfg.training.seq_len) * tokens / world, tokens)


def render(
    cfg: RunConfig,
    world: int,
    roles: list[RoleEstimate],
    *,
    device_gib: float,
    peak_tflops: float,
    mfu: float,
) -> str:
    """The dry run's table: memory per role against the device, then the step's work at a stated MFU."""
    gib = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
    lines = [
        f"{cfg.model.__class__.__name__}: {num_params(cfg.model):,} parameters; world {world}; "
        f"parallelism dp_replicate={cfg.parallelism.dp_replicate} dp_shard={cfg.parallelism.dp_shard} "
        f"cp={cfg.parallelism.cp} tp={cfg.parallelism.tp} pp={cfg.parallelism.pp}; ac={cfg.training.ac}",
        "",
        "| role | ranks | params (local) | params GiB | grads GiB | optimizer GiB | activations GiB "
        "(micro-batch x seq, in flight) | other GiB | peak GiB | of device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in roles:
        fits = "fits" if r.peak_bytes <= device_gib * GIB else "DOES NOT FIT"
        lines.append(
            f"| {r.role} | {r.ranks} | {r.params:,} | {gib(r.param_bytes)} | {gib(r.grad_bytes)} | "
            f"{gib(r.optimizer_bytes)} | {gib(r.activation_bytes)} ({r.microbatch} x {r.seq_len}, {r.inflight}) | "
            f"{gib(r.other_bytes)} | {gib(r.peak_bytes)} | {100 * r.peak_bytes / (device_gib * GIB):.0f}% of "
            f"{device_gib:g} GiB: {fits} |"
        )
    work = step_work(cfg, world)
    seconds = work.flops_per_device / (peak_tflops * 1e12 * mfu)
    lines += [
        "",
        f"per step: {work.tokens_per_step:,} tokens, {work.flops_per_device / 1e12:,.1f} TFLOP per device; at "
        f"{100 * mfu:.0f}% MFU of {peak_tflops:g} TFLOP/s: {seconds:.2f} s a step, "
        f"{work.tokens_per_step / seconds:,.0f} tokens/s ({work.tokens_per_step / seconds / world:,.0f} per device)",
    ]
    return "\n".join(lines)
