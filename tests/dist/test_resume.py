"""Resume from a checkpoint continues the uninterrupted run bitwise (CPU, deterministic), with the
default bf16 compute (tests/checkpoint/test_resume_modes.py covers fp32 in every save mode)."""

import pytest

from tests.checkpoint.common import rewind
from tests.utils import read_metrics, tiny_config
from titan.config.schema import OptimizerConfig
from titan.launch.local import launch_local

pytestmark = pytest.mark.slow


def test_resume_from_step_10_is_bitwise_equal(tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    cfg = tiny_config(
        full_dir,
        steps=20,
        optimizer=OptimizerConfig(
            name="adamw", lr=3e-3, schedule="wsd", warmup_steps=3, decay_ratio=0.3, min_lr_factor=0.0
        ).__dict__,
        training={"param_dtype": "bfloat16"},
        checkpoint={"interval": 10},
    )
    launch_local(cfg, nproc=2)
    full = read_metrics(full_dir)
    assert [m["step"] for m in full] == list(range(1, 21))

    # The run as it stood after a crash at step 13: the step-20 checkpoint is gone, and steps 11-13,
    # logged past the step-10 checkpoint, are redone, not duplicated.
    rewind(full_dir, resumed_dir, 10)
    launch_local(cfg.replace(run={"dir": str(resumed_dir)}), nproc=2)
    resumed = read_metrics(resumed_dir)
    assert "resumed from checkpoint" in (resumed_dir / "logs" / "rank0.log").read_text()

    assert [m["step"] for m in resumed] == list(range(1, 21))  # each step once, also after the resume
    for got, want in zip(resumed[10:], full[10:]):
        assert (got["step"], got["loss"], got["grad_norm"], got["lr"]) == (
            want["step"],
            want["loss"],
            want["grad_norm"],
            want["lr"],
        )
    assert full[-1]["loss"] < full[0]["loss"]
