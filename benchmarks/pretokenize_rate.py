"""Pretokenization and reading rates: tokens/s of `titan.data.pretokenize` per worker count, and of the
training loader reading the shards (`data.source=tokens`) against tokenizing the text on the fly.

    python benchmarks/pretokenize_rate.py                    # the bundled shard, repeated 8 times
    python benchmarks/pretokenize_rate.py --repeat 32 --workers 1 2 4 8 --tokenizer /models/llama3/tokenizer.model
"""

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

from titan.assets import asset_path
from titan.config.schema import DataConfig
from titan.data.loader import TrainLoader
from titan.data.pretokenize import pretokenize


def read_rate(data: DataConfig, steps: int, batch: int, seq_len: int) -> float:
    loader = TrainLoader(data, seq_len=seq_len, global_batch_size=batch, dp_rank=0, dp_degree=1)
    start = time.perf_counter()
    for _ in itertools.islice(iter(loader), steps):
        pass
    loader.close()
    return steps * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=8, help="copies of the bundled shard to tokenize")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default=str(asset_path("tokenizers/titan_debug.tiktoken")))
    parser.add_argument("--steps", type=int, default=200, help="loader steps timed for the read rate")
    args = parser.parse_args()
    print(
        f"{platform.node()}: {platform.processor() or platform.machine()}, tokenizer {Path(args.tokenizer).name}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "text.jsonl"
        source.write_bytes(asset_path("c4_test/c4-train.00000-of-00001.json").read_bytes() * args.repeat)
        text = DataConfig(source="jsonl", path=str(source), tokenizer=args.tokenizer)
        print("| what | workers | tokens | seconds | tokens/s |")
        print("|---|---|---|---|---|")
        folder = None
        for workers in args.workers:
            out = Path(tmp) / f"tokens-{workers}"
            start = time.perf_counter()
            folder = pretokenize(text, out, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            tokens = json.loads((out / "index.json").read_text())["tokens"]
            print(f"| pretokenize | {workers} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} |")
        tokens_data = DataConfig(source="tokens", path=str(folder), tokenizer=args.tokenizer)
        for name, data in (
            ("loader, text tokenized on the fly", text),
            ("loader, data.source=tokens", tokens_data),
        ):
            rate = read_rate(data, args.steps, batch=8, seq_len=2048)
            print(f"| {name} | 0 | {args.steps * 8 * 2048:,} | | {rate:,.0f} |")


if __name__ == "__main__":
    main()
