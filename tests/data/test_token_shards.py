"""Pre-tokenized shards: what is read back is what on-the-fly tokenization gives, byte for byte; the
loader's batches and resume are those of the text; a wrong tokenizer, a cut shard or a missing index
is an error before training."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.data.test_loader import C4_TEST, SHARD, TOKENIZER, jsonl, loader, resume, take, write_jsonl
from tests.utils import check_loss_falls
from titan.assets import asset_path
from titan.config.schema import DataConfig
from titan.data.checks import check_data
from titan.data.pretokenize import pretokenize
from titan.data.token_shards import TokenShards
from titan.data.tokenizer import build_tokenizer
from titan.tools.pretokenize import main


def tokens_of(folder, tokenizer=TOKENIZER) -> DataConfig:
    return DataConfig(source="tokens", path=str(folder), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def c4_tokens(tmp_path_factory):
    """The bundled shard pretokenized by 2 worker processes into shards of ~100k tokens."""
    out = tmp_path_factory.mktemp("tokens") / "c4_test"
    return pretokenize(C4_TEST, out, workers=2, shard_tokens=100_000, progress=False)


def test_documents_read_back_are_the_on_the_fly_tokenization(c4_tokens):
    tokenizer = build_tokenizer(TOKENIZER)
    texts = [json.loads(line)["text"] for line in SHARD.read_text(encoding="utf-8").splitlines()]
    shards = TokenShards(tokens_of(c4_tokens))
    assert len(shards.files) == 6  # 538,663 tokens in shards of at least 100,000
    read = [shards.text(f, i) for f in range(len(shards.files)) for i in range(shards.count(f))]
    assert len(read) == len(texts) == shards.index["documents"]
    for text, tokens in zip(texts, read):
        expected = tokenizer.encode(text, bos=True, eos=True) if text.strip() else []
        assert tokens.dtype == np.uint16 and tokens.tobytes() == np.array(expected, np.uint16).tobytes()
    assert shards.index["tokens"] == sum(len(t) for t in read)


def test_loader_batches_equal_the_text_source(c4_tokens):
    """One source file and one token folder are both dealt by record: the same global batches, at dp 1
    and as dp 2's halves."""
    text = take(loader(C4_TEST, batch=8, seq_len=64), 6)
    tokens = take(loader(tokens_of(c4_tokens), batch=8, seq_len=64), 6)
    assert torch.equal(text[0], tokens[0]) and torch.equal(text[1], tokens[1])
    halves = [take(loader(tokens_of(c4_tokens), batch=8, seq_len=64, rank=r, dp=2), 6)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves, dim=1), text[0])


def test_empty_documents_keep_their_place(tmp_path):
    texts = ["first document here", "", "   ", "fourth one", "fifth and last"]
    data = jsonl(write_jsonl(tmp_path / "d.jsonl", texts))
    folder = pretokenize(data, tmp_path / "tokens", progress=False)
    shards = TokenShards(tokens_of(folder))
    assert [len(shards.text(0, i)) > 0 for i in range(5)] == [True, False, False, True, True]
    text_loader, token_loader = (
        loader(data, batch=2, seq_len=7),
        loader(tokens_of(folder), batch=2, seq_len=7),
    )
    assert torch.equal(take(text_loader, 5)[0], take(token_loader, 5)[0])
    assert text_loader.state_dict() == token_loader.state_dict()  # the same positions, epochs and skips


@pytest.mark.parametrize(("workers_before", "dp_after", "workers_after"), [(0, 2, 0), (2, 1, 0), (0, 4, 2)])
def test_resume_is_exact(c4_tokens, workers_before, dp_after, workers_after):
    data = tokens_of(c4_tokens)
    expected = take(loader(data, batch=8, seq_len=63), 12)[0]
    first = loader(replace(data, num_workers=workers_before), batch=8, seq_len=63)
    assert torch.equal(take(first, 5)[0], expected[:5])
    state = first.state_dict()
    first.close()
    assert torch.equal(resume(data, [state], 7, 8, 63, dp=dp_after, workers=workers_after), expected[5:])


def test_another_tokenizer_is_refused(c4_tokens):
    sentencepiece = str(asset_path("tokenizers/titan_debug_sp.model"))
    with pytest.raises(
        ValueError, match=r"made with the tokenizer .*titan_debug.tiktoken .*not data.tokenizer="
    ):
        check_data(tokens_of(c4_tokens, tokenizer=sentencepiece))


def test_a_cut_shard_is_refused(c4_tokens, tmp_path):
    import shutil

    copy = shutil.copytree(c4_tokens, tmp_path / "copy")
    shard = copy / "shard-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard-00003.bin holds \d+ bytes, the index says \d+ .*cut"):
        loader(tokens_of(copy), batch=8, seq_len=64)
    (copy / "shard-00004.offsets.npy").unlink()
    (copy / "index.json").unlink()
    with pytest.raises(
        ValueError, match=r"no index.json: not a folder of token shards.*titan.tools.pretokenize"
    ):
        check_data(tokens_of(copy))


def test_an_unfinished_folder_is_not_taken(tmp_path):
    data = jsonl(write_jsonl(tmp_path / "d.jsonl", ["some text"] * 3))
    (tmp_path / "out.partial").mkdir()  # what an interrupted pretokenization leaves
    folder = pretokenize(data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out.partial").exists() and (folder / "index.json").is_file()
    with pytest.raises(FileExistsError, match="exists"):
        pretokenize(data, folder, progress=False)


def test_the_tool_and_a_short_training_run(tmp_path):
    """`python -m titan.tools.pretokenize data=c4_test --out DIR`, then training on it lowers the loss."""
    out = tmp_path / "c4_tokens"
    assert main(["data=c4_test", "--out", str(out), "--workers", "1"]) == 0
    assert json.loads((out / "index.json").read_text())["documents"] == 1534
    check_loss_falls(tmp_path / "run", data={"source": "tokens", "path": str(out)})
