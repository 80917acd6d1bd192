"""Generation with a KV cache: the decode loop, the cache against a full forward, sampling, tensor
parallelism (2 gloo ranks) against one process, and greedy decoding against transformers' `generate`."""

import copy
import json

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL, random_model
from titan.checkpoint.dcp_model import write_dcp_model
from titan.checkpoint.hf import dcp_to_hf
from titan.models.llama.generation import generate, kv_caches, sample
from titan.models.llama.kv_cache import KVCache
from titan.models.llama.model import Transformer
from titan.models.llama.tp_inference import apply_tp_inference

PROMPT_LEN, NEW = 12, 20


def prompt(batch: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, TINY_MODEL.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def spy(model: Transformer) -> list[dict]:
    """Each forward's tokens, positions, last-position logits and the first layer's cache length after it."""
    calls = []

    def hook(module, args, kwargs, out):
        cache = module.layers["0"].attention.cache
        calls.append(
            {
                "tokens": args[0].clone(),
                "positions": kwargs.get("positions"),
                "logits": out[:, -1].clone(),
                "cached": cache.length if cache is not None else None,
            }
        )

    model.register_forward_hook(hook, with_kwargs=True)
    return calls


def test_decode_feeds_one_token_at_a_time_at_the_next_position():
    model = random_model()
    calls = spy(model)
    x = prompt()
    new = generate(model, x, NEW)
    assert new.shape == (2, NEW)
    # the prefill, then one forward per new token but the last (which is sampled and not fed)
    assert len(calls) == NEW
    assert torch.equal(calls[0]["tokens"], x) and calls[0]["positions"].tolist() == list(range(PROMPT_LEN))
    assert calls[0]["cached"] == PROMPT_LEN
    for i, call in enumerate(calls[1:]):
        assert torch.equal(call["tokens"], new[:, i : i + 1])  # only the newest token
        assert call["positions"].tolist() == [PROMPT_LEN + i]
        assert call["cached"] == PROMPT_LEN + i + 1  # t entries after t tokens
    assert all(m.cache is None for m in model.modules() if hasattr(m, "cache"))  # removed again


def test_cached_decoding_equals_a_full_forward():
    """The logits each decode step computes from the cache equal those of one forward over the whole
    sequence without a cache (fp32). Sampled at temperature 1, so the sequence is not just argmaxes."""
    model = random_model()
    calls = spy(model)
    x = prompt()
    new = generate(model, x, NEW, temperature=1.0, generator=torch.Generator().manual_seed(0))
    cached = torch.stack([c["logits"] for c in calls], dim=1)  # [B, NEW, vocab]
    with torch.no_grad():
        full = model(torch.cat([x, new], dim=1))[:, PROMPT_LEN - 1 : -1]
    assert full.abs().max() > 1.0
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)
    # the sample equals a greedy run's tokens nowhere near everywhere: the sampler did sample
    assert not torch.equal(new, generate(model, x, NEW))


def test_prefill_in_chunks_equals_a_full_forward():
    """A second chunk after cached tokens attends with the lower-right causal mask."""
    model = random_model()
    x = prompt(length=20)
    with torch.no_grad(), kv_caches(model, 32) as caches:
        first = model(x[:, :8], positions=torch.arange(8))
        second = model(x[:, 8:], positions=torch.arange(8, 20))
        assert caches[0].length == 20 and caches[0].k.shape == (
            2,
            TINY_MODEL.n_kv_heads,
            32,
            TINY_MODEL.head_dim,
        )
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=2e-5, rtol=1e-5)


def test_cache_refuses_more_tokens_than_it_holds():
    cache = KVCache(4)
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="holds 4 tokens; 5 were fed"):
        cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(random_model(), prompt(length=250), 10)


def test_generation_stops_when_every_sequence_stopped():
    model = random_model()
    x = prompt()
    free = generate(model, x, NEW)
    stop = int(free[0, 3])  # what row 0 says 4th
    stopped = generate(model, x, NEW, stop_tokens=(stop,))
    assert torch.equal(stopped[0, :4], free[0, :4]) and (stopped[0, 4:] == stop).all()
    row1_stops = (free[1] == stop).nonzero()
    assert stopped.shape[1] == (NEW if not len(row1_stops) else max(4, int(row1_stops[0]) + 1))


def test_sample():
    logits = torch.tensor([[2.0, 1.5, 1.0, -3.0], [0.0, 0.0, 5.0, 0.0]])
    assert sample(logits, 0.0, 1.0, None).tolist() == [0, 2]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.7, gen) for _ in range(400)])
    # softmax row 0 = .55 .33 .20 .00: top-p 0.7 keeps the first two (0.55 < 0.7), never the third
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {2}  # 0.96 of the mass alone
    all_draws = torch.stack([sample(logits, 1.0, 1.0, gen) for _ in range(400)])
    assert set(all_draws[:, 0].tolist()) >= {0, 1, 2}
    # one seed, one sequence
    again = torch.stack([sample(logits, 1.0, 0.7, torch.Generator().manual_seed(s)) for s in range(20)])
    assert torch.equal(
        again, torch.stack([sample(logits, 1.0, 0.7, torch.Generator().manual_seed(s)) for s in range(20)])
    )


def _tp_worker(rank, world, out_file):
    reference = random_model()
    sharded = copy.deepcopy(reference)
    apply_tp_inference(sharded, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    kv_rows = TINY_MODEL.n_kv_heads * TINY_MODEL.head_dim
    assert sharded.layers["0"].attention.wk.weight.to_local().shape[0] == kv_rows // world
    ours, theirs = spy(sharded), spy(reference)
    x = prompt()
    tokens_tp = generate(sharded, x, NEW)
    tokens_1 = generate(reference, x, NEW)
    assert torch.equal(tokens_tp, tokens_1)
    with torch.no_grad(), kv_caches(sharded, 16) as caches:
        sharded(x, positions=torch.arange(PROMPT_LEN))
        assert caches[0].k.shape[1] == TINY_MODEL.n_kv_heads // world  # each rank caches its own kv heads
    logits_tp = torch.stack([c["logits"] for c in ours[:NEW]])
    logits_1 = torch.stack([c["logits"] for c in theirs[:NEW]])
    diff = (logits_tp - logits_1).abs().max().item()
    assert diff <= 1e-5, diff
    if rank == 0:
        out_file.write_text(json.dumps({"max_abs_diff": diff, "max_abs_logit": logits_1.abs().max().item()}))


@pytest.mark.slow
def test_tp2_equals_one_process(tmp_path):
    out = tmp_path / "diff.json"
    spawn_ranks(_tp_worker, 2, out)
    print(json.loads(out.read_text()))


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model()
    hf = dcp_to_hf(write_dcp_model(tmp_path / "step-0", model.state_dict(), TINY_MODEL), tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    x = prompt()
    with torch.no_grad():
        out = theirs.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    calls = spy(model)
    ours = generate(model, x, NEW)
    assert torch.equal(out.sequences[:, PROMPT_LEN:], ours)
    torch.testing.assert_close(
        torch.stack(out.scores, 1), torch.stack([c["logits"] for c in calls], 1), atol=1e-4, rtol=1e-5
    )
