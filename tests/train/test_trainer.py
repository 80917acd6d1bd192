"""The training loop in one process (a 1-rank gloo group), on the bundled data."""

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from tests.utils import check_loss_falls, read_metrics, tiny_config
from titan.checkpoint.format import complete_steps
from titan.launch.local import launch_local
from titan.train.trainer import NonFiniteStepsError, run


def test_accumulation_does_not_change_the_step(tmp_path):
    one = run(
        tiny_config(tmp_path / "a", steps=2, parallelism={"dp_shard": 1}, training={"micro_batch_size": 8})
    )
    four = run(
        tiny_config(tmp_path / "b", steps=2, parallelism={"dp_shard": 1}, training={"micro_batch_size": 2})
    )
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert one["loss"] == b[-1]["loss"] or one["loss"] == a[-1]["loss"]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert four["step"] == 2


def test_loss_falls_from_ln_vocab(tmp_path):
    check_loss_falls(tmp_path)


def checkpoint_tensors(step: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer state), by dotted name."""
    dcp_to_torch_save(step, scratch)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(scratch, weights_only=True))
    return flat


def diverging(run_dir: Path, implementation: str, **training):
    """lr=1e4: step 1 is finite, then every step's gradients are NaN (ln(vocab) loss, NaN norm)."""
    return tiny_config(
        run_dir,
        steps=20,
        optimizer={"name": "adamw", "lr": 1e4, "implementation": implementation},
        training=training,
        metrics={"log_freq": 1000},
        checkpoint={"interval": 3},
    )


def assert_only_step_3_saved_and_finite(run_dir: Path, scratch: Path) -> None:
    """Steps 2-6 skipped: step 3 saved (2 skipped, within max_nonfinite_steps=2); the save of step 6
    (5 skipped) reads the count first and stops the run instead."""
    assert complete_steps(run_dir / "checkpoints") == [3]  # nothing saved past the limit
    tensors = checkpoint_tensors(run_dir / "checkpoints" / "step-3", scratch)
    assert any(name.startswith("optimizer.state.") for name in tensors)
    for name, tensor in tensors.items():
        assert tensor.isfinite().all(), name
    # Adam's step count is 1 in step 3: the skipped steps left weights and moments as step 1 made them
    counts = {t.item() for name, t in tensors.items() if name.endswith(".step")}
    assert counts == {1.0}


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_nonfinite_steps_are_skipped_and_never_saved(tmp_path, implementation):
    """foreach reads the skip flag on the host; fused takes it as found_inf and skips in the kernel."""
    cfg = diverging(tmp_path, implementation, max_nonfinite_steps=2).replace(parallelism={"dp_shard": 1})
    with pytest.raises(NonFiniteStepsError) as stop:
        run(cfg)
    message = str(stop.value)
    assert "\n" not in message
    assert message.startswith("stopped at step 6: 5 steps had non-finite gradients and were skipped")
    assert f"the newest checkpoint, {tmp_path / 'checkpoints' / 'step-3'}, is finite" in message
    assert_only_step_3_saved_and_finite(tmp_path, tmp_path / "scratch.pt")
    assert [(m["step"], m["skipped_steps"]) for m in read_metrics(tmp_path)] == [(1, 0)]


@pytest.mark.slow
def test_fsdp_ranks_skip_together_in_the_fused_kernel(tmp_path):
    """Sharded (DTensor) parameters in the fused kernel, with the flag from the global norm."""
    with pytest.raises(ChildFailedError, match="NonFiniteStepsError"):
        launch_local(diverging(tmp_path / "run", "fused", max_nonfinite_steps=2), nproc=2)
    for rank in (0, 1):  # both ranks read the count at the save of step 6, and both stopped there
        log = (tmp_path / "run" / "logs" / f"rank{rank}.log").read_text()
        assert "step 6: 5 steps skipped so far" in log and "step 7" not in log
    assert_only_step_3_saved_and_finite(tmp_path / "run", tmp_path / "scratch.pt")


def test_the_limit_is_read_at_log_steps(tmp_path):
    """max_nonfinite_steps=0: the first skipped step stops the run at the next log step, after its
    metrics line (NaN norm, skipped_steps 1)."""
    cfg = diverging(tmp_path, "foreach", max_nonfinite_steps=0).replace(
        parallelism={"dp_shard": 1}, metrics={"log_freq": 1}, checkpoint={"enable": False}
    )
    with pytest.raises(NonFiniteStepsError, match=r"^stopped at step 2: 1 steps .* there is no checkpoint\."):
        run(cfg)
    metrics = read_metrics(tmp_path)
    assert [(m["step"], m["skipped_steps"]) for m in metrics] == [(1, 0), (2, 1)]
    assert math.isfinite(metrics[0]["grad_norm"]) and math.isnan(metrics[1]["grad_norm"])


@pytest.mark.parametrize(
    "training",
    [
        {"ac": "full"},
        {"ac": "layer", "ac_layer_freq": 2},
        {"ac": "op"},
        {"compile": True, "compile_backend": "aot_eager"},
        pytest.param({"compile": True, "compile_backend": "inductor", "ac": "op"}, marks=pytest.mark.slow),
    ],
    ids=["ac-full", "ac-layer", "ac-op", "compile-aot_eager", "compile-inductor-ac-op"],
)
def test_memory_and_speed_options_leave_training_unchanged(tmp_path, training):
    """Recomputing activations or compiling must not change the math (fp32: within a few ulp)."""
    ref = tiny_config(tmp_path / "ref", steps=2, parallelism={"dp_shard": 1}, checkpoint={"enable": False})
    run(ref)
    run(ref.replace(training=training, run={"dir": str(tmp_path / "opt")}))
    for got, want in zip(read_metrics(tmp_path / "opt"), read_metrics(tmp_path / "ref"), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
