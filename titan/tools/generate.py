"""Generate text from a trained model, with a KV cache, on one process or tensor-parallel ranks.

    python -m titan.tools.generate runs/x --prompt "The capital of France is"
    python -m titan.tools.generate runs/x/checkpoints/step-1000 --prompt "..." --temperature 0 --max-new-tokens 32
    python -m titan.tools.generate exports/x-hf --prompt "..." --tp 2 --dtype bfloat16
    torchrun --nproc-per-node 2 -m titan.tools.generate runs/x --prompt "..." --tp 2

The source is a run directory (its latest complete checkpoint, and the tokenizer its config.yaml names),
a checkpoint step folder (`step-N`: its model.json, and the tokenizer of the run it belongs to) or a
Hugging Face folder (config.json + *.safetensors, and the tokenizer.json or tokenizer.model that titan's
export writes beside them). The text (prompt and continuation) goes to stdout, the speed to stderr.

--tp N > 1 shards the model over N ranks (heads and hidden units split, logits gathered): run under
torchrun with N processes, or alone, and it starts the N local ranks itself (torch's elastic launcher,
as launch.py does). On CUDA each rank takes the GPU of its local rank (NCCL), on CPU gloo.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.device_mesh import init_device_mesh

from titan.checkpoint.dcp_model import model_args_of
from titan.checkpoint.format import checkpoint_folder, complete_steps, read_owner, step_dir
from titan.checkpoint.hf import copy_whole_tensors, read_hf
from titan.data.tokenizer import build_tokenizer
from titan.models.llama.args import ModelArgs
from titan.models.llama.generation import generate
from titan.models.llama.hf_adapter import from_hf_config
from titan.models.llama.model import Transformer
from titan.models.llama.tp_inference import apply_tp_inference, check_tp_inference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the weights are (`kind` "dcp": a step folder; "hf": a Hugging Face folder), the model's
    hyper-parameters and the tokenizer file."""

    kind: str
    path: Path
    args: ModelArgs
    tokenizer: Path


@dataclasses.dataclass(frozen=True)
class Generated:
    text: str  # the continuation only
    tokens: list[int]  # its token ids
    prompt_tokens: int
    seconds: float  # prefill and decoding

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds


def _run_config(step: Path) -> dict | None:
    """The saved config.yaml of the run a step folder belongs to: <run dir>/checkpoints/step-N, or the run
    its checkpoint folder's owner.json names (a `checkpoint.folder` elsewhere)."""
    owner = read_owner(step.parent) if (step.parent / "owner.json").is_file() else None
    for run_dir in (step.parent.parent, Path(owner["run_dir"]) if owner else None):
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return None


def _config_model_args(config: dict) -> ModelArgs:
    return ModelArgs(**{k: v for k, v in (config.get("model") or {}).items() if not k.startswith("_")})


def _tokenizer_or_fail(found: str | Path | None, where: str, given: str | None) -> Path:
    if given:
        return Path(given)
    if not found:
        raise ValueError(
            f"{where} names no tokenizer: give --tokenizer <tiktoken, sentencepiece or tokenizer.json>"
        )
    return Path(found)


def resolve_source(path: Path, tokenizer: str | None = None) -> Source:
    """What `path` is (a run directory, a step folder or a Hugging Face folder) and what it holds."""
    path = Path(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        args = from_hf_config(json.loads((path / "config.json").read_text()))
        found = next((path / f for f in ("tokenizer.json", "tokenizer.model") if (path / f).is_file()), None)
        return Source(
            "hf", path, args, _tokenizer_or_fail(found, f"the Hugging Face folder {path}", tokenizer)
        )
    if (path / ".metadata").is_file():  # a DCP step folder
        config = _run_config(path)
        if (path / "model.json").is_file():
            args = model_args_of(path)
        elif config is not None:
            args = _config_model_args(config)
        else:
            raise ValueError(
                f"{path} has no model.json and no run config.yaml beside it: give its run directory"
            )
        found = ((config or {}).get("data") or {}).get("tokenizer")
        where = f"the run config.yaml of {path}" if config is not None else f"{path} (no run config.yaml)"
        return Source("dcp", path, args, _tokenizer_or_fail(found, where, tokenizer))
    if (path / "config.yaml").is_file():  # a run directory
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        folder = checkpoint_folder(path, (config.get("checkpoint") or {}).get("folder"))
        steps = complete_steps(folder)
        if not steps:
            raise ValueError(
                f"the run directory {path} has no complete checkpoint in {folder}: train until one is saved "
                "(checkpoint.interval), or give a step folder or a Hugging Face folder"
            )
        step = step_dir(folder, steps[-1])
        args = model_args_of(step) if (step / "model.json").is_file() else _config_model_args(config)
        found = (config.get("data") or {}).get("tokenizer")
        return Source("dcp", step, args, _tokenizer_or_fail(found, f"{path}/config.yaml", tokenizer))
    raise ValueError(
        f"{path} is neither a run directory (config.yaml), a checkpoint step folder (.metadata, "
        "e.g. <run>/checkpoints/step-N) nor a Hugging Face folder (config.json and *.safetensors): give one of those"
    )


def load_full_tensors(model: Transformer, weights) -> None:
    """Copy whole tensors (`weights[name]`) into the model, each rank keeping its own shard."""
    state = model.state_dict()
    missing = [name for name in state if name not in weights]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} of the model's tensors, e.g. {missing[0]}")
    copy_whole_tensors(state, weights)


