"""The training loader: packing against a reference, dp-degree independence, exact resume, sources, errors."""

import gzip
import itertools
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.launch.compose import compose_config, group_options
from titan.assets import asset_path
from titan.config.errors import ConfigError
from titan.config.schema import DataConfig
from titan.data.checks import check_data
from titan.data.loader import TrainLoader
from titan.data.tokenizer import build_tokenizer
from titan.launch.build import build_run_config

SHARD = asset_path("c4_test/c4-train.00000-of-00001.json")
TOKENIZER = str(asset_path("tokenizers/titan_debug.tiktoken"))
C4_TEST = DataConfig(source="jsonl", path=str(SHARD), tokenizer=TOKENIZER)


def shard_texts(n, start=0):
    lines = SHARD.read_text(encoding="utf-8").splitlines()[start : start + n]
    return [json.loads(line)["text"] for line in lines]


def short_texts(n):
    """The first `n` documents of under 45 words (about 60 tokens) of the shard."""
    return [t for t in shard_texts(400) if len(t.split()) < 45][:n]


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8"
    )
    return path


def jsonl(path, **kw):
    return DataConfig(source="jsonl", path=str(path), tokenizer=TOKENIZER, **kw)


def loader(data, batch=4, seq_len=31, rank=0, dp=1):
    return TrainLoader(data, seq_len=seq_len, global_batch_size=batch, dp_rank=rank, dp_degree=dp)


def take(train_loader, steps):
    batches = list(itertools.islice(iter(train_loader), steps))
    return torch.stack([inputs for inputs, _ in batches]), torch.stack([labels for _, labels in batches])


def reference_windows(texts, stream, num_streams, window, count):
    """Stream `stream`'s first `count` windows, and the epoch each ends in, computed the obvious way."""
    tok = build_tokenizer(TOKENIZER)
    tokens, epochs = [], []
    for epoch in itertools.count():
        for text in texts[stream::num_streams]:
            if text.strip():
                ids = tok.encode(text, bos=True, eos=True)
                tokens += ids
                epochs += [epoch] * len(ids)
        if len(tokens) >= window * count:
            break
    return (
        [tokens[i * window : (i + 1) * window] for i in range(count)],
        [epochs[(i + 1) * window - 1] for i in range(count)],
    )


def test_rows_are_each_streams_packed_documents_across_epochs(tmp_path):
    texts = shard_texts(19)
    data = jsonl(write_jsonl(tmp_path / "d.jsonl", texts))
    train_loader = loader(data, batch=4, seq_len=127)
    it = iter(train_loader)
    steps = 40  # several epochs: each stream holds ~5 documents, ~1000 tokens
    expected = [reference_windows(texts, j, 4, 128, steps) for j in range(4)]
    for t in range(steps):
        inputs, labels = next(it)
        assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (4, 127)
        for j in range(4):
            window = expected[j][0][t]
            assert inputs[j].tolist() == window[:-1] and labels[j].tolist() == window[1:]
            assert train_loader.state_dict()[f"stream-{j:05d}"]["epoch"] == expected[j][1][t]
    assert max(epochs[-1] for _, epochs in expected) >= 3


@pytest.mark.parametrize("dp", [2, 4])
def test_global_batch_does_not_depend_on_dp_degree(dp):
    inputs, labels = take(loader(C4_TEST, batch=8, seq_len=64), 6)
    parts = [take(loader(C4_TEST, batch=8, seq_len=64, rank=r, dp=dp), 6) for r in range(dp)]
    assert torch.equal(inputs, torch.cat([p[0] for p in parts], dim=1))
    assert torch.equal(labels, torch.cat([p[1] for p in parts], dim=1))


def resume(data, states, steps, batch, seq_len, dp=1, workers=0):
    """The next `steps` global batches of loaders at `dp` ranks that take up `states` (merged, via JSON)."""
    merged = json.loads(json.dumps({k: v for state in states for k, v in state.items()}))
    parts = []
    for r in range(dp):
        ranked = loader(replace(data, num_workers=workers), batch=batch, seq_len=seq_len, rank=r, dp=dp)
        ranked.load_state_dict(merged)
        parts.append(take(ranked, steps)[0])
        ranked.close()
    return torch.cat(parts, dim=1)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """21 short documents: 4 streams run through an epoch in about 5 steps of 64 tokens."""
    texts = short_texts(21)
    return jsonl(write_jsonl(tmp_path_factory.mktemp("small") / "d.jsonl", texts))


