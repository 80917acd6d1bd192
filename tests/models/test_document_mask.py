"""Document masking (training.attention=block_causal): a packed window computes what each of its
documents computes alone, under one process, FSDP and TP; dropping the mask changes it; FlexAttention's
forward equals the SDPA-mask path."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL, check_loss_falls, tiny_config
from titan.distributed.mesh import ParallelDims
from titan.models.llama.attention import block_causal, document_ids, flex_block_causal, masked, sdpa
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.train.build_model import build_model
from titan.train.loss import cross_entropy_sum

BOS = 7
# Three documents (and the tail of one begun in an earlier window) in a window of 32 tokens.
LENGTHS = (5, 9, 11, 7)


def packed_window() -> tuple[torch.Tensor, list[slice]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(BOS + 1, TINY_MODEL.vocab_size, (1, sum(LENGTHS)), generator=g)
    spans, start = [], 0
    for i, length in enumerate(LENGTHS):
        if i > 0:  # every document but the first (a tail) starts with BOS
            tokens[0, start] = BOS
        spans.append(slice(start, start + length))
        start += length
    return tokens, spans


def model() -> Transformer:
    m = Transformer(TINY_MODEL)
    init_weights(m, TINY_MODEL, seed=0, device=torch.device("cpu"))
    return m


def test_document_ids_and_mask():
    tokens, spans = packed_window()
    ids = document_ids(tokens, BOS)
    assert [ids[0, s].unique().tolist() for s in spans] == [[0], [1], [2], [3]]
    mask = block_causal(ids)[0, 0]
    assert mask[6, 5] and mask[6, 6] and not mask[6, 7] and not mask[5, 4]  # 5 starts document 1


def test_a_packed_window_computes_each_document_alone():
    """fp32: RoPE's scores depend on relative positions only, so a document's logits do not depend on
    where it sits in the window; they differ by rounding only (1e-5)."""
    tokens, spans = packed_window()
    m = model()
    packed = m(tokens, document_ids(tokens, BOS))
    loss = cross_entropy_sum(packed[:, :-1], tokens[:, 1:].masked_fill(tokens[:, 1:] == BOS, -100))
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    total = 0
    for s in spans:
        alone = m(tokens[:, s])
        torch.testing.assert_close(packed[:, s], alone, rtol=1e-5, atol=1e-5)
        total = total + cross_entropy_sum(alone[:, :-1], tokens[:, s][:, 1:])
    total.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_without_the_mask_documents_see_each_other():
    tokens, spans = packed_window()
    m = model()
    with torch.no_grad():
        masked_logits, plain = m(tokens, document_ids(tokens, BOS)), m(tokens)
    assert torch.equal(masked_logits[:, spans[0]], plain[:, spans[0]])  # the first document sees no other
    assert (masked_logits[:, spans[2]] - plain[:, spans[2]]).abs().max() > 1e-3


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_forward_equals_the_sdpa_mask(compiled):
    """On CPU FlexAttention runs forward only (no backward in torch 2.13): checked under no_grad."""
    tokens, _ = packed_window()
    ids = document_ids(tokens.expand(2, -1), BOS)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, ids.shape[1], 16, generator=g)
    k, v = (torch.randn(2, 4, ids.shape[1], 16, generator=g) for _ in range(2))
    with torch.no_grad():
        reference = sdpa(q, k, v, attn_mask=block_causal(ids))
        if compiled:
            out = masked(q, k, v, flex_block_causal(ids))
        else:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=flex_block_causal(ids), enable_gqa=True)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=5e-6)


def _layout_equals_one_process(rank, world, parallelism):
    cfg = tiny_config("/unused", parallelism=parallelism)
    dims = ParallelDims.resolve(cfg.parallelism, world)
    (sharded,), _ = build_model(cfg, dims, dims.build_meshes("cpu"), torch.device("cpu"), cross_entropy_sum)
    reference = model()
    tokens, _ = packed_window()
    ids = document_ids(tokens, BOS)
    out = sharded(tokens, ids)
    out = out.full_tensor() if isinstance(out, DTensor) else out
    expected = reference(tokens, ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    # TP adds the heads' and hidden units' partial products in another order: gradients of size ~0.1
    # then differ in the 5th digit, here and there.
    for (name, p), (_, q) in zip(sharded.named_parameters(), reference.named_parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(
            grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("parallelism", [{"dp_shard": 2}, {"dp_shard": 1, "tp": 2}], ids=["fsdp", "tp2"])
def test_layouts_equal_one_process(parallelism):
    spawn_ranks(_layout_equals_one_process, 2, parallelism)


def test_training_with_document_masking_lowers_the_loss(tmp_path):
    check_loss_falls(tmp_path, training={"attention": "block_causal"})
