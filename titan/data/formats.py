"""One record of a jsonl, text or parquet file as text, or the BadRecord that says why it is not.

A bad record is one line, jsonl line or parquet row that holds no document: invalid UTF-8, not JSON,
no text field, a text field that is not a string, a null or unreadable parquet row. What the run does
with one is data.on_bad_record's choice (packing.py); a problem of the whole file (no such column, not
a parquet file) is a plain ValueError, never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

# The values of data.on_bad_record: stop the run at the first bad record, or pass over it and count it.
BAD_RECORD_POLICIES = ("raise", "skip")
_SHOWN_FIELDS = 8  # of a record without the text field: enough to spot a renamed one, on one line


class BadRecord(ValueError):
    """A record that is not a document. str() is one line: file, line (or row), what is wrong, the fix.

    The parts are the exception's args, so it pickles (a loader worker sends it to its rank whole).
    """

    def __init__(self, file: str | Path, where: str, problem: str, fix: str):
        super().__init__(str(file), where, problem, fix)
        self.file, self.where, self.problem, self.fix = str(file), where, problem, fix

    def record(self) -> str:
        """Which record and what is wrong, without the fix."""
        return f"{self.file}, {self.where}: {self.problem}"

    def __str__(self) -> str:
        return f"{self.record()}; {self.fix}, or set data.on_bad_record=skip to skip and count such records"


def decode_line(raw: bytes, file: Path, line: int) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(
            file,
            f"line {line + 1}",
            f"invalid UTF-8 at byte {e.start} of the line",
            "the files of data.path must be UTF-8 text",
        )


def json_text(line: str, file: Path, number: int, text_field: str) -> str | BadRecord:
    """The text of one jsonl record; a blank line is an empty document."""
    if not line.strip():
        return ""
    where = f"line {number + 1}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(
            file, where, f"not JSON ({e.msg})", "data.source=jsonl needs one JSON object per line"
        )
    if not isinstance(record, dict) or text_field not in record:
        if isinstance(record, dict):
            names = sorted(record)
            has = f"{names[:_SHOWN_FIELDS]}{' and more' if len(names) > _SHOWN_FIELDS else ''}"
        else:
            has = f"a JSON {type(record).__name__}, not an object"
        return BadRecord(
            file, where, f"no field {text_field!r} (the record has {has})", "set data.text_field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        return BadRecord(
            file, where, f"field {text_field!r} holds {type(text).__name__}, not text", "set data.text_field"
        )
    return text


def open_parquet(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise ValueError(f"{file}: not a parquet file ({e}); check data.path and data.source") from None


def parquet_column(handle, file: Path, text_field: str, group: int) -> list | str:
    """The text column of one row group as Python values (None where null); for a row group that
    cannot be read, why not (each of its rows is then a bad record)."""
    if text_field not in handle.schema_arrow.names:
        raise ValueError(
            f"{file}: no column {text_field!r} (columns: {handle.schema_arrow.names}); set data.text_field"
        )
    import pyarrow as pa

    column_type = handle.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{file}: column {text_field!r} holds {column_type}, not text; set data.text_field")
    try:
        return handle.read_row_group(group, columns=[text_field]).column(0).to_pylist()
    except Exception as e:  # damaged pages: pyarrow's own error types (ArrowInvalid, OSError, ...)
        return " ".join(str(e).split())


def parquet_text(column: list | str, index: int, file: Path, row: int, text_field: str) -> str | BadRecord:
    """Row `row` of the file, at `index` in its row group's `column` (as parquet_column gives it)."""
    if isinstance(column, str):
        return BadRecord(
            file, f"row {row + 1}", f"its row group cannot be read ({column})", "replace the file"
        )
    text = column[index]
    if isinstance(text, str):
        return text
    return BadRecord(file, f"row {row + 1}", f"column {text_field!r} is null", "every row needs text")
