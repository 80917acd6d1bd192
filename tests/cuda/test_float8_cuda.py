"""Float8 on a GPU with float8 tensor cores (SM 8.9+; skipped below), and FSDP's float8 all-gather with
precomputed scales on a 1-rank NCCL mesh (titan/distributed/float8.py). On SM < 8.9 the refusal is
checked instead.

Tolerances. Float8 against the same bf16 run: losses within 2e-2 relative after 3 steps (e4m3 keeps 3
mantissa bits; the tiny model's loss at init is ~7.7 and moves in the 3rd digit at most). The float8
all-gather against FSDP's normal all-gather under Float8: the same float8 casts of the same weights, by
other kernels (the scale comes from one fused all-reduce instead of one per weight), so within 1e-3.
"""

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from tests.utils import TINY_MODEL
from titan.config.errors import ConfigError
from titan.distributed.float8 import MIN_CUDA_CAPABILITY, apply_float8, precompute_float8_scales
from titan.distributed.fsdp import apply_fsdp
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.train.loss import cross_entropy_sum

pytestmark = pytest.mark.cuda

STEPS = 3
LR = 0.5
DEVICE = torch.device("cuda", 0)
# Each block's wq, wk, wv, wo, w1, w2, w3 (TINY_MODEL's dims are multiples of 16); not the output.
FLOAT8_LINEARS = 7 * TINY_MODEL.n_layers


def has_float8_tensor_cores() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= MIN_CUDA_CAPABILITY


needs_float8 = pytest.mark.skipif(not has_float8_tensor_cores(), reason="needs SM 8.9+ (Ada, Hopper)")


class ScaledMMSpy(TorchDispatchMode):
    """Counts aten._scaled_mm on plain tensors; float8 tensor subclasses are left to their own dispatch,
    whose _scaled_mm then comes here."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor for t in types):
            return NotImplemented
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fsdp_mesh():
    torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=DEVICE)
    try:
        yield init_device_mesh("cuda", (1,), mesh_dim_names=("fsdp",))
    finally:
        dist.destroy_process_group()


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY_MODEL.vocab_size, (2, 33), generator=generator) for _ in range(STEPS)]


def train(model, *, after_step=lambda: None, autocast: bool = False) -> tuple[list[float], list[int]]:
    """STEPS of SGD; each step's loss and number of aten._scaled_mm calls."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, scaled_mm = [], []
    for tokens in batches():
        tokens = tokens.to(DEVICE)
        spy = ScaledMMSpy()
        with spy, torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step()
        losses.append(loss.item())
        scaled_mm.append(spy.calls[torch.ops.aten._scaled_mm.default])
    return losses, scaled_mm


def single_device_model() -> Transformer:
    with torch.device("meta"):
        model = Transformer(TINY_MODEL)
    return model


def materialize(model: Transformer) -> Transformer:
    model.to_empty(device=DEVICE)
    init_weights(model, TINY_MODEL, seed=0, device=DEVICE)
    return model


@needs_float8
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_on_one_gpu(recipe):
    """bf16 autocast, as a run without FSDP trains: the same model with and without Float8."""
    plain = materialize(single_device_model())
    model = single_device_model()
    assert apply_float8(model, recipe, fsdp_float8_all_gather=False, device=DEVICE) == FLOAT8_LINEARS
    materialize(model)
    want, plain_scaled_mm = train(plain, autocast=True)
    got, scaled_mm = train(model, autocast=True)
    assert plain_scaled_mm == [0] * STEPS
    assert scaled_mm == [3 * FLOAT8_LINEARS] * STEPS  # output, grad input, grad weight
    assert want[-1] < want[0]
    assert got != want
    assert got == pytest.approx(want, rel=2e-2)


def fsdp_float8_model(mesh, *, all_gather: bool) -> Transformer:
    model = single_device_model()
    apply_float8(model, "tensorwise", fsdp_float8_all_gather=all_gather, device=DEVICE)
    apply_fsdp(
        model,
        list(model.layers.values()),
        mesh,
        param_dtype="bfloat16",
        reduce_dtype="float32",
        reshard_after_forward="default",
        cpu_offload=False,
    )
    return materialize(model)


@needs_float8
def test_fsdp_float8_all_gather_with_precomputed_scales(fsdp_mesh, monkeypatch):
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    gathered = []  # (dtype FSDP all-gathers, whether the scale was precomputed), per weight gather
    original = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather

    def fsdp_pre_all_gather(self, mesh):
        precomputed = self._precomputed_scale is not None
        inputs, metadata = original(self, mesh)
        gathered.append((precomputed, inputs[0].dtype))
        return inputs, metadata

    monkeypatch.setattr(WeightWithDynamicFloat8CastTensor, "fsdp_pre_all_gather", fsdp_pre_all_gather)

    reference = fsdp_float8_model(fsdp_mesh, all_gather=False)  # FSDP gathers bf16, then casts
    model = fsdp_float8_model(fsdp_mesh, all_gather=True)
    weights = [m.weight for m in model.modules() if hasattr(m, "weight") and m.weight.ndim == 2]
    float8_weights = [w for w in weights if isinstance(w._local_tensor, WeightWithDynamicFloat8CastTensor)]
    assert len(float8_weights) == FLOAT8_LINEARS

    want, _ = train(reference)
    assert gathered == []  # the normal all-gather never asks the weights for float8
    scales_after_step = []

    def precompute():
        precompute_float8_scales([model])
        scales_after_step.append([w._local_tensor._precomputed_scale.clone() for w in float8_weights])

    got, scaled_mm = train(model, after_step=precompute)
    assert scaled_mm == [3 * FLOAT8_LINEARS] * STEPS
    assert {dtype for _, dtype in gathered} == {torch.float8_e4m3fn}
    # The first forward computes scales itself; after each optimizer step they are precomputed.
    first_step = [precomputed for precomputed, _ in gathered[: len(gathered) // STEPS]]
    later_steps = [precomputed for precomputed, _ in gathered[len(gathered) // STEPS :]]
    assert not any(first_step) and all(later_steps)
    # The precomputed scale is float8's largest value over the weight's largest magnitude.
    for weight, scale in zip(float8_weights, scales_after_step[-1]):
        amax = weight.full_tensor().float().abs().max()
        torch.testing.assert_close(scale, torch.finfo(torch.float8_e4m3fn).max / amax, rtol=1e-6, atol=0)
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.skipif(
    not torch.cuda.is_available() or has_float8_tensor_cores(), reason="needs a GPU below SM 8.9"
)
def test_float8_is_refused_below_sm89():
    with pytest.raises(ConfigError, match=r"SM 8\.9\+.*set training\.float8=none"):
        apply_float8(single_device_model(), "tensorwise", fsdp_float8_all_gather=False, device=DEVICE)
