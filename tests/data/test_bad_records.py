"""Bad records past the pre-flight: one line naming file and line, with or without workers, the step
before them kept; or, with data.on_bad_record=skip, passed over deterministically and counted."""

import itertools
import json
import logging
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.launch.compose import compose_config
from tests.utils import read_metrics, read_model, tiny_config
from titan.assets import asset_path
from titan.checkpoint.format import complete_steps
from titan.config.errors import ConfigError
from titan.config.schema import DataConfig
from titan.data.checks import check_data
from titan.data.formats import BadRecord
from titan.data.loader import TrainLoader
from titan.launch.build import build_run_config
from titan.launch.validate import validate, world_size
from titan.train.trainer import run

SHARD = asset_path("c4_test/c4-train.00000-of-00001.json")
TOKENIZER = str(asset_path("tokenizers/titan_debug.tiktoken"))
BAD_LINE = 40
# What can be wrong with line 40 of a jsonl file, and what its one line then says.
BAD_JSONL = {
    "not-json": (b'{"text": "cut', "not JSON (Unterminated string starting at)"),
    "no-field": (b'{"txet": "typo", "id": 39}', "no field 'text' (the record has ['id', 'txet'])"),
    "not-a-string": (b'{"text": null}', "field 'text' holds NoneType, not text"),
    "invalid-utf8": (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13 of the line"),
}
FIX = {
    "not-json": "data.source=jsonl needs one JSON object per line",
    "no-field": "set data.text_field",
    "not-a-string": "set data.text_field",
    "invalid-utf8": "the files of data.path must be UTF-8 text",
}
SKIP_HINT = ", or set data.on_bad_record=skip to skip and count such records"


def short_texts(n):
    """Documents of under 45 words: the streams reach line 40 within a few steps."""
    lines = SHARD.read_text(encoding="utf-8").splitlines()
    return [t for t in (json.loads(line)["text"] for line in lines) if len(t.split()) < 45][:n]


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def jsonl_with(tmp_path, line40, name="d.jsonl", n=60):
    """`n` documents, one JSON object per line, whose line 40 is `line40`."""
    lines = [json.dumps({"text": t}).encode() for t in short_texts(n)]
    lines[BAD_LINE - 1] = line40
    return write_lines(tmp_path / name, lines)


def loader(data, batch=4, seq_len=31):
    return TrainLoader(data, seq_len=seq_len, global_batch_size=batch, dp_rank=0, dp_degree=1)


def jsonl(path, **kw):
    return DataConfig(source="jsonl", path=str(path), tokenizer=TOKENIZER, **kw)


def until_error(train_loader, limit=200):
    """The batches handed out before the loader raised, and the error."""
    batches = []
    it = iter(train_loader)
    with pytest.raises(ValueError) as e:
        for _ in range(limit):
            batches.append(next(it)[0])
    train_loader.close()
    return batches, e.value


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", sorted(BAD_JSONL))
def test_a_bad_record_at_line_40_is_one_line_naming_file_and_line(tmp_path, kind, workers):
    path = jsonl_with(tmp_path, BAD_JSONL[kind][0])
    check_data(jsonl(path))  # the pre-flight reads the first record only
    clean = take(loader(jsonl(jsonl_with(tmp_path, b"", name="clean.jsonl"))), 40)
    train_loader = loader(jsonl(path, num_workers=workers))
    batches, error = until_error(train_loader)
    assert type(error) is BadRecord
    assert str(error) == f"{path}, line {BAD_LINE}: {BAD_JSONL[kind][1]}; {FIX[kind]}{SKIP_HINT}"
    # it stops at the step that needs line 40, before handing it out: what came before is the data's
    assert 1 < len(batches) < 40 and all(torch.equal(b, c) for b, c in zip(batches, clean))
    # the state is that of the last batch handed out: a resume from it fails at the same step
    resumed = loader(jsonl(path))
    resumed.load_state_dict(json.loads(json.dumps(train_loader.state_dict())))
    again, same = until_error(resumed)
    assert again == [] and str(same) == str(error)


def take(train_loader, steps):
    batches = [inputs for inputs, _ in itertools.islice(iter(train_loader), steps)]
    train_loader.close()
    return batches


def test_the_step_of_the_error_does_not_depend_on_workers(tmp_path):
    path = jsonl_with(tmp_path, BAD_JSONL["no-field"][0])
    steps = {w: len(until_error(loader(jsonl(path, num_workers=w), batch=8))[0]) for w in (0, 2)}
    assert len(set(steps.values())) == 1, steps


@pytest.mark.parametrize("workers", [0, 2])
def test_a_null_parquet_row_is_named_by_row(tmp_path, workers):
    texts = short_texts(60)
    texts[BAD_LINE - 1] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=16)
    data = DataConfig(source="parquet", path=str(tmp_path / "d.parquet"), tokenizer=TOKENIZER)
    _, error = until_error(loader(replace(data, num_workers=workers)))
    assert (
        str(error)
        == f"{tmp_path / 'd.parquet'}, row {BAD_LINE}: column 'text' is null; every row needs text{SKIP_HINT}"
    )


