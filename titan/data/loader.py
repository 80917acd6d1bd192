"""The training loader: packed windows in a global order that no parallel layout changes.

A global batch of B sequences is read as B logical streams (documents.py, packing.py); row j of
every global batch comes from stream j, and dp rank r owns the contiguous block of streams
[r*B/dp, (r+1)*B/dp).
So one rank's batch is the concatenation of two ranks' batches, step after step, and the loader's
state is the state of each of its streams: a checkpoint written at one dp degree (and number of
workers) resumes at any other that divides B.

With `data.num_workers` > 0, worker w of a rank owns the w-th contiguous block of that rank's
streams and yields, per step, its block's rows together with those streams' states after making
them. torch's DataLoader hands out worker items round-robin, so W consecutive items make one step;
the loader keeps the states of the items it has handed to the caller, never of items still
prefetched. An error in a worker (a bad record, say) comes to the rank as the exception itself, in
the order of the items, so the rank raises it at the same step and with the same one-line message as
without workers. torchdata's StatefulDataLoader is not used: its state is per worker (each worker's
dataset state plus which worker is next), so it can only be restored with the same number of
workers and ranks; ours is per logical stream and can be dealt out again to any layout.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from titan.config.schema import DataConfig
from titan.data.checks import check_choices, checked_files, num_workers_problem
from titan.data.documents import stream_documents
from titan.data.holdout import HeldOutSplit, Part
from titan.data.mixture import MixedStream, mixture_state, source_data
from titan.data.packing import PackedStream
from titan.data.records import LocalFiles
from titan.data.stream_state import StreamState
from titan.data.token_shards import TokenShards
from titan.data.tokenizer import Tokenizer, build_tokenizer

PREFETCH_STEPS = 2  # items each worker keeps ready


def stream_key(stream: int) -> str:
    return f"stream-{stream:05d}"


@dataclass
class _WorkerError:
    """A worker's item in place of a step it could not make. torch would re-raise the error in the
    rank as a new exception whose message holds the worker's whole traceback."""

    error: ValueError


class _RankStreams(IterableDataset):
    """One rank's streams; in a DataLoader worker, that worker's contiguous block of them.

    Yields one item per step: (windows int64 [streams, seq_len + 1], {stream key: state after it}).
    """

    def __init__(
        self,
        data: DataConfig,
        window: int,
        streams: list[int],
        num_streams: int,
        states: dict[str, dict],
        files: LocalFiles | TokenShards | dict[str, LocalFiles | TokenShards | None] | None,
        tokenizer: Tokenizer | None,
    ):
        self.data, self.window, self.streams, self.num_streams = data, window, streams, num_streams
        self.states, self.files, self.tokenizer = states, files, tokenizer

    def __getstate__(self) -> dict:  # for workers started by `spawn`: they load their own tokenizer
        return {**self.__dict__, "tokenizer": None}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, dict]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_worker = len(self.streams) // num_workers
        block = self.streams[worker * per_worker : (worker + 1) * per_worker]
        # A forked worker keeps the rank's tokenizer; a spawned one is sent none and loads its own.
        tokenizer = self.tokenizer or build_tokenizer(self.data.tokenizer)
        # A worker opens its own files: copy.copy goes through LocalFiles.__getstate__, which leaves
        # out the parent's open handles and caches (pyarrow's readers are not to be shared by fork).
        files = copy.copy(self.files) if info is not None else self.files
        packed = [self._stream(j, files, tokenizer) for j in block]
        while True:
            try:
                rows = [stream.next_window() for stream in packed]
            except ValueError as e:
                if info is None:
                    raise
                yield _WorkerError(e)
                return
            states = {stream_key(j): stream.state_dict() for j, stream in zip(block, packed)}
            yield torch.from_numpy(np.array(rows, dtype=np.int64)), states

    def _packed(self, data: DataConfig, files, j: int, state: dict, tokenizer: Tokenizer) -> PackedStream:
        documents = stream_documents(data, files, j, self.num_streams)
        return PackedStream(
            documents, tokenizer, self.window, StreamState.from_dict(state), data.on_bad_record
        )

    def _stream(self, j: int, files, tokenizer: Tokenizer) -> PackedStream | MixedStream:
        state = self.states[stream_key(j)]
        if self.data.source != "mixture":
            return self._packed(self.data, files, j, state, tokenizer)
        packed = {
            s.name: self._packed(
                source_data(self.data, s), copy.copy(files[s.name]), j, state["sources"][s.name], tokenizer
            )
            for s in self.data.sources
        }
        return MixedStream(self.data, j, packed, state)


