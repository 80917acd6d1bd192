"""Validation on held-out data: the documents, the batches, the loss, and that training never notices.

Tolerance: a layout's validation loss equals the single process's within 1e-5 relative (the losses
differ only in summation order, as in tests/dist/test_parity.py), and the hand computation with
F.cross_entropy within 1e-5 (the same fp32 logits, summed in another order).
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.utils import C4_TEST, TINY_MODEL, read_metrics, read_model, tiny_config
from titan.config.errors import ConfigError
from titan.config.schema import SourceConfig
from titan.data.holdout import HeldOutSplit
from titan.data.loader import TrainLoader
from titan.data.pretokenize import pretokenize
from titan.data.records import LocalFiles
from titan.launch.local import launch_local
from titan.launch.validate import validate, validate_data
from titan.models.llama.model import Transformer
from titan.train.trainer import Trainer, run
from titan.train.validation import HeldOutBatches

HOLDOUT = 5
VALIDATION = {"enable": True, "every": 2, "steps": 2}


def numbered_documents(path: Path, n: int) -> Path:
    """n documents, each naming its number (`doc17x`) among ordinary words, one file."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc{i}x " + "the quick brown fox jumps over a dog. " * 6}) + "\n")
    return path


def documents_read(loader: TrainLoader, batches: int) -> set[int]:
    found = set()
    for _, (inputs, _) in zip(range(batches), loader):
        for row in inputs.tolist():
            found |= {int(n) for n in re.findall(r"doc(\d+)x", loader.tokenizer.decode(row))}
    return found


def test_the_split_puts_every_record_in_exactly_one_part():
    files = LocalFiles(C4_TEST, [Path(C4_TEST.path)])
    total = files.count(0)
    train, heldout = (HeldOutSplit(files, HOLDOUT, part) for part in ("train", "heldout"))
    train_records = [train.record(i) for i in range(train.count(0))]
    heldout_records = [heldout.record(i) for i in range(heldout.count(0))]
    assert heldout_records == list(range(HOLDOUT - 1, total, HOLDOUT))
    assert sorted(train_records + heldout_records) == list(range(total))
    assert heldout.text(0, 1) == files.text(0, 2 * HOLDOUT - 1)


def test_held_out_documents_are_never_trained_on(tmp_path):
    data = replace(C4_TEST, path=str(numbered_documents(tmp_path / "docs.jsonl", 60)), holdout_every=HOLDOUT)
    kwargs = dict(seq_len=64, global_batch_size=4, dp_rank=0, dp_degree=1)
    # 30 steps of 4 windows of 64 tokens read every document more than once (they wrap into epochs)
    trained = documents_read(TrainLoader(data, **kwargs), 30)
    held_out = documents_read(TrainLoader(data, part="heldout", **kwargs), 30)
    assert held_out == set(range(HOLDOUT - 1, 60, HOLDOUT))
    assert trained == set(range(60)) - held_out


def test_the_batches_are_the_same_at_every_evaluation_and_dp_degree(tmp_path):
    cfg = tiny_config(tmp_path, data={"holdout_every": HOLDOUT}, validation=VALIDATION)
    whole = list(HeldOutBatches(cfg, dp_rank=0, dp_degree=1))
    assert len(whole) == VALIDATION["steps"]
    again = list(HeldOutBatches(cfg, dp_rank=0, dp_degree=1))
    halves = [list(HeldOutBatches(cfg, dp_rank=r, dp_degree=2)) for r in range(2)]
    batches = HeldOutBatches(cfg, dp_rank=0, dp_degree=1)
    first, second = list(batches), list(batches)  # evaluated twice by one run
    for i, (inputs, labels) in enumerate(whole):
        for other in (again[i], first[i], second[i]):
            assert torch.equal(other[0], inputs) and torch.equal(other[1], labels)
        assert torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), inputs)


def _hand_loss(cfg, run_dir: Path, step: int) -> float:
    model = Transformer(TINY_MODEL)
    model.load_state_dict(read_model(run_dir, step), strict=True)
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for inputs, labels in HeldOutBatches(cfg, dp_rank=0, dp_degree=1):
            logits = model(inputs)
            losses += F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), reduction="sum").item()
            tokens += labels.numel()
    return losses / tokens


