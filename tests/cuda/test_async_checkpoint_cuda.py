"""Background checkpoints on CUDA stage the state in pinned host memory, and a run resumed from one
continues the uninterrupted run (one rank, NCCL; the CPU versions are tests/checkpoint/test_resume_modes.py).

Tolerance: resumed losses and grad norms within 1e-5 relative of the uninterrupted run, final weights
within 1e-6 absolute. The run is in deterministic mode (fp32, deterministic cuBLAS), so they agree to
rounding at most; a lost optimizer moment, learning-rate step or data position moves the loss in the
2nd or 3rd digit.
"""

import pytest
import torch

from tests.checkpoint.common import RESUME_AT, STEPS, resume_config, rewind
from tests.utils import read_metrics, read_model
from titan.train.trainer import Trainer, run

pytestmark = pytest.mark.cuda


def cuda_config(run_dir, mode: str):
    return resume_config(run_dir, mode=mode, layout="single").replace(training={"device": "cuda"})


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_pinned_async_checkpoint_resumes(tmp_path, mode):
    full_dir = tmp_path / "full"
    trainer = Trainer(cuda_config(full_dir, mode))
    try:
        assert trainer.device.type == "cuda"
        # staged through pinned host memory: the copy from the GPU is a fast DMA
        assert trainer.checkpointer._stager._state_dict_stager.pin_memory
        trainer.train()
    finally:
        trainer.close()
    full = read_metrics(full_dir)
    assert [m["step"] for m in full] == list(range(1, STEPS + 1))
    assert full[-1]["loss"] < full[0]["loss"]

    resumed_dir = rewind(full_dir, tmp_path / "resumed", RESUME_AT)
    run(cuda_config(resumed_dir, "sync"))
    assert (
        f"resumed from checkpoint {resumed_dir / 'checkpoints' / f'step-{RESUME_AT}'}"
        in (resumed_dir / "logs" / "rank0.log").read_text()
    )
    resumed = read_metrics(resumed_dir)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for got, want in zip(resumed[RESUME_AT:], full[RESUME_AT:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    ours, theirs = read_model(resumed_dir, STEPS), read_model(full_dir, STEPS)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
