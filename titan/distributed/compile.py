"""torch.compile per transformer block: blocks share one graph, so compile time does not grow with depth.

`Module.compile` compiles in place, so parameter names (and checkpoints) stay the same.
"""

from torch import nn


def compile_blocks(layers: nn.ModuleDict, backend: str, *, tensor_parallel: bool) -> None:
    for block in layers.values():
        if tensor_parallel:
            # A whole compiled block of DTensors fails in backward on torch 2.13 ('_local_tensor');
            # attention and feed-forward compiled apart work, and hold nearly all the compute.
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            inner.attention.compile(backend=backend, fullgraph=True)
            inner.feed_forward.compile(backend=backend, fullgraph=True)
        else:
            block.compile(backend=backend, fullgraph=True)
