"""titan's Llama against Hugging Face's `LlamaForCausalLM` on the same weights."""

import pytest
import torch

# GQA (4 query heads on 2 kv heads) and Llama 3.1 rope scaling with all three bands present.
from tests.models.test_model import TINY
from tests.utils import random_model
from titan.models.llama.args import ModelArgs
from titan.models.llama.hf_adapter import (
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_state_dict,
)
from titan.models.llama.model import Transformer

transformers = pytest.importorskip("transformers")

# config.json of meta-llama/Llama-3.1-8B and meta-llama/Llama-3.2-1B on the Hugging Face hub.
HUB_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
HUB_1B = {
    **HUB_8B,
    "hidden_size": 2048,
    "head_dim": 64,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "rope_scaling": {**HUB_8B["rope_scaling"], "factor": 32.0},
    "tie_word_embeddings": True,
}


def args_for(tied: bool) -> ModelArgs:
    return ModelArgs(**{**TINY.__dict__, "tie_embeddings": tied})


def hf_model(args: ModelArgs):
    config = transformers.LlamaConfig(**to_hf_config(args), attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def test_rope_frequencies_match_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from titan.models.llama.model import rope_frequencies

    config = transformers.LlamaConfig(**to_hf_config(TINY))
    hf_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, device="cpu")
    torch.testing.assert_close(rope_frequencies(TINY), hf_freqs, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf_llama(tied):
    args = args_for(tied)
    model = random_model(args)
    hf = hf_model(args)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), args), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    x = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert ours.abs().max() > 1.0  # the comparison below is not between near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # The other direction: Hugging Face's weights loaded into titan.
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.3)
    back = Transformer(args)
    back.init_weights()
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), args), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_rotary_permutation_is_needed():
    """Control: loading titan's wq/wk rows into Hugging Face unpermuted changes the logits."""
    args = args_for(False)
    model = random_model(args)
    sd = to_hf_state_dict(model.state_dict(), args)
    for name, w in model.state_dict().items():
        if name.endswith(("wq.weight", "wk.weight")):
            layer, proj = name.split(".")[1], name.split(".")[3][1]
            sd[f"model.layers.{layer}.self_attn.{proj}_proj.weight"] = w
    hf = hf_model(args)
    hf.load_state_dict(sd, strict=True)
    x = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - hf(input_ids=x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_round_trips_exactly(tied):
    args = args_for(tied)
    sd = random_model(args).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, args), args)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    if tied:
        assert back["output.weight"] is back["tok_embeddings.weight"]

    hf_sd = hf_model(args).state_dict()
    again = to_hf_state_dict(from_hf_state_dict(hf_sd, args), args)
    expected = {k for k in hf_sd if not (tied and k == "lm_head.weight")}
    assert again.keys() == expected
    assert all(torch.equal(again[k], hf_sd[k]) for k in expected)


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="layers.0.attention.wz.weight"):
        to_hf_state_dict({"layers.0.attention.wz.weight": torch.zeros(1)}, TINY)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.q_norm.weight"):
        from_hf_state_dict({"model.layers.0.self_attn.q_norm.weight": torch.zeros(1)}, TINY)
    # derived rotary tables that older transformers saved are skipped
    assert from_hf_state_dict({"model.rotary_emb.inv_freq": torch.zeros(8)}, TINY) == {}


@pytest.mark.parametrize("tied", [False, True])
def test_config_round_trip(tied):
    args = args_for(tied)
    config = to_hf_config(args)
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert config["tie_word_embeddings"] is tied
    assert from_hf_config(config) == args  # transformers 4.x form: rope_scaling + rope_theta
    # transformers 5.x writes rope_parameters instead
    assert from_hf_config(transformers.LlamaConfig(**config).to_dict()) == args
    # Without scaling the other rope_* fields are unused and config.json has no place for them:
    # they come back as the defaults.
    unscaled = ModelArgs(**{**args.__dict__, "rope_scaling_factor": 0.0, "rope_original_max_seq_len": 8192})
    assert to_hf_config(unscaled)["rope_scaling"] is None
    assert from_hf_config(to_hf_config(unscaled)) == unscaled


def test_published_hub_configs_match_our_yaml():
    from tests.launch.compose import compose_config
    from titan.launch.build import build_run_config

    for hub, option in ((HUB_8B, "llama3_8b"), (HUB_1B, "llama3_1b")):
        ours = build_run_config(compose_config([f"model={option}"])).model
        assert from_hf_config(hub) == ours, option


def test_unsupported_hf_variants_are_refused():
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf_config({**HUB_8B, "attention_bias": True})
    with pytest.raises(ValueError, match="head_dim"):
        from_hf_config({**HUB_8B, "head_dim": 256})
    with pytest.raises(ValueError, match="yarn"):
        from_hf_config({**HUB_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
