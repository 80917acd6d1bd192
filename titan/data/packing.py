"""Packing: one stream's documents, BOS + tokens + EOS back to back, cut into windows of seq_len + 1.

A stream repeats its documents (epochs) when they run out and passes over empty ones, counting them.
A bad record (one that holds no document) stops the run, or with data.on_bad_record=skip is passed
over and counted like an empty document: it keeps its place in the stream's order, so what follows
it, and a resume, are the same either way.
"""

from __future__ import annotations

import logging
from typing import Any

from titan.data.documents import Documents
from titan.data.formats import BadRecord
from titan.data.stream_state import StreamState
from titan.data.tokenizer import Tokenizer

log = logging.getLogger("titan")

# Each skipped record is logged up to this many per stream, then every power of ten: a corpus with
# many bad records does not flood the log.
LOGGED_BAD_RECORDS = 10


class PackedStream:
    """One stream's documents as back-to-back BOS ... EOS tokens, cut into `window`-token windows."""

    def __init__(
        self,
        documents: Documents,
        tokenizer: Tokenizer,
        window: int,
        state: StreamState,
        on_bad_record: str = "raise",
    ):
        self.documents, self.tokenizer, self.window = documents, tokenizer, window
        self.on_bad_record = on_bad_record
        self.num_streams, self.epoch, self.skipped = state.num_streams, state.epoch, state.skipped
        self.bad_records = state.bad_records
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
        if isinstance(text, BadRecord) and self.on_bad_record != "skip":
            raise text  # the loader then keeps the states of the last batch it handed out
        self._moved = True
        if isinstance(text, BadRecord):
            self._skip(text)
            return
        if isinstance(text, str):
            tokens = self.tokenizer.encode(text, bos=True, eos=True) if text.strip() else []
        else:  # a pre-tokenized document: its ids as they were encoded (empty for an empty document)
            tokens = text.tolist()
        if not tokens:
            self.skipped += 1
            return
        self._epoch_has_text = True
        self._tokens = self._tokens[self._start :] + tokens
        self._start = 0

    def _skip(self, bad: BadRecord) -> None:
        self.bad_records += 1
        n = self.bad_records
        if n <= LOGGED_BAD_RECORDS or str(n).rstrip("0") == "1":
            log.warning(
                "data.on_bad_record=skip: skipped %s; %d skipped so far in %s",
                bad.record(),
                n,
                self.documents.describe(),
            )

    def state_dict(self) -> dict[str, Any]:
        return self.state().to_dict()

    def state(self) -> StreamState:
        return StreamState(
            num_streams=self.num_streams,
            epoch=self.epoch,
            position=self.documents.position() if self._moved else self._started_at,
            tokens=self._tokens[self._start :],
            skipped=self.skipped,
            bad_records=self.bad_records,
        )
