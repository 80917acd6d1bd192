import pytest

from tests.checkpoint.common import LAYOUTS, launch, one_rank_config, resume_config
from titan.train.trainer import run


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """The uninterrupted 20-step run of a (mode, layout), made once per test process."""
    done = {}

    def get(mode: str = "sync", layout: str = "fsdp2"):
        if (mode, layout) not in done:
            run_dir = tmp_path_factory.mktemp(f"full-{mode}-{layout}")
            launch(resume_config(run_dir, mode=mode, layout=layout), LAYOUTS[layout][0])
            done[mode, layout] = run_dir
        return done[mode, layout]

    return get


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    """A finished one-process 4-step run with complete checkpoints at steps 2 and 4 (read only)."""
    run_dir = tmp_path_factory.mktemp("saved")
    run(one_rank_config(run_dir, keep_latest_k=0))
    return run_dir
