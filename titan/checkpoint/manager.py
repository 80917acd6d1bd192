"""Distributed checkpoints (DCP) of a run: saved in the background, committed atomically, found again
by scanning, loaded onto any parallel layout.

A save writes `step-N.partial/` (the layout is in `format.py`) and rank 0 commits it to `step-N/` once
every rank's data and the metadata are on disk. Rank 0 writes `train_state.json` and `model.json`;
each data stream's position is written by the rank that owns it, each rank's RNG state by that rank.

Modes: `sync` writes before training goes on; `thread` and `process` copy the state to CPU memory
(pinned on CUDA) and write it in a background thread or process, over a gloo group of their own. At
most one save is in flight. The main thread never waits on the background: at each control step
(`agree=True`, the trainer's every `training.control_every` steps) while a save is in flight, the
ranks agree (one small all-reduce of CPU tensors on a second gloo group) whether every rank has
finished; then rank 0 commits, and older checkpoints are purged in a background
thread. A failed save fails loudly on every rank at the same step.

Before loading, rank 0 refuses a folder that is another run's and marks the folder as this run's
(`owner.json`, see `format.py`), noting once it holds a committed checkpoint; it also deletes what a
crash mid-purge left.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from titan.checkpoint.compat import compare_with_checkpoint, model_args_diff
from titan.checkpoint.format import (
    begin,
    checkpoint_folder,
    claim,
    commit,
    complete_steps,
    hf_dir,
    owner_problem,
    partial_dir,
    read_loader_states,
    read_rng_state,
    read_train_state,
    remove,
    scan,
    set_aside,
    step_dir,
    write_loader_state,
    write_model_args,
    write_rng_state,
    write_train_state,
)
from titan.checkpoint.hf import copy_whole_tensors, dcp_to_hf, read_hf
from titan.checkpoint.options import EXPORT_DTYPES, PARTS, config_problems
from titan.config.schema import CheckpointConfig

log = logging.getLogger("titan")

# Flattened optimizer state ("state.<param name>.exp_avg"): keyed by parameter name only, so it loads
# into any layout, also one where each pipeline stage holds only some of the parameters.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# The main thread's agreement group waits for rank 0's Hugging Face export at the end of a run.
_CONTROL_TIMEOUT = datetime.timedelta(hours=2)
# DCP reports a failure on any rank as a CheckpointException, which derives from BaseException.
_ERRORS = (Exception, CheckpointException)


def _now() -> float:
    """Rank 0's clock for `checkpoint.interval_s` (a function, so tests can replace it)."""
    return time.monotonic()


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path, what differs and the fix."""


class CheckpointSaveError(RuntimeError):
    """A save that failed (on any rank); the previous checkpoint is left complete."""


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


@dataclass
class _PendingSave:
    step: int
    partial: Path
    future: concurrent.futures.Future
    started_s: float


class Checkpointer:
    """Saves and restores model, optimizer, LR schedule, data loader, train state and RNG.

    The trainer calls `load()` once before training, `maybe_save()` after every step, `save()` when it
    must stop early (preemption), and `close()` at the end. `model_parts` are this rank's modules (one,
    or one per pipeline stage); `optimizer` is one optimizer, or one per part.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: Path,
        *,
        model_parts: list,
        optimizer,
        scheduler,
        loader,
        saves_loader_state: bool = True,
        tokenizer: str | None = None,
    ) -> None:
        """saves_loader_state: False on the ranks that read the same data streams as another rank
        (TP, CP and PP peers of one data-parallel rank); they restore the loader but leave saving it.
        tokenizer: the run's, written into the Hugging Face export (`export_hf`)."""
        self.tokenizer = tokenizer
        problems = config_problems(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.folder = checkpoint_folder(run_dir, cfg.folder)
        self.model_parts = list(model_parts)
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if len(self.optimizers) != len(self.model_parts):
            raise ValueError(f"{len(self.model_parts)} model parts but {len(self.optimizers)} optimizers")
        self.model = self.model_parts[0]
        self.scheduler, self.loader = scheduler, loader
        self.saves_loader_state = saves_loader_state
        self.rank = dist.get_rank()
        # The main thread's collectives (agreement on finished or failed saves) and the background
        # save's collectives each get a gloo group: two threads must never share one group, and
        # neither may share the training's (NCCL) group.
        self._control = dist.new_group(
            backend="gloo", timeout=_CONTROL_TIMEOUT, group_desc="checkpoint_control"
        )
        # The tensor of the step-boundary agreement: on the CPU, so reading it never waits for a device.
        self.control_flags = torch.zeros(2, dtype=torch.int64)
        self._background = (
            dist.new_group(backend="gloo", group_desc="checkpoint_background") if cfg.mode != "sync" else None
        )
        self._stager = None
        if cfg.mode != "sync":
            # Pinned CPU memory speeds up the copy from the GPU; shared memory hands the copy to the
            # background process without pickling it. Staging is synchronous: the optimizer must
            # not change a tensor while it is copied.
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=torch.cuda.is_available(),
                    use_shared_memory=cfg.mode == "process",
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
        self._pending: _PendingSave | None = None
        self._purger: threading.Thread | None = None
        self._marked_saved = False  # rank 0: the folder's owner mark says a checkpoint was committed
        self._last_save_s = _now()
        self.last_stall_s = 0.0  # how long the latest save held the training loop (benchmarks)

    # ----------------------------------------------------------------------------------- saving

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The main thread's gloo group of all ranks, for other agreements of the training loop."""
        return self._control

    def maybe_save(self, step: int, train_state: dict, *, last: bool, agree: bool = True) -> None:
        """agree: a control step, where every rank joins the agreement on the save in flight and on
        `interval_s`; in between nothing is exchanged and only `checkpoint.interval` steps save."""
        due_by_time = self._step_boundary() if agree else False
        if last:
            if self.cfg.enable:
                self.save(step, train_state, final=True)
            if self.cfg.export_hf:
                self._export_hf(step)
        elif self.cfg.enable and (step % self.cfg.interval == 0 or due_by_time):
            self.save(step, train_state)

    def save(self, step: int, train_state: dict, *, final: bool = False) -> Path | None:
        """Start a save of this step (waiting first for the one in flight); returns its final path,
        or None with checkpoint.enable=false. With mode=sync, or when `final`, it is committed on return.
        """
        if not self.cfg.enable:
            return None
        start = time.perf_counter()
        self.wait()
        self._last_save_s = _now()
        model_only = final and self.cfg.model_only
        path = step_dir(self.folder, step)
        partial = partial_dir(path)
        error, state = None, None
        if self.rank == 0:
            try:
                begin(path)
            except _ERRORS as e:
                error = e
        # Also the barrier after which every rank finds the directory.
        if self._failures(error, step, partial):
            return None
        try:
            self._write_side_files(partial, step, train_state, model_only)
            state = self._save_state(model_only)
        except _ERRORS as e:
            error = e
        if self._failures(error, step, partial):
            return None

        writing_from = time.perf_counter()
        self._pending = _PendingSave(step, partial, self._start_write(state, partial), writing_from)
        if self.cfg.mode == "sync" or final:
            self.wait()
        self.last_stall_s = time.perf_counter() - start
        return path

    def _start_write(self, state: dict, partial: Path) -> concurrent.futures.Future:
        """Write the tensors: now (sync), or from a CPU copy in a background thread or process."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            if self.cfg.mode == "sync":
                dcp.save(state, checkpoint_id=partial)
                future.set_result(None)
                return future
            return dcp.async_save(
                state,
                checkpoint_id=partial,
                process_group=self._background,
                async_checkpointer_type=AsyncCheckpointerType(self.cfg.mode),
                async_stager=self._stager,
            )
        except _ERRORS as e:  # also a failed copy to CPU memory: nothing is in flight then
            future.set_exception(e)
            return future

    def _write_side_files(self, partial: Path, step: int, train_state: dict, model_only: bool) -> None:
        for name, state in (self.loader.state_dict() if self.saves_loader_state else {}).items():
            write_loader_state(partial, name, state)
        write_rng_state(partial, self.rank, _rng_state())
        if self.rank == 0:
            state = {**train_state, "scheduler": self.scheduler.state_dict(), "model_only": model_only}
            if model_only:
                state["dtype"] = self.cfg.export_dtype
            write_train_state(partial, state)
            args = getattr(self.model, "args", None)
            if args is not None:
                write_model_args(partial, args)

    def _save_state(self, model_only: bool) -> dict:
        model = self._model_state()
        if model_only:
            dtype = EXPORT_DTYPES[self.cfg.export_dtype]
            return {"model": {k: v.detach().to(dtype) for k, v in model.items()}}
        return {"model": model, "optimizer": self._optimizer_state()}

    def _step_boundary(self) -> bool:
        """Collect a finished background save; return whether `interval_s` says save now.

        At control steps only; one all-reduce of CPU tensors on the control group, only while a save
        is in flight or `interval_s` is on: [some rank still writing, rank 0's clock says a save is
        due]. Every rank then takes the same decisions at the same step.
        """
        if self._pending is None and (self.cfg.interval_s <= 0 or not self.cfg.enable):
            return False
        writing = self._pending is not None and not self._pending.future.done()
        due = self.rank == 0 and self.cfg.interval_s > 0 and _now() - self._last_save_s >= self.cfg.interval_s
        self.control_flags.copy_(torch.tensor([writing, due], dtype=torch.int64))
        dist.all_reduce(self.control_flags, op=dist.ReduceOp.MAX, group=self._control)
        someone_writing, due = self.control_flags.tolist()
        if self._pending is not None and not someone_writing:
            self._finish()
        return bool(due)

    def wait(self) -> None:
        """Block until the save in flight is committed (or raise if it failed)."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending.future])
            self._finish()

    def _finish(self) -> None:
        """Every rank's save has finished: commit it, or handle its failure (all ranks together)."""
        pending, self._pending = self._pending, None
        if self._failures(pending.future.exception(), pending.step, pending.partial):
            return
        error = None
        if self.rank == 0:
            try:
                if not self._marked_saved:  # before the commit: a committed checkpoint is always known
                    self._marked_saved = claim(self.folder, self.run_dir, saved=True)
                # A re-save of a step (after loading an older one) sets the old one aside for the purge.
                commit(pending.partial, step_dir(self.folder, pending.step))
            except _ERRORS as e:
                error = e
        if self._failures(error, pending.step, pending.partial):
            return
        if self.rank == 0:
            self._start_purge(keep=pending.step)
        log.info(
            "saved checkpoint %s (%s, written in %.2f s)",
            step_dir(self.folder, pending.step),
            self.cfg.mode,
            time.perf_counter() - pending.started_s,
        )

    def _failures(self, error: BaseException | None, step: int, partial: Path) -> bool:
        """Agree whether any rank failed; if so remove the partial save and raise or warn."""
        flag = torch.tensor([error is not None], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control)
        if not flag.item():
            return False
        messages: list[str | None] = [None] * dist.get_world_size()
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine, group=self._control)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees the space a full disk needs back
        steps = scan(self.folder).steps
        kept = (
            f"the newest complete checkpoint is {step_dir(self.folder, steps[-1])}"
            if steps
            else "no checkpoint is complete"
        )
        causes = "\n".join(f"  rank {r}: {m}" for r, m in enumerate(messages) if m)
        message = f"saving checkpoint step {step} to {partial} failed ({kept}):\n{causes}"
        if self.cfg.on_error == "warn":
            log.warning("%s\ntraining goes on (checkpoint.on_error=warn)", message)
            return True
        raise CheckpointSaveError(
            f"{message}\nFree space or fix the folder (checkpoint.folder), then resume; or set "
            "checkpoint.on_error=warn to train on without this checkpoint."
        ) from error

    def _start_purge(self, keep: int | None) -> None:
        """Delete checkpoints beyond the newest `keep_latest_k` in the background (rank 0).

        Each is first renamed to `*.purging` (instant), so a crash mid-delete never leaves a damaged
        `step-N`; leftovers of such a crash are deleted at the next start (`keep` None: nothing else
        is purged then) or purge. `keep`, the step just committed, stays even when newer checkpoints
        exist (a run resumed from an older load_step).
        """
        if self._purger is not None:
            self._purger.join()
        found = scan(self.folder)
        doomed = []
        if keep is not None and self.cfg.keep_latest_k > 0 and found.steps:
            newest = found.steps[-1]
            doomed = [step_dir(self.folder, s) for s in found.steps[: -self.cfg.keep_latest_k] if s != keep]
            # Interrupted saves and dangling `step-N` links older than the newest complete checkpoint
            # can never be completed or loaded; the save in flight (if any) is newer.
            doomed += [p for left in (found.partial, found.broken) for s, p in left.items() if s < newest]
        try:
            for path in doomed:
                set_aside(path)
        except OSError as e:  # housekeeping: worth a warning, not the run
            log.warning("could not purge old checkpoints in %s: %s", self.folder, e)
        purging = scan(self.folder).purging
        if doomed:
            log.info("purging %s", ", ".join(p.name for p in doomed))
        if purging:
            self._purger = threading.Thread(target=lambda: [remove(p) for p in purging], daemon=True)
            self._purger.start()

    def close(self) -> None:
        """Wait for the save in flight and the purge, then release the staging memory."""
        try:
            self.wait()
        finally:
            if self._purger is not None:
                self._purger.join()
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    # ---------------------------------------------------------------------------------- exports

    def _export_hf(self, step: int) -> None:
        """Rank 0 writes `<folder>/hf-step-N/` from the committed final checkpoint (any layout, one
        block at a time); the others wait for it so that its failure is everyone's."""
        error = None
        if self.rank == 0:
            try:
                out = hf_dir(self.folder, step)
                dcp_to_hf(
                    step_dir(self.folder, step), out, dtype=self.cfg.export_dtype, tokenizer=self.tokenizer
                )
                log.info("exported Hugging Face model %s", out)
            except _ERRORS as e:
                error = e
        self._failures(error, step, partial_dir(hf_dir(self.folder, step)))

    # ---------------------------------------------------------------------------------- loading

    def _model_state(self) -> dict:
        return {k: v for part in self.model_parts for k, v in get_model_state_dict(part).items()}

    def _optimizer_state(self) -> dict:
        return {
            k: v
            for part, optim in zip(self.model_parts, self.optimizers)
            for k, v in get_optimizer_state_dict(part, optim, options=_OPTIM_OPTIONS).items()
        }

    def _select(self) -> int | None:
        steps = complete_steps(self.folder)
        want = self.cfg.load_step
        if want is None:
            return steps[-1] if steps else None
        if want not in steps:
            partial = partial_dir(step_dir(self.folder, want))
            why = f" ({partial.name} is a save that did not finish)" if partial.exists() else ""
            raise CheckpointLoadError(
                f"checkpoint.load_step={want}: {self.folder} holds no complete checkpoint of step {want}"
                f"{why}; available steps: {steps or 'none'}. Pick one of them, or unset checkpoint.load_step."
            )
        newer = [s for s in steps if s > want]
        if newer:
            log.warning(
                "loading step %d while %s holds newer checkpoints %s; a resume without "
                "checkpoint.load_step would pick step %d",
                want,
                self.folder,
                newer,
                newer[-1],
            )
        return want

    def load(self) -> dict | None:
        """Restore the newest complete checkpoint (or `checkpoint.load_step`); returns its train
        state, or None to start fresh (from `checkpoint.initial_load_path` weights when set).

        Raises CheckpointLoadError on every rank if any rank failed: no rank trains on a half load.
        """
        self._raise_on_every_rank(self._claim() if self.rank == 0 else None)
        step = self._select()
        error, result = None, None
        try:
            if step is not None:
                result = self._load(step_dir(self.folder, step), step)
            elif self.cfg.initial_load_path:
                self.load_weights(Path(self.cfg.initial_load_path))
        except CheckpointLoadError as e:
            error = e
        except _ERRORS as e:  # DCP's and json's errors do not name the checkpoint
            what = f"{type(e).__name__}: {e}"
            error = (
                self._load_error(step, what)
                if step is not None
                else CheckpointLoadError(
                    f"cannot load checkpoint.initial_load_path={self.cfg.initial_load_path}:\n{what}"
                )
            )
        self._raise_on_every_rank(error)
        return result

    def _raise_on_every_rank(self, error: CheckpointLoadError | None) -> None:
        """Raise what any rank's load failed with (each distinct message once), on every rank."""
        everyone: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, None if error is None else str(error), group=self._control)
        failed = list(dict.fromkeys(m for m in everyone if m))
        if failed:
            raise CheckpointLoadError("\n".join(failed)) from error

    def _claim(self) -> CheckpointLoadError | None:
        """Rank 0, before loading: refuse a folder that is another run's (`format.owner_problem`); when
        this run saves, mark the folder as its own and delete what a crash mid-purge left there."""
        try:
            if not self.cfg.enable:
                problem = owner_problem(self.folder, self.run_dir)
                return CheckpointLoadError(problem) if problem else None
            self._marked_saved = claim(self.folder, self.run_dir, saved=bool(scan(self.folder).steps))
        except ValueError as e:
            return CheckpointLoadError(str(e))
        except OSError as e:
            return CheckpointLoadError(f"cannot mark checkpoint.folder {self.folder} as this run's: {e}")
        self._start_purge(keep=None)
        return None

    def _load_error(self, step: int, what: str) -> CheckpointLoadError:
        older = [s for s in scan(self.folder).steps if s < step]
        hint = (
            f"checkpoint.load_step=<N> (older complete steps: {older})"
            if older
            else "checkpoint.load_step=<N>"
        )
        return CheckpointLoadError(
            f"cannot load checkpoint {step_dir(self.folder, step)}:\n{what}\nIf it is damaged or from another model, pick another "
            f"one with {hint}, or start afresh with another run.name."
        )

    def _load(self, path: Path, step: int) -> dict | None:
        saved_state = read_train_state(path)
        parts = [p for p in PARTS if p not in self.cfg.exclude_from_loading]
        if saved_state.get("model_only"):
            if step == 0:  # a seed checkpoint: at step 0 nothing else has a state yet
                parts = [p for p in parts if p == "model"]
            elif any(p in parts for p in ("optimizer", "lr_scheduler", "dataloader")):
                raise self._load_error(
                    step,
                    "it holds the model weights only (saved with checkpoint.model_only=true), no optimizer, "
                    "schedule or data position. To train on from these weights, add "
                    "checkpoint.exclude_from_loading=[optimizer,lr_scheduler,dataloader].",
                )

        model_states = [get_model_state_dict(part) for part in self.model_parts]
        # Only when loaded: reading an optimizer's state dict creates its (zero) state.
        optim_states = [
            get_optimizer_state_dict(part, optim, options=_OPTIM_OPTIONS) if "optimizer" in parts else {}
            for part, optim in zip(self.model_parts, self.optimizers)
        ]
        state = {}
        if "model" in parts:
            state["model"] = {k: v for sd in model_states for k, v in sd.items()}
        if "optimizer" in parts:
            state["optimizer"] = {k: v for sd in optim_states for k, v in sd.items()}
        if state:
            differences = compare_with_checkpoint(path, state, group=self._control)
            if differences:
                shown = "\n".join(f"  {d}" for d in differences[:8])
                more = f"\n  ... and {len(differences) - 8} more" if len(differences) > 8 else ""
                args = "\n".join(f"  {d}" for d in model_args_diff(path, self.model))
                raise self._load_error(
                    step,
                    f"it does not fit this run's model/optimizer:\n{shown}{more}"
                    + (f"\nthe model it was saved with differs in:\n{args}" if args else ""),
                )
            dcp.load(state, checkpoint_id=path)
            # DCP fills tensors in place but replaces plain values (the optimizer's lr, betas, ...)
            # in the dict it was given: take every part's entries from that dict.
            for part, optim, model_sd, optim_sd in zip(
                self.model_parts, self.optimizers, model_states, optim_states
            ):
                if "model" in parts:
                    set_model_state_dict(part, {k: state["model"][k] for k in model_sd})
                if "optimizer" in parts:
                    loaded = {k: state["optimizer"][k] for k in optim_sd}
                    set_optimizer_state_dict(part, optim, loaded, options=_OPTIM_OPTIONS)

        if "dataloader" in parts:
            self.loader.load_state_dict(read_loader_states(path))
        if "lr_scheduler" in parts and "scheduler" in saved_state:
            self.scheduler.load_state_dict(saved_state["scheduler"])
        log.info("resumed from checkpoint %s (%s)", path, ", ".join(parts))
        if "train_state" not in parts:
            return None
        rng = read_rng_state(path, self.rank)
        if rng is not None:  # absent when resuming on more ranks than saved, and in seeds
            _set_rng_state(rng)
        return {k: v for k, v in saved_state.items() if k not in ("scheduler", "model_only", "dtype")}

    def load_weights(self, path: Path) -> None:
        """Model weights only, from a titan DCP step directory or a Hugging Face folder (safetensors +
        config.json), into this run's model whatever its layout."""
        if (path / ".metadata").is_file():
            state = {"model": self._model_state()}
            differences = compare_with_checkpoint(path, state, group=self._control)
            if differences:
                raise CheckpointLoadError(
                    f"checkpoint.initial_load_path={path} does not fit this model:\n"
                    + "\n".join(f"  {d}" for d in differences[:8])
                )
            dcp.load(state, checkpoint_id=path)
            for part in self.model_parts:
                own = get_model_state_dict(part).keys()
                set_model_state_dict(part, {k: state["model"][k] for k in own})
        elif (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            self._load_hf(path)
        else:
            raise CheckpointLoadError(
                f"checkpoint.initial_load_path={path} is neither a titan checkpoint step directory (with a "
                ".metadata file) nor a Hugging Face folder (config.json and *.safetensors)"
            )
        log.info("initial weights from %s", path)

    def _load_hf(self, path: Path) -> None:
        args = getattr(self.model, "args", None)
        weights, hf_args = read_hf(path)
        if args is not None:
            differ = [
                f"model.{f.name}: {getattr(hf_args, f.name)!r} there, {getattr(args, f.name)!r} here"
                for f in dataclasses.fields(args)
                if f.name != "max_seq_len" and getattr(hf_args, f.name) != getattr(args, f.name)
            ]
            if differ:
                raise CheckpointLoadError(
                    f"checkpoint.initial_load_path={path} holds another model:\n"
                    + "\n".join(f"  {d}" for d in differ)
                )
        for part in self.model_parts:
            state = get_model_state_dict(part)
            missing = [k for k in state if k not in weights]
            if missing:
                raise CheckpointLoadError(f"checkpoint.initial_load_path={path} lacks {missing[:4]}")
            copy_whole_tensors(state, weights)
            set_model_state_dict(part, state)
