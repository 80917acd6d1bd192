"""training.rope_positions=document: every forward, on every pipeline stage, gets each token's position
within its document, and training with it lowers the loss."""

import pytest
import torch

from tests.multirank import spawn_ranks
from tests.utils import check_loss_falls, tiny_config
from titan.config.errors import ConfigError
from titan.launch.validate import validate
from titan.models.llama.attention import document_ids
from titan.train.trainer import Trainer

DOCUMENT_POSITIONS = {"attention": "block_causal", "rope_positions": "document"}


def _record_positions(rank: int, world: int, cfg, seen: list) -> None:
    trainer = Trainer(cfg)  # the harness owns the process group, or this is a group of one
    calls = []

    def spy(module, args, kwargs):
        calls.append((kwargs.get("documents"), kwargs.get("positions")))

    for part in trainer.model_parts:
        part.register_forward_pre_hook(spy, with_kwargs=True)
    trainer.train()
    assert calls, "no forward"
    restarts = 0
    for documents, positions in calls:
        assert documents is not None and positions is not None, "a forward without document positions"
        assert positions.shape == documents.shape
        for doc_row, pos_row in zip(documents.tolist(), positions.tolist()):
            for i, (doc, pos) in enumerate(zip(doc_row, pos_row)):
                start = doc_row.index(doc)  # the document's first token in this window
                assert pos == i - start, (doc_row, pos_row)
                restarts += i > 0 and pos == 0
    assert restarts > 0, "no document started inside a window: the test data shows nothing"
    seen.append(len(calls))


def test_each_forward_gets_positions_within_documents(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, parallelism={"dp_shard": 1}, training=_training(tmp_path))
    seen = []
    _record_positions(0, 1, cfg, seen)
    # batch 8, micro-batch 2: four forwards per step
    assert seen == [8]


@pytest.mark.slow
def test_every_pipeline_stage_gets_the_positions(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, parallelism={"dp_shard": 1, "pp": 2}, training=_training(tmp_path))
    spawn_ranks(_record_positions, 2, cfg, [])


def _training(tmp_path) -> dict:
    return {**DOCUMENT_POSITIONS, "seq_len": 128}  # windows long enough to hold a document start


def test_training_with_document_positions_lowers_the_loss(tmp_path):
    check_loss_falls(tmp_path, training=_training(tmp_path))


def test_document_positions_need_the_document_mask(tmp_path):
    cfg = tiny_config(tmp_path, training={"rope_positions": "document"})
    with pytest.raises(ConfigError, match=r"rope_positions=document .* set training\.attention=block_causal"):
        validate(cfg, world=1)


def test_document_ids_start_at_bos():
    assert document_ids(torch.tensor([[5, 1, 7, 1, 1]]), bos_id=1).tolist() == [[0, 1, 1, 2, 3]]
