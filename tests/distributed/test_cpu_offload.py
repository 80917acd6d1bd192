"""parallelism.cpu_offload: FSDP keeps the sharded parameters, gradients and optimizer state in host
memory and trains exactly as without it (CPU, gloo, 2 ranks: same losses and weights, bitwise).

On CPU the offload moves nothing, so the test also checks that FSDP really runs with the offload policy;
on CUDA (tests/cuda/test_fsdp_cuda.py) the parameters are in pinned host memory.
"""

import torch
from torch.distributed.fsdp import FSDPModule

from tests.multirank import spawn_ranks
from tests.utils import tiny_config
from titan.train.trainer import Trainer

STEPS = 3


def _offload_worker(rank, world, run_dir):
    losses, weights = {}, {}
    for offload in (False, True):
        cfg = tiny_config(
            run_dir / str(offload), steps=STEPS, parallelism={"dp_shard": 2, "cpu_offload": offload}
        )
        trainer = Trainer(cfg.replace(checkpoint={"enable": False}))
        model = trainer.model_parts[0]
        assert isinstance(model, FSDPModule)
        fsdp_params = [p for m in model.modules() if isinstance(m, FSDPModule) for p in _fsdp_params(m)]
        assert fsdp_params and all(p.offload_to_cpu == offload for p in fsdp_params)
        steps = []
        original = trainer.train_step
        trainer.train_step = lambda inputs, labels, steps=steps, original=original: _recorded(
            original(inputs, labels), steps
        )
        trainer.train()
        losses[offload] = steps
        weights[offload] = {name: p.full_tensor() for name, p in model.named_parameters()}
    assert len(losses[True]) == STEPS and losses[True][-1] < losses[True][0]
    assert losses[True] == losses[False]
    for name, tensor in weights[False].items():
        assert torch.equal(weights[True][name], tensor), name


def _fsdp_params(module: FSDPModule) -> list:
    group = module._get_fsdp_state()._fsdp_param_group
    return group.fsdp_params if group is not None else []


def _recorded(result: tuple, steps: list) -> tuple:
    steps.append(float(result[0]))
    return result


def test_cpu_offload_trains_like_fsdp(tmp_path):
    spawn_ranks(_offload_worker, 2, tmp_path, timeout_s=120)
