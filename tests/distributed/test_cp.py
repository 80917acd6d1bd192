"""Context parallelism (titan/distributed/cp.py, titan/models/llama/cp.py) against the single-process reference, on CPU/gloo.

Tolerances. Attention (fp32, values of order 1 to 10): atol 1e-6 plus 1e-5 relative; measured
differences are at most 1.2e-6, a few ulp. CP attention does the same math as full causal SDPA over
the same keys, but the kernel sums over key blocks of another length, masked keys enter as exact
zeros and dK/dV are summed across ranks, so only the rounding order differs; a mask or ordering
error is of the size of the values themselves (checked: plain `is_causal` or no mask in place of the
lower-right causal bias fails the comparison).

Whole model: losses and gradients within 1e-5 relative (to the largest entry of each gradient): the
per-rank losses and gradients are summed across ranks in another order than one process sums them.
A sharding error (wrong positions, labels or rotary angles) moves gradients by percents; the test
checks that the rotary table alone already does."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from tests.multirank import spawn_ranks
from titan.distributed.ac import apply_ac
from titan.distributed.cp import ContextParallelSDPA, cp_positions, shard_sequence, unshard_sequence
from titan.models.llama.args import ModelArgs
from titan.models.llama.attention import repeat_kv, sdpa
from titan.models.llama.cp import apply_cp
from titan.models.llama.model import Transformer
from titan.train.loss import cross_entropy_sum

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=128, max_seq_len=64)
SEQ_LEN = 32


# ---- sharding, hand-checked ----


@pytest.mark.parametrize(
    "seq_len,cp,expected",
    [
        (8, 2, [[0, 1, 6, 7], [2, 3, 4, 5]]),
        (16, 4, [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]),
    ],
)
def test_positions_and_sharding(seq_len, cp, expected):
    tokens = torch.arange(seq_len).repeat(3, 1) + 100 * torch.arange(3)[:, None]  # [B=3, S], rows differ
    shards = []
    for rank, want in enumerate(expected):
        assert cp_positions(seq_len, cp, rank).tolist() == want
        shard = shard_sequence(tokens, cp, rank)
        assert torch.equal(shard, tokens[:, want])
        shards.append(shard)
    assert torch.equal(unshard_sequence(torch.cat(shards, dim=1), cp, dim=1), tokens)
    # other dims, as attention uses them: [B, heads, S, D] sharded along dim 2
    x = torch.randn(2, 3, seq_len, 5)
    gathered = torch.cat([shard_sequence(x, cp, r, dim=2) for r in range(cp)], dim=2)
    assert torch.equal(unshard_sequence(gathered, cp, dim=2), x)


def test_seq_len_must_divide_into_2cp_chunks():
    with pytest.raises(ValueError, match=r"training\.seq_len=30 .*parallelism\.cp"):
        cp_positions(30, 2, 0)
    with pytest.raises(ValueError, match=r"training\.seq_len=12 .*parallelism\.cp"):
        shard_sequence(torch.zeros(1, 12), 4, 0)


# ---- a group of one, in this process ----


@pytest.fixture
def cp_mesh_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
    finally:
        dist.destroy_process_group()


def test_cp_of_one_is_the_plain_model(cp_mesh_of_one):
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    tokens = torch.randint(0, TINY.vocab_size, (2, SEQ_LEN))
    want = model(tokens)
    apply_cp(model, cp_mesh_of_one, SEQ_LEN)
    assert model.rope_cache.shape[0] == SEQ_LEN
    torch.testing.assert_close(model(tokens), want, rtol=0, atol=1e-6)


def test_wrong_local_length_and_call_order_are_refused(cp_mesh_of_one):
    model = Transformer(TINY)
    model.init_weights()
    apply_cp(model, cp_mesh_of_one, SEQ_LEN)
    with pytest.raises(ValueError, match="got 16 local tokens"):
        model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="raise model.max_seq_len"):
        apply_cp(model, cp_mesh_of_one, 128)
    with torch.device("meta"):
        unmaterialized = Transformer(TINY)
    with pytest.raises(RuntimeError, match="after to_empty and init_weights"):
        apply_cp(unmaterialized, cp_mesh_of_one, SEQ_LEN)


# ---- multi-rank, gloo subprocesses ----


def _full_causal(q, k, v):
    """The reference: one process, kv heads repeated explicitly, torch's causal SDPA."""
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)


