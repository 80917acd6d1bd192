"""Nothing in a config file or an override calls code, and no secret is resolved into a run's files."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.launch.test_launch import REPO, launch
from titan.config.errors import ConfigError
from titan.launch.build import build_run_config
from titan.launch.safety import check_config_files, check_overrides

# Each route by which Hydra instantiates, or titan once did.
CODE_ROUTES = [
    ("training.seed={_target_:titan.launch.jobstate._run,cmd:[touch,PWNED]}", "_target_"),
    ("run._target_=titan.launch.jobstate.record", "_target_"),
    ("+run._args_=[outside,owned]", "_args_"),
    ("+model._partial_=true", "_partial_"),
    ("+data._recursive_=false", "_recursive_"),
    ("+optimizer._convert_=all", "_convert_"),
    ("cluster.sbatch_args={x:{_target_:os.system}}", "_target_"),  # a field that takes any value
    ("hydra.launcher._target_=os.system", "_target_"),
    ("optimizer.lr=1e-4,{_target_:os.system}", "_target_"),  # inside a sweep
    ("+hydra.callbacks.x={_target_:titan.launch.jobstate._run,cmd:[touch,CB]}", "callbacks"),
    ("hydra/callbacks=anything", "callbacks"),
]


@pytest.mark.parametrize("override, named", CODE_ROUTES)
def test_an_override_that_names_code_is_refused(override, named):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0].lstrip('+')}.*{named}|.*{named}"):
        check_overrides([override])


def test_flags_and_their_values_are_not_overrides():
    check_overrides(["-m", "--config-dir", "/some/dir", "--config-name", "config", "--cfg", "job", "x=1"])


def test_a_target_key_anywhere_in_a_config_is_refused():
    """As a saved config.yaml started as a primary config would bring it, in a field of any value."""
    node = OmegaConf.create({"cluster": {"sbatch_args": {"x": {"_target_": "os.system"}}}})
    with pytest.raises(ConfigError, match=r"^cluster.sbatch_args.x._target_: names code to run"):
        build_run_config(node)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_files_that_would_run_code_are_refused(tmp_path):
    check_config_files([REPO / "conf", REPO / "sweeps"])  # titan's own pass (conf/hydra/ names plugins)
    experiment = "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: os.system\n"
    for name, text, named in [
        ("experiment/cb.yaml", experiment, "callbacks"),
        ("hydra/callbacks/cb.yaml", "x: 1\n", "callbacks"),
        ("model/evil.yaml", "dim: {_target_: os.system}\n", "_target_"),
    ]:
        folder = tmp_path / name.replace("/", "_")
        write(folder, name, text)
        with pytest.raises(ConfigError, match=named):
            check_config_files([folder])


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.name=x-${oc.env:AWS_SECRET_ACCESS_KEY}", "run.name names the run directory"),
        ("run.root=/tmp/${oc.env:USER}", "run.root names the run directory"),
        ("data.path=${oc.env:GITHUB_PAT}/c4", "looks like a secret"),
        ("data.tokenizer=${oc.env:DB_PASSWD}", "looks like a secret"),
    ],
)
def test_an_environment_secret_is_not_resolved_into_the_run(override, message):
    with pytest.raises(ConfigError, match=message):
        check_overrides([override])
    check_overrides(["data.path=${oc.env:DATA_DIR}/c4"])  # a path from the environment is fine


def test_the_command_line_refuses_before_anything_runs(tmp_path):
    """End to end: the overrides that ran `touch` through titan's own helpers create nothing."""
    for override in (CODE_ROUTES[0][0], CODE_ROUTES[-2][0]):
        proc = launch(override, "training.steps=1", root=tmp_path / "runs", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (REPO / "PWNED").exists() and not (REPO / "CB").exists()
    assert not (tmp_path / "runs").exists()


def test_run_files_are_not_world_readable(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import os; from titan.launch.main import run; "
         "run(lambda: open('f', 'w').close(), conf=__import__('pathlib').Path('conf'), "
         "sweeps=__import__('pathlib').Path('sweeps')); print(oct(os.stat('f').st_mode & 0o777))"],
        cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip(), 8) & 0o007 == 0
