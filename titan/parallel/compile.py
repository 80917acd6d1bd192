"""torch.compile per transformer block: blocks share one graph, so compile time does not grow with depth."""

import torch
from torch import nn


def compile_blocks(layers: nn.ModuleDict, backend: str) -> None:
    for name, block in list(layers.items()):
        layers[name] = torch.compile(block, backend=backend, fullgraph=True)
