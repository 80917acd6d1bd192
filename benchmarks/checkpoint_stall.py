"""How long each checkpoint mode holds the training loop per save, against a synchronous save.

    python benchmarks/checkpoint_stall.py                  # ~90 M parameters (365 MB of weights, 1.1 GB with AdamW)
    python benchmarks/checkpoint_stall.py --dim 1024 --layers 8 --saves 4

One process (a 1-rank gloo group), a real model trained between saves with AdamW, a save at every
`--steps-between` steps. The stall is the wall time the training loop spends inside the
checkpointer per save: staging the copy, and any wait for the previous save still in flight.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titan.checkpoint.manager import Checkpointer
from titan.config.schema import CheckpointConfig, OptimizerConfig
from titan.models.llama.args import ModelArgs, num_params
from titan.models.llama.model import Transformer
from titan.train.loss import cross_entropy_sum
from titan.train.optim import LRSchedulers, Optimizers


class NoLoader:
    """The loader's place in the checkpoint: nothing to save in a benchmark."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_steps(model, optimizers, args, n: int) -> None:
    for _ in range(n):
        tokens = torch.randint(0, args.vocab, (1, args.seq_len + 1))
        cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizers.step(torch.tensor(False))  # never skipped: the benchmark's gradients are finite
        optimizers.zero_grad()


def measure(mode: str, args, folder: Path) -> dict:
    model_args = ModelArgs(
        dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=args.dim // 256,
        vocab_size=args.vocab, ffn_dim=args.dim * 8 // 3 // 64 * 64, max_seq_len=args.seq_len,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(model_args)
    model.init_weights()
    optimizers = Optimizers([model], OptimizerConfig(lr=1e-4), torch.device("cpu"))
    schedulers = LRSchedulers(optimizers, OptimizerConfig(lr=1e-4), 1000)
    train_steps(model, optimizers, args, 1)  # AdamW state exists from here on
    checkpointer = Checkpointer(
        CheckpointConfig(enable=True, mode=mode, interval=args.steps_between, keep_latest_k=2),
        folder / mode,
        model_parts=[model],
        optimizer=optimizers.optimizers,
        scheduler=schedulers,
        loader=NoLoader(),
    )
    stalls, step_times = [], []
    for save in range(1, args.saves + 1):
        start = time.perf_counter()
        train_steps(model, optimizers, args, args.steps_between)
        step_times.append((time.perf_counter() - start) / args.steps_between)
        start = time.perf_counter()
        checkpointer.maybe_save(save * args.steps_between, {"step": save, "tokens_seen": 0}, last=False)
        stalls.append(time.perf_counter() - start)
    start = time.perf_counter()
    checkpointer.close()
    return {
        "mode": mode,
        "params_m": num_params(model_args) / 1e6,
        "first_stall_s": stalls[0],
        "stall_s": statistics.mean(stalls[1:]) if len(stalls) > 1 else stalls[0],
        "step_s": statistics.mean(step_times),
        "close_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=["sync", "thread", "process"])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--steps-between", type=int, default=4)
    args = parser.parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [measure(mode, args, Path(tmp)) for mode in args.modes]
    finally:
        dist.destroy_process_group()
    sync = next((r["stall_s"] for r in results if r["mode"] == "sync"), None)
    print(
        "| mode | parameters (M) | stall per save (s) | first save (s) | share of sync | train step (s) | close (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        share = f"{100 * r['stall_s'] / sync:.0f}%" if sync else "-"
        print(
            f"| {r['mode']} | {r['params_m']:.1f} | {r['stall_s']:.3f} | {r['first_stall_s']:.3f} | {share} | "
            f"{r['step_s']:.3f} | {r['close_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
