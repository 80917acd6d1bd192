"""Llama 3 (Meta's reference architecture), as a pure module: no distributed code here.

Follows Meta's llama3 `model.py` (pre-norm RMSNorm, grouped-query attention with rotary
embeddings, SwiGLU feed-forward) with three changes for training at scale:
- rotary embeddings use real cos/sin tables instead of complex numbers (inductor cannot fuse
  complex ops); the math, and the interleaved-pairs layout of wq/wk, are Meta's;
- `layers` is an `nn.ModuleDict` keyed "0", "1", ... so a pipeline stage can delete blocks and
  keep every parameter name; `tok_embeddings`, `norm` and `output` may be set to None;
- `init_weights` fills every tensor in place, so the model can be built on the meta device,
  sharded, materialised with `to_empty` and only then initialised;
- Meta's `start_pos` is a `positions` input, the rotary position of each token (a decode step's
  offset, or positions that restart with each document), and the KV cache (Meta's cache_k/cache_v)
  is an object generation sets on each Attention (kv_cache.py); training leaves it None.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.llama.args import ModelArgs
from titan.models.llama.attention import AttentionKernel, causal, document_mask, masked
from titan.models.llama.kv_cache import KVCache, cached_attention

# Weight init: normal(0, 0.02) for every embedding and linear weight (GPT-2, Megatron-LM); the two
# projections that write into the residual stream (wo, w2) use 0.02/sqrt(2*n_layers): GPT-2
# residual scaling, two residual additions per block.
INIT_STD = 0.02


def init_normal(module: nn.Module):
    nn.init.normal_(module.weight, std=INIT_STD)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 whatever the input dtype, as in Meta's reference.
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Rotation speed (radians per position) of each pair of a head's dimensions, [head_dim/2]."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
    if not args.rope_scaling_factor:
        return freqs
    # Llama 3.1 scaling (Meta's `apply_scaling`): wavelengths shorter than
    # original/high_freq_factor are kept, longer than original/low_freq_factor are divided by the
    # factor, and the band between is interpolated smoothly.
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    original = args.rope_original_max_seq_len
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > original / low, freqs / factor, interpolated)
    return torch.where(wavelen < original / high, freqs, scaled)


def rope_cache(args: ModelArgs) -> torch.Tensor:
    """cos and sin of every position's rotation angles, [max_seq_len, head_dim]: cos | sin."""
    positions = torch.arange(args.max_seq_len).float()
    # float32 angles, as in Meta's reference: converted checkpoints see the angles they were
    # trained with.
    angles = torch.outer(positions, rope_frequencies(args))
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[B, S] document numbers (attention.document_ids: nondecreasing along a row) -> [B, S] the position
    of each token within its document: its index minus the index of its document's first token."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    first = torch.ones_like(documents, dtype=torch.bool)
    first[:, 1:] = documents[:, 1:] != documents[:, :-1]
    # The latest document start at or before each token: a running max of the start indices.
    start = torch.where(first, index, 0).cummax(dim=1).values
    return index - start


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x [B, S, heads, head_dim] by its angle; rope is [S, head_dim]
    (one row per position, shared by the batch) or [B, S, head_dim] (one row per token).

    The real form of Meta's complex product (x0 + i*x1) * (cos + i*sin), computed in float32.
    """
    rope = rope.view(1, x.shape[1], 1, -1) if rope.dim() == 2 else rope.unsqueeze(2)
    cos, sin = rope.chunk(2, dim=-1)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # The attention kernel (attention.py); context parallelism swaps in one that sees the whole sequence.
        self.kernel: AttentionKernel = causal
        # Generation's keys and values so far (generation.py sets it); None in training.
        self.cache: KVCache | None = None
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask=None) -> torch.Tensor:
        """rope: the whole table [max_seq_len, head_dim], or its rows at given positions ([S, head_dim],
        [B, S, head_dim]: Transformer.forward's `positions`)."""
        bsz, seqlen, _ = x.shape
        if rope.dim() == 2:
            # Sliced here, not in Transformer.forward: under sequence parallelism only attention sees the
            # whole sequence; the block input holds 1/tp of it.
            if seqlen > rope.shape[0]:
                raise ValueError(
                    f"sequence of {seqlen} tokens is longer than the rotary table ({rope.shape[0]}); "
                    "raise model.max_seq_len"
                )
            rope = rope[:seqlen]
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        xq = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, rope), apply_rotary_emb(xk, rope)
        # K and V keep their kv heads (grouped-query attention): the kernel repeats them only for a
        # backend that cannot take them as they are, and context parallelism gathers n_rep times less.
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        if self.cache is not None:  # generation: attend over every token fed so far
            if mask is not None:
                raise ValueError("a KV cache attends causally over one sequence: it takes no document mask")
            out = cached_attention(xq, *self.cache.update(xk, xv))
        else:
            # A document mask (block-causal, built once per batch) or the kernel's own causal attention.
            out = self.kernel(xq, xk, xv) if mask is None else masked(xq, xk, xv, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def init_weights(self, out_std: float):
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=INIT_STD)
        nn.init.normal_(self.wo.weight, std=out_std)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float):
        nn.init.normal_(self.w1.weight, std=INIT_STD)
        nn.init.normal_(self.w3.weight, std=INIT_STD)
        nn.init.normal_(self.w2.weight, std=out_std)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, out_std: float):
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(out_std)
        self.feed_forward.init_weights(out_std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not in the state dict: derived from args, recomputed by init_weights after to_empty.
        self.register_buffer("rope_cache", rope_cache(args), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        documents: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab]. A pipeline stage without tok_embeddings takes
        hidden states [B, S, dim]; one without norm/output returns hidden states.

        documents [B, S] (attention.document_ids): attend within each document only (block-causal).
        positions [S] or [B, S] int64: the rotary position of each token (default 0..S-1): a decode
        step's offset after the tokens in the KV cache, or `document_positions(documents)`.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # The whole table, which each attention slices to its sequence length; or the given rows.
        rope = self.rope_cache if positions is None else self.rope_cache[positions]
        mask = document_mask(documents) if documents is not None else None
        for layer in self.layers.values():
            h = layer(h, rope, mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None):
        """Fill every parameter and the rotary table in place (after `to_empty`).

        Draws from the global RNG in a fixed order, so a seed gives the same weights.
        buffer_device: where to put the rotary table (default: where it is now).
        """
        self.init_rope(buffer_device)
        for unit, init in self.weight_init_plan():
            init(unit)

    @torch.no_grad()
    def init_rope(self, buffer_device: torch.device | str | None = None):
        with torch.device(buffer_device or self.rope_cache.device):
            self.rope_cache = rope_cache(self.args)

    def weight_init_plan(self) -> list[tuple[nn.Module, Callable[[nn.Module], None]]]:
        """The initialisation units in the order init_weights draws them, each with a function
        that initialises that unit (or an unsharded copy of it) in place."""
        out_std = INIT_STD / math.sqrt(2 * self.args.n_layers)  # all layers, also on a pipeline stage
        plan = []
        if self.tok_embeddings is not None:
            plan.append((self.tok_embeddings, init_normal))
        # init called as a method: a block wrapped for activation checkpointing or compile forwards it
        plan += [(layer, lambda block: block.init_weights(out_std)) for layer in self.layers.values()]
        if self.norm is not None:
            plan.append((self.norm, RMSNorm.reset_parameters))
        # A tied output is the embedding, already drawn (unless this stage has no embedding).
        if self.output is not None and not (self.args.tie_embeddings and self.tok_embeddings is not None):
            plan.append((self.output, init_normal))
        return plan

    def _apply(self, fn, recurse=True):
        # Moving off the meta device (`to_empty`) gives each module its own new tensor, which
        # would silently untie the output projection from the embedding: tie them again.
        super()._apply(fn, recurse)
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        return self
