"""The chunked cross-entropy: the reference's value and gradient, without a whole-batch fp32 copy of the logits."""

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from titan.train.loss import IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum, loss_function

TOKENS, VOCAB, CHUNK = 2048, 4096, 256  # one fp32 [tokens, vocab] tensor: 32 MiB
MIB = 2**20


def _logits_and_labels(dtype: torch.dtype, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(batch, TOKENS // batch, VOCAB, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, TOKENS // batch), generator=g)
    labels[0, :7] = IGNORE_INDEX  # ignored positions add neither loss nor gradient
    return logits, labels


def _loss_and_grad(fn, logits, labels, **kwargs):
    logits.grad = None
    loss = fn(logits, labels, **kwargs)
    (loss / TOKENS).backward()  # the trainer scales the sum the same way
    return loss.detach(), logits.grad


# Both compute the softmax in fp32 from the same logits and cast the gradient to the logits' dtype
# once; the order of the fp32 loss sum moves it by a few ulps, and exp(x - lse) against torch's
# log-softmax backward can round a gradient element to the neighbouring bf16 value (2^-7 relative).
@pytest.mark.parametrize("dtype,grad_rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_chunked_equals_full(dtype, grad_rtol):
    logits, labels = _logits_and_labels(dtype)
    full_loss, full_grad = _loss_and_grad(cross_entropy_sum, logits, labels)
    loss, grad = _loss_and_grad(chunked_cross_entropy_sum, logits, labels, chunk_tokens=CHUNK)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, full_grad, rtol=grad_rtol, atol=1e-9)
    assert grad.dtype == dtype and torch.all(grad[0, :7] == 0)


def test_chunked_compiles():
    logits, labels = _logits_and_labels(torch.float32)
    full_loss, full_grad = _loss_and_grad(cross_entropy_sum, logits, labels)
    compiled = torch.compile(chunked_cross_entropy_sum, backend="aot_eager")
    loss, grad = _loss_and_grad(compiled, logits, labels, chunk_tokens=CHUNK)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-9)


class _LargestFloat32(TorchDispatchMode):
    """The most elements of any fp32 tensor an op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def _peak_bytes(fn, logits, labels, **kwargs) -> tuple[int, int]:
    """Peak live tensor bytes (torch's MemTracker) and the largest fp32 tensor over forward + backward."""
    tracker = MemTracker()
    tracker.track_external(logits)
    spy = _LargestFloat32()
    with tracker, spy:
        _loss_and_grad(fn, logits, labels, **kwargs)
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak["Total"], spy.largest


def test_no_fp32_logits_for_the_whole_batch():
    logits, labels = _logits_and_labels(torch.bfloat16)
    full_peak, full_largest = _peak_bytes(cross_entropy_sum, logits, labels)
    peak, largest = _peak_bytes(chunked_cross_entropy_sum, logits, labels, chunk_tokens=CHUNK)
    # The reference path makes the fp32 [tokens, vocab] tensors this test rules out: the spy sees them.
    assert full_largest == TOKENS * VOCAB
    assert largest <= CHUNK * VOCAB
    # Live: the bf16 logits and their bf16 gradient (16 MiB each) and a few fp32 chunks (4 MiB each),
    # against at least the bf16 logits plus two fp32 copies on the reference path.
    bf16_logits = TOKENS * VOCAB * 2
    assert peak <= 2 * bf16_logits + 4 * CHUNK * VOCAB * 4, f"{peak / MIB:.1f} MiB"
    assert full_peak >= bf16_logits + 2 * TOKENS * VOCAB * 4, f"{full_peak / MIB:.1f} MiB"


def test_loss_function_names():
    assert loss_function("chunked") is chunked_cross_entropy_sum
    assert loss_function("full") is cross_entropy_sum
    with pytest.raises(ValueError, match="training.cross_entropy='fused'"):
        loss_function("fused")
