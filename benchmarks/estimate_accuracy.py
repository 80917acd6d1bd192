"""The dry run's memory estimate (titan/train/estimate.py, fake tensors) against a real run measured by
torch's MemTracker / FSDPMemTracker: parameter, gradient and optimizer bytes, and the activations one
micro-batch's forward leaves for backward, per AC mode and layout, as a table.

    python benchmarks/estimate_accuracy.py                 # the debug model and a ~100 M model
    python benchmarks/estimate_accuracy.py --seq-len 512 --layouts single fsdp2
    python benchmarks/estimate_accuracy.py --device cuda --steps 3 \\
        --shape "1b: model=llama3_1b training.seq_len=4096 training.micro_batch_size=4 ..."

--device: one rank on that device, each --shape (a name and `launch.py` overrides) built as the trainer
builds it and run for --steps eager steps (the estimate is of an eager run) under MemTracker, with
CUDA's own peak, `torch.cuda.max_memory_allocated`, beside the tracker's; the estimate's peak is its
parameters, gradients, optimizer state, activations and transient buffers together.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from titan.config.schema import ModelArgs, RunConfig, TrainingConfig
from titan.models.llama.args import num_params
from titan.train.estimate import estimate

GIB = 2**30
# the debug model at the rehearsal's shape
TINY_SHAPE = (
    "debug: model=llama3_debug training.seq_len=128 training.global_batch_size=2 training.micro_batch_size=2"
)

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


def measure_on_device(cfg: RunConfig, device: torch.device, steps: int) -> dict:
    """Bytes of each kind in `steps` eager training steps of one rank (the trainer's model, autocast,
    loss and optimizer): MemTracker's activations after the first forward and its peak over all steps,
    and on CUDA the allocator's peak. An out-of-memory error is a result: the step it stopped at."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from titan.distributed.fsdp import DTYPES
    from titan.distributed.mesh import ParallelDims
    from titan.train.build_model import build_loss, build_model
    from titan.train.estimate import by_kind, local_bytes
    from titan.train.optim import Optimizers
    from titan.train.trainer import init_distributed

    init_distributed(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    dims = ParallelDims.resolve(cfg.parallelism, 1)
    meshes = dims.build_meshes(device.type)
    loss_fn = build_loss(cfg)
    (model,), _ = build_model(cfg, dims, meshes, device, loss_fn)
    optimizers = Optimizers([model], cfg.optimizer, device)
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.training.param_dtype])
    if dims.fsdp_enabled or cfg.training.param_dtype == "float32":  # as the trainer decides
        autocast = torch.autocast(device.type, enabled=False)
    t = cfg.training
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    skip = torch.zeros((), dtype=torch.bool, device=device)
    tracker = MemTracker()
    tracker.track_external(model, *optimizers.optimizers)
    result: dict = {"steps": 0}
    try:
        with tracker:
            for step in range(1, steps + 1):
                tracker.reset_mod_stats()  # per-module stats hold one iteration; the peak is kept
                with autocast:
                    logits = model(inputs)
                    if step == 1:
                        result["activations"] = by_kind(tracker.get_tracker_snapshot("current")[device])[
                            "Activation"
                        ]
                    loss = loss_fn(logits, labels)
                (loss / labels.numel()).backward()
                del logits, loss
                if step == 1:
                    params = list(model.parameters())
                    result["params"] = local_bytes(params)
                    result["grads"] = local_bytes([p.grad for p in params])
                optimizers.step(skip)
                optimizers.zero_grad()
                result["steps"] = step
    except torch.OutOfMemoryError as e:
        result["oom"] = f"out of memory in step {result['steps'] + 1}: {str(e).splitlines()[0][:120]}"
    state = [s for o in optimizers.optimizers for st in o.state.values() for s in st.values()]
    if state:
        result["optimizer"] = local_bytes([s for s in state if torch.is_tensor(s)])
    result["tracker_peak"] = tracker.get_tracker_snapshot("peak")[device]["Total"]
    if cuda:
        result["max_allocated"] = torch.cuda.max_memory_allocated(device)
        result["max_reserved"] = torch.cuda.max_memory_reserved(device)  # what the throughput rows show
    del model, optimizers, tracker
    if cuda:
        torch.cuda.empty_cache()
    return result


def compose(overrides: list[str]) -> RunConfig:
    """The run's config as launch.py composes it, eager (the estimate is of eager)."""
    from tests.launch.compose import compose_config
    from titan.launch.build import build_run_config

    cfg = build_run_config(compose_config(overrides))
    return cfg.replace(training={"compile": False})


def shape_table(rows: list[dict]) -> str:
    """Markdown: GiB estimated / measured of each kind, and the peak against MemTracker's and CUDA's."""

    def pair(row: dict, kind: str) -> str:
        est, real = row["estimate"].get(kind), row["measured"].get(kind)
        if real is None:
            return f"{est / GIB:,.3f} / -"
        ratio = f" ({est / real:.2f}x)" if real else ""
        return f"{est / GIB:,.3f} / {real / GIB:,.3f}{ratio}"

    lines = [
        "GiB, estimate / measured (ratio estimate / measured); peak measured by MemTracker and by "
        "`torch.cuda.max_memory_allocated`",
        "",
        "| shape | parameters | steps | params | grads | optimizer | activations | peak: est / MemTracker | peak: est / CUDA allocated | CUDA reserved | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error']} |" + " |" * 9)
            continue
        m = r["measured"]
        steps = str(m["steps"]) + (f" ({m['oom']})" if "oom" in m else "")
        cells = [pair(r, k) for k in ("params", "grads", "optimizer", "activations")]
        peak = r["estimate"]["peak"]
        cells.append(pair({"estimate": {"x": peak}, "measured": {"x": m["tracker_peak"]}}, "x"))
        cells.append(pair({"estimate": {"x": peak}, "measured": {"x": m.get("max_allocated")}}, "x"))
        cells.append(f"{m['max_reserved'] / GIB:,.3f}" if "max_reserved" in m else "-")
        cells.append(str(r.get("seconds", "-")))
        lines.append(f"| {r['shape']} | {r['parameters']:,} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_mode(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # MemTracker names devices with their index
        device = torch.device("cuda", 0)
    rows: list[dict] = []
    for text in args.shape or [TINY_SHAPE]:
        name, _, overrides = text.partition(":")
        row: dict = {"shape": name.strip(), "overrides": overrides.split()}
        start = time.perf_counter()
        try:
            cfg = compose(overrides.split())
            (role,) = estimate(cfg, 1)
            row["parameters"] = num_params(cfg.model)
            row["estimate"] = {
                "params": role.param_bytes,
                "grads": role.grad_bytes,
                "optimizer": role.optimizer_bytes,
                "activations": role.activation_bytes,
                "other": role.other_bytes,
                "peak": role.peak_bytes,
            }
            row["measured"] = measure_on_device(cfg, device, args.steps)
            row["seconds"] = round(time.perf_counter() - start, 1)  # the estimate's processes included
        except Exception as e:  # noqa: BLE001 - the row says why, the next shape still runs
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        if args.markdown:
            args.markdown.write_text(shape_table(rows) + "\n")
    print(shape_table(rows))
    if any("error" in r for r in rows):
        raise SystemExit("estimate_accuracy: a shape failed")


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
    parser.add_argument("--device", help="cpu | cuda: real steps of each --shape on one rank of this device")
    parser.add_argument("--shape", action="append", help="'name: launch.py overrides' (with --device)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.device:
        device_mode(args)
        return
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
