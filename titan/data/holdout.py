"""Held-out documents: every N-th record of each file goes to validation, the rest to training.

`data.holdout_every=N` holds out records N-1, 2N-1, 3N-1, ... of every file (local files or token
shards). Training reads the other records and validation only these, so the two never share a
document; which records are held out depends on the files alone, not on the dp degree, the number
of workers or the number of sequence slots. The split is a view of the files: record i of the view
is one record of the file, found by arithmetic, so nothing is scanned or copied.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np

from titan.config.schema import DataConfig
from titan.data.checks import checked_files
from titan.data.formats import BadRecord
from titan.data.records import LocalFiles
from titan.data.token_shards import TokenShards

Part = Literal["train", "heldout"]


class HeldOutSplit:
    """One part of `files` (`train` or `heldout`) with the same `files`, `count` and `text` interface."""

    def __init__(self, files: LocalFiles | TokenShards, every: int, part: Part):
        if every < 2:
            raise ValueError(
                f"data.holdout_every={every} would hold out every document; use 0 (none) or >= 2"
            )
        self.inner, self.every, self.part = files, every, part
        self.files = files.files

    def __getstate__(self) -> dict:  # a worker gets its own copy of the files (their handles are not shared)
        return {**self.__dict__, "inner": copy.copy(self.inner)}

    def count(self, f: int) -> int:
        held_out = self.inner.count(f) // self.every
        return held_out if self.part == "heldout" else self.inner.count(f) - held_out

    def record(self, i: int) -> int:
        """The file's record number of this part's record i."""
        if self.part == "heldout":
            return i * self.every + self.every - 1
        return i + i // (self.every - 1)  # each run of every-1 training records skips one

    def text(self, f: int, i: int) -> str | np.ndarray | BadRecord:
        return self.inner.text(f, self.record(i))


def overlap_problem(train: DataConfig, valid: DataConfig) -> str | None:
    """Why validation data `valid` would share documents with the training data `train`, or None.

    Files read by both are fine only when both hold out the same documents (the same
    holdout_every): validation then reads the part of them that training never does."""
    shared = {f.resolve() for f in checked_files(train)} & {f.resolve() for f in checked_files(valid)}
    if not shared or (valid.holdout_every and valid.holdout_every == train.holdout_every):
        return None
    return (
        f"validation.data reads {len(shared)} file(s) that training reads too (e.g. {min(shared)}), so "
        f"validation would score documents the model trained on: give held-out files, or hold documents "
        f"out of both (data.holdout_every=N and validation.data.holdout_every=N; now {train.holdout_every} "
        f"and {valid.holdout_every})"
    )
