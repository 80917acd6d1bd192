"""Tokenize a data config once into memory-mapped token shards, for `data.source=tokens`.

    python -m titan.tools.pretokenize data=c4_test --out /data/c4_test-tokens
    python -m titan.tools.pretokenize data=jsonl data.path=/data/web/ data.tokenizer=/models/llama3/tokenizer.model \
        --out /data/web-tokens --workers 16
    python launch.py data=tokens data.path=/data/web-tokens data.tokenizer=/models/llama3/tokenizer.model

The overrides are launch.py's, `data.*` ones being those that count. Documents keep the source's order;
the folder's index.json records the tokenizer's SHA-256, so a run given another tokenizer is refused.
"""

import argparse
import os
import sys
from pathlib import Path

from titan.data.pretokenize import pretokenize
from titan.launch.compose import compose_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titan.tools.pretokenize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", help="launch.py overrides naming the data (data=..., data.path=...)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: every CPU)"
    )
    parser.add_argument("--shard-tokens", type=int, help="tokens per shard file (default 2**28)")
    args = parser.parse_args(argv)
    try:
        out = pretokenize(
            compose_run_config(args.overrides).data,
            args.out,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
