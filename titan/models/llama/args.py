"""Llama 3's hyper-parameters, and the counts that follow from them alone (parameters, FLOPs).

Torch-free on purpose: the config layer types `model` with ModelArgs, and must not import torch or
the model to do so.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 2304
    ffn_dim: int = 768  # SwiGLU hidden size (Hugging Face's `intermediate_size`)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 frequency scaling; rope_scaling_factor=0 turns it off.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 131072  # longest sequence the rotary table covers
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"model.dim={self.dim} must be n_heads={self.n_heads} times an even head size; "
                "change model.dim or model.n_heads"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads} "
                "(each kv head serves a whole group of query heads)"
            )
        if self.rope_scaling_factor and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def num_params(args: ModelArgs, exclude_embedding: bool = False) -> int:
    """Parameter count, from the shapes alone (nothing is allocated).

    A tied output projection shares the embedding's tensor and counts once. `exclude_embedding`
    drops the token-embedding table, a lookup that costs no FLOPs; the output projection is a
    matmul and stays counted, tied or not (so the shared tensor then counts as the output).
    """
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    attention = args.dim * q + 2 * args.dim * kv + q * args.dim  # wq, wk, wv, wo
    feed_forward = 3 * args.dim * args.ffn_dim  # w1, w2, w3
    block = attention + feed_forward + 2 * args.dim  # + attention_norm, ffn_norm
    embedding = args.vocab_size * args.dim
    output = args.vocab_size * args.dim
    total = args.n_layers * block + args.dim + output  # + final norm
    if exclude_embedding:
        return total
    return total if args.tie_embeddings else total + embedding


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6*N + 12*L*H*Q*T.

    N: parameters without the token embedding (each multiplies one token once forward, twice
    backward, 2 FLOPs per multiply-add); 12*L*H*Q*T: the attention score and value matmuls over
    a sequence of T tokens, counted without the causal mask (PaLM, appendix B; torchtitan).
    """
    n = num_params(args, exclude_embedding=True)
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
