import pytest
import yaml

from titan.launch.rundir import (
    ResumeRefused,
    check_resume,
    config_changes,
    run_name_from_overrides,
    write_provenance,
)

CONFIG = {"training": {"steps": 10, "seed": 0}, "optimizer": {"lr": 0.1}, "run": {"name": "a"}}


def make_checkpoint(run_dir, step):
    (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)


def test_run_names_are_deterministic_and_readable():
    assert run_name_from_overrides("") == "default"
    a = run_name_from_overrides("optimizer.lr-0.001")
    assert a == run_name_from_overrides("optimizer.lr-0.001") and a.startswith("optimizer.lr-0.001-")
    assert a != run_name_from_overrides("optimizer.lr-0.002")
    assert run_name_from_overrides("data.path-/x/y/*.json").startswith("data.path-_x_y__.json-")


def test_fresh_directory_starts_fresh(tmp_path):
    assert check_resume(tmp_path, CONFIG, "auto") is None
    assert check_resume(tmp_path, CONFIG, "never") is None
    with pytest.raises(ResumeRefused, match="run.resume=must"):
        check_resume(tmp_path, CONFIG, "must")


def test_auto_resumes_from_the_newest_complete_checkpoint(tmp_path, caplog):
    write_provenance(tmp_path, CONFIG, [], ["launch.py"])
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "step-15.partial").mkdir()
    with caplog.at_level("WARNING", logger="titan"):
        assert check_resume(tmp_path, CONFIG, "auto") == 10
    assert "step-15.partial" in caplog.text


def test_never_refuses_a_directory_with_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 5)
    with pytest.raises(ResumeRefused, match="run.resume=never"):
        check_resume(tmp_path, CONFIG, "never")


def test_changed_training_math_is_refused_with_the_diff(tmp_path):
    write_provenance(tmp_path, CONFIG, [], ["launch.py"])
    make_checkpoint(tmp_path, 5)
    changed = {**CONFIG, "optimizer": {"lr": 0.2}}
    with pytest.raises(ResumeRefused, match=r"optimizer.lr: 0.1 -> 0.2"):
        check_resume(tmp_path, changed, "auto")


def test_steps_and_run_keys_may_change(tmp_path):
    write_provenance(tmp_path, CONFIG, [], ["launch.py"])
    make_checkpoint(tmp_path, 5)
    longer = {**CONFIG, "training": {"steps": 20, "seed": 0}, "run": {"name": "b"}}
    assert check_resume(tmp_path, longer, "auto") == 5


def test_config_changes_lists_added_and_removed_keys():
    assert config_changes({"a": {"b": 1}}, {"a": {"c": 2}}) == [("a.b", 1, None), ("a.c", None, 2)]


def test_a_config_saved_by_an_older_titan_compares_equal():
    """Class paths in `_target_` keys are not compared, and a key the saved config lacks is unchanged
    when its new value is the default: adding a key never blocks resuming an older run."""
    saved = {"model": {"_target_": "titan.models.llama.model.ModelArgs", "dim": 64}, "cluster": {"nodes": 1}}
    new = {"model": {"dim": 64}, "cluster": {"nodes": 1, "partition": None, "max_retries": 2}}
    assert config_changes(saved, new) == []
    assert config_changes(saved, {**new, "cluster": {"nodes": 1, "max_retries": 5}}) == [
        ("cluster.max_retries", None, 5)
    ]


def test_provenance_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "hunter2")
    monkeypatch.setenv("TITAN_VISIBLE", "yes")
    write_provenance(tmp_path, CONFIG, ["optimizer.lr=0.1"], ["launch.py", "optimizer.lr=0.1"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved.pop("hydra") == {"run": {"dir": "${run.root}/${run.group}/${run.name}"}}
    assert saved == CONFIG
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text()) == ["optimizer.lr=0.1"]
    env = (tmp_path / "env.txt").read_text()
    assert "torch:" in env and "TITAN_VISIBLE=yes" in env and "hunter2" not in env
    assert (
        "commit " in (tmp_path / "git.txt").read_text()
        or "not a git checkout" in (tmp_path / "git.txt").read_text()
    )
    assert "optimizer.lr=0.1" in (tmp_path / "cmd.txt").read_text()
