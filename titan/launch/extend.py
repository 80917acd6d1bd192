"""A run launched again with more or fewer steps: complete already, or continued without an LR jump.

The LR schedule is a function of `training.steps`: a run extended from 12 to 20 steps after its WSD
decay finished would go on at the peak LR again. Such a change of schedule is refused with the ways to
do it on purpose; one that leaves the LR where it was (a constant schedule, or an extension decided
before the decay began) goes on.
"""

import dataclasses

from titan.config.schema import OptimizerConfig, RunConfig
from titan.launch.rundir import ResumeRefused
from titan.train.optim import lr_factor

# The largest relative change of the LR at the resume step that is not a jump (float noise).
LR_TOLERANCE = 1e-6


def is_complete(cfg: RunConfig, start: int | None) -> bool:
    return start is not None and start >= cfg.training.steps


def check_lr_continues(saved: dict, cfg: RunConfig, start: int, run_dir: str) -> None:
    """Refuse a resume whose schedule would not go on from the LR the run last trained with."""
    old_steps = saved.get("training", {}).get("steps")
    if old_steps is None or old_steps == cfg.training.steps:
        return
    saved_opt = saved.get("optimizer", {})
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    # Only the schedule's keys matter to lr_factor; the rest are taken as saved (betas stay a list).
    old_opt = dataclasses.replace(cfg.optimizer, **{k: v for k, v in saved_opt.items() if k in fields})
    # The LR of the next step as the run was scheduled (its last step's, when it had finished).
    before = lr_factor(old_opt, old_steps)(min(start, old_steps - 1))
    after = lr_factor(cfg.optimizer, cfg.training.steps)(start)
    if abs(after - before) <= LR_TOLERANCE * max(abs(before), 1e-12):
        return
    lr = cfg.optimizer.lr
    raise ResumeRefused(
        f"{run_dir} was scheduled for training.steps={old_steps}; resuming at step {start} with "
        f"training.steps={cfg.training.steps} would move the LR from {before * lr:.3g} to {after * lr:.3g} "
        f"({cfg.optimizer.schedule} schedule). Keep training.steps={old_steps}, or start a new run from this "
        f"checkpoint with its own schedule: run.name=<new name> "
        f"checkpoint.initial_load_path=<checkpoint folder>/step-{start}"
    )
