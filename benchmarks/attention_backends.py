"""Milliseconds per causal attention forward+backward for each SDPA backend, with kv heads repeated and grouped.

    python benchmarks/attention_backends.py --batch 1 --seq 64 --heads 4 --kv-heads 2 --head-dim 16 --dtype float32
    python benchmarks/attention_backends.py            # Llama 3 8B's attention at 8192 tokens, bf16, on CUDA

Rows: math, flash, efficient, cudnn on CUDA (on CPU: math and flash, torch's flash-attention-for-CPU),
each with kv heads repeated (repeat_kv, then equal heads) and grouped (`enable_gqa=True`, k/v as they
are). A backend that refuses the inputs (flash in fp32, efficient with grouped heads, ...) shows why.
The last line names the fastest. Unpinned, SDPA tries flash, efficient, math, cudnn in that order
(torch's default priority): what titan.models.llama.attention.sdpa gets.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titan.models.llama.attention import repeat_kv

BACKENDS = {
    "cpu": [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION],
    "cuda": [
        SDPBackend.MATH,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
    ],
}


def step(q, k, v, grouped: bool) -> None:
    """One forward and backward of causal attention."""
    if grouped:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        n_rep = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
    out.backward(torch.ones_like(out))


def time_ms(q, k, v, grouped: bool, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    for _ in range(warmup):
        step(q, k, v, grouped)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step(q, k, v, grouped)
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)  # Llama 3 8B: 32 query heads, 8 kv heads, 128 dims
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if args.heads % args.kv_heads:
        parser.error(f"--heads={args.heads} is not a multiple of --kv-heads={args.kv_heads}")

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    def tensor(heads):
        shape = (args.batch, heads, args.seq, args.head_dim)
        return torch.randn(shape, device=args.device, dtype=dtype, requires_grad=True)

    q, k, v = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads)
    print(
        f"causal attention fwd+bwd, device={args.device} ({torch.cuda.get_device_name() if q.is_cuda else 'cpu'}), "
        f"torch {torch.__version__}, batch={args.batch} seq={args.seq} heads={args.heads} "
        f"kv_heads={args.kv_heads} head_dim={args.head_dim} dtype={args.dtype}"
    )
    print(f"{'backend':<22} {'kv heads':<10} {'ms':>10}")
    results = {}
    for backend in BACKENDS[q.device.type]:
        for grouped in (False, True):
            label = (backend.name.lower(), "grouped" if grouped else "repeated")
            try:
                with sdpa_kernel([backend]):
                    ms = time_ms(q, k, v, grouped, args.warmup, args.iters)
                results[label] = ms
                shown = f"{ms:10.3f}"
            except RuntimeError as e:  # this backend refuses these inputs: say why, in one line
                shown = "   refused: " + str(e).strip().splitlines()[0][:70]
            q.grad = k.grad = v.grad = None
            print(f"{label[0]:<22} {label[1]:<10} {shown}")
    if not results:
        raise SystemExit("no SDPA backend ran these inputs")
    (name, kv), ms = min(results.items(), key=lambda item: item[1])
    print(f"fastest: {name} with kv heads {kv}, {ms:.3f} ms")


if __name__ == "__main__":
    main()
