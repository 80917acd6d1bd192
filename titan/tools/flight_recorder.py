"""Read the Flight Recorder dumps of a run that timed out in a collective: per process group, each
rank's last collective and the ranks that never enqueued the one the others wait in; the last line
names the rank that went on without a collective (skipped it), where the other waits began.

    python -m titan.tools.flight_recorder runs/llama3_8b/<run>/flight_recorder

NCCL dumps (written by torch's watchdog) are also read by torch's own analyser,
`python -m torch.distributed.flight_recorder.fr_trace <folder>`; gloo dumps only by this tool.
"""

import argparse
import sys
from pathlib import Path

from titan.distributed.flight_recorder import summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titan.tools.flight_recorder", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder", type=Path, help="the dump folder, <run dir>/flight_recorder")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a directory")
    print(summarize(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
