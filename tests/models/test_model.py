"""The Llama model on its own: blocks against reference formulas, init, meta-device build, stages."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from titan.models.llama.args import ModelArgs, flops_per_token, num_params
from titan.models.llama.model import INIT_STD, Transformer, apply_rotary_emb, rope_cache, rope_frequencies

# head_dim 16 and original context 64: the rope bands are "kept" (wavelength 6.3 < 16),
# "interpolated" (32) and "divided by the factor" (163 and longer), so scaling is exercised.
TINY = ModelArgs(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128,
    ffn_dim=160,
    rope_scaling_factor=8.0,
    rope_original_max_seq_len=64,
    max_seq_len=128,
)
DEBUG = ModelArgs(
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    vocab_size=2304,
    ffn_dim=768,
    rope_scaling_factor=8.0,
    max_seq_len=2048,
)


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def tokens(args: ModelArgs, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_model_args_reject_inconsistent_shapes():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="even head size"):
        ModelArgs(dim=72, n_heads=8)  # head_dim 9


def test_rms_norm_matches_torch():
    model = build(TINY)
    norm = model.norm
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, TINY.dim)
    expected = F.rms_norm(x, (TINY.dim,), norm.weight, eps=TINY.norm_eps)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)


def test_rope_scaling_matches_meta_formula():
    """Meta's `apply_scaling` loop, written out per frequency."""
    args = TINY
    base = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    low_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    expected, bands = [], set()
    for freq in base.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            expected.append(freq)
            bands.add("kept")
        elif wavelen > low_wavelen:
            expected.append(freq / args.rope_scaling_factor)
            bands.add("divided")
        else:
            smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
                args.rope_high_freq_factor - args.rope_low_freq_factor
            )
            expected.append((1 - smooth) * freq / args.rope_scaling_factor + smooth * freq)
            bands.add("interpolated")
    assert bands == {"kept", "interpolated", "divided"}
    torch.testing.assert_close(rope_frequencies(args), torch.tensor(expected), rtol=1e-6, atol=0)
    unscaled = ModelArgs(**{**TINY.__dict__, "rope_scaling_factor": 0.0})
    torch.testing.assert_close(rope_frequencies(unscaled), base, rtol=0, atol=0)


def test_real_rotary_equals_meta_complex_form():
    """Meta's reference: view (even, odd) pairs as complex numbers, multiply by exp(i*angle)."""
    args = TINY
    seq = 24
    x = torch.randn(2, seq, args.n_heads, args.head_dim)
    angles = torch.outer(torch.arange(seq).float(), rope_frequencies(args))
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    x_complex = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    expected = torch.view_as_real(x_complex * freqs_cis.view(1, seq, 1, -1)).flatten(3)
    actual = apply_rotary_emb(x, rope_cache(args)[:seq])
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    # bf16 in, bf16 out (computed in float32)
    assert apply_rotary_emb(x.bfloat16(), rope_cache(args)[:seq]).dtype == torch.bfloat16


def test_num_params_matches_meta_model():
    for args in (TINY, DEBUG, ModelArgs(**{**TINY.__dict__, "tie_embeddings": True})):
        with torch.device("meta"):
            model = Transformer(args)
        total = sum(p.numel() for p in model.parameters())  # shared tensors once
        embedding = model.tok_embeddings.weight.numel()
        assert num_params(args) == total
        assert num_params(args, exclude_embedding=True) == (
            total if args.tie_embeddings else total - embedding
        )


def test_flops_per_token_by_hand():
    # DEBUG, per block: attention 256*256 (wq) + 2*256*128 (wk, wv) + 256*256 (wo) = 196608,
    # feed-forward 3*256*768 = 589824, two norms 512 -> 786944; 4 blocks = 3147776;
    # + final norm 256 + output 2304*256 = 589824 -> N = 3737856 (embedding excluded).
    n = 3_737_856
    attention = 12 * 4 * 8 * 32 * 256  # 12 * L * H * Q * T at T = 256
    assert flops_per_token(DEBUG, seq_len=256) == 6 * n + attention == 25_572_864
    # Tied: the output projection still runs as a matmul, so it still counts.
    tied = ModelArgs(**{**DEBUG.__dict__, "tie_embeddings": True})
    assert flops_per_token(tied, seq_len=256) == flops_per_token(DEBUG, seq_len=256)
    assert num_params(tied) == num_params(DEBUG) - 2304 * 256


