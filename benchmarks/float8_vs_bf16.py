"""Float8 against bf16: the same run twice, side by side, and the gap between their losses, as a table.

    python benchmarks/float8_vs_bf16.py --steps 50 model=llama3_1b model.tie_embeddings=false \\
        training.seq_len=4096 training.global_batch_size=4 training.micro_batch_size=4

Both runs start from the same seed and read the same data, so the loss gap is what Float8's
matmuls change (torchao's recipes keep the output layer in bf16). They run at the same time (one
device holds both at these shapes), each in its own `launch.py` process.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start(name: str, overrides: list[str], steps: int, root: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "launch.py",
        *overrides,
        f"training.steps={steps}",
        "checkpoint=none",
        "metrics.log_freq=1",
        "metrics.tensorboard=false",
        "metrics.wandb=false",
        "metrics.progress=lines",
        f"run.root={root}",
        f"run.name={name}",
    ]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(root / f"{name}.log", "w")
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


def losses(name: str, proc: subprocess.Popen, root: Path, deadline: float) -> dict[int, float] | str:
    """step -> loss of a finished run, or why there are none."""
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"
    if proc.returncode != 0:
        lines = [line for line in (root / f"{name}.log").read_text().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit {proc.returncode}"
    (metrics,) = root.glob(f"*/{name}/metrics.jsonl")
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines())}


def table(reference: dict[int, float], float8: dict[int, float], recipe: str) -> str:
    steps = sorted(set(reference) & set(float8))
    gaps = {s: float8[s] - reference[s] for s in steps}
    shown = [s for s in steps if s == 1 or s % 10 == 0 or s == steps[-1]]
    lines = [f"| step | bf16 loss | float8 {recipe} loss | gap |", "|---|---|---|---|"]
    lines += [f"| {s} | {reference[s]:.4f} | {float8[s]:.4f} | {gaps[s]:+.4f} |" for s in shown]
    last = steps[-10:]
    lines.append("")
    lines.append(
        f"max |gap| over {len(steps)} steps: {max(abs(g) for g in gaps.values()):.4f}; "
        f"mean gap of the last {len(last)} steps: {sum(gaps[s] for s in last) / len(last):+.4f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--recipes", nargs="+", default=["tensorwise"], choices=["tensorwise", "rowwise"], help="one run each"
    )
    parser.add_argument("--timeout-s", type=float, default=None, help="for both runs together")
    parser.add_argument("--json", type=Path, default=None, help="also write both loss curves here")
    parser.add_argument("overrides", nargs="*", help="launch.py overrides of both runs")
    args = parser.parse_args()
    deadline = time.monotonic() + (args.timeout_s or float("inf"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {"bf16": start("bf16", args.overrides, args.steps, root)}
        for recipe in args.recipes:
            runs[recipe] = start(recipe, [*args.overrides, f"training.float8={recipe}"], args.steps, root)
        results = {name: losses(name, proc, root, deadline) for name, proc in runs.items()}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    failed = {name: r for name, r in results.items() if isinstance(r, str)}
    if failed:
        sys.exit("; ".join(f"{name} run failed: {why}" for name, why in failed.items()))
    print("\n\n".join(table(results["bf16"], results[recipe], recipe) for recipe in args.recipes))


if __name__ == "__main__":
    main()
