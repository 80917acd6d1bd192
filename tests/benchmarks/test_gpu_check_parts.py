"""The pieces of benchmarks/gpu_check.sh that run anywhere: the report of a finished output folder
(skipped parts and the short checks' sections), and FlexAttention against SDPA with the same
block-causal mask on a tiny packed batch (forward only: CPU)."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_shows_skipped_parts_and_the_checks_sections(tmp_path):
    (tmp_path / "parts.tsv").write_text("5-flex-vs-sdpa\t0\t12\n8-profile-oom\tskipped\t0\n")
    (tmp_path / "5-flex-vs-sdpa.txt").write_text("done\n")
    (tmp_path / "5-flex-vs-sdpa.md").write_text("| dtype | tensor |\n|---|---|\n| bfloat16 | dq |\n")
    (tmp_path / "8-profile-oom.txt").write_text("no CUDA: no out-of-memory snapshot\n")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_report.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "| 8-profile-oom | skipped: no CUDA: no out-of-memory snapshot | 0 |" in report
    assert "| 5-flex-vs-sdpa | ok | 12 |" in report
    assert "(5-flex-vs-sdpa)\n\n| dtype | tensor |\n|---|---|\n| bfloat16 | dq |" in report


def test_packed_documents():
    flex_vs_sdpa = load("flex_vs_sdpa_mask")
    documents = flex_vs_sdpa.packed_documents(3, 256, 5, torch.Generator().manual_seed(0))
    assert documents.shape == (3, 256)
    for row in documents:
        lengths = torch.unique_consecutive(row, return_counts=True)[1]
        assert len(lengths) == 5 and lengths.min() >= 16


def test_flex_matches_sdpa_on_cpu_forward():
    flex_vs_sdpa = load("flex_vs_sdpa_mask")
    args = argparse.Namespace(
        batch=2, seq_len=128, heads=4, kv_heads=2, head_dim=16, documents=4, iters=1, backend="eager"
    )
    row = flex_vs_sdpa.run(args, "float32", torch.device("cpu"))
    assert row["ok"] and not row["backward"]
    assert row["out"]["flex_err"] < 1e-5 and row["out"]["flex_vs_sdpa"] < 1e-5
    assert row["flex_forward_ms"] > 0 and row["sdpa_forward_ms"] > 0
    assert "| float32 | out |" in flex_vs_sdpa.table([row], "cpu")
