"""Rebuild the bundled assets, offline and deterministically: `python -m titan.assets.build_assets`.

- `c4_test/c4-train.00000-of-00001.json`: a C4-format shard (`{"text", "timestamp", "url"}` per line)
  of English prose that ships with every CPython 3.11: the language reference (`pydoc_data.topics`),
  the standard library's docstrings and its comments. Paragraphs are kept the way C4 keeps lines
  (enough words, mostly words, no code or braces), exact duplicates dropped, and consecutive
  paragraphs of one source grouped into documents of C4-like, log-normal lengths.
- `tokenizers/titan_debug.tiktoken`: a byte-level BPE (256 bytes + 1792 merges) in Meta's Llama 3
  `tokenizer.model` format, trained on the shard with the Llama 3 split pattern.
- `tokenizers/titan_debug_sp.model`: a sentencepiece BPE (vocab 2048, byte fallback, Llama 2's
  normalisation settings) trained on the same shard.

The output is a function of the CPython sources and of the `tokenizers` and `sentencepiece` versions:
with those of `BUILT_WITH` it reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import json
import random
import re
import sys
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

from titan.data.tokenizer import LLAMA3_SPLIT_PATTERN, TiktokenTokenizer

ASSETS_DIR = Path(__file__).resolve().parent
SHARD = "c4_test/c4-train.00000-of-00001.json"
TIKTOKEN_MODEL = "tokenizers/titan_debug.tiktoken"
SENTENCEPIECE_MODEL = "tokenizers/titan_debug_sp.model"
VOCAB_SIZE = 2048  # base tokens: 256 bytes + 1792 merges; sentencepiece: all pieces
BUILT_WITH = {"python": "3.11.7", "tokenizers": "0.23.3", "sentencepiece": "0.2.3"}
SEED = 0

# Standard-library folders that Linux distributions package separately, and tests: left out so that
# every CPython 3.11 install has the same sources.
_SKIPPED_DIRS = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "venv",
    "site-packages", "dist-packages", "__phello__",
}  # fmt: skip
_BULLET = re.compile(r"(?:[*\-•]|\d+\.|\(\d+\)) +")
_WORD = re.compile(r"[(\"'“‘]*[A-Za-z][A-Za-z'’\-]*[)\"'”’.,;:!?]*")
_CODE_MARKS = (">>>", "::=", "{", "}", "***", "===", "---")


def prose_paragraphs(text: str) -> Iterator[str]:
    """The paragraphs of `text` that read as prose, each re-flowed onto one line (as C4 stores them)."""
    for block in re.split(r"\n[ \t]*\n", text):
        block = textwrap.dedent(block).strip("\n")
        if not block.strip():
            continue
        lines = block.split("\n")
        bullet = _BULLET.match(lines[0])
        if bullet:  # a list item: its continuation lines are indented
            lines[0] = lines[0][bullet.end() :]
        elif any(line.startswith((" ", "\t")) for line in lines[1:]):
            continue  # code, grammar rules, tables
        paragraph = " ".join(line.strip() for line in lines)
        words = paragraph.split()
        # C4 keeps lines of at least 5 words and drops anything with curly braces (code).
        if len(words) < 5 or any(mark in paragraph for mark in _CODE_MARKS):
            continue
        if sum(bool(_WORD.fullmatch(w)) for w in words) >= 0.8 * len(words):
            yield paragraph


def _comment_blocks(source: bytes) -> Iterator[tuple[int, str]]:
    """(line, text) of each run of whole-line comments; a bare `#` line ends a paragraph."""
    lines: list[str] = []
    first = last = -2
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
                continue
            body = tok.string.lstrip("#").strip()
            if (tok.start[0] != last + 1 or not body) and lines:
                yield first, "\n".join(lines)
                lines = []
            if body:
                first = tok.start[0] if not lines else first
                lines.append(body)
            last = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if lines:
        yield first, "\n".join(lines)


def _module_text(source: bytes) -> list[str]:
    """A module's docstrings and comments, in the order they appear in the file."""
    tree = ast.parse(source)
    pieces = [(1, ast.get_docstring(tree) or "")]
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            pieces.append((node.lineno, ast.get_docstring(node) or ""))
    pieces.extend(_comment_blocks(source))
    return [text for _, text in sorted(pieces, key=lambda p: p[0]) if text]


