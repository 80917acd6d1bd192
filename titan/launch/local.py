"""Run on this machine: one rank in this process, or a node's ranks under torch's elastic launcher (the
API behind torchrun); and end as launch.py should.

A stop (TERM, or a terminal's Ctrl-C) goes to the ranks, which agree on a step, save and return (see
titan.train.preempt); a Ctrl-C after it ends them at once. Until a rank's watcher is in place the
signals are held for it: the ranks start with them blocked (a child inherits its parent's signal mask),
while this process takes them from a thread that waits for them and hands them to the main thread.

How the run ended is one line, with the exit status of launch.py (RunEnded): a stop, recorded as
`stopped`; or the first rank's error, which that rank recorded as `crashed` (its traceback goes to
its log file, logs/rank<N>.log) before its leaving made the other ranks fail too.
"""

import _thread
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import threading
import traceback
import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.multiprocessing import _prctl_pr_set_pdeathsig

from titan.checkpoint.format import checkpoint_folder, complete_steps, step_dir
from titan.config.schema import RunConfig
from titan.launch import jobstate
from titan.train import trainer

log = logging.getLogger("titan")

STOPS = {signal.SIGINT, signal.SIGTERM}
# The elastic launcher's own account of a failure (a traceback per rank, a banner): the rank's one line
# and its log file say it.
ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


def run_local(cfg: RunConfig, world: int) -> dict:
    """Train on `world` ranks of this machine; rank 0's result when the run reached its last step, else
    RunEnded with the line to print."""
    run_dir = Path(cfg.run.dir)
    since = len(jobstate.read(run_dir))  # events before this launch
    stop = _Stop(has_ranks=world > 1)
    try:
        with _stop_signals(stop, hold_for_ranks=world > 1), _quiet(ELASTIC_LOGGERS):
            result = _one_rank_here(cfg, since) if world == 1 else launch_local(cfg, world, stops=False)
    except KeyboardInterrupt:
        raise _stopped_at_once(cfg, stop.signal or signal.SIGINT) from None
    except ChildFailedError as e:
        if stop.at_once:
            raise _stopped_at_once(cfg, stop.signal) from None
        raise _rank_failed(run_dir, since, e) from None
    if result.get("preempted"):
        jobstate.record_result(run_dir, result)
        saved = f"saved {result['checkpoint']}" if result.get("checkpoint") else "nothing saved"
        raise jobstate.RunEnded(
            f"stopped at step {result['step']} on {result['preempted']}: {saved}; the same command resumes",
            128 + signal.Signals[result["preempted"]],
        )
    return result


