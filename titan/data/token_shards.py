"""Pre-tokenized data: documents as token ids in memory-mapped shards, read with no tokenization.

A folder made by `python -m titan.tools.pretokenize` holds `shard-NNNNN.bin` (the token ids of its
documents back to back, each document exactly `tokenizer.encode(text, bos=True, eos=True)`, little
endian, uint16 when the vocabulary fits else uint32), `shard-NNNNN.offsets.npy` (int64: document i is
tokens [offsets[i], offsets[i+1])), and `index.json`, written last, naming the tokenizer (its SHA-256
and vocabulary), the source, and each shard's token and document counts. The folder is written as
`<out>.partial` and renamed when complete, so a folder named `<out>` is always whole.

Documents keep the source's order and numbering: an empty document (or a skipped bad record) is an
empty entry, which packing passes over and counts as it does for text. So `data.source=tokens` deals
the same documents to the same sequence slots as the text it was made from, whenever both are dealt
by record (fewer files than sequence slots).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from titan.config.schema import DataConfig
from titan.data.tokenizer import HF_TOKENIZER_FILE

INDEX_FILE = "index.json"
FORMAT = "titan-tokens-1"
SHARD_TOKENS = 1 << 28  # tokens per shard file: 512 MiB of uint16, 1 GiB of uint32


def tokenizer_fingerprint(path: str | Path) -> str:
    """SHA-256 of the tokenizer file (of the tokenizer.json of a folder)."""
    file = Path(path)
    if file.is_dir():
        file = file / HF_TOKENIZER_FILE
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


class TokenShardWriter:
    """Appends documents' token ids to shards under `<out>.partial`; `close()` writes the index and
    renames the folder to `out`."""

    def __init__(
        self, out: str | Path, *, vocab_size: int, index_fields: dict, shard_tokens: int = SHARD_TOKENS
    ):
        self.out = Path(out)
        if self.out.exists():
            raise FileExistsError(f"{self.out} exists: remove it or choose another --out")
        self.partial = self.out.with_name(self.out.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)  # what an interrupted run left
        self.partial.mkdir(parents=True)
        self.dtype, self.shard_tokens, self.index_fields = token_dtype(vocab_size), shard_tokens, index_fields
        self.shards: list[dict] = []
        self._file = None
        self._offsets: list[int] = []

    def _open_shard(self) -> None:
        name = _shard_name(len(self.shards))
        self._file = open(self.partial / f"{name}.bin", "wb")
        self._offsets = [0]
        self.shards.append({"name": name, "tokens": 0, "documents": 0})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        np.save(
            self.partial / f"{self.shards[-1]['name']}.offsets.npy", np.array(self._offsets, dtype=np.int64)
        )

    def add(self, tokens: list[int]) -> None:
        if self._file is None or (self._offsets[-1] >= self.shard_tokens and tokens):
            self._close_shard()
            self._open_shard()
        self._file.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        self.shards[-1]["tokens"] += len(tokens)
        self.shards[-1]["documents"] += 1

    def close(self, **index_fields) -> Path:
        """Write the index (with `index_fields` added) and rename the folder to its name."""
        if self._file is None:
            self._open_shard()  # an empty source still gives a readable (empty) folder
        self._close_shard()
        index = {
            "format": FORMAT,
            "dtype": self.dtype.str,
            **self.index_fields,
            **index_fields,
            "documents": sum(s["documents"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }
        (self.partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        os.replace(self.partial, self.out)
        return self.out


def _bad(data: DataConfig, why: str) -> ValueError:
    return ValueError(f"data.path={data.path}: {why}")


def read_index(data: DataConfig) -> dict:
    """The folder's index, checked against data.tokenizer and the shard files' sizes (a cut copy, a
    missing file or another tokenizer is an error here, before any rank starts)."""
    folder = Path(data.path)
    make = "make one with `python -m titan.tools.pretokenize <data overrides> --out DIR`"
    if not folder.is_dir():
        raise _bad(data, f"no such folder: data.source=tokens reads a folder of token shards ({make})")
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        partial = " (a pretokenization that did not finish?)" if folder.name.endswith(".partial") else ""
        raise _bad(data, f"no {INDEX_FILE}: not a folder of token shards{partial}; {make}")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise _bad(data, f"{INDEX_FILE} is not JSON ({e}); make the folder again") from e
    if index.get("format") != FORMAT:
        raise _bad(
            data, f"{INDEX_FILE} is format {index.get('format')!r}, not {FORMAT}; make the folder again"
        )
    made_with = index["tokenizer"]
    if tokenizer_fingerprint(data.tokenizer) != made_with["sha256"]:
        raise _bad(
            data,
            f"the shards were made with the tokenizer {made_with['path']} ({made_with['vocab_size']} tokens), "
            f"not data.tokenizer={data.tokenizer} (its SHA-256 differs): set data.tokenizer to the one they "
            "were made with, or pretokenize again with this one",
        )
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        tokens, offsets = folder / f"{shard['name']}.bin", folder / f"{shard['name']}.offsets.npy"
        for file in (tokens, offsets):
            if not file.is_file():
                raise _bad(data, f"{file.name} is missing (the index lists it); copy the folder again")
        size, expected = tokens.stat().st_size, shard["tokens"] * itemsize
        if size != expected:
            raise _bad(
                data,
                f"{tokens.name} holds {size} bytes, the index says {expected} ({shard['tokens']} tokens): the "
                "file is cut or damaged; copy it again or pretokenize again",
            )
    return index


class TokenShards:
    """The documents of a token-shard folder by (shard, number), as `LocalFiles` gives records of text
    files: `count(f)` and `text(f, record)`, the latter a read-only array of token ids."""

    def __init__(self, data: DataConfig):
        self.folder = Path(data.path)
        self.index = read_index(data)
        self.dtype = np.dtype(self.index["dtype"])
        self.files = [self.folder / f"{s['name']}.bin" for s in self.index["shards"]]
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:  # a worker process maps the files itself
        return {**self.__dict__, "_maps": {}}

    def _map(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        if f not in self._maps:
            shard = self.index["shards"][f]
            tokens = (
                np.memmap(self.files[f], dtype=self.dtype, mode="r")
                if shard["tokens"]
                else np.zeros(0, dtype=self.dtype)  # numpy cannot map an empty file
            )
            offsets = np.load(self.folder / f"{shard['name']}.offsets.npy", mmap_mode="r")
            self._maps[f] = tokens, offsets
        return self._maps[f]

    def count(self, f: int) -> int:
        return self.index["shards"][f]["documents"]

    def text(self, f: int, record: int) -> np.ndarray:
        tokens, offsets = self._map(f)
        start, end = offsets[record : record + 2].tolist()
        return tokens[start:end]
