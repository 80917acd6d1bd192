"""Activation checkpointing of transformer blocks: full, every N-th block, or per op."""

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "layer", "op")

# Ops whose outputs are kept under `ac=op`: matmuls and attention are the expensive ones to recompute;
# everything else (norms, activations, rotary) is cheap and recomputed. Every op SDPA may run is listed: the
# CPU flash-attention op too, or the policy would recompute attention on CPU, and the efficient-attention
# forward that torch's lower-right causal bias (context parallelism) calls directly on CUDA.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_mm.default,  # Float8 matmuls (torchao): saved whole, as torchtitan does
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._efficient_attention_forward.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,  # document masking on CUDA (attention.py), as torchtitan saves it
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    # context parallelism's K/V all-gather: communication is dearer to redo than the memory it keeps
    torch.ops._c10d_functional.all_gather_into_tensor.default,
}


def _op_policy():
    # Save every other matmul (as torchtitan does): keeps half the mm outputs, recomputes the rest.
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, op, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if op == torch.ops.aten.mm.default:
            counts[f"{mode}_mm"] += 1
            save = counts[f"{mode}_mm"] % 2 == 0
        else:
            save = op in _SAVED_OPS
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(layers: nn.ModuleDict, mode: str, layer_freq: int = 2) -> None:
    """Wrap the blocks of `layers` in place."""
    if mode == "none":
        return
    for i, (name, block) in enumerate(list(layers.items())):
        if mode == "full" or (mode == "layer" and i % layer_freq == 0):
            layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "op":
            layers[name] = checkpoint_wrapper(block, context_fn=_op_policy, preserve_rng_state=False)
        elif mode != "layer":
            raise ValueError(f"training.ac={mode!r} is not one of {AC_MODES}")
