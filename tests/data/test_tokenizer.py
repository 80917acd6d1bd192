"""Tokenizers: round trips, Meta's special-token ids, the Llama 3 split, format detection, errors,
and the checks against the model's vocabulary (a cut file, a smaller or larger tokenizer)."""

import base64
import itertools
import json
import logging
import random
import shutil

import pytest

from tests.launch.compose import compose_config
from tests.utils import check_loss_falls
from titan.assets import asset_path
from titan.config.errors import ConfigError
from titan.data.checks import vocab_warning
from titan.data.tokenizer import (
    LLAMA3_BASE_TOKENS,
    LLAMA3_SPECIAL_TOKENS,
    LLAMA3_VOCAB_SIZE,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    build_tokenizer,
    save_huggingface_tokenizer,
    split_long_runs,
)
from titan.launch.build import build_run_config
from titan.launch.validate import validate_data

TIKTOKEN = asset_path("tokenizers/titan_debug.tiktoken")
SENTENCEPIECE = asset_path("tokenizers/titan_debug_sp.model")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🙂🚀 and a\ttab.",
    "Lines\nand\r\nmore lines\n\n  indented   spaces  ",
    "digits 1234567890 and 3.14159, code: def f(x): return x ** 2",
    "<|begin_of_text|> is plain text inside a document <|eot_id|>",
]


def write_ranks(path, tokens):
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


@pytest.mark.parametrize("path", [TIKTOKEN, SENTENCEPIECE], ids=["tiktoken", "sentencepiece"])
def test_round_trip(path):
    tok = build_tokenizer(path)
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # it merges, not just bytes


@pytest.mark.parametrize("path", [TIKTOKEN, SENTENCEPIECE], ids=["tiktoken", "sentencepiece"])
def test_bos_eos_flags(path):
    tok = build_tokenizer(path)
    plain = tok.encode("Hello world", bos=False, eos=False)
    assert tok.encode("Hello world", bos=True, eos=False) == [tok.bos_id, *plain]
    assert tok.encode("Hello world", bos=False, eos=True) == [*plain, tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]
    assert tok.bos_id not in plain and tok.eos_id not in plain


def test_bundled_vocab_sizes():
    tik = build_tokenizer(TIKTOKEN)
    assert isinstance(tik, TiktokenTokenizer)
    assert (tik.num_base_tokens, tik.vocab_size, tik.bos_id, tik.eos_id, tik.eot_id) == (
        2048,
        2304,
        2048,
        2049,
        2057,
    )
    sp = build_tokenizer(SENTENCEPIECE)
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.vocab_size, sp.bos_id, sp.eos_id) == (2048, 1, 2)


def test_special_text_is_not_a_special_token():
    tok = build_tokenizer(TIKTOKEN)
    ids = tok.encode("<|begin_of_text|><|eot_id|>", bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())


def test_meta_special_token_ids(tmp_path):
    # 128000 base tokens like Meta's tokenizer.model: the 256 bytes, all byte pairs, then triples.
    pairs = (bytes(p) for p in itertools.product(range(256), repeat=2))
    triples = (bytes(t) for t in itertools.product(range(256), repeat=3))
    tokens = [bytes([b]) for b in range(256)] + list(
        itertools.islice(itertools.chain(pairs, triples), 128000 - 256)
    )
    assert len(set(tokens)) == 128000
    tok = TiktokenTokenizer(write_ranks(tmp_path / "tokenizer.model", tokens))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_id) == (128256, 128000, 128001, 128009)
    expected = {
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    assert {name: tok.special_tokens[name] for name in expected} == expected
    assert len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    ids = tok.encode("abc xyz", bos=True, eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001 and max(ids[1:-1]) < 128000
    assert tok.decode([128009]) == "<|eot_id|>"
    assert tok.decode(ids[1:-1]) == "abc xyz"


def test_llama3_split_pattern(tmp_path):
    # Tokens that only a missing pre-tokenizer split would produce: 4 digits, a word glued to the next.
    extra = [b"12", b"123", b"1234", b"ab", b"ab c", b"ab cd", b" c", b" cd"]
    tok = TiktokenTokenizer(write_ranks(tmp_path / "t.model", [bytes([b]) for b in range(256)] + extra))
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text, bos=False, eos=False)]  # noqa: E731
    assert pieces("1234") == ["123", "4"]  # digits go in groups of at most three
    assert pieces("ab cd") == ["ab", " cd"]  # a space starts the next word


