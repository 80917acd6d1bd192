"""FSDP2 on NCCL (titan/distributed/fsdp.py), with and without parallelism.cpu_offload, on a 1-rank mesh.

No run option puts FSDP on one rank (dp_shard=1 turns it off), so the test calls `apply_fsdp` itself,
on a model built the way build_model builds one: on the meta device, sharded, materialized (on the
CPU when offloading), initialized. Three SGD steps in fp32 against an unsharded copy on the GPU.

Tolerance: losses within 1e-5 relative, weights within 1e-5 absolute. On one rank the all-gather and
reduce-scatter copy, so only kernel choice (the unsharded copy's matmuls see other strides) can differ;
a wrong gradient scale, a lost update or a parameter left on the wrong device differs by percents.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.utils import TINY_MODEL
from titan.distributed.fsdp import apply_fsdp
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.train.loss import cross_entropy_sum

pytestmark = pytest.mark.cuda

STEPS = 3
LR = 0.5
DEVICE = torch.device("cuda", 0)


@pytest.fixture
def fsdp_mesh():
    """A 1-rank NCCL group, with gloo for CPU tensors (offloaded gradients), and its FSDP mesh."""
    torch.cuda.set_device(DEVICE)
    dist.init_process_group(
        "cuda:nccl,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1, device_id=DEVICE
    )
    try:
        yield init_device_mesh("cuda", (1,), mesh_dim_names=("fsdp",))
    finally:
        dist.destroy_process_group()


def unsharded_model() -> Transformer:
    with torch.device("meta"):
        model = Transformer(TINY_MODEL)
    model.to_empty(device=DEVICE)
    init_weights(model, TINY_MODEL, seed=0, device=DEVICE)
    return model


def sharded_model(mesh, *, cpu_offload: bool) -> Transformer:
    """As titan/train/build_model.py builds it: meta -> FSDP -> materialize -> init."""
    with torch.device("meta"):
        model = Transformer(TINY_MODEL)
    apply_fsdp(
        model,
        list(model.layers.values()),
        mesh,
        param_dtype="float32",
        reduce_dtype="float32",
        reshard_after_forward="default",
        cpu_offload=cpu_offload,
    )
    model.to_empty(device="cpu" if cpu_offload else DEVICE)
    init_weights(model, TINY_MODEL, seed=0, device=DEVICE)
    return model


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY_MODEL.vocab_size, (2, 33), generator=generator) for _ in range(STEPS)]


def train(model: Transformer) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for tokens in batches():
        tokens = tokens.to(DEVICE)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        loss = cross_entropy_sum(model(inputs), labels) / labels.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def full_weights(model: Transformer) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to(DEVICE)
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["on-gpu", "cpu-offload"])
def test_fsdp_trains_like_the_unsharded_model(fsdp_mesh, cpu_offload):
    reference, model = unsharded_model(), sharded_model(fsdp_mesh, cpu_offload=cpu_offload)
    for name, tensor in full_weights(reference).items():  # the same start
        torch.testing.assert_close(full_weights(model)[name], tensor, rtol=0, atol=0, msg=name)

    params = [p.to_local() for p in model.parameters()]
    if cpu_offload:  # offloaded: in pinned host memory (fast, asynchronous copies to the GPU)
        assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    else:
        assert all(p.device == DEVICE for p in params)
    assert model.rope_cache.device == DEVICE  # a buffer, never offloaded

    want, got = train(reference), train(model)
    assert want[-1] < want[0]
    assert got == pytest.approx(want, rel=1e-5)
    if cpu_offload:  # the optimizer stepped the host copies, and they stayed pinned
        assert all(p.to_local().device.type == "cpu" and p.to_local().is_pinned() for p in model.parameters())
    trained = full_weights(model)
    for name, tensor in full_weights(reference).items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-5, msg=name)
