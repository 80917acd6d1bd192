"""Collective timeouts and the Flight Recorder: a hang fails fast, and says which rank held it up.

Timeouts: `init_process_group(timeout=...)` reaches the default group only; DeviceMesh subgroups keep
torch's default (30 min on gloo, 10 min on NCCL), and every training collective runs on them. So the
timeout is set on each group after the mesh exists (`set_timeouts`), long for the first step (compile,
first all-gathers) and shorter from then on.

Flight Recorder: torch keeps the last N collectives of every group per rank (`TORCH_FR_BUFFER_SIZE`,
read when the process group is created). On NCCL its watchdog dumps them on a timeout by itself
(`TORCH_NCCL_DUMP_ON_TIMEOUT`, to `TORCH_FR_DUMP_TEMP_FILE<rank>`); on gloo a timed-out collective
raises in the rank, which then dumps its own (`dump`). `summarize` reads one dump per rank and names,
per group, the last collective each rank enqueued and the ranks that never enqueued the one others
wait in. (torch's `fr_trace` analyser reads NCCL dumps; in torch 2.13 it cannot read gloo dumps.)
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

DUMP_PREFIX = "rank-"  # torch's NCCL dumps are <prefix><rank>; gloo dumps are written so here too


def recorder_env(folder: Path, entries: int) -> dict[str, str]:
    """Environment for ranks, set before the process group is created: record the last `entries`
    collectives, and on NCCL dump them into `folder` on a timeout."""
    if entries <= 0:
        return {}
    prefix = str(Path(folder) / DUMP_PREFIX)
    # torch 2.11+ (what titan requires) reads these names; the older TORCH_NCCL_* ones warn.
    return {
        "TORCH_FR_BUFFER_SIZE": str(entries),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
    }


def set_timeouts(groups: Iterable[dist.ProcessGroup], seconds: float) -> None:
    """Set the collective timeout of the default group and of each of `groups`."""
    timeout = datetime.timedelta(seconds=seconds)
    seen = set()
    for group in [c10d._get_default_group(), *groups]:
        if id(group) not in seen:
            seen.add(id(group))
            c10d._set_pg_timeout(timeout, group)  # torchtitan sets subgroup timeouts the same way


def mesh_groups(meshes: dict) -> list[dist.ProcessGroup]:
    """Every process group of the meshes (each named dim of each mesh)."""
    groups = []
    for mesh in meshes.values():
        for dim in range(mesh.ndim):
            groups.append(mesh.get_group(dim))
    return groups


def is_timeout(error: BaseException) -> bool:
    """Whether a collective's error is a timeout (gloo: 'Timed out waiting'; NCCL: the watchdog's)."""
    text = str(error)
    return isinstance(error, (RuntimeError, dist.DistError)) and ("Timed out" in text or "timed out" in text)


def dump(folder: Path, rank: int) -> Path:
    """This rank's Flight Recorder entries, as JSON, into `folder` (written whole, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trace = torch._C._distributed_c10d._dump_fr_trace_json(True, False)
    path = folder / f"{DUMP_PREFIX}{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(trace)
    os.replace(tmp, path)
    return path


def _read(path: Path) -> dict:
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return pickle.loads(raw)  # noqa: S301 - NCCL's own dump: torch writes it pickled, on this machine


def _rank_of(path: Path) -> int:
    return int(path.name[len(DUMP_PREFIX) :].split(".")[0])


def summarize(folder: Path) -> str:
    """One paragraph per process group: each rank's last enqueued collective (sequence id, op, state),
    and which ranks are behind the others, i.e. never enqueued the collective the others wait in."""
    dumps = {
        _rank_of(p): _read(p) for p in sorted(Path(folder).glob(f"{DUMP_PREFIX}*")) if ".tmp" not in p.name
    }
    if not dumps:
        return f"no Flight Recorder dumps in {folder}"
    last: dict[str, dict[int, dict]] = {}  # group -> rank -> its newest collective entry
    for rank, trace in dumps.items():
        for entry in trace.get("entries", []):
            if entry.get("is_p2p"):
                continue
            group = "/".join(str(part) for part in entry["process_group"])
            if entry["collective_seq_id"] >= last.setdefault(group, {}).get(rank, {}).get(
                "collective_seq_id", -1
            ):
                last[group][rank] = entry
    lines = [f"Flight Recorder dumps of ranks {sorted(dumps)} in {folder}:"]
    for group, by_rank in sorted(last.items()):
        newest = max(e["collective_seq_id"] for e in by_rank.values())
        behind = sorted(r for r, e in by_rank.items() if e["collective_seq_id"] < newest)
        waiting = sorted(r for r, e in by_rank.items() if e["collective_seq_id"] == newest)
        op = next(e["profiling_name"] for e in by_rank.values() if e["collective_seq_id"] == newest)
        per_rank = ", ".join(
            f"rank {r}: #{e['collective_seq_id']} {e['profiling_name']} ({e['state']})"
            for r, e in sorted(by_rank.items())
        )
        lines.append(f"  group {group}: {per_rank}")
        if behind:
            lines.append(
                f"    ranks {behind} never enqueued #{newest} {op}, which ranks {waiting} wait in: look at "
                f"what ranks {behind} were doing"
            )
    return "\n".join(lines)
