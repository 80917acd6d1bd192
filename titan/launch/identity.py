"""A run's identity: the keys that decide what it computes.

They alone name a run's directory, and only they are refused when a run resumes with other values.
Everything else (the parallel layout, micro-batch, checkpointing, compile, AC, precision, cluster,
logging, the number of steps) may change between launches of one run: the same run can go on at
another layout or with another checkpoint setting, and layouts agree within the parity tolerance.
"""

import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any

# Exact keys, and prefixes ending in ".".
IDENTITY_KEYS = (
    "model.",
    "data.source",
    "data.path",
    "data.name",
    "data.split",
    "data.text_field",
    "data.tokenizer",
    "data.sources",
    "data.mix_seed",
    "data.holdout_every",
    "optimizer.",
    "training.seed",
    "training.global_batch_size",
    "training.seq_len",
    "training.max_norm",
    "training.attention",
    "training.rope_positions",
)
IDENTITY_GROUPS = ("model", "data", "optimizer")
# Identity keys added since runs were first named, at the value that means "as before": left out of
# the hash, so that adding one never renames (and so never fails to resume) an existing run.
ADDED_IDENTITY_DEFAULTS = {
    "data.sources": [],
    "data.mix_seed": 0,
    "data.holdout_every": 0,
    "training.attention": "causal",
    "training.rope_positions": "sequence",
}
# In a sweep, every point is its own run even where only its layout differs (the layouts sweep):
# points are named by all their overrides but these, which say where and how a job is watched and
# scheduled.
NEVER_NAMED = (
    "run.",
    "metrics.",
    "experiment",
    "sweeps",
    "hydra.",
    "training.steps",
    "checkpoint.interval",
    "cluster",
    "cluster.partition",
    "cluster.account",
    "cluster.qos",
    "cluster.time_min",
    "cluster.cpus_per_task",
    "cluster.mem_gb",
    "cluster.constraint",
    "cluster.exclude",
    "cluster.setup",
    "cluster.sbatch_args",
    "cluster.max_retries",
    "cluster.max_concurrent",
    "cluster.signal_delay_s",
    "cluster.gpu_memory_gib",
    "cluster.gpu_peak_tflops",
    "dry_run",
)


# Files named by the config: a run's identity holds them as absolute paths, so `data.path=shard.json`
# and `data.path=/abs/shard.json` launched from the same folder are one run. data.path is a dataset
# name, not a path, for the huggingface source.
PATH_KEYS = ("data.path", "data.tokenizer")


def absolute_path_value(key: str, value: Any, source: Any) -> Any:
    """`value` of `key` as an absolute path (`~` expanded), when it is a path; else unchanged."""
    is_path = key in PATH_KEYS and not (key == "data.path" and source == "huggingface")
    if not is_path or not isinstance(value, str) or value in ("", "???") or "${" in value:
        return value  # unset, or an interpolation resolved later (the bundled assets are absolute)
    return os.path.abspath(os.path.expanduser(value))


def with_absolute_paths(flat_config: dict[str, Any]) -> dict[str, Any]:
    source = flat_config.get("data.source")
    out = {k: absolute_path_value(k, v, source) for k, v in flat_config.items()}
    if isinstance(out.get("data.sources"), list):  # a mixture's sources: each path as a single source's
        out["data.sources"] = [
            {**s, "path": absolute_path_value("data.path", s.get("path"), s.get("source"))}
            if isinstance(s, dict)
            else s
            for s in out["data.sources"]
        ]
    return out


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def is_identity_key(key: str) -> bool:
    return _matches(key, IDENTITY_KEYS)


def identity_of(flat_config: dict[str, Any]) -> dict[str, Any]:
    """The identity keys of a flattened config, with their values (paths made absolute)."""
    return {
        k: v
        for k, v in sorted(with_absolute_paths(flat_config).items())
        if is_identity_key(k) and not (k in ADDED_IDENTITY_DEFAULTS and v == ADDED_IDENTITY_DEFAULTS[k])
    }


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def names_the_run(override: str, in_sweep: bool) -> bool:
    key = _override_key(override)
    if in_sweep:
        return not _matches(key, NEVER_NAMED)
    return key in IDENTITY_GROUPS or is_identity_key(key)


def run_name(
    overrides: Iterable[str], identity: dict[str, Any], existing: Iterable[str], in_sweep: bool
) -> str:
    """`<the overrides that name the run>-<hash of the run's identity>`; never a timestamp.

    The hash is of the identity's values, not of how they were spelled, so a run directory whose
    name ends in the same hash is this run's (found in `existing`): `model=llama3_debug` (the
    default, given explicitly) or `optimizer.lr=3e-4` finds the directory of the plain command.
    """
    named = sorted(o for o in overrides if names_the_run(o, in_sweep))
    if in_sweep:  # the swept keys are part of what tells the points apart
        identity = {**identity, "overrides": named}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    if not in_sweep:
        for name in sorted(existing):
            if name.endswith(f"-{digest}"):
                return name
    slug = "+".join(o.lstrip("+~").replace("=", "-", 1) for o in named) or "default"
    return f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', slug)[:120]}-{digest}"


def run_name_problem(name: object) -> str | None:
    """run.name is one directory inside <run.root>/<run.group>: never a path, `.`, `..` or empty."""
    if name is None:
        return None
    text = str(name)
    if text in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9_.+=,@-]+", text):
        return (
            f"run.name={text!r} must be a plain directory name (letters, digits and _ . + = , @ -), "
            "not a path, '.', '..' or empty"
        )
    return None