def single_node_config(nproc: int, **options) -> LaunchConfig:
    """torchrun --standalone's launch of `nproc` ranks on this machine, spawned, never restarted."""
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone` picks
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        **options,
    )


def launch_local(cfg: RunConfig, nproc: int, *, stops: bool = True) -> dict:
    """Run `trainer.run(cfg)` on `nproc` local ranks; returns rank 0's result. `stops=False`: INT and
    TERM are the caller's (run_local), not the agent's teardown (TERM to every rank, SIGKILL 30 s on)."""
    config = single_node_config(
        nproc,
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(cfg.run.dir) / "logs" / "elastic")),
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT" if stops else "SIGHUP,SIGQUIT",
    )
    results = elastic_launch(config, _rank)(cfg)
    return results[0]


def _one_rank_here(cfg: RunConfig, since: int) -> dict:
    try:
        return _rank(cfg)
    except Exception:  # the rank recorded it
        raise _rank_failed(Path(cfg.run.dir), since) from None


def _rank(cfg: RunConfig) -> dict:
    """One rank: trainer.run, with its error written down before the process group closes."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank of launch_local: it ends with its launcher
        _prctl_pr_set_pdeathsig(signal.SIGKILL)  # (torch's INT would be taken for a stop)
    return trainer.run(cfg, on_error=functools.partial(_write_down, Path(cfg.run.dir)))


def _write_down(run_dir: Path, error: Exception) -> None:
    """The rank's traceback to its log file, its one line to events.jsonl as `crashed`."""
    rank = int(os.environ.get("RANK", 0))
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"rank{rank}.log", "a") as f:
        f.write("".join(traceback.format_exception(error)))
    jobstate.record(run_dir, "crashed", rank=rank, reason=f"{type(error).__name__}: {error}")


def _rank_failed(run_dir: Path, since: int, failure: ChildFailedError | None = None) -> jobstate.RunEnded:
    """The first error a rank recorded after event `since`; or, with none recorded (a rank killed by a
    signal, say), how the elastic launcher saw the first rank end (`failure`)."""
    crash = next((e for e in jobstate.read(run_dir)[since:] if e["event"] == "crashed"), None)
    if crash is not None:
        rank, reason = crash["rank"], crash["reason"]
    else:
        rank, process = failure.get_first_failure()
        name = process.signal_name()
        reason = f"killed by {name}" if process.exitcode < 0 else f"exited with status {process.exitcode}"
        jobstate.record(run_dir, "crashed", rank=rank, reason=reason)
    return jobstate.RunEnded(
        f"error: rank {rank} failed: {reason} (its log: {run_dir / 'logs' / f'rank{rank}.log'})", 1
    )


def _stopped_at_once(cfg: RunConfig, signum: int) -> jobstate.RunEnded:
    run_dir = Path(cfg.run.dir)
    name = signal.Signals(signum).name
    jobstate.record(run_dir, "stopped", step=None, signal=name, at_once=True)
    folder = checkpoint_folder(run_dir, cfg.checkpoint.folder)
    steps = complete_steps(folder) if folder.is_dir() else []
    resumes = f"the same command resumes from {step_dir(folder, steps[-1])}" if steps else "no checkpoint yet"
    return jobstate.RunEnded(f"stopped at once on {name}, without saving; {resumes}", 128 + signum)


class _Stop:
    """This process's signal handler for INT and TERM (in the main thread).

    The first is passed to the ranks: they stop after one step and save. A Ctrl-C after it kills them
    (no save) and ends the launch. Without ranks to pass it to (they have not started; or the one rank
    runs here and is not yet, or no longer, watching) a stop is at once: nothing new was trained.
    """

    def __init__(self, has_ranks: bool) -> None:
        self.has_ranks = has_ranks
        self.signal: int | None = None
        self.at_once = False

    def __call__(self, signum: int, frame) -> None:
        ranks = multiprocessing.active_children() if self.has_ranks else []
        first = self.signal is None
        self.signal = self.signal or signum
        if ranks and (first or signum != signal.SIGINT):
            if first:
                log.warning(
                    "%s: the ranks stop after this step and save (Ctrl-C again: stop at once, no save)",
                    signal.Signals(signum).name,
                )
            for process in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)
            return
        self.signal, self.at_once = signum, True
        for process in ranks:
            process.kill()
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_signals(handler: _Stop, *, hold_for_ranks: bool) -> Iterator[None]:
    """`handler` for INT and TERM in this process; with `hold_for_ranks`, blocked in the main thread (and
    so in the ranks it starts) and handed to it by a thread that waits for them."""
    previous = {sig: signal.signal(sig, handler) for sig in STOPS}
    relay, done = None, threading.Event()
    if hold_for_ranks:
        # The ranks' resource tracker first: starting it unblocks INT and TERM in this thread.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        relay = threading.Thread(target=_relay, args=(done,), name="titan-stop-relay", daemon=True)
        relay.start()
    try:
        yield
    finally:
        if relay is not None:
            done.set()
            signal.pthread_kill(relay.ident, signal.SIGTERM)  # ends its wait
            relay.join()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, before in previous.items():
            signal.signal(sig, before)


def _relay(done: threading.Event) -> None:
    """Wait for INT and TERM (blocked in every thread) and run the main thread's handler for each."""
    while True:
        signum = signal.sigwait(STOPS)
        if done.is_set():
            return
        _thread.interrupt_main(signum)


@contextlib.contextmanager
def _quiet(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Only critical records from these loggers (each sets its own level, so each is set here)."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith(prefixes)]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
