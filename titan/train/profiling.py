"""Profiling a run: torch.profiler traces of a window of steps, and CUDA memory snapshots.

Traces: `torch.profiler.profile` with `schedule(wait, warmup, active, repeat)`, CPU activity (and CUDA
on a GPU), tensor allocations with `profile_memory`; each rank writes `<run dir>/<folder>/rank-N/` in
the TensorBoard profiler plugin's layout (`tensorboard --logdir <run dir>/<folder>`), Chrome-trace JSON
that Perfetto (https://ui.perfetto.dev) also opens.

Memory snapshots (CUDA only): the caching allocator records its history
(`torch.cuda.memory._record_memory_history`) from the start; after each step of
`memory_snapshot_steps` and on an out-of-memory error every rank dumps it as
`<folder>/memory/rank-N-step-S.pickle` (`-oom.pickle`), the format of https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from titan.config.schema import ProfilingConfig

log = logging.getLogger("titan")


class StepProfiler:
    """Call `step(n)` after every training step and `on_error(e)` when a step raises; `close()` at the end."""

    def __init__(self, cfg: ProfilingConfig, run_dir: Path, rank: int, device: torch.device):
        self.cfg, self.rank = cfg, rank
        self.folder = Path(run_dir) / cfg.folder
        self.cuda = device.type == "cuda"
        self._profiler = None
        if cfg.enable:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profiler = profile(
                activities=activities,
                schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=cfg.repeat),
                on_trace_ready=tensorboard_trace_handler(
                    str(self.folder / f"rank-{rank}"), worker_name=f"rank{rank}"
                ),
                record_shapes=cfg.record_shapes,
                profile_memory=cfg.profile_memory,
                with_stack=cfg.with_stack,
            )
            self._profiler.start()
        self._snapshots = bool(cfg.memory_snapshot_steps) or cfg.snapshot_on_oom
        if self._snapshots and not self.cuda:
            log.info(
                "profiling: memory snapshots are of the CUDA allocator; this run is on %s: none taken", device
            )
            self._snapshots = False
        if self._snapshots:
            torch.cuda.memory._record_memory_history(max_entries=cfg.memory_history_entries)

    def step(self, step: int) -> None:
        if self._profiler is not None:
            self._profiler.step()
        if self._snapshots and step in self.cfg.memory_snapshot_steps:
            self._dump(f"step-{step}")

    def on_error(self, error: BaseException) -> None:
        """An out-of-memory error leaves its snapshot (with the allocation that failed) before it is raised."""
        if self._snapshots and self.cfg.snapshot_on_oom and isinstance(error, torch.OutOfMemoryError):
            path = self._dump("oom")
            log.error(
                "out of memory: the allocator's history is in %s (open it at https://pytorch.org/memory_viz)",
                path,
            )

    def _dump(self, name: str) -> Path:
        path = self.folder / "memory" / f"rank-{self.rank}-{name}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        if self._snapshots:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._snapshots = False
