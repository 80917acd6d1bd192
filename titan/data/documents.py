"""Document sources and packing.

The data is read as `num_streams` logical streams (one per sequence of a global batch). Stream j's
documents are whole files j, j+B, j+2B, ... when there are at least B files, and otherwise records
j, j+B, j+2B, ... of all files read as one sequence (B = num_streams). Each stream packs its own
documents, BOS + tokens + EOS, back to back into windows of seq_len + 1 tokens, and repeats its
documents (epochs) when they run out. A stream's state is a few plain values: the epoch, where its
next document is, the tokens read but not yet emitted, and how many empty documents it skipped.

Local sources (jsonl, parquet, text) are read by record number, so a stream reads only its own
records and resumes by seeking; `huggingface` streams from the Hub with `datasets` and resumes from
the `datasets` iterator's own (JSON-able) state.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from titan.config.schema import DataConfig
from titan.data.tokenizer import Tokenizer

SOURCES = ("huggingface", "jsonl", "parquet", "text")
# What a directory given as data.path contributes (a glob or a single file is taken as it is).
EXTENSIONS = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "text": (".txt",)}


def resolve_files(data: DataConfig) -> list[Path]:
    """The local files of data.path (a file, a directory searched recursively, or a glob), sorted."""
    if data.path in ("", "???"):
        raise ValueError(f"data.path is not set: give a {data.source} file, directory or glob")
    path = Path(data.path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(EXTENSIONS[data.source]))
        if not files:
            raise ValueError(f"data.path={data.path} holds no {'/'.join(EXTENSIONS[data.source])} file")
        return files
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"data.path={data.path} matches no file")
        return files
    raise ValueError(f"data.path={data.path}: no such file or directory")


def decode_line(raw: bytes, file: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{file}, line {line + 1}: invalid UTF-8 at byte {e.start} of the line; "
            "the files of data.path must be UTF-8 text"
        ) from None


def json_text(line: str, file: Path, number: int, text_field: str) -> str:
    """The text of one jsonl record; a blank line is an empty document."""
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{file}, line {number + 1}: not JSON ({e.msg}); data.source=jsonl needs one JSON object per line"
        ) from None
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{file}, line {number + 1}: no field {text_field!r} (the record has {fields}); set data.text_field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{file}, line {number + 1}: field {text_field!r} holds {type(text).__name__}, not text; "
            "set data.text_field"
        )
    return text


def line_offsets(file: Path) -> np.ndarray:
    """Byte offsets of the line starts of `file`, then its size: line i is [offsets[i], offsets[i+1])."""
    starts = [np.zeros(1, dtype=np.int64)]
    size = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n"))
            starts.append(newlines.astype(np.int64) + size + 1)
            size += len(chunk)
    offsets = np.concatenate(starts)
    return offsets if offsets[-1] == size else np.append(offsets, size)  # a last line without "\n"


class LocalFiles:
    """Random access to the records of local files: lines of jsonl and text files, rows of parquet.

    One per process, shared by the streams of that process. A file's line offsets are indexed when
    it is first read (one fast pass); parquet is decoded one row group at a time. Line indexes, open
    files and decoded row groups are kept in small LRU caches of `cache_size` entries each (one per
    stream of the process, plus a little, keeps every stream's current file at hand); record counts
    are kept for good.
    """

    def __init__(self, data: DataConfig, files: list[Path], cache_size: int = 4):
        self.source, self.text_field, self.files = data.source, data.text_field, files
        self.cache_size = cache_size
        self._counts: dict[int, int] = {}
        self._row_group_starts: dict[int, list[int]] = {}
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()  # file index -> line offsets
        self._open: OrderedDict[int, Any] = OrderedDict()  # file index -> fd or ParquetFile
        self._row_groups: OrderedDict[tuple[int, int], list] = OrderedDict()

    def __getstate__(self) -> dict:  # a worker started by `spawn` opens and indexes its own files
        caches = ("_offsets", "_open", "_row_groups")
        return {**self.__dict__, **{name: OrderedDict() for name in caches}}

    def count(self, f: int) -> int:
        """How many records file `f` holds."""
        if f not in self._counts:
            if self.source == "parquet":
                metadata = self._handle(f).metadata
                starts = np.cumsum(
                    [0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
                )
                self._row_group_starts[f] = starts.tolist()
                self._counts[f] = metadata.num_rows
            else:
                self._lines(f)
        return self._counts[f]

    def _lines(self, f: int) -> np.ndarray:
        if f in self._offsets:
            self._offsets.move_to_end(f)
        else:
            self._offsets[f] = line_offsets(self.files[f])
            self._counts[f] = len(self._offsets[f]) - 1
            if len(self._offsets) > self.cache_size:
                self._offsets.popitem(last=False)
        return self._offsets[f]

    def text(self, f: int, record: int) -> str:
        """The text of one record ("" for an empty document); ValueError naming file and line if bad."""
        if self.source == "parquet":
            return self._parquet_text(f, record)
        start, end = self._lines(f)[record : record + 2].tolist()
        raw = os.pread(self._handle(f), end - start, start).rstrip(b"\r\n")
        line = decode_line(raw, self.files[f], record)
        if record == 0:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
        if self.source == "text":
            return line
        return json_text(line, self.files[f], record, self.text_field)

    def _parquet_text(self, f: int, record: int) -> str:
        self.count(f)
        group = bisect.bisect_right(self._row_group_starts[f], record) - 1
        key = (f, group)
        if key in self._row_groups:
            self._row_groups.move_to_end(key)
        else:
            self._row_groups[key] = parquet_column(self._handle(f), self.files[f], self.text_field, group)
            if len(self._row_groups) > self.cache_size:
                self._row_groups.popitem(last=False)
        text = self._row_groups[key][record - self._row_group_starts[f][group]]
        if not isinstance(text, str):
            raise ValueError(
                f"{self.files[f]}, row {record + 1}: column {self.text_field!r} is null; "
                "every record needs text in data.text_field"
            )
        return text

    def _handle(self, f: int) -> Any:
        if f in self._open:
            self._open.move_to_end(f)
            return self._open[f]
        if self.source == "parquet":
            handle = open_parquet(self.files[f])
        else:
            handle = os.open(self.files[f], os.O_RDONLY)
        self._open[f] = handle
        if len(self._open) > self.cache_size:
            _, old = self._open.popitem(last=False)
            if self.source == "parquet":
                old.close()
            else:
                os.close(old)
        return handle


def open_parquet(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise ValueError(f"{file}: not a parquet file ({e}); check data.path and data.source") from None


def parquet_column(handle, file: Path, text_field: str, group: int) -> list:
    """The text column of one row group as Python strings."""
    if text_field not in handle.schema_arrow.names:
        raise ValueError(
            f"{file}: no column {text_field!r} (columns: {handle.schema_arrow.names}); set data.text_field"
        )
    column = handle.read_row_group(group, columns=[text_field]).column(0)
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"{file}: column {text_field!r} holds {column.type}, not text; set data.text_field")
    return column.to_pylist()


class Documents(ABC):
    """One stream's documents for one epoch, resumable at a position (a plain, JSON-able value)."""

    @abstractmethod
    def iterate(self, position: Any) -> Iterator[str]:
        """The documents from `position` (None: the epoch's start) to the end of the epoch."""

    @abstractmethod
    def position(self) -> Any:
        """Where the latest `iterate` stands: just after the document it yielded last."""

    @abstractmethod
    def describe(self) -> str:
        """What feeds this stream, for error messages."""


class LocalDocuments(Documents):
    """Stream `stream` of `num_streams` over local files; the position is a count of documents."""

    def __init__(self, files: LocalFiles, stream: int, num_streams: int):
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

    def iterate(self, position: Any) -> Iterator[str]:
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

    def iterate(self, position: Any) -> Iterator[str]:
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
                raise ValueError(
                    f"data.path={self.data.path}: field {field_name!r} holds {type(text).__name__}, "
                    "not text; set data.text_field"
                )
            yield text

    def position(self) -> Any:
        return self._dataset.state_dict()

    def describe(self) -> str:
        return f"sequence slot {self.stream} (data.path={self.data.path}, split {self.data.split})"


@dataclass
class StreamState:
    """Everything a stream needs to go on exactly where it stopped; JSON-able."""

    num_streams: int  # the streams' count fixes which documents each stream reads
    epoch: int = 0
    position: Any = None  # of the next document in this epoch; None: the epoch's start
    tokens: list[int] = field(default_factory=list)  # read but not yet emitted
    skipped: int = 0  # empty or whitespace-only documents passed over, all epochs

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that copies the token list element by element, every step.
        return {
            "num_streams": self.num_streams,
            "epoch": self.epoch,
            "position": self.position,
            "tokens": self.tokens,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamState:
        return cls(**state)


class PackedStream:
    """One stream's documents as back-to-back BOS ... EOS tokens, cut into `window`-token windows."""

    def __init__(self, documents: Documents, tokenizer: Tokenizer, window: int, state: StreamState):
        self.documents, self.tokenizer, self.window = documents, tokenizer, window
        self.num_streams, self.epoch, self.skipped = state.num_streams, state.epoch, state.skipped
        self._tokens, self._start = list(state.tokens), 0  # pending tokens are _tokens[_start:]
        self._start_epoch(state.position)

    def _start_epoch(self, position: Any) -> None:
        self._docs = self.documents.iterate(position)
        # Until a document is read, the position is the one started from (a generator that has not
        # run yet has not moved the source).
        self._started_at, self._moved = position, False
        self._epoch_has_text = False

    def next_window(self) -> list[int]:
        while len(self._tokens) - self._start < self.window:
            self._read_document()
        window = self._tokens[self._start : self._start + self.window]
        self._start += self.window
        return window

    def _read_document(self) -> None:
        text = next(self._docs, None)
        if text is None:  # end of the epoch: go round again
            if self._started_at is None and not self._epoch_has_text:
                raise ValueError(
                    f"{self.documents.describe()} got no non-empty document: with "
                    f"training.global_batch_size={self.num_streams}, every sequence slot needs its own "
                    "documents; add data to data.path or lower training.global_batch_size"
                )
            self.epoch += 1
            self._start_epoch(None)
            return
        self._moved = True
        if not text.strip():
            self.skipped += 1
            return
        self._epoch_has_text = True
        self._tokens = self._tokens[self._start :] + self.tokenizer.encode(text, bos=True, eos=True)
        self._start = 0

    def state(self) -> StreamState:
        return StreamState(
            num_streams=self.num_streams,
            epoch=self.epoch,
            position=self.documents.position() if self._moved else self._started_at,
            tokens=self._tokens[self._start :],
            skipped=self.skipped,
        )
