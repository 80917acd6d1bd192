"""Activation checkpointing really recomputes (titan/distributed/ac.py, applied by parallelize_llama).

Equal losses with and without AC (tests/train/test_trainer.py) cannot tell AC from no AC at all; these
tests watch the blocks instead: a checkpointed block keeps nothing for backward but its inputs and runs
its forward again during backward; under op-level AC the recomputation skips exactly the ops whose
outputs the policy keeps.

A saved-tensor hook sees what autograd keeps: for a checkpointed block, only the inputs the checkpoint
saves before the block runs (inside the block the checkpoint's own hooks take over). Op-level AC keeps
its outputs in a cache of its own, out of any hook's sight: they show as the ops that a dispatch mode
sees in the forward and not again in the recomputation.
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import set_checkpoint_early_stop

from tests.utils import TINY_MODEL
from titan.config.schema import ParallelismConfig, TrainingConfig
from titan.distributed.mesh import ParallelDims
from titan.models.llama.model import Transformer
from titan.models.llama.parallelize import parallelize_llama

SINGLE = ParallelismConfig(dp_shard=1)
N_BLOCKS = TINY_MODEL.n_layers


class BlockWatch(TorchDispatchMode):
    """Which block runs, in which phase: forward calls, tensors saved for backward and aten ops, per block.

    Installed below the checkpoint's own modes, so an op whose output op-level AC kept is not seen
    again in the recomputation: the cache answers it.
    """

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.phase = "forward"
        self.block: int | None = None
        self.calls: Counter = Counter()  # (phase, block)
        self.saved: Counter = Counter()  # (phase, block): tensors autograd saved while the block ran
        self.ops: dict[tuple[str, int], list[str]] = {}  # (phase, block)
        self.weights = {p.data_ptr(): name for block in blocks for name, p in block.named_parameters()}
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            block.register_forward_hook(lambda _m, _a, _o: self._leave())

    def _enter(self, i: int) -> None:
        self.block = i
        self.calls[self.phase, i] += 1

    def _leave(self) -> None:
        self.block = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            self.saved[self.phase, self.block] += 1
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.block is not None and func is not torch.ops.aten.detach.default:  # AC adds detaches
            self.ops.setdefault((self.phase, self.block), []).append(self._name(func, args))
        return func(*args, **(kwargs or {}))

    def _name(self, func, args) -> str:
        # A matmul is named by the weight it reads (its second operand is a view of the weight).
        if func is torch.ops.aten.mm.default and args[1].data_ptr() in self.weights:
            return f"mm {self.weights[args[1].data_ptr()]}"
        return str(func)


def watched_step(training: TrainingConfig) -> BlockWatch:
    """One forward and backward of the tiny model, parallelized (one process) with `training`'s AC."""
    torch.manual_seed(0)
    model = Transformer(TINY_MODEL)
    model.init_weights()
    watch = BlockWatch(list(model.layers.values()))  # the blocks themselves, inside any wrapper
    parallelize_llama(model, ParallelDims.resolve(SINGLE, 1), {}, training, SINGLE)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, 32))
    # Early stop ends a recomputation once backward has what it needs, before the block's last ops.
    with (
        watch,
        torch.autograd.graph.saved_tensors_hooks(watch.pack, lambda t: t),
        set_checkpoint_early_stop(False),
    ):
        loss = model(tokens).float().logsumexp(-1).mean()
        watch.phase = "backward"
        loss.backward()
    return watch


@pytest.mark.parametrize(
    "training,checkpointed",
    [
        (TrainingConfig(ac="none"), set()),
        (TrainingConfig(ac="full"), {0, 1, 2, 3}),
        (TrainingConfig(ac="layer", ac_layer_freq=2), {0, 2}),
        (TrainingConfig(ac="layer", ac_layer_freq=3), {0, 3}),
        (TrainingConfig(ac="op"), {0, 1, 2, 3}),
    ],
    ids=["none", "full", "layer-every-2nd", "layer-every-3rd", "op"],
)
def test_checkpointed_blocks_keep_only_inputs_and_rerun_in_backward(training, checkpointed):
    watch = watched_step(training)
    for i in range(N_BLOCKS):
        assert watch.calls["forward", i] == 1
        # a checkpointed block runs its forward once more, for backward; the others do not
        assert watch.calls["backward", i] == (1 if i in checkpointed else 0), f"block {i}"
        # its inputs are saved by the checkpoint before the block runs; inside it autograd saves nothing
        if i in checkpointed:
            assert watch.saved["forward", i] == 0, f"block {i}"
        else:
            assert watch.saved["forward", i] > 10, f"block {i}"


def test_op_ac_keeps_exactly_the_policy_outputs():
    """The policy (ac.py): keep the outputs of attention and of every second matmul of a block
    (of wq, wk, wv, wo, w1, w3, w2 in call order: wk, wo, w3); recompute everything else."""
    watch = watched_step(TrainingConfig(ac="op"))
    kept = {
        "aten._scaled_dot_product_flash_attention_for_cpu.default": 1,
        "mm attention.wk.weight": 1,
        "mm attention.wo.weight": 1,
        "mm feed_forward.w3.weight": 1,
    }
    for i in range(N_BLOCKS):
        forward, recomputed = Counter(watch.ops["forward", i]), Counter(watch.ops.get(("backward", i)))
        assert forward["aten.mm.default"] == 0  # every matmul was named by its weight
        assert sum(v for k, v in forward.items() if k.startswith("mm ")) == 7
        assert recomputed <= forward  # a recomputation, nothing else
        assert dict(forward - recomputed) == kept, f"block {i}"
