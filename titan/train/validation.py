"""The held-out batches of the `validation` block: the same ones at every evaluation.

They are read by the training loader's machinery (titan/data/loader.py) from a loader of their own,
put back at its start before each evaluation: so the M global batches are the same at every
evaluation and at every dp degree, and the training loader, its state and the RNG are never touched.
"""

from collections.abc import Iterator

import torch

from titan.config.schema import RunConfig
from titan.data.loader import TrainLoader


def validation_batch_size(cfg: RunConfig) -> int:
    return cfg.validation.global_batch_size or cfg.training.global_batch_size


class HeldOutBatches:
    """validation.steps batches of (inputs, labels), this dp rank's rows of each global batch."""

    def __init__(self, cfg: RunConfig, *, dp_rank: int, dp_degree: int):
        given = cfg.validation.data
        # The training data is read for the documents it holds out (the loader refuses it when it holds
        # none); validation.data whole, unless it holds documents out too (files shared with training).
        data = given if given is not None else cfg.data
        self.steps = cfg.validation.steps
        self.loader = TrainLoader(
            data,
            seq_len=cfg.training.seq_len,
            global_batch_size=validation_batch_size(cfg),
            dp_rank=dp_rank,
            dp_degree=dp_degree,
            part="heldout" if given is None or data.holdout_every else "train",
        )
        self.start = self.loader.state_dict()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.load_state_dict(self.start)
        batches = iter(self.loader)
        try:
            for _ in range(self.steps):
                yield next(batches)
        finally:
            self.loader.close()  # its workers, if any, do not idle through training
