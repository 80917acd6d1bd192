"""The typed run configuration: one frozen dataclass per config group, and RunConfig holding them all.

Each `conf/<group>/<option>.yaml` node names one of these classes in `_target_`; launch.py
instantiates them once. Library code only ever sees these objects, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
    gc_freq: int = 50  # run Python's GC on every rank every N steps (automatic GC is off)
    device: str = "auto"  # auto | cpu | cuda


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
    """Optimizer and LR schedule.

    A frozen dataclass rather than a `_partial_` of the optimizer class: the schedule keys live on
    the same node, and a plain value can be compared on resume and written to config.yaml.
    """

    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-4
    weight_decay: float = 0.1  # never applied to norms, biases or embeddings-as-norm gains
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    implementation: str = "auto"  # auto (fused on CUDA, foreach otherwise) | fused | foreach | for_loop
    schedule: str = "constant"  # constant | cosine | linear | wsd
    warmup_steps: int = 0
    decay_ratio: float = 0.1  # wsd: share of the steps spent decaying
    min_lr_factor: float = 0.0  # cosine, linear, wsd: the final LR as a fraction of lr


@dataclass(frozen=True)
class DataConfig:
    source: str = "jsonl"  # huggingface | jsonl | parquet | text
    path: str = "???"  # hub dataset name, or a local file, directory or glob
    name: str | None = None  # hub dataset config (c4: "en")
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "???"  # a tiktoken `tokenizer.model` or a sentencepiece `.model` file
    num_workers: int = 0  # loader processes per rank


@dataclass(frozen=True)
class CheckpointConfig:
    enable: bool = False
    interval: int = 500  # steps between saves; the last step is always saved
    interval_s: float = 0.0  # also save when this much wall-clock time passed since the last save; 0: off
    mode: str = "sync"  # sync | thread (DCP async_save in a thread) | process (in a background process)
    folder: str | None = None  # None: <run dir>/checkpoints
    keep_latest_k: int = 3  # 0 keeps all
    load_step: int | None = None  # None: the newest complete checkpoint
    exclude_from_loading: tuple[
        str, ...
    ] = ()  # any of model, optimizer, lr_scheduler, dataloader, train_state
    model_only: bool = False  # the final save holds the model weights only (an export)
    export_dtype: str = "float32"  # float32 | bfloat16 | float16, for model_only
    export_hf: bool = False  # also write a Hugging Face export (safetensors + config.json) at the end
    initial_load_path: str | None = None  # start from these weights (DCP or HF folder); model only
    on_error: str = "raise"  # raise | warn: what a failed save does to the run


@dataclass(frozen=True)
class ClusterConfig:
    launcher: str = "local"
    nodes: int = 1
    nproc_per_node: int | None = None  # ranks per node; None: one per GPU, else 2


@dataclass(frozen=True)
class MetricsConfig:
    log_freq: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "titan"
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise) | bar | lines


@dataclass(frozen=True)
class RunSettings:
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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **groups: dict[str, Any]) -> RunConfig:
        """A copy with some keys of some groups changed: `cfg.replace(training={"steps": 5})`."""
        return dataclasses.replace(
            self, **{g: dataclasses.replace(getattr(self, g), **kv) for g, kv in groups.items()}
        )


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and lists as plain dicts and lists (for YAML, JSON and comparisons)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
