"""SIGKILL a rank in the middle of a save, relaunch: the run resumes from the previous complete
checkpoint and continues exactly as the uninterrupted run (nothing of the interrupted save is used)."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.checkpoint.common import RESUME_AT, STEPS, launch, names, resume_config
from tests.utils import read_metrics

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "hooks"


def kill_when_paused(marker: Path, killed: list, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)


@pytest.mark.parametrize("mode,rank", [("sync", 0), ("thread", 1)], ids=["sync-rank0", "thread-rank1"])
def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path, monkeypatch, mode, rank):
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    cfg = resume_config(run_dir, mode=mode)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TITAN_TEST_PAUSE_SAVE", f"step-{STEPS}.partial:{rank}")
    monkeypatch.setenv("TITAN_TEST_PAUSE_MARKER", str(marker))
    killed: list[int] = []
    killer = threading.Thread(target=kill_when_paused, args=(marker, killed))
    killer.start()
    with pytest.raises(Exception):  # noqa: B017 -- the launcher reports the killed rank
        launch(cfg, 2)
    killer.join()
    assert killed, "the rank never reached the save"
    checkpoints = run_dir / "checkpoints"
    assert names(checkpoints) == [f"step-{RESUME_AT}", f"step-{STEPS}.partial"]
    uninterrupted = read_metrics(run_dir)  # every step ran before the final save was cut off
    assert [m["step"] for m in uninterrupted] == list(range(1, STEPS + 1))

    monkeypatch.delenv("TITAN_TEST_PAUSE_SAVE")
    launch(cfg, 2)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"skipping incomplete checkpoint {checkpoints / f'step-{STEPS}.partial'}" in log
    assert f"resumed from checkpoint {checkpoints / f'step-{RESUME_AT}'}" in log
    keys = ("step", "loss", "grad_norm", "lr")
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in uninterrupted]
    assert resumed[-1]["loss"] < resumed[RESUME_AT]["loss"]
    assert names(checkpoints) == [f"step-{RESUME_AT}", f"step-{STEPS}"]
