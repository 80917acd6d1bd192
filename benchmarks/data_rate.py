"""Bytes of text per second that one loader worker turns into packed windows (read, tokenize, pack).

    python benchmarks/data_rate.py                         # the bundled C4 shard and debug tokenizer
    python benchmarks/data_rate.py --seq-len 8192 --batch 2 --seconds 20

It runs the loop body of one DataLoader worker (titan.data.loader._RankStreams, in this process) on
one rank's streams and counts the UTF-8 bytes of the documents it read. A worker must keep up with
the GPU with room to spare: the target is 20 x 4 bytes (a Llama 3 token is ~4 bytes of English
text) x the tokens/s of one device, default the 1 B run on an H200 (~55,700 tokens/s, PLATFORM.md).
"""

import argparse
import time

from titan.assets import asset_path
from titan.config.schema import DataConfig
from titan.data.checks import checked_files
from titan.data.loader import _RankStreams, stream_key
from titan.data.records import LocalFiles
from titan.data.stream_state import StreamState
from titan.data.tokenizer import build_tokenizer

HEADROOM = 20  # a worker makes 20x what the device eats: slow documents and several workers' jitter
BYTES_PER_TOKEN = 4  # English text per Llama 3 token


def measure(data: DataConfig, seq_len: int, batch: int, seconds: float) -> dict:
    """One worker's rate over `seconds` of steps (each step: `batch` windows of seq_len + 1 tokens)."""
    files = LocalFiles(data, checked_files(data), cache_size=batch + 2)
    text_bytes = 0
    read_text = files.text

    def counted_text(f: int, record: int):
        nonlocal text_bytes
        text = read_text(f, record)
        if isinstance(text, str):
            text_bytes += len(text.encode("utf-8"))
        return text

    files.text = counted_text
    states = {stream_key(j): StreamState(batch).to_dict() for j in range(batch)}
    tokenizer = build_tokenizer(data.tokenizer)
    items = iter(_RankStreams(data, seq_len + 1, list(range(batch)), batch, states, files, tokenizer))
    next(items)  # the line index of the file is built on first read: not part of the steady rate
    text_bytes, steps, start = 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(items)
        steps += 1
    tokens = steps * batch * (seq_len + 1)
    return {
        "bytes_per_second": text_bytes / elapsed,
        "tokens_per_second": tokens / elapsed,
        "bytes_per_token": text_bytes / tokens,
        "steps": steps,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", default=str(asset_path("c4_test/c4-train.00000-of-00001.json")))
    parser.add_argument("--tokenizer", default=str(asset_path("tokenizers/titan_debug.tiktoken")))
    parser.add_argument("--seq-len", type=int, default=4096, help="the 1 B run's shape: 4 x 4096")
    parser.add_argument("--batch", type=int, default=4, help="sequences (streams) this worker makes per step")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--device-tokens-per-second", type=float, default=55_700, help="the 1 B H200 reference"
    )
    args = parser.parse_args()
    data = DataConfig(source="jsonl", path=args.path, tokenizer=args.tokenizer)
    r = measure(data, args.seq_len, args.batch, args.seconds)
    target = HEADROOM * BYTES_PER_TOKEN * args.device_tokens_per_second
    print("| measure | value |\n|---|---|")
    print(f"| text bytes/s per worker | {r['bytes_per_second'] / 1e6:.2f} MB/s |")
    print(f"| tokens/s per worker | {r['tokens_per_second']:,.0f} |")
    print(f"| bytes per token (this tokenizer) | {r['bytes_per_token']:.2f} |")
    print(f"| steps of {args.batch} x {args.seq_len + 1} tokens | {r['steps']} in {r['seconds']:.1f} s |")
    print(
        f"| target: {HEADROOM} x {BYTES_PER_TOKEN} B x {args.device_tokens_per_second:,.0f} tokens/s "
        f"| {target / 1e6:.2f} MB/s |"
    )
    ratio = r["bytes_per_second"] / target
    print(f"| rate / target | {ratio:.2f} ({'met' if ratio >= 1 else 'NOT met'}) |")


if __name__ == "__main__":
    main()
