"""Training throughput as a table: tokens/s per device, TFLOP/s, MFU, max reserved memory, and where
the step time goes (data, forward+backward, optimizer, checkpoint).

    python benchmarks/train_throughput.py                       # llama3_debug, the layouts that fit here
    python benchmarks/train_throughput.py --layouts fsdp tp2 --steps 30 --model llama3_1b --seq-len 2048
    python benchmarks/train_throughput.py --warmup 10 --steps 30 \\
        --row "1B bf16: model=llama3_1b training.seq_len=4096 training.compile=true" \\
        --row "1B fp8: model=llama3_1b training.seq_len=4096 training.compile=true training.float8=rowwise"

A row is a name and any `launch.py` overrides; `--layouts` makes one row per parallel layout from the
other options. Each row runs as its own `launch.py` process (the way users run it), for `--warmup`
+ `--steps` steps with a log every step; the numbers are over the `--steps` timed steps, read back
from metrics.jsonl: tokens/s is their tokens over their time, the step-time split (the trainer's
`time_*_ms` keys; '-' where the run logged none) their means.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# layout -> ranks it runs on here
LAYOUTS = {"single": 1, "fsdp": 2, "ddp": 2, "tp2": 2, "cp2_fsdp": 2, "pp2": 2}
# the step-time split: metrics.jsonl key -> column
SPLIT = {
    "time_data_ms": "data ms",
    "time_forward_backward_ms": "fwd+bwd ms",
    "time_optimizer_ms": "optimizer ms",
    "time_checkpoint_ms": "checkpoint ms",
}


def parse_row(text: str) -> tuple[str, list[str]]:
    """'name: key=value key=value' -> (name, overrides)."""
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--row {text!r}: write it as 'name: override override ...'")
    return name.strip(), overrides.split()


def layout_rows(args) -> list[tuple[str, list[str]]]:
    common = [
        f"model={args.model}",
        f"training.seq_len={args.seq_len}",
        f"training.global_batch_size={args.global_batch}",
        f"training.micro_batch_size={args.micro_batch}",
        f"training.param_dtype={args.dtype}",
        f"training.compile={str(args.compile).lower()}",
        "checkpoint=none",
    ]
    return [
        (
            layout,
            [
                f"parallelism={layout}",
                f"cluster.nproc_per_node={args.nproc or LAYOUTS.get(layout, 2)}",
                *common,
                *args.overrides,
            ],
        )
        for layout in args.layouts
    ]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_row(
    name: str, overrides: list[str], *, warmup: int, steps: int, root: Path, timeout_s: float | None = None
) -> dict:
    """One launch.py run; the means of its timed steps, or {"row", "error"}."""
    run_name = "".join(c if c.isalnum() else "-" for c in name)
    cmd = [
        sys.executable,
        "launch.py",
        *overrides,
        f"training.steps={warmup + steps}",
        "metrics.log_freq=1",
        "metrics.tensorboard=false",
        "metrics.wandb=false",
        "metrics.progress=lines",
        f"run.root={root}",
        f"run.name={run_name}",
    ]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    # its own session: a timeout stops the launcher and the ranks it started
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"row": name, "overrides": overrides, "error": f"timeout after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"row": name, "overrides": overrides, "error": _last_line(stderr)}
    (run_dir,) = root.glob(f"*/{run_name}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    world = round(records[0]["global_tokens_per_second"] / records[0]["tokens_per_second"])
    tokens_per_step = config["training"]["global_batch_size"] * config["training"]["seq_len"] / world

    def mean(key: str) -> float | None:
        values = [r[key] for r in timed if key in r]
        return statistics.mean(values) if values else None

    memory = [r[k] for r in timed for k in ("memory_peak_reserved_gib", "memory_rss_gib") if k in r]
    # Tokens over time, not the mean of each step's tokens/s (which the fast steps would weigh up).
    seconds = sum(tokens_per_step / r["tokens_per_second"] for r in timed)
    tokens_per_second = tokens_per_step * len(timed) / seconds if timed else None
    first = timed[0] if timed else {}

    def at_mean_rate(key: str) -> float | None:  # TFLOP/s and MFU are proportional to tokens/s
        return tokens_per_second * first[key] / first["tokens_per_second"] if key in first else None

    result = {
        "row": name,
        "overrides": overrides,
        "ranks": world,
        "steps": len(timed),
        "tokens_per_second": tokens_per_second,
        "tflops": at_mean_rate("tflops"),
        "mfu": at_mean_rate("mfu"),
        "max_memory_gib": max(memory) if memory else None,
        "memory_kind": "reserved" if any("memory_peak_reserved_gib" in r for r in timed) else "rss",
        "step_ms": 1e3 * seconds / len(timed) if timed else None,
        "final_loss": records[-1]["loss"] if records else None,
    }
    result.update({key: mean(key) for key in SPLIT})
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = [
    ("row", None),
    ("ranks", "d"),
    ("tokens/s per device", ",.0f"),
    ("TFLOP/s per device", ".2f"),
    ("MFU %", ".1f"),
    ("max memory GiB", ".1f"),
    ("step ms", ".1f"),
    *[(column, ".1f") for column in SPLIT.values()],
    ("final loss", ".4f"),
]
KEYS = [
    "row",
    "ranks",
    "tokens_per_second",
    "tflops",
    "mfu",
    "max_memory_gib",
    "step_ms",
    *SPLIT,
    "final_loss",
]


def table(results: list[dict]) -> str:
    """Markdown; memory is CUDA's peak reserved, or the process RSS on CPU."""
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = [r["row"]] + [fmt(r.get(key), spec) for key, (_, spec) in zip(KEYS[1:], COLUMNS[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--row",
        action="append",
        type=parse_row,
        default=[],
        help="'name: launch.py overrides' (repeatable); replaces --layouts",
    )
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument(
        "--nproc", type=int, default=None, help="ranks for every layout (default: per layout)"
    )
    parser.add_argument("--model", default="llama3_debug")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=None, help="per row")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra launch.py overrides for every layout")
    args = parser.parse_args()
    rows = args.row or layout_rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_row(
                name,
                overrides,
                warmup=args.warmup,
                steps=args.steps,
                root=Path(tmp),
                timeout_s=args.timeout_s,
            )
            for name, overrides in rows
        ]
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
