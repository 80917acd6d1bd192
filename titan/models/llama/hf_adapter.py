"""titan <-> Hugging Face `LlamaForCausalLM`: state-dict names, rotary layout and config.json.

titan's parameter names are those of Meta's original checkpoints (`consolidated.*.pth`), and so is
its rotary layout: each head's query/key features rotate in interleaved pairs (0,1), (2,3), ...
Hugging Face rotates half against half (i, i + head_dim/2), so wq and wk rows are permuted on
the way, exactly as `transformers/models/llama/convert_llama_weights_to_hf.py` does.
"""

import re

import torch

from titan.models.llama.args import ModelArgs

# Names inside block N: titan `layers.N.<key>` <-> HF `model.layers.N.<value>`.
_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_FROM_HF_BLOCK = {hf: titan for titan, hf in _BLOCK_NAMES.items()}
_FROM_HF_TOP = {hf: titan for titan, hf in _TOP_NAMES.items()}
# Older transformers saved the rotary inverse frequencies; they are derived from the config.
_HF_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk per head: pairs (0,1), (2,3), ... -> halves (i, i + head_dim/2); HF's `permute`."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """titan (Meta) names and layout -> `LlamaForCausalLM` names and layout.

    With tied embeddings `lm_head.weight` is left out, as in Hugging Face's own checkpoints
    (safetensors refuses two names for one tensor); `LlamaForCausalLM` ties it on load.
    """
    out = {}
    for name, w in sd.items():
        if name in _TOP_NAMES:
            if name == "output.weight" and args.tie_embeddings:
                continue
            out[_TOP_NAMES[name]] = w
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None or m.group(2) not in _BLOCK_NAMES:
            raise KeyError(f"no Hugging Face name for titan parameter {name!r}")
        layer, key = m.groups()
        if key == "attention.wq.weight":
            w = _interleaved_to_halves(w, args.n_heads)
        elif key == "attention.wk.weight":
            w = _interleaved_to_halves(w, args.n_kv_heads)
        out[f"model.layers.{layer}.{_BLOCK_NAMES[key]}"] = w
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` names and layout -> titan (Meta) names and layout.

    With tied embeddings `output.weight` is the embedding tensor (any `lm_head.weight` given is
    the same tensor in Hugging Face and is ignored), so `load_state_dict(strict=True)` works.
    """
    out = {}
    for name, w in sd.items():
        if _HF_DERIVED.fullmatch(name):
            continue
        if name in _FROM_HF_TOP:
            if name == "lm_head.weight" and args.tie_embeddings:
                continue
            out[_FROM_HF_TOP[name]] = w
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None or m.group(2) not in _FROM_HF_BLOCK:
            raise KeyError(f"no titan name for Hugging Face parameter {name!r}")
        layer, key = m.group(1), _FROM_HF_BLOCK[m.group(2)]
        if key == "attention.wq.weight":
            w = _halves_to_interleaved(w, args.n_heads)
        elif key == "attention.wk.weight":
            w = _halves_to_interleaved(w, args.n_kv_heads)
        out[f"layers.{layer}.{key}"] = w
    if args.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def to_hf_config(args: ModelArgs) -> dict:
    """A `config.json` for `LlamaConfig`, rope settings in the form of Meta's published configs.

    Token ids (bos/eos/pad) belong to the tokenizer, not to ModelArgs: set them on the result.
    """
    rope_scaling = None
    if args.rope_scaling_factor:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(args.rope_scaling_factor),
            "low_freq_factor": float(args.rope_low_freq_factor),
            "high_freq_factor": float(args.rope_high_freq_factor),
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.ffn_dim,
        "vocab_size": args.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }


def from_hf_config(config: dict) -> ModelArgs:
    """ModelArgs from a Llama `config.json` dict (transformers 4.x `rope_scaling`/`rope_theta` or
    5.x `rope_parameters`). Raises ValueError for a variant titan's model does not implement."""
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (config.get("attention_bias", False), False),
        "mlp_bias": (config.get("mlp_bias", False), False),
        "head_dim": (config.get("head_dim") or dim // n_heads, dim // n_heads),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"config {key}={value!r}: titan's Llama supports only {supported!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope type {rope_type!r}: titan's Llama supports 'default' and 'llama3'")
    scaling = {}
    if rope_type == "llama3":
        scaling = {
            "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_seq_len": int(rope["original_max_position_embeddings"]),
        }
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        max_seq_len=config["max_position_embeddings"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **scaling,
    )
