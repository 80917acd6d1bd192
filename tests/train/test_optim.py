import math

import pytest
import torch

from titan.config.schema import OptimizerConfig
from titan.models.llama.args import ModelArgs
from titan.models.llama.model import Transformer
from titan.train.optim import Optimizers, build_optimizer, build_scheduler, lr_factor, param_groups


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


def test_wsd_decays_a_share_of_the_steps_after_warmup():
    """25 steps, 5 of warmup: 0.25 of the 20 after it decay (5 steps), not 0.25 of all 25 (6 steps)."""
    f = factors(25, schedule="wsd", warmup_steps=5, decay_ratio=0.25, min_lr_factor=0.1)
    assert f[:5] == pytest.approx([k / 6 for k in range(1, 6)])
    assert f[5:20] == [1.0] * 15
    assert f[20:] == pytest.approx([0.1 + 0.9 * (1 - k / 5) for k in range(1, 6)])


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


def test_embeddings_and_output_decay():
    """What the schema's comment on optimizer.weight_decay says: only the norm gains are spared."""
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_dim=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"tok_embeddings.weight", "output.weight"} <= {names[id(p)] for p in decay["params"]}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_builds_foreach_on_cpu(name):
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(name=name), torch.device("cpu"))
    assert opt.defaults["foreach"] is True


def _stepped_twice(name: str, implementation: str, skip_first: bool | None) -> tuple[dict, dict]:
    """Weights and optimizer state after a (possibly skipped) step on NaN gradients, then two finite
    steps; skip_first=None: a plain torch optimizer, stepped without a flag."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = OptimizerConfig(name=name, lr=0.1, momentum=0.9, implementation=implementation)
    optimizers = Optimizers([model], cfg, torch.device("cpu"))
    plain = build_optimizer(model, cfg, torch.device("cpu"))
    if skip_first:
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        optimizers.step(torch.tensor(True))
        optimizers.zero_grad()
    for scale in (1.0, -0.5):
        for p in model.parameters():
            p.grad = scale * torch.linspace(-1, 1, p.numel()).reshape(p.shape)
        if skip_first is None:
            plain.step()
        else:
            optimizers.step(torch.tensor(False))
    state = (plain if skip_first is None else optimizers.optimizers[0]).state_dict()["state"]
    return {k: v.clone() for k, v in model.state_dict().items()}, state


def _assert_equal(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    (weights, state), (want_weights, want_state) = got, want
    for key, value in want_weights.items():
        assert torch.equal(weights[key], value), key
    for index, values in want_state.items():
        for key, value in values.items():
            assert torch.equal(state[index][key], value), (index, key)
    assert want_state, "the optimizer kept no state: nothing was compared"


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for_loop"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_skipped_step_leaves_no_trace(name, implementation):
    """A step skipped on NaN gradients changes neither weights nor state (Adam's step count, SGD's
    momentum): what follows equals a run that never had it. Fused kernels skip on their `found_inf`
    flag; fused SGD's first step would otherwise leave its momentum uninitialized."""
    _assert_equal(_stepped_twice(name, implementation, True), _stepped_twice(name, implementation, False))


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for_loop"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_step_not_skipped_is_the_plain_optimizers_step(name, implementation):
    """Bit for bit: a healthy run trains as it did before steps could be skipped."""
    _assert_equal(_stepped_twice(name, implementation, False), _stepped_twice(name, implementation, None))


def test_a_warmup_longer_than_the_run_is_cut_to_leave_one_full_step():
    """The default warmup (10) fits a 5-step smoke run: warmup over 4 steps, the last at the full LR."""
    assert factors(5, schedule="constant", warmup_steps=10) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors(5, schedule="constant", warmup_steps=2) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
