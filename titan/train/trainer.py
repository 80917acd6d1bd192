"""The training loop, run by every rank with the resolved RunConfig."""

import contextlib
import gc
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from titan.checkpoint.format import complete_steps, step_dir
from titan.checkpoint.manager import Checkpointer
from titan.config.schema import RunConfig
from titan.data.loader import TrainLoader
from titan.distributed.cp import shard_sequence
from titan.distributed.flight_recorder import (
    dump,
    is_collective_failure,
    is_timeout,
    mesh_groups,
    recorder_env,
    set_aside_old_dumps,
    set_timeouts,
)
from titan.distributed.float8 import fsdp_float8_all_gather, precompute_float8_scales
from titan.distributed.fsdp import DTYPES
from titan.distributed.grad_norm import grad_norm
from titan.distributed.mesh import ParallelDims, device_for
from titan.models.llama.args import flops_per_token, num_params
from titan.models.llama.attention import document_ids
from titan.models.llama.model import document_positions
from titan.train.build_model import build_loss, build_model
from titan.train.logs import setup_rank_logging
from titan.train.metrics import MetricsLogger, StepTimer
from titan.train.optim import LRSchedulers, Optimizers
from titan.train.preempt import PreemptionWatcher, check_control_cadence
from titan.train.profiling import StepProfiler
from titan.train.validation import HeldOutBatches, validation_batch_size

