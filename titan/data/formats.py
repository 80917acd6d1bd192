"""One record of a jsonl, text or parquet file as text.

A bad record is a ValueError that names the file, the line (or row) and the key to fix.
"""

from __future__ import annotations

import json
from pathlib import Path


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
