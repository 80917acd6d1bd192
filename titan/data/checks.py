"""Pre-flight checks of the data config: what can be known before any rank reads a batch.

Each raises or returns a message that names the key (and the file and line) and the fix. The
launcher runs them before starting ranks; the loader runs them again on the values it is given.
"""

from __future__ import annotations

from pathlib import Path

from titan.config.schema import DataConfig
from titan.data.documents import SOURCES
from titan.data.files import resolve_files
from titan.data.formats import decode_line, json_text, open_parquet, parquet_column
from titan.data.tokenizer import build_tokenizer


def num_workers_problem(num_workers: int, global_batch_size: int, dp_degree: int) -> str | None:
    """Why data.num_workers cannot share a rank's sequences out evenly, or None.

    Each worker of a rank owns an equal, contiguous block of that rank's sequence slots.
    """
    per_rank = global_batch_size // dp_degree
    if num_workers > 0 and per_rank % num_workers:
        return (
            f"data.num_workers={num_workers} does not divide the {per_rank} sequences each rank loads per "
            f"step (training.global_batch_size={global_batch_size} over {dp_degree} data-parallel ranks); "
            f"use a divisor of {per_rank}"
        )
    return None


def check_source(data: DataConfig) -> None:
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r} is not one of {', '.join(SOURCES)}")


def check_data(data: DataConfig) -> None:
    """Cheap pre-flight: the tokenizer loads, local files exist, and each one's first record has text.

    Raises ValueError naming the file (and line) and the key to fix. The huggingface source is not
    contacted (no network here); its records are checked as they stream.
    """
    check_source(data)
    build_tokenizer(data.tokenizer)
    checked_files(data)


def checked_files(data: DataConfig) -> list[Path]:
    """The local files of data.path, each checked by its first record; [] for the huggingface source."""
    if data.source == "huggingface":
        if data.path in ("", "???"):
            raise ValueError("data.path is not set: give a Hugging Face dataset name (e.g. allenai/c4)")
        return []
    files = resolve_files(data)
    for file in files:
        _check_first_record(data, file)
    return files


def _check_first_record(data: DataConfig, file: Path) -> None:
    """The file is non-empty and its first record (first non-blank line, first row) has text."""
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty; remove it from data.path")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b" or magic == b"\x28\xb5\x2f\xfd":
        raise ValueError(
            f"{file} is compressed (gzip or zstd); data.path must hold plain files: decompress it"
        )
    if data.source == "parquet":
        handle = open_parquet(file)
        if handle.metadata.num_rows == 0:
            raise ValueError(f"{file} has no rows; remove it from data.path")
        first = next(
            g for g in range(handle.metadata.num_row_groups) if handle.metadata.row_group(g).num_rows
        )
        if not isinstance(parquet_column(handle, file, data.text_field, first)[0], str):
            raise ValueError(f"{file}, row 1: column {data.text_field!r} is null; set data.text_field")
        return
    with open(file, "rb") as f:
        for number, raw in enumerate(f):
            line = decode_line(raw.rstrip(b"\r\n"), file, number).removeprefix("\ufeff")
            if line.strip():
                if data.source == "jsonl":
                    json_text(line, file, number, data.text_field)
                return
    raise ValueError(f"{file} holds only blank lines; remove it from data.path")
