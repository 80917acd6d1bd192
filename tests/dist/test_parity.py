"""Every parallel layout trains exactly like one process (CPU, gloo, fp32, SGD).

Tolerance: losses and grad norms within 1e-5 relative, weights within 1e-5 absolute after the steps.
The layouts differ only in summation order (gradient reduction across ranks, micro-batch grouping,
matmuls split over tensor-parallel ranks), so they agree to fp32 rounding, a few ulp per step;
anything systematic (a wrong gradient scale, a skipped micro-batch, another data order, a wrong
sharding) shows up as a difference of percents.
"""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.launch.compose import compose_config
from tests.utils import read_metrics, read_model, tiny_config
from titan.launch.local import launch_local

pytestmark = pytest.mark.slow

STEPS = 3
REPO = Path(__file__).resolve().parents[2]
DEGREES = ("dp_replicate", "dp_shard", "cp", "tp", "pp")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    launch_local(tiny_config(run_dir, steps=STEPS, parallelism={"dp_shard": 1}), nproc=1)
    return read_metrics(run_dir), read_model(run_dir, STEPS)


MAX_RANKS = 4  # what the 2-core test machines run in reasonable time


def option_layout(stem: str, max_ranks: int) -> tuple[dict, int]:
    """Option conf/parallelism/<stem>.yaml at the smallest world size that exercises it on <= max_ranks
    ranks, and that world size.

    dp_shard=-1 becomes 2 where the other degrees leave room (so FSDP really shards); an option that
    names more than max_ranks ranks of model parallelism has its largest degree halved until it fits.
    """
    node = OmegaConf.to_container(compose_config([f"parallelism={stem}"]).parallelism)
    while math.prod(max(1, node[d]) for d in DEGREES) > max_ranks:
        largest = max(("tp", "cp", "pp"), key=lambda d: node[d])
        node[largest] //= 2
    fixed = math.prod(max(1, node[d]) for d in DEGREES)
    for free in ("dp_shard", "dp_replicate"):
        if node[free] == -1:
            node[free] = 2 if fixed * 2 <= max_ranks else 1
    return node, math.prod(node[d] for d in DEGREES)


def option_layouts() -> list[tuple[str, dict, int]]:
    """Every option but the reference itself, on <= MAX_RANKS ranks."""
    stems = sorted(path.stem for path in (REPO / "conf" / "parallelism").glob("*.yaml"))
    return [(stem, *option_layout(stem, MAX_RANKS)) for stem in stems if stem != "single"]


# The options cut down above, at their own degrees on 8 ranks: 4d as pp2 x cp2 x tp2, fsdp_tp_pp as
# dp_shard2 x tp2 x pp2. About 25 s each on 2 idle cores, most of it 8 ranks importing torch.
EIGHT_RANKS = [(f"{stem}-8-ranks", *option_layout(stem, 8), 2) for stem in ("4d", "fsdp_tp_pp")]


# Variants beyond the options: accumulation, replicated logits, other pipeline schedules, TP x CP.
VARIANTS = [
    ("fsdp-no-accumulation", {"dp_shard": 2}, 2, 4),
    ("tp2-replicated-logits", {"dp_shard": 1, "tp": 2, "loss_parallel": False}, 2, 2),
    ("pp2-interleaved1f1b", {"dp_shard": 1, "pp": 2, "pp_schedule": "Interleaved1F1B"}, 2, 2),
    ("pp2-zbv", {"dp_shard": 1, "pp": 2, "pp_schedule": "ZBVZeroBubble"}, 2, 2),
    ("pp2-gpipe-tp2", {"dp_shard": 1, "pp": 2, "tp": 2, "pp_schedule": "GPipe"}, 4, 2),
    ("tp2-cp2", {"dp_shard": 1, "tp": 2, "cp": 2}, 4, 2),
]
CASES = [(name, layout, nproc, 2) for name, layout, nproc in option_layouts()] + VARIANTS + EIGHT_RANKS


@pytest.mark.parametrize("name,layout,nproc,micro", CASES, ids=[case[0] for case in CASES])
def test_layout_matches_single_process(tmp_path, reference, name, layout, nproc, micro):
    ref_metrics, ref_model = reference
    cfg = tiny_config(tmp_path, steps=STEPS, parallelism=layout, training={"micro_batch_size": micro})
    launch_local(cfg, nproc=nproc)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for got, want in zip(metrics, ref_metrics):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    # the loss must actually have moved, or equal weights would prove nothing
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    model = read_model(tmp_path, STEPS)
    assert model.keys() == ref_model.keys()
    for name, tensor in model.items():
        torch.testing.assert_close(tensor, ref_model[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def adamw_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adamw-single")
    launch_local(adamw_config(run_dir, {"dp_shard": 1}), nproc=1)
    return read_metrics(run_dir)


def adamw_config(run_dir, layout):
    return tiny_config(
        run_dir,
        steps=STEPS,
        parallelism=layout,
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "schedule": "constant"},
    )


@pytest.mark.parametrize(
    "layout,nproc",
    [({"dp_shard": -1}, 2), ({"dp_shard": 1, "tp": 2}, 2), ({"dp_shard": 1, "cp": 2}, 2)],
    ids=["fsdp2", "tp2", "cp2"],
)
def test_adamw_layout_matches_single_process(tmp_path, adamw_reference, layout, nproc):
    """Adam divides by sqrt(v): gradient entries near zero turn rounding noise into whole update
    steps, so AdamW agrees less tightly than SGD. Losses within 1e-4 relative after 3 steps."""
    launch_local(adamw_config(tmp_path, layout), nproc=nproc)
    for got, want in zip(read_metrics(tmp_path), adamw_reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