def _val(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_validation_loss_is_the_mean_token_loss_and_leaves_training_alone(tmp_path):
    steps = 4
    checkpoint = {"interval": 2}  # weights at the evaluated steps 2 and 4
    groups = dict(data={"holdout_every": HOLDOUT}, checkpoint=checkpoint, parallelism={"dp_shard": 1})
    with_validation = tiny_config(tmp_path / "with", steps=steps, validation=VALIDATION, **groups)
    without = tiny_config(tmp_path / "without", steps=steps, **groups)
    rng, loader_states = {}, {}
    for name, cfg in (("with", with_validation), ("without", without)):
        trainer = Trainer(cfg)
        try:
            trainer.train()
            rng[name] = torch.get_rng_state()
            loader_states[name] = trainer.loader.state_dict()
        finally:
            trainer.close()

    records = read_metrics(tmp_path / "with")
    val = _val(records)
    assert sorted(val) == [2, 4]
    for step, loss in val.items():
        assert loss == pytest.approx(_hand_loss(with_validation, tmp_path / "with", step), rel=1e-5)
    assert val[4] < val[2]  # SGD at lr 0.5 on the tiny model: the held-out loss falls too
    assert all(
        r["val_perplexity"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item())
        for r in records
        if "val_loss" in r
    )

    # Bitwise: every step's loss, the weights, the RNG and the loader state.
    train_losses = [
        [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("with", "without")
    ]
    assert train_losses[0] == train_losses[1]
    weights = [read_model(tmp_path / name, steps) for name in ("with", "without")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert torch.equal(rng["with"], rng["without"])
    assert loader_states["with"] == loader_states["without"]


def test_validation_reads_any_data_config(tmp_path):
    """A held-out file of its own, and a mixture holding documents out of each source."""
    valid = numbered_documents(tmp_path / "valid.jsonl", 40)
    run(
        tiny_config(
            tmp_path / "file", steps=2, validation={**VALIDATION, "data": replace(C4_TEST, path=str(valid))}
        )
    )
    assert sorted(_val(read_metrics(tmp_path / "file"))) == [2]

    mixture = {
        "source": "mixture",
        "path": "",
        "holdout_every": HOLDOUT,
        "sources": (
            SourceConfig(name="c4", path=C4_TEST.path, weight=3.0),
            SourceConfig(name="numbered", path=str(numbered_documents(tmp_path / "train.jsonl", 80))),
        ),
    }
    run(tiny_config(tmp_path / "mixture", steps=2, data=mixture, validation=VALIDATION))
    assert sorted(_val(read_metrics(tmp_path / "mixture"))) == [2]


def test_pretokenized_validation_data_scores_like_its_text(tmp_path):
    """Token shards of the held-out file give the validation loss of the file itself."""
    valid = replace(C4_TEST, path=str(numbered_documents(tmp_path / "valid.jsonl", 40)))
    shards = pretokenize(valid, tmp_path / "valid-tokens", progress=False)
    losses = {}
    for name, data in (("text", valid), ("tokens", replace(valid, source="tokens", path=str(shards)))):
        run(tiny_config(tmp_path / name, steps=2, validation={**VALIDATION, "data": data}))
        losses[name] = _val(read_metrics(tmp_path / name))
    assert sorted(losses["tokens"]) == [2] and losses["tokens"] == losses["text"]


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"validation": VALIDATION}, r"needs held-out data: set data\.holdout_every"),
        (
            {
                "validation": {**VALIDATION, "global_batch_size": 4},
                "data": {"holdout_every": 5},
                "parallelism": {"pp": 2},
            },
            r"validation\.global_batch_size=4 with parallelism\.pp=2",
        ),
        ({"validation": {**VALIDATION, "every": 0}, "data": {"holdout_every": 5}}, r"validation\.every=0"),
        ({"data": {"holdout_every": 1}}, r"data\.holdout_every=1 would hold out every document"),
    ],
)
def test_bad_validation_settings_are_refused(tmp_path, groups, message):
    cfg = tiny_config(tmp_path, **groups)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world=2)


def test_validation_data_sharing_training_files_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, validation={**VALIDATION, "data": C4_TEST})
    with pytest.raises(ConfigError, match=r"validation\.data reads 1 file\(s\) that training reads too"):
        validate_data(cfg)
    held_out_of_both = tiny_config(
        tmp_path,
        data={"holdout_every": HOLDOUT},
        validation={**VALIDATION, "data": replace(C4_TEST, holdout_every=HOLDOUT)},
    )
    validate_data(held_out_of_both)  # validation reads what training never does
    other_tokenizer = tiny_config(
        tmp_path, validation={**VALIDATION, "data": replace(C4_TEST, tokenizer="/elsewhere/tokenizer.model")}
    )
    with pytest.raises(
        ConfigError, match=r"validation\.data\.tokenizer=/elsewhere/tokenizer\.model is not data\.tokenizer"
    ):
        validate(other_tokenizer, world=1)


LAYOUTS = {
    "fsdp": ({"dp_shard": 2}, 2),
    "tp2": ({"dp_shard": 1, "tp": 2}, 2),
    "cp2": ({"dp_shard": 1, "cp": 2}, 2),
    "pp2": ({"dp_shard": 1, "pp": 2}, 2),
}


@pytest.fixture(scope="module")
def single_validation(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    launch_local(_layout_config(run_dir, {"dp_shard": 1}), nproc=1)
    return _val(read_metrics(run_dir))


def _layout_config(run_dir: Path, parallelism: dict):
    return tiny_config(
        run_dir,
        steps=2,
        data={"holdout_every": HOLDOUT},
        validation=VALIDATION,
        checkpoint={"enable": False},
        parallelism=parallelism,
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_validate_like_one_process(tmp_path, single_validation, layout):
    parallelism, nproc = LAYOUTS[layout]
    launch_local(_layout_config(tmp_path, parallelism), nproc=nproc)
    val = _val(read_metrics(tmp_path))
    assert sorted(val) == sorted(single_validation) == [2]
    assert val[2] == pytest.approx(single_validation[2], rel=1e-5)


def test_any_data_option_composes_as_the_validation_data():
    from tests.launch.compose import compose_config
    from titan.launch.build import build_run_config

    cfg = build_run_config(
        compose_config(
            [
                "+data@validation.data=jsonl",
                "validation.data.path=/data/valid.jsonl",
                "validation.enable=true",
            ]
        )
    )
    assert cfg.validation.data.source == "jsonl" and cfg.validation.data.path == "/data/valid.jsonl"
    assert cfg.validation.data.tokenizer == cfg.data.tokenizer  # the option's own, the bundled one
