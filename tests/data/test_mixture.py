"""Weighted mixtures: the same global batches at every dp degree, exact resume onto another one, each
window from the source drawn for it, the realized shares near the weights, and a source that runs dry."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.data.test_loader import C4_TEST, TOKENIZER, loader, resume, short_texts, take, write_jsonl
from tests.utils import check_loss_falls
from titan.config.schema import DataConfig, SourceConfig
from titan.data.checks import check_data
from titan.data.mixture import cumulative_weights, window_sources
from titan.data.pretokenize import pretokenize
from titan.data.tokenizer import build_tokenizer

DIGITS = [" ".join(str(1000 + 7 * i + k) for k in range(20 + i % 13)) for i in range(40)]


def mixture(prose, digits, *, weights=(3.0, 1.0), **kw) -> DataConfig:
    sources = (
        SourceConfig(name="prose", path=str(prose), weight=weights[0]),
        SourceConfig(name="digits", source="text", path=str(digits), weight=weights[1]),
    )
    return DataConfig(source="mixture", path="", tokenizer=TOKENIZER, sources=sources, **kw)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Prose (jsonl) and lines of numbers (text): their token sets tell which source a window is from."""
    folder = tmp_path_factory.mktemp("mixture")
    prose = write_jsonl(folder / "prose.jsonl", short_texts(40))
    digits = folder / "digits.txt"
    digits.write_text("".join(line + "\n" for line in DIGITS))
    return prose, digits


def vocabulary(texts) -> set[int]:
    tokenizer = build_tokenizer(TOKENIZER)
    return {t for text in texts for t in tokenizer.encode(text, bos=True, eos=True)}


def test_each_window_comes_from_the_source_drawn_for_it(two_sources):
    data = mixture(*two_sources)
    batch, steps = 8, 60
    inputs, labels = take(loader(data, batch=batch, seq_len=31), steps)
    windows = torch.cat([inputs, labels[..., -1:]], dim=-1)  # [steps, batch, 32]
    digit_tokens, prose_tokens = vocabulary(DIGITS), vocabulary(short_texts(40))
    cumulative = cumulative_weights(data.sources)
    chosen = np.stack([window_sources(data.mix_seed, np.arange(batch), w, cumulative) for w in range(steps)])
    for step in range(steps):
        for row in range(batch):
            tokens = set(windows[step, row].tolist())
            if chosen[step, row] == 1:
                assert tokens <= digit_tokens, (step, row)
            else:
                assert tokens <= prose_tokens and not tokens <= digit_tokens, (step, row)
    # 480 windows drawn with p = 3/4: the realized share is within 4 standard deviations (0.08).
    share = (chosen == 0).mean()
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / chosen.size) ** 0.5, share
    assert 0 < chosen.sum() < chosen.size  # both sources occur


