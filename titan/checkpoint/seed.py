"""Seed checkpoints: step 0 of a run, made on one process with the trainer's initialisation (same
seed, same weights), for runs of any layout to start from."""

from pathlib import Path

import torch

from titan.checkpoint.dcp_model import write_dcp_model
from titan.models.llama.args import ModelArgs
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer


def seed_checkpoint(args: ModelArgs, out: Path, *, seed: int = 0) -> Path:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    init_weights(model, args, seed=seed, device=torch.device("cpu"))
    return write_dcp_model(out, model.state_dict(), args)
