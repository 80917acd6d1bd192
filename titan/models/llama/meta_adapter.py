"""titan <-> Meta's original Llama checkpoints (`consolidated.NN.pth` + `params.json`).

titan's parameter names and rotary layout are Meta's, so nothing is renamed. What differs: Meta's
model-parallel code splits each weight over one file per rank, and params.json gives the FFN size as
(multiple_of, ffn_dim_multiplier) instead of the size itself.
"""

import torch

from titan.models.llama.args import ModelArgs

# How Meta's model-parallel code splits each weight over the `consolidated.NN.pth` files:
# ColumnParallelLinear on dim 0 (output features), RowParallelLinear on dim 1 (input features);
# norms are replicated. The embedding is VocabParallelEmbedding (dim 0) in Llama 3's code and
# ParallelEmbedding (dim 1) in Llama 2's; reading tells them apart by shape.
_COLUMN = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
)
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
# (multiple_of, ffn_dim_multiplier) of Meta's published params.json files, tried first on export.
_PUBLISHED_FFN = ((1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0), (256, None))
# Llama 3.1's rope scaling constants that params.json cannot express (Meta's code fixes them).
_META_FIXED_ROPE = {"rope_low_freq_factor": 1.0, "rope_original_max_seq_len": 8192}


def _split_dim(name: str, embedding_dim: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_dim
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None  # replicated


def from_meta_shards(shards: list[dict[str, torch.Tensor]], vocab_size: int) -> dict[str, torch.Tensor]:
    """One state dict from the model-parallel ranks' state dicts."""
    first = shards[0]
    embedding_dim = 0 if first["tok_embeddings.weight"].shape[0] * len(shards) == vocab_size else 1
    weights = {}
    for name in first:
        if name == "rope.freqs":  # Llama 2 stored its rotary table; titan derives it
            continue
        dim = _split_dim(name, embedding_dim)
        weights[name] = (
            first[name].clone()
            if dim is None or len(shards) == 1
            else torch.cat([s[name] for s in shards], dim=dim)
        )
    return weights


def to_meta_shards(
    weights: dict[str, torch.Tensor], args: ModelArgs, shards: int, embedding_dim: int
) -> list[dict[str, torch.Tensor]]:
    """The state dict of each of `shards` model-parallel ranks (a tied output is left out)."""
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in weights.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        dim = _split_dim(name, embedding_dim)
        if dim is not None and tensor.shape[dim] % shards:
            raise ValueError(
                f"{name} {list(tensor.shape)} does not split into {shards} model-parallel shards"
            )
        parts = [tensor] * shards if dim is None else tensor.chunk(shards, dim=dim)
        for piece, part in zip(pieces, parts):
            piece[name] = part.clone()
    return pieces


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params_to_args(
    params: dict, *, tie_embeddings: bool, max_seq_len: int = 131072, rope_scaling_factor: float | None = None
) -> ModelArgs:
    scaled = params.get("use_scaled_rope", False)
    return ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=params["vocab_size"],
        ffn_dim=meta_ffn_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0)),
        # Llama 3.1's factor 8 unless params.json says otherwise (Llama 3.2 1B/3B use 32).
        rope_scaling_factor=float(rope_scaling_factor or params.get("rope_scaling_factor") or 8.0)
        if scaled
        else 0.0,
        rope_high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
        max_seq_len=max_seq_len,
        tie_embeddings=tie_embeddings,
    )


def args_to_meta_params(args: ModelArgs) -> dict:
    if args.rope_scaling_factor:
        fixed = {k: getattr(args, k) for k in _META_FIXED_ROPE if getattr(args, k) != _META_FIXED_ROPE[k]}
        if fixed:
            raise ValueError(f"Meta's params.json cannot express {fixed} (its code fixes {_META_FIXED_ROPE})")
    base = int(2 * 4 * args.dim / 3)
    # An exact (multiple_of, multiplier) for any ffn_dim: round up to ffn_dim itself.
    fallback = (args.ffn_dim, None if base <= args.ffn_dim else args.ffn_dim / base)
    multiple_of, multiplier = next(
        c for c in (*_PUBLISHED_FFN, fallback) if meta_ffn_dim(args.dim, *c) == args.ffn_dim
    )
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": bool(args.rope_scaling_factor),
    }
    if args.rope_scaling_factor:
        params["rope_scaling_factor"] = args.rope_scaling_factor
        params["rope_high_freq_factor"] = args.rope_high_freq_factor
    return params
