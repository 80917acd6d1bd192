"""Record what a checkout of titan computes, and compare two records bit for bit.

    python benchmarks/behaviour_record.py record --tree <checkout dir> --out <dir>
    python benchmarks/behaviour_record.py compare <dirA> <dirB>

`record` runs the checkout's own `launch.py` (cwd and PYTHONPATH = the checkout, OMP_NUM_THREADS=1,
this interpreter) for a fixed set of cases, each in its own `run.root` under `<out>/runs/` with an
explicit `run.name`, and writes `<out>/record.json`; each case's stdout and stderr go to
`<out>/<case>.log`. A case that fails is recorded as failed with the tail of its log, and the
remaining cases still run. This file imports nothing from titan (only the standard library and torch), so
the same script records any revision of the tree.

What is recorded per case:
  - metrics: every line of `<run dir>/metrics.jsonl`: step, loss, grad_norm and lr, each float also
    as `float.hex()`. Losses, grad norms and learning rates are compared through the hex strings, so
    equality is bitwise, never within a tolerance. Throughput, memory and elapsed-time fields are
    wall-clock measurements and are left out.
  - checkpoints: every complete `<run dir>/checkpoints/step-N` directory, converted with
    `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` and flattened into dotted names
    (`model.layers.0.attention.wq.weight`, `optimizer.state.<param>.exp_avg`,
    `optimizer.param_groups.<param>.lr`).
    Each tensor: dtype, shape and the sha256 of its raw bytes; each non-tensor value: its repr.
  - state files: the non-tensor files of each step directory that hold training state, each by
    sha256: `train_state.json` (step, tokens seen, LR-scheduler state, model_only), `model.json` (the
    model's hyper-parameters), `loader/stream-*.json` (each data stream's position and buffered
    tokens) and `rng/rank-*.json` (each rank's torch RNG state, which a resume restores). None of
    them holds a wall-clock value (checked on the files these runs write), and all of them are
    reproducible run to run (two records of the same commit agree on every case, `make_train`
    included, which runs without `training.deterministic`), so all are compared.
    DCP's `.metadata` (a pickle of the storage layout, covered by the tensors) and the `*.distcp`
    payloads (compared as tensors above) are not hashed. Any other file in a step directory is
    listed by name only and reported, not compared. Run-level files with wall-clock values
    (`events.jsonl`, `env.txt`, `cmd.txt`, `git.txt`, logs) are not read.

`compare` prints one markdown row per case and exits 1 on any difference (or a case that failed or
is missing on one side), listing the first differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

COMMON = [
    "model=llama3_debug",
    "training.steps=6",
    "training.seq_len=64",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.deterministic=true",
    "metrics.log_freq=1",
    "metrics.tensorboard=false",
    "checkpoint.interval=3",
    "checkpoint.keep_latest_k=0",
    # The default warmup (10 steps) must be shorter than training.steps: validation refuses it otherwise.
    "optimizer.warmup_steps=2",
]
CASES: dict[str, list[str]] = {
    "single": ["parallelism=single", "cluster.nproc_per_node=1", *COMMON],
    "fsdp": ["parallelism=fsdp", "cluster.nproc_per_node=2", *COMMON],
    "tp2": ["parallelism=tp2", "cluster.nproc_per_node=2", *COMMON],
    "pp2": ["parallelism=pp2", "cluster.nproc_per_node=2", *COMMON],
    "cp2": ["parallelism=cp2_fsdp", "cluster.nproc_per_node=2", *COMMON],
    # `make train ARGS="training.steps=N"` runs `$(PY) launch.py training.steps=N`: the default config
    # (llama3_debug, FSDP over 2 ranks, AdamW, 10 warmup steps). N=12, not 10: validation refuses
    # optimizer.warmup_steps=10 unless training.steps > 10.
    "make_train": ["training.steps=12"],
}
METRIC_KEYS = ("loss", "grad_norm", "lr")
# Non-tensor files of a step directory that are compared (relative paths, as regular expressions).
STATE_FILES = (r"train_state\.json", r"model\.json", r"loader/stream-\d+\.json", r"rng/rank-\d+\.json")
NOT_STATE = (r".*\.distcp", r"\.metadata")
CASE_TIMEOUT_S = 900
LOG_TAIL_LINES = 60


# ----------------------------------------------------------------------------------------- record


def _float_entry(value) -> dict:
    if isinstance(value, float):
        return {"value": value, "hex": value.hex()}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"value": value, "hex": float(value).hex()}
    return {"value": value, "hex": repr(value)}


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "step" not in record:
            continue
        row = {"step": record["step"]}
        for key in METRIC_KEYS:
            if key in record:
                row[key] = _float_entry(record[key])
        rows.append(row)
    return rows


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}{key}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}{i}.", out)
    else:
        out[prefix[:-1]] = obj


def tensor_entry(t: torch.Tensor) -> dict:
    t = t.detach().cpu()
    raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": _sha(raw)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(step_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.pt"
        dcp_to_torch_save(step_dir, out)
        # Our own run's checkpoint: the optimizer's hyper-parameters are pickled by DCP.
        state = torch.load(out, weights_only=False, map_location="cpu")
    flat: dict = {}
    _flatten(state, "", flat)
    tensors, values = {}, {}
    for name in sorted(flat):
        value = flat[name]
        if isinstance(value, torch.Tensor):
            tensors[name] = tensor_entry(value)
        else:
            values[name] = repr(value)
    files, unselected = {}, []
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if any(re.fullmatch(pattern, rel) for pattern in STATE_FILES):
            files[rel] = _sha(path.read_bytes())
        elif not any(re.fullmatch(pattern, rel) for pattern in NOT_STATE):
            unselected.append(rel)
    return {"tensors": tensors, "values": values, "state_files": files, "unselected_files": unselected}


def find_run_dir(root: Path, name: str) -> Path | None:
    """The directory named `name` under `root` that holds the run (the group level may vary)."""
    candidates = [p.parent for p in root.rglob("metrics.jsonl") if p.parent.name == name]
    if not candidates:
        candidates = [p.parent for p in root.rglob("config.yaml") if p.parent.name == name]
    if not candidates:
        candidates = [p.parent for p in root.rglob("metrics.jsonl")]
    return candidates[0] if len(candidates) == 1 else None


def _git(tree: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"(git {' '.join(args)} failed)"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def record_case(tree: Path, out: Path, case: str, overrides: list[str]) -> dict:
    root = (out / "runs" / case).resolve()
    args = [*overrides, f"run.root={root}", f"run.name={case}"]
    cmd = [sys.executable, "launch.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    log_file = out / f"{case}.log"
    entry: dict = {"overrides": args, "command": cmd}
    start = time.monotonic()
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=CASE_TIMEOUT_S
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["returncode"] = returncode
    if returncode != 0:
        entry.update(status="failed", log_tail=_tail(log_file))
        return entry
    run_dir = find_run_dir(root, case)
    if run_dir is None:
        entry.update(status="failed", log_tail=f"no single run directory named {case} under {root}")
        return entry
    entry["run_dir"] = str(run_dir)
    try:
        entry["metrics"] = read_metrics(run_dir)
        folder = run_dir / "checkpoints"
        steps = sorted(
            (int(m.group(1)), p)
            for p in (folder.iterdir() if folder.is_dir() else [])
            if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name))
        )
        entry["checkpoints"] = {str(n): read_checkpoint(p) for n, p in steps}
    except Exception as e:  # noqa: BLE001 - recorded, and the next case still runs
        entry.update(status="failed", log_tail=f"collecting {run_dir} failed: {type(e).__name__}: {e}")
        return entry
    entry["status"] = "ok"
    return entry


def record(tree: Path, out: Path, only: list[str] | None) -> int:
    tree, out = tree.resolve(), out.resolve()
    if not (tree / "launch.py").is_file():
        sys.exit(f"{tree} has no launch.py")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "tree": str(tree),
        "commit": _git(tree, "rev-parse", "HEAD"),
        "dirty_files": _git(tree, "status", "--short").splitlines(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cases": {},
    }
    start = time.monotonic()
    for case, overrides in CASES.items():
        if only and case not in only:
            continue
        entry = record_case(tree, out, case, overrides)
        result["cases"][case] = entry
        print(f"{case}: {entry['status']} in {entry['seconds']} s", flush=True)
        if entry["status"] != "ok":
            print("  " + entry["log_tail"].replace("\n", "\n  ")[-2000:], flush=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    (out / "record.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'record.json'} ({result['seconds']} s)")
    return 0 if all(c["status"] == "ok" for c in result["cases"].values()) else 1


# ---------------------------------------------------------------------------------------- compare


def _load(path: Path) -> dict:
    file = path / "record.json" if path.is_dir() else path
    return json.loads(file.read_text())


def compare_case(a: dict, b: dict, diffs: list[str], case: str) -> list[str]:
    """One table row; appends human-readable differences to `diffs`."""
    if a.get("status") != "ok" or b.get("status") != "ok":
        sides = [s for s, e in (("A", a), ("B", b)) if e.get("status") != "ok"]
        for side, entry in (("A", a), ("B", b)):
            if entry.get("status") != "ok":
                tail = "\n      ".join(str(entry.get("log_tail", "")).splitlines()[-8:])
                diffs.append(
                    f"{case}: failed in {side} (returncode {entry.get('returncode')}):\n      {tail}"
                )
        return [f"FAILED in {'+'.join(sides)}"] + ["-"] * 5
    ma = {m["step"]: m for m in a["metrics"]}
    mb = {m["step"]: m for m in b["metrics"]}
    if list(ma) != [m["step"] for m in a["metrics"]] or list(mb) != [m["step"] for m in b["metrics"]]:
        diffs.append(f"{case}: a step is logged twice in metrics.jsonl")
    if sorted(ma) != sorted(mb):
        diffs.append(f"{case}: logged steps differ: {sorted(ma)} vs {sorted(mb)}")
    common = sorted(ma.keys() & mb.keys())
    cells = [f"{len(common)}" + ("" if sorted(ma) == sorted(mb) else f" (A {len(ma)}, B {len(mb)})")]
    for key in METRIC_KEYS:
        bad = []
        for step in common:
            va, vb = ma[step].get(key), mb[step].get(key)
            if (va or {}).get("hex") != (vb or {}).get("hex"):
                bad.append(step)
                diffs.append(
                    f"{case}: step {step} {key}: {(va or {}).get('value')!r} ({(va or {}).get('hex')}) "
                    f"vs {(vb or {}).get('value')!r} ({(vb or {}).get('hex')})"
                )
        present = any(key in ma[s] or key in mb[s] for s in common)
        cells.append(("yes" if not bad else f"NO ({len(bad)} steps)") if present else "n/a")
    ca, cb = a.get("checkpoints", {}), b.get("checkpoints", {})
    if sorted(ca, key=int) != sorted(cb, key=int):
        diffs.append(f"{case}: checkpoint steps differ: {sorted(ca, key=int)} vs {sorted(cb, key=int)}")
    t_equal = t_total = s_equal = s_total = 0
    for step in sorted(ca.keys() | cb.keys(), key=int):
        sa, sb = ca.get(step, {}), cb.get(step, {})
        ta, tb = sa.get("tensors", {}), sb.get("tensors", {})
        for name in sorted(ta.keys() | tb.keys()):
            t_total += 1
            if ta.get(name) == tb.get(name):
                t_equal += 1
            else:
                diffs.append(f"{case}: step-{step} tensor {name}: {ta.get(name)} vs {tb.get(name)}")
        for group in ("values", "state_files"):
            ga, gb = sa.get(group, {}), sb.get(group, {})
            for name in sorted(ga.keys() | gb.keys()):
                s_total += 1
                if ga.get(name) == gb.get(name):
                    s_equal += 1
                else:
                    what = "checkpoint value" if group == "values" else "file"
                    diffs.append(f"{case}: step-{step} {what} {name}: {ga.get(name)} vs {gb.get(name)}")
        ua, ub = sa.get("unselected_files", []), sb.get("unselected_files", [])
        if ua != ub:
            print(f"note: {case} step-{step} has other files (not compared): A {ua}, B {ub}")
    cells.append(f"{'yes' if t_equal == t_total else 'NO'} ({t_equal}/{t_total})")
    cells.append(f"{'yes' if s_equal == s_total else 'NO'} ({s_equal}/{s_total})")
    return cells


def compare(path_a: Path, path_b: Path, max_diffs: int) -> int:
    a, b = _load(path_a), _load(path_b)
    print(
        f"A: {path_a} (tree {a.get('tree')}, commit {a.get('commit')}, {len(a.get('dirty_files', []))} dirty)"
    )
    print(
        f"B: {path_b} (tree {b.get('tree')}, commit {b.get('commit')}, {len(b.get('dirty_files', []))} dirty)"
    )
    print()
    header = [
        "case",
        "steps compared",
        "losses bitwise equal",
        "grad norms bitwise equal",
        "lr bitwise equal",
        "checkpoint tensors equal (n/n)",
        "other state files equal",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    diffs: list[str] = []
    cases = list(a["cases"]) + [c for c in b["cases"] if c not in a["cases"]]
    for case in cases:
        if case not in a["cases"] or case not in b["cases"]:
            side = "A" if case not in a["cases"] else "B"
            diffs.append(f"{case}: missing in {side}")
            cells = [f"MISSING in {side}"] + ["-"] * 5
        else:
            cells = compare_case(a["cases"][case], b["cases"][case], diffs, case)
        # column order: steps, loss, grad_norm, lr, tensors, state
        print("| " + " | ".join([case, *cells]) + " |")
    print()
    print("(other state = train_state.json, model.json, loader/*.json, rng/*.json and the checkpoint's")
    print(" non-tensor values such as optimizer param_groups)")
    if diffs:
        print(f"\n{len(diffs)} difference(s); the first {min(len(diffs), max_diffs)}:")
        for line in diffs[:max_diffs]:
            print(f"  - {line}")
        return 1
    print("\nall equal")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the cases on a checkout and write <out>/record.json")
    rec.add_argument("--tree", type=Path, required=True, help="the checkout whose launch.py runs")
    rec.add_argument("--out", type=Path, required=True, help="where record.json, logs and runs go")
    rec.add_argument("--cases", nargs="*", choices=list(CASES), help="a subset of the cases (default: all)")
    cmp_ = sub.add_parser("compare", help="compare two records; exit 1 on any difference")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    cmp_.add_argument("--max-diffs", type=int, default=30, help="differences listed (default 30)")
    args = parser.parse_args()
    if args.command == "record":
        return record(args.tree, args.out, args.cases)
    return compare(args.a, args.b, args.max_diffs)


if __name__ == "__main__":
    sys.exit(main())
