"""titan DCP <-> Hugging Face, Meta's originals and torch files (python -m titan.tools.convert)."""

import json

import pytest
import torch
import yaml

from tests.checkpoint.common import one_rank_config
from tests.utils import TINY_MODEL, random_model, read_model
from titan.assets import asset_path
from titan.checkpoint.dcp_model import read_dcp_model, write_dcp_model
from titan.checkpoint.hf import HF_INDEX, dcp_to_hf, read_hf
from titan.data.tokenizer import build_tokenizer
from titan.models.llama.args import ModelArgs
from titan.models.llama.meta_adapter import meta_params_to_args
from titan.models.llama.model import Transformer
from titan.tools.convert import main
from titan.train.trainer import run

transformers = pytest.importorskip("transformers")

DIRECTIONS = ("dcp-to-hf", "hf-to-dcp", "meta-to-dcp", "dcp-to-meta", "dcp-to-torch", "seed")


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_help_documents_every_direction(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(direction in text for direction in DIRECTIONS)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_round_trip_is_exact(tmp_path, tied):
    args = ModelArgs(**{**TINY_MODEL.__dict__, "tie_embeddings": tied})
    weights = random_model(args).state_dict()
    step = write_dcp_model(tmp_path / "step-0", weights, args)
    # without the step's model.json, the model comes from --model
    (step / "model.json").rename(tmp_path / "model.json")
    with pytest.raises(FileNotFoundError, match="give --model"):
        main(["dcp-to-hf", str(step), str(tmp_path / "hf")])
    hf = main(["dcp-to-hf", str(step), str(tmp_path / "hf"), "--model", str(tmp_path / "model.json")])
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    back = main(["hf-to-dcp", str(hf), str(tmp_path / "back")])
    assert equal(read_dcp_model(back), weights)
    assert json.loads((back / "model.json").read_text()) == args.__dict__


def test_hf_export_gives_transformers_the_same_logits(tmp_path):
    model = random_model(TINY_MODEL)
    step = write_dcp_model(tmp_path / "step-0", model.state_dict(), TINY_MODEL)
    hf = dcp_to_hf(step, tmp_path / "hf", max_shard_bytes=2**20)  # several files and an index
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1 and (hf / HF_INDEX).is_file()
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, their_logits = model(x), theirs(input_ids=x).logits
    assert ours.abs().max() > 1.0  # not a comparison of near-zero tensors
    torch.testing.assert_close(their_logits, ours, atol=1e-5, rtol=1e-5)


def test_hf_export_in_bfloat16(tmp_path):
    weights = random_model(TINY_MODEL).state_dict()
    step = write_dcp_model(tmp_path / "step-0", weights, TINY_MODEL)
    hf = main(["dcp-to-hf", str(step), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    read, _ = read_hf(hf)
    assert all(torch.equal(read[k], weights[k].to(torch.bfloat16)) for k in weights)


@pytest.mark.parametrize("tokenizer", ["titan_debug.tiktoken", "titan_debug_sp.model"])
def test_hf_export_writes_the_run_tokenizer(tmp_path, tokenizer):
    """`dcp-to-hf` of a run's step directory writes the run's tokenizer, which AutoTokenizer loads and
    which encodes as titan did; config.json carries its BOS and EOS ids."""
    path = asset_path(f"tokenizers/{tokenizer}")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": str(path)}}))
    step = write_dcp_model(
        run_dir / "checkpoints" / "step-0", random_model(TINY_MODEL).state_dict(), TINY_MODEL
    )
    hf = main(["dcp-to-hf", str(step), str(tmp_path / "hf")])
    ours = build_tokenizer(path)
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_id, ours.eos_id)
    text = "The quick brown fox: naïve café, 1234567 tokens.\nNext line"
    assert auto(text).input_ids == ours.encode(text, bos=True, eos=False)  # a BOS first, as Llama's do
    assert auto.decode(ours.encode(text, bos=False, eos=False)) == ours.decode(
        ours.encode(text, bos=False, eos=False)
    )
    no_tokenizer = main(["dcp-to-hf", str(step), str(tmp_path / "bare"), "--tokenizer", "none"])
    assert "bos_token_id" not in json.loads((no_tokenizer / "config.json").read_text())
    assert not (no_tokenizer / "tokenizer_config.json").exists()


def test_export_hf_at_the_end_of_a_run(tmp_path):
    run(one_rank_config(tmp_path, steps=2, export_hf=True))
    hf = tmp_path / "checkpoints" / "hf-step-2"
    trained = read_model(tmp_path, 2)
    exported, args = read_hf(hf)
    assert args == TINY_MODEL
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    model = Transformer(TINY_MODEL).eval()
    model.load_state_dict(trained)
    model.init_rope()
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, their_logits = model(x), theirs(input_ids=x).logits
    torch.testing.assert_close(their_logits, ours, atol=1e-5, rtol=1e-5)


# Llama 3's params.json for the tiny model: hidden size by Meta's rule, 8*64/3 rounded up to 256.
META_PARAMS = {
    "dim": TINY_MODEL.dim,
    "n_layers": TINY_MODEL.n_layers,
    "n_heads": TINY_MODEL.n_heads,
    "n_kv_heads": TINY_MODEL.n_kv_heads,
    "vocab_size": TINY_MODEL.vocab_size,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
META_ARGS = ModelArgs(**{**TINY_MODEL.__dict__, "ffn_dim": 256})
# Meta's model-parallel layers: ColumnParallelLinear splits dim 0, RowParallelLinear dim 1.
COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
ROW = ("wo", "w2")


def write_meta_by_hand(folder, weights, shards, embedding_dim):
    """Meta's format, written here independently of titan's Meta conversion."""
    folder.mkdir()
    files = [{} for _ in range(shards)]
    for name, tensor in weights.items():
        module = name.split(".")[-2]
        dim = (
            embedding_dim
            if module == "tok_embeddings"
            else 0
            if module in COLUMN
            else 1
            if module in ROW
            else None
        )
        for i, file in enumerate(files):
            file[name] = tensor.clone() if dim is None else tensor.chunk(shards, dim=dim)[i].clone()
    for i, file in enumerate(files):
        torch.save(file, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(META_PARAMS))
    return files


@pytest.mark.parametrize("embedding_dim", [0, 1], ids=["llama3-vocab-parallel", "llama2-dim-parallel"])
def test_meta_round_trip_is_exact(tmp_path, embedding_dim):
    weights = random_model(META_ARGS).state_dict()
    originals = write_meta_by_hand(tmp_path / "meta", weights, shards=2, embedding_dim=embedding_dim)
    assert originals[0]["layers.0.attention.wq.weight"].shape[0] == META_ARGS.dim // 2

    step = main(["meta-to-dcp", str(tmp_path / "meta"), str(tmp_path / "step-0"), "--max-seq-len", "256"])
    assert equal(read_dcp_model(step), weights)
    assert json.loads((step / "model.json").read_text()) == META_ARGS.__dict__

    out = main(
        [
            "dcp-to-meta",
            str(step),
            str(tmp_path / "back"),
            "--shards",
            "2",
            "--embedding-dim",
            str(embedding_dim),
        ]
    )
    for i, original in enumerate(originals):
        written = torch.load(out / f"consolidated.{i:02d}.pth", weights_only=True)
        assert equal(written, original)
    params = json.loads((out / "params.json").read_text())
    assert meta_params_to_args(params, tie_embeddings=False, max_seq_len=256) == META_ARGS


def test_meta_rope_scaling_factor():
    params = {**META_PARAMS, "rope_scaling_factor": None}
    assert meta_params_to_args(params, tie_embeddings=False).rope_scaling_factor == 8.0  # Llama 3.1's
    assert (
        meta_params_to_args(params, tie_embeddings=False, rope_scaling_factor=32).rope_scaling_factor == 32.0
    )
    unscaled = meta_params_to_args({**params, "use_scaled_rope": False}, tie_embeddings=True)
    assert unscaled.rope_scaling_factor == 0.0 and unscaled.tie_embeddings


def test_dcp_to_torch(saved_run, tmp_path):
    out = main(["dcp-to-torch", str(saved_run / "checkpoints" / "step-4"), str(tmp_path / "step-4.pt")])
    state = torch.load(out, weights_only=True)
    assert equal(state["model"], read_model(saved_run, 4))
    assert any(k.startswith("state.") for k in state["optimizer"])