def _as_is(item: Any) -> Any:
    """The DataLoader's default would walk the states' token lists one int at a time."""
    return item


class TrainLoader:
    """Packed (inputs, labels) batches for one data-parallel rank, endless, checkpointable."""

    def __init__(
        self,
        data: DataConfig,
        *,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int,
        dp_degree: int,
        part: Part = "train",
    ):
        """part: with data.holdout_every > 0, read the training documents or the held-out ones
        (holdout.py)."""
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError(
                f"training.seq_len={seq_len} and training.global_batch_size={global_batch_size} must be >= 1"
            )
        if dp_degree < 1 or global_batch_size % dp_degree:
            raise ValueError(
                f"training.global_batch_size={global_batch_size} does not divide by the data-parallel degree "
                f"{dp_degree}; make it a multiple"
            )
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_degree - 1}")
        problem = num_workers_problem(data.num_workers, global_batch_size, dp_degree)
        if problem:
            raise ValueError(problem)
        check_choices(data)
        per_rank = global_batch_size // dp_degree
        if part == "heldout" and data.holdout_every == 0:
            raise ValueError(
                "validation reads the held-out documents of the training data, but data.holdout_every=0 "
                "holds none out: set data.holdout_every=N (every N-th document) or give validation.data"
            )
        self.data, self.seq_len, self.global_batch_size = data, seq_len, global_batch_size
        self.part = part
        self.streams = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.tokenizer = build_tokenizer(data.tokenizer)
        if data.source == "mixture":
            names = [s.name for s in data.sources]
            self.files = {}
            for source in data.sources:
                try:
                    self.files[source.name] = self._source_files(source_data(data, source), per_rank)
                except ValueError as e:
                    raise ValueError(f"data.sources {source.name!r}: {e}") from None
            self._states = {stream_key(j): mixture_state(global_batch_size, names) for j in self.streams}
        else:
            self.files = self._source_files(data, per_rank)
            self._states = {stream_key(j): StreamState(global_batch_size).to_dict() for j in self.streams}
        self._workers: Any = None  # the live DataLoader iterator, when there are workers

    def _source_files(
        self, data: DataConfig, per_rank: int
    ) -> LocalFiles | TokenShards | HeldOutSplit | None:
        """Random access to one source's documents, checked once (None for the Hub, which streams)."""
        if data.source == "huggingface":
            checked_files(data)  # data.path is set; the Hub itself is not contacted
            if data.holdout_every:
                raise ValueError(
                    f"data.holdout_every={data.holdout_every} needs local files or token shards, not the "
                    f"streamed hub dataset {data.path}: set it to 0 and validate on the dataset's own "
                    "split (validation.data with split=validation)"
                )
            return None
        files = (
            TokenShards(data)
            if data.source == "tokens"
            else LocalFiles(data, checked_files(data), per_rank + 2)
        )
        if data.holdout_every:
            files = HeldOutSplit(files, data.holdout_every, self.part)
        self._check_enough_documents(data, files)
        return files

    def _check_enough_documents(
        self, data: DataConfig, files: LocalFiles | TokenShards | HeldOutSplit
    ) -> None:
        """Every stream must get documents. With at least one file per stream that is down to the
        files (an empty one is caught by check_data); with fewer files, count the records."""
        if len(files.files) >= self.global_batch_size:
            return
        records = sum(files.count(f) for f in range(len(files.files)))
        if records < self.global_batch_size:
            held_out, key = (
                (" held-out", "validation.global_batch_size")
                if self.part == "heldout"
                else ("", "training.global_batch_size")
            )
            raise ValueError(
                f"data.path={data.path} has {records}{held_out} documents but {key}="
                f"{self.global_batch_size} needs at least one per sequence slot; add data or lower {key}"
            )

    def state_dict(self) -> dict[str, dict]:
        """The state of this rank's streams after the items handed out so far; JSON-serialisable."""
        return copy.deepcopy(self._states)

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Take up the streams' states; `state` may hold other ranks' streams too (all are merged)."""
        missing = [key for key in self._states if key not in state]
        if missing:
            raise ValueError(
                f"the data-loader state has no {missing[0]} (and {len(missing) - 1} more streams of this "
                "rank): was it saved with another training.global_batch_size?"
            )
        for key in self._states:
            if state[key].get("num_streams") != self.global_batch_size:
                raise ValueError(
                    f"the data-loader state was saved with training.global_batch_size="
                    f"{state[key].get('num_streams')}, not {self.global_batch_size}: the documents of each "
                    "sequence slot would differ; resume with the same global batch size"
                )
        try:
            states = {key: self._checked_state(state[key]) for key in self._states}
        except TypeError as e:
            raise ValueError(f"the data-loader state is not a stream state ({e})") from None
        self.close()
        self._states = copy.deepcopy(states)

    def _checked_state(self, state: dict) -> dict:
        if self.data.source != "mixture":
            if "sources" in state:
                raise ValueError("the data-loader state is a mixture's, but data.source is not mixture")
            return StreamState.from_dict(state).to_dict()
        names = [s.name for s in self.data.sources]
        saved = sorted(state.get("sources", {}))
        if saved != sorted(names):
            raise ValueError(
                f"the data-loader state is of a mixture of {saved or 'one source'}, not of data.sources "
                f"{sorted(names)}: resume with the same sources (a new mixture is a new run)"
            )
        return {
            **state,
            "sources": {n: StreamState.from_dict(state["sources"][n]).to_dict() for n in names},
        }

    def source_windows(self) -> dict[str, int]:
        """Windows (each seq_len + 1 tokens) each source of a mixture gave this rank's sequence slots so
        far, resumed runs included; {} for a single source."""
        if self.data.source != "mixture":
            return {}
        totals = {s.name: 0 for s in self.data.sources}
        for state in self._states.values():
            for name, n in state["windows"].items():
                totals[name] += n
        return totals

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One item per optimizer step: (inputs, labels), each int64 [global_batch_size // dp_degree,
        seq_len]; endless (epochs). A new iteration goes on from the last item handed out."""
        self.close()
        dataset = _RankStreams(
            self.data,
            self.seq_len + 1,
            self.streams,
            self.global_batch_size,
            self.state_dict(),
            self.files,
            self.tokenizer,
        )
        num_workers = self.data.num_workers
        if num_workers == 0:
            items = iter(dataset)
        else:
            self._workers = items = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    collate_fn=_as_is,
                    num_workers=num_workers,
                    prefetch_factor=PREFETCH_STEPS,
                )
            )
        return self._batches(items, max(num_workers, 1))

    def _batches(self, items: Iterator, parts: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            step = [next(items) for _ in range(parts)]
            for item in step:
                if isinstance(item, _WorkerError):
                    raise item.error
            windows = torch.cat([rows for rows, _ in step]) if parts > 1 else step[0][0]
            for _, states in step:
                self._states.update(states)
            yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def close(self) -> None:
        """Stop the worker processes, if any (iterating again restarts them from the state)."""
        workers, self._workers = self._workers, None
        shutdown = getattr(workers, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
