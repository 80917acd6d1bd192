import os
import signal

import torch.distributed as dist

from titan.train.preempt import PreemptionWatcher


def test_a_signal_becomes_a_stop_request_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        watcher = PreemptionWatcher()
        assert not watcher.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watcher.stop_requested() and watcher.reason == "SIGUSR2"
        watcher.close()
        assert signal.getsignal(signal.SIGUSR2) is before
    finally:
        dist.destroy_process_group()
