"""One stream's documents: which documents feed sequence slot j of every global batch.

The data is read as `num_streams` logical streams (one per sequence of a global batch). Stream j's
documents are whole files j, j+B, j+2B, ... when there are at least B files, and otherwise records
j, j+B, j+2B, ... of all files read as one sequence (B = num_streams).

Local sources (jsonl, parquet, text) resume by seeking to a count of documents; `huggingface`
streams from the Hub with `datasets` and resumes from the `datasets` iterator's own (JSON-able) state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from titan.config.schema import DataConfig
from titan.data.formats import BadRecord
from titan.data.records import LocalFiles
from titan.data.token_shards import TokenShards

# The values of data.source: the Hub (streamed by `datasets`), local files of one format, a folder of
# pre-tokenized shards (token_shards.py), or a weighted mixture of these (mixture.py).
SOURCES = ("huggingface", "jsonl", "parquet", "text", "tokens", "mixture")


class Documents(ABC):
    """One stream's documents for one epoch, resumable at a position (a plain, JSON-able value)."""

    @abstractmethod
    def iterate(self, position: Any) -> Iterator[str | np.ndarray | BadRecord]:
        """The documents from `position` (None: the epoch's start) to the end of the epoch: text, or the
        token ids of a pre-tokenized one; a record that holds no document comes as the BadRecord saying
        why, in its place."""

    @abstractmethod
    def position(self) -> Any:
        """Where the latest `iterate` stands: just after the document it yielded last."""

    @abstractmethod
    def describe(self) -> str:
        """What feeds this stream, for error messages."""


class LocalDocuments(Documents):
    """Stream `stream` of `num_streams` over local files (or token shards); the position is a count of
    documents."""

    def __init__(self, files: LocalFiles | TokenShards, stream: int, num_streams: int):
        self.files, self.stream, self.num_streams = files, stream, num_streams
        self._position = 0

    def _segments(self) -> Iterator[tuple[int, int, int]]:
        """(file, first record, step) in reading order."""
        n_files = len(self.files.files)
        if n_files >= self.num_streams:
            for f in range(self.stream, n_files, self.num_streams):
                yield f, 0, 1
            return
        before = 0  # records in the files before f
        for f in range(n_files):
            yield f, (self.stream - before) % self.num_streams, self.num_streams
            before += self.files.count(f)

    def iterate(self, position: Any) -> Iterator[str | np.ndarray | BadRecord]:
        self._position = skip = position or 0
        for f, first, step in self._segments():
            records = range(first, self.files.count(f), step)
            if skip >= len(records):
                skip -= len(records)
                continue
            for record in records[skip:]:
                self._position += 1
                yield self.files.text(f, record)
            skip = 0

    def position(self) -> Any:
        return self._position

    def describe(self) -> str:
        j, n = self.stream, self.num_streams
        if len(self.files.files) >= n:
            names = [str(file) for file in self.files.files[j::n]]
            return f"sequence slot {j} (files {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        return f"sequence slot {j} (records {j + 1}, {j + 1 + n}, {j + 1 + 2 * n}, ... of data.path)"


@lru_cache(maxsize=4)
def hub_dataset(path: str, name: str | None, split: str):
    """The streaming dataset, opened once per process (it resolves the file list on the Hub)."""
    import datasets

    return datasets.load_dataset(path, name, split=split, streaming=True)


class HubDocuments(Documents):
    """Stream `stream` of `num_streams` over a `datasets` streaming dataset (data.source=huggingface).

    Whole shards (files) per stream when there are at least as many shards as streams, else every
    num_streams-th example (what `split_dataset_by_node` does). The position is the `datasets`
    iterator's own state dict.
    """

    def __init__(self, data: DataConfig, stream: int, num_streams: int):
        self.data, self.stream, self.num_streams = data, stream, num_streams
        self._dataset = None

    def _stream_dataset(self):
        from datasets.distributed import split_dataset_by_node

        base = hub_dataset(self.data.path, self.data.name, self.data.split)
        if base.num_shards >= self.num_streams:
            return base.shard(num_shards=self.num_streams, index=self.stream, contiguous=False)
        return split_dataset_by_node(base, rank=self.stream, world_size=self.num_streams)

    def iterate(self, position: Any) -> Iterator[str | BadRecord]:
        self._dataset = dataset = self._stream_dataset()
        if position is not None:
            dataset.load_state_dict(position)
        field_name = self.data.text_field
        # `.iter(batch_size=1)`, not `iter(dataset)`: inside a DataLoader worker, `datasets` would
        # otherwise split the shards once more between the workers.
        for batch in dataset.iter(batch_size=1):
            if field_name not in batch:
                raise ValueError(
                    f"data.path={self.data.path}: records have no field {field_name!r} "
                    f"(they have {sorted(batch)}); set data.text_field"
                )
            text = batch[field_name][0]
            if not isinstance(text, str):
                text = BadRecord(
                    f"data.path={self.data.path}",
                    f"split {self.data.split}, an example of sequence slot {self.stream}",
                    f"field {field_name!r} holds {type(text).__name__}, not text",
                    "set data.text_field",
                )
            yield text

    def position(self) -> Any:
        return self._dataset.state_dict()

    def describe(self) -> str:
        return f"sequence slot {self.stream} (data.path={self.data.path}, split {self.data.split})"


def stream_documents(
    data: DataConfig, files: LocalFiles | TokenShards | None, stream: int, num_streams: int
) -> Documents:
    """Stream `stream`'s documents: from the local `files`, or from the Hub when there are none."""
    if files is None:
        return HubDocuments(data, stream, num_streams)
    return LocalDocuments(files, stream, num_streams)
