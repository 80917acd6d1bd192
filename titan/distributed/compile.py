"""torch.compile per transformer block: blocks share one graph, so compile time does not grow with depth.

`Module.compile` compiles in place, so parameter names (and checkpoints) stay the same.
"""

from torch import nn


def compile_blocks(layers: nn.ModuleDict, backend: str, *, parts: tuple[str, ...] = ()) -> None:
    """Compile each block of `layers` whole or, when `parts` names submodules of a block, each of those apart."""
    for block in layers.values():
        if parts:
            inner = getattr(block, "_checkpoint_wrapped_module", block)  # inside an activation checkpoint
            for name in parts:
                inner.get_submodule(name).compile(backend=backend, fullgraph=True)
        else:
            block.compile(backend=backend, fullgraph=True)
