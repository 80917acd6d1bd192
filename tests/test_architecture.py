"""The import contracts in pyproject.toml hold, and an import that breaks one makes lint-imports fail."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy's packages, not the installed checkout, are what gets analysed.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=root, env=env, capture_output=True, text=True
    )


def copy_of_the_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for package in ("titan", "hydra_plugins"):
        shutil.copytree(
            REPO / package,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.tiktoken", "*.model"),
        )
    shutil.copy(REPO / "pyproject.toml", root)
    return root


def test_the_contracts_are_kept():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    root = copy_of_the_tree(tmp_path)
    mesh = root / "titan" / "distributed" / "mesh.py"
    mesh.write_text(mesh.read_text() + "\nfrom titan.models.llama import model  # noqa: E402\n")
    proc = lint_imports(root)
    assert proc.returncode != 0
    assert "Layers import downward only BROKEN" in proc.stdout
    assert "titan.distributed.mesh -> titan.models.llama.model" in proc.stdout


def test_hydra_below_the_launch_layer_breaks_the_contract(tmp_path):
    root = copy_of_the_tree(tmp_path)
    trainer = root / "titan" / "train" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\nimport omegaconf  # noqa: E402\n")
    proc = lint_imports(root)
    assert proc.returncode != 0
    assert "Hydra and OmegaConf stay in the launch layer and above BROKEN" in proc.stdout
