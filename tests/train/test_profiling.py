"""Profiling: the chosen window of steps, traced per rank with CPU ops and memory events."""

import json

import torch

from titan.config.schema import ProfilingConfig
from titan.train.profiling import StepProfiler


def _train(profiler: StepProfiler, steps: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        with torch.profiler.record_function(f"train_step_{step}"):
            loss = model(torch.randn(16, 32)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        profiler.step(step)
    profiler.close()


def test_the_window_is_traced_with_ops_and_memory(tmp_path):
    cfg = ProfilingConfig(enable=True, wait=2, warmup=1, active=2, repeat=1)
    _train(StepProfiler(cfg, tmp_path, rank=1, device=torch.device("cpu")), steps=8)
    (trace_file,) = (tmp_path / "profile" / "rank-1").glob("rank1.*.pt.trace.json")
    events = json.loads(trace_file.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # Steps 4 and 5 (after 2 waited and 1 warm-up), and no other.
    assert {n for n in names if n and n.startswith("train_step_")} == {"train_step_4", "train_step_5"}
    assert "aten::addmm" in names and "aten::mm" in names  # forward and backward matmuls
    memory = [e for e in events if e.get("name") == "[memory]"]
    assert memory and any(e["args"]["Bytes"] > 0 for e in memory)  # allocations, with sizes


def test_off_writes_nothing(tmp_path):
    _train(StepProfiler(ProfilingConfig(), tmp_path, rank=0, device=torch.device("cpu")), steps=3)
    assert not (tmp_path / "profile").exists()


def test_memory_snapshots_need_cuda(tmp_path, caplog):
    cfg = ProfilingConfig(memory_snapshot_steps=(1,), snapshot_on_oom=True)
    with caplog.at_level("INFO", logger="titan"):
        profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cpu"))
    profiler.step(1)
    profiler.on_error(torch.OutOfMemoryError("test"))
    profiler.close()
    assert "memory snapshots are of the CUDA allocator" in caplog.text
    assert not (tmp_path / "profile").exists()
