"""The valid values of the `checkpoint.*` keys, and their check (which launch validation calls)."""

import torch

from titan.config.schema import CheckpointConfig

MODES = ("sync", "thread", "process")
PARTS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ON_ERROR = ("raise", "warn")


def config_problems(cfg: CheckpointConfig) -> list[str]:
    """Every problem with the checkpoint keys, each naming the key and the valid values."""
    problems = []
    if cfg.mode not in MODES:
        problems.append(f"checkpoint.mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.on_error not in ON_ERROR:
        problems.append(f"checkpoint.on_error={cfg.on_error!r} is not one of {', '.join(ON_ERROR)}")
    if cfg.export_dtype not in EXPORT_DTYPES:
        problems.append(
            f"checkpoint.export_dtype={cfg.export_dtype!r} is not one of {', '.join(EXPORT_DTYPES)}"
        )
    unknown = [p for p in cfg.exclude_from_loading if p not in PARTS]
    if unknown:
        problems.append(f"checkpoint.exclude_from_loading={unknown} may only name {', '.join(PARTS)}")
    if cfg.interval < 1:
        problems.append(f"checkpoint.interval={cfg.interval} must be >= 1")
    if cfg.interval_s < 0:
        problems.append(f"checkpoint.interval_s={cfg.interval_s} must be >= 0 (0: off)")
    if cfg.keep_latest_k < 0:
        problems.append(f"checkpoint.keep_latest_k={cfg.keep_latest_k} must be >= 0 (0 keeps all)")
    if cfg.load_step is not None and cfg.load_step < 0:
        problems.append(f"checkpoint.load_step={cfg.load_step} must be >= 0 or null (the newest)")
    if cfg.export_hf and not cfg.enable:
        problems.append("checkpoint.export_hf=true exports the final checkpoint: set checkpoint.enable=true")
    return problems
