"""Cross-entropy implementations over one batch of logits: time of forward + backward and peak memory.

    python benchmarks/cross_entropy.py                                   # CPU, a small shape
    python benchmarks/cross_entropy.py --tokens 16384 --vocab 128256 --device cuda --compile

Rows: titan's `full` and `chunked` (training.cross_entropy), and liger-kernel's cross-entropy where it
is installed (CUDA only). Peak memory is torch's allocator peak on CUDA and MemTracker's peak of live
tensor bytes on CPU, both above the logits themselves.
"""

import argparse
import functools
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from titan.train.loss import CHUNK_TOKENS, chunked_cross_entropy_sum, cross_entropy_sum

MIB = 2**20


def candidates(device: torch.device, chunk_tokens: int) -> dict:
    rows = {
        "full": cross_entropy_sum,
        "chunked": functools.partial(chunked_cross_entropy_sum, chunk_tokens=chunk_tokens),
    }
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss(reduction="sum")
            rows["liger"] = lambda logits, labels: liger(logits.flatten(0, 1), labels.flatten())
        except ImportError:
            pass
    return rows


def measure(fn, logits: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(ms per forward + backward, peak MiB above the logits, loss)."""

    def step() -> torch.Tensor:
        logits.grad = None
        loss = fn(logits, labels)
        loss.backward()
        return loss

    for _ in range(2):  # warm-up: compilation and allocator caches
        step()
    if logits.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        tracker = MemTracker()
        tracker.track_external(logits)
        with tracker:
            loss = step()
        (snapshot,) = tracker.get_tracker_snapshot("peak").values()
        peak = snapshot["Total"] - logits.numel() * logits.element_size()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if logits.device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps, peak / MIB, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile each loss (inductor)")
    args = parser.parse_args()
    device = torch.device(args.device)
    logits = torch.randn(1, args.tokens, args.vocab, device=device, dtype=getattr(torch, args.dtype))
    logits.requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=device)
    print(
        f"{args.tokens} tokens x {args.vocab} vocab, {args.dtype} logits on {device}, compile={args.compile}"
    )
    print("| loss | ms fwd+bwd | peak MiB above the logits | loss - full |")
    print("|---|---|---|---|")
    reference = cross_entropy_sum(logits, labels).item()
    for name, fn in candidates(device, args.chunk_tokens).items():
        fn = torch.compile(fn) if args.compile else fn
        ms, peak, loss = measure(fn, logits, labels, args.steps)
        print(f"| {name} | {ms:.2f} | {peak:.1f} | {loss - reference:+.3g} |")


if __name__ == "__main__":
    main()
