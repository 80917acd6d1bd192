"""Stop requests by signal, agreed on by all ranks: Slurm's pre-timeout USR2, a cancel's or a launcher's
TERM, a terminal's Ctrl-C (INT).

A handler only sets a flag; the trainer asks `stop_requested()` at its control steps (every
`training.control_every` steps and at log steps), where every rank joins one all-reduce of a CPU tensor
on a gloo group, so all ranks stop after the same step even if only one got the signal, and the host
never waits for the device to agree. The first signal names the stop. A stop therefore comes up to
`control_every` steps after its signal: `check_control_cadence` warns when that may not fit in the
time Slurm leaves between its signal and the kill.

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
    def __init__(
        self,
        signals=STOP_SIGNALS,
        *,
        second_interrupt_stops_at_once: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """group: a gloo group of all ranks to agree on (the checkpointer's control group); None makes
        one, collectively, when there is more than one rank."""
        self.received: int | None = None
        if group is None and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.new_group(backend="gloo")
        self.group = group
        # The one tensor the agreement touches: on the CPU, so reading it never waits for a device.
        self.flag = torch.zeros(1, dtype=torch.int64)
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
        """Whether any rank got a stop signal; every rank must call it at the same steps."""
        self.flag.fill_(self.received or 0)
        if self.group is not None:
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)  # MAX keeps the signal number
        self.received = self.flag.tolist()[0] or None
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def check_control_cadence(control_every: int, step_s: float, signal_delay_s: float) -> str | None:
    """A warning when a stop may come too late: a signal waits up to `control_every` steps for the next
    control step, then the save takes its time, all within the `signal_delay_s` Slurm leaves before
    the kill; half of it goes to the wait at most. Logs and returns the warning; None when it fits."""
    wait_s = control_every * step_s
    if wait_s <= signal_delay_s / 2:
        return None
    fits = max(1, int(signal_delay_s / 4 / step_s))  # half the budget, for slower steps than measured
    warning = (
        f"training.control_every={control_every} x {step_s:.1f} s per step = {wait_s:.0f} s between stop "
        f"checks, more than half of cluster.signal_delay_s={signal_delay_s}: a stop signal may find no "
        f"time left to save. Set training.control_every={fits} (or raise cluster.signal_delay_s)."
    )
    log.warning(warning)
    return warning
