"""The records of local files by number: lines of jsonl and text files, rows of parquet.

Read by record number, a stream reads only its own records and resumes by seeking.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from titan.config.schema import DataConfig
from titan.data.formats import BadRecord, decode_line, json_text, open_parquet, parquet_column, parquet_text


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
        self._row_groups: OrderedDict[tuple[int, int], list | str] = OrderedDict()

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

    def text(self, f: int, record: int) -> str | BadRecord:
        """The text of one record ("" for an empty document), or why it holds none."""
        if self.source == "parquet":
            return self._parquet_text(f, record)
        start, end = self._lines(f)[record : record + 2].tolist()
        raw = os.pread(self._handle(f), end - start, start).rstrip(b"\r\n")
        line = decode_line(raw, self.files[f], record)
        if isinstance(line, BadRecord):
            return line
        if record == 0:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
        if self.source == "text":
            return line
        return json_text(line, self.files[f], record, self.text_field)

    def _parquet_text(self, f: int, record: int) -> str | BadRecord:
        self.count(f)
        group = bisect.bisect_right(self._row_group_starts[f], record) - 1
        key = (f, group)
        if key in self._row_groups:
            self._row_groups.move_to_end(key)
        else:
            self._row_groups[key] = parquet_column(self._handle(f), self.files[f], self.text_field, group)
            if len(self._row_groups) > self.cache_size:
                self._row_groups.popitem(last=False)
        index = record - self._row_group_starts[f][group]
        return parquet_text(self._row_groups[key], index, self.files[f], record, self.text_field)

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
