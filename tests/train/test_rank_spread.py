"""Stragglers in every run's metrics: the slowest and fastest rank's step time and the rank waiting
longest for data, gathered at log steps over the CPU control group."""

import time

import pytest

from tests.multirank import spawn_ranks
from tests.utils import read_metrics, tiny_config
from titan.train.trainer import Trainer

pytestmark = pytest.mark.slow

DELAY_S = 0.3  # added to rank 1's data wait on every step: far above the tiny model's step time


def _train_with_slow_data_on_rank_1(rank: int, world: int, cfg) -> None:
    trainer = Trainer(cfg)  # the harness owns the process group
    if rank == 1:
        batches = trainer.loader._batches

        def slow_batches(items, parts):
            for batch in batches(items, parts):
                time.sleep(DELAY_S)
                yield batch

        trainer.loader._batches = slow_batches
    trainer.train()


def test_the_rank_slow_to_get_data_is_named(tmp_path):
    cfg = tiny_config(tmp_path, steps=4, checkpoint={"enable": False}, metrics={"log_freq": 2})
    spawn_ranks(_train_with_slow_data_on_rank_1, 2, cfg)
    records = [r for r in read_metrics(tmp_path) if r["step"] > 1]  # past the warm-up step
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["data_time_max_rank"] == 1, r
        assert r["data_time_max_ms"] >= 1000 * DELAY_S, r
        # the ranks meet at every collective: rank 0 waits in them for as long as rank 1 waits for data
        assert r["step_time_min_ms"] >= 1000 * DELAY_S, r
        assert r["step_time_min_ms"] <= r["step_time_max_ms"] < r["step_time_min_ms"] * 1.5, r
        assert 0 <= r["step_time_max_rank"] < 2
