"""Between log steps the training loop never reads a tensor's value on the host, in every layout (CPU, gloo).

On CUDA such a read waits for the device to finish all queued work: the host stops running ahead,
and every kernel launch after it is exposed. A TorchDispatchMode sees every read, however it is
written: `.item()`, `float(t)`, `int(t)`, `bool(t)` and `if t > 0` all reach
`aten._local_scalar_dense` (`bool` through `aten.is_nonzero`); an output whose shape depends on
the values (`t.nonzero()`, `torch.where(mask)`) reaches `aten.nonzero`, and on CPU boolean indexing
and `masked_select` reach their own ops, which do the same without a separate nonzero. Wrapping
`Tensor.item` alone would miss all but the first.

Steps of the run: 1 (log), 2 (control step: the stop flag and the checkpoint flags are agreed),
3 (plain), 4 (log, the final save). Steps 2 and 3 are counted. The control plane's own CPU tensors
(the stop flag, the checkpointer's flags) never wait for a device and are left out by identity,
as are the optimizer's CPU `step` counts. The optimizer is `fused`, what CUDA runs: `foreach` reads
the skip flag on the host by design (titan/train/optim.py).
tests/cuda/test_sync_debug.py runs the same steps on a GPU under torch.cuda.set_sync_debug_mode.
"""

import logging
import os
import signal
import time
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.multirank import spawn_ranks
from tests.utils import read_metrics, tiny_config
from titan.checkpoint.format import complete_steps
from titan.train.metrics import STEP_PHASES, StepTimer, format_line
from titan.train.preempt import check_control_cadence
from titan.train.trainer import Trainer, run

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.masked_select}


def reads_host(func, tensors: list[torch.Tensor]) -> bool:
    boolean_index = func.overloadpacket is aten.index and any(t.dtype == torch.bool for t in tensors)
    return func.overloadpacket in HOST_READS or boolean_index


COUNTED_STEPS = {2, 3}

LAYOUTS = {
    "single": (1, {"dp_shard": 1}),
    "fsdp": (2, {"dp_shard": 2}),
    "ddp": (2, {"dp_shard": 1, "dp_replicate": 2}),
    "tp2": (2, {"dp_shard": 1, "tp": 2}),
    "cp2": (2, {"dp_shard": 1, "cp": 2}),
    "pp2": (2, {"dp_shard": 1, "pp": 2}),
    "hsdp": (4, {"dp_shard": 2, "dp_replicate": 2}),
    "tp2_fsdp": (4, {"dp_shard": 2, "tp": 2}),
}


def sync_config(run_dir: Path, layout: dict):
    return tiny_config(
        run_dir,
        steps=4,
        parallelism=layout,
        optimizer={"name": "adamw", "lr": 1e-3, "implementation": "fused"},
        training={"control_every": 2},
        metrics={"log_freq": 1000},
        # interval_s: the checkpointer joins the agreement at control steps, and is never due
        checkpoint={"interval": 1000, "interval_s": 1e6},
    )


