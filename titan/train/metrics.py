"""Training metrics: loss, throughput, TFLOP/s, MFU and memory, to metrics.jsonl, TensorBoard, W&B and the console.

Every rank builds a MetricsLogger; only the rank holding the global loss (`enabled=True`) writes.
Throughput is per device: the trainer passes the tokens one device processed since the last log.
MFU is model FLOP/s over the device's dense bf16 peak (PaLM, appendix B), whatever dtype trains.
StepTimer splits the step time into its phases (data, forward+backward, optimizer, checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import pathlib
import re
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import torch

from titan.config.schema import MetricsConfig
from titan.files import write_atomic

logger = logging.getLogger("titan")

GIB = 1024**3

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s: half the sparse figures NVIDIA's datasheets
# quote. Keys are regexes searched in torch.cuda.get_device_name(); the first match wins, so a variant
# ("H100 NVL", "H100 PCIe") comes before its family. \b keeps "RTX A1000" off A100 and "GH200" off H200.
PEAK_BF16_TFLOPS: dict[str, float] = {
    r"\bGB200\b": 2500.0,  # GB200 NVL72: 360 PFLOP/s sparse over 72 GPUs
    r"\bB200\b": 2250.0,  # HGX B200: 36 PFLOP/s sparse over 8 GPUs
    r"\bGH200\b": 989.0,  # its GPU is an H100 SXM-class Hopper
    r"\bH200 NVL\b": 835.0,
    r"\bH200\b": 989.0,  # H200 SXM
    r"\bH100 NVL\b": 835.0,
    r"\bH100 PCIe\b": 756.0,
    r"\bH100\b": 989.0,  # H100 SXM5, named "NVIDIA H100 80GB HBM3"
    r"\bA100\b": 312.0,  # SXM4 and PCIe alike
}

_warned_devices: set[str] = set()


def cuda_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device; None on CPU or a GPU not in PEAK_BF16_TFLOPS (no guessing)."""
    if device.type != "cuda":
        return None
    name = cuda_device_name(device)
    for pattern, tflops in PEAK_BF16_TFLOPS.items():
        if re.search(pattern, name, re.IGNORECASE):
            return tflops
    if name not in _warned_devices:
        _warned_devices.add(name)
        logger.warning(
            "no bf16 peak known for GPU %r, so MFU is not reported; add its datasheet figure to "
            "PEAK_BF16_TFLOPS in titan/metrics.py",
            name,
        )
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """CUDA: peak active and reserved GiB since the last call (the peaks are reset). Else: process RSS GiB."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {
            "memory_peak_active_gib": stats.get("active_bytes.all.peak", 0) / GIB,
            "memory_peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
        }
    return {"memory_rss_gib": _rss_bytes() / GIB}


def _rss_bytes() -> int:
    try:  # Linux: resident pages now (second field of statm)
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # elsewhere the best there is: the peak RSS, in bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def wandb_mode() -> str | None:
    """ "offline" when no W&B credentials are configured, so wandb.init never prompts for a login.

    None leaves the choice to wandb: WANDB_MODE when the user set it, else online.
    """
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:  # wandb login stores the key here (NETRC overrides the file, as for wandb itself)
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    return None if entry and entry[2] else "offline"


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # past ~709.8 nats
        return math.inf


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """One console line per logged step, plain text (no ANSI), e.g. for Slurm log files."""
    width = len(str(total_steps))
    parts = [
        f"step {record['step']:>{width}}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"lr {record['lr']:.1e}",
        f"tok/s {record['tokens_per_second']:,.0f}",
        f"tflops {record['tflops']:.1f}",
    ]
    if "mfu" in record:
        parts.append(f"mfu {record['mfu']:.1f}%")
    memory = [v for k, v in record.items() if k.startswith("memory_")]
    parts.append("mem " + "/".join(f"{v:.1f}" for v in memory) + "GiB")  # CUDA: active/reserved
    parts.append(f"data {100 * record['data_share']:.0f}%")
    if all(f"time_{phase}_ms" in record for phase in STEP_PHASES):  # data/fwd+bwd/optimizer/checkpoint
        parts.append("ms " + "/".join(f"{record[f'time_{phase}_ms']:.0f}" for phase in STEP_PHASES))
    if record["skipped_steps"]:
        parts.append(f"skipped {record['skipped_steps']}")
    return "  ".join(parts)


# The phases of a training step, in order; StepTimer writes `time_<phase>_ms` for each.
STEP_PHASES = ("data", "forward_backward", "optimizer", "checkpoint")


class StepTimer:
    """Per-step mean milliseconds of each phase of the steps since the last `read`.

    The trainer calls `start()` at the top of each step and `lap(phase)` at the end of each phase. On
    CUDA every mark is an Event recorded on the current stream: the time is the device's, and nothing
    waits for the device until `read`, at a log step. Elsewhere the marks are perf_counter readings.
    Each lap counts in the first `read` after it: a log step's checkpoint phase, which follows its
    log, counts in the next interval.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._previous = None  # the latest mark of the step being timed
        self._laps: list[tuple] = []  # (phase, start mark, end mark)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._previous = self._mark()

    def lap(self, phase: str) -> None:
        if self._previous is None:  # a step run outside the loop (no `start`) is not timed
            return
        mark = self._mark()
        self._laps.append((phase, self._previous, mark))
        self._previous = mark

    def read(self) -> dict[str, float]:
        """{"time_<phase>_ms": mean over the laps of that phase}; the laps start anew. A device sync on CUDA."""
        laps, self._laps = self._laps, []
        if not laps:
            return {}
        if self.cuda:
            laps[-1][2].synchronize()  # the latest mark: every earlier one has completed too
        totals, counts = dict.fromkeys(STEP_PHASES, 0.0), dict.fromkeys(STEP_PHASES, 0)
        for phase, start, end in laps:
            totals[phase] += start.elapsed_time(end) if self.cuda else 1000 * (end - start)
            counts[phase] += 1
        return {f"time_{p}_ms": totals[p] / counts[p] if counts[p] else 0.0 for p in STEP_PHASES}