log = logging.getLogger("titan")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (the loss under loss parallelism) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within training.collective_timeout_s; the message names the dumps."""


class NonFiniteStepsError(RuntimeError):
    """More steps than training.max_nonfinite_steps had non-finite gradients; the message is one line."""


class GuardedCheckpointer(Checkpointer):
    """A Checkpointer that calls `before_save` first on every save; it raises to stop the run instead."""

    def __init__(self, *args, before_save: Callable[[], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before_save = before_save

    def save(self, step: int, train_state: dict, *, final: bool = False) -> Path | None:
        self.before_save()
        return super().save(step, train_state, final=final)


def init_distributed(device: torch.device, *, cpu_collectives: bool = False) -> None:
    """Join the process group described by the environment (torchrun, the elastic launcher, Slurm).

    cpu_collectives: also reduce CPU tensors (FSDP's CPU offload: the gradient norm of host shards)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and cpu_collectives:
        backend = "cuda:nccl,cpu:gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:  # a plain `python` process: a group of one, so the same code path serves every run
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def run_id(run_dir: Path) -> str:
    """A W&B-safe id that is the same for every attempt of one run directory (so resumes continue it)."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:40]
    return f"{slug}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]}"


@dataclass
class _Interval:
    """What the loop gathers between two log steps: per-step losses stay on the device until read."""

    start: float  # perf_counter at the previous log
    data_seconds: float = 0.0
    tokens: int = 0  # per device
    losses: list[torch.Tensor] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.device = device_for(cfg.training.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Read when the process groups are made: the Flight Recorder's buffer, NCCL's dump on a timeout.
        self.flight_recorder_dir = self.run_dir / "flight_recorder"
        os.environ.update(recorder_env(self.flight_recorder_dir, cfg.training.flight_recorder_entries))
        init_distributed(self.device, cpu_collectives=cfg.parallelism.cpu_offload)
        self.rank = dist.get_rank()
        set_aside_old_dumps(self.flight_recorder_dir, self.rank)
        setup_rank_logging(self.run_dir, self.rank)
        set_determinism(cfg.training.seed, cfg.training.deterministic)

        self.dims = ParallelDims.resolve(cfg.parallelism, dist.get_world_size())
        self.meshes = self.dims.build_meshes(self.device.type)
        set_timeouts(mesh_groups(self.meshes), cfg.training.first_step_timeout_s)
        self.dp_rank, self.dp_degree = self.meshes["dp"].get_local_rank(), self.dims.dp

        self.cp_rank = self.meshes["cp"].get_local_rank()
        self.loss_fn = build_loss(cfg)
        self.model_parts, self.pipeline = build_model(cfg, self.dims, self.meshes, self.device, self.loss_fn)
        local = sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel()
            for part in self.model_parts
            for p in part.parameters()
        )
        log.info("model: %s parameters, %s of them on this rank", f"{num_params(cfg.model):,}", f"{local:,}")
        # FSDP's float8 all-gather casts with scales computed for all parameters at once, after each step.
        self.precompute_float8 = fsdp_float8_all_gather(
            cfg.training.float8,
            fsdp=self.dims.fsdp_enabled,
            cpu_offload=cfg.parallelism.cpu_offload,
            device_type=self.device.type,
        )
        use_loss_parallel = self.dims.tp > 1 and cfg.parallelism.loss_parallel
        self.loss_parallel = loss_parallel if use_loss_parallel else contextlib.nullcontext
        # Without FSDP the compute dtype comes from autocast; with FSDP from its MixedPrecisionPolicy.
        self.autocast = (
            torch.autocast(self.device.type, dtype=DTYPES[cfg.training.param_dtype])
            if not self.dims.fsdp_enabled and cfg.training.param_dtype != "float32"
            else contextlib.nullcontext()
        )

        # Offloaded parameters and their optimizer state live on the host: its optimizer, not CUDA's fused one.
        self.optimizers = Optimizers(
            self.model_parts,
            cfg.optimizer,
            torch.device("cpu") if cfg.parallelism.cpu_offload else self.device,
        )
        # Steps skipped for non-finite gradients since the launch: counted on the device, read on the
        # host only at log and save steps.
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.skipped_seen = 0
        self.scheduler = LRSchedulers(self.optimizers, cfg.optimizer, cfg.training.steps)
        self.loader = TrainLoader(
            cfg.data,
            seq_len=cfg.training.seq_len,
            global_batch_size=cfg.training.global_batch_size,
            dp_rank=self.dp_rank,
            dp_degree=self.dp_degree,
        )
        self.validation = (
            HeldOutBatches(cfg, dp_rank=self.dp_rank, dp_degree=self.dp_degree)
            if cfg.validation.enable
            else None
        )
        self.checkpointer = GuardedCheckpointer(
            cfg.checkpoint,
            self.run_dir,
            model_parts=self.model_parts,
            optimizer=self.optimizers.optimizers,
            scheduler=self.scheduler,
            loader=self.loader,
            saves_loader_state=self._saves_loader_state(),
            tokenizer=cfg.data.tokenizer,
            before_save=lambda: self._stop_past_limit(self._read_skipped()),
        )
        # Before the (possibly long) load: a stop then still saves. A plain `python` process is the whole
        # run and answers a second Ctrl-C itself; a launcher's rank leaves it to the launcher.
        self.preemption = PreemptionWatcher(
            second_interrupt_stops_at_once="RANK" not in os.environ, group=self.checkpointer.control_group
        )
        state = self.checkpointer.load() or {}
        self.step, self.tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)

        self.metrics = MetricsLogger(
            cfg.metrics,
            self.run_dir,
            enabled=self.rank == 0,
            total_steps=cfg.training.steps,
            start_step=self.step,
            flops_per_token=flops_per_token(cfg.model, cfg.training.seq_len),
            device=self.device,
            num_devices=dist.get_world_size(),
            run_id=run_id(self.run_dir),
            config=cfg.to_dict(),
        )
        self.timer = StepTimer(self.device)
        self._cadence_checked = False
        self.profiler = StepProfiler(cfg.profiling, self.run_dir, self.rank, self.device)
        # Document masking: each document starts with the tokenizer's BOS (titan/data/packing.py).
        self.bos_id = self.loader.tokenizer.bos_id if cfg.training.attention == "block_causal" else None

    def _saves_loader_state(self) -> bool:
        """TP, CP and PP ranks of one data-parallel rank read the same streams: one of them saves them."""
        world = self.meshes["world"]
        return all(world[name].get_local_rank() == 0 for name in ("tp", "cp", "pp"))

    @property
    def accumulation_steps(self) -> int:
        t = self.cfg.training
        return t.global_batch_size // (self.dp_degree * t.micro_batch_size)

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's share of the global batch. Returns (loss, grad_norm) as 0-dim
        device tensors: nothing here waits for the device, the loop reads them at log steps."""
        t = self.cfg.training
        global_tokens = t.global_batch_size * t.seq_len
        # Gradient reduction averages over the dp x cp ranks that each summed the loss of their own
        # tokens; scaling by their number turns the average into the sum, so every layout gets
        # d(sum of token losses)/dw / global_tokens.
        scale = self.meshes["loss"].size() / global_tokens
        if self.dims.cp > 1:  # each context-parallel rank takes its load-balanced share of every sequence
            inputs, labels = (shard_sequence(x, self.dims.cp, self.cp_rank) for x in (inputs, labels))
        inputs, labels = self._to_device(inputs), self._to_device(labels)
        if self.pipeline is not None:
            with self.autocast, self.loss_parallel():
                loss = self.pipeline.step(inputs, labels, grad_scale=scale, **self._side_inputs(inputs))
            # Only the last stage has the loss: the others add zero over the pipeline ranks.
            loss_sum = _local(loss) if loss is not None else torch.zeros((), device=self.device)
            dist.all_reduce(loss_sum, group=self.meshes["pp"].get_group())
        else:
            loss_sum = torch.zeros((), device=self.device)
            for micro_inputs, micro_labels in zip(
                inputs.split(t.micro_batch_size), labels.split(t.micro_batch_size), strict=True
            ):
                with self.autocast, self.loss_parallel():
                    logits = self.model_parts[0](micro_inputs, **self._side_inputs(micro_inputs))
                    micro_loss = self.loss_fn(logits, micro_labels)
                    (micro_loss * scale).backward()
                loss_sum += _local(micro_loss.detach())
        self.timer.lap("forward_backward")

        grad_norm = self._clip_grad_norm()
        skip = grad_norm.isfinite().logical_not()  # alike on every rank: the norm is global
        self.optimizers.step(skip)
        if self.precompute_float8:
            precompute_float8_scales(self.model_parts)
        self.skipped += skip
        self.optimizers.zero_grad()
        self.scheduler.step()  # a skipped step still counts: the schedule and the data go on

        dist.all_reduce(loss_sum, group=self.meshes["loss"].get_group())  # each summed its own tokens
        self.timer.lap("optimizer")
        # float64: the fp32 sum converts exactly, so this is the quotient the host used to compute
        return loss_sum.double() / global_tokens, grad_norm

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The loader's CPU batch on the device without a wait: a copy from pageable memory blocks the
        host until the device has run everything queued before it; one from pinned memory does not."""
        if self.device.type != "cuda":
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)

    def _clip_grad_norm(self) -> torch.Tensor:
        """The true global norm over FSDP, TP and PP shards; clips in place when training.max_norm > 0."""
        norm = grad_norm(self.model_parts, self.meshes["pp"])
        if self.cfg.training.max_norm > 0:
            params = [p for part in self.model_parts for p in part.parameters()]  # it reads their .grad
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.training.max_norm, norm, foreach=True)
        return norm

    def train(self) -> dict:
        """The loop. Between log steps the host never waits for the device: losses and grad norms stay
        device tensors until a log step reads the interval's at once, and the ranks agree on a stop or a
        timed save only at control steps (log steps and every `training.control_every` steps), with CPU
        tensors on a gloo group."""
        cfg = self.cfg
        # Per device: TP, CP and PP ranks share their data-parallel rank's tokens.
        tokens_per_step_per_rank = (
            cfg.training.global_batch_size * cfg.training.seq_len // self.dims.world_size
        )
        log.info(
            "training %s for %d steps from step %d: world %d, dp %d, accumulation %d, %s",
            cfg.run.group,
            cfg.training.steps,
            self.step,
            self.dims.world_size,
            self.dp_degree,
            self.accumulation_steps,
            self.device,
        )
        gc.disable()  # collected at a fixed cadence instead, on every rank at once (no straggler pauses)
        batches = iter(self.loader)
        result = {"step": self.step}
        first_step = self.step + 1  # its time holds the warm-up (compilation, allocation)
        interval = _Interval(time.perf_counter())
        try:
            while self.step < cfg.training.steps:
                self.step += 1
                if self.step % cfg.training.gc_freq == 0:
                    gc.collect(1)
                self.timer.start()
                data_start = time.perf_counter()
                inputs, labels = next(batches)
                interval.data_seconds += time.perf_counter() - data_start
                self.timer.lap("data")

                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm = self.train_step(inputs, labels)
                interval.losses.append(loss)
                self.tokens_seen += cfg.training.global_batch_size * cfg.training.seq_len
                interval.tokens += tokens_per_step_per_rank
                self.metrics.advance(self.step)

                train_state = {"step": self.step, "tokens_seen": self.tokens_seen}
                last = self.step == cfg.training.steps
                logs = self.metrics.should_log(self.step)
                control = logs or self.step % cfg.training.control_every == 0
                # Every rank agrees at the same control step; at the last one the run simply finishes.
                stop = control and not last and self.preemption.stop_requested()
                # Logged before the save, so a step's record outlives a crash in its save; a stop's
                # step is logged too, so every step's loss is written.
                if logs or stop:
                    warm = self.step - len(interval.losses) + 1 > first_step  # the interval lacks it
                    result = self._log(interval, grad_norm, lr, check_cadence=warm)
                    interval = _Interval(time.perf_counter())
                if (
                    not stop
                    and self.validation is not None
                    and (last or self.step % cfg.validation.every == 0)
                ):
                    seconds = self._validate()
                    interval.start += seconds  # not training time
                    self.timer.start()  # the step's checkpoint phase starts after the evaluation
                if stop:
                    log.warning(
                        "stopping at step %d on %s: saving a checkpoint", self.step, self.preemption.reason
                    )
                    saved = self.checkpointer.save(self.step, train_state)
                    result = {
                        **result,
                        "preempted": self.preemption.reason,
                        "checkpoint": str(saved) if saved else None,
                    }
                    break
                self.checkpointer.maybe_save(self.step, train_state, last=last, agree=control)
                self.timer.lap("checkpoint")
                self.profiler.step(self.step)
                if self.step == first_step:  # compiled and warmed up: from now on the usual timeout
                    set_timeouts(mesh_groups(self.meshes), cfg.training.collective_timeout_s)
        except Exception as e:
            self.profiler.on_error(e)
            # Every rank dumps: the one whose collective timed out, and the others, whose collectives
            # failed when it left (gloo: "Connection closed by peer"); the summary needs them all.
            if is_collective_failure(e) and cfg.training.flight_recorder_entries > 0:
                folder = self.flight_recorder_dir
                dump(folder, self.rank)
                if is_timeout(e):
                    raise CollectiveTimeout(
                        f"rank {self.rank}: a collective timed out at step {self.step}; every rank's last "
                        f"collectives are in {folder}: python -m titan.tools.flight_recorder {folder}"
                    ) from e
            raise
        finally:
            self.profiler.close()
            gc.enable()
            self.checkpointer.close()
            self.preemption.close()
            self.metrics.close()
            self.loader.close()
        return result

    @torch.no_grad()
    def _validate(self) -> float:
        """The mean loss per token over the held-out batches, logged as val_loss and val_perplexity; returns
        the seconds it took. Reads nothing the training reads: its own loader, no RNG, no gradients."""
        start = time.perf_counter()
        t = self.cfg.training
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = 0
        for inputs, labels in self.validation:
            batches += 1
            loss_sum += self._loss_sum(inputs, labels)
        # Each pp stage but the last added zero; each dp x cp rank summed its own tokens.
        for mesh in ("pp", "loss"):
            if self.meshes[mesh].size() > 1:
                dist.all_reduce(loss_sum, group=self.meshes[mesh].get_group())
        tokens = batches * validation_batch_size(self.cfg) * t.seq_len
        loss = loss_sum.item() / tokens
        seconds = time.perf_counter() - start
        self.metrics.log_validation(self.step, loss=loss, tokens=tokens, seconds=seconds)
        return seconds

    def _loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward only: the summed token loss of this rank's share of one batch (float64, on the device)."""
        if self.dims.cp > 1:
            inputs, labels = (shard_sequence(x, self.dims.cp, self.cp_rank) for x in (inputs, labels))
        inputs, labels = self._to_device(inputs), self._to_device(labels)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with self.autocast, self.loss_parallel():
            if self.pipeline is not None:
                loss = self.pipeline.evaluate(inputs, labels, **self._side_inputs(inputs))
                return total + _local(loss) if loss is not None else total
            micro = self.cfg.training.micro_batch_size
            for micro_inputs, micro_labels in zip(inputs.split(micro), labels.split(micro), strict=True):
                logits = self.model_parts[0](micro_inputs, **self._side_inputs(micro_inputs))
                total += _local(self.loss_fn(logits, micro_labels))
            return total

    def _side_inputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model takes besides the tokens: with document masking the document ids, and with
        training.rope_positions=document each token's position within its document."""
        if self.bos_id is None:
            return {}
        documents = document_ids(inputs, self.bos_id)
        if self.cfg.training.rope_positions == "document":
            return {"documents": documents, "positions": document_positions(documents)}
        return {"documents": documents}

    def _log(self, interval: _Interval, grad_norm: torch.Tensor, lr: float, *, check_cadence: bool) -> dict:
        """Read the interval's losses and this step's norm (the one wait for the device in the interval),
        write the metrics and the step-time split; stop past training.max_nonfinite_steps."""
        *losses, norm = torch.stack([*interval.losses, grad_norm.double()]).tolist()
        split = self.timer.read()
        steps = len(losses)
        seconds = time.perf_counter() - interval.start
        if check_cadence and not self._cadence_checked:  # the first interval after the warm-up step
            self._cadence_checked = True
            check_control_cadence(
                self.cfg.training.control_every, seconds / steps, self.cfg.cluster.signal_delay_s
            )
        skipped = self._read_skipped()
        record = self.metrics.log(
            self.step,
            loss=losses[-1],
            grad_norm=norm,
            lr=lr,
            skipped_steps=skipped,
            tokens=interval.tokens,
            seconds=seconds,
            data_seconds=interval.data_seconds,
            step_losses=losses,
            extra={
                **split,
                **self._rank_spread(seconds / steps, interval.data_seconds / steps),
                **self._source_shares(),
            },
        )
        self._stop_past_limit(skipped)
        return record

    def _rank_spread(self, step_seconds: float, data_seconds: float) -> dict[str, float]:
        """Stragglers: the slowest and fastest rank's mean step time over the interval, and the rank
        waiting longest for data (CPU tensors over gloo: no device wait). Ranks meet at every collective,
        so every rank's steps last as long as the slowest one's: a rank whose loader holds the others up
        is named by its own data wait."""
        world, rank = dist.get_world_size(), dist.get_rank()
        times = torch.zeros(2, world, dtype=torch.float64)
        times[:, rank] = torch.tensor([step_seconds, data_seconds], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(times, group=self.checkpointer.control_group)
        step, data = times.tolist()
        slowest = max(range(world), key=step.__getitem__)
        hungriest = max(range(world), key=data.__getitem__)
        return {
            "step_time_max_ms": 1000 * step[slowest],
            "step_time_min_ms": 1000 * min(step),
            "step_time_max_rank": slowest,
            "data_time_max_ms": 1000 * data[hungriest],
            "data_time_max_rank": hungriest,
        }

    def _source_shares(self) -> dict[str, float]:
        """A mixture's realized share of the tokens per source so far, over every rank's sequence slots
        (one rank per data-parallel rank counts them): `data_share_<name>` in the metrics."""
        windows = self.loader.source_windows()
        if not windows:
            return {}
        counts = torch.tensor(list(windows.values()) if self._saves_loader_state() else [0] * len(windows))
        dist.all_reduce(
            counts, group=self.checkpointer.control_group
        )  # CPU tensors over gloo: no device wait
        total = int(counts.sum())
        return {f"data_share_{name}": int(n) / total for name, n in zip(windows, counts.tolist())}

    def _read_skipped(self) -> int:
        """The device's count of skipped steps on the host: a sync, so only at log and save steps."""
        skipped = int(self.skipped.item())
        if skipped > self.skipped_seen:
            log.warning(
                "step %d: %d steps skipped so far for non-finite gradients (training.max_nonfinite_steps=%d)",
                self.step,
                skipped,
                self.cfg.training.max_nonfinite_steps,
            )
            self.skipped_seen = skipped
        return skipped

    def _stop_past_limit(self, skipped: int) -> None:
        """Past the limit the run stops, and saves nothing more: the newest checkpoint is finite, since
        skipped steps leave the weights as they were and every save checks the limit first."""
        limit = self.cfg.training.max_nonfinite_steps
        if skipped <= limit:
            return
        self.checkpointer.wait()  # a save in flight was started within the limit: let it commit
        steps = complete_steps(self.checkpointer.folder)
        newest = (
            f"the newest checkpoint, {step_dir(self.checkpointer.folder, steps[-1])}, is finite"
            if steps
            else "there is no checkpoint"
        )
        raise NonFiniteStepsError(
            f"stopped at step {self.step}: {skipped} steps had non-finite gradients and were skipped, more than "
            f"training.max_nonfinite_steps={limit}; {newest}. Lower optimizer.lr, raise "
            "optimizer.warmup_steps or lower training.max_norm, or allow more with training.max_nonfinite_steps."
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: RunConfig, on_error: Callable[[Exception], None] | None = None) -> dict:
    """Entry point of one rank. `on_error` hears of this rank's error before the process group closes:
    a rank's own error is then told before the errors that its leaving causes in the others."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.train()
    except Exception as e:
        if on_error is not None:
            on_error(e)
        raise
    finally:
        if trainer is not None:
            trainer.close()