def load_model(source: Source, device: torch.device, dtype: torch.dtype, tp_mesh=None) -> Transformer:
    """The model, sharded over `tp_mesh` when given, with the source's weights."""
    with torch.device("meta"):
        model = Transformer(source.args).to(dtype)
    if tp_mesh is not None:
        apply_tp_inference(model, tp_mesh)
    model.to_empty(device=device)
    model.init_rope(device)  # float32 whatever the weights' dtype, as in training
    if source.kind == "dcp":
        # DCP reads each rank's shard (resharded from the layout it was saved in) and casts to `dtype`.
        with warnings.catch_warnings():  # that one process loads alone is the point, not news
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": model.state_dict()}, checkpoint_id=source.path, no_dist=tp_mesh is None)
    else:
        load_full_tensors(model, read_hf(source.path)[0])
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Request:
    source: Source
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    tp: int
    dtype: str


def generate_on_rank(request: Request) -> Generated:
    """One rank's part (the only one at tp=1): load, shard, generate. Every rank returns the same tokens."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    tp_mesh = None
    if request.tp > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        tp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    try:
        tokenizer = build_tokenizer(request.source.tokenizer)
        model = load_model(request.source, device, DTYPES[request.dtype], tp_mesh)
        prompt = torch.tensor([tokenizer.encode(request.prompt, bos=True, eos=False)], device=device)
        # Seeded alike on every rank: the ranks sample the same tokens from the same gathered logits.
        generator = torch.Generator(device).manual_seed(request.seed)
        stops = tuple(t for t in (tokenizer.eos_id, getattr(tokenizer, "eot_id", None)) if t is not None)
        start = time.perf_counter()
        new = generate(
            model,
            prompt,
            request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            generator=generator,
            stop_tokens=stops,
        )[0].tolist()  # (a host sync: the timing is complete)
        seconds = time.perf_counter() - start
        return Generated(tokenizer.decode(new), new, prompt.shape[1], seconds)
    finally:
        if tp_mesh is not None:
            dist.destroy_process_group()


def launch_ranks(request: Request) -> Generated:
    """`request.tp` local ranks under torch's elastic launcher (the API behind torchrun); rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from titan.launch.local import single_node_config
    from titan.tools import generate as this  # by module name: the spawned ranks import it

    try:
        return elastic_launch(single_node_config(request.tp), this.generate_on_rank)(request)[0]
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        sys.exit(f"error: rank {rank} failed (exit code {failure.exitcode}); its traceback is above")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titan.tools.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=Path, help="a run directory, a checkpoint step folder or a Hugging Face folder"
    )
    parser.add_argument("--prompt", required=True, help="the text to continue (a BOS token goes before it)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many (default 64)")
    parser.add_argument(
        "--temperature", type=float, default=0.6, help="0: greedy; default 0.6 (Meta's example)"
    )
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="of the sampling generator (default 0)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (dividing n_kv_heads)")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="of the weights (default float32)"
    )
    parser.add_argument("--tokenizer", help="the tokenizer file, when the source names none")
    return parser


def main(argv: list[str] | None = None) -> Generated:
    a = _parser().parse_args(argv)
    world = os.environ.get("WORLD_SIZE")
    try:
        source = resolve_source(a.source, a.tokenizer)
        check_tp_inference(source.args.n_kv_heads, a.tp)
        if world is not None and int(world) != a.tp:
            raise ValueError(
                f"--tp {a.tp} under torchrun with {world} processes: give --nproc-per-node {a.tp}"
            )
        if a.temperature < 0 or not 0 < a.top_p <= 1:
            raise ValueError(
                f"--temperature {a.temperature} --top-p {a.top_p}: need temperature >= 0, 0 < top-p <= 1"
            )
        if a.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {a.max_new_tokens}: give 1 or more")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    request = Request(source, a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.tp, a.dtype)
    try:
        out = launch_ranks(request) if a.tp > 1 and world is None else generate_on_rank(request)
    except ValueError as e:  # e.g. the prompt and the new tokens exceed model.max_seq_len
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(a.prompt + out.text, flush=True)
        print(
            f"{len(out.tokens)} tokens in {out.seconds:.2f} s: {out.tokens_per_second:.1f} tokens/s "
            f"(prompt {out.prompt_tokens} tokens, tp={a.tp}, {a.dtype}, {source.path})",
            file=sys.stderr,
        )
    return out


if __name__ == "__main__":
    main()
