"""Three steps between log steps on a GPU with no host-device synchronization (one rank, NCCL).

torch.cuda.set_sync_debug_mode("error") raises at any operation that makes the host wait for the
device (`.item()`, a copy to the host, a copy from pageable memory, `nonzero`, ...). It is switched on
when step 2 fetches its batch and off when step 5 does, so it covers steps 2 (plain), 3 (a control
step: stop and checkpoint flags agreed on CPU tensors over gloo) and 4 (plain), each whole: data,
forward and backward, optimizer, control plane. Steps 1 and 5 are log steps, where reading is allowed.
tests/train/test_host_syncs.py checks the same on CPU for every layout.
"""

from pathlib import Path

import pytest
import torch

from tests.utils import read_metrics, tiny_config
from titan.train.trainer import Trainer

pytestmark = pytest.mark.cuda

CHECKED_STEPS = (2, 3, 4)


class SyncDebugBatches:
    """The trainer's loader, switching the sync debug mode as each step fetches its batch."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.loader = trainer, trainer.loader
        self.checked: list[int] = []

    def __iter__(self):
        for batch in self.loader:
            step = self.trainer.step  # already the step being run
            torch.cuda.set_sync_debug_mode("error" if step in CHECKED_STEPS else "default")
            if step in CHECKED_STEPS:
                self.checked.append(step)
            yield batch

    def close(self) -> None:
        self.loader.close()


def test_three_steps_between_log_steps_never_synchronize(tmp_path: Path):
    cfg = tiny_config(
        tmp_path,
        steps=5,
        parallelism={"dp_shard": 1},
        # deterministic=False, as runs train: some deterministic CUDA kernels sort or synchronize
        training={"device": "cuda", "param_dtype": "bfloat16", "control_every": 3, "deterministic": False},
        optimizer={"name": "adamw", "lr": 1e-3, "implementation": "fused"},
        metrics={"log_freq": 1000},  # log steps: the first and the last
        checkpoint={"interval": 1000, "interval_s": 1e6},  # the checkpointer joins the control step
    )
    trainer = Trainer(cfg)
    batches = SyncDebugBatches(trainer)
    trainer.loader = batches
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    assert batches.checked == list(CHECKED_STEPS)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 5]
    assert len(records[1]["step_losses"]) == 4  # steps 2-5, read at step 5
    assert records[1]["time_forward_backward_ms"] > 0
