"""CUDA profiling: a trace with CUDA kernels, an allocator snapshot at a chosen step, and one left by a
provoked out-of-memory error, each a pickle that https://pytorch.org/memory_viz reads."""

import json
import pickle

import pytest
import torch

from titan.config.schema import ProfilingConfig
from titan.train.profiling import StepProfiler

pytestmark = pytest.mark.cuda


def test_cuda_trace_and_snapshots(tmp_path):
    cfg = ProfilingConfig(
        enable=True, wait=0, warmup=1, active=1, memory_snapshot_steps=(2,), snapshot_on_oom=True
    )
    profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cuda"))
    x = torch.randn(1024, 1024, device="cuda")
    for step in (1, 2, 3):
        (x @ x).sum().item()
        profiler.step(step)
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: more than any card
    except torch.OutOfMemoryError as e:
        profiler.on_error(e)
    profiler.close()
    (trace,) = (tmp_path / "profile" / "rank-0").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # CUDA activity
    for name in ("rank-0-step-2.pickle", "rank-0-oom.pickle"):
        snapshot = pickle.loads((tmp_path / "profile" / "memory" / name).read_bytes())
        assert snapshot["segments"] and "device_traces" in snapshot
