"""Tokenizers: Meta's Llama 3 tiktoken BPE, Hugging Face `tokenizer.json` and sentencepiece, behind one
small interface; and the conversion of a tiktoken BPE into a `tokenizer.json` (for exports).

`build_tokenizer(path)` looks at the file's content (a sentencepiece model is a protobuf, a tiktoken
file is lines of `base64(token_bytes) rank`, a tokenizer.json is JSON; a folder holding a
tokenizer.json is taken too), so `data.tokenizer` needs no separate format key. Nothing here touches
the network: tiktoken's own loaders may download or cache files, so the ranks file is parsed here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

# The pre-tokenizer split of Meta's Llama 3 `tokenizer.py` (the same one as in Hugging Face's
# tokenizer.json for Llama 3): contractions, letters, 1-3 digit groups, punctuation, newlines, spaces.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's order (llama-models, Llama 3.1+): with 128000 base tokens, BOS=128000, EOS=128001, eot=128009.
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{3 + i}|>"
    for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]
# Meta's Llama 3 `tokenizer.model`: 128000 ranks, and models of 128000 + 256 = 128256 embedding rows.
LLAMA3_BASE_TOKENS = 128_000
LLAMA3_VOCAB_SIZE = LLAMA3_BASE_TOKENS + NUM_RESERVED_SPECIAL_TOKENS
# Rank 0 of Meta's file, as of OpenAI's (all rank the single bytes in GPT-2's order, "!" first).
LLAMA3_FIRST_TOKEN = b"!"
# Meta's limits: tiktoken's BPE is slow (quadratic) on very long runs without a split point.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


class Tokenizer(ABC):
    """What the data pipeline and generation need from a tokenizer."""

    @abstractmethod
    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...


def _bad_file(path: str | Path, why: str) -> ValueError:
    return ValueError(f"data.tokenizer={path}: {why}")


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (Meta's `tokenizer.model`): one `base64(token_bytes) rank` per line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise _bad_file(path, f"cannot read the tokenizer file ({e.strerror or e})") from e
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError(f"{len(parts)} fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise _bad_file(path, f"line {number} is not `base64(token_bytes) rank`") from e
        if token in ranks:
            raise _bad_file(path, f"line {number} repeats a token already ranked {ranks[token]}")
        ranks[token] = rank
    # Lines lost from the start or the middle (a damaged copy) leave a gap. Lines lost from the end
    # cannot be told here: every prefix of a BPE file is one (checks.py knows Meta's count).
    if sorted(ranks.values()) != list(range(len(ranks))):
        missing = min(set(range(len(ranks))) - set(ranks.values()))
        raise _bad_file(
            path,
            f"rank {missing} is missing: a tiktoken BPE file ranks its n tokens 0..n-1 (is the file cut "
            "or damaged?)",
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise _bad_file(path, f"not a byte-level BPE: {len(missing)} of the 256 single bytes have no rank")
    return ranks


@lru_cache(maxsize=4)
def _long_runs(max_run: int) -> re.Pattern:
    # Only runs longer than max_run; the lookbehinds let a match start at a run's first character
    # only, so the scan stays linear however long the runs are.
    return re.compile(rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}")


def split_long_runs(text: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`: cut `text` so that no piece holds more than
    `max_run` consecutive whitespace or non-whitespace characters. The same cuts, found by regex
    rather than a Python loop per character; almost every document comes back whole, untouched."""
    if len(text) <= max_run:
        yield text
        return
    start = 0
    for run in _long_runs(max_run).finditer(text):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: a tiktoken BPE file plus 256 special tokens after its base ranks."""

    def __init__(self, path: str | Path):
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        self.ranks = ranks
        self.num_base_tokens = len(ranks)
        self.first_token = min(ranks, key=ranks.__getitem__)
        self.special_tokens = {
            token: self.num_base_tokens + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)
        }
        self.model = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + len(self.special_tokens)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        return self.special_tokens["<|eot_id|>"]

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        # Training text is never parsed for special tokens (Meta: allowed_special=set(),
        # disallowed_special=()): "<|eot_id|>" inside a document is ordinary text.
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama 2 style); BOS and EOS are the model's own pieces."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        try:
            self.model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise _bad_file(path, f"not a sentencepiece model ({e})") from e
        if self.model.bos_id() < 0 or self.model.eos_id() < 0:
            raise _bad_file(path, "the sentencepiece model has no BOS or no EOS piece")

    @property
    def vocab_size(self) -> int:
        return self.model.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.model.bos_id()

    @property
    def eos_id(self) -> int:
        return self.model.eos_id()

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        try:
            return self.model.encode(text, add_bos=bos, add_eos=eos)
        except RuntimeError:
            # sentencepiece cannot take a lone surrogate (a JSON "\ud800" escape, not Unicode): it
            # becomes U+FFFD, as tiktoken makes it.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.model.encode(text, add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))


# The names Llama 3's tokenizer.json gives BOS, EOS and end-of-turn; other tokenizers name theirs in
# the tokenizer_config.json beside it (`bos_token`, `eos_token`), as transformers reads them.
LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.model = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for any parse error
            raise _bad_file(path, f"not a Hugging Face tokenizer.json ({e})") from e
        # Training text is never parsed for special tokens, as with tiktoken above: "<|eot_id|>" inside a
        # document is ordinary text.
        self.model.encode_special_tokens = True
        config_file = Path(path).with_name(HF_TOKENIZER_CONFIG)
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        ids = {}
        for key, llama3_name in (("bos_token", LLAMA3_BOS), ("eos_token", LLAMA3_EOS)):
            name = self._first_known(llama3_name, _config_token(config, key))
            if name is None:
                raise _bad_file(
                    path,
                    f"no {key[:3].upper()} token: neither {llama3_name} nor a `{key}` in a {HF_TOKENIZER_CONFIG} "
                    "beside it",
                )
            ids[key] = self.model.token_to_id(name)
        self._bos_id, self._eos_id = ids["bos_token"], ids["eos_token"]
        self.eot_id = self.model.token_to_id(LLAMA3_EOT)  # None where the tokenizer has no end-of-turn

    def _first_known(self, *names: str | None) -> str | None:
        return next((n for n in names if n is not None and self.model.token_to_id(n) is not None), None)

    @property
    def vocab_size(self) -> int:
        return self.model.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        # add_special_tokens=False: the file's post-processor would add its own BOS; the caller says.
        ids = self.model.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which byte-level BPE `tokenizer.json` files spell tokens in: printable
    bytes stand for themselves, the rest are shifted to code points from 256 up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def tiktoken_to_huggingface(tokenizer: TiktokenTokenizer):
    """The same tokenizer as a `tokenizers.Tokenizer` (for a `tokenizer.json`): the ranks as a byte-level
    BPE vocabulary, each token's merges recovered from the ranks of its two halves (a tiktoken file
    stores no merges: a token of rank r was made by merging two tokens of lower rank), the Llama 3
    split pattern, and the special tokens at their ids. `ignore_merges` makes a pre-token that is itself
    a vocabulary entry one token, as tiktoken does."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    alphabet = _bytes_to_unicode()
    spell = lambda token: "".join(alphabet[b] for b in token)  # noqa: E731
    ranks = tokenizer.ranks
    merges = []
    for token, rank in ranks.items():
        halves = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [(ranks[a], ranks[b], a, b) for a, b in halves if a in ranks and b in ranks]
        merges.extend((rank, ra, rb, spell(a), spell(b)) for ra, rb, a, b in pairs)
    merges.sort()
    model = BPE(
        {spell(token): rank for token, rank in ranks.items()},
        [(a, b) for *_, a, b in merges],
        fuse_unk=False,
        ignore_merges=True,
    )
    hf = RustTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # As Meta's published tokenizer.json: a BOS before the text when the caller asks for special tokens.
    bos = LLAMA3_BOS
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)]
    )
    return hf


