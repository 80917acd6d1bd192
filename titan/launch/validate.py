"""Cross-group checks of a RunConfig, run before any process group, tensor or directory exists.

Every message names the keys involved and a fix. All problems are reported at once.
"""

import logging
import math

import torch

from titan.checkpoint.options import config_problems
from titan.config.errors import ConfigError
from titan.config.schema import RunConfig
from titan.data.checks import check_data, num_workers_problem, vocab_warning
from titan.data.documents import SOURCES
from titan.data.formats import BAD_RECORD_POLICIES
from titan.data.holdout import overlap_problem
from titan.distributed.ac import AC_MODES
from titan.distributed.float8 import FLOAT8_DIM_MULTIPLE, FLOAT8_RECIPES
from titan.distributed.fsdp import DTYPES, RESHARD_CHOICES
from titan.distributed.mesh import ParallelDims
from titan.launch.identity import run_name_problem
from titan.models.llama.attention import ATTENTION_CHOICES
from titan.train.loss import CROSS_ENTROPY_CHOICES
from titan.train.optim import OPTIMIZERS, SCHEDULES, effective_warmup
from titan.train.validation import validation_batch_size

RESUME_POLICIES = ("auto", "never", "must")
ROPE_POSITIONS = ("sequence", "document")
PROGRESS_MODES = ("auto", "bar", "lines")
DEVICES = ("auto", "cpu", "cuda")
# The LR schedule computes in float64, exact for whole numbers up to 2**53: a step count past it is a typo.
MAX_STEPS = 2**53
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


