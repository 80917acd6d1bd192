"""Files shipped inside the package: the bundled C4-format test shard and the debug tokenizers.

They are rebuilt, deterministically and offline, by `python -m titan.assets.build_assets`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(relative: str) -> Path:
    """The absolute path of a bundled asset, e.g. `asset_path("tokenizers/titan_debug.tiktoken")`."""
    path = (ASSETS_DIR / relative).resolve()
    if not path.is_relative_to(ASSETS_DIR):
        raise ValueError(f"asset path {relative!r} leaves the assets folder {ASSETS_DIR}")
    if not path.exists():
        raise FileNotFoundError(
            f"no bundled asset {relative!r} in {ASSETS_DIR}; rebuild them with `python -m titan.assets.build_assets`"
        )
    return path
