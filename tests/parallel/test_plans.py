"""Sharding plans at cluster scale, on the meta device, with torch's "fake" process group.

No tensor is allocated and no rank but this one exists: the test checks that degrees, meshes and
the TP/FSDP/PP plans compose for real model sizes and world sizes (64 and 512 ranks).
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from titan.config.schema import ParallelismConfig, TrainingConfig
from titan.models.llama.model import ModelArgs, Transformer
from titan.models.llama.parallelize import parallelize_llama
from titan.parallel.mesh import ParallelDims
from titan.parallel.pp import build_pipeline

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
