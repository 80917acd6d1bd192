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


def test_the_plot_marks_logged_points_draws_validation_and_titles_the_common_overrides(tmp_path):
    run_dir = tmp_path / "r"
    make_run(run_dir, ["optimizer.lr=1e-3", "training.steps=4"], [], steps=4)
    records = [  # validation writes records of its own after the step's (MetricsLogger.log_validation)
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.5, "tokens_per_second": 10.0},
        {"step": 2, "val_loss": 2.7, "val_perplexity": 14.9},
        {"step": 3, "loss": 2.2},
        {"step": 4, "loss": 2.0, "tokens_per_second": 10.0},
        {"step": 4, "val_loss": 2.1, "val_perplexity": 8.2},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    make_run(tmp_path / "s", ["optimizer.lr=1e-3", "training.steps=4"], [3.0, 2.9], steps=4)
    rows = {r["run"]: r for r in report.report(tmp_path)}
    assert rows["r"]["last_loss"] == 2.0 and rows["r"]["val_loss"] == 2.1 and rows["s"]["val_loss"] is None
    fig = report.plot(report.report(tmp_path), tmp_path / "p.png")
    (curves,) = fig.axes  # no swept key: no sweep panel
    every, marked, validation = (line for line in curves.get_lines()[:3])
    assert list(every.get_xdata()) == [1, 2, 3, 4] and list(marked.get_xdata()) == [2, 4]
    assert list(validation.get_ydata()) == [2.7, 2.1] and "(validation)" in validation.get_label()
    assert fig._suptitle.get_text() == "optimizer.lr=1e-3 training.steps=4"


def test_a_one_key_sweep_plots_final_and_best_loss_against_the_value(sweep):
    fig = report.plot(report.report(sweep), sweep / "p.png")
    panel = fig.axes[1]
    final, best = panel.get_lines()
    assert list(final.get_xdata()) == [1e-3, 3e-3, 1e-2] and panel.get_xscale() == "log"
    assert list(final.get_ydata()) == [2.5, 1.5, 9.0] and list(best.get_ydata()) == [2.0, 1.5, 9.0]
    assert panel.get_xlabel() == "optimizer.lr"


def test_a_two_key_sweep_is_a_heatmap_of_the_best_loss(tmp_path):
    for lr, best in (("1e-3", 2.0), ("3e-3", 1.5)):
        for batch, offset in (("8", 0.0), ("16", 0.25)):
            make_run(
                tmp_path / f"{lr}-{batch}",
                [f"optimizer.lr={lr}", f"training.global_batch_size={batch}"],
                [3.0, best + offset],
                steps=2,
            )
    fig = report.plot(report.report(tmp_path), tmp_path / "p.png")
    heatmap = fig.axes[1].get_images()[0].get_array()
    assert heatmap.tolist() == [[2.0, 2.25], [1.5, 1.75]]  # rows: lr 1e-3, 3e-3; columns: batch 8, 16
    assert (
        fig.axes[1].get_ylabel() == "optimizer.lr"
        and fig.axes[1].get_xlabel() == "training.global_batch_size"
    )
