import os
import signal
import threading

import pytest
import torch.distributed as dist

from titan.train.preempt import PreemptionWatcher


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_signal_becomes_a_stop_request_and_handlers_are_restored(group):
    before = signal.getsignal(signal.SIGUSR2)
    watcher = PreemptionWatcher()
    assert not watcher.stop_requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert watcher.stop_requested() and watcher.reason == "SIGUSR2"
    watcher.close()
    assert signal.getsignal(signal.SIGUSR2) is before


@pytest.mark.parametrize("whole_run", [True, False])
def test_the_first_signal_names_the_stop_and_a_second_ctrl_c_stops_at_once_in_a_whole_run(group, whole_run):
    """A launcher's rank hears each Ctrl-C twice (from the terminal and from its launcher): for it, more
    Ctrl-Cs are the same request."""
    watcher = PreemptionWatcher(second_interrupt_stops_at_once=whole_run)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        if whole_run:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGINT)
        assert watcher.stop_requested() and watcher.reason == "SIGTERM"
    finally:
        watcher.close()


def test_a_signal_held_before_the_watcher_is_its_request(group):
    """A launcher starts its ranks with INT and TERM blocked: one sent before the rank's watcher is in
    place waits for it instead of killing the rank."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        # to this thread: other threads of pytest's process do not block it, as a rank's all do
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # would end the process
        watcher = PreemptionWatcher()
        try:
            assert watcher.stop_requested() and watcher.reason == "SIGTERM"
            assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        finally:
            watcher.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
