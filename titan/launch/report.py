"""A table of the runs under a folder (a run.root, a sweep dir, one run dir) and a PNG of their losses.

  python -m titan.tools.report runs/sweeps/lr_scan                      # aligned table + report.png
  python -m titan.tools.report runs --sort best_loss --format markdown   # or csv; --desc; --no-plot

One row per run directory: its overrides, state (pending, running, requeued, done, failed, cancelled;
`incomplete`: stopped without a result that says why), attempts, steps done, last and best loss, mean
tokens/s over all devices and MFU (% of the device's bf16 peak; empty on CPU), Slurm job id, and why
it failed or stopped. It reads each run's metrics.jsonl and events.jsonl and asks Slurm (squeue, sacct)
about live jobs, so it works while jobs run; a torn last line is skipped.
"""

import csv
import io
import json
import math
import os
from pathlib import Path

import yaml

from titan.launch import jobstate

COLUMNS = (
    "run",
    "overrides",
    "state",
    "attempts",
    "steps",
    "last_loss",
    "best_loss",
    "val_loss",
    "tokens_per_s",
    "mfu",
    "job",
    "reason",
)
# Overrides that say where a run lives, not what it is.
HIDDEN_OVERRIDES = ("run.root=", "run.name=", "hydra.")


def find_runs(root: Path) -> list[Path]:
    """Run directories under root (root itself if it is one); their own subfolders are not searched."""
    runs = []
    for folder, subdirs, files in os.walk(root):
        if "config.yaml" in files or "events.jsonl" in files:
            runs.append(Path(folder))
            subdirs.clear()
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(runs)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written now
            continue
    return records


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(run_dir: Path, root: Path, slurm: dict[str, str]) -> dict:
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    total = (config.get("training") or {}).get("steps")
    overrides_file = run_dir / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    records = read_metrics(run_dir)
    losses = [
        r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    last_step = records[-1]["step"] if records else 0
    # validation writes records of its own (val_loss), between the training ones
    train = [r for r in records if "loss" in r]
    validated = [r for r in records if "val_loss" in r]
    # Step 1 includes start-up: leave it out of the throughput when there is more.
    timed = [r for r in records if r["step"] > 1] or records
    state = jobstate.run_state(run_dir, slurm, complete=bool(total) and last_step >= total)
    return {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "overrides": [o for o in overrides if not o.startswith(HIDDEN_OVERRIDES)],
        "state": state.state,
        "attempts": state.attempts,
        "steps": last_step,
        "total_steps": total,
        "last_loss": train[-1]["loss"] if train else None,
        "val_loss": validated[-1]["val_loss"] if validated else None,
        "best_loss": min(losses) if losses else None,
        "tokens_per_s": _mean(
            [r["global_tokens_per_second"] for r in timed if "global_tokens_per_second" in r]
        ),
        "mfu": _mean([r["mfu"] for r in timed if r.get("mfu") is not None]),
        "job": state.job_id,
        "reason": state.reason,
        "losses": [(r["step"], r["loss"]) for r in records if "loss" in r],
        # The points a log line printed (throughput and all): marked on the curve of every step's loss.
        "logged": [(r["step"], r["loss"]) for r in records if "loss" in r and "tokens_per_second" in r],
        "val_losses": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
    }


def report(root: Path) -> list[dict]:
    runs = find_runs(root)
    jobs = [jobstate.current_job(jobstate.read(r)) for r in runs]
    slurm = jobstate.slurm_states([j for j in jobs if j])
    return [summarize(r, root, slurm) for r in runs]


def sort_rows(rows: list[dict], key: str, descending: bool = False) -> list[dict]:
    """Numbers numerically, text alphabetically; empty cells last either way."""
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    return sorted(present, key=lambda r: r[key], reverse=descending) + missing


def cell(row: dict, column: str, exact: bool = False) -> str:
    """Rounded for reading; `exact` (CSV) keeps every digit."""
    value = row.get(column)
    if value is None:
        return ""
    if exact:
        return str(value)
    if column == "steps":
        return f"{value}/{row['total_steps']}" if row.get("total_steps") else str(value)
    if column in ("last_loss", "best_loss", "val_loss"):
        return f"{value:.4f}"
    if column == "tokens_per_s":
        return f"{value:,.0f}"
    if column == "mfu":
        return f"{value:.1f}"
    return str(value)


def common_overrides(rows: list[dict]) -> list[str]:
    """Overrides every run shares (listed once above a table, so the column shows what differs)."""
    if len(rows) < 2:
        return []
    return [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows[1:])]


