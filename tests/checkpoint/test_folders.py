"""A checkpoint folder belongs to one run (its owner.json), and what is not a checkpoint in it (a
dangling `step-N` link, a `*.purging` leftover) neither stops a run nor stays forever."""

import json
import shutil

import pytest

from tests.checkpoint.common import names, one_rank_config, relaunch
from tests.utils import read_metrics
from titan.checkpoint.format import OWNER_FILE, claim, owner_problem
from titan.checkpoint.manager import CheckpointLoadError
from titan.train.trainer import run


def owner(folder):
    return json.loads((folder / OWNER_FILE).read_text())


def test_a_run_marks_its_folder_and_notes_its_first_checkpoint(saved_run):
    assert owner(saved_run / "checkpoints") == {"run_dir": str(saved_run.resolve()), "saved": True}


def test_another_runs_folder_is_refused_and_left_alone(tmp_path):
    first = tmp_path / "A"
    run(one_rank_config(first, steps=4, keep_latest_k=1))
    assert names(first / "checkpoints") == ["step-4"]
    # Run B would resume A's step 4 with its own LR ignored, then purge A's checkpoints.
    other = one_rank_config(tmp_path / "B", steps=6, keep_latest_k=1, folder=str(first / "checkpoints"))
    with pytest.raises(CheckpointLoadError) as e:
        run(other.replace(optimizer={"lr": 1e-2}))
    assert f"belongs to another run, {first.resolve()}" in str(e.value)
    assert f"checkpoint.initial_load_path={(first / 'checkpoints' / 'step-4').resolve()}" in str(e.value)
    assert names(first / "checkpoints") == ["step-4"]
    assert owner(first / "checkpoints")["run_dir"] == str(first.resolve())
    assert not (tmp_path / "B" / "metrics.jsonl").exists()


def test_a_copied_run_dir_resumes_from_its_own_checkpoints(saved_run, tmp_path):
    """A folder inside the run dir is the run's whatever its mark says (it came along with a copy)."""
    run_dir, cfg = relaunch(saved_run, tmp_path)
    assert owner(run_dir / "checkpoints")["run_dir"] == str(saved_run.resolve())
    run(cfg)
    assert "resumed from checkpoint" in (run_dir / "logs" / "rank0.log").read_text()
    assert owner(run_dir / "checkpoints") == {"run_dir": str(run_dir.resolve()), "saved": True}
    assert owner(saved_run / "checkpoints")["run_dir"] == str(saved_run.resolve())


def test_an_unmarked_folder_of_checkpoints_elsewhere_is_claimed_only_by_hand(saved_run, tmp_path):
    scratch = tmp_path / "scratch"
    shutil.copytree(saved_run / "checkpoints", scratch)
    (scratch / OWNER_FILE).unlink()  # as an older titan, or a copy by hand, leaves it
    run_dir = tmp_path / "run"
    problem = owner_problem(scratch, run_dir)
    assert f"holds checkpoints (steps [2, 4]) but no {OWNER_FILE}" in problem
    # The fix it names works when followed.
    (scratch / OWNER_FILE).write_text(json.dumps({"run_dir": str(run_dir.resolve())}))
    run(one_rank_config(run_dir, steps=6, folder=str(scratch)))
    assert f"resumed from checkpoint {scratch / 'step-4'}" in (run_dir / "logs" / "rank0.log").read_text()


def test_an_empty_unmarked_folder_is_free_and_a_claim_keeps_saved(tmp_path):
    folder = tmp_path / "elsewhere"
    assert owner_problem(folder, tmp_path / "run") is None
    assert claim(folder, tmp_path / "run", saved=False) is False
    assert claim(folder, tmp_path / "run", saved=True) is True
    assert claim(folder, tmp_path / "run", saved=False) is True  # once saved, always known
    with pytest.raises(ValueError, match="belongs to another run"):
        claim(folder, tmp_path / "other", saved=False)


def test_a_dangling_step_link_is_skipped_with_a_warning_and_replaced(saved_run, tmp_path):
    """Today's failure: every relaunch retrained and then failed to commit over the link."""
    run_dir, cfg = relaunch(saved_run, tmp_path)
    link = run_dir / "checkpoints" / "step-6"
    link.symlink_to(tmp_path / "unmounted" / "step-6")
    run(cfg)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"skipping {link}: it is a symlink to {tmp_path / 'unmounted' / 'step-6'}" in log
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / 'step-4'}" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert not link.is_symlink() and (link / ".metadata").is_file()
    assert names(run_dir / "checkpoints") == ["step-2", "step-4", "step-6"]  # the link set aside went


def test_purging_leftovers_are_deleted_at_start(saved_run, tmp_path):
    """A run that commits nothing more (here: already at its last step) still clears them."""
    run_dir, cfg = relaunch(saved_run, tmp_path, steps=4)
    checkpoints = run_dir / "checkpoints"
    shutil.copytree(checkpoints / "step-2", checkpoints / "step-1.purging")
    (checkpoints / "step-3.purging").symlink_to(tmp_path / "gone")  # a dangling link set aside
    run(cfg)
    assert names(checkpoints) == ["step-2", "step-4"]
