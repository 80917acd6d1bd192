import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.checkpoint.common import names
from tests.launch.test_launch import REPO, SMALL, launch, metrics
from titan.checkpoint.format import OWNER_FILE
from titan.config.errors import ConfigError
from titan.launch.identity import identity_of, run_name, run_name_problem
from titan.launch.rundir import (
    ResumeRefused,
    check_resume,
    config_changes,
    write_provenance,
    writing,
)

# Secrets a deny-list of KEY/TOKEN/SECRET/PASSWORD let through into env.txt.
SECRETS = {
    "DATABASE_URL": "postgres://u:pw1@db/x",
    "DB_PASSWD": "pw2",
    "LDAP_PWD": "pw3",
    "GITHUB_PAT": "pw4",
    "SLACK_WEBHOOK_URL": "https://hooks/pw5",
    "GCP_CREDENTIALS": "pw6",
}
CONFIG = {"training": {"steps": 10, "seed": 0}, "optimizer": {"lr": 0.1}, "run": {"name": "a"}}


def make_checkpoint(run_dir, step):
    (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)


def test_run_names_are_deterministic_and_readable():
    identity = {"optimizer.lr": 0.001}
    a = run_name(["optimizer.lr=0.001", "parallelism=tp2"], identity, [], in_sweep=False)
    assert a == run_name(["optimizer.lr=0.001"], identity, [], in_sweep=False)
    assert a.startswith("optimizer.lr-0.001-")
    assert a != run_name(["optimizer.lr=0.002"], {"optimizer.lr": 0.002}, [], in_sweep=False)
    assert run_name(["data.path=/x/y/*.json"], {}, [], in_sweep=False).startswith("data.path-_x_y__.json-")
    # In a sweep the layout is a point of its own (the layouts sweep): it names the point too.
    assert run_name(["parallelism=tp2"], {}, [], in_sweep=True) != run_name(["parallelism=ddp"], {}, [], True)


def test_run_name_must_be_one_plain_directory():
    for bad in ("../../escape", "", "..", ".", "a/b"):
        assert run_name_problem(bad) and "plain directory name" in run_name_problem(bad)
    assert run_name_problem("baseline-lr_3e-4") is None


def test_fresh_directory_starts_fresh(tmp_path):
    assert check_resume(tmp_path, CONFIG, "auto") is None
    assert check_resume(tmp_path, CONFIG, "never") is None
    with pytest.raises(ResumeRefused, match="run.resume=must"):
        check_resume(tmp_path, CONFIG, "must")


def test_auto_resumes_from_the_newest_complete_checkpoint(tmp_path, caplog):
    write_provenance(tmp_path, CONFIG, [], ["launch.py"], {})
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
    write_provenance(tmp_path, CONFIG, [], ["launch.py"], {})
    make_checkpoint(tmp_path, 5)
    changed = {**CONFIG, "optimizer": {"lr": 0.2}}
    with pytest.raises(ResumeRefused, match=r"optimizer.lr: 0.1 -> 0.2"):
        check_resume(tmp_path, changed, "auto")


def test_steps_and_run_keys_may_change(tmp_path):
    write_provenance(tmp_path, CONFIG, [], ["launch.py"], {})
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
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    write_provenance(
        tmp_path, CONFIG, ["optimizer.lr=0.1"], ["launch.py", "optimizer.lr=0.1"], {"config.yaml": "a: 1\n"}
    )
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "a: 1\n"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved.pop("hydra") == {"run": {"dir": "${run.root}/${run.group}/${run.name}"}}
    assert saved == CONFIG
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text()) == ["optimizer.lr=0.1"]
    env = (tmp_path / "env.txt").read_text()
    assert "torch:" in env and "TITAN_VISIBLE=yes" in env and "NCCL_DEBUG=WARN" in env
    assert "hunter2" not in env and not any(value in env for value in SECRETS.values())
    assert (
        "commit " in (tmp_path / "git.txt").read_text()
        or "not a git checkout" in (tmp_path / "git.txt").read_text()
    )
    assert "optimizer.lr=0.1" in (tmp_path / "cmd.txt").read_text()


# ---------------------------------------------------------------- checkpoints lost, shared or damaged


