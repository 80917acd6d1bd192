"""FlexAttention with the block-causal BlockMask against SDPA with the same boolean mask, on a packed
batch of several documents (titan/models/llama/attention.py: `masked` with `flex_block_causal` on
CUDA, with `block_causal` on CPU): how far apart their outputs and gradients are, and how long each takes.

    python benchmarks/flex_vs_sdpa_mask.py                                  # CUDA: forward and backward
    python benchmarks/flex_vs_sdpa_mask.py --device cpu --seq-len 256 --heads 4 --kv-heads 2 --head-dim 16

Both paths and a float64 SDPA reference see the same q, k, v (and, for backward, the same output
gradient). A path's error is its max abs difference from the float64 reference; FlexAttention passes
when its error on the output and on dq, dk, dv is at most twice SDPA's plus a floor per dtype (the
rounding of one kernel against another, not a bound taken from either). On CPU torch 2.13's
FlexAttention has no backward: forward only, under no_grad, compiled with `--backend` (aot_eager).
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

from titan.models.llama.attention import block_causal, flex_block_causal, masked, sdpa

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# the error FlexAttention may have beyond twice SDPA's: about the rounding of one output element
FLOOR = {"bfloat16": 1e-2, "float32": 1e-5}
TENSORS = ("out", "dq", "dk", "dv")


def packed_documents(batch: int, seq: int, docs: int, generator: torch.Generator) -> torch.Tensor:
    """[B, S] document numbers of rows packed with `docs` documents of random lengths (at least 16 tokens)."""
    rows = []
    for _ in range(batch):
        starts = torch.randperm(seq // 16 - 1, generator=generator)[: docs - 1].add(1).mul(16)
        flags = torch.zeros(seq, dtype=torch.long)
        flags[starts] = 1
        rows.append(flags.cumsum(0))
    return torch.stack(rows)


def timed(fn, iters: int, device: torch.device) -> float:
    """Milliseconds per call, after one warm-up call."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - begin) / iters


