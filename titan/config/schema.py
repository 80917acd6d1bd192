"""The typed run configuration: one frozen dataclass per config group, and RunConfig holding them all.

These defaults are the only ones: the launch layer registers each class as its group's base, and every
`conf/<group>/<option>.yaml` states only how it differs. Library code only ever sees these objects,
never a DictConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from titan.config.plain import to_plain
from titan.models.llama.args import ModelArgs


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 100
    seq_len: int = 256
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per rank per forward/backward
    seed: int = 0
    deterministic: bool = False
    param_dtype: str = "bfloat16"  # bfloat16 | float32
    reduce_dtype: str = "float32"  # bfloat16 | float32
    compile: bool = False
    compile_backend: str = "inductor"  # any torch.compile backend; tests use aot_eager
    ac: str = "none"  # none | full | layer | op
    ac_layer_freq: int = 2  # with ac=layer: checkpoint every N-th block
    max_norm: float = 1.0  # gradient-norm clip; 0 disables clipping
    # a step whose gradients are not finite is skipped (weights and optimizer state untouched); the
    # run stops once more steps than this were skipped since it was launched (0: at the first)
    max_nonfinite_steps: int = 5
    gc_freq: int = 50  # run Python's GC on every rank every N steps (automatic GC is off)
    device: str = "auto"  # auto | cpu | cuda
    # The ranks agree on a stop request and a timed save every this many steps, on a CPU (gloo) group:
    # between those steps the host never waits for the device. Keep it x step time << signal_delay_s / 2.
    control_every: int = 10
    float8: str = "none"  # none | tensorwise | rowwise: torchao Float8 matmuls (CUDA SM 8.9+; CPU for tests)
    # Every collective (the default group and each mesh subgroup) fails after this long; the first step
    # (compilation, first all-gathers) gets first_step_timeout_s. The Flight Recorder keeps each rank's
    # last flight_recorder_entries collectives (0: off) and dumps them into <run dir>/flight_recorder on
    # a timeout (titan/distributed/flight_recorder.py).
    collective_timeout_s: float = 600.0
    first_step_timeout_s: float = 1800.0
    flight_recorder_entries: int = 2000
    # causal | block_causal: each token attends within its own document only (documents start at BOS);
    # SDPA with a boolean mask on CPU, FlexAttention on CUDA (titan/models/llama/attention.py)
    attention: str = "causal"
    # sequence | document (block_causal only): a token's rotary position counts from the start of its
    # document instead of the window's; with the block-causal mask only rounding changes inside the
    # window (RoPE is relative), and positions never run past the longest document
    rope_positions: str = "sequence"
    # chunked: the fp32 logits of one chunk of tokens at a time, never the whole batch's | full (titan/train/loss.py)
    cross_entropy: str = "chunked"


@dataclass(frozen=True)
class ParallelismConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves over
    cp: int = 1  # context parallel: the sequence split over this many ranks
    tp: int = 1  # tensor parallel (with sequence parallel)
    pp: int = 1  # pipeline stages
    reshard_after_forward: str = "default"  # default | always | never
    cpu_offload: bool = False
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocab-sharded logits
    async_tp: bool = False  # CUDA only, needs training.compile
    pp_schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble | DualPipeV
    pp_microbatches: int | None = None  # None: the number of pipeline stages
    pp_layers_per_stage: int | None = None  # None: layers split evenly over the stages


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and LR schedule: AdamW with warmup, a plateau and a linear decay (WSD) by default."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-4
    weight_decay: float = 0.1  # on matrices, embeddings and output included; never on norm gains (1-D)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    implementation: str = "auto"  # auto (fused on CUDA, foreach otherwise) | fused | foreach | for_loop
    schedule: str = "wsd"  # constant | cosine | linear | wsd
    warmup_steps: int = 10
    decay_ratio: float = 0.2  # wsd: share of the steps after warmup spent decaying
    min_lr_factor: float = 0.1  # cosine, linear, wsd: the final LR as a fraction of lr


@dataclass(frozen=True)
class SourceConfig:
    """One source of a mixture (data.source=mixture): where its documents are, and its weight."""

    name: str = "???"  # how logs, metrics and errors call it
    weight: float = 1.0  # its share of the training tokens, relative to the other sources' weights
    source: str = "jsonl"  # huggingface | jsonl | parquet | text | tokens
    path: str = "???"  # hub dataset name, or a local file, directory, glob or token-shard folder
    subset: str | None = None  # hub dataset config (data.name of a single source)
    split: str = "train"
    text_field: str = "text"


@dataclass(frozen=True)
class DataConfig:
    source: str = "jsonl"  # huggingface | jsonl | parquet | text | tokens | mixture
    path: str = "???"  # hub dataset name, or a local file, directory or glob; unused by a mixture
    name: str | None = None  # hub dataset config (c4: "en")
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = (
        "???"  # a tiktoken `tokenizer.model`, a sentencepiece `.model`, a tokenizer.json (or its folder)
    )
    num_workers: int = 0  # loader processes per rank
    # raise | skip: a record with no text (bad JSON or UTF-8, no text field) stops the run, or is
    # passed over and counted in the loader state
    on_bad_record: str = "raise"
    # data.source=mixture: the sources, and which one each training window comes from, drawn with their
    # weights by a counter-based generator seeded with mix_seed (titan/data/mixture.py)
    sources: tuple[SourceConfig, ...] = ()
    mix_seed: int = 0
    # mixture: a source whose documents run out in a sequence slot starts again (wrap: an epoch,
    # logged) or stops the run (stop)
    on_source_end: str = "wrap"
    # Hold out every N-th document of each local source (records N-1, 2N-1, ... of each file) for
    # validation; training never reads them. 0: nothing held out. Needs local files or token shards
    # (a hub dataset is validated on its own split: validation.data).
    holdout_every: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    enable: bool = True
    interval: int = 50  # steps between saves; the last step is always saved
    interval_s: float = 0.0  # also save when this much wall-clock time passed since the last save; 0: off
    mode: str = "sync"  # sync | thread (DCP async_save in a thread) | process (in a background process)
    folder: str | None = None  # None: <run dir>/checkpoints
    keep_latest_k: int = 3  # 0 keeps all
    load_step: int | None = None  # None: the newest complete checkpoint
    # any of model, optimizer, lr_scheduler, dataloader, train_state
    exclude_from_loading: tuple[str, ...] = ()
    model_only: bool = False  # the final save holds the model weights only (an export)
    export_dtype: str = "float32"  # float32 | bfloat16 | float16, for model_only
    export_hf: bool = False  # also write a Hugging Face export (safetensors + config.json) at the end
    initial_load_path: str | None = None  # start from these weights (DCP or HF folder); model only
    on_error: str = "raise"  # raise | warn: what a failed save does to the run


@dataclass(frozen=True)
class ClusterConfig:
    """Where the ranks run: this machine (`local`, torch's elastic launcher) or a Slurm job (`slurm`).

    The Slurm keys are ignored by the local launcher; docs/slurm.md explains each.
    """

    launcher: str = "local"  # local | slurm
    nodes: int = 1
    # ranks per node; None: local: one per GPU, else 2; slurm: gpus_per_node, or 1 without GPUs
    nproc_per_node: int | None = None
    gpus_per_node: int = 0  # slurm; 0 on CPU-only partitions
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    time_min: int = 60  # the job's time limit (each attempt gets it anew)
    cpus_per_task: int | None = None  # per rank: data loader workers + 1 or 2
    mem_gb: float | None = None  # per node; None: the partition's default
    constraint: str | None = None
    exclude: str | None = None  # nodes to avoid, e.g. "node[012-013]"
    setup: tuple[str, ...] = ()  # shell lines run before the ranks start: module loads, NCCL variables
    # any other sbatch option, e.g. {mail-type: END}; left out of the hash (a dict has none), kept in ==
    sbatch_args: dict[str, Any] = field(default_factory=dict, hash=False)
    max_retries: int = 2  # requeues after a crash (exception, OOM kill) before the run is reported failed
    max_concurrent: int = 0  # sweeps: jobs of one sweep running at once; 0: no limit
    signal_delay_s: int = 120  # USR2 this long before the time limit: one step + a save + Slurm's ~60 s slack
    # dry runs: the memory of one device and its dense bf16 peak; None: the local GPU's, else an H100 SXM's
    gpu_memory_gib: float | None = None
    gpu_peak_tflops: float | None = None

    def __post_init__(self) -> None:  # frozen: settled once, here, so the world size is known everywhere
        if self.launcher == "slurm" and self.nproc_per_node is None:
            object.__setattr__(self, "nproc_per_node", self.gpus_per_node or 1)


@dataclass(frozen=True)
class MetricsConfig:
    log_freq: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "titan"
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise) | bar | lines


@dataclass(frozen=True)
class ProfilingConfig:
    """torch.profiler traces of a window of steps, and CUDA memory snapshots (titan/train/profiling.py)."""

    enable: bool = False
    # the window, as torch.profiler.schedule: skip `wait` steps, warm up `warmup`, record `active`;
    # `repeat` windows (0: until the run ends)
    wait: int = 5
    warmup: int = 1
    active: int = 3
    repeat: int = 1
    folder: str = "profile"  # inside the run dir: one trace per rank and window (TensorBoard, Perfetto)
    profile_memory: bool = True  # tensor allocations and frees in the trace
    record_shapes: bool = True
    with_stack: bool = False  # Python stacks: larger traces, and the memory timeline's categories
    # CUDA only: the allocator's history, dumped after these steps and on an out-of-memory error, as
    # pickles that https://pytorch.org/memory_viz reads (into <run dir>/<folder>/memory)
    memory_snapshot_steps: tuple[int, ...] = ()
    snapshot_on_oom: bool = False
    memory_history_entries: int = 100_000


@dataclass(frozen=True)
class ValidationConfig:
    """The loss on held-out data during training (titan/train/validation.py)."""

    enable: bool = False
    every: int = 100  # steps between evaluations; the last step is always evaluated
    steps: int = 10  # batches per evaluation: the same batches every time
    global_batch_size: int | None = None  # sequences per batch over all dp ranks; None: training's
    # The held-out data: None takes the documents data.holdout_every holds out of the training data;
    # otherwise any data config (a file, a hub split, token shards, a mixture), for example
    # `+data@validation.data=jsonl validation.data.path=/data/valid.jsonl`. Its tokenizer must be
    # data.tokenizer.
    data: DataConfig | None = None


@dataclass(frozen=True)
class RunDirConfig:
    """Where the run directory is, and whether a run found there resumes."""

    name: str | None = None  # None: derived from the overrides
    root: str = "runs"
    resume: str = "auto"  # auto | never | must
    group: str = "default"  # the experiment or model name; set by launch.py
    dir: str | None = None  # <root>/<group>/<name>; set by launch.py


@dataclass(frozen=True)
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)
    # validate, then print each rank role's memory and the step's work, estimated on fake tensors
    # (titan/train/estimate.py); no run directory, no Slurm, no ranks
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **groups: dict[str, Any]) -> RunConfig:
        """A copy with some keys of some groups changed: `cfg.replace(training={"steps": 5})`."""
        return dataclasses.replace(
            self, **{g: dataclasses.replace(getattr(self, g), **kv) for g, kv in groups.items()}
        )
