"""Cross-entropy summed over label tokens.

The trainer divides the sum by the global number of label tokens in the optimizer step, so the
gradient is the same whatever the micro-batch size, accumulation or data-parallel layout.

Two implementations, chosen by `training.cross_entropy`:
- `full`: `F.cross_entropy` over the whole batch's logits upcast to fp32. Autograd keeps the fp32
  log-softmax, tokens x vocab x 4 bytes (16k tokens x 128256 vocab = 8 GiB) until backward.
- `chunked` (default): the same sum, computed `CHUNK_TOKENS` rows at a time; backward recomputes each
  chunk's softmax from the saved logits. No fp32 tensor larger than one chunk ever exists, and the
  math is the reference's (fp32 softmax, cast once to the logits' dtype).
Under loss parallelism (TP) the logits are a vocabulary-sharded DTensor that only torch's
`F.cross_entropy` understands: there the full path is used whatever the setting.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100  # F.cross_entropy's default: label positions that add nothing
# 4096 rows x 128256 vocab x 4 bytes = 2 GiB of fp32 per chunk at Llama 3's vocabulary; the softmax of
# one chunk is a memory-bound pass, so fewer, larger chunks gain nothing once a chunk fills the device.
CHUNK_TOKENS = 4096
CROSS_ENTROPY_CHOICES = ("chunked", "full")


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 logits: a bf16 softmax over 128k classes loses most of its precision.
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss, and its log-sum-exp per row (kept for backward: 4 bytes a token)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    target = x.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return ((lse - target) * (labels != IGNORE_INDEX)).sum(), lse


def _chunk_grad(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """d(sum of losses)/d(logits) of one chunk, times the upstream gradient: softmax - one_hot."""
    grad = torch.exp(logits.float() - lse.unsqueeze(1))
    valid = labels != IGNORE_INDEX
    grad.scatter_add_(1, labels.clamp(min=0).unsqueeze(1), -valid.unsqueeze(1).to(grad.dtype))
    return (grad * (valid.unsqueeze(1) * grad_out)).to(logits.dtype)


class _ChunkedCrossEntropySum(torch.autograd.Function):
    # Hand-written because autograd saves each chunk's fp32 softmax for backward, which for all
    # chunks together is the full fp32 tensor again; this Function saves only the logits it was given
    # and one fp32 number per token.
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        lses = []
        for x, y in zip(logits.split(chunk), labels.split(chunk), strict=True):
            loss, lse = _chunk_loss(x, y)
            total += loss
            lses.append(lse)
        ctx.save_for_backward(logits, labels, torch.cat(lses))
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for x, y, s, g in zip(*(t.split(ctx.chunk) for t in (logits, labels, lse, grad)), strict=True):
            g.copy_(_chunk_grad(x, y, s, grad_out))
        return grad, None, None


def chunked_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """`cross_entropy_sum` without a whole-batch fp32 copy of the logits (see the module docstring)."""
    if isinstance(logits, DTensor):  # loss parallelism: torch's vocabulary-parallel cross-entropy
        return cross_entropy_sum(logits, labels)
    return _ChunkedCrossEntropySum.apply(logits.flatten(0, 1), labels.flatten(), chunk_tokens)


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss `training.cross_entropy` names."""
    if name not in CROSS_ENTROPY_CHOICES:
        raise ValueError(f"training.cross_entropy={name!r}: choose one of {', '.join(CROSS_ENTROPY_CHOICES)}")
    return chunked_cross_entropy_sum if name == "chunked" else cross_entropy_sum
