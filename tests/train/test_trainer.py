"""The training loop in one process (a 1-rank gloo group), on the bundled data."""

import pytest

from tests.utils import read_metrics, tiny_config
from titan.train.trainer import NonFiniteLossError, run


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
    cfg = tiny_config(
        tmp_path,
        steps=30,
        parallelism={"dp_shard": 1},
        optimizer={"name": "adamw", "lr": 3e-3},
        checkpoint={"enable": False},
    )
    run(cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert losses[0] == pytest.approx(7.74, abs=0.3)  # ln(2304): the initial model guesses uniformly
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8


def test_non_finite_loss_stops_with_the_step_and_checkpoint(tmp_path):
    cfg = tiny_config(
        tmp_path, steps=20, parallelism={"dp_shard": 1}, optimizer={"lr": 1e6}, training={"max_norm": 0.0}
    ).replace(checkpoint={"interval": 1})
    with pytest.raises(
        NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; the newest complete checkpoint is step \d+"
    ):
        run(cfg)


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