def run(args, dtype_name: str, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape_q = (args.batch, args.heads, args.seq_len, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, args.seq_len, args.head_dim)
    q, k, v = (
        torch.randn(s, generator=generator, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv)
    )
    dout = torch.randn(shape_q, generator=generator, dtype=torch.float64)
    documents = packed_documents(args.batch, args.seq_len, args.documents, generator).to(device)
    q, k, v, dout = (t.to(device) for t in (q, k, v, dout))
    bool_mask, block_mask = block_causal(documents), flex_block_causal(documents)
    backward = device.type == "cuda"
    if device.type == "cuda":
        flex = partial(masked, mask=block_mask)  # titan's compiled FlexAttention
    else:
        compiled = torch.compile(flex_attention, backend=args.backend, dynamic=False)
        flex = partial(compiled, block_mask=block_mask, enable_gqa=args.kv_heads != args.heads)
    paths = {"flex": flex, "sdpa": partial(sdpa, attn_mask=bool_mask)}

    def results(fn, inputs, row: int | None = None) -> dict[str, torch.Tensor]:
        """The output (and dq, dk, dv) of fn; of one batch row where `row` is given."""
        if not backward:
            with torch.no_grad():
                return {"out": fn(*inputs)}
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        grad = dout if row is None else dout[row : row + 1]
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        return dict(zip(TENSORS, (out, *grads), strict=True))

    # float64 SDPA runs the math kernel, which materializes the scores: one row at a time
    rows = [
        results(partial(sdpa, attn_mask=bool_mask[b : b + 1]), (q[b : b + 1], k[b : b + 1], v[b : b + 1]), b)
        for b in range(args.batch)
    ]
    reference = {t: torch.cat([r[t] for r in rows]) for t in rows[0]}
    del rows
    dtype = DTYPES[dtype_name]
    inputs = [t.to(dtype) for t in (q, k, v)]
    got = {name: results(fn, inputs) for name, fn in paths.items()}
    row: dict = {"dtype": dtype_name, "backward": backward}
    for tensor in got["flex"]:
        flex_err = (got["flex"][tensor].double() - reference[tensor]).abs().max().item()
        sdpa_err = (got["sdpa"][tensor].double() - reference[tensor]).abs().max().item()
        diff = (got["flex"][tensor].double() - got["sdpa"][tensor].double()).abs().max().item()
        row[tensor] = {
            "flex_vs_sdpa": diff,
            "flex_err": flex_err,
            "sdpa_err": sdpa_err,
            "ok": flex_err <= 2 * sdpa_err + FLOOR[dtype_name],
        }
    row["ok"] = all(row[t]["ok"] for t in got["flex"])
    del got, reference
    grad = dout.to(dtype)
    for name, fn in paths.items():
        if backward:
            leaves = [t.detach().requires_grad_() for t in inputs]
            row[f"{name}_forward_ms"] = timed(lambda fn=fn, leaves=leaves: fn(*leaves), args.iters, device)
            row[f"{name}_forward_backward_ms"] = timed(
                lambda fn=fn, leaves=leaves: torch.autograd.grad(fn(*leaves), leaves, grad),
                args.iters,
                device,
            )
        else:
            with torch.no_grad():
                row[f"{name}_forward_ms"] = timed(lambda fn=fn: fn(*inputs), args.iters, device)
    return row


def table(rows: list[dict], shape: str) -> str:
    """Markdown: per dtype and tensor, |flex - sdpa| and each one's error against float64, and the times."""
    lines = [
        f"{shape}; error: max abs difference from float64 SDPA; pass: flex error <= 2 x SDPA error + "
        + ", ".join(f"{v:g} ({k})" for k, v in FLOOR.items()),
        "",
        "| dtype | tensor | max abs flex - sdpa | flex error | SDPA error | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | error: {r['error']} | | | | no |")
            continue
        for t in TENSORS:
            if t in r:
                d = r[t]
                ok = "yes" if d["ok"] else "**no**"
                lines.append(
                    f"| {r['dtype']} | {t} | {d['flex_vs_sdpa']:.2e} | {d['flex_err']:.2e} | {d['sdpa_err']:.2e} | {ok} |"
                )
    lines += [
        "",
        "| dtype | flex fwd ms | SDPA fwd ms | flex fwd+bwd ms | SDPA fwd+bwd ms | wall s, compiles included |",
        "|---|---|---|---|---|---|",
    ]

    def ms(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "-"

    for r in rows:
        if "error" not in r:
            cells = [
                ms(r, f"{p}_{k}") for k in ("forward_ms", "forward_backward_ms") for p in ("flex", "sdpa")
            ]
            wall = r.get("seconds", "-")
            lines.append(f"| {r['dtype']} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Llama 3.2 1B's attention (32 query heads, 8 kv heads, head_dim 64) on the throughput rows' 4096 tokens
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--documents", type=int, default=6, help="documents per row")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend on CPU")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = (
        f"{device.type}: batch {args.batch} x {args.seq_len} tokens, {args.documents} documents a row, "
        f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}"
    )
    rows = []
    for dtype_name in args.dtypes:  # each written as soon as it is done: a timeout keeps the earlier ones
        start = time.perf_counter()
        try:
            rows.append(run(args, dtype_name, device))
            rows[-1]["seconds"] = round(time.perf_counter() - start, 1)  # compiles included
        except Exception as e:  # noqa: BLE001 - the table says which dtype failed and why
            rows.append({"dtype": dtype_name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps({"shape": shape, "rows": rows}, indent=1))
        if args.markdown:
            args.markdown.write_text(table(rows, shape) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, shape))
    if not all(r.get("ok") for r in rows):
        raise SystemExit("flex_vs_sdpa_mask: FlexAttention is outside its tolerance or failed")


if __name__ == "__main__":
    main()
