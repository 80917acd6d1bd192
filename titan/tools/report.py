"""The table of runs under a folder, and a PNG of their losses (see titan.launch.report).

python -m titan.tools.report runs/sweeps/lr_scan                      # aligned table + report.png
python -m titan.tools.report runs --sort best_loss --format markdown   # or csv; --desc; --no-plot
"""

import argparse
import sys
from pathlib import Path

from titan.launch.report import COLUMNS, plot, render, report, sort_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run.root, a sweep directory or one run directory")
    parser.add_argument("--sort", default="run", choices=COLUMNS, help="column to sort by (default: run)")
    parser.add_argument("--desc", action="store_true", help="sort descending")
    parser.add_argument("--format", default="table", choices=("table", "markdown", "csv"))
    parser.add_argument("--plot", type=Path, help="where to write the PNG (default: <path>/report.png)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        parser.error(f"{args.path} is not a directory")
    rows = sort_rows(report(args.path), args.sort, args.desc)
    if not rows:
        print(
            f"no runs under {args.path} (a run directory holds config.yaml or events.jsonl)", file=sys.stderr
        )
        return 1
    sys.stdout.write(render(rows, args.format))
    if not args.no_plot:
        path = args.plot or args.path / "report.png"
        plot(rows, path)
        print(f"loss curves: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
