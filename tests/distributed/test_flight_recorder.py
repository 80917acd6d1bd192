"""Collective timeouts reach the mesh subgroups, and the Flight Recorder dumps say which rank held a
collective up: a 2 x 2 mesh where rank 3 never enqueues one dp all-reduce. Without `set_timeouts` the
subgroups would wait torch's default 30 minutes and the harness's 60 s deadline fails the test."""

import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.multirank import spawn_ranks
from titan.distributed.flight_recorder import (
    dump,
    is_timeout,
    mesh_groups,
    recorder_env,
    set_aside_old_dumps,
    set_timeouts,
    summarize,
)
from titan.tools.flight_recorder import main

TIMEOUT_S = 2.0


def _hang(rank, world, folder):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    set_timeouts(mesh_groups({"world": mesh}), TIMEOUT_S)
    dp, tp = mesh.get_group("dp"), mesh.get_group("tp")
    t = torch.ones(8)
    for _ in range(3):  # a few healthy steps: every rank enqueues everything
        dist.all_reduce(t, group=dp)
        dist.all_reduce(t, group=tp)
    start = time.monotonic()
    try:
        if rank != 3:  # rank 3 never enqueues this step's dp all-reduce: rank 1, its dp peer, waits in it
            dist.all_reduce(t, group=dp)
            dist.all_reduce(t, group=tp)
        else:
            dist.barrier()  # ... and waits where nobody else comes
        raise AssertionError("a collective completed although rank 3 skipped one")
    except RuntimeError as e:
        waited = time.monotonic() - start
        assert is_timeout(e), e
        # Within the configured timeout (twice it at most: rank 0 and 2 first finish a collective).
        assert waited < 2 * TIMEOUT_S + 1.5, waited
        dump(folder, rank)


def test_a_skipped_collective_times_out_on_every_rank_and_the_dumps_name_the_rank(
    tmp_path, monkeypatch, capsys
):
    for key, value in recorder_env(tmp_path / "fr", entries=64).items():
        monkeypatch.setenv(key, value)
    spawn_ranks(_hang, 4, tmp_path / "fr", timeout_s=60)
    assert sorted(p.name for p in (tmp_path / "fr").iterdir()) == [f"rank-{r}.json" for r in range(4)]
    summary = summarize(tmp_path / "fr")
    # The dp group {1, 3}: rank 1 enqueued all-reduce #4, rank 3 stopped at #3.
    assert "ranks [3] never enqueued #4 gloo:all_reduce, which ranks [1] wait in" in summary, summary
    assert "rank 1: #4 gloo:all_reduce" in summary and "rank 3: #3 gloo:all_reduce" in summary, summary
    assert main([str(tmp_path / "fr")]) == 0 and capsys.readouterr().out.strip() == summary


def test_a_starting_rank_sets_its_old_dumps_aside(tmp_path):
    """A relaunched run writes into the same folder: the summary must not read the last attempt's dumps."""
    from tests.utils import tiny_config
    from titan.train.trainer import run

    folder = tmp_path / "flight_recorder"
    folder.mkdir()
    (folder / "rank-0.json").write_text("{}")  # an attempt before this one: its rank 0 dumped
    (folder / "rank-1.json").write_text("{}")  # ... and a rank this one-rank run does not have
    run(tiny_config(tmp_path, steps=1, parallelism={"dp_shard": 1}, checkpoint={"enable": False}))
    assert sorted(p.name for p in folder.iterdir()) == ["previous", "rank-1.json"]
    assert (folder / "previous" / "rank-0.json").read_text() == "{}"
    set_aside_old_dumps(folder, 0)  # nothing of rank 0's left to move: no error, nothing changes
    assert sorted(p.name for p in folder.iterdir()) == ["previous", "rank-1.json"]