def test_realized_shares_follow_the_weights(two_sources):
    """The loader's own count of windows per source, over 16 slots x 200 steps, against weights 1:3."""
    data = mixture(*two_sources, weights=(1.0, 3.0))
    train_loader = loader(data, batch=16, seq_len=15)
    take(train_loader, 200)
    windows = train_loader.source_windows()
    assert sum(windows.values()) == 16 * 200
    p, n = 0.25, 16 * 200
    assert abs(windows["prose"] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, windows  # 4 sigma: 0.031


@pytest.mark.parametrize("dp", [2, 4])
def test_global_batches_do_not_depend_on_the_dp_degree(two_sources, dp):
    data = mixture(*two_sources)
    whole = take(loader(data, batch=8, seq_len=31), 20)[0]
    parts = [take(loader(data, batch=8, seq_len=31, rank=r, dp=dp), 20)[0] for r in range(dp)]
    assert torch.equal(whole, torch.cat(parts, dim=1))


@pytest.mark.parametrize(("dp_before", "dp_after", "workers"), [(1, 1, 0), (2, 4, 0), (4, 1, 2)])
def test_resume_is_exact_onto_another_dp_degree(two_sources, dp_before, dp_after, workers):
    data = mixture(*two_sources, weights=(1.0, 3.0))
    expected = take(loader(data, batch=8, seq_len=63), 30)[0]
    states = []
    for r in range(dp_before):
        ranked = loader(replace(data, num_workers=workers), batch=8, seq_len=63, rank=r, dp=dp_before)
        take(ranked, 16)  # past the digits' first epoch in some slots
        states.append(ranked.state_dict())
        ranked.close()
    assert any(s["sources"]["digits"]["epoch"] > 0 for state in states for s in state.values())
    assert torch.equal(resume(data, states, 14, 8, 63, dp=dp_after, workers=workers), expected[16:])


def test_a_source_that_runs_dry_wraps_or_stops(two_sources, tmp_path):
    prose, _ = two_sources
    few = tmp_path / "few.txt"
    few.write_text("1 2 3\n4 5 6\n7 8 9\n10 11 12\n")
    data = mixture(prose, few, weights=(1.0, 1.0))
    wrapped = loader(data, batch=4, seq_len=31)
    take(wrapped, 10)
    assert all(s["sources"]["digits"]["epoch"] >= 1 for s in wrapped.state_dict().values())
    stopping = loader(replace(data, on_source_end="stop"), batch=4, seq_len=31)
    with pytest.raises(
        ValueError,
        match=r"data.sources 'digits' ran out of documents in sequence slot \d+ .*on_source_end=wrap",
    ):
        take(stopping, 10)


def test_a_pretokenized_source_in_a_mixture(two_sources, tmp_path):
    """A `tokens` source gives the windows its text would: the mixture's batches are the same."""
    prose, digits = two_sources
    folder = pretokenize(DataConfig(path=str(prose), tokenizer=TOKENIZER), tmp_path / "prose", progress=False)
    text = mixture(prose, digits)
    tokens = replace(
        text, sources=(replace(text.sources[0], source="tokens", path=str(folder)), text.sources[1])
    )
    assert torch.equal(
        take(loader(text, batch=8, seq_len=31), 15)[0], take(loader(tokens, batch=8, seq_len=31), 15)[0]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sources": ()}, r"data.source=mixture needs data.sources"),
        (
            {"sources": (SourceConfig(name="a", path="x"), SourceConfig(name="a", path="y"))},
            r"the name 'a' is used twice",
        ),
        ({"sources": (SourceConfig(name="a", path="x", weight=0.0),)}, r"'a': weight=0.0 must be > 0"),
        (
            {"sources": (SourceConfig(name="a", source="csv", path="x"),)},
            r"'a': data.source='csv' is not one of",
        ),
        ({"on_source_end": "loop"}, r"data.on_source_end='loop' is not one of wrap, stop"),
    ],
)
def test_mixture_errors(two_sources, change, message):
    with pytest.raises(ValueError, match=message):
        check_data(replace(mixture(*two_sources), **change))


def test_a_missing_source_file_names_the_source(two_sources, tmp_path):
    prose, _ = two_sources
    with pytest.raises(ValueError, match=r"data.sources 'digits': data.path=.*nowhere.txt: no such file"):
        check_data(mixture(prose, tmp_path / "nowhere.txt"))


def test_a_state_of_other_sources_is_refused(two_sources):
    data = mixture(*two_sources)
    single = loader(C4_TEST, batch=8, seq_len=31)
    with pytest.raises(
        ValueError, match=r"a mixture of one source, not of data.sources \['digits', 'prose'\]"
    ):
        loader(data, batch=8, seq_len=31).load_state_dict(json.loads(json.dumps(single.state_dict())))
    with pytest.raises(ValueError, match=r"a mixture's, but data.source is not mixture"):
        single.load_state_dict(loader(data, batch=8, seq_len=31).state_dict())


def test_training_on_a_mixture_lowers_the_loss(two_sources, tmp_path):
    check_loss_falls(
        tmp_path, data={"source": "mixture", "path": "", "sources": mixture(*two_sources).sources}
    )