def test_init_statistics():
    model = build(DEBUG)
    out_std = INIT_STD / math.sqrt(2 * DEBUG.n_layers)
    expected = {"tok_embeddings.weight": INIT_STD, "output.weight": INIT_STD}
    for i in range(DEBUG.n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            expected[f"layers.{i}.{name}.weight"] = INIT_STD
        for name in ("attention.wo", "feed_forward.w2"):
            expected[f"layers.{i}.{name}.weight"] = out_std
    params = dict(model.named_parameters())
    for name, std in expected.items():
        w = params.pop(name).detach()
        # the sample std of n >= 32768 normal draws is within 2% of sigma far beyond 5 sigma
        assert w.std().item() == pytest.approx(std, rel=0.02), name
        assert abs(w.mean().item()) < 5 * std / math.sqrt(w.numel()), name
    assert params and all(name.endswith("norm.weight") for name in params)
    for name, w in params.items():
        assert torch.equal(w, torch.ones_like(w)), name
    torch.testing.assert_close(model.rope_cache, rope_cache(DEBUG), atol=0, rtol=0)
    assert "rope_cache" not in model.state_dict()


def test_seeded_init_is_deterministic():
    a, b, c = build(TINY, seed=3), build(TINY, seed=3), build(TINY, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa if not k.endswith("norm.weight"))


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_equals_eager_build(tied):
    args = ModelArgs(**{**TINY.__dict__, "tie_embeddings": tied})
    meta_built = build(args, seed=5)
    torch.manual_seed(5)
    eager = Transformer(args)  # built on the CPU, then initialised the same way
    torch.manual_seed(5)
    eager.init_weights()
    assert all(not p.is_meta for p in meta_built.parameters())
    assert (meta_built.output.weight is meta_built.tok_embeddings.weight) == tied
    assert sum(p.numel() for p in meta_built.parameters()) == num_params(args)
    sd_meta, sd_eager = meta_built.state_dict(), eager.state_dict()
    assert sd_meta.keys() == sd_eager.keys()
    assert all(torch.equal(sd_meta[k], sd_eager[k]) for k in sd_meta)
    x = tokens(args)
    logits = meta_built(x)
    assert logits.shape == (2, 24, args.vocab_size) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, eager(x), atol=0, rtol=0)


def test_forward_is_causal_and_slices_the_rope_table():
    model = build(TINY)
    x = tokens(TINY, seq=24)
    full = model(x)
    # positions 0..9 see the same prefix, so their logits do not depend on what follows
    torch.testing.assert_close(model(x[:, :10]), full[:, :10], atol=1e-5, rtol=1e-5)
    assert model(tokens(TINY, seq=TINY.max_seq_len)).shape[1] == TINY.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(TINY, seq=TINY.max_seq_len + 1))


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_style_stages_compose_to_the_full_model(tied):
    args = ModelArgs(**{**TINY.__dict__, "n_layers": 4, "tie_embeddings": tied})
    model = build(args)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"], first.layers["3"]
    first.norm, first.output = None, None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = None
    x = tokens(args)
    hidden = first(x)
    assert hidden.shape == (2, 24, args.dim)
    torch.testing.assert_close(last(hidden), model(x), atol=0, rtol=0)
    # names survive the split, so checkpoints and sharding plans still match
    full_names = set(model.state_dict())
    assert set(first.state_dict()) | set(last.state_dict()) == full_names
    assert "layers.3.attention.wq.weight" in last.state_dict()
    # stages initialise on their own, with the full model's residual scaling
    torch.manual_seed(0)
    last.init_weights()
    wo = last.layers["3"].attention.wo.weight
    assert wo.std().item() == pytest.approx(INIT_STD / math.sqrt(2 * args.n_layers), rel=0.1)
    assert last.output.weight.std().item() == pytest.approx(INIT_STD, rel=0.1)


def test_every_parameter_learns():
    torch.manual_seed(0)
    model = build(TINY)
    batch = tokens(TINY, batch=4, seq=33)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        if not losses:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not no_grad
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(TINY.vocab_size), rel=0.02)  # near-uniform start
    assert losses[-1] < 0.5 * losses[0]  # memorises one batch


@pytest.mark.parametrize("tied", [False, True])
def test_init_plan_drawn_unit_by_unit_equals_init_weights(tied):
    """How a sharded model is initialised: each unit drawn whole on a meta twin, in plan order."""
    args = ModelArgs(**{**TINY.__dict__, "tie_embeddings": tied})
    reference = build(args, seed=7)
    with torch.device("meta"):
        twin = Transformer(args)
    torch.manual_seed(7)
    drawn = {}
    for unit, init in twin.weight_init_plan():
        unit.to_empty(device="cpu")
        init(unit)
        drawn.update({id(p): p.detach().clone() for p in unit.parameters()})
    assert len(twin.weight_init_plan()) == args.n_layers + (2 if tied else 3)
    twin_params = {name: p for name, p in twin.named_parameters(remove_duplicate=False)}
    # every distinct tensor of the reference was drawn by its unit; a tied output is the embedding
    for name, p in reference.named_parameters():
        torch.testing.assert_close(drawn[id(twin_params[name])], p.detach(), atol=0, rtol=0, msg=name)
    assert ("output.weight" in dict(reference.named_parameters())) == (not tied)


def test_init_weights_through_activation_checkpoint_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    reference = build(TINY, seed=2)
    with torch.device("meta"):
        model = Transformer(TINY)
    for name, block in model.layers.items():
        model.layers[name] = checkpoint_wrapper(block)
    model.to_empty(device="cpu")
    torch.manual_seed(2)
    model.init_weights()
    unwrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in model.state_dict().items()}
    expected = reference.state_dict()
    assert unwrapped.keys() == expected.keys()
    assert all(torch.equal(unwrapped[k], expected[k]) for k in expected)
