"""Attention kernels: the one place Llama attention calls scaled-dot-product attention.

An `AttentionKernel` maps q [B, heads, S_q, head_dim] and k, v [B, kv_heads, S_kv, head_dim] to the
output [B, heads, S_q, head_dim]. K and V keep their kv heads (grouped-query attention: query head h
reads kv head h // n_rep, n_rep = heads // kv_heads); `sdpa` decides per backend whether they are
repeated. The model's kernel is `causal`; context parallelism swaps in one that attends across ranks
(distributed/cp.py, wired by models/llama/cp.py) and calls `sdpa` with torch's lower-right causal bias.
Document masking (block-causal: a token sees the earlier tokens of its own document only) takes a
mask built once per batch from its document ids (`document_mask`): a boolean mask for `sdpa` on CPU,
where torch 2.13's FlexAttention has no backward, and a FlexAttention `BlockMask` on CUDA, which
skips the blocks the mask rules out.
"""

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ATTENTION_CHOICES = ("causal", "block_causal")  # training.attention


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D]; query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    b, kv_heads, s, d = x.shape
    return x[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, kv_heads * n_rep, s, d)


def backend_takes_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> bool:
    """Whether the SDPA backend that will run takes k/v with fewer heads than q (`enable_gqa`) as they are.

    attn_mask: the boolean mask SDPA will get, if any (flash takes none)."""
    # CPU, measured on torch 2.13 (tests/models/test_attention.py): SDPA runs the flash-attention-for-CPU
    # op on the kv heads as they are, no repeat dispatched; the output is bit-identical to repeat_kv's,
    # dK/dV differ by rounding (a group's gradients are summed in another order), and the error against
    # float64 is the same in fp32 and bf16.
    if q.device.type == "cpu":
        return True
    # CUDA (torch's sdp_utils.cpp): flash and cuDNN take grouped kv heads, the memory-efficient kernel does
    # not, and SDPA with enable_gqa then skips it for the math kernel, which repeats the heads anyway and
    # materializes the scores. So grouped where flash runs (fp16/bf16, head_dim <= 256, sm80+), repeated
    # for the efficient kernel elsewhere (fp32). Checked on the GPU by tests/cuda/test_attention_cuda.py.
    return can_use_flash_attention(SDPAParams(q, k, v, attn_mask, 0.0, False, True))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for k/v with kv_heads dividing q's heads.

    attn_mask: a boolean mask or a torch.nn.attention.bias.CausalBias (which picks its own kernel).
    """
    n_rep = q.shape[1] // k.shape[1]
    # A CausalBias picks its kernel itself (flash or efficient, neither with a mask tensor).
    mask = attn_mask if isinstance(attn_mask, torch.Tensor) else None
    if n_rep > 1 and not backend_takes_gqa(q, k, v, mask):
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention: query i sees keys 0..i (flash on CUDA, flash-for-CPU on CPU, no mask tensor)."""
    return sdpa(q, k, v, is_causal=True)


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, S] token ids -> [B, S] document numbers: every document starts with BOS (packing.py), so a
    document is a run from one BOS to the next; tokens before a window's first BOS (the end of a
    document begun in the previous window) are document 0."""
    return (tokens == bos_id).cumsum(dim=1)


def block_causal(documents: torch.Tensor) -> torch.Tensor:
    """[B, S] document numbers -> the boolean mask [B, 1, S, S]: query i sees key j when j <= i and
    both are in one document."""
    same = documents[:, :, None] == documents[:, None, :]
    seq = documents.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    return (same & causal).unsqueeze(1)


def flex_block_causal(documents: torch.Tensor) -> BlockMask:
    """The same mask as a FlexAttention BlockMask, built once per batch (not per layer)."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (documents[b, q] == documents[b, kv])

    batch, seq = documents.shape
    return create_block_mask(mask_mod, batch, None, seq, seq, device=documents.device)


def document_mask(documents: torch.Tensor) -> torch.Tensor | BlockMask:
    """The mask a batch's attention takes: a BlockMask on CUDA, a boolean mask elsewhere."""
    return flex_block_causal(documents) if documents.device.type == "cuda" else block_causal(documents)


@cache
def _compiled_flex():
    # FlexAttention is fast only compiled (eager runs the reference math); compiled once, per process.
    return torch.compile(flex_attention, dynamic=False)


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask) -> torch.Tensor:
    """Attention under a document mask: FlexAttention for a BlockMask, `sdpa` for a boolean mask."""
    if isinstance(mask, BlockMask):
        return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return sdpa(q, k, v, attn_mask=mask)