def test_an_unreadable_parquet_row_group_is_named_by_row(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": short_texts(60)}), tmp_path / "d.parquet", row_group_size=16)
    read_row_group = pq.ParquetFile.read_row_group

    def damaged(self, group, **kw):  # row group 2 (rows 33-48) holds a page that does not decompress
        if group == 2:
            raise OSError("Corrupt snappy compressed data.")
        return read_row_group(self, group, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", damaged)
    data = DataConfig(source="parquet", path=str(tmp_path / "d.parquet"), tokenizer=TOKENIZER)
    _, error = until_error(loader(data))
    assert str(error).startswith(
        f"{tmp_path / 'd.parquet'}, row 3"
    ) and "its row group cannot be read (Corrupt snappy compressed data.); replace the file" in str(error)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_passes_over_a_bad_record_like_an_empty_document_and_counts_it(tmp_path, workers, caplog):
    # A skipped record keeps its place in the order of documents (streams are dealt by record number),
    # so the batches are exactly those of the file with that line blank; only the counters differ.
    blank = loader(jsonl(jsonl_with(tmp_path, b"", name="blank.jsonl"), num_workers=workers))
    expected = take(blank, 60)
    blank_state = blank.state_dict()
    bad = loader(
        jsonl(jsonl_with(tmp_path, BAD_JSONL["not-json"][0]), num_workers=workers, on_bad_record="skip")
    )
    with caplog.at_level(logging.WARNING, logger="titan"):
        assert torch.equal(torch.stack(take(bad, 60)), torch.stack(expected))
    state = bad.state_dict()
    (slot,) = [key for key, s in state.items() if s["bad_records"]]
    assert state[slot]["bad_records"] == 2  # once in each epoch
    for key in state:
        counted = {
            **state[key],
            "skipped": state[key]["skipped"] + state[key]["bad_records"],
            "bad_records": 0,
        }
        assert counted == blank_state[key]
    if workers == 0:  # a worker's log records go to its own process
        assert f"skipped {tmp_path / 'd.jsonl'}, line {BAD_LINE}: not JSON" in caplog.text
        assert "2 skipped so far in sequence slot 3" in caplog.text


@pytest.mark.parametrize(("before", "after"), [(0, 0), (2, 0), (0, 2)])
def test_skip_resumes_exactly_across_the_bad_record(tmp_path, before, after):
    data = jsonl(jsonl_with(tmp_path, BAD_JSONL["invalid-utf8"][0]), on_bad_record="skip")
    probe, expected, counts = loader(data), [], []
    for inputs, _ in itertools.islice(iter(probe), 40):
        expected.append(inputs)
        counts.append(sum(s["bad_records"] for s in probe.state_dict().values()))
    hit = counts.index(1) + 1  # the step that passes over line 40
    assert 2 < hit < 30
    first = loader(replace(data, num_workers=before))
    assert torch.equal(torch.stack(take(first, hit - 1)), torch.stack(expected[: hit - 1]))
    before_it = json.loads(json.dumps(first.state_dict()))
    second = loader(replace(data, num_workers=after))
    second.load_state_dict(before_it)
    assert torch.equal(torch.stack(take(second, 3)), torch.stack(expected[hit - 1 : hit + 2]))
    after_it = json.loads(json.dumps(second.state_dict()))
    assert sum(s["bad_records"] for s in after_it.values()) == 1
    third = loader(replace(data, num_workers=before))
    third.load_state_dict(after_it)
    assert third.state_dict() == after_it  # the state round-trips
    assert torch.equal(torch.stack(take(third, 40 - hit - 2)), torch.stack(expected[hit + 2 :]))


def test_a_state_without_the_bad_record_count_loads(tmp_path):
    """States saved before data.on_bad_record existed have no `bad_records`: it starts at 0."""
    data = jsonl(jsonl_with(tmp_path, b""))
    first = loader(data)
    take(first, 3)
    old = {key: {k: v for k, v in s.items() if k != "bad_records"} for key, s in first.state_dict().items()}
    resumed = loader(data)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == first.state_dict()


def test_preflight_with_skip_passes_over_a_bad_first_record_but_not_a_wrong_field(tmp_path):
    texts = [json.dumps({"text": t}).encode() for t in short_texts(20)]
    path = write_lines(tmp_path / "d.jsonl", [b"{oops", *texts])
    with pytest.raises(BadRecord, match=r"d\.jsonl, line 1: not JSON"):
        check_data(jsonl(path))
    check_data(jsonl(path, on_bad_record="skip"))
    wrong_field = jsonl(path, on_bad_record="skip", text_field="content")
    with pytest.raises(ValueError) as e:
        check_data(wrong_field)
    assert str(e.value) == (
        f"{path}: none of its first 16 records has text (line 1: not JSON (Expecting property name "
        "enclosed in double quotes)); data.on_bad_record=skip passes over bad records, not a file that "
        "starts with no good one: check data.text_field and data.source"
    )


def test_on_bad_record_takes_raise_or_skip(tmp_path):
    assert build_run_config(compose_config(["data.on_bad_record=skip"])).data.on_bad_record == "skip"
    cfg = build_run_config(compose_config(["data.on_bad_record=warn"]))
    with pytest.raises(ConfigError, match=r"data\.on_bad_record='warn' is not one of raise, skip"):
        validate(cfg, world_size(cfg, gpus_on_machine=0))
    with pytest.raises(ValueError, match=r"data\.on_bad_record='warn' is not one of raise, skip"):
        loader(jsonl(jsonl_with(tmp_path, b""), on_bad_record="warn"))


def test_a_run_stops_at_the_bad_record_before_the_step_and_keeps_its_checkpoints(tmp_path):
    path = jsonl_with(tmp_path, BAD_JSONL["no-field"][0])
    cfg = tiny_config(tmp_path / "run", steps=30, parallelism={"dp_shard": 1}, checkpoint={"interval": 2})
    cfg = cfg.replace(data={"path": str(path)})
    failing_step = len(until_error(loader(cfg.data, batch=8, seq_len=32))[0]) + 1
    assert failing_step > 3
    with pytest.raises(BadRecord, match=rf"d\.jsonl, line {BAD_LINE}: no field 'text'"):
        run(cfg)
    run_dir = tmp_path / "run"
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, failing_step))  # no update at it
    last = (failing_step - 1) // 2 * 2
    assert complete_steps(run_dir / "checkpoints")[-1] == last and read_model(
        run_dir, last
    )  # complete and readable
