"""Pipeline parallelism (titan/models/llama/pipeline.py, titan/parallel/pp.py) against one process.

Tolerance: loss, every gradient and the grad norm within 1e-5 relative (fp32; for a gradient, the
norm of the difference over the norm of the reference). A pipeline runs the same math per microbatch
and adds the microbatch gradients in another order than one full-batch backward, so they agree to
a few ulp; a wrong scale (torch's default `scale_grads=True` would divide by the microbatch count),
a lost microbatch or a stale gradient moves them by percents.
"""

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.config.schema import ParallelismConfig
from titan.models.llama.model import ModelArgs, Transformer
from titan.models.llama.pipeline import build_stage_model, split_layers, stages_for_layers_per_stage
from titan.parallel.fsdp import apply_fsdp
from titan.parallel.mesh import ParallelDims
from titan.parallel.pp import build_pipeline, grad_norm, plan_pipeline, stage_ids
from titan.train.loss import cross_entropy_sum

TINY = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=128, max_seq_len=64)
SEQ_LEN, LOCAL_BATCH, STEPS = 16, 4, 2
REL = 1e-5

# ---- stage split and placement, hand-checked ----


@pytest.mark.parametrize(
    "n_layers,num_stages,per_stage,expected",
    [
        (4, 2, None, [[0, 1], [2, 3]]),
        (4, 4, None, [[0], [1], [2], [3]]),
        (5, 2, None, [[0, 1, 2], [3, 4]]),  # two stages: the leftover goes to the first
        (7, 3, None, [[0, 1], [2, 3, 4], [5, 6]]),  # the middle stage first
        (8, 3, None, [[0, 1, 2], [3, 4, 5], [6, 7]]),  # then the first; the last (output head) never
        (4, 2, 4, [[0, 1, 2], [3]]),  # [emb 0 1 2] [3 out]
        (4, 2, 3, [[0, 1], [2, 3]]),  # [emb 0 1] [2 3 out]
        (6, 4, 2, [[0], [1, 2], [3, 4], [5]]),  # [emb 0] [1 2] [3 4] [5 out]
        (6, 3, 3, [[0, 1], [2, 3, 4], [5]]),  # [emb 0 1] [2 3 4] [5 out]
    ],
)
def test_split_layers(n_layers, num_stages, per_stage, expected):
    got = split_layers(n_layers, num_stages, per_stage)
    assert got == expected
    assert sum(got, []) == list(range(n_layers))


def test_stages_for_layers_per_stage():
    # n + 2 units (embedding and output count as one layer each), ceil-divided
    assert [stages_for_layers_per_stage(6, k) for k in (1, 2, 3, 4, 8)] == [8, 4, 3, 2, 1]


def test_split_layers_errors():
    with pytest.raises(ValueError, match="without a transformer block"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match="without a transformer block"):
        split_layers(4, 6, 1)  # the first and last stage would hold only the embedding / output
    with pytest.raises(ValueError, match=r"into 3 stages, but the pipeline has 2.*pp_layers_per_stage in \[3, 4\]"):
        split_layers(4, 2, 2)


