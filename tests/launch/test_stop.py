"""launch.py stopped by a signal, or ended by a rank's error, as a user sees it: a subprocess per run,
signalled the way a terminal (Ctrl-C: SIGINT to the whole foreground process group) or `kill` does."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.test_launch import REPO, SMALL, launch, metrics
from titan.assets import asset_path
from titan.checkpoint.format import complete_steps
from titan.launch import jobstate

pytestmark = pytest.mark.slow
ONE_RANK = ["parallelism=single", "cluster.nproc_per_node=1"]
TWO_RANKS = ["cluster.nproc_per_node=2"]  # the default layout: FSDP over 2 ranks
# Long enough never to finish here; every step logged, and no checkpoint but the stop's own.
FOREVER = ["training.steps=100000", "metrics.log_freq=1", "checkpoint.interval=50000"]
LONG = [*SMALL, *FOREVER]
# Seconds from the signal to the exit: the elastic agent's teardown would take 30. A stop takes ~4 s on a
# quiet machine; 25 leaves room for a suite running 4- and 8-rank tests beside it (once measured 20+).
PROMPT = 25


def start(*args: str, root: Path) -> subprocess.Popen:
    """launch.py in a session of its own: its process group is the terminal's foreground group. Its
    stderr goes to a file, read while it runs."""
    with open(f"{root}.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "launch.py", *args, f"run.root={root}"],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    proc.stderr_path = Path(err.name)
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    return proc.stderr_path.read_text()


def run_dir(root: Path) -> Path:
    (found,) = root.glob("llama3_debug/*")
    return found


def wait_for_steps(proc: subprocess.Popen, root: Path, steps: int, timeout: float = 240) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, stderr_of(proc)
        found = list(root.glob("llama3_debug/*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= steps:
            return found[0].parent
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"no {steps} steps in {timeout} s")


def send(proc: subprocess.Popen, sig: int, to: str) -> None:
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)


def finish(proc: subprocess.Popen, timeout: float = PROMPT) -> tuple[int, str, float]:
    """Exit status, stderr and seconds to the exit; no process of the launch may outlive it."""
    start = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    seconds = time.monotonic() - start
    end = time.monotonic() + 10
    while group_alive(proc) and time.monotonic() < end:
        time.sleep(0.1)
    if group_alive(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a rank outlived its launcher")
    return proc.returncode, stderr_of(proc), seconds


def group_alive(proc: subprocess.Popen) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "ranks, sig, to",
    [
        (ONE_RANK, signal.SIGTERM, "launcher"),
        (ONE_RANK, signal.SIGINT, "group"),
        (TWO_RANKS, signal.SIGTERM, "launcher"),
        (TWO_RANKS, signal.SIGINT, "group"),
        (TWO_RANKS, signal.SIGINT, "launcher"),
    ],
    ids=["1-TERM-launcher", "1-INT-group", "2-TERM-launcher", "2-INT-group", "2-INT-launcher"],
)
def test_a_stop_saves_at_one_step_and_exits_at_once(tmp_path, ranks, sig, to):
    proc = start(*ranks, *LONG, root=tmp_path)
    run = wait_for_steps(proc, tmp_path, 3)
    send(proc, sig, to)
    status, stderr, seconds = finish(proc)

    name = sig.name
    step = metrics(run)[-1]["step"]
    saved = run / "checkpoints" / f"step-{step}"
    assert (status, seconds < PROMPT) == (128 + sig, True)
    assert last_line(stderr) == f"stopped at step {step} on {name}: saved {saved}; the same command resumes"
    assert complete_steps(run / "checkpoints") == [step]
    events = jobstate.read(run)
    assert [e["event"] for e in events] == ["started", "stopped"]
    assert (events[-1]["step"], events[-1]["signal"], events[-1]["checkpoint"]) == (step, name, str(saved))
    for rank in range(len(list((run / "logs").glob("rank*.log")))):  # every rank stopped after that step
        assert f"stopping at step {step} on {name}" in (run / "logs" / f"rank{rank}.log").read_text()
    assert jobstate.run_state(run).state == "cancelled"


@pytest.mark.parametrize("ranks", [ONE_RANK, TWO_RANKS], ids=["1", "2"])
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, ranks):
    # The default debug model's steps, slow enough for the second Ctrl-C to come within the step.
    proc = start(*ranks, *FOREVER, "training.seq_len=256", root=tmp_path)
    run = wait_for_steps(proc, tmp_path, 2)
    os.killpg(proc.pid, signal.SIGINT)
    while "Ctrl-C again" not in stderr_of(proc):  # the first one was taken
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    status, stderr, _ = finish(proc)

    assert status == 130
    assert last_line(stderr) == "stopped at once on SIGINT, without saving; no checkpoint yet"
    assert complete_steps(run / "checkpoints") == []
    stop = jobstate.read(run)[-1]
    assert (stop["event"], stop["signal"], stop["at_once"]) == ("stopped", "SIGINT", True)


def test_a_second_launch_into_a_running_run_dir_is_refused(tmp_path):
    first = start(*ONE_RANK, *LONG, root=tmp_path)
    run = wait_for_steps(first, tmp_path, 2)
    second = launch(*ONE_RANK, *LONG, root=tmp_path, check=False)
    assert second.returncode == 2
    assert re.fullmatch(
        rf"error: {re.escape(str(run))} is in use by another launch \(pid {first.pid} on .*\); wait .*",
        second.stderr.strip(),
    ), second.stderr
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 128 + signal.SIGTERM
    assert [e["event"] for e in jobstate.read(run)] == ["started", "stopped"]  # the refused one left none


def test_a_killed_launcher_takes_its_ranks_and_leaves_no_lock(tmp_path):
    proc = start(*TWO_RANKS, *LONG, root=tmp_path)
    run = wait_for_steps(proc, tmp_path, 2)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved
    finish(proc)  # and no rank is left training
    again = start(*TWO_RANKS, *LONG, root=tmp_path)
    wait_for_steps(again, tmp_path, len(metrics(run)) + 1)
    again.send_signal(signal.SIGTERM)
    assert finish(again)[0] == 128 + signal.SIGTERM


def bad_jsonl(path: Path) -> Path:
    """Short documents (the streams reach line 40 within a few steps), line 40 not JSON."""
    lines = asset_path("c4_test/c4-train.00000-of-00001.json").read_text().splitlines()
    texts = [t for t in (json.loads(line)["text"] for line in lines) if len(t.split()) < 45][:60]
    records = [json.dumps({"text": t}) for t in texts]
    records[39] = '{"text": "cut'
    path.write_text("\n".join(records) + "\n")
    return path


@pytest.mark.parametrize("ranks", [ONE_RANK, TWO_RANKS], ids=["1", "2"])
def test_a_rank_error_is_one_line_naming_the_rank(tmp_path, ranks):
    data = bad_jsonl(tmp_path / "bad.jsonl")
    proc = launch(
        *ranks, *SMALL, "training.steps=50", "data=jsonl", f"data.path={data}", root=tmp_path, check=False
    )
    run = run_dir(tmp_path)
    assert proc.returncode == 1
    line = last_line(proc.stderr)
    match = re.fullmatch(r"error: rank (\d) failed: BadRecord: (.*) \(its log: (.*)\)", line)
    assert match, line
    rank, reason, log = match.groups()
    assert reason.startswith(f"{data}, line 40: not JSON")
    # The rank named is the one that read the record: its log has the traceback.
    assert log == str(run / "logs" / f"rank{rank}.log")
    assert "Traceback" in Path(log).read_text() and "BadRecord" in Path(log).read_text()
    assert len([line for line in proc.stderr.splitlines() if not line.startswith("step ")]) < 10
    state = jobstate.run_state(run)
    assert (state.state, state.reason) == ("failed", f"BadRecord: {reason}")
