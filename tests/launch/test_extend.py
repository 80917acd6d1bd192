"""A finished or extended run: complete runs say so, and a change of training.steps never jumps the LR."""

import pytest

from titan.config.schema import RunConfig
from titan.launch.extend import check_lr_continues, is_complete
from titan.launch.rundir import ResumeRefused


def config(steps: int, **optimizer) -> RunConfig:
    return RunConfig().replace(training={"steps": steps}, optimizer={"warmup_steps": 2, **optimizer})


def saved(cfg: RunConfig) -> dict:
    return cfg.to_dict()


def test_a_run_at_its_last_step_is_complete():
    assert is_complete(config(12), 12) and is_complete(config(12), 14)
    assert not is_complete(config(12), 10) and not is_complete(config(12), None)


def test_extending_a_decayed_wsd_run_is_refused_with_the_ways_to_do_it():
    with pytest.raises(ResumeRefused) as e:
        check_lr_continues(saved(config(12)), config(20), 12, "runs/x")
    message = str(e.value)
    assert "would move the LR from 3e-05 to 0.0003" in message  # min_lr_factor 0.1 -> the peak
    assert "Keep training.steps=12" in message and "checkpoint.initial_load_path=" in message


def test_extending_before_the_decay_began_or_at_a_constant_lr_goes_on():
    check_lr_continues(saved(config(12)), config(20), 6, "runs/x")  # step 6 of 12: on the plateau
    check_lr_continues(saved(config(12, schedule="constant")), config(20, schedule="constant"), 12, "runs/x")
    check_lr_continues(saved(config(12)), config(12), 12, "runs/x")  # unchanged


def test_shortening_into_the_decay_is_refused_too():
    with pytest.raises(ResumeRefused, match="training.steps=12"):
        check_lr_continues(saved(config(20)), config(12), 11, "runs/x")