def meta_split(s, max_len):
    """Meta's `_split_whitespaces_or_nonwhitespaces`, verbatim, as the reference."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


@pytest.mark.parametrize(
    "text",
    ["", "a", "abcdefghij", "ab cd", "x" * 23 + " " * 9 + "y" * 5, " \u3000\n" * 7 + "zz" * 11, "a b " * 9],
)
def test_split_long_runs_matches_meta(text):
    for max_len in (1, 2, 3, 5, 8, 100):
        assert list(split_long_runs(text, max_len)) == list(meta_split(text, max_len))


def test_split_long_runs_matches_meta_on_random_text():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab \n\u3000") * rng.randint(1, 9) for _ in range(rng.randint(0, 12)))
        max_len = rng.randint(1, 7)
        assert list(split_long_runs(text, max_len)) == list(meta_split(text, max_len)), (text, max_len)


def test_long_run_without_whitespace_round_trips():
    tok = build_tokenizer(TIKTOKEN)
    text = "x" * 60_000 + " tail " + "\n" * 30_000
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


def test_format_is_told_by_content(tmp_path):
    shutil.copy(TIKTOKEN, tmp_path / "a.model")
    shutil.copy(SENTENCEPIECE, tmp_path / "b.tiktoken")
    assert isinstance(build_tokenizer(tmp_path / "a.model"), TiktokenTokenizer)
    assert isinstance(build_tokenizer(tmp_path / "b.tiktoken"), SentencePieceTokenizer)


def test_errors_name_the_file_and_key(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*nope\.model: no such file"):
        build_tokenizer(missing)
    with pytest.raises(ValueError, match=r"data\.tokenizer is not set"):
        build_tokenizer("???")
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*no such file"):
        build_tokenizer(tmp_path)  # a directory
    junk = tmp_path / "junk.model"
    junk.write_text("hello world\n")
    with pytest.raises(ValueError, match=r"junk\.model: neither a tiktoken BPE file"):
        build_tokenizer(junk)
    bad_line = tmp_path / "bad.model"
    bad_line.write_bytes(TIKTOKEN.read_bytes().replace(b"\n", b"\nnot-base64!\n", 1))
    with pytest.raises(ValueError, match=r"bad\.model: line 2 is not `base64\(token_bytes\) rank`"):
        build_tokenizer(bad_line)
    gap = write_ranks(tmp_path / "gap.model", [bytes([b]) for b in range(200)])
    with pytest.raises(ValueError, match=r"gap\.model: not a byte-level BPE"):
        build_tokenizer(gap)
    broken_sp = tmp_path / "broken_sp.model"
    broken_sp.write_bytes(SENTENCEPIECE.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"broken_sp\.model: not a sentencepiece model"):
        build_tokenizer(broken_sp)


def llama3_like_tokens(n=LLAMA3_BASE_TOKENS):
    """`n` distinct tokens ranked as in Meta's (and OpenAI's) files: the 256 bytes in GPT-2's order,
    "!" first, then byte pairs and triples."""
    singles = [bytes([b]) for b in [*range(33, 256), *range(33)]]
    pairs = (bytes(p) for p in itertools.product(range(256), repeat=2))
    triples = (bytes(t) for t in itertools.product(range(256), repeat=3))
    return singles + list(itertools.islice(itertools.chain(pairs, triples), n - 256))


@pytest.fixture(scope="module")
def llama3_file(tmp_path_factory):
    return write_ranks(tmp_path_factory.mktemp("llama3") / "tokenizer.model", llama3_like_tokens())


def data_config(tokenizer, *model):
    return build_run_config(compose_config([f"data.tokenizer={tokenizer}", *model]))


def test_a_tokenizer_cut_at_a_line_boundary_is_refused(llama3_file, tmp_path):
    lines = llama3_file.read_bytes().splitlines(keepends=True)
    assert vocab_warning(build_tokenizer(llama3_file), str(llama3_file), LLAMA3_VOCAB_SIZE) is None
    # the end cut off: still a valid BPE file, told by Meta's count for a Llama 3-sized model
    cut = tmp_path / "cut.model"
    cut.write_bytes(b"".join(lines[:127_000]))
    with pytest.raises(ValueError) as e:
        vocab_warning(build_tokenizer(cut), str(cut), LLAMA3_VOCAB_SIZE)
    assert str(e.value) == (
        f"data.tokenizer={cut} has 127000 ranks, Meta's Llama 3 tokenizer.model 128000 "
        "(model.vocab_size=128256 is Llama 3's): the file is cut short; copy it again (for another "
        "tokenizer on purpose, set model.vocab_size=127256)"
    )
    with pytest.raises(ConfigError) as e:  # as the launcher sees it, before any rank starts
        validate_data(data_config(cut, "model=llama3_1b"))
    assert "\n" not in str(e.value) and "the file is cut short" in str(e.value)
    # the start or the middle cut out: a rank is missing
    for name, kept, missing in [("head", lines[100:], 0), ("middle", lines[:1000] + lines[2000:], 1000)]:
        (tmp_path / f"{name}.model").write_bytes(b"".join(kept))
        with pytest.raises(ValueError, match=rf"{name}\.model: rank {missing} is missing: .*cut or damaged"):
            build_tokenizer(tmp_path / f"{name}.model")


def test_the_bundled_tokenizer_still_feeds_a_llama3_sized_model(caplog):
    """A smoke test of a Llama 3 shape on the bundled data (sweeps/model_ladder.yaml): a warning only."""
    with caplog.at_level(logging.WARNING, logger="titan"):
        validate_data(data_config(TIKTOKEN, "model=llama3_1b"))
    assert "has 2304 tokens but model.vocab_size=128256: ids 2304..128255 never occur" in caplog.text


@pytest.mark.parametrize(
    ("tokenizer", "vocab", "model_vocab"), [(TIKTOKEN, 2304, 4096), (SENTENCEPIECE, 2048, 2304)]
)
def test_a_tokenizer_smaller_than_the_model_is_a_warning_naming_both(caplog, tokenizer, vocab, model_vocab):
    with caplog.at_level(logging.WARNING, logger="titan"):
        validate_data(data_config(tokenizer, f"model.vocab_size={model_vocab}"))
    (record,) = caplog.records
    assert record.getMessage() == (
        f"warning: data.tokenizer={tokenizer} has {vocab} tokens but model.vocab_size={model_vocab}: ids "
        f"{vocab}..{model_vocab - 1} never occur in the data, their embedding rows never train as inputs "
        f"(set model.vocab_size={vocab} unless the padding is meant)"
    )


def test_a_tokenizer_the_size_of_the_model_passes_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="titan"):
        validate_data(data_config(TIKTOKEN))
    assert not caplog.records


def test_a_tokenizer_larger_than_the_model_is_a_one_line_error():
    with pytest.raises(ConfigError) as e:
        validate_data(data_config(TIKTOKEN, "model.vocab_size=2000"))
    assert str(e.value) == (
        f"data.tokenizer={TIKTOKEN} has 2304 tokens but model.vocab_size=2000; use a model with "
        "vocab_size >= 2304 or another tokenizer"
    )


def test_sentencepiece_takes_a_lone_surrogate_as_tiktoken_does():
    """A JSON "\\ud800" escape decodes to a lone surrogate; both tokenizers read it as U+FFFD."""
    for path in (TIKTOKEN, SENTENCEPIECE):
        tok = build_tokenizer(path)
        assert tok.encode("a\ud800b", bos=True, eos=True) == tok.encode("a\ufffdb", bos=True, eos=True)


# Hugging Face tokenizer.json: the bundled tiktoken BPE converted, read back through `tokenizers`.


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    save_huggingface_tokenizer(build_tokenizer(TIKTOKEN), folder)
    return folder


def c4_texts(n=300):
    path = asset_path("c4_test/c4-train.00000-of-00001.json")
    return [json.loads(line)["text"] for line in path.read_text().splitlines()[:n]]


def test_tokenizer_json_equals_the_tiktoken_file_it_was_converted_from(hf_folder):
    hf, tk = build_tokenizer(hf_folder / "tokenizer.json"), build_tokenizer(TIKTOKEN)
    assert isinstance(hf, HuggingFaceTokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.eot_id) == (
        tk.vocab_size,
        tk.bos_id,
        tk.eos_id,
        tk.eot_id,
    )
    # Long runs, specials as text, combining marks and whitespace runs are where BPE ports differ.
    extra = ["a" * 30_000, "e\u0301 " + " " * 50 + "x", "tab\there\n\n\n  end  "]
    for text in TEXTS + c4_texts() + extra:
        assert hf.encode(text, bos=True, eos=True) == tk.encode(text, bos=True, eos=True), text[:60]
        assert hf.decode(hf.encode(text, bos=False, eos=False)) == text


def test_tokenizer_json_encodes_as_the_tokenizers_library_does(hf_folder):
    from tokenizers import Tokenizer as RustTokenizer

    hf, rust = build_tokenizer(hf_folder), RustTokenizer.from_file(str(hf_folder / "tokenizer.json"))
    for text in TEXTS[:4] + c4_texts(50):  # no special-token text: the library's default parses it
        assert hf.encode(text, bos=False, eos=False) == rust.encode(text, add_special_tokens=False).ids
    # Llama 3's special tokens at Meta's ids after the base ranks: BOS, EOS, end of turn.
    base = hf.vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    assert [rust.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")] == [
        base,
        base + 1,
        base + 9,
    ]
    assert (hf.bos_id, hf.eos_id, hf.eot_id) == (base, base + 1, base + 9)
    # In a document the special names are text, as with tiktoken.
    assert base + 9 not in hf.encode("end <|eot_id|>", bos=False, eos=False)


def test_transformers_reads_the_written_tokenizer(hf_folder):
    from transformers import AutoTokenizer

    auto, hf = AutoTokenizer.from_pretrained(str(hf_folder)), build_tokenizer(hf_folder)
    assert (auto.bos_token_id, auto.eos_token_id) == (hf.bos_id, hf.eos_id)
    for text in TEXTS[:4]:
        assert auto(text, add_special_tokens=False).input_ids == hf.encode(text, bos=False, eos=False)


def test_tokenizer_json_names_bos_and_eos_from_its_config(hf_folder, tmp_path):
    """A tokenizer without Llama 3's names: BOS and EOS come from tokenizer_config.json, as in transformers."""
    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    for added in tokenizer["added_tokens"]:
        added["content"] = added["content"].replace("begin_of_text", "bos").replace("end_of_text", "eos")
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="no BOS token.*tokenizer_config.json"):
        build_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"}})
    )
    hf = build_tokenizer(tmp_path / "tokenizer.json")
    assert (hf.bos_id, hf.eos_id) == (2048, 2049)


def test_a_broken_tokenizer_json_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(
        ValueError, match=r"data.tokenizer=.*tokenizer.json: not a Hugging Face tokenizer.json"
    ):
        build_tokenizer(tmp_path / "tokenizer.json")


def test_training_on_a_tokenizer_json_lowers_the_loss(hf_folder, tmp_path):
    check_loss_falls(tmp_path, data={"tokenizer": str(hf_folder / "tokenizer.json")})
