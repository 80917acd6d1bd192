"""Save at step 10 in each save mode, resume: steps 11-20 equal the uninterrupted run bitwise.

Two ranks with FSDP, so the background saves stage sharded (DTensor) state. CPU, deterministic. The
resumed run saves synchronously: what is under test is the checkpoint each mode wrote (loading does
not depend on the mode), and a background process per rank would only add start-up time.
"""

import pytest

from tests.checkpoint.common import RESUME_AT, STEPS, launch, names, resume_config, rewind
from tests.utils import read_metrics, read_model

pytestmark = pytest.mark.slow

KEYS = ("step", "loss", "grad_norm", "lr")


@pytest.mark.parametrize("mode", ["sync", "thread", "process"])
def test_resume_is_bitwise_equal(tmp_path, full_run, mode):
    full_dir = full_run(mode)
    full = read_metrics(full_dir)
    assert [m["step"] for m in full] == list(range(1, STEPS + 1))
    assert full[-1]["loss"] < full[0]["loss"]
    assert names(full_dir / "checkpoints") == [
        f"step-{RESUME_AT}",
        f"step-{STEPS}",
    ]
    if mode != "sync":  # saving in the background leaves training and the saved weights unchanged
        sync_dir = full_run("sync")
        assert [[m[k] for k in KEYS] for m in full] == [[m[k] for k in KEYS] for m in read_metrics(sync_dir)]
        theirs, ours = read_model(sync_dir, STEPS), read_model(full_dir, STEPS)
        assert all(ours[k].equal(theirs[k]) for k in theirs)

    resumed_dir = rewind(full_dir, tmp_path / "resumed", RESUME_AT)
    launch(resume_config(resumed_dir), 2)
    resumed = read_metrics(resumed_dir)
    assert (
        f"resumed from checkpoint {resumed_dir / 'checkpoints' / f'step-{RESUME_AT}'}"
        in (resumed_dir / "logs" / "rank0.log").read_text()
    )
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [[m[k] for k in KEYS] for m in resumed[RESUME_AT:]] == [
        [m[k] for k in KEYS] for m in full[RESUME_AT:]
    ]
    ours, theirs = read_model(resumed_dir, STEPS), read_model(full_dir, STEPS)
    assert all(ours[k].equal(theirs[k]) for k in theirs)