@pytest.mark.parametrize(
    "schedule,pp,num_stages,expected",
    [
        ("1F1B", 4, 4, [[0], [1], [2], [3]]),
        ("GPipe", 2, 2, [[0], [1]]),
        ("Interleaved1F1B", 2, 4, [[0, 2], [1, 3]]),
        ("LoopedBFS", 2, 6, [[0, 2, 4], [1, 3, 5]]),
        ("InterleavedZeroBubble", 4, 8, [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("ZBVZeroBubble", 2, 4, [[0, 3], [1, 2]]),
        ("DualPipeV", 4, 8, [[0, 7], [1, 6], [2, 5], [3, 4]]),
    ],
)
def test_stage_ids(schedule, pp, num_stages, expected):
    assert [stage_ids(schedule, r, pp, num_stages) for r in range(pp)] == expected


def test_stage_model_keeps_full_model_names():
    first = build_stage_model(TINY, [0, 1], first=True, last=False)
    last = build_stage_model(TINY, [2, 3], first=False, last=True)
    assert first.norm is None and first.output is None and last.tok_embeddings is None
    assert list(first.layers.keys()) == ["0", "1"] and list(last.layers.keys()) == ["2", "3"]
    with torch.device("meta"):
        full = Transformer(TINY)
    names = list(first.state_dict()) + list(last.state_dict())
    assert sorted(names) == sorted(full.state_dict())
    assert all(p.is_meta for p in first.parameters())


@pytest.mark.parametrize(
    "schedule,microbatches,per_stage,n_layers,stages,n_micro",
    [
        ("1F1B", None, None, 4, 2, 2),  # one stage per rank, one microbatch per stage
        ("GPipe", 4, None, 4, 2, 4),
        ("Interleaved1F1B", None, None, 4, 4, 4),  # two stages per rank by default
        ("Interleaved1F1B", 2, None, 4, 4, 2),  # looped schedules run with fewer microbatches
        ("ZBVZeroBubble", None, 2, 6, 4, 4),
        ("LoopedBFS", None, 2, 10, 6, 6),  # 12 units / 2 = 6 stages, 3 per rank
    ],
)
def test_plan(schedule, microbatches, per_stage, n_layers, stages, n_micro):
    cfg = ParallelismConfig(pp=2, pp_schedule=schedule, pp_microbatches=microbatches, pp_layers_per_stage=per_stage)
    plan = plan_pipeline(replace(TINY, n_layers=n_layers), cfg, local_batch=12)
    assert (plan.num_stages, plan.n_microbatches, plan.microbatch_size) == (stages, n_micro, 12 // n_micro)


@pytest.mark.parametrize(
    "model,cfg,local_batch,match",
    [
        (TINY, dict(pp_schedule="Chimera"), 4, r"pp_schedule='Chimera' is not one of"),
        (replace(TINY, tie_embeddings=True), {}, 4, r"model.tie_embeddings=true with parallelism.pp=2"),
        (replace(TINY, n_layers=3), dict(pp_schedule="DualPipeV"), 4, r"without a transformer block"),
        (TINY, dict(pp_layers_per_stage=2), 4, r"into 3 stages.*needs exactly parallelism.pp=2 stages"),
        (TINY, dict(pp_schedule="ZBVZeroBubble", pp_layers_per_stage=3), 4, r"needs exactly 2 x parallelism.pp"),
        (replace(TINY, n_layers=6), dict(pp_schedule="LoopedBFS", pp_layers_per_stage=3), 4, "a multiple of"),
        (TINY, dict(pp_microbatches=3), 4, r"local batch of 4 .*pp_microbatches=3.*one of \[2, 4\]"),
        (TINY, dict(pp_microbatches=1), 4, r"1F1B needs at least one microbatch per stage"),
        (TINY, dict(pp_schedule="DualPipeV", pp_microbatches=2), 4, r"pp_microbatches=2 < 4 stages"),
        (TINY, dict(pp_schedule="ZBVZeroBubble", pp_microbatches=2), 4, r"pp_microbatches=2 < 4 stages"),
        (TINY, {}, 3, r"local batch of 3 sequences"),
    ],
)
def test_plan_errors(model, cfg, local_batch, match):
    with pytest.raises(ValueError, match=match):
        plan_pipeline(model, ParallelismConfig(pp=2, **cfg), local_batch=local_batch)


# ---- multi-rank, gloo subprocesses ----

# name: (schedule, n_layers, pp_layers_per_stage, pp_microbatches); None: the defaults
CASES = {
    "GPipe": ("GPipe", 4, None, None),
    "1F1B": ("1F1B", 4, None, None),
    "Interleaved1F1B": ("Interleaved1F1B", 4, None, None),
    "LoopedBFS": ("LoopedBFS", 4, None, None),
    "InterleavedZeroBubble": ("InterleavedZeroBubble", 4, None, None),
    "ZBVZeroBubble": ("ZBVZeroBubble", 4, None, None),
    "DualPipeV": ("DualPipeV", 4, None, None),
    "1F1B-uneven-3-1": ("1F1B", 4, 4, None),  # stages [0 1 2] [3]
    "GPipe-4-microbatches": ("GPipe", 4, None, 4),
    "Interleaved1F1B-uneven-2-microbatches": ("Interleaved1F1B", 6, 2, 2),  # [0] [1 2] [3 4] [5]
    "ZBVZeroBubble-uneven": ("ZBVZeroBubble", 6, 2, None),  # rank 0: [0] and [5], rank 1: [1 2], [3 4]
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args, timeout_s: float = 120):
    """Run fn(rank, world, *args) on `world` gloo ranks; an error on any rank fails the test.

    Forked, not spawned: a spawned rank re-imports torch, 7 s for 2 ranks and 19 s for 4 on 2 cores,
    a fork 0.1 s. Safe here: this process holds no process group, and OMP_NUM_THREADS=1 (conftest)
    leaves no OpenMP pool behind. The deadline turns a pipeline deadlock into a failure, not a hang.
    """
    ctx = mp.start_processes(
        _entry, args=(world, _free_port(), fn, args), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout_s} s")


def _full_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    """The single-process model's initial weights (seed 0)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model.state_dict()


def _batch(step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, TINY.vocab_size, (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


@torch.no_grad()
def _load(part: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the full model's weights into a materialised part (plain or FSDP-sharded)."""
    for name, param in part.named_parameters():
        if isinstance(param, DTensor):
            shard = distribute_tensor(state[name], param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(state[name])
    part.init_rope()


def _gathered_grads(parts) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for part in parts
        for name, p in part.named_parameters()
    }


def _run_pipeline(pipeline, batch_offset: int, dp: int) -> list[dict]:
    """STEPS optimizer steps (no update: grads zeroed between), each step's loss, grads, grad norm."""
    results = []
    global_tokens = LOCAL_BATCH * dp * SEQ_LEN
    for step in range(STEPS):
        inputs, labels = _batch(step, LOCAL_BATCH * dp)
        inputs, labels = (t[batch_offset : batch_offset + LOCAL_BATCH] for t in (inputs, labels))
        loss_sum = pipeline.step(inputs, labels, grad_scale=dp / global_tokens)
        norm = grad_norm(pipeline.model_parts, pipeline.pp_mesh)
        results.append({"loss_sum": loss_sum, "grads": _gathered_grads(pipeline.model_parts), "norm": norm})
        for part in pipeline.model_parts:
            part.zero_grad(set_to_none=True)
    return results


def _schedule_worker(rank, world, out_dir, case_names):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    for name in case_names:
        schedule, n_layers, per_stage, microbatches = CASES[name]
        args = replace(TINY, n_layers=n_layers)
        cfg = ParallelismConfig(
            pp=world, pp_schedule=schedule, pp_layers_per_stage=per_stage, pp_microbatches=microbatches
        )
        pipeline = build_pipeline(args, cfg, mesh, local_batch=LOCAL_BATCH)
        state = _full_state(args)
        for part in pipeline.model_parts:
            part.to_empty(device="cpu")
            _load(part, state)
        pipeline.build_schedule(torch.device("cpu"), cross_entropy_sum)
        torch.save(
            {"stages": pipeline.stage_ids, "steps": _run_pipeline(pipeline, 0, dp=1)},
            Path(out_dir) / f"{name}-{rank}.pt",
        )


def _reference(args: ModelArgs, dp: int = 1) -> list[dict]:
    """One process, the whole batch of every step in one forward/backward."""
    model = Transformer(args)
    model.load_state_dict(_full_state(args))
    model.init_rope()
    results = []
    for step in range(STEPS):
        inputs, labels = _batch(step, LOCAL_BATCH * dp)
        loss_sum = cross_entropy_sum(model(inputs), labels)
        (loss_sum / labels.numel()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = torch.nn.utils.get_total_norm(list(grads.values()))
        results.append({"loss_sum": loss_sum.detach(), "grads": grads, "norm": norm})
        model.zero_grad(set_to_none=True)
    return results


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _check_against_reference(per_rank: list[list[dict]], reference: list[dict]) -> None:
    for step, want in enumerate(reference):
        got = [steps[step] for steps in per_rank]
        losses = [g["loss_sum"] for g in got if g["loss_sum"] is not None]
        assert _rel(sum(losses), want["loss_sum"]) < REL
        grads = {}
        for g in got:
            assert not grads.keys() & g["grads"].keys(), "a parameter lives on two pipeline ranks"
            grads.update(g["grads"])
        assert grads.keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            assert _rel(grads[name], grad) < REL, (step, name, _rel(grads[name], grad))
        for g in got:  # the same global norm on every rank
            assert _rel(g["norm"], want["norm"]) < REL


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Every case on one 2-rank process group (one spawn: ~3 s of start-up instead of one per case)."""
    out = tmp_path_factory.mktemp("pp")
    _spawn(_schedule_worker, 2, str(out), list(CASES))
    return {name: [torch.load(out / f"{name}-{r}.pt", weights_only=False) for r in range(2)] for name in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_single_process(two_rank_results, name):
    schedule, n_layers, per_stage, _ = CASES[name]
    ranks = two_rank_results[name]
    num_stages = len(sum((r["stages"] for r in ranks), []))
    assert [r["stages"] for r in ranks] == [stage_ids(schedule, rank, 2, num_stages) for rank in range(2)]
    last_rank = next(rank for rank in range(2) if num_stages - 1 in ranks[rank]["stages"])
    for rank in range(2):  # the loss comes back on the rank of the last stage only
        assert all((s["loss_sum"] is None) == (rank != last_rank) for s in ranks[rank]["steps"])
    _check_against_reference([r["steps"] for r in ranks], _reference(replace(TINY, n_layers=n_layers)))


# ---- pipeline x FSDP: 4 ranks, pp=2 x dp_shard=2 ----


def _fsdp_worker(rank, world, out_dir, schedule):
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=2, world_size=world)
    meshes = dims.build_meshes("cpu")
    cfg = ParallelismConfig(pp=2, dp_shard=2, pp_schedule=schedule)
    pipeline = build_pipeline(TINY, cfg, meshes["pp"], local_batch=LOCAL_BATCH)
    for part in pipeline.model_parts:
        apply_fsdp(
            part,
            list(part.layers.values()),
            meshes["fsdp"],
            param_dtype="float32",
            reduce_dtype="float32",
            reshard_after_forward="default",
            cpu_offload=False,
            pipeline=True,
        )
        part.to_empty(device="cpu")
        _load(part, _full_state(TINY))
    try:
        pipeline.build_schedule(torch.device("cpu"), cross_entropy_sum)
    except ValueError as e:
        Path(out_dir, f"refused-{rank}.txt").write_text(str(e))
        return
    dp_rank = meshes["dp"].get_local_rank()
    steps = _run_pipeline(pipeline, dp_rank * LOCAL_BATCH, dp=2)
    torch.save(steps, Path(out_dir) / f"{rank}.pt")


@pytest.mark.slow
def test_pipeline_with_fsdp_matches_single_process(tmp_path):
    _spawn(_fsdp_worker, 4, str(tmp_path), "1F1B")
    # ranks (pp, dp): 0 (0,0), 1 (0,1), 2 (1,0), 3 (1,1); each dp rank ran half of the global batch
    per_rank = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(4)]
    for steps in per_rank[1::2]:  # the gathered grads are the same on both dp ranks: keep one of each
        for s in steps:
            s["grads"] = {}
    _check_against_reference(per_rank, _reference(TINY, dp=2))


@pytest.mark.slow
def test_zero_bubble_with_fsdp_is_refused(tmp_path):
    _spawn(_fsdp_worker, 4, str(tmp_path), "ZBVZeroBubble")
    for rank in range(4):
        assert "skips FSDP's gradient reduction" in (tmp_path / f"refused-{rank}.txt").read_text()
