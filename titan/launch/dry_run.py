"""`python launch.py <overrides> dry_run=true`: the run validated and its memory and step work estimated,
per rank role, without a run directory, a Slurm job or a rank (titan/train/estimate.py)."""

import torch

from titan.config.schema import RunConfig
from titan.train.estimate import estimate, render
from titan.train.metrics import device_peak_tflops

# What a dry run assumes when neither the config nor this machine names the device: an H100 SXM
# (80 GiB, 989 dense bf16 TFLOP/s), and 40% MFU, a usual figure for a tuned Llama run on it.
DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_PEAK_TFLOPS = 989.0
STATED_MFU = 0.40


def device_figures(cfg: RunConfig) -> tuple[float, float, str]:
    """(memory GiB, peak bf16 TFLOP/s, where they came from) of the device the run would train on."""
    memory, peak = cfg.cluster.gpu_memory_gib, cfg.cluster.gpu_peak_tflops
    source = "cluster.gpu_memory_gib / cluster.gpu_peak_tflops"
    if torch.cuda.is_available():
        local = torch.device("cuda", 0)
        memory = memory or torch.cuda.get_device_properties(local).total_memory / 1024**3
        peak = peak or device_peak_tflops(local)
        source = torch.cuda.get_device_name(local)
    if memory is None or peak is None:
        source = "an H100 SXM (set cluster.gpu_memory_gib and cluster.gpu_peak_tflops for another device)"
    return memory or DEFAULT_GPU_MEMORY_GIB, peak or DEFAULT_PEAK_TFLOPS, source


def dry_run_report(cfg: RunConfig, world: int, *, mfu: float = STATED_MFU) -> str:
    memory, peak, source = device_figures(cfg)
    table = render(cfg, world, estimate(cfg, world), device_gib=memory, peak_tflops=peak, mfu=mfu)
    return f"dry run: nothing started; device: {source}\n{table}\n"
