"""titan's CPU step time against a minimal hand-written loop on the same model and batch shape.

    python benchmarks/loop_overhead.py                      # llama3_debug, fp32, 3 interleaved repeats
    python benchmarks/loop_overhead.py --steps 30 --repeats 5 training.cross_entropy=full

titan runs as users run it (`launch.py`, one rank, no compile, no checkpoints, a log every step);
its step time is the logged tokens per step over tokens/s. The hand-written loop is what a user
would write instead: the same `Transformer`, random tokens of the same shape, the same micro-batch
accumulation, plain `F.cross_entropy`, gradient clipping and foreach AdamW. The runs alternate, so
load from other processes on the machine falls on both; the ratio is of the medians (and of the
fastest steps, which noise only makes slower).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from titan.models.llama.args import ModelArgs
from titan.models.llama.model import Transformer

REPO = Path(__file__).resolve().parents[1]


def titan_step_seconds(args, root: Path, repeat: int) -> tuple[list[float], dict]:
    """Per-step seconds of one launch.py run after the warm-up steps, and its resolved config."""
    name = f"titan-{repeat}"
    cmd = [
        sys.executable,
        "launch.py",
        f"model={args.model}",
        "parallelism=single",
        "cluster.nproc_per_node=1",
        "training.device=cpu",
        "training.param_dtype=float32",
        "training.compile=false",
        f"training.steps={args.warmup + args.steps}",
        f"training.seq_len={args.seq_len}",
        f"training.global_batch_size={args.global_batch}",
        f"training.micro_batch_size={args.micro_batch}",
        "checkpoint=none",
        "metrics.log_freq=1",
        "metrics.tensorboard=false",
        "metrics.progress=lines",
        f"run.root={root}",
        f"run.name={name}",
        *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"launch.py failed:\n{proc.stderr[-3000:]}")
    (run_dir,) = root.glob(f"*/{name}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = args.global_batch * args.seq_len
    seconds = [tokens_per_step / r["tokens_per_second"] for r in records[args.warmup :]]
    return seconds, yaml.safe_load((run_dir / "config.yaml").read_text())


def hand_loop_step_seconds(args, model_args: ModelArgs, optimizer_cfg: dict) -> list[float]:
    """Per-step seconds of the minimal loop after the warm-up steps."""
    torch.manual_seed(0)
    model = Transformer(model_args)
    model.init_weights()
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        params,
        lr=optimizer_cfg["lr"],
        betas=tuple(optimizer_cfg["betas"]),
        eps=optimizer_cfg["eps"],
        weight_decay=optimizer_cfg["weight_decay"],
        foreach=True,
    )
    scale = 1.0 / (args.global_batch * args.seq_len)
    seconds = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        tokens = torch.randint(0, model_args.vocab_size, (args.global_batch, args.seq_len + 1))
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        loss_sum = torch.zeros(())
        for x, y in zip(inputs.split(args.micro_batch), labels.split(args.micro_batch)):
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            (loss * scale).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum.item()  # the host reads the loss every step, as titan's log does
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3_debug")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="titan and hand-loop runs, alternating")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both")
    parser.add_argument("overrides", nargs="*", help="extra launch.py overrides for the titan runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    titan, hand = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            seconds, cfg = titan_step_seconds(args, Path(tmp), repeat)
            titan.append(seconds)
            hand.append(hand_loop_step_seconds(args, ModelArgs(**cfg["model"]), cfg["optimizer"]))

    def row(name: str, runs: list[list[float]]) -> tuple[float, float]:
        medians = [statistics.median(r) for r in runs]
        median, fastest = statistics.median(medians), min(min(r) for r in runs)
        per_run = ", ".join(f"{1e3 * m:.1f}" for m in medians)
        print(f"| {name} | {1e3 * median:.1f} | {1e3 * fastest:.1f} | {per_run} |")
        return median, fastest

    print("| loop | median step ms | fastest step ms | median per run ms |\n|---|---|---|---|")
    titan_median, titan_fastest = row("titan (launch.py)", titan)
    hand_median, hand_fastest = row("hand-written", hand)
    print(
        f"\ntitan / hand-written: {titan_median / hand_median:.3f}x (medians), "
        f"{titan_fastest / hand_fastest:.3f}x (fastest steps)"
    )


if __name__ == "__main__":
    main()