def _keep_until(path: pathlib.Path, last_step: int) -> dict[str, Any] | None:
    """Drop records after last_step and torn lines from metrics.jsonl; return the last record kept.

    Steps after the checkpoint being resumed are logged again, so each step appears once. The file is
    replaced atomically, so a crash now cannot lose the steps kept.
    """
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i != len(lines) - 1:  # only a crash mid-write is expected, and it tears the last line
                logger.warning("%s line %d is not a metrics record; dropped", path, i + 1)
            continue
        if step <= last_step:
            kept.append(record)
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept[-1] if kept else None


class ProgressBar:
    """A rich bar with ETA on stderr; log lines and prints scroll above it.

    rich swaps sys.stderr for a proxy that prints above the bar, but a logging.StreamHandler made
    earlier holds the old stream and would draw over the bar; such handlers on the "titan" logger
    and its parents are pointed at the proxy until close.
    """

    def __init__(self, total_steps: int, start_step: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        stderr = sys.stderr
        self._progress = Progress(
            TextColumn("step"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            # progress=bar asks for a bar even where stderr does not look like a terminal
            console=Console(stderr=True, force_terminal=True),
            # the ETA averages the steps of the last 10 minutes; rich's 30 s default leaves no
            # estimate at all when a step takes longer than that
            speed_estimate_period=600,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="")
        self._progress.start()
        self._handlers = []
        log: logging.Logger | None = logger
        while log is not None:
            for h in log.handlers:
                if type(h) is logging.StreamHandler and h.stream is stderr:
                    h.setStream(sys.stderr)
                    self._handlers.append((h, stderr))
            log = log.parent if log.propagate else None

    def advance(self, step: int) -> None:
        self._progress.update(self._task, completed=step)

    def set_loss(self, loss: float) -> None:
        self._progress.update(self._task, loss=f"loss {loss:.4f}")

    def close(self) -> None:
        self._progress.stop()
        for h, stream in self._handlers:
            h.setStream(stream)


class MetricsLogger:
    """Computes a record per logged step on every rank; writes it only where enabled."""

    def __init__(
        self,
        cfg: MetricsConfig,
        run_dir: pathlib.Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        flops_per_token: float,
        device: torch.device,
        num_devices: int,
        run_id: str,
        config: dict,
    ):
        if cfg.log_freq < 1:
            raise ValueError(f"metrics.log_freq={cfg.log_freq}: set it to the steps between logs (>= 1)")
        if cfg.progress not in ("auto", "bar", "lines"):
            raise ValueError(f"metrics.progress={cfg.progress!r}: use auto, bar or lines")
        self.cfg, self.enabled, self.total_steps = cfg, enabled, total_steps
        self.flops_per_token, self.device, self.num_devices = flops_per_token, device, num_devices
        self.peak_tflops = device_peak_tflops(device)
        self._t0 = time.monotonic()
        self._elapsed_offset = 0.0  # elapsed_s carries on across restarts
        self._jsonl = self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        last = _keep_until(run_dir / "metrics.jsonl", start_step)
        self._elapsed_offset = last.get("elapsed_s", 0.0) if last else 0.0
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at or after it left by the attempt that crashed
            self._tb = SummaryWriter(run_dir / "tb", purge_step=start_step + 1 if start_step > 0 else None)
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                id=run_id,
                resume="allow",
                dir=run_dir,
                config=config,
                name=run_dir.name,
                # the run dir's parent: the sweep for sweep points, else the experiment or model
                group=run_dir.parent.name,
                mode=wandb_mode(),
            )
        if cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty()):
            self._bar = ProgressBar(total_steps, start_step)

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.cfg.log_freq == 0 or step == self.total_steps

    def advance(self, step: int) -> None:
        """Call every step: moves the progress bar, when there is one."""
        if self._bar is not None:
            self._bar.advance(step)

    def log(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        skipped_steps: int,
        tokens: int,
        seconds: float,
        data_seconds: float,
        step_losses: list[float] | None = None,
        extra: dict | None = None,
    ) -> dict:
        """tokens: per device since the last log; seconds: wall time since then, data_seconds of it waiting for data.
        skipped_steps: steps skipped for non-finite gradients since the launch. step_losses: the loss of every
        step since the last log, this one's last (written as `step_losses`; TensorBoard gets each at its step)."""
        if seconds <= 0:
            raise ValueError(f"seconds={seconds}: pass the wall time since the previous log call (> 0)")
        tokens_per_second = tokens / seconds
        tflops = self.flops_per_token * tokens_per_second / 1e12
        record: dict[str, Any] = {
            "step": step,
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "skipped_steps": int(skipped_steps),
            "tokens_per_second": tokens_per_second,
            "global_tokens_per_second": tokens_per_second * self.num_devices,
            "tflops": tflops,
        }
        if self.peak_tflops is not None:
            record["mfu"] = 100.0 * tflops / self.peak_tflops
        record.update(memory_stats(self.device))
        record["data_share"] = data_seconds / seconds
        record["elapsed_s"] = self._elapsed_offset + time.monotonic() - self._t0
        if step_losses is not None:
            record["step_losses"] = [float(v) for v in step_losses]
        for key, value in (extra or {}).items():
            if key in record:
                raise ValueError(f"extra metric {key!r} would overwrite a built-in one; rename it")
            record[key] = value
        if not self.enabled:
            return record
        self._write(record)
        if self._bar is not None:
            self._bar.set_loss(record["loss"])
        logger.info(format_line(record, self.total_steps))
        return record

    def _write(self, record: dict[str, Any]) -> None:
        """One record into metrics.jsonl, and its numbers into TensorBoard and W&B at its step."""
        step = record["step"]
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            losses = record.get("step_losses", [])
            for offset, value in enumerate(losses):
                self._tb.add_scalar("step_loss", value, step - len(losses) + 1 + offset)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_validation(self, step: int, *, loss: float, tokens: int, seconds: float) -> dict:
        """A record of its own for an evaluation on held-out data (validation.py): `val_loss` (mean
        nats per token over `tokens` tokens), `val_perplexity` = exp(val_loss), `val_seconds`."""
        record: dict[str, Any] = {
            "step": step,
            "val_loss": float(loss),
            "val_perplexity": _exp(loss),
            "val_tokens": tokens,
            "val_seconds": seconds,
            "elapsed_s": self._elapsed_offset + time.monotonic() - self._t0,
        }
        if not self.enabled:
            return record
        self._write(record)
        logger.info(
            "step %d  validation: loss %.4f  perplexity %.2f  (%d tokens, %.1f s)",
            step,
            record["val_loss"],
            record["val_perplexity"],
            tokens,
            seconds,
        )
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._tb = self._wandb = self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
