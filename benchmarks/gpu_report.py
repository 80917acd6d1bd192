"""The markdown report of a benchmarks/gpu_check.sh output folder: its parts, the throughput rows,
the Float8 loss gap and the sections the short checks wrote (`<part>.md`), from the files the parts
left there (whatever finished).

    python benchmarks/gpu_report.py <output folder>          # prints it and writes <folder>/report.md
"""

import argparse
import json
import sys
from pathlib import Path

from float8_vs_bf16 import table as loss_gap_table
from train_throughput import table as throughput_table

# what an exit status from `timeout` or pytest means
EXIT_MEANING = {0: "ok", 5: "no tests collected", 124: "timeout", 137: "killed after the timeout"}
# the short checks' own markdown, in the order they ran: part -> heading
SECTIONS = {
    "5-flex-vs-sdpa": "FlexAttention (BlockMask) against SDPA (boolean mask), packed documents",
    "6-estimate": "Memory: the dry-run estimate against real steps",
    "7-profile-window": "Profiler window and memory snapshot of a real run",
    "8-profile-oom": "A provoked out-of-memory error and its snapshot",
}


def parts_table(folder: Path) -> str:
    lines = ["| part | result | seconds | log |", "|---|---|---|---|"]
    for line in (folder / "parts.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        result = "skipped" if rc == "skipped" else EXIT_MEANING.get(int(rc), f"failed (exit {rc})")
        log = folder / f"{name}.txt"
        last = [t for t in log.read_text(errors="replace").splitlines() if t.strip()] if log.exists() else []
        if last and rc != "0":  # the line that says why
            result += ": " + last[-1].replace("|", "/")[:160]
        lines.append(f"| {name} | {result} | {seconds} | {log.name} |")
    return "\n".join(lines)


def report(folder: Path) -> str:
    sections = [f"# gpu_check: {folder}", ""]
    if (folder / "machine.txt").exists():
        sections += ["```", (folder / "machine.txt").read_text().strip(), "```", ""]
    sections += ["## Parts", "", parts_table(folder), ""]
    # in the order the rows ran
    ran = [line.split("\t")[0] for line in (folder / "parts.tsv").read_text().splitlines()]
    row_files = [folder / f"{name}.json" for name in ran if name.startswith("2-")]
    rows = [r for path in row_files if path.exists() for r in json.loads(path.read_text())]
    if rows:
        sections += ["## Throughput", "", throughput_table(rows), ""]
        sections += [f"- {r['row']}: `{' '.join(r['overrides'])}`" for r in rows] + [""]
    gap_file = folder / "3-float8-vs-bf16.json"
    if gap_file.exists():
        runs = json.loads(gap_file.read_text())  # run name (bf16, a recipe) -> {step: loss} or why it failed
        sections += ["## Float8 against bf16, same seed and data", ""]
        failed = [f"{name}: {r}" for name, r in runs.items() if isinstance(r, str)]
        if failed:
            sections.append("failed: " + "; ".join(failed))
        else:
            curves = {name: {int(s): loss for s, loss in r.items()} for name, r in runs.items()}
            tables = [loss_gap_table(curves["bf16"], curves[name], name) for name in curves if name != "bf16"]
            sections.append("\n\n".join(tables))
        sections.append("")
    for name in ran:
        markdown = folder / f"{name}.md"
        if name in SECTIONS and markdown.exists():
            sections += [f"## {SECTIONS[name]} ({name})", "", markdown.read_text().strip(), ""]
    return "\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if not (args.folder / "parts.tsv").exists():
        sys.exit(f"{args.folder} has no parts.tsv: give the output folder of benchmarks/gpu_check.sh")
    text = report(args.folder)
    (args.folder / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
