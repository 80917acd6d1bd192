"""Damaged, mismatched and missing checkpoints are clear errors; a failed save (a full disk) fails
loudly, keeps the previous checkpoint complete and stops training unless checkpoint.on_error=warn."""

import errno
import json
import shutil

import pytest
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from tests.checkpoint.common import names, one_rank_config, relaunch
from tests.utils import TINY_MODEL, read_metrics, read_model
from titan.checkpoint.manager import CheckpointLoadError, CheckpointSaveError
from titan.checkpoint.options import config_problems
from titan.config.schema import CheckpointConfig
from titan.train.trainer import run


def test_truncated_file_is_an_error_naming_path_and_load_step(saved_run, tmp_path):
    run_dir, cfg = relaunch(saved_run, tmp_path)
    data = next((run_dir / "checkpoints" / "step-4").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointLoadError) as e:
        run(cfg)
    message = str(e.value)
    assert f"cannot load checkpoint {run_dir / 'checkpoints' / 'step-4'}" in message
    assert "checkpoint.load_step=<N> (older complete steps: [2])" in message
    # never a silent fallback: nothing trained, and the older checkpoint still loads when asked for
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    run(cfg.replace(checkpoint={"load_step": 2}))
    assert "resumed from checkpoint" in (run_dir / "logs" / "rank0.log").read_text()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_damaged_metadata_is_an_error(saved_run, tmp_path):
    run_dir, cfg = relaunch(saved_run, tmp_path)
    (run_dir / "checkpoints" / "step-4" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointLoadError, match=r"cannot load checkpoint .*step-4:\n.*"):
        run(cfg)


def test_missing_train_state_is_an_error(saved_run, tmp_path):
    run_dir, cfg = relaunch(saved_run, tmp_path)
    (run_dir / "checkpoints" / "step-4" / "train_state.json").unlink()
    with pytest.raises(CheckpointLoadError, match=r"step-4:\nFileNotFoundError.*train_state.json"):
        run(cfg)


L, D, V = TINY_MODEL.n_layers, TINY_MODEL.dim, TINY_MODEL.vocab_size


@pytest.mark.parametrize(
    "model,expected",
    [
        (
            {"dim": 2 * D},
            rf"model.tok_embeddings.weight: saved shape \[{V}, {D}\], this run's \[{V}, {2 * D}\]",
        ),
        ({"n_layers": L + 1}, rf"model.layers.{L}.attention.wq.weight: not in the checkpoint"),
        (
            {"n_layers": L - 1},
            rf"model.layers.{L - 1}.attention.wq.weight: in the checkpoint, not in this model",
        ),
    ],
    ids=["wider", "deeper", "shallower"],
)
def test_another_model_shape_is_an_error_saying_what_differs(saved_run, tmp_path, model, expected):
    run_dir, cfg = relaunch(saved_run, tmp_path)
    key, value = next(iter(model.items()))
    with pytest.raises(CheckpointLoadError, match=expected) as e:
        run(cfg.replace(model=model))
    assert f"model.{key}: saved {getattr(TINY_MODEL, key)}, this run {value}" in str(e.value)
    assert "checkpoint.load_step" in str(e.value)


def test_missing_load_step_lists_the_available_steps(saved_run, tmp_path):
    run_dir, cfg = relaunch(saved_run, tmp_path)
    shutil.copytree(run_dir / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-3.partial")
    with pytest.raises(CheckpointLoadError) as e:
        run(cfg.replace(checkpoint={"load_step": 3}))
    assert "checkpoint.load_step=3" in str(e.value)
    assert "step-3.partial is a save that did not finish" in str(e.value)
    assert "available steps: [2, 4]" in str(e.value)


def test_partial_checkpoint_is_skipped_with_a_warning(saved_run, tmp_path):
    run_dir, cfg = relaunch(saved_run, tmp_path)
    partial = run_dir / "checkpoints" / "step-5.partial"
    shutil.copytree(run_dir / "checkpoints" / "step-4", partial)
    (partial / ".metadata").unlink()  # as a crash before the metadata was written leaves it
    run(cfg)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"skipping incomplete checkpoint {partial}" in log
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / 'step-4'}" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def full_disk_at(monkeypatch, step_name: str) -> None:
    """DCP's writer fails with ENOSPC while writing `step_name`, as on a full disk."""
    write_data = FileSystemWriter.write_data

    def failing(self, plan, planner):
        if self.path.name == step_name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_data(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", failing)


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_full_disk_stops_training_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, mode):
    full_disk_at(monkeypatch, "step-4.partial")
    cfg = one_rank_config(tmp_path, steps=6, mode=mode)
    with pytest.raises(CheckpointSaveError) as e:
        run(cfg)
    assert "saving checkpoint step 4" in str(e.value) and "No space left on device" in str(e.value)
    assert f"the newest complete checkpoint is {tmp_path / 'checkpoints' / 'step-2'}" in str(e.value)
    assert [m["step"] for m in read_metrics(tmp_path)][-1] < 6  # training stopped
    assert names(tmp_path / "checkpoints") == ["step-2"]
    assert read_model(tmp_path, 2)  # still complete and readable


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_full_disk_with_on_error_warn_trains_on(tmp_path, monkeypatch, mode):
    full_disk_at(monkeypatch, "step-4.partial")
    run(one_rank_config(tmp_path, steps=6, mode=mode, on_error="warn"))
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert names(tmp_path / "checkpoints") == ["step-2", "step-6"]
    assert "training goes on (checkpoint.on_error=warn)" in (tmp_path / "logs" / "rank0.log").read_text()


def test_config_problems_name_the_keys():
    bad = CheckpointConfig(
        mode="async",
        on_error="ignore",
        export_dtype="int8",
        exclude_from_loading=("weights",),
        keep_latest_k=-1,
    )
    problems = "\n".join(config_problems(bad))
    for key in ("mode", "on_error", "export_dtype", "exclude_from_loading", "keep_latest_k"):
        assert f"checkpoint.{key}=" in problems
    assert config_problems(CheckpointConfig(enable=False, export_hf=True)) == [
        "checkpoint.export_hf=true exports the final checkpoint: set checkpoint.enable=true"
    ]
    assert config_problems(CheckpointConfig()) == []
    json.dumps(problems)
