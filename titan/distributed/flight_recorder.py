"""Collective timeouts and the Flight Recorder: a hang fails fast, and says which rank held it up.

Timeouts: `init_process_group(timeout=...)` reaches the default group only; DeviceMesh subgroups keep
torch's default (30 min on gloo, 10 min on NCCL), and every training collective runs on them. So the
timeout is set on each group after the mesh exists (`set_timeouts`), long for the first step (compile,
first all-gathers) and shorter from then on.

Flight Recorder: torch keeps the last N collectives of every group per rank (`TORCH_FR_BUFFER_SIZE`,
read when the process group is created). On NCCL its watchdog dumps them on a timeout by itself
(`TORCH_NCCL_DUMP_ON_TIMEOUT`, to `TORCH_FR_DUMP_TEMP_FILE<rank>`); on gloo a timed-out collective
raises in the rank, which then dumps its own (`dump`). The other ranks seldom time out themselves: once
the first rank leaves, their collectives with it fail at once ("Connection closed by peer"), also on
groups with long timeouts of their own (the checkpointer's); `is_collective_failure` says so, and they
dump too. `summarize` reads one dump per rank and names, per group, the last collective each rank
enqueued, the ranks that never enqueued the one others wait in, and of those the ones that went on
without it (skipped it) rather than being held up before it. (torch's `fr_trace` analyser reads NCCL
dumps; in torch 2.13 it cannot read gloo dumps: a KeyError on their empty `pg_config`.)
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


# How gloo (torch 2.13, a RuntimeError) reports a collective whose peer process ended.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """A timeout, or a collective cut short because a peer left: once the rank that timed out first
    exits, the others' collectives fail so before their own timeouts; they dump too."""
    text = str(error)
    return (
        is_timeout(error)
        or isinstance(error, dist.DistError)  # NCCL's errors (an aborted communicator, say)
        or (isinstance(error, RuntimeError) and any(gone in text for gone in _PEER_GONE))
    )


PREVIOUS = "previous"  # where a starting rank puts its dumps of the attempt before


def set_aside_old_dumps(folder: Path, rank: int) -> None:
    """Move this rank's dumps of an earlier attempt into <folder>/previous (replacing older ones there), so
    that a new hang's dumps are never read together with them: a rank that ends before dumping would
    otherwise leave its old dump among the new ones."""
    folder = Path(folder)
    old = [p for p in (folder / f"{DUMP_PREFIX}{rank}", folder / f"{DUMP_PREFIX}{rank}.json") if p.is_file()]
    if not old:
        return
    (folder / PREVIOUS).mkdir(parents=True, exist_ok=True)
    for path in old:
        os.replace(path, folder / PREVIOUS / path.name)


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


def _group(entry: dict) -> str:
    return "/".join(str(part) for part in entry["process_group"])


def _label(entry: dict) -> str:
    """Its group as every rank knows it: a mesh subgroup's name differs per subgroup, its description
    ("mesh_tp") does not; a group of all ranks has one name everywhere, and maybe no description."""
    name, desc = entry["process_group"]
    return desc if desc not in ("", "undefined") else name


def _kind(entry: dict) -> tuple:
    return (_label(entry), entry["profiling_name"], entry["collective_seq_id"])


def _describe(entry: dict, show_state: bool) -> str:
    state = f" ({entry['state']})" if show_state else ""
    return f"#{entry['collective_seq_id']} {entry['profiling_name']}{state}"


def _went_on(behind: list[dict], others: list[list[dict]], group: str, seq: int) -> bool:
    """Whether a rank with these collectives, behind in `group`, went on past its collective `seq`
    without it, rather than being still before it. Every rank runs one program: still before it, the
    rank enqueued after its last collective in that group what some other rank enqueued between that
    collective and `seq` in its own group of the kind (or less)."""
    own_last = [e for e in behind if _group(e) == group][-1]
    label, last_seq = _label(own_last), own_last["collective_seq_id"]
    after = [_kind(e) for e in behind[behind.index(own_last) + 1 :]]
    for entries in others:
        in_kind = {e["collective_seq_id"]: i for i, e in enumerate(entries) if _label(e) == label}
        if last_seq not in in_kind or seq not in in_kind:
            continue  # not in such a group, or that part has left its ring buffer
        between = [_kind(e) for e in entries[in_kind[last_seq] + 1 : in_kind[seq]]]
        if after == between[: len(after)]:
            return False
    return True


def _by_name(group: str) -> tuple:
    name = group.split("/")[0]
    return (0, int(name), group) if name.isdigit() else (1, 0, group)


def summarize(folder: Path) -> str:
    """One paragraph per process group: each rank's last enqueued collective (sequence id, op; on NCCL
    its state), and the ranks behind the others, which never enqueued the collective the others wait
    in. A rank behind went on without it (skipped it: a cause, named on the last line) or is still
    before it (held up elsewhere, often by such a skip)."""
    dumps = {
        _rank_of(p): _read(p) for p in sorted(Path(folder).glob(f"{DUMP_PREFIX}*")) if ".tmp" not in p.name
    }
    if not dumps:
        return f"no Flight Recorder dumps in {folder}"
    entries = {
        rank: [e for e in trace.get("entries", []) if not e.get("is_p2p")] for rank, trace in dumps.items()
    }
    # gloo records every collective as "scheduled", whatever became of it: there the state says nothing.
    show_state = any(e["state"] != "scheduled" for es in entries.values() for e in es)
    last: dict[str, dict[int, dict]] = {}  # group -> rank -> its newest collective entry
    for rank, rank_entries in entries.items():
        for entry in rank_entries:
            newest = last.setdefault(_group(entry), {}).get(rank)
            if newest is None or entry["collective_seq_id"] >= newest["collective_seq_id"]:
                last[_group(entry)][rank] = entry
    lines = [f"Flight Recorder dumps of ranks {sorted(dumps)} in {folder}:"]
    causes = []
    for group in sorted(last, key=_by_name):
        by_rank = last[group]
        newest = max(e["collective_seq_id"] for e in by_rank.values())
        behind = sorted(r for r, e in by_rank.items() if e["collective_seq_id"] < newest)
        waiting = sorted(r for r, e in by_rank.items() if e["collective_seq_id"] == newest)
        op = next(e["profiling_name"] for e in by_rank.values() if e["collective_seq_id"] == newest)
        per_rank = ", ".join(f"rank {r}: {_describe(e, show_state)}" for r, e in sorted(by_rank.items()))
        lines.append(f"  group {group}: {per_rank}")
        if not behind:
            continue
        lines.append(
            f"    ranks {behind} never enqueued #{newest} {op}, which ranks {waiting} wait in: look at "
            f"what ranks {behind} were doing"
        )
        for rank in behind:
            now = f"{_describe(entries[rank][-1], show_state)} of group {_group(entries[rank][-1])}"
            others = [es for r, es in sorted(entries.items()) if r != rank]
            if _went_on(entries[rank], others, group, newest):
                lines.append(f"      rank {rank} went on without it, to {now}")
                causes.append(f"rank {rank} skipped #{newest} {op} of group {group}")
            else:
                lines.append(f"      rank {rank} is still before it, in {now}")
    if causes:
        lines.append("Start there: " + "; ".join(causes) + " (the other waits follow from it)")
    return "\n".join(lines)
