"""Sharding plans at cluster scale, on the meta device, with torch's "fake" process group.

No tensor is allocated and no rank but this one exists: the test checks that degrees, meshes and
the TP/FSDP/PP plans compose for real model sizes and world sizes (64 and 512 ranks).
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from titan.config.schema import ParallelismConfig, TrainingConfig
from titan.distributed.mesh import ParallelDims
from titan.models.llama.args import ModelArgs
from titan.models.llama.model import Transformer
from titan.models.llama.parallelize import parallelize_llama
from titan.models.llama.pipeline import build_pipeline

LLAMA3_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336)
LLAMA3_405B = ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, ffn_dim=53248)
TRAINING = TrainingConfig(seq_len=8192, global_batch_size=512, micro_batch_size=1)


@pytest.fixture
def fake_world(request):
    rank, world = request.param
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    yield rank, world
    dist.destroy_process_group()


def local_shape(param) -> tuple[int, ...]:
    return tuple(param.to_local().shape if isinstance(param, DTensor) else param.shape)


@pytest.mark.parametrize("fake_world", [(13, 64)], indirect=True)
def test_tp8_fsdp_plan_for_8b_on_64_ranks(fake_world):
    cfg = ParallelismConfig(dp_shard=-1, tp=8)
    dims = ParallelDims.resolve(cfg, 64)
    assert (dims.dp_shard, dims.tp) == (8, 8)
    meshes = dims.build_meshes("cpu")
    with torch.device("meta"):
        model = Transformer(LLAMA3_8B)
    parallelize_llama(model, dims, meshes, TRAINING, cfg)
    block = model.layers["0"]
    # column-parallel: heads split over tp=8, then rows over dp_shard=8
    assert local_shape(block.attention.wq.weight) == (4096 // 8 // 8, 4096)
    assert local_shape(block.attention.wk.weight) == (1024 // 8 // 8, 4096)
    # row-parallel: input columns over tp, rows over dp_shard
    assert local_shape(block.feed_forward.w2.weight) == (4096 // 8, 14336 // 8)
    # vocabulary-parallel embedding and output
    assert local_shape(model.tok_embeddings.weight) == (128256 // 8 // 8, 4096)
    assert local_shape(model.output.weight) == (128256 // 8 // 8, 4096)
    assert block.attention.wq.weight.device_mesh.mesh_dim_names == ("dp_shard_cp", "tp")


@pytest.mark.parametrize("fake_world", [(0, 512), (511, 512)], indirect=True)
def test_4d_plan_for_405b_on_512_ranks(fake_world):
    rank, world = fake_world
    cfg = ParallelismConfig(dp_shard=-1, cp=2, tp=8, pp=8, pp_schedule="Interleaved1F1B")
    dims = ParallelDims.resolve(cfg, world)
    assert (dims.pp, dims.dp_shard, dims.cp, dims.tp) == (8, 4, 2, 8)
    meshes = dims.build_meshes("cpu")
    assert meshes["fsdp"].size() == 8  # FSDP shards over dp_shard x cp
    assert meshes["loss"].size() == 8
    pipeline = build_pipeline(
        LLAMA3_405B, cfg, meshes["pp"], local_batch=TRAINING.global_batch_size // dims.dp
    )
    pp_rank = meshes["pp"].get_local_rank()
    assert pipeline.stage_ids == [pp_rank + 8 * i for i in range(2)]  # two looped stages per rank
    layers = [len(part.layers) for part in pipeline.model_parts]
    assert sum(layers) in range(14, 19)  # 126 blocks over 16 stages
    for part in pipeline.model_parts:
        parallelize_llama(part, dims, meshes, TRAINING, cfg, pipeline=True)
        block = next(iter(part.layers.values()))
        assert local_shape(block.attention.wq.weight) == (16384 // 8 // 8, 16384)
    assert pipeline.has_first_stage == (pp_rank == 0)
    assert pipeline.has_last_stage == (pp_rank == 7)


LLAMA3_70B = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, ffn_dim=28672)


def rank_param_bytes(parts) -> int:
    """Bytes of parameters this rank holds (fp32), counting a tied tensor once."""
    seen, total = set(), 0
    for part in parts:
        for p in part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += math.prod(local_shape(p)) * 4
    return total


@pytest.mark.parametrize(
    "fake_world,degrees",
    [
        ((3, 8), {"dp_shard": 8}),  # 8B, FSDP over 8
        ((5, 8), {"dp_shard": 1, "tp": 8}),  # 8B, TP over 8
    ],
    indirect=["fake_world"],
    ids=["8b-fsdp8", "8b-tp8"],
)
def test_8b_on_8_ranks_holds_an_eighth(fake_world, degrees):
    rank, world = fake_world
    cfg = ParallelismConfig(**degrees)
    dims = ParallelDims.resolve(cfg, world)
    with torch.device("meta"):
        model = Transformer(LLAMA3_8B)
    total = rank_param_bytes([model])
    parallelize_llama(model, dims, dims.build_meshes("cpu"), TRAINING, cfg)
    # FSDP pads uneven shards and TP replicates the norms: within 0.1% of an exact eighth.
    assert rank_param_bytes([model]) == pytest.approx(total / 8, rel=1e-3)
    assert total == pytest.approx(8.03e9 * 4, rel=1e-3)


@pytest.mark.parametrize("fake_world", [(200, 256)], indirect=True)
def test_70b_fsdp32_tp8_on_256_ranks(fake_world):
    cfg = ParallelismConfig(dp_shard=-1, tp=8)
    dims = ParallelDims.resolve(cfg, 256)
    assert (dims.dp_shard, dims.tp) == (32, 8)
    with torch.device("meta"):
        model = Transformer(LLAMA3_70B)
    total = rank_param_bytes([model])
    parallelize_llama(model, dims, dims.build_meshes("cpu"), TRAINING, cfg)
    assert rank_param_bytes([model]) == pytest.approx(total / 256, rel=1e-2)  # ~1.1 GB of fp32 per rank
    assert local_shape(model.layers["7"].feed_forward.w1.weight) == (28672 // 8 // 32, 8192)


@pytest.mark.parametrize("fake_world", [(0, 512), (300, 512)], indirect=True)
def test_405b_fsdp8_tp8_pp8_on_512_ranks(fake_world):
    rank, world = fake_world
    cfg = ParallelismConfig(dp_shard=-1, tp=8, pp=8)
    dims = ParallelDims.resolve(cfg, world)
    assert (dims.pp, dims.dp_shard, dims.tp) == (8, 8, 8)
    meshes = dims.build_meshes("cpu")
    pipeline = build_pipeline(
        LLAMA3_405B, cfg, meshes["pp"], local_batch=TRAINING.global_batch_size // dims.dp
    )
    pp_rank = meshes["pp"].get_local_rank()
    assert pp_rank == rank // 64 and pipeline.stage_ids == [pp_rank]  # 1F1B: one stage per rank
    (part,) = pipeline.model_parts
    stage_layers = sorted(int(name) for name in part.layers)
    assert stage_layers == pipeline.plan.layers[pp_rank] and 14 <= len(stage_layers) <= 17
    parallelize_llama(part, dims, meshes, TRAINING, cfg, pipeline=True)
    # a stage holds about 1/8 of the blocks, each split 64 ways (fsdp8 x tp8)
    block_bytes = 4 * (4 * 16384 * 16384 * (1 + 8 / 128) / 2 + 3 * 16384 * 53248)
    assert rank_param_bytes([part]) >= len(stage_layers) * block_bytes / 64
