"""Durable file writes: a reader (or a run resumed after a crash) finds the old file or the new one,
never a torn one.

The new content goes to `<name>.tmp` beside the file, is flushed to disk, and takes the file's place
in one rename (atomic within a file system on POSIX). A rename itself is durable only once its
directory is flushed too: `fsync_dir`.
"""

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (encoded as `Path.write_text` encodes it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the renames inside a directory durable (the directory's entries are data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
