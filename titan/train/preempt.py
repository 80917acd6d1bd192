"""Stop requests by signal (Slurm's pre-timeout USR2, a cancel's TERM), agreed on by all ranks.

A handler only sets a flag; the trainer asks `stop_requested()` at each step boundary, where every
rank joins one all-reduce, so all ranks stop after the same step even if only one got the signal.
"""

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionWatcher:
    def __init__(self, signals=STOP_SIGNALS) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. an embedding application): no signals here
                pass

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    @property
    def reason(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    def stop_requested(self) -> bool:
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The CPU tensor rides on gloo or NCCL alike for a single int; MAX keeps the signal number.
            flag = flag.to("cuda") if dist.get_backend() == "nccl" else flag
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.received = int(flag.item()) or None
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
