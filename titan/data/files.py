"""The local files of data.path: one file, a directory searched recursively, or a glob."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from titan.config.schema import DataConfig

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
