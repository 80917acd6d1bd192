"""Context parallelism: each cp rank holds a slice of every sequence; attention sees the whole sequence.

Sharding is load-balanced as in the Llama 3 paper (Dubey et al., 2024): the sequence is cut into 2*cp chunks
and cp rank r holds chunks r and 2*cp-1-r. Under a causal mask a late chunk does more attention work
than an early one; a head-tail pair gives every rank the same amount.

Attention all-gathers K and V over the cp group (as the Llama 3 paper does: with GQA, K/V are far
smaller than Q, and the all-gather runs on any backend, gloo included) and computes this rank's query
chunks against the keys they may see. The all-gather is autograd-aware: its backward reduce-scatters the
gradients of the gathered K/V back to the ranks that own them.

Model-agnostic: a model plugs `ContextParallelSDPA` in as its attention kernel, gives it its
scaled-dot-product attention and takes its rotary angles at `cp_positions` (for Llama:
models/llama/cp.py). The inputs and labels of every batch are sharded with `shard_sequence`.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.nn.attention.bias import causal_lower_right


def _chunk_len(seq_len: int, cp: int) -> int:
    if seq_len % (2 * cp):
        raise ValueError(
            f"training.seq_len={seq_len} must be a multiple of 2 x parallelism.cp = {2 * cp} "
            "(context parallelism cuts each sequence into 2*cp equal chunks); change training.seq_len "
            "or parallelism.cp"
        )
    return seq_len // (2 * cp)


def cp_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The global positions cp rank `rank` holds, in its local order: chunk r, then chunk 2*cp-1-r."""
    c = _chunk_len(seq_len, cp)
    head, tail = rank, 2 * cp - 1 - rank
    return torch.cat([torch.arange(head * c, (head + 1) * c), torch.arange(tail * c, (tail + 1) * c)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's share of `x` along the sequence dim `dim` (inputs and labels: [B, S], dim 1)."""
    c = _chunk_len(x.shape[dim], cp)
    head, tail = rank, 2 * cp - 1 - rank
    return torch.cat([x.narrow(dim, head * c, c), x.narrow(dim, tail * c, c)], dim=dim)


def unshard_sequence(shards: torch.Tensor, cp: int, dim: int) -> torch.Tensor:
    """The inverse of sharding, for shards concatenated in rank order along `dim` (an all-gather's output).

    Rank r's halves are chunks r and 2*cp-1-r, so the heads in rank order are chunks 0..cp-1 and the tails
    in reverse rank order are chunks cp..2*cp-1. Views, a flip and one cat: a backward with no scatter-add
    (which would be non-deterministic on CUDA).
    """
    per_rank = shards.unflatten(dim, (cp, 2, -1))  # [..., rank, half, chunk_len, ...]
    heads, tails = per_rank.select(dim + 1, 0), per_rank.select(dim + 1, 1).flip(dim)
    return torch.cat([heads, tails], dim=dim).flatten(dim, dim + 1)


class ContextParallelSDPA:
    """Causal attention for a head-tail sharded sequence: a drop-in for a model's causal attention kernel.

    q: [B, heads, local_len, head_dim], k, v: [B, kv_heads, local_len, head_dim], this rank's tokens in
    local order (kv_heads divides heads: grouped-query attention). Returns the attention output for the
    local queries. `sdpa(q, k, v, attn_mask=...)` is the model's scaled-dot-product attention, which takes
    k/v with fewer heads than q and a torch.nn.attention.bias.CausalBias as attn_mask (for Llama:
    models/llama/attention.py `sdpa`).
    """

    def __init__(self, group: dist.ProcessGroup, seq_len: int, sdpa: Callable[..., torch.Tensor]):
        self.group, self.sdpa = group, sdpa
        self.cp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.chunk_len = _chunk_len(seq_len, self.cp)
        self.seq_len = seq_len
        # Global chunk index of each local half. The half of chunk j attends to the keys of chunks 0..j
        # only, and its query i sees keys up to j*chunk_len + i: causal with the diagonal ending in the
        # bottom-right corner ("lower right"), over that prefix of the gathered keys. torch's CausalBias
        # carries only the shape: on CUDA it runs flash with is_causal (for flash that is lower right) or
        # the memory-efficient kernel with its lower-right mask type; only where neither runs (CPU) does
        # torch materialize the mask. Built once here: a CausalBias cannot be constructed inside
        # torch.compile or a dispatch mode.
        self.chunks = (rank, 2 * self.cp - 1 - rank)
        c = self.chunk_len
        self.biases = [causal_lower_right(c, (j + 1) * c) for j in self.chunks]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] != 2 * self.chunk_len:
            raise ValueError(
                f"context parallelism was set up for sequences of {self.seq_len} tokens "
                f"({2 * self.chunk_len} per cp rank), but got {q.shape[2]} local tokens; "
                "shard batches of training.seq_len tokens with shard_sequence"
            )
        # Gathered with their kv heads, not the GQA repeats: n_rep times less traffic; the kernel (sdpa)
        # repeats them after the gather only where its backend cannot take them as they are.
        kv = torch.stack([k, v])  # [2, B, kv_heads, local, D]
        kv = unshard_sequence(all_gather_single_autograd(kv, 3, self.group), self.cp, dim=3)
        k_all, v_all = kv.unbind(0)
        c = self.chunk_len
        outs = []
        # One SDPA per local chunk, against only the keys it may see: (2*cp+1)*c^2 scores per rank instead
        # of 4*cp*c^2 for all local queries against all keys.
        for half, (j, bias) in enumerate(zip(self.chunks, self.biases)):
            visible = (j + 1) * c
            q_half = q.narrow(2, half * c, c)
            outs.append(
                self.sdpa(q_half, k_all.narrow(2, 0, visible), v_all.narrow(2, 0, visible), attn_mask=bias)
            )
        return torch.cat(outs, dim=2)
