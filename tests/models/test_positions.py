"""Rotary positions given per token: `Transformer.forward(..., positions=)` and `document_positions`."""

import torch

from tests.utils import TINY_MODEL
from titan.models.llama.attention import document_ids
from titan.models.llama.model import Transformer, apply_rotary_emb, document_positions, rope_cache

BOS = 5


def model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY_MODEL).eval()


def test_document_positions_restart_at_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 2, 3, 3, 3, 4, 4]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 2, 0, 1]])
    assert torch.equal(document_positions(documents), expected)
    # from token ids, as the training loop makes them: a window that opens mid-document counts from 0
    tokens = torch.tensor([[9, 9, BOS, 9, 9, 9, BOS, 9]])
    assert document_positions(document_ids(tokens, BOS)).tolist() == [[0, 1, 0, 1, 2, 3, 0, 1]]


def test_rotary_rows_per_token_equal_the_shared_table():
    x = torch.randn(2, 6, 3, TINY_MODEL.head_dim)
    table = rope_cache(TINY_MODEL)
    shared = apply_rotary_emb(x, table[:6])
    assert torch.equal(apply_rotary_emb(x, table[torch.arange(6)].expand(2, 6, -1)), shared)
    # each batch row its own offset
    offset = apply_rotary_emb(x, table[torch.stack([torch.arange(6), torch.arange(6) + 10])])
    assert torch.equal(offset[0], shared[0])
    assert torch.equal(offset[1], apply_rotary_emb(x, table[10:16])[1])
    assert not torch.allclose(offset[1], shared[1])


def test_default_positions_are_0_to_s_minus_1():
    m = model()
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = m(x)
        assert torch.equal(m(x, positions=torch.arange(24)), default)
        assert torch.equal(m(x, positions=torch.arange(24).expand(2, 24)), default)


def test_positions_per_row():
    """[B, S] positions: each row rotated by its own; spacing them out changes the relative distances
    attention sees (a common offset would not: RoPE depends on differences of positions only)."""
    m = model()
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    spread = torch.stack([torch.arange(24), 3 * torch.arange(24)])
    with torch.no_grad():
        default, per_row = m(x), m(x, positions=spread)
        row1 = m(x[1:], positions=3 * torch.arange(24))
    assert torch.equal(per_row[0], default[0])
    torch.testing.assert_close(per_row[1:], row1, atol=1e-6, rtol=1e-6)
    assert (row1 - default[1:]).abs().max() > 1e-2


def test_document_positions_make_each_document_a_sequence_of_its_own():
    """Block-causal attention with positions restarting per document: each document's logits are those
    of the document alone. (In exact arithmetic so are they with the positions running on, RoPE being
    relative; the restart makes it so whatever the offset, e.g. beyond the trained context.)"""
    m = model()
    gen = torch.Generator().manual_seed(1)
    first, second = (torch.randint(6, TINY_MODEL.vocab_size, (1, n), generator=gen) for n in (10, 14))
    first[0, 0] = second[0, 0] = BOS
    packed = torch.cat([first, second], dim=1)
    documents = document_ids(packed, BOS)
    with torch.no_grad():
        restarted = m(packed, documents, positions=document_positions(documents))
        alone = m(second)
    torch.testing.assert_close(restarted[:, 10:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restarted[:, :10], m(first), atol=1e-5, rtol=1e-5)
