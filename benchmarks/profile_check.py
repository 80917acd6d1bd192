"""A real run's profiling output, checked (the `profiling` block, titan/train/profiling.py):

    python benchmarks/profile_check.py window <launch.py overrides>   # a trace window and a snapshot
    python benchmarks/profile_check.py oom <launch.py overrides>      # a batch too large: its snapshot

window: `launch.py` for wait 1 + warm-up 1 + 1 active step (the trace grows with each active step)
and one more, with a memory snapshot after the active step, 3; the trace must hold device kernels
(CUDA) or CPU operators (CPU), and on CUDA the snapshot pickle must load and hold the allocator's
segments; on CPU the run must say it took none.
oom: `launch.py` with `profiling.snapshot_on_oom=true` and overrides whose batch the device cannot
hold; the run must fail with torch.OutOfMemoryError and leave `<run dir>/profile/memory/rank-0-oom.pickle`
with segments (CUDA only: on CPU there is no allocator history, and the check is skipped).
Prints a markdown table (also to --markdown) and writes the JSON to --json.
"""

import argparse
import collections
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT_STEP = 3


def launch(overrides: list[str], root: Path, timeout_s: float) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "launch.py",
        *overrides,
        "metrics.tensorboard=false",
        "metrics.wandb=false",
        "metrics.progress=lines",
        f"run.root={root}",
        "run.name=profiled",
    ]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout_s)


def run_dir(root: Path) -> Path:
    (found,) = root.glob("*/profiled")
    return found


def logs(proc: subprocess.CompletedProcess, folder: Path) -> str:
    files = sorted((folder / "logs").glob("*.log")) if folder.exists() else []
    return proc.stdout + proc.stderr + "".join(f.read_text(errors="replace") for f in files)


def load_snapshot(path: Path) -> dict:
    """What a memory_viz pickle holds: its segments (reserved blocks) and the history of each device."""
    snapshot = pickle.loads(path.read_bytes())
    traces = snapshot.get("device_traces", [])
    return {
        "file": path.name,
        "megabytes": round(path.stat().st_size / 2**20, 1),
        "segments": len(snapshot["segments"]),
        "reserved_gib": round(sum(s["total_size"] for s in snapshot["segments"]) / 2**30, 2),
        "trace_entries": sum(len(t) for t in traces),
        "oom_entries": sum(e.get("action") == "oom" for t in traces for e in t),
    }


def window(overrides: list[str], root: Path, cuda: bool, timeout_s: float) -> dict:
    steps = [
        "training.steps=4",
        "checkpoint=none",
        "profiling.enable=true",
        "profiling.wait=1",
        "profiling.warmup=1",
        "profiling.active=1",
        f"profiling.memory_snapshot_steps=[{SNAPSHOT_STEP}]",
    ]
    proc = launch([*overrides, *steps], root, timeout_s)
    if proc.returncode != 0:
        return {"ok": False, "why": "the run failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    folder = run_dir(root)
    traces = sorted((folder / "profile" / "rank-0").glob("*.pt.trace.json*"))
    result: dict = {"traces": [t.name for t in traces]}
    if not traces:
        return {**result, "ok": False, "why": "no trace file in profile/rank-0"}
    events = json.loads(traces[0].read_text())["traceEvents"]
    categories = collections.Counter(e.get("cat", "") for e in events)
    result["trace_megabytes"] = round(traces[0].stat().st_size / 2**20, 1)
    result["events"] = {
        k: categories[k] for k in ("kernel", "gpu_memcpy", "cpu_op", "cuda_runtime", "cpu_instant_event")
    }
    wanted = "kernel" if cuda else "cpu_op"
    checks = {f"trace has {wanted} events": categories[wanted] > 0}
    snapshot = folder / "profile" / "memory" / f"rank-0-step-{SNAPSHOT_STEP}.pickle"
    if cuda:
        checks["snapshot exists"] = snapshot.exists()
        if snapshot.exists():
            result["snapshot"] = load_snapshot(snapshot)
            checks["snapshot has segments"] = result["snapshot"]["segments"] > 0
    else:
        result["snapshot"] = "no CUDA: no snapshot"
        checks["no snapshot taken"] = not snapshot.exists()
        checks["the run says none taken"] = "none taken" in logs(proc, folder)
    result["checks"] = checks
    result["ok"] = all(checks.values())
    return result


def oom(overrides: list[str], root: Path, timeout_s: float) -> dict:
    proc = launch(
        [*overrides, "training.steps=2", "checkpoint=none", "profiling.snapshot_on_oom=true"], root, timeout_s
    )
    matches = list(root.glob("*/profiled"))
    text = logs(proc, matches[0] if matches else root)
    snapshot = matches[0] / "profile" / "memory" / "rank-0-oom.pickle" if matches else None
    checks = {
        "the run failed": proc.returncode != 0,
        # the traceback's exception name, or torch's message where a launcher shortened the traceback
        "with torch.OutOfMemoryError": "OutOfMemoryError" in text or "CUDA out of memory" in text,
        "the OOM snapshot exists": bool(snapshot and snapshot.exists()),
    }
    result: dict = {
        "returncode": proc.returncode,
        "last_line": (proc.stderr.strip().splitlines() or [""])[-1][:200],
    }
    if checks["the OOM snapshot exists"]:
        result["snapshot"] = load_snapshot(snapshot)
        checks["snapshot has segments"] = result["snapshot"]["segments"] > 0
    result["checks"] = checks
    result["ok"] = all(checks.values())
    return result


def table(mode: str, result: dict) -> str:
    lines = [f"{mode}: {'ok' if result.get('ok') else 'FAILED'}", "", "| check | result |", "|---|---|"]
    lines += [
        f"| {name} | {'yes' if passed else '**no**'} |" for name, passed in result.get("checks", {}).items()
    ]
    if "why" in result:
        lines.append(f"| why | {result['why'].replace('|', '/')} |")
    for key in ("events", "snapshot", "trace_megabytes", "returncode", "last_line"):
        if key in result:
            lines.append(f"| {key} | {json.dumps(result[key]).replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["window", "oom"])
    parser.add_argument("overrides", nargs="*", help="launch.py overrides: the model and the batch")
    parser.add_argument(
        "--timeout-s", type=float, default=300, help="for the run (its own, not this script's)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    cuda = "training.device=cuda" in args.overrides
    with tempfile.TemporaryDirectory() as tmp:  # traces and snapshots are large: only the summary stays
        root = Path(tmp)
        if args.mode == "oom" and not cuda:
            result = {"ok": True, "skipped": "no CUDA: no OOM snapshot (the allocator history is CUDA's)"}
        else:
            try:
                if args.mode == "window":
                    result = window(args.overrides, root, cuda, args.timeout_s)
                else:
                    result = oom(args.overrides, root, args.timeout_s)
            except subprocess.TimeoutExpired:
                result = {"ok": False, "why": f"the run took over {args.timeout_s:.0f} s"}
    text = result["skipped"] if "skipped" in result else table(args.mode, result)
    print(json.dumps(result))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if not result["ok"]:
        raise SystemExit(f"profile_check {args.mode}: failed")


if __name__ == "__main__":
    main()