def stdlib_sources() -> Iterator[tuple[str, list[str]]]:
    """(url, texts) for each topic of the language reference and each standard-library module."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"https://docs.python.org/3.11/reference/{key}.html", [topics[key]]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(stdlib.rglob("*.py")):
        rel = file.relative_to(stdlib)
        if _SKIPPED_DIRS & set(rel.parts) or rel.parts[0].startswith("config-") or rel.name == "turtle.py":
            continue
        try:
            texts = _module_text(file.read_bytes())
        except (SyntaxError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        yield f"https://docs.python.org/3.11/library/{module}.html", texts


def build_documents(seed: int = SEED) -> list[dict[str, str]]:
    """C4-format records: paragraphs of one source grouped into documents, then shuffled."""
    rng = random.Random(seed)
    seen: set[str] = set()
    documents = []
    for url, texts in stdlib_sources():
        paragraphs = []
        for text in texts:
            for paragraph in prose_paragraphs(text):
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
        parts: list[list[str]] = []
        # Log-normal word counts, median 150, long tail (C4's documents are a few hundred words).
        target, words = min(int(rng.lognormvariate(5.0, 0.9)), 3000), 0
        for paragraph in paragraphs:
            if words == 0:
                parts.append([])
            parts[-1].append(paragraph)
            words += len(paragraph.split())
            if words >= target:
                target, words = min(int(rng.lognormvariate(5.0, 0.9)), 3000), 0
        if len(parts) > 1 and sum(len(p.split()) for p in parts[-1]) < 30:
            parts[-2].extend(parts.pop())  # no stub at the end of a page
        for i, part in enumerate(parts):
            text = "\n".join(part)
            if len(text.split()) < 30:
                continue
            # C4's crawl is of April 2019.
            day, hour, minute, second = (
                rng.randint(18, 26),
                rng.randint(0, 23),
                rng.randint(0, 59),
                rng.randint(0, 59),
            )
            stamp = f"2019-04-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"
            page = f"?page={i + 1}" if len(parts) > 1 else ""
            documents.append({"text": text, "timestamp": stamp, "url": url + page})
    rng.shuffle(documents)
    return documents


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which Hugging Face's ByteLevel vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """A Hugging Face byte-level BPE with the Llama 3 pre-tokenizer (fast, Rust)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tiktoken_ranks(bpe, vocab_size: int = VOCAB_SIZE) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes (rank = byte value), then one rank per merge in order."""
    merges = json.loads(bpe.to_str())["model"]["merges"]
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for pair in merges:
        left, right = pair.split(" ") if isinstance(pair, str) else pair
        a, b = bytes(to_byte[c] for c in left), bytes(to_byte[c] for c in right)
        # Rank-consistent: both halves exist with lower ranks, and the merge makes a new token,
        # so tiktoken (lowest-rank pair first) replays the merges in the order they were learned.
        if a not in ranks or b not in ranks or a + b in ranks:
            raise RuntimeError(f"merge {left!r} + {right!r} is not rank-consistent")
        ranks[a + b] = len(ranks)
    if len(ranks) != vocab_size:
        raise RuntimeError(f"trained {len(ranks)} tokens, wanted {vocab_size}: too little text")
    return ranks


def tiktoken_file(ranks: dict[bytes, int]) -> bytes:
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in ranks.items()]
    return b"\n".join(lines) + b"\n"


def train_sentencepiece(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """A Llama 2 style sentencepiece BPE: identity normalisation (text round-trips), byte fallback."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,  # not a file: the model would record its input path otherwise
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=0.99995,
        max_sentence_length=1 << 16,
        num_threads=1,  # one thread: the same model on every machine
        minloglevel=2,
    )
    return model.getvalue()


def build(out_dir: Path) -> dict[str, bytes]:
    documents = build_documents()
    shard = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents).encode()
    texts = [d["text"] for d in documents]
    bpe = train_bpe(texts)
    lines = [line for text in texts for line in text.split("\n")]
    files = {
        SHARD: shard,
        TIKTOKEN_MODEL: tiktoken_file(tiktoken_ranks(bpe)),
        SENTENCEPIECE_MODEL: train_sentencepiece(lines),
    }
    for rel, content in files.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_bytes(content)
    # The written file, loaded as a Llama 3 tokenizer, must split every document exactly as the
    # trained BPE does (tiktoken could in principle find a merge path that BPE never took).
    tokenizer, to_byte = (
        TiktokenTokenizer(out_dir / TIKTOKEN_MODEL),
        {c: b for b, c in bytes_to_unicode().items()},
    )
    for text in texts:
        ours = [
            tokenizer.model.decode_single_token_bytes(i) for i in tokenizer.encode(text, bos=False, eos=False)
        ]
        if ours != [bytes(to_byte[c] for c in t) for t in bpe.encode(text).tokens]:
            raise RuntimeError(f"the tiktoken file and the trained BPE disagree on {text[:80]!r}")
    return files


def _versions() -> dict[str, str]:
    import sentencepiece
    import tokenizers

    python = ".".join(map(str, sys.version_info[:3]))
    return {
        "python": python,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": sentencepiece.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ASSETS_DIR, help="folder to write into (default: the package's)"
    )
    args = parser.parse_args(argv)
    if _versions() != BUILT_WITH:
        print(f"note: built with {BUILT_WITH}, this is {_versions()}: the files may differ", file=sys.stderr)
    for rel, content in build(args.out).items():
        print(f"{rel}  {len(content):>9,} bytes  sha256 {hashlib.sha256(content).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
