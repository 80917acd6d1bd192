import math

import pytest
import torch

from titan.config.schema import OptimizerConfig
from titan.models.llama.args import ModelArgs
from titan.models.llama.model import Transformer
from titan.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def factors(total: int, **kw) -> list[float]:
    f = lr_factor(OptimizerConfig(**kw), total)
    return [f(s) for s in range(total)]


def test_constant_with_warmup():
    assert factors(6, schedule="constant", warmup_steps=3) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_reaches_min_lr_on_the_last_step():
    f = factors(10, schedule="linear", warmup_steps=0, min_lr_factor=0.1)
    assert f[0] == pytest.approx(0.1 + 0.9 * 0.9) and f[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f, f[1:]))


def test_cosine_shape():
    f = factors(101, schedule="cosine", warmup_steps=1, min_lr_factor=0.0)
    assert f[51] == pytest.approx(0.5 * (1 + math.cos(math.pi * 51 / 100)))
    assert f[-1] == pytest.approx(0.0, abs=1e-12)


def test_wsd_is_flat_then_decays_over_the_decay_ratio():
    f = factors(20, schedule="wsd", warmup_steps=0, decay_ratio=0.25, min_lr_factor=0.1)
    assert f[:15] == [1.0] * 15
    assert f[15:] == pytest.approx([0.1 + 0.9 * (1 - k / 5) for k in range(1, 6)])


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(
        opt, OptimizerConfig(lr=1.0, schedule="linear", warmup_steps=0, min_lr_factor=0.0), 4
    )
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_no_weight_decay_on_norms():
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_dim=64))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert (
        all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3
    )  # 2 block norms + final
    assert all(p.ndim == 2 for p in decay["params"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_builds_foreach_on_cpu(name):
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(name=name), torch.device("cpu"))
    assert opt.defaults["foreach"] is True
