"""Optimizer with decay/no-decay parameter groups, and the learning-rate schedules."""

import math
from collections.abc import Callable

import torch
from torch import nn

from titan.config.schema import OptimizerConfig

SCHEDULES = ("constant", "cosine", "linear", "wsd")
OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm gains, biases) do not, as in GPT-2 and Llama training recipes."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _implementation_flags(cfg: OptimizerConfig, device: torch.device) -> dict:
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    flags = _implementation_flags(cfg, device)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **flags)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **flags)
    raise ValueError(f"optimizer.name={cfg.name!r} is not one of {OPTIMIZERS}")


def lr_factor(cfg: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of `lr` after `step` optimizer steps (LambdaLR's convention: step 0 is the first)."""
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_factor

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never 0: the first step already learns
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "wsd":
            decay_steps = max(1, round(cfg.decay_ratio * (total_steps - warmup)))
            decay_start = total_steps - decay_steps
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / decay_steps)
            return floor + (1.0 - floor) * (1.0 - progress)
        progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
        if cfg.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        if cfg.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}")

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))


class Optimizers:
    """One optimizer per model part (a pipeline rank may hold several stages), stepped together.

    One per part, not one over all: DCP's optimizer state dict pairs an optimizer with one module.
    """

    def __init__(self, parts: list[nn.Module], cfg: OptimizerConfig, device: torch.device) -> None:
        self.optimizers = [build_optimizer(part, cfg, device) for part in parts]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)


class LRSchedulers:
    """The same schedule on each optimizer; saved and restored as one (they are identical)."""

    def __init__(self, optimizers: Optimizers, cfg: OptimizerConfig, total_steps: int) -> None:
        self.schedulers = [build_scheduler(o, cfg, total_steps) for o in optimizers.optimizers]

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state)