@pytest.mark.parametrize(("before", "after"), [(0, 0), (2, 0), (0, 2), (2, 2)])
def test_resume_is_exact_with_and_without_workers(small_data, before, after):
    expected = take(loader(small_data, seq_len=63), 20)[0]
    first = loader(replace(small_data, num_workers=before), seq_len=63)
    assert torch.equal(take(first, 11)[0], expected[:11])  # workers have prefetched beyond step 11
    state = first.state_dict()
    first.close()
    assert {s["epoch"] for s in state.values()} >= {1}
    assert torch.equal(resume(small_data, [state], 9, 4, 63, workers=after), expected[11:])


@pytest.mark.parametrize(("dp_before", "dp_after"), [(1, 2), (4, 1), (2, 4)])
def test_resume_onto_another_dp_degree(small_data, dp_before, dp_after):
    expected = take(loader(small_data, seq_len=63), 16)[0]
    states = []
    for r in range(dp_before):
        ranked = loader(small_data, seq_len=63, rank=r, dp=dp_before)
        take(ranked, 7)
        states.append(ranked.state_dict())
        assert sorted(ranked.state_dict()) == [
            f"stream-{j:05d}" for j in range(r * 4 // dp_before, (r + 1) * 4 // dp_before)
        ]
    assert torch.equal(resume(small_data, states, 9, 4, 63, dp=dp_after), expected[7:])


def test_iterating_again_goes_on_from_the_last_batch(small_data):
    expected = take(loader(small_data, seq_len=63), 6)[0]
    train_loader = loader(small_data, seq_len=63)
    assert torch.equal(take(train_loader, 2)[0], expected[:2])
    assert torch.equal(take(train_loader, 4)[0], expected[2:])


def test_skipped_documents_are_counted_in_the_state(tmp_path):
    texts = short_texts(4)
    texts = [texts[0], "", texts[1], "   \n ", texts[2], "\t", texts[3]]
    train_loader = loader(jsonl(write_jsonl(tmp_path / "d.jsonl", texts)), batch=1, seq_len=63)
    it = iter(train_loader)
    for _ in range(30):
        next(it)
        state = train_loader.state_dict()["stream-00000"]
        empties = sum(not t.strip() for t in texts[: state["position"] or 0])
        assert state["skipped"] == 3 * state["epoch"] + empties
    assert state["skipped"] >= 6


def test_huggingface_source_streams_like_the_local_one(tmp_path):
    write_jsonl(tmp_path / "hub" / "train-0.jsonl", shard_texts(9))
    write_jsonl(tmp_path / "hub" / "train-1.jsonl", shard_texts(14, start=9))
    local = jsonl(tmp_path / "hub")
    hub = replace(local, source="huggingface", split="train")  # the same load_dataset(streaming=True) as c4
    for batch in (2, 4):  # by file, then by record
        expected = take(loader(local, batch=batch), 12)[0]
        assert torch.equal(take(loader(hub, batch=batch), 12)[0], expected)
        first = loader(hub, batch=batch)
        take(first, 5)
        assert torch.equal(resume(hub, [first.state_dict()], 7, batch, 31), expected[5:])


def test_huggingface_source_with_workers(tmp_path):
    write_jsonl(tmp_path / "hub" / "train-0.jsonl", shard_texts(23))
    hub = DataConfig(source="huggingface", path=str(tmp_path / "hub"), tokenizer=TOKENIZER)
    expected = take(loader(hub), 12)[0]
    first = loader(replace(hub, num_workers=2))
    assert torch.equal(take(first, 5)[0], expected[:5])
    state = first.state_dict()
    first.close()
    assert torch.equal(resume(hub, [state], 7, 4, 31, workers=2), expected[5:])


@pytest.mark.parametrize("workers", [0, 2])
def test_parquet_and_text_sources_match_jsonl(tmp_path, workers):
    texts = [t.replace("\n", " ") for t in shard_texts(30)]  # a text-file document is one line
    expected = take(loader(jsonl(write_jsonl(tmp_path / "d.jsonl", texts))), 8)[0]
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet", row_group_size=7)
    parquet = DataConfig(
        source="parquet", path=str(tmp_path / "d.parquet"), text_field="content", tokenizer=TOKENIZER
    )
    assert torch.equal(take(loader(parquet), 8)[0], expected)
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    text = DataConfig(source="text", path=str(tmp_path / "d.txt"), tokenizer=TOKENIZER, num_workers=workers)
    assert torch.equal(take(loader(text), 8)[0], expected)


def test_sentencepiece_tokenizer_feeds_the_loader(tmp_path):
    data = replace(C4_TEST, tokenizer=str(asset_path("tokenizers/titan_debug_sp.model")))
    inputs, labels = take(loader(data, batch=2, seq_len=255), 3)
    assert inputs.max() < 2048 and (inputs == 1).any() and (inputs == 2).any()  # BOS, EOS
    assert torch.equal(inputs[:, :, 1:], labels[:, :, :-1])


def test_layout_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"data\.num_workers=3 does not divide the 4 sequences each rank.*global_batch_size=8",
    ):
        loader(replace(C4_TEST, num_workers=3), batch=8, dp=2)
    with pytest.raises(
        ValueError, match=r"training\.global_batch_size=6 does not divide by the data-parallel degree 4"
    ):
        loader(C4_TEST, batch=6, dp=4)
    with pytest.raises(ValueError, match=r"data\.source='csv' is not one of"):
        loader(replace(C4_TEST, source="csv"))


