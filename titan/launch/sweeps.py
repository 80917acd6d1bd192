"""Named sweeps: each `sweeps/<name>.yaml` becomes the option `<name>` of the config group `sweeps`,
so `python launch.py -m +sweeps=lr_scan` runs it.

They are stored in Hydra's ConfigStore rather than put on the search path: a search-path entry for
the repository root would make Hydra walk every directory under it (.venv included) on `--help`.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def register_sweeps(folder: Path) -> list[str]:
    store = ConfigStore.instance()
    names = []
    for path in sorted(Path(folder).glob("*.yaml")):
        store.store(group="sweeps", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names
