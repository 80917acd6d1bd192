"""Run a function on several gloo ranks in forked processes: the harness of the multi-rank unit tests."""

import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world, *args, timeout_s: float = 120) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; an error on any rank fails the test.

    Forked where it can be: a spawned rank re-imports torch (7 s for 2 ranks, 19 s for 4 on 2 cores),
    a fork takes 0.1 s and inherits torch._dynamo, which the functional collectives import on first
    use. Safe while this process holds no process group (else spawned), and OMP_NUM_THREADS=1 leaves
    no OpenMP pool to inherit. The deadline turns a deadlock into a failure.
    """
    import torch._dynamo  # noqa: F401

    # A Trainer run in this process leaves its gloo groups to the garbage collector; a forked child
    # that collects them inherits their threads' locks and hangs. Collect them here, once, instead.
    gc.collect()
    start_method = "spawn" if dist.is_initialized() else "fork"
    ctx = mp.start_processes(
        _entry, args=(world, free_port(), fn, args), nprocs=world, join=False, start_method=start_method
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout_s} s")
