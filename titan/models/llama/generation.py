"""Text generation with a KV cache: one forward over the prompt (the prefill), then one token per step.

As Meta's `generation.py`: each step feeds only the newest token, at rotary position prompt_len + i,
and its attention reads the earlier keys and values from the cache. Sampling is greedy at temperature
0, else nucleus (top-p) sampling from a `torch.Generator`: under tensor parallelism every rank holds the
same gathered logits and a generator seeded alike, so all ranks draw the same tokens with no broadcast.
"""

import contextlib
from collections.abc import Iterator

import torch

from titan.models.llama.kv_cache import KVCache
from titan.models.llama.model import Attention, Transformer


@contextlib.contextmanager
def kv_caches(model: Transformer, max_len: int) -> Iterator[list[KVCache]]:
    """An empty KV cache of `max_len` tokens on every attention layer, removed on exit (training sees none)."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    caches = [KVCache(max_len) for _ in attentions]
    for attention, cache in zip(attentions, caches):
        attention.cache = cache
    try:
        yield caches
    finally:
        for attention in attentions:
            attention.cache = None


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, vocab] -> next tokens [B]: the most likely at temperature 0, else drawn from the smallest
    set of most likely tokens whose probabilities sum to top_p (Meta's `sample_top_p`)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sorted, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass before it is under top_p (so the most likely one always stays).
    probs_sorted[probs_sorted.cumsum(dim=-1) - probs_sorted > top_p] = 0.0
    drawn = torch.multinomial(probs_sorted, num_samples=1, generator=generator)
    return order.gather(-1, drawn).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_tokens: tuple[int, ...] = (),
) -> torch.Tensor:
    """prompt [B, P] token ids -> the new tokens [B, N], N <= max_new_tokens: fewer once every sequence
    has produced one of `stop_tokens` (a sequence that stopped earlier repeats its stop token)."""
    bsz, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(
            f"{prompt_len} prompt tokens + {max_new_tokens} new ones exceed the rotary table "
            f"(model.max_seq_len={model.args.max_seq_len}): ask for fewer new tokens"
        )
    stops = torch.tensor(stop_tokens, dtype=torch.long, device=prompt.device)
    done = torch.zeros(bsz, dtype=torch.bool, device=prompt.device)
    new = []
    with kv_caches(model, total):
        logits = model(prompt, positions=torch.arange(prompt_len, device=prompt.device))[:, -1]
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            token = torch.where(done, new[-1], token) if new else token
            new.append(token)
            done |= torch.isin(token, stops)
            if i == max_new_tokens - 1 or (stop_tokens and bool(done.all())):  # (a host sync: only if asked)
                break
            position = torch.full((1,), prompt_len + i, device=prompt.device)
            logits = model(token[:, None], positions=position)[:, -1]
    return torch.stack(new, dim=1) if new else prompt.new_empty(bsz, 0)