def _cp_matches_full_causal(rank, cp, group, sdpa_fn=sdpa) -> None:
    """ContextParallelSDPA over `group` equals full causal attention: outputs and gradients, MHA and GQA."""
    for n_rep in (1, 2):  # plain multi-head, and GQA (k/v are gathered with their kv heads only)
        torch.manual_seed(n_rep)  # the same full tensors on every rank
        b, heads, s, d = 2, 4, SEQ_LEN, 16
        q = torch.randn(b, heads, s, d, requires_grad=True)
        k = torch.randn(b, heads // n_rep, s, d, requires_grad=True)
        v = torch.randn(b, heads // n_rep, s, d, requires_grad=True)
        grad_out = torch.randn(b, heads, s, d)
        out = _full_causal(q, k, v)
        out.backward(grad_out)

        def shard(x):
            return shard_sequence(x.detach(), cp, rank, dim=2)

        ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
        out_local = ContextParallelSDPA(group, s, sdpa_fn)(ql, kl, vl)
        out_local.backward(shard(grad_out))
        tol = {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(out_local, shard(out), **tol, msg=f"out n_rep={n_rep}")
        torch.testing.assert_close(ql.grad, shard(q.grad), **tol, msg=f"dq n_rep={n_rep}")
        torch.testing.assert_close(kl.grad, shard(k.grad), **tol, msg=f"dk n_rep={n_rep}")
        torch.testing.assert_close(vl.grad, shard(v.grad), **tol, msg=f"dv n_rep={n_rep}")


def _attention_worker(rank, cp):
    _cp_matches_full_causal(rank, cp, dist.group.WORLD)


def _lower_right_worker(rank, cp):
    group = dist.group.WORLD
    masks = []

    def recording(q, k, v, attn_mask):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask)

    _cp_matches_full_causal(rank, cp, group, recording)
    # no dense mask built by titan: each call gets torch's CausalBias, which carries only the shape
    c = SEQ_LEN // 2
    assert [(type(m), m.variant, m.seq_len_q, m.seq_len_kv) for m in masks[:2]] == [
        (CausalBias, CausalVariant.LOWER_RIGHT, c, c),
        (CausalBias, CausalVariant.LOWER_RIGHT, c, 2 * c),
    ]

    def plain_is_causal(q, k, v, attn_mask):
        return sdpa(q, k, v, is_causal=True)

    def no_mask(q, k, v, attn_mask):
        return sdpa(q, k, v)

    for no_op in (plain_is_causal, no_mask):
        with pytest.raises(AssertionError, match="out n_rep=1"):
            _cp_matches_full_causal(rank, cp, group, no_op)


def test_attention_of_one_rank_uses_the_lower_right_causal_bias():
    """One rank holds chunks 0 and 1: the tail chunk's queries see the whole head chunk and their own
    prefix. Only the lower-right causal bias gives that; the two no-ops, plain `is_causal` (upper left:
    query i sees keys 0..i of the 2c keys) and no mask, are caught by the same check. In a forked rank:
    a backward through the functional all-gather in this process would hang later forks."""
    spawn_ranks(_lower_right_worker, 1)


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_attention_matches_full_causal(cp):
    spawn_ranks(_attention_worker, cp)


def _grads(model) -> dict[str, torch.Tensor]:
    """Gradients by parameter name, without the names the AC and compile wrappers add."""
    out = {}
    for name, p in model.named_parameters():
        for prefix in ("_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(prefix, "")
        out[name] = p.grad
    return out


def _wrap(model, wrap: str, mesh) -> None:
    if wrap == "ac-full":
        apply_ac(model.layers, "full")
    elif wrap == "ac-op-compiled":  # the two wrappers apply_cp must see through
        apply_ac(model.layers, "op")  # -> _checkpoint_wrapped_module
        for name, block in list(model.layers.items()):
            model.layers[name] = torch.compile(block, backend="aot_eager", fullgraph=True)  # -> _orig_mod
    elif wrap == "fsdp":  # FSDP over the cp ranks: they hold the same weights and split the tokens
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)


def _transformer_worker(rank, cp, wrap):
    torch.manual_seed(0)
    reference = Transformer(TINY)
    reference.init_weights()
    model = copy.deepcopy(reference)
    tokens = torch.randint(0, TINY.vocab_size, (2, SEQ_LEN + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ref_loss = cross_entropy_sum(reference(inputs), labels)
    ref_loss.backward()
    ref_grads = _grads(reference)

    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    _wrap(model, wrap, mesh)
    apply_cp(model, mesh, SEQ_LEN)
    apply_cp(model, mesh, SEQ_LEN)  # idempotent: a second call changes nothing
    local_inputs, local_labels = shard_sequence(inputs, cp, rank), shard_sequence(labels, cp, rank)

    def loss_and_grads():
        """The loss and gradients summed over the cp ranks."""
        model.zero_grad()
        loss = cross_entropy_sum(model(local_inputs), local_labels)
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss)
        grads = _grads(model)
        for name, grad in grads.items():
            if isinstance(grad, DTensor):  # FSDP reduce-scattered the mean over the cp ranks
                grads[name] = grad.full_tensor() * cp
            else:
                dist.all_reduce(grad)
        return loss, grads

    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)

    if wrap == "plain":
        # The test can see a RoPE sharding error: with the unsharded table (angles of positions 0..15 on
        # every rank) gradients move by far more than the tolerance. (The loss at init is near
        # S*log(vocab) and hardly depends on positions; the gradients do.)
        model.init_rope()
        _, wrong = loss_and_grads()
        moved = max(((wrong[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items())
        assert moved > 1e-2, moved


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["plain", "ac-full", "ac-op-compiled", "fsdp"])
def test_transformer_matches_single_process(wrap):
    spawn_ranks(_transformer_worker, 2, wrap)
