"""The keys and values one attention layer has seen, kept for generation (Meta's `cache_k`/`cache_v`).

Decoding feeds one token at a time: each step appends its key and value and attends over all of them,
so a token's K and V are computed once, not once per later token. Training never sets a cache.
"""

import torch

from titan.models.llama.attention import sdpa


class KVCache:
    """Preallocated [B, kv_heads, max_len, head_dim] keys and values, filled from slot 0 on.

    Preallocated rather than a growing list: a decode step writes one slot in place, where concatenating
    would copy all t earlier entries at every step (quadratic in the length), and the shapes stay fixed
    (what CUDA graphs need). Allocated on the first `update`, which gives the batch, the dtype, the
    device and the kv heads this rank holds (a share of them under tensor parallelism). kv heads, not
    query heads: grouped-query attention keeps n_heads / n_kv_heads times less.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # slots filled: the tokens fed so far
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append xk, xv [B, kv_heads, S, head_dim]; returns every key and value so far."""
        if self.k is None:
            bsz, kv_heads, _, head_dim = xk.shape
            self.k = xk.new_zeros(bsz, kv_heads, self.max_len, head_dim)
            self.v = xv.new_zeros(bsz, kv_heads, self.max_len, head_dim)
        start, end = self.length, self.length + xk.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {end} were fed: make it longer")
        self.k[:, :, start:end] = xk
        self.v[:, :, start:end] = xv
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, heads, S_q, D], the newest S_q of the cached k, v [B, kv_heads, S_kv, D]: causal attention."""
    s_q, s_kv = q.shape[2], k.shape[2]
    if s_q == 1:  # a decode step: its one query sees every key so far
        return sdpa(q, k, v)
    if s_q == s_kv:  # a prefill into an empty cache
        return sdpa(q, k, v, is_causal=True)
    # A chunk after earlier tokens: query i (of S_q) sees the S_kv - S_q earlier keys and its chunk up to i.
    mask = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(s_kv - s_q)
    return sdpa(q, k, v, attn_mask=mask)
