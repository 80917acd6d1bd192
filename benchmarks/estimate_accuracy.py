"""The dry run's memory estimate (titan/train/estimate.py, fake tensors) against a real run measured by
torch's MemTracker / FSDPMemTracker: parameter, gradient and optimizer bytes, and the activations one
micro-batch's forward leaves for backward, per AC mode and layout, as a table.

    python benchmarks/estimate_accuracy.py                 # the debug model and a ~100 M model
    python benchmarks/estimate_accuracy.py --seq-len 512 --layouts single fsdp2
"""

import argparse
import json
import tempfile
from pathlib import Path

from titan.config.schema import ModelArgs, RunConfig, TrainingConfig
from titan.models.llama.args import num_params
from titan.train.estimate import estimate

MODELS = {
    "debug (tiny)": ModelArgs(
        dim=64, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2304, ffn_dim=128, max_seq_len=2048
    ),
    # GPT-2-small-like width and depth with Llama's blocks: ~100 M parameters with a 32k vocabulary.
    "~100M": ModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, ffn_dim=2048, max_seq_len=2048
    ),
}
LAYOUTS = {"single": ({"dp_shard": 1}, 1), "fsdp2": ({"dp_shard": -1}, 2)}


def main() -> None:
    # The test suite's fork harness (gloo ranks on this machine) and its measurement of a real run.
    from tests.multirank import spawn_ranks
    from tests.train.test_estimate import measure_real_run

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--ac", nargs="+", default=["none", "full", "op"])
    args = parser.parse_args()
    print(
        "| model | params | layout | ac | params MiB (est / real) | grads MiB | optimizer MiB | activations MiB (est / real) | activations error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for name, model_args in MODELS.items():
        for layout in args.layouts:
            parallelism, world = LAYOUTS[layout]
            for ac in args.ac:
                training = TrainingConfig(
                    seq_len=args.seq_len,
                    micro_batch_size=args.micro_batch,
                    global_batch_size=args.micro_batch * world,
                    param_dtype="float32",
                    ac=ac,
                )
                cfg = RunConfig(model=model_args, training=training).replace(parallelism=parallelism)
                with tempfile.TemporaryDirectory() as tmp:
                    spawn_ranks(measure_real_run, world, cfg, Path(tmp) / "real.json", timeout_s=600)
                    measured = json.loads((Path(tmp) / "real.json").read_text())
                real = [measured[k] for k in ("params", "grads", "optimizer", "activations")]
                (role,) = estimate(cfg, world)
                est = [role.param_bytes, role.grad_bytes, role.optimizer_bytes, role.activation_bytes]
                pairs = [f"{e / mib:,.2f} / {r / mib:,.2f}" for e, r in zip(est, real, strict=True)]
                error = 100 * (est[3] - real[3]) / real[3]
                print(
                    f"| {name} | {num_params(model_args):,} | {layout} | {ac} | {pairs[0]} | {pairs[1]} | {pairs[2]} | {pairs[3]} | {error:+.1f}% |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