def _choice(errors: list[str], key: str, value, choices) -> None:
    if value not in choices:
        errors.append(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(errors: list[str], key: str, value, minimum=1) -> None:
    if value < minimum:
        errors.append(f"{key}={value} must be >= {minimum}")


def _nearest_multiples(value: int, unit: int) -> str:
    lower = max(unit, value // unit * unit)
    return f"{lower} or {lower + unit}" if lower != value else str(value)


def world_size(cfg: RunConfig, gpus_on_machine: int) -> int:
    """cluster.nodes x `cluster.nproc_per_node`, or one rank per GPU, or 2 ranks on a CPU machine.

    A Slurm cluster config has settled nproc_per_node already, from the partition's GPUs.
    """
    per_node = cfg.cluster.nproc_per_node
    if per_node is None:
        per_node = gpus_on_machine if gpus_on_machine > 0 else 2
    return cfg.cluster.nodes * per_node


def validate(cfg: RunConfig, world: int) -> ParallelDims:
    """Raise ConfigError listing every problem; return the resolved parallel degrees."""
    errors: list[str] = []
    t, m, o, d = cfg.training, cfg.model, cfg.optimizer, cfg.data

    for key in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "gc_freq", "ac_layer_freq"):
        _positive(errors, f"training.{key}", getattr(t, key))
    _choice(errors, "training.param_dtype", t.param_dtype, DTYPES)
    _choice(errors, "training.reduce_dtype", t.reduce_dtype, DTYPES)
    _choice(errors, "training.ac", t.ac, AC_MODES)
    _choice(errors, "training.device", t.device, DEVICES)
    _choice(errors, "training.float8", t.float8, FLOAT8_RECIPES)
    _choice(errors, "training.cross_entropy", t.cross_entropy, CROSS_ENTROPY_CHOICES)
    _choice(errors, "training.attention", t.attention, ATTENTION_CHOICES)
    _choice(errors, "training.rope_positions", t.rope_positions, ROPE_POSITIONS)
    if t.rope_positions == "document" and t.attention != "block_causal":
        errors.append(
            "training.rope_positions=document restarts positions at each document, which only means "
            "something when tokens attend within their document: set training.attention=block_causal"
        )
    _positive(errors, "training.control_every", t.control_every)
    _positive(errors, "training.collective_timeout_s", t.collective_timeout_s)
    _positive(errors, "training.first_step_timeout_s", t.first_step_timeout_s)
    _positive(errors, "training.flight_recorder_entries", t.flight_recorder_entries, 0)
    if t.float8 != "none" and m.dim % FLOAT8_DIM_MULTIPLE:
        # Every block Linear reads or writes model.dim: none would become float8.
        errors.append(
            f"training.float8={t.float8} converts no layer: model.dim={m.dim} is not a multiple of "
            f"{FLOAT8_DIM_MULTIPLE} (float8 matmuls need it); set training.float8=none"
        )
    if t.device == "cuda" and not torch.cuda.is_available():
        errors.append(
            "training.device=cuda but this machine has no CUDA device; use training.device=auto or cpu"
        )
    if t.steps > MAX_STEPS:
        errors.append(f"training.steps={t.steps} is more than {MAX_STEPS} (2**53)")
    for key, value in (("training.max_norm", t.max_norm), ("optimizer.lr", cfg.optimizer.lr)):
        if not math.isfinite(value):
            errors.append(f"{key}={value} must be a finite number")
    _positive(errors, "training.max_nonfinite_steps", t.max_nonfinite_steps, 0)
    if t.max_norm < 0:
        errors.append(f"training.max_norm={t.max_norm} must be >= 0 (0 turns clipping off)")
    if t.seq_len > m.max_seq_len:
        errors.append(f"training.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower it")

    dims = None
    _choice(
        errors, "parallelism.reshard_after_forward", cfg.parallelism.reshard_after_forward, RESHARD_CHOICES
    )
    try:
        dims = ParallelDims.resolve(cfg.parallelism, world)
    except ValueError as e:
        errors.append(str(e))
    if dims is not None and world >= 1:
        unit = dims.dp * t.micro_batch_size
        if unit > 0 and t.global_batch_size % unit:
            errors.append(
                f"training.global_batch_size={t.global_batch_size} is not divisible by dp={dims.dp} x "
                f"training.micro_batch_size={t.micro_batch_size}; use {_nearest_multiples(t.global_batch_size, unit)}"
            )
        _check_model_parallel(errors, cfg, dims)
        problem = num_workers_problem(d.num_workers, t.global_batch_size, dims.dp)
        if problem:
            errors.append(problem)

    _choice(errors, "optimizer.name", o.name, OPTIMIZERS)
    _choice(errors, "optimizer.schedule", o.schedule, SCHEDULES)
    _choice(errors, "optimizer.implementation", o.implementation, IMPLEMENTATIONS)
    if o.lr <= 0:
        errors.append(f"optimizer.lr={o.lr} must be > 0")
    _positive(errors, "optimizer.warmup_steps", o.warmup_steps, 0)
    if o.warmup_steps >= t.steps >= 1:
        logging.getLogger("titan").warning(
            "warning: optimizer.warmup_steps=%d is not less than training.steps=%d: warming up for %d steps",
            o.warmup_steps,
            t.steps,
            effective_warmup(o.warmup_steps, t.steps),
        )
    if not 0 < o.decay_ratio <= 1:
        errors.append(f"optimizer.decay_ratio={o.decay_ratio} must be in (0, 1]")
    if not 0 <= o.min_lr_factor <= 1:
        errors.append(f"optimizer.min_lr_factor={o.min_lr_factor} must be in [0, 1]")

    _choice(errors, "data.source", d.source, SOURCES)
    _choice(errors, "data.on_bad_record", d.on_bad_record, BAD_RECORD_POLICIES)
    _positive(errors, "data.num_workers", d.num_workers, 0)
    _positive(errors, "data.holdout_every", d.holdout_every, 0)
    if d.holdout_every == 1:
        errors.append("data.holdout_every=1 would hold out every document; use 0 (none) or >= 2")
    if dims is not None:
        errors += validation_problems(cfg, dims)
    errors += config_problems(cfg.checkpoint)
    _positive(errors, "metrics.log_freq", cfg.metrics.log_freq)
    _choice(errors, "metrics.progress", cfg.metrics.progress, PROGRESS_MODES)
    _choice(errors, "run.resume", cfg.run.resume, RESUME_POLICIES)
    problem = run_name_problem(cfg.run.name)
    if problem:
        errors.append(problem)
    _positive(errors, "cluster.nodes", cfg.cluster.nodes)
    if cfg.cluster.nproc_per_node is not None:
        _positive(errors, "cluster.nproc_per_node", cfg.cluster.nproc_per_node)

    if errors:
        if len(errors) == 1:  # one problem, one line
            raise ConfigError(errors[0])
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))
    return dims


