"""Context parallelism for a Llama Transformer: its attention and rotary table wired to titan/distributed/cp.py.

Call order: build -> parallelize (AC, compile, FSDP) -> materialize -> init_weights -> apply_cp -> train.
apply_cp reads nothing from the weights, so it may also come before init_weights, but the rotary part is
undone by a later `init_rope`/`init_weights` (they rebuild the full table): call apply_cp again after
those; it is idempotent. The inputs and labels of every batch are sharded with
`titan.distributed.cp.shard_sequence`.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan.distributed.cp import ContextParallelSDPA, cp_positions
from titan.models.llama.attention import sdpa
from titan.models.llama.model import Attention, Transformer, rope_cache


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> None:
    """Make `model` attend across the cp group, and take its rotary angles at this rank's global positions.

    Finds the Transformer and its Attention modules wherever they sit (inside activation-checkpoint or
    torch.compile wrappers). Replaces each `attention.kernel` and the `rope_cache` buffer; the model's
    `rope_cache[:local_len]` then is exactly this rank's rows. Idempotent: both are rebuilt from scratch.
    """
    transformers = [m for m in model.modules() if isinstance(m, Transformer)]
    if len(transformers) != 1:
        raise ValueError(f"apply_cp expects one Transformer inside the model, found {len(transformers)}")
    transformer = transformers[0]
    device = transformer.rope_cache.device
    if device.type == "meta":
        raise RuntimeError("apply_cp needs a materialized model: call it after to_empty and init_weights")
    if seq_len > transformer.args.max_seq_len:
        raise ValueError(
            f"training.seq_len={seq_len} is longer than the rotary table ({transformer.args.max_seq_len}); "
            "raise model.max_seq_len"
        )
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    positions = cp_positions(seq_len, cp, rank)
    # Rebuilt from the model's args rather than indexed out of the current buffer, so a second call (or a
    # call before init_rope) gives the same table: row i holds the angles of global position positions[i].
    transformer.rope_cache = rope_cache(transformer.args)[positions].to(device, transformer.rope_cache.dtype)
    # One kernel for every layer: it holds only the shapes of its causal biases.
    kernel = ContextParallelSDPA(cp_mesh.get_group(), seq_len, sdpa)
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel
