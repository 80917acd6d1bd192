"""Optimizer with decay/no-decay parameter groups, and the learning-rate schedules."""

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from titan.config.schema import OptimizerConfig

SCHEDULES = ("constant", "cosine", "linear", "wsd")
OPTIMIZERS = ("adamw", "sgd")

log = logging.getLogger("titan")


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


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """optimizer.warmup_steps, cut to leave at least one step at the full schedule: the default of 10
    must fit a smoke run of 5 steps too (validation warns when it cuts)."""
    return max(0, min(warmup_steps, total_steps - 1))


def lr_factor(cfg: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of `lr` after `step` optimizer steps (LambdaLR's convention: step 0 is the first)."""
    warmup = effective_warmup(cfg.warmup_steps, total_steps)
    floor = cfg.min_lr_factor

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never 0: the first step already learns
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "wsd":
            # decay_ratio is a share of the steps after warmup (torchtitan takes it of all steps): so
            # the decay never reaches into the warmup, whatever the ratio.
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


def _zero_skipped_momentum(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Fused SGD allocates its momentum buffers uninitialized on the first step and fills them in the
    kernel; a skipped first step leaves them as garbage that the next step would take for momentum.
    Zero buffers instead: the next step then starts the momentum from its own gradient, as a first
    step does. A step that was not skipped keeps its buffers (where() selects them bit for bit)."""
    for state in optimizer.state.values():
        if "momentum_buffer" in state:
            buffer = state["momentum_buffer"]
            buffer.copy_(torch.where(skip, torch.zeros_like(buffer), buffer))


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
        self.fused = _implementation_flags(cfg, device)["fused"]
        if device.type != "cpu" and not self.fused:
            log.warning(
                "optimizer.implementation=%s on %s: skipping a step with non-finite gradients reads a flag "
                "from the device every step; `fused` (what `auto` picks there) decides on the device",
                cfg.implementation,
                device.type,
            )

    def step(self, skip: torch.Tensor) -> None:
        """Step every optimizer, or none where `skip` (a 0-dim bool tensor, alike on every rank) is set.

        Weights, moments and the optimizer's step count stay as they were on a skipped step. The fused
        kernels take the flag as `found_inf`, as torch.amp.GradScaler hands it to them, and skip on the
        device. foreach and for_loop take no such flag, so it is read on the host: free on CPU (where
        `auto` picks foreach), a device sync per step elsewhere (where `auto` picks fused).
        """
        if not self.fused:
            if not skip.item():
                for optimizer in self.optimizers:
                    optimizer.step()
            return
        found_inf = skip.float()
        for optimizer in self.optimizers:
            first_step = not optimizer.state
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            if first_step:
                _zero_skipped_momentum(optimizer, skip)

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
