"""Cross-entropy summed over label tokens.

The trainer divides the sum by the global number of label tokens in the optimizer step, so the
gradient is the same whatever the micro-batch size, accumulation or data-parallel layout.
"""

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 logits: a bf16 softmax over 128k classes loses most of its precision.
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
