"""Weighted mixtures of sources (data.source=mixture): which source each training window comes from.

Sequence slot j of every global batch is one stream, as for a single source (loader.py); in a mixture
it holds one packed stream per source (that source's documents dealt to slot j, as packing.py does for
one source), and its w-th window comes whole from one of them. Which one is a pure function of
(data.mix_seed, j, w): a counter-based draw with the sources' weights. So the choices do not depend on
the dp degree, the number of loader workers or where a run was resumed, and the state of a slot is
its window count plus each of its sources' stream states. Every window is seq_len + 1 tokens, so the
sources' shares of the windows are their shares of the tokens.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from titan.config.schema import DataConfig, SourceConfig
from titan.data.packing import PackedStream
from titan.data.stream_state import StreamState

log = logging.getLogger("titan")

ON_SOURCE_END = ("wrap", "stop")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea and Flood, 2014): a well-mixed 64-bit hash of a counter.
    Written out because numpy's generators are seeded per call, far too slow for one draw a window,
    and their streams may change between numpy versions; this never does."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_sources(seed: int, streams: np.ndarray, window: int, cumulative: list[float]) -> np.ndarray:
    """The source index of window `window` of each of `streams`: uniform draws in [0, 1) against the
    sources' cumulative normalized weights."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash means it to
        counter = (np.uint64(seed) << np.uint64(40)) ^ (streams.astype(np.uint64) << np.uint64(32))
        u = (_splitmix64(_splitmix64(counter) ^ np.uint64(window)) >> np.uint64(11)) * 2.0**-53
    return np.searchsorted(np.asarray(cumulative), u, side="right")


def cumulative_weights(sources: tuple[SourceConfig, ...]) -> list[float]:
    total = sum(s.weight for s in sources)
    running, out = 0.0, []
    for s in sources[:-1]:
        running += s.weight / total
        out.append(running)
    return out  # n - 1 bounds: index i is chosen when u falls in [out[i-1], out[i])


def source_data(data: DataConfig, source: SourceConfig) -> DataConfig:
    """The single-source DataConfig of one source of a mixture (its tokenizer and policies are the
    mixture's)."""
    return replace(
        data,
        source=source.source,
        path=source.path,
        name=source.subset,
        split=source.split,
        text_field=source.text_field,
        sources=(),
    )


def mixture_state(num_streams: int, names: list[str]) -> dict[str, Any]:
    """A slot's state at the start: no window made, each source's stream at its start."""
    return {
        "num_streams": num_streams,
        "window": 0,
        "windows": {name: 0 for name in names},
        "sources": {name: StreamState(num_streams).to_dict() for name in names},
    }


class MixedStream:
    """Sequence slot `stream` of a mixture: each window whole from the source drawn for it."""

    def __init__(
        self,
        data: DataConfig,
        stream: int,
        packed: dict[str, PackedStream],
        state: dict[str, Any],
    ):
        self.data, self.stream, self.packed = data, stream, packed
        self.names = [s.name for s in data.sources]
        self.cumulative = cumulative_weights(data.sources)
        self.num_streams, self.window = state["num_streams"], state["window"]
        self.windows = dict(state["windows"])

    def next_window(self) -> list[int]:
        index = int(
            window_sources(self.data.mix_seed, np.array([self.stream]), self.window, self.cumulative)[0]
        )
        name = self.names[index]
        packed = self.packed[name]
        epoch = packed.epoch
        window = packed.next_window()
        if packed.epoch != epoch:
            if self.data.on_source_end == "stop":
                raise ValueError(
                    f"data.sources {name!r} ran out of documents in sequence slot {self.stream} at its window "
                    f"{self.window} (data.on_source_end=stop); add data to it, lower its weight, or set "
                    "data.on_source_end=wrap to repeat it"
                )
            if self.stream == 0:  # one line per epoch of a source, not one per sequence slot
                log.info("data.sources %r: sequence slot 0 starts epoch %d of it", name, packed.epoch)
        self.window += 1
        self.windows[name] += 1
        return window

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_streams": self.num_streams,
            "window": self.window,
            "windows": dict(self.windows),
            "sources": {name: packed.state_dict() for name, packed in self.packed.items()},
        }


def check_mixture(data: DataConfig) -> None:
    """The mixture's own keys: at least one source, unique names, positive weights, known policies."""
    if not data.sources:
        raise ValueError(
            "data.source=mixture needs data.sources: a list of {name, weight, source, path, ...}"
        )
    names = [s.name for s in data.sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"data.sources: the name {duplicated[0]!r} is used twice; give each source its own")
    for s in data.sources:
        if s.source in ("mixture",):
            raise ValueError(
                f"data.sources {s.name!r}: source=mixture cannot nest; give its sources directly"
            )
        if not s.weight > 0:
            raise ValueError(
                f"data.sources {s.name!r}: weight={s.weight} must be > 0 (remove the source instead)"
            )
    if data.on_source_end not in ON_SOURCE_END:
        raise ValueError(
            f"data.on_source_end={data.on_source_end!r} is not one of {', '.join(ON_SOURCE_END)}"
        )


def realized_shares(windows: dict[str, int]) -> dict[str, float]:
    total = sum(windows.values())
    return {name: n / total if total else 0.0 for name, n in windows.items()}
