"""The report tool on run directories made here (the Slurm sweep test runs it on real jobs)."""

import csv
import io
import json

import pytest
import yaml

from titan.launch import jobstate, report
from titan.tools import report as report_tool


def make_run(folder, overrides, losses, *, steps, tokens=1000.0, events=()):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"training": {"steps": steps}}))
    (folder / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"run.root={folder.parent}"]))
    lines = [
        json.dumps({"step": i + 1, "loss": loss, "global_tokens_per_second": tokens * (i + 1)})
        for i, loss in enumerate(losses)
    ]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')  # a line being written
    for event, fields in events:
        jobstate.record(folder, event, **fields)


@pytest.fixture
def sweep(tmp_path):
    make_run(tmp_path / "a", ["optimizer.lr=1e-3", "training.seq_len=32"], [3.0, 2.0, 2.5], steps=3)
    make_run(tmp_path / "b", ["optimizer.lr=3e-3", "training.seq_len=32"], [3.0, 1.5], steps=4, tokens=10.0)
    failed = [("submitted", {"job_id": "41"}), ("started", {}), ("failed", {"reason": "OOM"})]
    make_run(tmp_path / "c", ["optimizer.lr=1e-2", "training.seq_len=32"], [9.0], steps=3, events=failed)
    return tmp_path


def test_rows_hold_the_metrics_and_states(sweep):
    rows = {r["run"]: r for r in report.report(sweep)}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["state"], a["steps"], a["last_loss"], a["best_loss"]) == ("done", 3, 2.5, 2.0)
    assert a["tokens_per_s"] == pytest.approx((2000 + 3000) / 2)  # step 1 (start-up) left out
    assert (b["state"], b["steps"], b["best_loss"], b["total_steps"]) == ("incomplete", 2, 1.5, 4)
    assert (c["state"], c["attempts"], c["job"], c["reason"]) == ("failed", 1, "41", "OOM")
    assert a["mfu"] is None and a["overrides"] == ["optimizer.lr=1e-3", "training.seq_len=32"]


def test_sorting_and_formats(sweep):
    rows = report.sort_rows(report.report(sweep), "best_loss")
    assert [r["run"] for r in rows] == ["b", "a", "c"]
    assert [r["run"] for r in report.sort_rows(rows, "best_loss", descending=True)] == ["c", "a", "b"]
    table = report.render(rows, "table")
    assert table.startswith("common overrides: training.seq_len=32\n")
    assert "optimizer.lr=3e-3" in table and "2/4" in table and "OOM" in table
    markdown = report.render(rows, "markdown").splitlines()
    assert markdown[2].startswith("| run | overrides | state |") and markdown[4].startswith(
        "| b | optimizer.lr=3e-3 |"
    )
    parsed = list(csv.DictReader(io.StringIO(report.render(rows, "csv"))))
    assert [p["run"] for p in parsed] == ["b", "a", "c"] and parsed[0]["best_loss"] == "1.5"
    assert parsed[0]["overrides"] == "optimizer.lr=3e-3 training.seq_len=32"  # CSV: every override
    assert parsed[0]["steps"] == "2" and parsed[1]["tokens_per_s"] == "2500.0"  # CSV: exact values


def test_cli_writes_the_table_and_one_curve_per_run(sweep, capsys):
    assert report_tool.main([str(sweep), "--sort", "last_loss", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.index("| b |") < out.index("| a |") < out.index("| c |")
    assert (sweep / "report.png").stat().st_size > 10_000
    fig = report.plot(report.report(sweep), sweep / "again.png")
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [3, 2, 1]
    (sweep / "empty").mkdir()
    assert report_tool.main([str(sweep / "empty"), "--no-plot"]) == 1