class HostReads(TorchDispatchMode):
    """Records each host read of a tensor while `trainer.step` is one of COUNTED_STEPS."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.reads: list[str] = []
        self.ops_seen = 0  # proof that the counted steps ran under the mode at all
        self.control_plane: set[int] = set()

    def excluded(self, t: torch.Tensor) -> bool:
        return id(t) in self.control_plane or (t._base is not None and id(t._base) in self.control_plane)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.trainer.step in COUNTED_STEPS:
            if not self.control_plane:  # after step 1: the optimizer's state exists
                steps = [s["step"] for o in self.trainer.optimizers.optimizers for s in o.state.values()]
                named = [self.trainer.preemption.flag, self.trainer.checkpointer.control_flags]
                self.control_plane = {id(t) for t in [*named, *steps]}
            self.ops_seen += 1
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            if reads_host(func, tensors) and not all(self.excluded(t) for t in tensors):
                stack = traceback.extract_stack()[:-1]  # less this frame
                where = [f for f in stack if "/titan/" in f.filename or "/tests/" in f.filename]
                line = f"{where[-1].filename}:{where[-1].lineno}" if where else "?"
                self.reads.append(f"step {self.trainer.step}: {func} at {line}")
        return func(*args, **(kwargs or {}))


# Host reads written back into train_step, each a way `.item()`-wrapping would not see but the mode does.
INJECTED = {
    "item": lambda loss: loss.item(),
    "float": lambda loss: float(loss),
    "if-greater": lambda loss: 1 if loss > 0 else 0,
    "where": lambda loss: torch.where(loss.reshape(1) > 0),
    "bool-index": lambda loss: loss.reshape(1)[loss.reshape(1) > 0],
}


def _count_reads(rank: int, world: int, cfg, injected: str | None) -> None:
    trainer = Trainer(cfg)  # the harness owns the process group
    if injected is not None:
        step = trainer.train_step

        def train_step(inputs, labels):
            loss, norm = step(inputs, labels)
            INJECTED[injected](loss)
            return loss, norm

        trainer.train_step = train_step
    mode = HostReads(trainer)
    with mode:
        trainer.train()
    assert trainer.step == 4 and mode.ops_seen > 100, (trainer.step, mode.ops_seen)
    if injected is None:
        assert mode.reads == [], "host reads between log steps:\n" + "\n".join(mode.reads)
    else:  # one per counted step, where it was written
        assert len(mode.reads) == len(COUNTED_STEPS), mode.reads
        assert all(__file__ in read for read in mode.reads), mode.reads


@pytest.mark.parametrize(
    "name",
    [name if n == 1 else pytest.param(name, marks=pytest.mark.slow) for name, (n, _) in LAYOUTS.items()],
)
def test_no_host_read_between_log_steps(tmp_path, name):
    nproc, layout = LAYOUTS[name]
    spawn_ranks(_count_reads, nproc, sync_config(tmp_path, layout), None)


@pytest.mark.parametrize("injected", INJECTED)
def test_a_host_read_put_back_into_the_step_is_caught(tmp_path, injected):
    spawn_ranks(_count_reads, 1, sync_config(tmp_path, LAYOUTS["single"][1]), injected)


# ---- what the hot path leaves to log and control steps ----


def test_a_stop_waits_for_the_next_control_step_and_logs_every_step(tmp_path):
    """A signal during step 2 stops the run at step 3 (control_every=3), not at 2; step 3 is logged,
    with the losses of steps 2 and 3 read at once, and the step-time split."""
    cfg = tiny_config(
        tmp_path,
        steps=10,
        parallelism={"dp_shard": 1},
        training={"control_every": 3},
        metrics={"log_freq": 1000},
        checkpoint={"interval": 1000},
    )
    original = Trainer.train_step

    def train_step(self, inputs, labels):
        if self.step == 2:  # not a control step: step 1 is a log step
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, inputs, labels)

    with mock.patch.object(Trainer, "train_step", train_step):
        result = run(cfg)
    assert (result["step"], result["preempted"]) == (3, "SIGUSR2")
    assert complete_steps(tmp_path / "checkpoints") == [3]
    first, stop = read_metrics(tmp_path)
    assert (first["step"], stop["step"]) == (1, 3)
    assert len(stop["step_losses"]) == 2 and stop["step_losses"][-1] == stop["loss"]
    split = [stop[f"time_{phase}_ms"] for phase in STEP_PHASES]
    assert all(ms >= 0 for ms in split) and stop["time_forward_backward_ms"] > 0
    assert sum(split) <= 1000 * stop["elapsed_s"]


def test_step_timer_splits_each_step_into_its_phases(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    timer = StepTimer(torch.device("cpu"))
    for step in range(2):
        timer.start()
        for phase, ms in zip(STEP_PHASES, (2, 6 + 2 * step, 0, 4)):
            now[0] += ms / 1000
            timer.lap(phase)
        now[0] += 1.0  # between steps: in no phase
    split = timer.read()
    want = {"time_data_ms": 2, "time_forward_backward_ms": 7, "time_optimizer_ms": 0, "time_checkpoint_ms": 4}
    assert split == pytest.approx(want)  # per-step means
    assert timer.read() == {}  # read starts anew
    line = format_line({**LINE, **split}, total_steps=100)
    assert line.endswith(" data 2%  ms 2/7/0/4")

    # A log step reads before its checkpoint phase: that phase counts in the next interval.
    timer.start()
    for phase in STEP_PHASES[:3]:
        timer.lap(phase)
    assert timer.read()["time_checkpoint_ms"] == 0
    now[0] += 0.5
    timer.lap("checkpoint")
    assert timer.read()["time_checkpoint_ms"] == pytest.approx(500)


LINE = {"step": 20, "loss": 6.8, "grad_norm": 1.2, "lr": 3e-4, "tokens_per_second": 1e4, "tflops": 1.0}
LINE |= {"memory_rss_gib": 1.0, "data_share": 0.021, "skipped_steps": 0}


@pytest.mark.parametrize("control_every,step_s,warns", [(10, 5.0, False), (10, 7.0, True), (1, 61.0, True)])
def test_control_cadence_warns_when_a_stop_could_miss_its_save(caplog, control_every, step_s, warns):
    """signal_delay_s=120: up to 60 s may pass between a signal and the control step that agrees on it."""
    with caplog.at_level(logging.WARNING, logger="titan"):
        warning = check_control_cadence(control_every, step_s, signal_delay_s=120)
    assert (warning is not None) == warns
    if warns:
        assert f"Set training.control_every={max(1, int(30 / step_s))} " in warning
        assert caplog.messages == [warning]