def save_huggingface_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> list[Path]:
    """Write `tokenizer` into `folder` so that transformers' `AutoTokenizer.from_pretrained(folder)` reads
    it: `tokenizer.json` (tiktoken and tokenizer.json tokenizers) or the sentencepiece `tokenizer.model`
    (as Llama 2's releases), and a `tokenizer_config.json`. Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / HF_TOKENIZER_CONFIG
    if isinstance(tokenizer, SentencePieceTokenizer):
        model_file = folder / "tokenizer.model"
        model_file.write_bytes(tokenizer.path.read_bytes())
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": tokenizer.model.id_to_piece(tokenizer.bos_id),
            "eos_token": tokenizer.model.id_to_piece(tokenizer.eos_id),
            "add_bos_token": True,
            "add_eos_token": False,
        }
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        return [model_file, config_file]
    hf = (
        tokenizer.model if isinstance(tokenizer, HuggingFaceTokenizer) else tiktoken_to_huggingface(tokenizer)
    )
    hf.save(str(folder / HF_TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": hf.id_to_token(tokenizer.bos_id),
        "eos_token": hf.id_to_token(tokenizer.eos_id),
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes text exactly as it was
        "model_input_names": ["input_ids", "attention_mask"],
    }
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return [folder / HF_TOKENIZER_FILE, config_file]


_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n?")


def build_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in `path`, its format told by the content."""
    if str(path) in ("", "???"):
        raise ValueError(
            "data.tokenizer is not set: give the path of a tiktoken or sentencepiece model or a tokenizer.json"
        )
    file = Path(path)
    if file.is_dir() and (file / HF_TOKENIZER_FILE).is_file():  # a Hugging Face model or tokenizer folder
        file = file / HF_TOKENIZER_FILE
    if not file.is_file():
        raise _bad_file(
            path, "no such file (set data.tokenizer to a tiktoken or sentencepiece model or a tokenizer.json)"
        )
    try:
        with open(file, "rb") as f:
            first_line = f.readline(4096)
    except OSError as e:
        raise _bad_file(path, f"cannot read the tokenizer file ({e.strerror or e})") from e
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return TiktokenTokenizer(file)
    if first_line[:1] == b"\n":  # protobuf field 1 (`pieces`), length-delimited: a sentencepiece ModelProto
        return SentencePieceTokenizer(file)
    if first_line.lstrip()[:1] == b"{":
        return HuggingFaceTokenizer(file)
    raise _bad_file(
        path,
        "neither a tiktoken BPE file (lines of `base64 rank`), a sentencepiece model (protobuf) nor a "
        "tokenizer.json",
    )