def _check_model_parallel(errors: list[str], cfg: RunConfig, dims: ParallelDims) -> None:
    m, t, p = cfg.model, cfg.training, cfg.parallelism
    if dims.tp > 1:
        for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            if getattr(m, key) % dims.tp:
                errors.append(
                    f"model.{key}={getattr(m, key)} is not divisible by parallelism.tp={dims.tp}; "
                    f"use a tp that divides it"
                )
    balance = 2 * dims.cp * dims.tp if dims.cp > 1 else dims.tp
    if t.seq_len % balance:
        what = (
            "2 x cp x tp (load-balanced context parallelism)" if dims.cp > 1 else "tp (sequence parallelism)"
        )
        errors.append(
            f"training.seq_len={t.seq_len} is not divisible by {what} = {balance}; "
            f"use a multiple of {balance}"
        )
    if dims.pp > 1:
        _check_pipeline(errors, cfg, dims)
    if cfg.training.attention == "block_causal" and dims.cp > 1:
        errors.append(
            f"training.attention=block_causal with parallelism.cp={dims.cp}: each context-parallel rank "
            "attends with torch's lower-right causal kernel over its share of the sequence, which takes no "
            "document mask; use parallelism.cp=1 (document masking keeps sequences short anyway)"
        )
    if p.cpu_offload and not dims.fsdp_enabled:
        errors.append(
            "parallelism.cpu_offload=true offloads FSDP's sharded parameters, but this layout does not "
            f"shard (dp_shard={dims.dp_shard} x cp={dims.cp} = 1); set parallelism.cpu_offload=false, "
            "or shard with parallelism.dp_shard > 1"
        )
    # Float8 with tp > 1 uses titan's plain TP styles: Float8Linear casts each rank's shards, and the
    # TP collectives move bf16/fp32. torchao's Float8 TP styles (float8 all-gathers) stay off until a
    # multi-GPU test covers them. Float8 vs the GPU (SM 8.9+) is checked when the model is built:
    # reading the compute capability here would open a CUDA context in the launching process.
    if p.async_tp:
        import torch

        if dims.tp == 1 or not t.compile or not torch.cuda.is_available() or t.device == "cpu":
            errors.append(
                "parallelism.async_tp=true needs parallelism.tp > 1, training.compile=true and CUDA "
                f"(got tp={dims.tp}, compile={t.compile}, cuda={torch.cuda.is_available()}); "
                "set parallelism.async_tp=false"
            )


def _check_pipeline(errors: list[str], cfg: RunConfig, dims: ParallelDims) -> None:
    from titan.distributed.pipeline import layout_problems
    from titan.models.llama.pipeline import plan_pipeline

    p, t = cfg.parallelism, cfg.training
    try:
        plan_pipeline(cfg.model, p, local_batch=t.global_batch_size // dims.dp)
    except ValueError as e:
        errors.append(str(e))
    errors += layout_problems(
        p.pp_schedule,
        ddp=dims.ddp_enabled and not dims.fsdp_enabled,
        reshards_after_forward=p.reshard_after_forward == "always" and dims.fsdp_enabled,
        backward_once=t.compile or t.ac == "op",
    )


def validate_data(cfg: RunConfig) -> None:
    """Checks that read files (tokenizer, local data): after the cheap checks, still before any rank.

    A tokenizer smaller than the model is logged as a warning."""
    try:
        tokenizer = check_data(cfg.data)
        warning = vocab_warning(tokenizer, cfg.data.tokenizer, cfg.model.vocab_size)
        if cfg.validation.enable and cfg.validation.data is not None:
            try:
                check_data(cfg.validation.data)
            except ValueError as e:
                raise ValueError(f"validation.data: {e}") from None
            problem = overlap_problem(cfg.data, cfg.validation.data)
            if problem:
                raise ValueError(problem)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if warning:
        logging.getLogger("titan").warning("warning: %s", warning)


def validation_problems(cfg: RunConfig, dims: ParallelDims) -> list[str]:
    """The `validation` block against the layout and the training data (files are compared in
    validate_data)."""
    v, t = cfg.validation, cfg.training
    if not v.enable:
        return []
    errors: list[str] = []
    _positive(errors, "validation.every", v.every)
    _positive(errors, "validation.steps", v.steps)
    batch = validation_batch_size(cfg)
    if batch % dims.dp:
        errors.append(
            f"validation.global_batch_size={batch} is not divisible by dp={dims.dp}; use "
            f"{_nearest_multiples(batch, dims.dp)}"
        )
    if dims.pp > 1 and batch != t.global_batch_size:
        errors.append(
            f"validation.global_batch_size={batch} with parallelism.pp={dims.pp}: the pipeline's "
            f"microbatches are cut for training.global_batch_size={t.global_batch_size}; set "
            "validation.global_batch_size=null"
        )
    if v.data is None and not cfg.data.holdout_every:
        errors.append(
            "validation.enable=true needs held-out data: set data.holdout_every=N (every N-th document of "
            "the training data is held out of training) or give validation.data"
        )
    if v.data is not None:
        if v.data.tokenizer != cfg.data.tokenizer:
            errors.append(
                f"validation.data.tokenizer={v.data.tokenizer} is not data.tokenizer={cfg.data.tokenizer}: "
                "a loss over other token ids says nothing about the model; use the training tokenizer"
            )
    return errors
