"""A run directory written by an earlier titan (commit b8ca95a) resumes with this checkout's launch.py.

tests/fixtures/run_b8ca95a holds what that run left behind and a resume needs: config.yaml,
overrides.yaml, metrics.jsonl (steps 1-2) and checkpoints/step-2, plus reference_metrics.jsonl, the
same run trained to step 4 without interruption (SOURCE.md there says how they were made). The
directory paths in config.yaml and overrides.yaml are placeholders, filled in here with this
checkout's bundled assets and the copy's location, so config.yaml reads exactly as that code would
have written it for a run in this place; the bundled data are the same bytes.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.launch.test_launch import launch, metrics
from titan.assets import ASSETS_DIR

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_b8ca95a"
PLACEHOLDER_FILES = ("config.yaml", "overrides.yaml")


def copy_fixture(root: Path) -> Path:
    """The fixture as a run directory <root>/<group>/<name>, its placeholders filled in."""
    saved = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    run_dir = root / saved["run"]["group"] / saved["run"]["name"]
    shutil.copytree(FIXTURE, run_dir)
    values = {"__RUN_ROOT__": str(root), "__TITAN_ASSETS__": str(ASSETS_DIR)}
    for name in PLACEHOLDER_FILES:
        text = (run_dir / name).read_text()
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        (run_dir / name).write_text(text)
    return run_dir


# The reference ran on another CPU, whose kernels sum in another order under bf16 autocast: the same
# commit's steps 3-4 there and here differ by up to 2e-6 relative (measured). A resume that loaded the
# wrong weights or the wrong data position is off by 1e-3 or more at step 3.
TOLERANCE = 1e-5


@pytest.mark.slow
def test_a_run_dir_of_b8ca95a_resumes_and_continues(tmp_path):
    root = tmp_path / "runs"
    run_dir = copy_fixture(root)
    assert str(ASSETS_DIR) in (run_dir / "config.yaml").read_text()
    # The fixture's own command line, with more steps (run.root is added by `launch`).
    saved_overrides = yaml.safe_load((FIXTURE / "overrides.yaml").read_text())
    overrides = [
        o for o in saved_overrides if not o.startswith(("training.steps=", "run.root=", "run.name="))
    ]

    proc = launch(*overrides, "training.steps=4", f"run.name={run_dir.name}", root=root)

    output = proc.stdout + proc.stderr
    assert re.search(r"resuming from step 2\b", output), output
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == [1, 2, 3, 4], output
    assert (run_dir / "checkpoints" / "step-4").is_dir()

    lines = (FIXTURE / "reference_metrics.jsonl").read_text().splitlines()
    reference = {m["step"]: m for m in map(json.loads, lines)}
    for m in logged:
        if m["step"] in (3, 4):
            ref = reference[m["step"]]
            for key in ("loss", "grad_norm"):
                assert m[key] == pytest.approx(ref[key], rel=TOLERANCE), (
                    f"step {m['step']} {key}: {m[key]!r} after resuming, {ref[key]!r} uninterrupted at b8ca95a"
                )
