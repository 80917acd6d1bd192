"""Pre-flight checks of the data config: what can be known before any rank reads a batch.

Each raises or returns a message that names the key (and the file and line) and the fix. The
launcher runs them before starting ranks; the loader runs them again on the values it is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from titan.config.schema import DataConfig
from titan.data.documents import SOURCES
from titan.data.files import resolve_files
from titan.data.formats import (
    BAD_RECORD_POLICIES,
    BadRecord,
    decode_line,
    json_text,
    open_parquet,
    parquet_column,
    parquet_text,
)
from titan.data.mixture import check_mixture, source_data
from titan.data.token_shards import TokenShards
from titan.data.tokenizer import (
    LLAMA3_BASE_TOKENS,
    LLAMA3_FIRST_TOKEN,
    LLAMA3_VOCAB_SIZE,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
)

# With data.on_bad_record=skip, a file passes the pre-flight when one of its first this-many records
# has text (they are read line by line, so this costs next to nothing).
PREFLIGHT_RECORDS = 16


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


def check_choices(data: DataConfig) -> None:
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r} is not one of {', '.join(SOURCES)}")
    if data.source == "mixture":
        check_mixture(data)
        for source in data.sources:
            try:
                check_choices(source_data(data, source))
            except ValueError as e:
                raise ValueError(f"data.sources {source.name!r}: {e}") from None
    if data.on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(
            f"data.on_bad_record={data.on_bad_record!r} is not one of {', '.join(BAD_RECORD_POLICIES)}"
        )


def check_data(data: DataConfig) -> Tokenizer:
    """Cheap pre-flight: the tokenizer loads (returned), local files exist, and each one starts with
    a record that has text.

    Raises ValueError naming the file (and line) and the key to fix. The huggingface source is not
    contacted (no network here); its records are checked as they stream. A bad record further into a
    file is found when a stream reaches it (packing.py): reading a whole corpus here would take hours.
    """
    check_choices(data)
    tokenizer = build_tokenizer(data.tokenizer)
    checked_files(data)
    return tokenizer


def vocab_warning(tokenizer: Tokenizer, path: str, model_vocab_size: int) -> str | None:
    """Whether the tokenizer of data.tokenizer=`path` fits a model of `model_vocab_size` embedding rows.

    Raises ValueError when it cannot: ids past the embedding table, or a cut copy of Meta's Llama 3
    file. Returns a warning when rows would never train (a smaller tokenizer), else None.

    A tiktoken file that lost lines from its end is still a valid, smaller BPE file; only a known count
    tells. Meta's is known: 128000 ranks, for models of 128256 rows, in the byte order of OpenAI's files
    (the bundled debug tokenizer, a smoke test for any model size, has another order).
    """
    vocab = tokenizer.vocab_size
    if vocab > model_vocab_size:
        raise ValueError(
            f"data.tokenizer={path} has {vocab} tokens but model.vocab_size={model_vocab_size}; use a "
            f"model with vocab_size >= {vocab} or another tokenizer"
        )
    if (
        isinstance(tokenizer, TiktokenTokenizer)
        and model_vocab_size == LLAMA3_VOCAB_SIZE
        and tokenizer.first_token == LLAMA3_FIRST_TOKEN
        and tokenizer.num_base_tokens != LLAMA3_BASE_TOKENS
    ):
        raise ValueError(
            f"data.tokenizer={path} has {tokenizer.num_base_tokens} ranks, Meta's Llama 3 tokenizer.model "
            f"{LLAMA3_BASE_TOKENS} (model.vocab_size={model_vocab_size} is Llama 3's): the file is cut short; "
            f"copy it again (for another tokenizer on purpose, set model.vocab_size={vocab})"
        )
    if vocab < model_vocab_size:
        return (
            f"data.tokenizer={path} has {vocab} tokens but model.vocab_size={model_vocab_size}: ids "
            f"{vocab}..{model_vocab_size - 1} never occur in the data, their embedding rows never train as "
            f"inputs (set model.vocab_size={vocab} unless the padding is meant)"
        )
    return None


def checked_files(data: DataConfig) -> list[Path]:
    """The local files of data.path, each checked by its first records; [] for the huggingface source.
    A mixture's sources are each checked so; it returns them all."""
    if data.source == "mixture":
        files = []
        for source in data.sources:
            try:
                files += checked_files(source_data(data, source))
            except ValueError as e:
                raise ValueError(f"data.sources {source.name!r}: {e}") from None
        return files
    if data.source == "huggingface":
        if data.path in ("", "???"):
            raise ValueError("data.path is not set: give a Hugging Face dataset name (e.g. allenai/c4)")
        return []
    if data.source == "tokens":  # the index and every shard's size, against data.tokenizer
        return TokenShards(data).files
    files = resolve_files(data)
    for file in files:
        _check_first_records(data, file)
    return files


def _check_first_records(data: DataConfig, file: Path) -> None:
    """The file is a plain, non-empty file whose first record (first non-blank line, first row) has text.

    With data.on_bad_record=skip a bad first record is passed over like any other, but not when the
    first PREFLIGHT_RECORDS all are bad: that is a wrong data.text_field or data.source, not bad data.
    """
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty; remove it from data.path")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b" or magic == b"\x28\xb5\x2f\xfd":
        raise ValueError(
            f"{file} is compressed (gzip or zstd); data.path must hold plain files: decompress it"
        )
    wanted = PREFLIGHT_RECORDS if data.on_bad_record == "skip" else 1
    bad = []
    for record in itertools.islice(_first_records(data, file), wanted):
        if not isinstance(record, BadRecord):
            return
        if data.on_bad_record != "skip":
            raise record
        bad.append(record)
    if bad:
        raise ValueError(
            f"{file}: none of its first {len(bad)} records has text ({bad[0].where}: {bad[0].problem}); "
            "data.on_bad_record=skip passes over bad records, not a file that starts with no good one: "
            "check data.text_field and data.source"
        )
    raise ValueError(f"{file} holds only blank lines; remove it from data.path")


def _first_records(data: DataConfig, file: Path) -> Iterator[str | BadRecord]:
    """The file's records from the first on, blank lines left out."""
    if data.source == "parquet":
        handle = open_parquet(file)
        if handle.metadata.num_rows == 0:
            raise ValueError(f"{file} has no rows; remove it from data.path")
        row = 0
        for group in range(handle.metadata.num_row_groups):
            rows = handle.metadata.row_group(group).num_rows
            if rows:
                column = parquet_column(handle, file, data.text_field, group)
                for index in range(rows):
                    yield parquet_text(column, index, file, row + index, data.text_field)
            row += rows
        return
    with open(file, "rb") as f:
        for number, raw in enumerate(f):
            line = decode_line(raw.rstrip(b"\r\n"), file, number)
            if isinstance(line, BadRecord):
                yield line
                continue
            if number == 0:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
            if line.strip():
                yield json_text(line, file, number, data.text_field) if data.source == "jsonl" else line
