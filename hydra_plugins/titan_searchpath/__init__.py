"""Adds the repository root to Hydra's config search path, so `sweeps/` is the config group `sweeps`:
`python launch.py -m +sweeps=lr_scan` runs sweeps/lr_scan.yaml."""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

REPO = Path(__file__).resolve().parents[2]


class TitanSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if (REPO / "sweeps").is_dir():
            search_path.append(provider="titan", path=f"file://{REPO}")
