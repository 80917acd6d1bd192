"""Packing: one stream's documents, BOS + tokens + EOS back to back, cut into windows of seq_len + 1.

A stream repeats its documents (epochs) when they run out and passes over empty ones, counting them.
"""

from __future__ import annotations

from typing import Any

from titan.data.documents import Documents
from titan.data.stream_state import StreamState
from titan.data.tokenizer import Tokenizer


class PackedStream:
    """One stream's documents as back-to-back BOS ... EOS tokens, cut into `window`-token windows."""

    def __init__(self, documents: Documents, tokenizer: Tokenizer, window: int, state: StreamState):
        self.documents, self.tokenizer, self.window = documents, tokenizer, window
        self.num_streams, self.epoch, self.skipped = state.num_streams, state.epoch, state.skipped
        self._tokens, self._start = list(state.tokens), 0  # pending tokens are _tokens[_start:]
        self._start_epoch(state.position)

    def _start_epoch(self, position: Any) -> None:
        self._docs = self.documents.iterate(position)
        # Until a document is read, the position is the one started from (a generator that has not
        # run yet has not moved the source).
        self._started_at, self._moved = position, False
        self._epoch_has_text = False

    def next_window(self) -> list[int]:
        while len(self._tokens) - self._start < self.window:
            self._read_document()
        window = self._tokens[self._start : self._start + self.window]
        self._start += self.window
        return window

    def _read_document(self) -> None:
        text = next(self._docs, None)
        if text is None:  # end of the epoch: go round again
            if self._started_at is None and not self._epoch_has_text:
                raise ValueError(
                    f"{self.documents.describe()} got no non-empty document: with "
                    f"training.global_batch_size={self.num_streams}, every sequence slot needs its own "
                    "documents; add data to data.path or lower training.global_batch_size"
                )
            self.epoch += 1
            self._start_epoch(None)
            return
        self._moved = True
        if not text.strip():
            self.skipped += 1
            return
        self._epoch_has_text = True
        self._tokens = self._tokens[self._start :] + self.tokenizer.encode(text, bos=True, eos=True)
        self._start = 0

    def state(self) -> StreamState:
        return StreamState(
            num_streams=self.num_streams,
            epoch=self.epoch,
            position=self.documents.position() if self._moved else self._started_at,
            tokens=self._tokens[self._start :],
            skipped=self.skipped,
        )
