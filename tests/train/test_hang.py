"""A hang in a real run fails fast, and every rank's Flight Recorder dump says which rank held it up.

launch.py runs 4 ranks (TP 2 x FSDP 2) of a tiny model. At step 4 rank 3 never enqueues the loss
all-reduce (the `loss` mesh, a subgroup: {1, 3}): titan has no fault-injection option, so a hook put on
the ranks' path by this test alone does it (tests/checkpoint/hooks/skip_collective.py, imported by a
`sitecustomize`). Rank 1 waits in that all-reduce and times out after training.collective_timeout_s.
Ranks 0, 2 and 3 meanwhile wait in the stop agreement on the checkpointer's control group (every step
is a control step here), whose timeout is 2 hours: they fail as soon as rank 1 leaves (gloo: "Connection
closed by peer"). Every rank dumps its trace (those on a collective that failed so too), and launch.py
exits 1 naming the dump folder.

Without timeouts on the mesh subgroups the run would wait torch's 30 minutes: the subprocess deadline
fails the test instead of hanging the suite; with the first step's timeout kept past it, the run ends
too late. With training.flight_recorder_entries=0 there are no dumps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.test_launch import REPO
from titan.distributed.flight_recorder import is_collective_failure, summarize
from titan.launch import jobstate
from titan.tools.flight_recorder import main

HOOKS = REPO / "tests" / "checkpoint" / "hooks"
TIMEOUT_S = 3
# Long: the first step's collectives also wait for the slowest rank's start on 2 shared cores. Longer
# than the bound below, so a run that kept it past the first step fails the test.
FIRST_STEP_TIMEOUT_S = 30
SKIP = (3, 4)  # (rank, step)
# Every rank ends within twice the timeout of the skip (the rank that times out first, then the others
# when it leaves), and a margin for 4 ranks sharing 2 cores.
BOUND_S = 2 * TIMEOUT_S + 3
# launch.py exits some seconds after its ranks (Python's finalization of the launcher alone takes about
# 6 s on 2 shared cores), but before the 30 s the elastic agent gives a rank that lingers.
EXIT_BOUND_S = BOUND_S + 15
DEADLINE_S = 180  # the whole launch, start-up included (about 45 s): a hang fails here, not the suite
ARGS = [
    *("model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128"),
    *("training.seq_len=32", "training.steps=20", "optimizer.warmup_steps=1", "checkpoint=none"),
    *("parallelism=tp2_fsdp", "cluster.nproc_per_node=4", "metrics.log_freq=1", "metrics.tensorboard=false"),
    f"training.collective_timeout_s={TIMEOUT_S}",
    f"training.first_step_timeout_s={FIRST_STEP_TIMEOUT_S}",
]


def launch_with_skip(root: Path) -> tuple[subprocess.CompletedProcess, float]:
    """launch.py with rank SKIP[0] skipping its loss all-reduce at step SKIP[1]; its result and the wall
    time it exited. In a session of its own, so that a deadline kills every rank with it."""
    site = root / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text("import skip_collective  # noqa: F401\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(site), str(HOOKS), os.environ.get("PYTHONPATH", "")]),
        "TITAN_TEST_SKIP_LOSS_ALL_REDUCE": f"{SKIP[0]}:{SKIP[1]}",
    }
    cmd = [sys.executable, "launch.py", *ARGS, f"run.root={root}"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the run hung: still running {DEADLINE_S} s after its launch")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.time()


@pytest.mark.slow
def test_a_rank_that_skips_a_collective_fails_the_run_fast_with_a_dump_per_rank(tmp_path, capsys):
    proc, exited_at = launch_with_skip(tmp_path)
    (run,) = (tmp_path / "llama3_debug").iterdir()
    folder = run / "flight_recorder"

    # The launch exits 1, its last line naming the rank that timed out and the dump folder.
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: rank 1 failed: CollectiveTimeout: rank 1: a collective timed out at step {SKIP[1]}"
    ), last
    assert (
        f"every rank's last collectives are in {folder}: python -m titan.tools.flight_recorder {folder}"
        in last
    )

    # Every rank ended soon after the skip, and the launch with them.
    skipped_at = float((run / "skipped_at").read_text())
    crashed = {e["rank"]: e["time"] - skipped_at for e in jobstate.read(run) if e["event"] == "crashed"}
    assert sorted(crashed) == [0, 1, 2, 3], crashed
    assert crashed[1] == min(crashed.values()) and max(crashed.values()) < BOUND_S, crashed
    assert exited_at - skipped_at < EXIT_BOUND_S, exited_at - skipped_at

    # One dump per rank, which titan's summary reads: in the loss group {1, 3} rank 1 enqueued all-reduce
    # #4 (step 4's) and waits in it; rank 3 stopped at #3 and went on without it.
    assert sorted(p.name for p in folder.iterdir()) == [f"rank-{r}.json" for r in range(4)]
    assert all(json.loads((folder / f"rank-{r}.json").read_text())["entries"] for r in range(4))
    summary = summarize(folder)
    (loss_group,) = [line for line in summary.splitlines() if "mesh_dp_cp: rank 1:" in line]
    assert loss_group.endswith("mesh_dp_cp: rank 1: #4 gloo:all_reduce, rank 3: #3 gloo:all_reduce"), summary
    assert "ranks [3] never enqueued #4 gloo:all_reduce, which ranks [1] wait in" in summary, summary
    assert "rank 3 went on without it" in summary, summary
    assert summary.splitlines()[-1].startswith("Start there: rank 3 skipped #4 gloo:all_reduce of group "), (
        summary
    )
    assert main([str(folder)]) == 0 and capsys.readouterr().out.strip() == summary


def _entry(group: tuple[str, str], seq: int) -> dict:
    """A gloo Flight Recorder entry, with the fields the summary reads."""
    return {
        "process_group": list(group),
        "collective_seq_id": seq,
        "profiling_name": "gloo:all_reduce",
        "state": "scheduled",
        "is_p2p": False,
    }


def test_the_summary_tells_the_rank_that_skipped_from_the_ranks_held_up(tmp_path):
    # Each step: an all-reduce on the dp mesh (ranks 0 and 1 share one, rank 2 is alone in its own),
    # then one on a group of all ranks. In step 2 rank 1 skips the dp one: rank 0 waits in it, so
    # ranks 1 and 2 wait for rank 0 in the next. Rank 2's record shows the program's order.
    dp01, dp2, every = ("5", "mesh_dp"), ("6", "mesh_dp"), ("9", "undefined")
    steps = {
        0: [(dp01, 1), (every, 1), (dp01, 2)],
        1: [(dp01, 1), (every, 1), (every, 2)],
        2: [(dp2, 1), (every, 1), (dp2, 2), (every, 2)],
    }
    for rank, entries in steps.items():
        trace = {"entries": [_entry(group, seq) for group, seq in entries]}
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps(trace))
    summary = summarize(tmp_path).splitlines()
    assert summary[1:] == [
        "  group 5/mesh_dp: rank 0: #2 gloo:all_reduce, rank 1: #1 gloo:all_reduce",
        "    ranks [1] never enqueued #2 gloo:all_reduce, which ranks [0] wait in: look at what ranks [1] were doing",
        "      rank 1 went on without it, to #2 gloo:all_reduce of group 9/undefined",
        "  group 6/mesh_dp: rank 2: #2 gloo:all_reduce",
        "  group 9/undefined: rank 0: #1 gloo:all_reduce, rank 1: #2 gloo:all_reduce, rank 2: #2 gloo:all_reduce",
        "    ranks [0] never enqueued #2 gloo:all_reduce, which ranks [1, 2] wait in: look at what ranks [0] were doing",
        "      rank 0 is still before it, in #2 gloo:all_reduce of group 5/mesh_dp",
        "Start there: rank 1 skipped #2 gloo:all_reduce of group 5/mesh_dp (the other waits follow from it)",
    ]


def test_a_collective_cut_short_by_a_peer_that_left_is_a_collective_failure():
    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
    assert is_collective_failure(
        RuntimeError(gloo + "unbound_buffer.cc:78] Timed out waiting 3000ms for recv")
    )
    assert is_collective_failure(
        RuntimeError(gloo + "pair.cc:553] Connection closed by peer [127.0.0.1]:53647")
    )
    assert not is_collective_failure(RuntimeError("CUDA out of memory"))
    assert not is_collective_failure(ValueError("Connection closed by peer"))
