"""Small run configurations and readers shared by the end-to-end and multi-rank tests."""

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan.assets import asset_path
from titan.config.schema import (
    CheckpointConfig,
    DataConfig,
    MetricsConfig,
    ModelArgs,
    OptimizerConfig,
    ParallelismConfig,
    RunConfig,
    RunDirConfig,
    TrainingConfig,
)
from titan.models.llama.model import Transformer

TINY_MODEL = ModelArgs(
    dim=64,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=2304,
    ffn_dim=128,
    rope_scaling_factor=8.0,
    max_seq_len=256,
)
C4_TEST = DataConfig(
    source="jsonl",
    path=str(asset_path("c4_test/c4-train.00000-of-00001.json")),
    tokenizer=str(asset_path("tokenizers/titan_debug.tiktoken")),
)


def random_model(args: ModelArgs = TINY_MODEL, seed: int = 0) -> Transformer:
    """Weights far from init scale (attention scores O(1), norm gains != 1): the logits spread widely, so
    a wrong layout, rotary convention, position or cache entry moves them by much more than any
    tolerance, and greedy decoding has clear winners. The same `seed` gives the same weights."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.5 if name == "tok_embeddings.weight" else p.shape[-1] ** -0.5)
    return model.eval()


def tiny_config(run_dir: Path, *, steps: int = 3, **groups) -> RunConfig:
    """SGD, fp32 everywhere, deterministic: the setting where layouts must agree to rounding."""
    cfg = RunConfig(
        model=TINY_MODEL,
        training=TrainingConfig(
            steps=steps,
            seq_len=32,
            global_batch_size=8,
            micro_batch_size=2,
            deterministic=True,
            param_dtype="float32",
            reduce_dtype="float32",
            max_norm=1.0,
        ),
        parallelism=ParallelismConfig(dp_shard=-1),
        optimizer=OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0, schedule="constant", warmup_steps=0),
        data=C4_TEST,
        checkpoint=CheckpointConfig(enable=True, interval=1000),
        metrics=MetricsConfig(log_freq=1, tensorboard=False, progress="lines"),
        run=RunDirConfig(name="test", group="tiny", dir=str(run_dir)),
    )
    return cfg.replace(**groups) if groups else cfg


def check_loss_falls(run_dir: Path, **groups) -> list[float]:
    """30 AdamW steps of the tiny model on one rank (with `groups` changed): the loss starts at
    ln(2304) = 7.74 (the initial model guesses uniformly) and its last 5 steps average 0.8 lower."""
    from titan.train.trainer import run

    cfg = tiny_config(
        run_dir,
        steps=30,
        parallelism={"dp_shard": 1},
        optimizer={"name": "adamw", "lr": 3e-3},
        checkpoint={"enable": False},
        **groups,
    )
    run(cfg)
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert abs(losses[0] - 7.74) < 0.3, losses[0]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8, losses
    return losses


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_model(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint, as one plain state dict."""
    out = Path(run_dir) / f"model-{step}.pt"
    dcp_to_torch_save(Path(run_dir) / "checkpoints" / f"step-{step}", out)
    return torch.load(out, weights_only=True)["model"]
