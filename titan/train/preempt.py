"""Stop requests by signal, agreed on by all ranks: Slurm's pre-timeout USR2, a cancel's or a launcher's
TERM, a terminal's Ctrl-C (INT).

A handler only sets a flag; the trainer asks `stop_requested()` at each step boundary, where every
rank joins one all-reduce, so all ranks stop after the same step even if only one got the signal. The
first signal names the stop.

A second Ctrl-C stops at once (KeyboardInterrupt) where this process is the whole run. A rank started
by a launcher leaves that to its launcher: a terminal's Ctrl-C reaches every process of its group, so
a rank hears each Ctrl-C twice, from the terminal and passed on by the launcher.

A launcher may start its ranks with these signals blocked (titan.launch.local), so that a stop sent
before a rank is ready waits for its watcher instead of killing it: the watcher unblocks them once
its handlers are in place.
"""

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("titan")

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    def __init__(self, signals=STOP_SIGNALS, *, second_interrupt_stops_at_once: bool = False) -> None:
        self.received: int | None = None
        self.second_interrupt_stops_at_once = second_interrupt_stops_at_once
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. an embedding application): no signals here
                pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._previous)

    def _on_signal(self, signum, frame) -> None:
        if not self.second_interrupt_stops_at_once:  # a launcher's rank: the launcher says what follows
            self.received = self.received or signum
        elif self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            log.warning(
                "%s: stopping after this step, with a save (Ctrl-C again: stop at once, no save)", name
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

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
