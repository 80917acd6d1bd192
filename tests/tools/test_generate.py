"""python -m titan.tools.generate: from a run directory, a step folder and a Hugging Face folder, on one
process and on 2 tensor-parallel ranks; and its errors."""

import json

import pytest
import torch
import yaml

from tests.checkpoint.common import one_rank_config
from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL, random_model
from titan.assets import asset_path
from titan.checkpoint.dcp_model import read_dcp_model, write_dcp_model
from titan.checkpoint.hf import dcp_to_hf
from titan.data.tokenizer import build_tokenizer
from titan.models.llama.args import ModelArgs
from titan.models.llama.generation import generate
from titan.models.llama.model import Transformer
from titan.tools.generate import load_model, main, resolve_source
from titan.train.trainer import run

TOKENIZER = asset_path("tokenizers/titan_debug.tiktoken")
PROMPT = "The quick brown fox"
GREEDY = ["--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0"]


def write_run_config(run_dir, cfg_dict: dict) -> None:
    """The resolved config.yaml launch.py writes into a run directory (trainer.run alone does not)."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained 2 steps in this process, with its checkpoint and config.yaml."""
    run_dir = tmp_path_factory.mktemp("trained")
    cfg = one_rank_config(run_dir, steps=2)
    run(cfg)
    write_run_config(run_dir, cfg.to_dict())
    return run_dir


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A run directory holding weights far from init scale (clear greedy winners, see random_model)."""
    run_dir = tmp_path_factory.mktemp("random")
    write_dcp_model(run_dir / "checkpoints" / "step-0", random_model().state_dict(), TINY_MODEL)
    write_run_config(run_dir, {"model": TINY_MODEL.__dict__, "data": {"tokenizer": str(TOKENIZER)}})
    return run_dir


def expected_tokens(step, max_new_tokens: int = 12) -> list[int]:
    """What the CLI must print: generate() on the step's weights, loaded by hand."""
    model = Transformer(TINY_MODEL).eval()
    model.load_state_dict(read_dcp_model(step))
    tok = build_tokenizer(TOKENIZER)
    prompt = torch.tensor([tok.encode(PROMPT, bos=True, eos=False)])
    return generate(model, prompt, max_new_tokens, stop_tokens=(tok.eos_id, tok.eot_id))[0].tolist()


def test_run_dir_step_folder_and_hf_folder_give_the_same_text(trained_run, tmp_path, capsys):
    step = trained_run / "checkpoints" / "step-2"
    out = main([str(trained_run), *GREEDY])
    printed = capsys.readouterr()
    assert out.tokens == expected_tokens(step) and len(out.tokens) > 0
    assert printed.out == PROMPT + out.text + "\n"
    assert f"{len(out.tokens)} tokens in" in printed.err and "tokens/s" in printed.err
    assert main([str(step), *GREEDY]).tokens == out.tokens
    hf = dcp_to_hf(step, tmp_path / "hf", tokenizer=TOKENIZER)
    assert resolve_source(hf).tokenizer == hf / "tokenizer.json"
    assert main([str(hf), *GREEDY]).text == out.text
    # sampling: a seed gives one text, and bfloat16 runs
    sampled = [
        main([str(hf), "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", s]).tokens for s in "001"
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    assert len(main([str(trained_run), *GREEDY, "--dtype", "bfloat16"]).tokens) > 0


def _load_worker(rank, world, folders):
    """load_model over a 2-rank mesh, from DCP (resharded by DCP) and from a Hugging Face folder (sliced
    here), untied and tied: each rank's shards give the one-process logits."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for folder in folders:
            source = resolve_source(folder, str(TOKENIZER))
            reference = random_model(source.args)(x)
            model = load_model(source, torch.device("cpu"), torch.float32, mesh)
            assert model.layers["0"].feed_forward.w1.weight.to_local().shape[0] == TINY_MODEL.ffn_dim // 2
            assert (model.output.weight is model.tok_embeddings.weight) == source.args.tie_embeddings
            torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tp2(random_run, tmp_path, capsys):
    hf = dcp_to_hf(random_run / "checkpoints" / "step-0", tmp_path / "hf", tokenizer=TOKENIZER)
    tied = ModelArgs(**{**TINY_MODEL.__dict__, "tie_embeddings": True})
    tied_step = write_dcp_model(tmp_path / "tied" / "step-0", random_model(tied).state_dict(), tied)
    spawn_ranks(_load_worker, 2, [random_run, hf, tied_step, dcp_to_hf(tied_step, tmp_path / "tied-hf")])
    one = main([str(random_run), *GREEDY])
    two = main([str(random_run), *GREEDY, "--tp", "2"])  # starts its own 2 ranks
    assert two.tokens == one.tokens == expected_tokens(random_run / "checkpoints" / "step-0")
    printed = capsys.readouterr()
    assert printed.out.count(PROMPT + one.text + "\n") == 2 and "tp=2" in printed.err


def test_errors_name_the_fix(tmp_path, random_run, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--prompt", "x"])
    assert str(e.value.code).startswith(f"error: {tmp_path} is neither a run directory")
    assert "\n" not in str(e.value.code) and "give one of those" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main([str(random_run), "--prompt", "x", "--tp", "3"])
    assert e.value.code == "error: --tp 3 does not divide the model's n_kv_heads=4: use one of [1, 2, 4]"
    for bad, message in (
        (["--temperature", "-1"], "need temperature >= 0"),
        (["--top-p", "0"], "0 < top-p <= 1"),
        (["--max-new-tokens", "0"], "give 1 or more"),
    ):
        with pytest.raises(SystemExit, match=message):
            main([str(random_run), "--prompt", "x", *bad])
    with pytest.raises(SystemExit, match="exceed the rotary table"):
        main([str(random_run), "--prompt", "x", "--max-new-tokens", "300"])
    # a run directory with no checkpoint yet
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": str(TOKENIZER)}}))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--prompt", "x"])
    assert "has no complete checkpoint" in str(e.value.code)
    # a Hugging Face folder exported without its tokenizer: --tokenizer
    hf = dcp_to_hf(random_run / "checkpoints" / "step-0", tmp_path / "hf")
    with pytest.raises(SystemExit) as e:
        main([str(hf), "--prompt", "x"])
    assert "names no tokenizer: give --tokenizer" in str(e.value.code)
    assert len(main([str(hf), *GREEDY, "--tokenizer", str(TOKENIZER)]).tokens) > 0
    capsys.readouterr()
    assert json.loads((hf / "config.json").read_text())["num_key_value_heads"] == 4
