"""Where one stream stands: the epoch, where its next document is, the tokens read but not yet
emitted, and how many empty documents and bad records it passed over.

A few plain, JSON-able values: the loader's state dict, saved in every checkpoint, is one of these
per stream, so its keys are part of the checkpoint format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamState:
    """Everything a stream needs to go on exactly where it stopped; JSON-able."""

    num_streams: int  # the streams' count fixes which documents each stream reads
    epoch: int = 0
    position: Any = None  # of the next document in this epoch; None: the epoch's start
    tokens: list[int] = field(default_factory=list)  # read but not yet emitted
    skipped: int = 0  # empty or whitespace-only documents passed over, all epochs
    # records that hold no document passed over (data.on_bad_record=skip), all epochs; a state saved
    # before this key existed has none
    bad_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that copies the token list element by element, every step.
        return {
            "num_streams": self.num_streams,
            "epoch": self.epoch,
            "position": self.position,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "bad_records": self.bad_records,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamState:
        return cls(**state)