def log_steps(run_dir, *steps):
    """metrics.jsonl of a run that logged these steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)
    )


def mark(folder, run_dir, *, saved):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNER_FILE).write_text(json.dumps({"run_dir": str(run_dir.resolve()), "saved": saved}))


@pytest.mark.parametrize("damage", ["missing", "emptied", "steps deleted"])
def test_lost_checkpoints_of_a_run_that_logged_steps_are_refused(tmp_path, damage):
    """Today the run starts again from step 0 and drops its logged steps from metrics.jsonl."""
    log_steps(tmp_path, 1, 2, 3)
    if damage == "emptied":  # its owner mark went with the rest
        (tmp_path / "checkpoints").mkdir()
    if damage == "steps deleted":
        mark(tmp_path / "checkpoints", tmp_path, saved=True)
    for resume in ("auto", "must"):
        with pytest.raises(ResumeRefused) as e:
            check_resume(tmp_path, CONFIG, resume)
        message = str(e.value)
        assert len(message.splitlines()) == 1
        what = "does not exist" if damage == "missing" else "holds no complete checkpoint"
        assert (
            f"the checkpoint folder {tmp_path / 'checkpoints'} {what}, but this run logged steps up to 3"
            in message
        )
        assert "another run.name" in message and "run.resume=never" in message
    # The way to start again that it names works.
    assert check_resume(tmp_path, CONFIG, "never") is None


def test_a_run_that_saved_no_checkpoint_yet_starts_again_with_a_warning(tmp_path, caplog):
    log_steps(tmp_path, 1, 2)
    mark(tmp_path / "checkpoints", tmp_path, saved=False)  # as a crash before the first save leaves it
    with caplog.at_level("WARNING", logger="titan"):
        assert check_resume(tmp_path, CONFIG, "auto") is None
    assert "logged steps up to 2 but saved no checkpoint" in caplog.text


def test_a_run_without_checkpoints_starts_again(tmp_path):
    config = {**CONFIG, "checkpoint": {"enable": False}}
    log_steps(tmp_path, 1, 2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))  # its last launch saved none either
    assert check_resume(tmp_path, config, "auto") is None
    assert not (tmp_path / "checkpoints").exists()  # nor is a folder made for it


def test_an_unreadable_checkpoint_folder_is_refused(tmp_path, monkeypatch):
    make_checkpoint(tmp_path, 5)
    folder, scandir = tmp_path / "checkpoints", os.scandir

    def denied(path):  # root reads any folder: a chmod does not stop it
        if Path(path) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ResumeRefused) as e:
        check_resume(tmp_path, CONFIG, "auto")
    assert str(e.value).startswith(f"cannot read the checkpoint folder {folder} (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_without_read_permission_is_refused(tmp_path):
    make_checkpoint(tmp_path, 5)
    (tmp_path / "checkpoints").chmod(0)
    try:
        with pytest.raises(ResumeRefused, match="cannot read the checkpoint folder"):
            check_resume(tmp_path, CONFIG, "auto")
    finally:
        (tmp_path / "checkpoints").chmod(0o755)


def test_another_runs_checkpoint_folder_is_refused(tmp_path):
    first, second = tmp_path / "A", tmp_path / "B"
    make_checkpoint(first, 3)
    mark(first / "checkpoints", first, saved=True)
    second.mkdir()
    shared = {**CONFIG, "checkpoint": {"folder": "../A/checkpoints"}}
    for resume in ("auto", "never", "must"):
        with pytest.raises(ResumeRefused) as e:
            check_resume(second, shared, resume)
        assert f"belongs to another run, {first.resolve()}" in str(e.value)
    # Its own run still resumes from it.
    assert check_resume(first, CONFIG, "auto") == 3


def test_a_dangling_newest_step_link_is_refused_until_removed(tmp_path):
    """Today every relaunch retrains from the older step and then fails to commit over the link."""
    make_checkpoint(tmp_path, 5)
    link = tmp_path / "checkpoints" / "step-10"
    link.symlink_to(tmp_path / "unmounted" / "step-10")
    with pytest.raises(ResumeRefused) as e:
        check_resume(tmp_path, CONFIG, "auto")
    assert str(e.value) == (
        f"{link} is a symlink to {tmp_path / 'unmounted' / 'step-10'}, which is not a directory (missing, or "
        "not mounted): restore it, or remove it to resume from step 5"
    )
    link.unlink()
    assert check_resume(tmp_path, CONFIG, "auto") == 5


def test_an_unwritable_checkpoint_folder_is_found_at_launch(tmp_path):
    """Today it is found at the first save, after the training up to it."""
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" / "checkpoints"
    config = {**CONFIG, "checkpoint": {"folder": str(folder)}}
    with pytest.raises(ConfigError) as e:
        check_resume(tmp_path, config, "auto")
    assert str(e.value).startswith(f"cannot write {folder} (") and "set checkpoint.folder to" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    # A run that saves no checkpoint does not need it.
    assert (
        check_resume(tmp_path, {**CONFIG, "checkpoint": {"folder": str(folder), "enable": False}}, "auto")
        is None
    )


def test_an_unwritable_run_dir_is_found_at_launch(tmp_path, monkeypatch):
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir, **kwargs):  # root writes anywhere a file system lets it: simulate one
        if Path(dir) == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError) as e:
        check_resume(tmp_path, CONFIG, "auto")
    assert str(e.value) == (
        f"cannot write {tmp_path} (Read-only file system): free space there, make it writable, or set run.root "
        "to another place"
    )


def test_a_full_disk_at_start_is_one_line(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "write", full)
        with pytest.raises(ConfigError) as e:
            check_resume(tmp_path, CONFIG, "auto")
    assert str(e.value).startswith(f"cannot write {tmp_path} (No space left on device): free space there")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".write-test")]  # the probe cleaned up

    # Writing the run's files (config.yaml, ...) inside `writing`: the file named, one line.
    with pytest.raises(ConfigError) as e, writing(tmp_path, "run.root"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "config.yaml"))
    assert str(e.value).startswith(f"cannot write {tmp_path / 'config.yaml'} (No space left on device)")


ONE_RANK = [*SMALL, "parallelism=single", "cluster.nproc_per_node=1", "training.steps=4"]


@pytest.mark.slow
def test_lost_or_shared_checkpoint_folders_through_launch_py(tmp_path):
    """The issue's commands: each refusal is one line, leaves the run's files alone, and its hints work."""
    launch(*ONE_RANK, "run.name=A", root=tmp_path)
    (first,) = tmp_path.glob("*/A")
    logged = metrics(first)

    shutil.move(first / "checkpoints", tmp_path / "elsewhere")
    refused = launch(*ONE_RANK, "run.name=A", "training.steps=6", root=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("error: the checkpoint folder"), (
        refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1
    assert metrics(first) == logged
    shutil.move(tmp_path / "elsewhere", first / "checkpoints")

    shared = ["run.name=B", "optimizer.lr=1e-3"]
    refused = launch(*ONE_RANK, *shared, "checkpoint.folder=../A/checkpoints", root=tmp_path, check=False)
    assert refused.returncode == 2 and "belongs to another run" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert names(first / "checkpoints") == ["step-2", "step-4"]
    # The hint: B starts from A's weights, in a folder of its own.
    hint = refused.stderr.split("checkpoint.initial_load_path=")[1].split(";")[0]
    started = launch(*ONE_RANK, *shared, f"checkpoint.initial_load_path={hint}", root=tmp_path)
    assert f"initial weights from {hint}" in started.stderr
    assert names(first / "checkpoints") == ["step-2", "step-4"]

    # Starting A again from step 0, as its refusal offers, works when its checkpoints are gone.
    shutil.rmtree(first / "checkpoints")
    again = launch(*ONE_RANK, "run.name=A", "run.resume=never", root=tmp_path)
    assert "from step 0" in again.stderr and [m["step"] for m in metrics(first)] == [
        m["step"] for m in logged
    ]


@pytest.mark.slow
def test_a_relative_and_an_absolute_data_path_are_one_run(tmp_path):
    """The saved config holds data.path and data.tokenizer absolute; the run name and the resume
    comparison use them so, whichever way they were spelled."""
    relative = "titan/assets/c4_test/c4-train.00000-of-00001.json"  # from the repository, where launch runs
    tokenizer = "titan/assets/tokenizers/titan_debug.tiktoken"
    spelled = [f"data.path={relative}", f"data.tokenizer=./{tokenizer}", "optimizer.schedule=constant"]
    launch(*ONE_RANK, "data=jsonl", *spelled, "training.steps=2", root=tmp_path)
    (run_dir,) = tmp_path.glob("*/*")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert (saved["path"], saved["tokenizer"]) == (str(REPO / relative), str(REPO / tokenizer))
    absolute = [
        f"data.path={REPO / relative}",
        f"data.tokenizer={REPO / tokenizer}",
        "optimizer.schedule=constant",
    ]
    again = launch(*ONE_RANK, "data=jsonl", *absolute, "training.steps=4", root=tmp_path)
    assert "resuming from step 2" in again.stderr, again.stderr
    assert list(tmp_path.glob("*/*")) == [run_dir]


def test_keys_added_at_their_default_leave_the_run_name_as_it_was():
    """data.sources and data.mix_seed (mixtures) joined the identity later: at their defaults they are
    left out, so a run launched before keeps its directory; a mixture is named by its sources."""
    before = {"data.source": "jsonl", "data.path": "/d.jsonl", "optimizer.lr": 0.1}
    now = {**before, "data.sources": [], "data.mix_seed": 0, "data.on_source_end": "wrap"}
    assert identity_of(now) == identity_of(before)
    assert run_name([], identity_of(now), [], in_sweep=False) == run_name(
        [], identity_of(before), [], in_sweep=False
    )
    mixture = {
        **now,
        "data.source": "mixture",
        "data.sources": [{"name": "a", "path": "/a.jsonl", "source": "jsonl"}],
    }
    assert identity_of(mixture)["data.sources"] == mixture["data.sources"]
