"""checkpoint.* keys: retention, wall-clock interval, folder, exclude_from_loading, initial weights,
the model-only final save, and seed checkpoints."""

import json
import shutil

import pytest
import torch

import titan.checkpoint.manager
from tests.checkpoint.common import launch, names, one_rank_config, relaunch
from tests.utils import TINY_MODEL, read_metrics, read_model
from titan.checkpoint.dcp_model import read_dcp_model
from titan.checkpoint.format import read_metadata
from titan.checkpoint.hf import dcp_to_hf
from titan.checkpoint.manager import CheckpointLoadError
from titan.checkpoint.options import PARTS
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.tools.convert import main
from titan.train.trainer import Trainer, run


def test_keep_latest_k_purges_older_and_stale(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step-0.partial").mkdir(parents=True)  # an interrupted save older than any complete one
    (folder / "step-1.purging").mkdir()  # a purge a crash interrupted
    run(one_rank_config(tmp_path, steps=7, interval=1, keep_latest_k=2))
    assert names(folder) == ["step-6", "step-7"]


def test_keep_latest_k_0_keeps_all(tmp_path):
    run(one_rank_config(tmp_path, steps=5, interval=1, keep_latest_k=0))
    assert names(tmp_path / "checkpoints") == [f"step-{s}" for s in range(1, 6)]


def test_retention_never_purges_the_checkpoint_just_written(tmp_path):
    """Resumed from an older load_step, the new timeline's checkpoint stays although older by step
    than the abandoned one."""
    run(one_rank_config(tmp_path, steps=6, interval=2, keep_latest_k=0))
    run(one_rank_config(tmp_path, steps=3, interval=1, keep_latest_k=1, load_step=2))
    assert names(tmp_path / "checkpoints") == ["step-3", "step-6"]


def test_interval_s_saves_by_rank_0_clock(tmp_path, monkeypatch):
    ticks = iter(range(1000))  # a clock that advances one second at every reading
    monkeypatch.setattr(titan.checkpoint.manager, "_now", lambda: float(next(ticks)))
    run(one_rank_config(tmp_path, steps=8, interval=1000, interval_s=2.5, keep_latest_k=0))
    # read at start (0); steps 1-3 read 1, 2, 3: due, the save reads 4; steps 4-6 read 5-7: due ...
    assert names(tmp_path / "checkpoints") == ["step-3", "step-6", "step-8"]


@pytest.mark.slow
def test_interval_s_and_retention_agree_across_ranks(tmp_path):
    """Every step is due by the clock; both ranks save the same steps while older ones are purged
    behind the saves in flight."""
    cfg = one_rank_config(
        tmp_path, steps=6, interval=1000, interval_s=1e-9, keep_latest_k=2, mode="thread"
    ).replace(parallelism={"dp_shard": -1})
    launch(cfg, 2)
    assert names(tmp_path / "checkpoints") == ["step-5", "step-6"]
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        for step in range(1, 7):
            assert f"saved checkpoint {tmp_path / 'checkpoints' / f'step-{step}'} " in log


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_folder(tmp_path, absolute):
    folder = tmp_path / "scratch" / "ckpt" if absolute else "ckpt"
    cfg = one_rank_config(tmp_path / "run", steps=2, folder=str(folder), keep_latest_k=0)
    run(cfg)
    where = folder if absolute else tmp_path / "run" / "ckpt"
    assert names(where) == ["step-2"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    run(cfg.replace(training={"steps": 4}))
    assert (
        f"resumed from checkpoint {where / 'step-2'}" in (tmp_path / "run" / "logs" / "rank0.log").read_text()
    )
    assert names(where) == ["step-2", "step-4"]


def fresh_weights(seed=0):
    with torch.device("meta"):
        model = Transformer(TINY_MODEL)
    model.to_empty(device="cpu")
    init_weights(model, TINY_MODEL, seed=seed, device=torch.device("cpu"))
    return model.state_dict()


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("excluded", PARTS)
def test_exclude_from_loading(saved_run, tmp_path, excluded):
    run_dir, cfg = relaunch(saved_run, tmp_path, exclude_from_loading=(excluded,))
    saved = read_model(saved_run, 4)
    loader_state = {
        p.stem: json.loads(p.read_text())
        for p in (saved_run / "checkpoints" / "step-4" / "loader").glob("*.json")
    }
    trainer = Trainer(cfg)
    try:
        ckpt = trainer.checkpointer
        loaded = {
            "model": equal(ckpt.model.state_dict(), saved),
            "optimizer": len(ckpt.optimizers[0].state) > 0,
            "lr_scheduler": ckpt.scheduler.state_dict()["last_epoch"] == 4,
            "dataloader": ckpt.loader.state_dict() == loader_state,
            "train_state": trainer.step == 4,
        }
        assert loaded == {part: part != excluded for part in PARTS}
        if excluded == "model":
            assert equal(ckpt.model.state_dict(), fresh_weights())
    finally:
        trainer.close()


def initial_run(tmp_path, path):
    return Trainer(one_rank_config(tmp_path / "new", initial_load_path=str(path)))


@pytest.mark.parametrize("source", ["dcp", "hf"])
def test_initial_load_path_loads_weights_only(saved_run, tmp_path, source):
    path = saved_run / "checkpoints" / "step-4"
    if source == "hf":
        path = dcp_to_hf(path, tmp_path / "hf")
    trainer = initial_run(tmp_path, path)
    try:
        ckpt = trainer.checkpointer
        assert equal(ckpt.model.state_dict(), read_model(saved_run, 4))
        assert trainer.step == 0 and not ckpt.optimizers[0].state
        assert ckpt.scheduler.state_dict()["last_epoch"] == 0
    finally:
        trainer.close()
    assert f"initial weights from {path}" in (tmp_path / "new" / "logs" / "rank0.log").read_text()


def test_initial_load_path_is_ignored_when_resuming(saved_run, tmp_path):
    run_dir, cfg = relaunch(saved_run, tmp_path, initial_load_path=str(tmp_path / "nowhere"))
    trainer = Trainer(cfg)
    trainer.close()
    assert trainer.step == 4


def test_initial_load_path_of_another_model_is_an_error(saved_run, tmp_path):
    hf = dcp_to_hf(saved_run / "checkpoints" / "step-4", tmp_path / "hf")
    cfg = one_rank_config(tmp_path / "new", initial_load_path=str(hf))
    with pytest.raises(
        CheckpointLoadError, match=rf"holds another model:\n  model.dim: {TINY_MODEL.dim} there, 128 here"
    ):
        run(cfg.replace(model={"dim": 128}))
    with pytest.raises(CheckpointLoadError, match="neither a titan checkpoint step directory"):
        run(one_rank_config(tmp_path / "new2", initial_load_path=str(tmp_path)))


def test_model_only_final_save_in_export_dtype(tmp_path):
    run(one_rank_config(tmp_path / "full", steps=3, keep_latest_k=0))
    run(
        one_rank_config(
            tmp_path / "export", steps=3, keep_latest_k=0, model_only=True, export_dtype="bfloat16"
        )
    )
    final = tmp_path / "export" / "checkpoints" / "step-3"
    saved = read_metadata(final).state_dict_metadata
    assert all(k.startswith("model.") for k in saved)
    assert {saved[k].properties.dtype for k in saved} == {torch.bfloat16}
    assert json.loads((final / "train_state.json").read_text())["model_only"] is True
    # the earlier checkpoint is a full one; the export holds the final weights, cast
    assert any(k.startswith("optimizer.") for k in read_metadata(final.parent / "step-2").state_dict_metadata)
    full = read_model(tmp_path / "full", 3)
    export = read_dcp_model(final)
    assert export.keys() == full.keys()
    assert all(torch.equal(export[k], full[k].to(torch.bfloat16)) for k in full)

    # Training on from an export needs saying so: it has no optimizer state or data position.
    cfg = one_rank_config(tmp_path / "export", steps=5, keep_latest_k=0)
    with pytest.raises(CheckpointLoadError, match="holds the model weights only"):
        run(cfg)
    cfg = cfg.replace(checkpoint={"exclude_from_loading": ("optimizer", "lr_scheduler", "dataloader")})
    trainer = Trainer(cfg)  # the bfloat16 weights, loaded into the float32 model
    trainer.close()
    assert trainer.step == 3 and equal(
        trainer.checkpointer.model.state_dict(), {k: v.float() for k, v in export.items()}
    )
    run(cfg)
    assert [m["step"] for m in read_metrics(tmp_path / "export")] == [1, 2, 3, 4, 5]


def test_seed_checkpoint_starts_runs_from_identical_weights(tmp_path):
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(TINY_MODEL.__dict__))
    seed_dir = main(
        ["seed", str(model_file), str(tmp_path / "seeded" / "checkpoints" / "step-0"), "--seed", "5"]
    )
    assert equal(read_dcp_model(seed_dir), fresh_weights(seed=5))

    # A run whose folder holds the seed as step 0 trains as one initialised with that seed.
    shutil.copytree(seed_dir, tmp_path / "initial" / "seed")
    run(one_rank_config(tmp_path / "seeded", steps=3))
    run(one_rank_config(tmp_path / "initial", steps=3, initial_load_path=str(tmp_path / "initial" / "seed")))
    run(one_rank_config(tmp_path / "reference", steps=3).replace(training={"seed": 5}))
    assert "resumed from checkpoint" in (tmp_path / "seeded" / "logs" / "rank0.log").read_text()
    want = [m["loss"] for m in read_metrics(tmp_path / "reference")]
    assert [m["loss"] for m in read_metrics(tmp_path / "seeded")] == want
    assert [m["loss"] for m in read_metrics(tmp_path / "initial")] == want
    default = run(one_rank_config(tmp_path / "default", steps=3))  # seed 0: other weights
    assert default["loss"] != want[-1]