def test_too_few_documents(tmp_path):
    data = jsonl(write_jsonl(tmp_path / "d.jsonl", shard_texts(5)))
    with pytest.raises(
        ValueError,
        match=r"has 5 documents but training\.global_batch_size=8 needs at least one per sequence slot",
    ):
        loader(data, batch=8)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"d\.jsonl is empty; remove it from data\.path"),
        (b"\n  \n\n", r"d\.jsonl holds only blank lines"),
        (b'{"body": "x"}\n', r"d\.jsonl, line 1: no field 'text' .*set data\.text_field"),
        (b'\n{"text": "\xc3\x28"}\n', r"d\.jsonl, line 2: invalid UTF-8"),
        (gzip.compress(b'{"text": "x"}\n', mtime=0), r"d\.jsonl is compressed .*decompress it"),
    ],
)
def test_check_data_errors(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        check_data(jsonl(tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match=message):
        loader(jsonl(tmp_path / "d.jsonl"))


def test_check_data_passes_and_names_bad_keys(tmp_path):
    check_data(C4_TEST)
    check_data(
        DataConfig(source="huggingface", path="allenai/c4", name="en", tokenizer=TOKENIZER)
    )  # no network
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*nope\.model: no such file"):
        check_data(replace(C4_TEST, tokenizer=str(tmp_path / "nope.model")))
    with pytest.raises(ValueError, match=r"data\.path=.*missing\.jsonl: no such file"):
        check_data(replace(C4_TEST, path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match=r"data\.path is not set"):
        check_data(DataConfig(tokenizer=TOKENIZER))


def test_a_sequence_slot_with_only_empty_documents_is_an_error(tmp_path):
    data = jsonl(write_jsonl(tmp_path / "d.jsonl", ["some text here", " ", "more text", "\n"]))
    with pytest.raises(ValueError, match=r"sequence slot 1 .*no non-empty document"):
        take(loader(data, batch=2, seq_len=7), 50)


def test_state_from_another_global_batch_size_is_refused(small_data):
    four = loader(small_data, batch=4)
    take(four, 2)
    eight = loader(small_data, batch=8)
    with pytest.raises(ValueError, match=r"stream-00004.*another training\.global_batch_size"):
        eight.load_state_dict(four.state_dict())
    two = loader(small_data, batch=2)
    with pytest.raises(ValueError, match=r"saved with training\.global_batch_size=4, not 2"):
        two.load_state_dict(four.state_dict())


def test_data_config_options():
    def composed(option, *overrides):
        return build_run_config(compose_config([f"data={option}", *overrides])).data

    assert group_options("data") == ["c4", "c4_test", "jsonl", "mixture", "parquet", "text", "tokens"]
    c4 = composed("c4", f"data.tokenizer={TOKENIZER}")
    assert (c4.source, c4.path, c4.name, c4.split) == ("huggingface", "allenai/c4", "en", "train")
    with pytest.raises(ConfigError, match=r"data\.tokenizer must be set"):
        composed("c4")
    for name in ("jsonl", "parquet", "text"):
        with pytest.raises(ConfigError, match=r"data\.path must be set"):
            composed(name)
        local = composed(name, "data.path=unused")
        assert local.source == name and local.tokenizer == TOKENIZER
    c4_test = composed("c4_test")
    assert c4_test == C4_TEST
    assert take(loader(c4_test, batch=2), 1)[0].shape == (1, 2, 31)
