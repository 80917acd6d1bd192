"""Gradient clipping against a computation by hand, in every layout that fits 4 ranks (CPU, gloo, fp32).

One SGD step with momentum, training.max_norm below the step's gradient norm. The first step's
momentum buffer is the gradient the optimizer got, so the checkpoint of step 1 holds the clipped
gradient. By hand, in this process, with neither titan's norm nor its clipping: the gradient of the
same batch from the same initial weights, its global norm in float64, the gradient scaled as
torch.nn.utils.clip_grad_norm_ documents (max_norm / (norm + 1e-6)), and the SGD step on it.
The layouts differ from it in summation order only (see test_parity).
"""

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.dist.test_parity import option_layouts
from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL, read_metrics, tiny_config
from titan.data.loader import TrainLoader
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.train.loss import cross_entropy_sum
from titan.train.trainer import Trainer

pytestmark = pytest.mark.slow

MAX_NORM, LR, MOMENTUM = 0.25, 0.5, 0.9
CPU = torch.device("cpu")
LAYOUTS = [("single", {"dp_shard": 1}, 1)] + option_layouts()


def clip_config(run_dir: Path, layout: dict):
    return tiny_config(
        run_dir,
        steps=1,
        parallelism=layout,
        training={"max_norm": MAX_NORM},
        optimizer={"momentum": MOMENTUM, "lr": LR},
    )


@pytest.fixture(scope="module")
def by_hand() -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the raw global norm, the clipped gradient and the weights after the step), by parameter name."""
    cfg = clip_config(Path("unused"), {"dp_shard": 1})
    with torch.device("meta"):
        model = Transformer(TINY_MODEL)
    model.to_empty(device=CPU)
    init_weights(model, TINY_MODEL, seed=cfg.training.seed, device=CPU)
    t = cfg.training
    loader = TrainLoader(
        cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size, dp_rank=0, dp_degree=1
    )
    inputs, labels = next(iter(loader))
    loader.close()
    (cross_entropy_sum(model(inputs), labels) / labels.numel()).backward()
    params = dict(model.named_parameters())
    norm = math.sqrt(sum(p.grad.double().square().sum().item() for p in params.values()))
    clipped = {n: p.grad.double() * (MAX_NORM / (norm + 1e-6)) for n, p in params.items()}
    weights = {n: p.detach().double() - LR * clipped[n] for n, p in params.items()}
    return norm, clipped, weights


def _train(rank: int, world: int, cfg) -> None:
    Trainer(cfg).train()  # the harness owns the process group


@pytest.mark.parametrize("name,layout,nproc", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_clipped_step_equals_the_step_by_hand(tmp_path, by_hand, name, layout, nproc):
    norm, clipped, weights = by_hand
    assert norm > 2 * MAX_NORM  # clipping must change the step, or this proves nothing
    spawn_ranks(_train, nproc, clip_config(tmp_path, layout))

    assert read_metrics(tmp_path)[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the raw norm
    dcp_to_torch_save(tmp_path / "checkpoints" / "step-1", tmp_path / "step-1.pt")
    state = torch.load(tmp_path / "step-1.pt", weights_only=True)
    buffers = {n: state["optimizer"][f"state.{n}.momentum_buffer"] for n in clipped}
    got_norm = math.sqrt(sum(b.double().square().sum().item() for b in buffers.values()))
    assert got_norm == pytest.approx(MAX_NORM, rel=1e-5)
    for n, want in clipped.items():
        torch.testing.assert_close(buffers[n].double(), want, rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(state["model"][n].double(), weights[n], rtol=0, atol=1e-6, msg=n)
