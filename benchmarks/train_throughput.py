"""Training throughput of titan's layouts: tokens/s per device, TFLOP/s, MFU and memory, as a table.

    python benchmarks/train_throughput.py                       # llama3_debug, the layouts that fit here
    python benchmarks/train_throughput.py --layouts fsdp tp2 --steps 30 --model llama3_1b --seq-len 2048

Each layout runs as its own `launch.py` process (the way users run it); the numbers are the mean of
the logged steps after the first `--warmup` steps, read back from metrics.jsonl.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# layout -> ranks it runs on here
LAYOUTS = {"single": 1, "fsdp": 2, "ddp": 2, "tp2": 2, "cp2_fsdp": 2, "pp2": 2}


def run(layout: str, nproc: int, args, root: Path) -> dict:
    cmd = [
        sys.executable,
        "launch.py",
        f"model={args.model}",
        f"parallelism={layout}",
        f"cluster.nproc_per_node={nproc}",
        f"training.steps={args.steps}",
        f"training.seq_len={args.seq_len}",
        f"training.global_batch_size={args.global_batch}",
        f"training.micro_batch_size={args.micro_batch}",
        f"training.param_dtype={args.dtype}",
        f"training.compile={str(args.compile).lower()}",
        "checkpoint=none",
        "metrics.log_freq=1",
        "metrics.tensorboard=false",
        "metrics.progress=lines",
        f"run.root={root}",
        f"run.name={layout}",
        *args.overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if proc.returncode != 0:
        return {"layout": layout, "error": proc.stderr.strip().splitlines()[-1]}
    (metrics_file,) = root.glob(f"*/{layout}/metrics.jsonl")
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()][args.warmup :]
    mean = lambda key: statistics.mean(r[key] for r in rows) if rows and key in rows[0] else None  # noqa: E731
    memory = mean("memory_peak_active_gib") or mean("memory_rss_gib")
    return {
        "layout": layout,
        "ranks": nproc,
        "tokens_per_second": mean("tokens_per_second"),
        "tflops": mean("tflops"),
        "mfu": mean("mfu"),
        "memory_gib": memory,
        "final_loss": rows[-1]["loss"] if rows else None,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| layout | ranks | tokens/s per device | TFLOP/s per device | MFU % | memory GiB | final loss |"
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['layout']} | | error: {r['error']} | | | | |")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['layout']} | {r['ranks']} | {fmt(r['tokens_per_second'], ',.0f')} | {fmt(r['tflops'], '.3f')} | "
            f"{fmt(r['mfu'], '.1f')} | {fmt(r['memory_gib'], '.2f')} | {fmt(r['final_loss'], '.4f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument(
        "--nproc", type=int, default=None, help="ranks for every layout (default: per layout)"
    )
    parser.add_argument("--model", default="llama3_debug")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra launch.py overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run(layout, args.nproc or LAYOUTS.get(layout, 2), args, Path(tmp)) for layout in args.layouts
        ]
    print(table(results))


if __name__ == "__main__":
    main()
