"""A checkpoint saved under one parallel layout resumes under another, data loader included: the
resumed steps continue the uninterrupted run's losses within the layout tolerance (1e-5 relative,
fp32; layouts differ only in summation order, see tests/dist/test_parity.py).

Each pair changes the data-parallel degree, the sharding or the pipeline split; append pairs (and
LAYOUTS in common.py) as layouts land.
"""

import pytest

from tests.checkpoint.common import LAYOUTS, RESUME_AT, STEPS, launch, resume_config, rewind
from tests.utils import read_metrics

pytestmark = pytest.mark.slow

PAIRS = [
    ("fsdp2", "single"),
    ("single", "fsdp2"),
    ("fsdp2", "tp2"),
    ("fsdp2", "pp2-interleaved"),
    ("pp2-interleaved", "single"),
]


@pytest.mark.parametrize("saved,resumed", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_resume_on_another_layout(tmp_path, full_run, saved, resumed):
    full_dir = full_run("sync", saved)
    run_dir = rewind(full_dir, tmp_path / "resumed", RESUME_AT)
    launch(resume_config(run_dir, layout=resumed), LAYOUTS[resumed][0])
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / f'step-{RESUME_AT}'}" in log
    dp = 2 if resumed == "fsdp2" else 1
    assert f"for {STEPS} steps from step {RESUME_AT}: world {LAYOUTS[resumed][0]}, dp {dp}" in log
    got, want = read_metrics(run_dir), read_metrics(full_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for g, w in zip(got[RESUME_AT:], want[RESUME_AT:]):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), g["step"]
        assert g["lr"] == w["lr"]
    # the losses moved: equal losses after the resume are evidence, not a flat line
    assert abs(want[-1]["loss"] - want[RESUME_AT]["loss"]) > 0.1
