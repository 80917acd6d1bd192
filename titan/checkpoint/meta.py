"""Meta's original Llama checkpoints on disk: `consolidated.NN.pth` (one per model-parallel rank) and
`params.json`. The `.pth` files are read with `torch.load(weights_only=True)`: never unpickled."""

import json
from pathlib import Path

import torch

from titan.models.llama.args import ModelArgs
from titan.models.llama.meta_adapter import (
    args_to_meta_params,
    from_meta_shards,
    meta_params_to_args,
    to_meta_shards,
)


def read_meta(
    folder: Path, *, max_seq_len: int = 131072, rope_scaling_factor: float | None = None
) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Meta's `consolidated.NN.pth` shards + `params.json` -> one titan state dict and its ModelArgs."""
    folder = Path(folder)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no consolidated.*.pth files")
    params = json.loads((folder / "params.json").read_text())
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    weights = from_meta_shards(shards, params["vocab_size"])
    args = meta_params_to_args(
        params,
        tie_embeddings="output.weight" not in weights,
        max_seq_len=max_seq_len,
        rope_scaling_factor=rope_scaling_factor,
    )
    if args.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights, args


def write_meta(
    weights: dict[str, torch.Tensor], args: ModelArgs, out: Path, *, shards: int = 1, embedding_dim: int = 0
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, piece in enumerate(to_meta_shards(weights, args, shards, embedding_dim)):
        torch.save(piece, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(args_to_meta_params(args), indent=2))
    return out
