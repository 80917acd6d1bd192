"""Document sources and packing: file resolution, record access, dealing to streams, windows, errors."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from titan.assets import asset_path, build_assets
from titan.config.schema import DataConfig
from titan.data.documents import LocalDocuments
from titan.data.files import resolve_files
from titan.data.formats import BadRecord
from titan.data.packing import PackedStream
from titan.data.records import LocalFiles, line_offsets
from titan.data.stream_state import StreamState
from titan.data.tokenizer import Tokenizer

SHARD = asset_path("c4_test/c4-train.00000-of-00001.json")


class CharTokenizer(Tokenizer):
    """One id per character (its code point), BOS=1000, EOS=1001: windows can be read by eye."""

    vocab_size, bos_id, eos_id = 1002, 1000, 1001

    def encode(self, text, *, bos, eos):
        return [self.bos_id] * bos + [ord(c) for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i < 1000)


def write_jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "url": "u"}) + "\n" for t in texts), encoding="utf-8")
    return path


def local(path, source="jsonl", cache_size=4, **kw):
    data = DataConfig(source=source, path=str(path), tokenizer="unused", **kw)
    return LocalFiles(data, resolve_files(data), cache_size=cache_size)


def documents(files, stream, num_streams, position=None):
    return list(LocalDocuments(files, stream, num_streams).iterate(position))


def test_packing_exact_windows(tmp_path):
    files = local(write_jsonl(tmp_path / "d.jsonl", ["ab", "cde", "f"]))
    B, E = 1000, 1001
    stream = PackedStream(LocalDocuments(files, 0, 1), CharTokenizer(), 4, StreamState(num_streams=1))
    a, b, c, d, e, f = (ord(x) for x in "abcdef")
    # B a b E | B c d e | E B f E | (epoch 1) B a b E | B c d e
    assert stream.next_window() == [B, a, b, E]
    assert stream.state().to_dict() == {
        "num_streams": 1,
        "epoch": 0,
        "position": 1,
        "tokens": [],
        "skipped": 0,
        "bad_records": 0,
    }
    assert stream.next_window() == [B, c, d, e]
    assert stream.state().to_dict() == {
        "num_streams": 1,
        "epoch": 0,
        "position": 2,
        "tokens": [E],
        "skipped": 0,
        "bad_records": 0,
    }
    assert stream.next_window() == [E, B, f, E]
    assert stream.next_window() == [B, a, b, E]
    assert stream.state().epoch == 1 and stream.state().position == 1
    assert stream.next_window() == [B, c, d, e]


def test_a_long_document_spans_windows_and_resumes(tmp_path):
    files = local(write_jsonl(tmp_path / "d.jsonl", ["abcdefghij", "xy"]))
    stream = PackedStream(LocalDocuments(files, 0, 1), CharTokenizer(), 3, StreamState(num_streams=1))
    windows = [stream.next_window() for _ in range(8)]
    assert sum(windows, [])[:16] == CharTokenizer().encode("abcdefghij", bos=True, eos=True) + [
        1000,
        120,
        121,
        1001,
    ]
    # Resume after each window from the JSON of its state: the same windows follow.
    replay = PackedStream(LocalDocuments(files, 0, 1), CharTokenizer(), 3, StreamState(num_streams=1))
    for i in range(8):
        assert replay.next_window() == windows[i]
        state = StreamState.from_dict(json.loads(json.dumps(replay.state().to_dict())))
        resumed = PackedStream(LocalDocuments(files, 0, 1), CharTokenizer(), 3, state)
        assert [resumed.next_window() for _ in range(8 - i - 1)] == windows[i + 1 :]


def test_documents_dealt_by_file_when_there_are_enough(tmp_path):
    for f in range(3):
        write_jsonl(tmp_path / f"part-{f}.jsonl", [f"f{f}d{i}" for i in range(2)])
    files = local(tmp_path)
    assert documents(files, 0, 2) == ["f0d0", "f0d1", "f2d0", "f2d1"]
    assert documents(files, 1, 2) == ["f1d0", "f1d1"]
    assert documents(files, 0, 2, position=3) == ["f2d1"]


def test_documents_dealt_by_index_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["a0", "a1", "a2"])
    write_jsonl(tmp_path / "b.jsonl", ["b0", "b1", "b2", "b3", "b4"])
    files = local(tmp_path)
    # Records a0 a1 a2 b0 b1 b2 b3 b4, dealt round-robin to 3 streams.
    assert documents(files, 0, 3) == ["a0", "b0", "b3"]
    assert documents(files, 1, 3) == ["a1", "b1", "b4"]
    assert documents(files, 2, 3) == ["a2", "b2"]
    for position in range(4):
        assert documents(files, 0, 3, position) == ["a0", "b0", "b3"][position:]


def test_resolve_files(tmp_path):
    write_jsonl(tmp_path / "z.jsonl", ["z"])
    write_jsonl(tmp_path / "sub" / "a.json", ["a"])
    (tmp_path / "notes.txt").write_text("not data")
    assert resolve_files(DataConfig(path=str(tmp_path))) == [
        tmp_path / "sub" / "a.json",
        tmp_path / "z.jsonl",
    ]
    assert resolve_files(DataConfig(path=str(tmp_path / "*.txt"))) == [tmp_path / "notes.txt"]
    assert resolve_files(DataConfig(path=str(tmp_path / "**" / "*.json"))) == [tmp_path / "sub" / "a.json"]
    with pytest.raises(ValueError, match=r"data\.path=.*\*\.parquet matches no file"):
        resolve_files(DataConfig(path=str(tmp_path / "*.parquet")))
    with pytest.raises(ValueError, match=r"data\.path=.* holds no \.parquet file"):
        resolve_files(DataConfig(source="parquet", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"data\.path=.*missing: no such file or directory"):
        resolve_files(DataConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"data\.path is not set"):
        resolve_files(DataConfig())


@pytest.mark.parametrize(
    ("content", "starts"),
    [(b"", [0]), (b"a\n", [0, 2]), (b"a\nbc", [0, 2, 4]), (b"a\r\n\n\nb\n", [0, 3, 4, 5, 7])],
)
def test_line_offsets(tmp_path, content, starts):
    (tmp_path / "f").write_bytes(content)
    assert line_offsets(tmp_path / "f").tolist() == starts


def test_text_and_parquet_sources(tmp_path):
    texts = ["first line", "  ", "héllo wörld", "", "last"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert documents(local(tmp_path / "t.txt", source="text"), 0, 1) == texts
    table = pa.table({"content": texts, "n": list(range(5))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)  # three row groups
    parquet = local(tmp_path / "p.parquet", source="parquet", cache_size=1, text_field="content")
    assert parquet.count(0) == 5
    assert documents(parquet, 0, 1) == texts
    assert documents(parquet, 1, 2) == texts[1::2]


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_one_entry_caches_read_the_same_documents(tmp_path, source):
    # Three files, five streams reading in turn: with one cached file, nearly every read evicts one.
    texts = [f"doc {i}" for i in range(23)]
    for f, part in enumerate((texts[:7], texts[7:15], texts[15:])):
        if source == "jsonl":
            write_jsonl(tmp_path / f"p{f}.jsonl", part)
        else:
            pq.write_table(pa.table({"text": part}), tmp_path / f"p{f}.parquet", row_group_size=3)
    files = local(tmp_path, source=source, cache_size=1)
    streams = [LocalDocuments(files, j, 5).iterate(None) for j in range(5)]
    read = [[] for _ in streams]
    for _ in range(5):
        for j, stream in enumerate(streams):
            read[j].extend(itertools.islice(stream, 1))
    assert read == [texts[j::5] for j in range(5)]


def test_crlf_and_byte_order_mark(tmp_path):
    (tmp_path / "w.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
    assert documents(local(tmp_path / "w.jsonl"), 0, 1) == ["one", "two"]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    files = local(write_jsonl(tmp_path / "d.jsonl", ["ab", "", " \n\t ", "cd"]))
    stream = PackedStream(LocalDocuments(files, 0, 1), CharTokenizer(), 8, StreamState(num_streams=1))
    assert stream.next_window() == [1000, 97, 98, 1001, 1000, 99, 100, 1001]
    assert stream.state().skipped == 2
    stream.next_window()
    assert stream.state().skipped == 4 and stream.state().epoch == 1


def test_stream_with_only_empty_documents_is_an_error(tmp_path):
    files = local(write_jsonl(tmp_path / "d.jsonl", ["ab", "  "]))
    stream = PackedStream(LocalDocuments(files, 1, 2), CharTokenizer(), 4, StreamState(num_streams=2))
    with pytest.raises(
        ValueError, match=r"sequence slot 1 .* got no non-empty document.*global_batch_size=2"
    ):
        stream.next_window()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [b'{"text": "ok"}', b'{"body": "no text"}'],
            r"d\.jsonl, line 2: no field 'text' \(the record has \['body'\]\); set data\.text_field",
        ),
        (
            [b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": "\xff\xfe"}'],
            r"d\.jsonl, line 3: invalid UTF-8 at byte 10",
        ),
        ([b'{"text": "ok"}', b"{not json"], r"d\.jsonl, line 2: not JSON .*data\.source=jsonl"),
        ([b'{"text": 3}'], r"d\.jsonl, line 1: field 'text' holds int, not text; set data\.text_field"),
        ([b'["text"]'], r"d\.jsonl, line 1: no field 'text' \(the record has a JSON list, not an object\)"),
    ],
)
def test_bad_jsonl_records(tmp_path, lines, message):
    """A bad record comes in its place, as the one-line BadRecord saying why (packing decides)."""
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = documents(local(tmp_path / "d.jsonl"), 0, 1)
    assert len(items) == len(lines) and all(item == "ok" for item in items[:-1])
    assert isinstance(items[-1], BadRecord) and re.match(message, str(items[-1]).split("/")[-1])
    assert "\n" not in str(items[-1]) and str(items[-1]).endswith(
        "data.on_bad_record=skip to skip and count such records"
    )


def test_bad_parquet(tmp_path):
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "a.parquet")
    with pytest.raises(
        ValueError, match=r"a\.parquet: no column 'text' \(columns: \['body'\]\); set data\.text_field"
    ):
        documents(local(tmp_path / "a.parquet", source="parquet"), 0, 1)
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    first, second = documents(local(tmp_path / "b.parquet", source="parquet"), 0, 1)
    assert first == "x" and isinstance(second, BadRecord)
    assert re.search(r"b\.parquet, row 2: column 'text' is null", str(second))
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"c\.parquet: not a parquet file"):
        documents(local(tmp_path / "c.parquet", source="parquet"), 0, 1)


def test_asset_path():
    assert (
        SHARD.is_absolute() and SHARD.is_file() and SHARD.parent.parent == Path(build_assets.__file__).parent
    )
    with pytest.raises(FileNotFoundError, match=r"no bundled asset 'c4_test/nope\.json'.*build_assets"):
        asset_path("c4_test/nope.json")
    with pytest.raises(ValueError, match="leaves the assets folder"):
        asset_path("../data/documents.py")


def test_bundled_shard_is_c4_format():
    records = [json.loads(line) for line in SHARD.read_text(encoding="utf-8").splitlines()]
    assert 1000 <= len(records) <= 2000 and 1.5e6 <= SHARD.stat().st_size <= 3e6
    assert all(set(r) == {"text", "timestamp", "url"} for r in records)
    words = np.array([len(r["text"].split()) for r in records])
    assert words.min() >= 30 and 100 <= np.median(words) <= 300 and words.max() > 1000
    assert len({r["text"] for r in records}) == len(records)


@pytest.mark.slow
@pytest.mark.skipif(
    build_assets._versions() != build_assets.BUILT_WITH, reason="the assets were built with other versions"
)
def test_assets_rebuild_byte_for_byte(tmp_path):
    build_assets.main(["--out", str(tmp_path)])
    for rel in (build_assets.SHARD, build_assets.TIKTOKEN_MODEL, build_assets.SENTENCEPIECE_MODEL):
        assert (tmp_path / rel).read_bytes() == asset_path(rel).read_bytes(), rel
