"""The attention kernels on CUDA (titan/models/llama/attention.py, distributed/cp.py): which SDPA op runs,
that no mask tensor reaches it, and that grouped kv heads give what repeated ones give.

Tolerances: bf16 (8 bits of mantissa) sums in another order with grouped heads: rtol 1.6e-2 (torch's
bf16 default) and atol 1e-2 on values of order 1.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import TorchDispatchMode

from titan.models.llama.args import ModelArgs
from titan.models.llama.attention import backend_takes_gqa, causal, repeat_kv, sdpa
from titan.models.llama.model import Transformer

pytestmark = pytest.mark.cuda

BF16 = {"rtol": 1.6e-2, "atol": 1e-2}
FAST_OPS = (
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
)


class AttentionOps(TorchDispatchMode):
    """Every attention op dispatched in the forward: its name, the heads of its k, and whether any
    tensor besides q, k, v (a mask or bias) was passed to it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if "attention" in name and "backward" not in name:
            extra = [a for a in (*args[3:], *kwargs.values()) if isinstance(a, torch.Tensor)]
            # the efficient kernel's raw op takes [B, S, heads, D]; the SDPA ops [B, heads, S, D]
            heads_dim = 2 if name.startswith("aten._efficient_attention_forward") else 1
            self.calls.append((name, args[1].shape[heads_dim], bool(extra)))
        return func(*args, **kwargs)


def qkv(dtype, q_len=256, kv_len=256, heads=8, kv_heads=2, head_dim=64):
    torch.manual_seed(0)
    shape = (2, heads, q_len, head_dim)
    q = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    return q, k, v


def outputs_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grad_out = torch.ones_like(out) / out.numel() ** 0.5
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


def test_causal_bf16_runs_flash_on_kv_heads_without_a_mask():
    q, k, v = qkv(torch.bfloat16)
    assert backend_takes_gqa(q, k, v)
    with AttentionOps() as ops:
        causal(q, k, v)
    assert len(ops.calls) == 1, ops.calls
    name, k_heads, extra = ops.calls[0]
    assert name in FAST_OPS and k_heads == 2 and not extra, ops.calls


def test_lower_right_bf16_runs_flash_without_a_mask():
    """Context parallelism's call: a chunk of 128 queries against the 256 keys before and in it."""
    q, k, v = qkv(torch.bfloat16, q_len=128, kv_len=256)
    bias = causal_lower_right(128, 256)  # outside the mode: a CausalBias cannot be built under one
    with AttentionOps() as ops:
        out = sdpa(q, k, v, attn_mask=bias)
    assert len(ops.calls) == 1, ops.calls
    name, k_heads, extra = ops.calls[0]
    assert name in FAST_OPS and k_heads == 2 and not extra, ops.calls
    dense = torch.ones(128, 256, dtype=torch.bool, device="cuda").tril(128)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=dense)
    torch.testing.assert_close(out, want, **BF16)


def test_model_attention_reaches_flash_without_a_mask():
    args = ModelArgs(
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=256, max_seq_len=256
    )
    model = Transformer(args).to("cuda", torch.bfloat16)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 256), device="cuda")
    with AttentionOps() as ops:
        model(tokens)
    assert len(ops.calls) == args.n_layers, ops.calls
    for name, k_heads, extra in ops.calls:
        assert name in FAST_OPS and k_heads == args.n_kv_heads and not extra, ops.calls


def test_grouped_equals_repeated_bf16():
    q, k, v = qkv(torch.bfloat16)

    def repeated(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), is_causal=True)

    got, want = outputs_and_grads(causal, q, k, v), outputs_and_grads(repeated, q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.float(), w.float(), **BF16, msg=name)


def test_fp32_repeats_for_the_efficient_kernel():
    """The rule's other branch: flash does not run fp32, and the efficient kernel refuses grouped heads, so
    `sdpa` repeats them; the lower-right bias then runs efficient attention with its mask type, no mask."""
    q, k, v = qkv(torch.float32, q_len=128, kv_len=256)
    grouped = SDPAParams(q, k, v, None, 0.0, False, True)
    assert not can_use_flash_attention(grouped) and not can_use_efficient_attention(grouped)
    assert not backend_takes_gqa(q, k, v)
    bias = causal_lower_right(128, 256)
    with AttentionOps() as ops:
        out = sdpa(q, k, v, attn_mask=bias)
    assert len(ops.calls) == 1, ops.calls
    name, k_heads, extra = ops.calls[0]
    assert name == "aten._efficient_attention_forward.default" and k_heads == 8 and not extra, ops.calls
    dense = torch.ones(128, 256, dtype=torch.bool, device="cuda").tril(128)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=dense)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_a_boolean_mask_runs_the_efficient_kernel_on_repeated_heads():
    """A document mask through SDPA (FlexAttention's comparison path): flash takes no mask, so grouped heads
    would leave SDPA only its math kernel; repeated, the efficient kernel takes the mask."""
    q, k, v = qkv(torch.bfloat16)
    mask = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()
    assert backend_takes_gqa(q, k, v) and not backend_takes_gqa(q, k, v, mask)
    with AttentionOps() as ops:
        out = sdpa(q, k, v, attn_mask=mask)
    assert len(ops.calls) == 1, ops.calls
    name, k_heads, extra = ops.calls[0]
    assert name == "aten._scaled_dot_product_efficient_attention.default" and k_heads == 8 and extra, (
        ops.calls
    )
    torch.testing.assert_close(out, causal(q, k, v), **BF16)


def test_kernels_trace_whole_under_compile():
    """The backend check (SDPAParams, can_use_flash_attention) and the CausalBias trace without a graph break."""
    q, k, v = qkv(torch.bfloat16, q_len=128, kv_len=256)
    bias = causal_lower_right(128, 256)

    def lower_right(q, k, v):
        return sdpa(q, k, v, attn_mask=bias)

    for fn, args in ((causal, (q, k[:, :, :128], v[:, :, :128])), (lower_right, (q, k, v))):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), fn(*args), **BF16)
