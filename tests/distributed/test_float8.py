"""Float8 training through torchao (titan/distributed/float8.py, applied first by parallelize_llama), on
CPU/gloo: one process, FSDP's normal all-gather, titan's plain TP styles, and both together.

A Float8 that did nothing would train exactly like the run without it. Three checks catch that: the
Float8Linear modules are exactly the Linears the filter chooses; a dispatch spy sees aten._scaled_mm on
every step, 3 per Float8Linear per micro-batch (output, grad input, grad weight); the losses are not
bitwise those of the same run without Float8.

Tolerance: losses within 1e-3 relative of the same run without Float8 (measured on the tiny fp32 model:
at most 6e-5 after 3 SGD steps). e4m3 keeps 3 mantissa bits, so a cast moves an element by up to 6%,
but over a matmul's inner dimension these errors average out; a broken scale or cast moves the loss by
percents.
"""

import dataclasses
from collections import Counter

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL, tiny_config
from titan.distributed.float8 import apply_float8, converts_to_float8
from titan.models.llama.model import Transformer
from titan.train import trainer as trainer_module
from titan.train.trainer import Trainer

pytest.importorskip("torchao")

STEPS = 3
RTOL = 1e-3
# Each block's wq, wk, wv, wo, w1, w2, w3; the output projection stays in high precision.
FLOAT8_PER_BLOCK = 7
SCALED_MM = torch.ops.aten._scaled_mm.default


class ScaledMMSpy(TorchDispatchMode):
    """Counts aten._scaled_mm calls on real tensors. Wrapper subclasses (torchao's float8 tensors,
    DTensor) are handed back to their own dispatch, so the plain-tensor ops they issue (the _scaled_mm
    itself) come here; fake tensors (DTensor's sharding propagation) run but are not counted."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented
        if all(t is torch.Tensor for t in types):
            self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def test_filter_keeps_output_and_dims_not_multiple_of_16_in_high_precision():
    assert converts_to_float8(nn.Linear(32, 64), "layers.0.attention.wq")
    assert not converts_to_float8(nn.Linear(32, 64), "output")
    assert not converts_to_float8(nn.Linear(32, 72), "layers.0.feed_forward.w1")
    assert not converts_to_float8(nn.Linear(40, 64), "layers.0.feed_forward.w2")
    assert not converts_to_float8(nn.Embedding(32, 64), "tok_embeddings")

    # ffn_dim=120 is not a multiple of 16: w1, w2, w3 stay nn.Linear, as does the output.
    args = dataclasses.replace(TINY_MODEL, ffn_dim=120)
    with torch.device("meta"):
        model = Transformer(args)
    chosen = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "output"}
    chosen = {name for name in chosen if name.split(".")[-1] not in ("w1", "w2", "w3")}
    swapped = apply_float8(model, "tensorwise", fsdp_float8_all_gather=False, device=torch.device("cpu"))

    from torchao.float8.float8_linear import Float8Linear

    float8 = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == len(float8) == len(chosen) == 4 * args.n_layers
    assert float8 == chosen
    assert type(model.output) is nn.Linear


def _spy_on_steps(monkeypatch) -> dict[str, list]:
    """Patch Trainer.train_step to record each step's (loss, number of aten._scaled_mm calls) under
    the run's training.float8."""
    original = Trainer.train_step
    runs: dict[str, list] = {}

    def train_step(self, inputs, labels):
        spy = ScaledMMSpy()
        with spy:
            loss, grad_norm = original(self, inputs, labels)
        runs.setdefault(self.cfg.training.float8, []).append((float(loss), spy.calls[SCALED_MM]))
        return loss, grad_norm

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    return runs


def check_float8_run(plain: list, float8: list, scaled_mm_per_step: int) -> None:
    assert [calls for _, calls in plain] == [0] * STEPS
    assert [calls for _, calls in float8] == [scaled_mm_per_step] * STEPS
    plain_losses, float8_losses = [loss for loss, _ in plain], [loss for loss, _ in float8]
    assert plain_losses[-1] < plain_losses[0]  # it trained
    assert float8_losses != plain_losses  # Float8 changed the numbers...
    assert float8_losses == pytest.approx(plain_losses, rel=RTOL)  # ...by rounding only


def _layout_worker(rank, world, run_dir, layout, recipe):
    import _pytest.monkeypatch

    with _pytest.monkeypatch.MonkeyPatch.context() as monkeypatch:
        runs = _spy_on_steps(monkeypatch)
        for float8 in ("none", recipe):
            cfg = tiny_config(run_dir / float8, steps=STEPS, parallelism=layout)
            trainer = Trainer(cfg.replace(training={"float8": float8}, checkpoint={"enable": False}))
            trainer.train()
    t = cfg.training
    micro_batches = t.global_batch_size // (trainer.dims.dp * t.micro_batch_size)
    check_float8_run(runs["none"], runs[recipe], 3 * FLOAT8_PER_BLOCK * TINY_MODEL.n_layers * micro_batches)


# One process too runs in a forked rank: a Trainer run in the test process would leave its process
# groups to the garbage collector, and a later fork that collects them waits forever on gloo threads
# the fork does not have.
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_one_process(tmp_path, recipe):
    spawn_ranks(_layout_worker, 1, tmp_path, {"dp_shard": 1}, recipe, timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,world,recipe",
    [
        ({"dp_shard": 2}, 2, "tensorwise"),
        ({"dp_shard": 2}, 2, "rowwise"),
        ({"dp_shard": 1, "tp": 2, "loss_parallel": False}, 2, "tensorwise"),
        ({"dp_shard": 1, "tp": 2}, 2, "rowwise"),
        ({"dp_shard": 2, "tp": 2}, 4, "tensorwise"),
    ],
    ids=["fsdp2-tensorwise", "fsdp2-rowwise", "tp2-tensorwise", "tp2-rowwise", "tp2-fsdp2-tensorwise"],
)
def test_parallel_layouts(tmp_path, layout, world, recipe):
    spawn_ranks(_layout_worker, world, tmp_path, layout, recipe, timeout_s=180)
