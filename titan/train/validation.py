"""The held-out batches of the `validation` block: the same ones at every evaluation.

They are read by the training loader's machinery (titan/data/loader.py) from a loader of their own,
put back at its start before each evaluation: so the M global batches are the same at every
evaluation and at every dp degree, and the training loader, its state and the RNG are never touched.
"""

from collections.abc import Iterator

import torch

from titan.config.schema import DataConfig, RunConfig
from titan.data.loader import TrainLoader


def validation_data(cfg: RunConfig) -> DataConfig:
    """validation.data, or the training data (whose held-out part validation reads)."""
    return cfg.validation.data if cfg.validation.data is not None else cfg.data


def validation_batch_size(cfg: RunConfig) -> int:
    return cfg.validation.global_batch_size or cfg.training.global_batch_size


class HeldOutBatches:
    """validation.steps batches of (inputs, labels), this dp rank's rows of each global batch."""

    def __init__(self, cfg: RunConfig, *, dp_rank: int, dp_degree: int):
        data = validation_data(cfg)
        if cfg.validation.data is None and not data.holdout_every:
            raise ValueError(
                "validation.enable=true needs held-out data: set data.holdout_every=N (every N-th document "
                "of the training data is held out of training) or give validation.data"
            )
        self.steps = cfg.validation.steps
        self.loader = TrainLoader(
            data,
            seq_len=cfg.training.seq_len,
            global_batch_size=validation_batch_size(cfg),
            dp_rank=dp_rank,
            dp_degree=dp_degree,
            # A data config that holds documents out is read for those only; one that does not (a
            # validation file, a hub split) whole.
            part="heldout" if data.holdout_every else "train",
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
