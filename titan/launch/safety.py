"""What a config may not do: name code to run, or copy a secret into a run's name and files.

Checked on the command line's overrides and on the YAML files Hydra will read, before Hydra composes
anything: Hydra itself instantiates `hydra.callbacks` (and a launcher's or sweeper's `_target_`) while
it composes and launches, before titan sees the config.
"""

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override

from titan.config.errors import ConfigError
from titan.launch.identity import run_name_problem

# Hydra's instantiate() keys: with any of them a config node names a callable and its arguments.
INSTANTIATE_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
# Names of environment variables whose values must not end up in a run's name or files.
SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASS|PWD|CREDENTIAL|AUTH|PAT\b|_PAT_|WEBHOOK|COOKIE|SESSION|PRIVATE", re.I
)
ENV_INTERPOLATION = re.compile(r"\$\{(?:oc\.env|env):\s*([^,}\s]+)")
# The run's directory is named from these keys: no environment variable may be resolved into them.
NAME_KEYS = ("run.name", "run.group", "run.root")


# Hydra's command-line flags that take a value (hydra/_internal/utils.py get_args_parser).
FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c"}
FLAGS_WITH_VALUE |= {"--package", "-p", "--experimental-rerun"}


def overrides_of(argv: Iterable[str]) -> list[str]:
    """The overrides among launch.py's arguments: what is left when Hydra's flags are taken out."""
    args, overrides, i = list(argv), [], 0
    while i < len(args):
        arg = args[i]
        if arg in FLAGS_WITH_VALUE or (
            arg in ("--info", "-i") and i + 1 < len(args) and "=" not in args[i + 1]
        ):
            i += 2
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return overrides


def check_overrides(argv: Iterable[str]) -> None:
    """Refuse overrides that would run code or copy a secret."""
    for override in OverridesParser.create().parse_overrides(overrides_of(argv)):
        _check_override(override)


def _check_override(override: Override) -> None:
    key = override.key_or_group.lstrip("+~")
    line = override.input_line
    if key.startswith(("hydra.callbacks", "hydra/callbacks")):
        raise ConfigError(f"{line}: Hydra callbacks run code and cannot be given to titan")
    parts = set(re.split(r"[./@]", key))
    named = parts & INSTANTIATE_KEYS or {k for v in _values(override) for k in _keys(v)} & INSTANTIATE_KEYS
    if named:
        raise ConfigError(f"{line}: {sorted(named)[0]} names code to run; a titan config holds values only")
    for value in _values(override):
        _check_interpolations(key, value, where=line)
        problem = run_name_problem(value) if key == "run.name" and "${" not in str(value) else None
        if problem:
            raise ConfigError(problem)


def _values(override: Override) -> list[Any]:
    if override.value_type is None:  # a deletion: ~key
        return []
    value = override.value()
    return list(value.list) if isinstance(value, ChoiceSweep) else [value]


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _keys(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _keys(v)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _check_interpolations(key: str, value: Any, where: str) -> None:
    for text in _strings(value):
        for variable in ENV_INTERPOLATION.findall(text):
            if key.startswith(NAME_KEYS):
                raise ConfigError(
                    f"{where}: {key} names the run directory; an environment variable ({variable}) may not be "
                    "resolved into it"
                )
            if SECRET_NAME.search(variable):
                raise ConfigError(
                    f"{where}: ${{oc.env:{variable}}} looks like a secret, and the resolved config is saved "
                    "in the run directory (config.yaml); pass it through the environment instead"
                )


def check_config_files(folders: Iterable[Path]) -> None:
    """Refuse YAML files that would make Hydra run code: `hydra.callbacks` in any of them, or a
    `_target_`-style key outside conf/hydra/ (where Hydra's own plugins are configured)."""
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            relative = path.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts):  # .hydra/: Hydra's record, never loaded
                continue
            node = yaml.safe_load(path.read_text()) or {}
            if not isinstance(node, dict):
                continue
            hydra_node = node.get("hydra") if isinstance(node.get("hydra"), dict) else {}
            if "callbacks" in hydra_node or relative.parts[:2] == ("hydra", "callbacks"):
                raise ConfigError(f"{path}: Hydra callbacks run code and cannot be configured for titan")
            if relative.parts[0] != "hydra":
                named = set(_keys(node)) & INSTANTIATE_KEYS
                if named:
                    raise ConfigError(
                        f"{path}: {sorted(named)[0]} names code to run; titan configs hold values only"
                    )


def config_dirs(argv: Iterable[str]) -> list[Path]:
    """The folders given with --config-dir / -cd (Hydra adds them to its search path)."""
    args = list(argv)
    dirs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in ("--config-dir", "-cd")]
    return dirs + [Path(a.partition("=")[2]) for a in args if a.startswith("--config-dir=")]
