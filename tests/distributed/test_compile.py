"""training.compile really compiles the blocks (titan/distributed/compile.py, applied by parallelize_llama).

`Module.compile` keeps the module's class, and a compiled block computes what an eager one does, so
neither a type check nor equal losses can tell compiled from not compiled. A counting backend can: it
sees the frames dynamo hands it and every run of the code it returns.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL
from titan.config.schema import ParallelismConfig, TrainingConfig
from titan.distributed.mesh import ParallelDims
from titan.models.llama.model import Transformer
from titan.models.llama.parallelize import parallelize_llama

STEPS = 2


class CountingBackend(CompileCounterWithBackend):
    """aot_eager, counting the frames it compiles (`frame_count`) and the runs of their code (`runs`)."""

    def __init__(self):
        super().__init__("aot_eager")
        self.runs = 0

    def __call__(self, gm, example_inputs):
        compiled = super().__call__(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # how dynamo passes the arguments
        return run


def compiled_steps(parallelism: ParallelismConfig, world: int, ac: str) -> CountingBackend:
    """STEPS forwards and backwards of the tiny model, parallelized with training.compile on."""
    torch._dynamo.reset()  # no frame compiled by an earlier test may answer for this one
    backend = CountingBackend()
    training = TrainingConfig(compile=True, compile_backend=backend, ac=ac)
    dims = ParallelDims.resolve(parallelism, world)
    meshes = dims.build_meshes("cpu") if world > 1 else {}
    torch.manual_seed(0)  # the same weights on every rank
    model = Transformer(TINY_MODEL)
    model.init_weights()
    parallelize_llama(model, dims, meshes, training, parallelism)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, 32))
    for _ in range(STEPS):
        logits = model(tokens)
        logits = logits.full_tensor() if isinstance(logits, torch.distributed.tensor.DTensor) else logits
        logits.float().logsumexp(-1).mean().backward()
    return backend


def check_counts(backend: CountingBackend, runs_per_block_call: int) -> None:
    assert backend.frame_count >= 1
    assert backend.runs == STEPS * TINY_MODEL.n_layers * runs_per_block_call


# Compiled code runs per block call (torch 2.13). One process and FSDP: the block's forward, one
# frame, with its checkpoint inside under AC (FSDP's hooks stay outside: dynamo skips them).
@pytest.mark.parametrize("ac", ["none", "full"])
def test_every_block_call_runs_compiled_code(ac):
    check_counts(compiled_steps(ParallelismConfig(dp_shard=1), 1, ac), runs_per_block_call=1)


def _compiled_worker(rank, world, parallelism, ac, runs_per_block_call):
    check_counts(compiled_steps(parallelism, world, ac), runs_per_block_call)


@pytest.mark.parametrize(
    "parallelism,ac,runs_per_block_call",
    [
        # TP compiles attention and feed-forward apart (parallelize.py): each runs its TP input hook
        # and its forward as two frames; under full AC the recomputation in backward runs them again.
        (ParallelismConfig(dp_shard=1, tp=2), "none", 4),
        (ParallelismConfig(dp_shard=1, tp=2), "full", 8),
        (ParallelismConfig(dp_shard=2), "none", 1),
    ],
    ids=["tp2", "tp2-ac-full", "fsdp2"],
)
def test_every_block_call_runs_compiled_code_on_two_ranks(parallelism, ac, runs_per_block_call):
    spawn_ranks(_compiled_worker, 2, parallelism, ac, runs_per_block_call)