def render(rows: list[dict], fmt: str) -> str:
    """A table (aligned text or markdown: the overrides that differ, the shared ones above) or CSV (all)."""
    common = common_overrides(rows) if fmt != "csv" else []
    rows = [{**r, "overrides": " ".join(o for o in r["overrides"] if o not in common)} for r in rows]
    table = [[cell(r, c, exact=fmt == "csv") for c in COLUMNS] for r in rows]
    head = f"common overrides: {' '.join(common)}\n\n" if common else ""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(table)
        return out.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in table]
        return head + "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    return head + "\n".join(lines) + "\n"


def swept(rows: list[dict]) -> dict[str, list[str]]:
    """The override keys whose values differ between the runs, with their values in order of first use."""
    values: dict[str, list[str]] = {}
    for r in rows:
        for o in r["overrides"]:
            key, _, value = o.lstrip("+~").partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    keys = {k for k, v in values.items() if len(v) > 1 or any(k not in _keys(r) for r in rows)}
    return {k: _sorted_values(values[k]) for k in values if k in keys}


def _keys(row: dict) -> set[str]:
    return {o.lstrip("+~").partition("=")[0] for o in row["overrides"]}


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _sorted_values(values: list[str]) -> list[str]:
    numbers = [_number(v) for v in values]
    return [v for _, v in sorted(zip(numbers, values))] if None not in numbers else values


def _value(row: dict, key: str) -> str | None:
    return next(
        (o.partition("=")[2] for o in row["overrides"] if o.lstrip("+~").partition("=")[0] == key), None
    )


def _final(row: dict) -> float | None:
    return row["losses"][-1][1] if row["losses"] else None


def _draw_curves(ax, rows: list[dict], common: list[str]) -> None:
    for r in rows:
        if not r["losses"]:
            continue
        steps, losses = zip(*r["losses"])
        label = " ".join(o for o in r["overrides"] if o not in common) or r["run"]
        (line,) = ax.plot(steps, losses, linewidth=1, label=f"{label[:80]} [{r['state']}]")
        if r["logged"]:
            ax.plot(*zip(*r["logged"]), "o", markersize=3, color=line.get_color())
        if r["val_losses"]:
            ax.plot(
                *zip(*r["val_losses"]),
                "s--",
                markersize=4,
                color=line.get_color(),
                label=f"{label[:60]} (validation)",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def _draw_sweep(ax, rows: list[dict], keys: dict[str, list[str]]) -> None:
    """1 swept key: final and best loss against its values; 2: a heatmap of the best loss."""
    names = list(keys)
    if len(names) == 1:
        (key,) = names
        values = keys[key]
        numeric = all(_number(v) is not None for v in values)
        x = [_number(v) for v in values] if numeric else list(range(len(values)))
        by_value = {_value(r, key): r for r in rows}
        for label, of in (("final loss", _final), ("best loss", lambda r: r["best_loss"])):
            y = [
                of(by_value[v]) if v in by_value and of(by_value[v]) is not None else float("nan")
                for v in values
            ]
            ax.plot(x, y, "o-", label=label)
        if numeric and min(x) > 0 and max(x) / min(x) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(x, values, rotation=30, fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return
    rows_key, cols_key = names
    grid = [[float("nan")] * len(keys[cols_key]) for _ in keys[rows_key]]
    for r in rows:
        i, j = _value(r, rows_key), _value(r, cols_key)
        if i in keys[rows_key] and j in keys[cols_key] and r["best_loss"] is not None:
            grid[keys[rows_key].index(i)][keys[cols_key].index(j)] = r["best_loss"]
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(keys[cols_key])), keys[cols_key], fontsize=7)
    ax.set_yticks(range(len(keys[rows_key])), keys[rows_key], fontsize=7)
    ax.set_xlabel(cols_key)
    ax.set_ylabel(rows_key)
    ax.figure.colorbar(image, ax=ax, label="best loss")


def plot(rows: list[dict], path: Path):
    """Every run's loss at every step (markers at the logged points, validation dashed), titled with the
    overrides all runs share; beside it, for a sweep of one or two keys, the losses against the swept
    values (a line, or a heatmap of the best loss). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node
    import matplotlib.pyplot as plt

    common = common_overrides(rows)
    keys = swept(rows) if len(rows) > 1 else {}
    panels = 2 if 1 <= len(keys) <= 2 else 1
    fig, axes = plt.subplots(1, panels, figsize=(10 + 6 * (panels - 1), 6), squeeze=False)
    _draw_curves(axes[0][0], rows, common)
    if panels == 2:
        _draw_sweep(axes[0][1], rows, keys)
    fig.suptitle(" ".join(common) or (rows[0]["run"] if len(rows) == 1 else "runs"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
