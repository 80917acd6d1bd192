"""Estimate a run's memory per rank role and its step time, from launch.py's overrides, on this CPU.

    python -m titan.tools.estimate_memory model=llama3_70b parallelism=tp8_fsdp cluster=slurm \\
        cluster.nodes=32 cluster.gpus_per_node=8 training.global_batch_size=256 training.seq_len=8192
    python -m titan.tools.estimate_memory ... --world 256 --mfu 0.45 --gpu-memory-gib 141

The same table as `python launch.py <overrides> dry_run=true` (titan/train/estimate.py says how), without
the data checks.
"""

import argparse
import dataclasses
import sys

from titan.config.errors import ConfigError
from titan.launch.compose import compose_run_config
from titan.launch.dry_run import STATED_MFU, device_figures
from titan.launch.validate import validate, world_size
from titan.train.estimate import estimate, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titan.tools.estimate_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="launch.py overrides")
    parser.add_argument("--world", type=int, help="ranks (default: cluster.nodes x the ranks per node)")
    parser.add_argument(
        "--mfu", type=float, default=STATED_MFU, help=f"for the step time (default {STATED_MFU})"
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float, help="device memory (default: cluster.gpu_memory_gib)"
    )
    parser.add_argument(
        "--gpu-peak-tflops", type=float, help="dense bf16 peak (default: cluster.gpu_peak_tflops)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = compose_run_config(args.overrides)
        cluster = dataclasses.replace(
            cfg.cluster,
            gpu_memory_gib=args.gpu_memory_gib or cfg.cluster.gpu_memory_gib,
            gpu_peak_tflops=args.gpu_peak_tflops or cfg.cluster.gpu_peak_tflops,
        )
        cfg = dataclasses.replace(cfg, cluster=cluster)
        world = args.world or world_size(cfg, 0)
        validate(cfg, world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    memory, peak, source = device_figures(cfg)
    print(f"device: {source}")
    print(render(cfg, world, estimate(cfg, world), device_gib=memory, peak_tflops=peak, mfu=args.mfu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
