"""Llama 3 (Meta's reference architecture), as a pure module: no distributed code here."""

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
