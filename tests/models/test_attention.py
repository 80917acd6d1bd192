"""The attention-kernel interface (titan/models/llama/attention.py) against repeat_kv + causal SDPA.

Tolerances: fp32. The forward is bit-identical (the same flash-for-CPU kernel over the same numbers);
dK/dV sum a group's query-head gradients in another order than repeat_kv's backward, so they differ by
rounding (measured: at most 5e-7 on values of order 1).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from titan.models.llama.args import ModelArgs
from titan.models.llama.attention import backend_takes_gqa, causal, repeat_kv, sdpa
from titan.models.llama.model import Transformer

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=128, max_seq_len=64)


def reference_causal(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)


def qkv(n_rep: int, seq: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    b, heads, d = 2, 4, 16
    q = torch.randn(b, heads, seq, d, requires_grad=True)
    k = torch.randn(b, heads // n_rep, seq, d, requires_grad=True)
    v = torch.randn(b, heads // n_rep, seq, d, requires_grad=True)
    return q, k, v


def outputs_and_grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


def test_repeat_kv_order():
    """Query head h reads kv head h // n_rep (Meta's order; the checkpoints' wq/wk rows follow it)."""
    kv = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 1)  # kv head i holds the value i
    assert repeat_kv(kv, 2)[0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert repeat_kv(kv, 1) is kv


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_causal_equals_repeat_kv_and_is_causal(n_rep):
    q, k, v = qkv(n_rep)
    grad_out = torch.randn_like(q)
    got = outputs_and_grads(causal, q, k, v, grad_out)
    want = outputs_and_grads(reference_causal, q, k, v, grad_out)
    assert torch.equal(got[0], want[0])
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


def test_attention_without_the_causal_mask_differs():
    """The no-op check: dropping the mask moves the outputs, and causal outputs ignore later keys."""
    q, k, v = qkv(2)
    out = causal(q, k, v)
    assert (sdpa(q, k, v) - out).abs().max() > 0.1
    later = 10  # change every key and value from position 10 on: outputs before it stay, the rest move
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, later:] += 1.0
    v2[:, :, later:] -= 1.0
    out2 = causal(q, k2, v2)
    assert torch.equal(out2[:, :, :later], out[:, :, :later])
    assert (out2[:, :, later:] - out[:, :, later:]).abs().min() > 0


def test_a_boolean_mask_takes_grouped_heads_too():
    """`sdpa` with a boolean mask (how a document mask enters on CPU) equals repeat_kv with that mask."""
    q, k, v = qkv(2)
    mask = torch.rand(q.shape[2], q.shape[2]) > 0.5
    mask.fill_diagonal_(True)  # every query sees at least one key
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask), want, rtol=0, atol=1e-6)


class AttentionOps(TorchDispatchMode):
    """The SDPA ops dispatched, with the shapes of their k and v and whether a mask reached them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.calls.append((str(func), args[1].shape[1], args[2].shape[1], kwargs.get("attn_mask")))
        return func(*args, **kwargs)


def test_kv_heads_reach_the_cpu_kernel_unrepeated():
    """On CPU, GQA without materialized repeats: the flash-for-CPU op gets k/v with their kv heads."""
    q, k, v = qkv(4)
    assert backend_takes_gqa(q, k, v)
    with AttentionOps() as ops:
        causal(q, k, v)
    assert ops.calls == [("aten._scaled_dot_product_flash_attention_for_cpu.default", 1, 1, None)]


def test_model_attention_calls_its_kernel_with_kv_heads():
    """The model passes k/v with n_kv_heads to its kernel, and the kernel is what it computes with."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    want = model(tokens)
    shapes = []

    def recording(q, k, v):
        shapes.append((q.shape[1], k.shape[1], v.shape[1]))
        return reference_causal(q, k, v)

    for layer in model.layers.values():
        layer.attention.kernel = recording
    torch.testing.assert_close(model(tokens), want, rtol=0, atol=1e-6)
    assert shapes == [(TINY.n_heads, TINY.n_kv_heads, TINY.n_kv_heads)] * TINY.n_layers
    for layer in model.layers.values():
        layer.attention.kernel = sdpa  # not causal: the model's output moves
    assert (model(tokens) - want).abs().max() > 1e-3
