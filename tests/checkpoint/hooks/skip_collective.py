"""A rank that skips one training collective, for tests/train/test_hang.py, which imports this module at
start-up in every process of a real run (a `sitecustomize` of its own naming it).

With TITAN_TEST_SKIP_LOSS_ALL_REDUCE=<rank>:<step>, that rank never enqueues the loss all-reduce of that
step (`Trainer.train_step`'s sum over the `loss` mesh, a subgroup), and writes the wall time it went on
without it to <run dir>/skipped_at. Its peer in that group waits in the all-reduce; the rank itself goes
on to the next collectives, where the others wait for it. Nothing in titan changes for this:
`train_step` is wrapped, and `torch.distributed.all_reduce`, which it looks up at each call, passes
over that one call.
"""

import os
import time

import torch.distributed as dist

from titan.train.trainer import Trainer

_rank, _step = (int(part) for part in os.environ["TITAN_TEST_SKIP_LOSS_ALL_REDUCE"].split(":"))
_train_step = Trainer.train_step
_all_reduce = dist.all_reduce


def _skipping_train_step(self, inputs, labels):
    if (self.rank, self.step) != (_rank, _step):
        return _train_step(self, inputs, labels)
    loss_group = self.meshes["loss"].get_group()

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if group is not loss_group:
            return _all_reduce(tensor, op=op, group=group, async_op=async_op)
        (self.run_dir / "skipped_at").write_text(repr(time.time()))
        return None

    dist.all_reduce = all_reduce
    try:
        return _train_step(self, inputs, labels)
    finally:
        dist.all_reduce = _all_reduce


Trainer.train_step = _skipping_train_step
