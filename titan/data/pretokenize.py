"""Tokenize a data config's documents once, in worker processes, into a folder of token shards
(token_shards.py) that `data.source=tokens` reads with no tokenization."""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from titan.config.schema import DataConfig
from titan.data.checks import check_choices, checked_files
from titan.data.documents import stream_documents
from titan.data.formats import BadRecord
from titan.data.records import LocalFiles
from titan.data.token_shards import TokenShardWriter, tokenizer_fingerprint
from titan.data.tokenizer import Tokenizer, build_tokenizer

# Documents per task sent to a worker: large enough that pickling is a small share of the work.
BATCH_DOCUMENTS = 256

_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(path)


def _encode(texts: list[str | None]) -> list[list[int]]:
    """Each document as packing would encode it; None (a skipped bad record) and blank text as []."""
    return [
        _worker_tokenizer.encode(t, bos=True, eos=True) if t is not None and t.strip() else [] for t in texts
    ]


def _documents(data: DataConfig, files: list[Path], bad_records: list[BadRecord]) -> Iterator[str | None]:
    """Every document of the source in reading order (one stream over all of it); a bad record is None
    with data.on_bad_record=skip, and stops here otherwise."""
    records = None if data.source == "huggingface" else LocalFiles(data, files)
    for text in stream_documents(data, records, 0, 1).iterate(None):
        if isinstance(text, BadRecord):
            if data.on_bad_record != "skip":
                raise text
            bad_records.append(text)
            text = None
        yield text


def pretokenize(
    data: DataConfig,
    out: str | Path,
    *,
    workers: int = 1,
    shard_tokens: int | None = None,
    progress: bool = True,
) -> Path:
    """Write `data`'s documents as token shards into `out` (see token_shards.py); returns `out`."""
    if data.source == "tokens":
        raise ValueError("data.source=tokens is already pretokenized: give the text source it was made from")
    check_choices(data)
    tokenizer = build_tokenizer(data.tokenizer)
    files = checked_files(data)  # once: the pre-flight check of every file
    made_with = {
        "path": str(Path(data.tokenizer).resolve()),
        "sha256": tokenizer_fingerprint(data.tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    source = {k: v for k, v in asdict(data).items() if k not in ("tokenizer", "num_workers")}
    writer = TokenShardWriter(
        out,
        vocab_size=tokenizer.vocab_size,
        index_fields={"tokenizer": made_with, "source": source},
        **({"shard_tokens": shard_tokens} if shard_tokens else {}),
    )
    bad_records: list[BadRecord] = []
    documents = _documents(data, files, bad_records)
    batches = iter(lambda: list(itertools.islice(documents, BATCH_DOCUMENTS)), [])
    bar = tqdm(desc=f"pretokenize {data.path}", unit=" tok", unit_scale=True, disable=not progress)
    pool = None
    if workers > 1:
        # fork: the workers inherit the imported modules; each loads the tokenizer once.
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (data.tokenizer,))
        encoded = pool.imap(_encode, batches)  # in order: the shards keep the source's order
    else:
        _init_worker(data.tokenizer)
        encoded = map(_encode, batches)
    try:
        for batch in encoded:
            for tokens in batch:
                writer.add(tokens)
                bar.update(len(tokens))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return writer.close(bad_records=len(bad_records))
