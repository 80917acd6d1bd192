"""Convert model weights between titan's DCP checkpoints, Hugging Face and Meta's original format.

    python -m titan.tools.convert --help
    python -m titan.tools.convert dcp-to-hf  runs/x/checkpoints/step-1000 exports/x-hf --dtype bfloat16
    python -m titan.tools.convert hf-to-dcp  Llama-3.1-8B/ seeds/llama3-8b/step-0
    python -m titan.tools.convert meta-to-dcp Llama3.1-8B/ seeds/llama3-8b/step-0
    python -m titan.tools.convert dcp-to-meta runs/x/checkpoints/step-1000 exports/x-meta --shards 8
    python -m titan.tools.convert dcp-to-torch runs/x/checkpoints/step-1000 step-1000.pt
    python -m titan.tools.convert seed conf/model/llama3_8b.yaml runs/x/checkpoints/step-0 --seed 0

Every `*-to-dcp` direction (and `seed`) writes a model-only step directory: give it to a run as
`checkpoint.initial_load_path=<dir>`, or place it as `<checkpoint folder>/step-0` so the run starts
from it (a model-only step 0 loads the weights and nothing else). Everything runs in one process on
CPU; DCP checkpoints are read one transformer block at a time, so memory stays near one block (plus
one safetensors shard when writing Hugging Face files).

External weights are read with safetensors or `torch.load(weights_only=True)`: never unpickled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan.checkpoint.manager import EXPORT_DTYPES, PARTIAL_SUFFIX, read_metadata
from titan.models.llama.args import ModelArgs
from titan.models.llama.hf_adapter import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer

MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size
HF_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------- titan DCP


def model_args_of(step: Path) -> ModelArgs:
    file = Path(step) / "model.json"
    if not file.is_file():
        raise FileNotFoundError(f"{step} has no model.json (the model's hyper-parameters); give --model")
    return ModelArgs(**json.loads(file.read_text()))


def load_model_args(path: Path) -> ModelArgs:
    """ModelArgs from a model YAML/JSON node (conf/model/*.yaml, model.json) or a run's config.yaml."""
    import yaml

    node = yaml.safe_load(Path(path).read_text())
    node = node.get("model", node)
    return ModelArgs(**{k: v for k, v in node.items() if not k.startswith("_")})


def _block_of(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.", name)
    return m.group(0) if m else name


def iter_dcp_model(step: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The model weights of a DCP step directory, one transformer block (or top-level tensor) at a time."""
    saved = read_metadata(step).state_dict_metadata
    names = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    if not names:
        raise ValueError(f"{step} holds no model weights")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_block_of(name), []).append(name)
    for group in groups.values():
        state = {
            "model": {
                n: torch.empty(saved[f"model.{n}"].size, dtype=saved[f"model.{n}"].properties.dtype)
                for n in group
            }
        }
        with warnings.catch_warnings():  # that it runs in one process is the point, not news
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=step, no_dist=True)
        yield state["model"]


def read_dcp_model(step: Path) -> dict[str, torch.Tensor]:
    return {k: v for group in iter_dcp_model(step) for k, v in group.items()}


def write_dcp_model(out: Path, weights: dict[str, torch.Tensor], args: ModelArgs) -> Path:
    """A model-only titan step directory of step 0 (committed by renaming, as the trainer's saves are)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output")
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with warnings.catch_warnings():  # one process, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": weights}, checkpoint_id=partial, no_dist=True)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in weights.values()}
    train_state = {
        "step": 0,
        "tokens_seen": 0,
        "model_only": True,
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
    }
    (partial / "train_state.json").write_text(json.dumps(train_state))
    (partial / "model.json").write_text(json.dumps(dataclasses.asdict(args)))
    os.replace(partial, out)
    return out


# -------------------------------------------------------------------------------- Hugging Face


def _write_hf_shards(out: Path, groups: Iterator[dict[str, torch.Tensor]], max_shard_bytes: int) -> str:
    """Safetensors files of at most `max_shard_bytes` (one tensor may exceed it), and the index when
    there is more than one file. Returns the weights' dtype name."""
    files: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    dtypes = set()

    def flush():
        nonlocal shard, size
        if shard:
            name = f"shard-{len(files):05d}.tmp"  # renamed once the number of files is known
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size = {}, 0

    for group in groups:
        for name, tensor in group.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[name] = tensor.contiguous()
            size, total = size + nbytes, total + nbytes
            dtypes.add(str(tensor.dtype).removeprefix("torch."))
    flush()
    if len(files) == 1:
        os.replace(out / files[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(out / tmp, out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / HF_INDEX).write_text(json.dumps(index, indent=2))
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def dcp_to_hf(
    step: Path,
    out: Path,
    *,
    dtype: str | None = None,
    args: ModelArgs | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """A Hugging Face `LlamaForCausalLM` folder (safetensors + config.json) from a titan step directory."""
    args = args or model_args_of(step)
    out = Path(out)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cast = EXPORT_DTYPES[dtype] if dtype else None
    groups = (
        {k: (v.to(cast) if cast else v) for k, v in to_hf_state_dict(group, args).items()}
        for group in iter_dcp_model(Path(step))
    )
    stored = _write_hf_shards(partial, groups, max_shard_bytes)
    config = {**to_hf_config(args), "torch_dtype": stored}
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)  # an earlier export of the same step
    os.replace(partial, out)
    return out


class HFWeights:
    """A Hugging Face folder's weights under titan's names and layout, read one tensor at a time."""

    def __init__(self, folder: Path, args: ModelArgs):
        self.folder, self.args = Path(folder), args
        self._file_of: dict[str, Path] = {}
        self._hf_name: dict[str, str] = {}  # titan name -> Hugging Face name
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for hf_name in f.keys():
                    self._file_of[hf_name] = file
                    # Names from the adapter itself, on a shape-only tensor (no data is read).
                    probe = torch.empty(f.get_slice(hf_name).get_shape(), device="meta")
                    for titan_name in from_hf_state_dict({hf_name: probe}, args):
                        self._hf_name[titan_name] = hf_name

    def keys(self):
        return self._hf_name.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._hf_name

    def __getitem__(self, name: str) -> torch.Tensor:
        hf_name = self._hf_name[name]
        with safe_open(str(self._file_of[hf_name]), framework="pt") as f:
            tensor = f.get_tensor(hf_name)
        return from_hf_state_dict({hf_name: tensor}, self.args)[name]


def read_hf(folder: Path) -> tuple[HFWeights, ModelArgs]:
    args = from_hf_config(json.loads((Path(folder) / "config.json").read_text()))
    return HFWeights(folder, args), args


def hf_to_dcp(folder: Path, out: Path) -> Path:
    weights, args = read_hf(folder)
    return write_dcp_model(out, {k: weights[k] for k in weights.keys()}, args)


# ----------------------------------------------------------------------------- Meta's originals

# How Meta's model-parallel code splits each weight over the `consolidated.NN.pth` files:
# ColumnParallelLinear on dim 0 (output features), RowParallelLinear on dim 1 (input features);
# norms are replicated. The embedding is VocabParallelEmbedding (dim 0) in Llama 3's code and
# ParallelEmbedding (dim 1) in Llama 2's; reading tells them apart by shape.
_COLUMN = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
)
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
# (multiple_of, ffn_dim_multiplier) of Meta's published params.json files, tried first on export.
_PUBLISHED_FFN = ((1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0), (256, None))
# Llama 3.1's rope scaling constants that params.json cannot express (Meta's code fixes them).
_META_FIXED_ROPE = {"rope_low_freq_factor": 1.0, "rope_original_max_seq_len": 8192}


def _split_dim(name: str, embedding_dim: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_dim
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None  # replicated


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params_to_args(
    params: dict, *, tie_embeddings: bool, max_seq_len: int = 131072, rope_scaling_factor: float | None = None
) -> ModelArgs:
    scaled = params.get("use_scaled_rope", False)
    return ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=params["vocab_size"],
        ffn_dim=meta_ffn_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0)),
        # Llama 3.1's factor 8 unless params.json says otherwise (Llama 3.2 1B/3B use 32).
        rope_scaling_factor=float(rope_scaling_factor or params.get("rope_scaling_factor") or 8.0)
        if scaled
        else 0.0,
        rope_high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
        max_seq_len=max_seq_len,
        tie_embeddings=tie_embeddings,
    )


def args_to_meta_params(args: ModelArgs) -> dict:
    if args.rope_scaling_factor:
        fixed = {k: getattr(args, k) for k in _META_FIXED_ROPE if getattr(args, k) != _META_FIXED_ROPE[k]}
        if fixed:
            raise ValueError(f"Meta's params.json cannot express {fixed} (its code fixes {_META_FIXED_ROPE})")
    base = int(2 * 4 * args.dim / 3)
    # An exact (multiple_of, multiplier) for any ffn_dim: round up to ffn_dim itself.
    fallback = (args.ffn_dim, None if base <= args.ffn_dim else args.ffn_dim / base)
    multiple_of, multiplier = next(
        c for c in (*_PUBLISHED_FFN, fallback) if meta_ffn_dim(args.dim, *c) == args.ffn_dim
    )
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": bool(args.rope_scaling_factor),
    }
    if args.rope_scaling_factor:
        params["rope_scaling_factor"] = args.rope_scaling_factor
        params["rope_high_freq_factor"] = args.rope_high_freq_factor
    return params


def read_meta(
    folder: Path, *, max_seq_len: int = 131072, rope_scaling_factor: float | None = None
) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Meta's `consolidated.NN.pth` shards + `params.json` -> one titan state dict and its ModelArgs."""
    folder = Path(folder)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no consolidated.*.pth files")
    params = json.loads((folder / "params.json").read_text())
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    first = shards[0]
    embedding = first["tok_embeddings.weight"]
    embedding_dim = 0 if embedding.shape[0] * len(shards) == params["vocab_size"] else 1
    weights = {}
    for name in first:
        if name == "rope.freqs":  # Llama 2 stored its rotary table; titan derives it
            continue
        dim = _split_dim(name, embedding_dim)
        weights[name] = (
            first[name].clone()
            if dim is None or len(shards) == 1
            else torch.cat([s[name] for s in shards], dim=dim)
        )
    args = meta_params_to_args(
        params,
        tie_embeddings="output.weight" not in weights,
        max_seq_len=max_seq_len,
        rope_scaling_factor=rope_scaling_factor,
    )
    if args.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights, args


def write_meta(
    weights: dict[str, torch.Tensor], args: ModelArgs, out: Path, *, shards: int = 1, embedding_dim: int = 0
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in weights.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        dim = _split_dim(name, embedding_dim)
        if dim is not None and tensor.shape[dim] % shards:
            raise ValueError(
                f"{name} {list(tensor.shape)} does not split into {shards} model-parallel shards"
            )
        parts = [tensor] * shards if dim is None else tensor.chunk(shards, dim=dim)
        for piece, part in zip(pieces, parts):
            piece[name] = part.clone()
    for i, piece in enumerate(pieces):
        torch.save(piece, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(args_to_meta_params(args), indent=2))
    return out


# ------------------------------------------------------------------------------------------ seed


def seed_checkpoint(args: ModelArgs, out: Path, *, seed: int = 0) -> Path:
    """Step 0 of a run, made on one process with the trainer's initialisation (same seed, same weights)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    init_weights(model, args, seed=seed, device=torch.device("cpu"))
    return write_dcp_model(out, model.state_dict(), args)


# ------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titan.tools.convert",
        description=__doc__,
        epilog="Run `python -m titan.tools.convert <direction> --help` for each direction's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="direction", required=True, metavar="direction")

    p = sub.add_parser(
        "dcp-to-hf", help="titan DCP step directory -> Hugging Face folder (safetensors + config.json)"
    )
    p.add_argument("step", type=Path, help="a complete step directory, e.g. runs/x/checkpoints/step-1000")
    p.add_argument("out", type=Path, help="the folder to write (LlamaForCausalLM.from_pretrained loads it)")
    p.add_argument("--dtype", choices=list(EXPORT_DTYPES), help="cast the weights (default: as saved)")
    p.add_argument("--model", type=Path, help="model YAML/JSON, if the step directory has no model.json")

    p = sub.add_parser("hf-to-dcp", help="Hugging Face Llama folder -> model-only titan step directory")
    p.add_argument("hf", type=Path, help="a folder with config.json and *.safetensors")
    p.add_argument("out", type=Path, help="the step directory to write")

    p = sub.add_parser(
        "meta-to-dcp",
        help="Meta's original checkpoint (consolidated.NN.pth + params.json) -> model-only titan step directory",
    )
    p.add_argument(
        "meta",
        type=Path,
        help="a folder with params.json and consolidated.NN.pth (one per model-parallel rank)",
    )
    p.add_argument("out", type=Path, help="the step directory to write")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=131072,
        help="longest sequence of the rotary table (default 131072)",
    )
    p.add_argument(
        "--rope-scaling-factor", type=float, help="when params.json has none (Llama 3.2 1B/3B: 32; default 8)"
    )

    p = sub.add_parser("dcp-to-meta", help="titan DCP step directory -> Meta's original format")
    p.add_argument("step", type=Path, help="a complete step directory")
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="model-parallel ranks (consolidated.NN.pth files; 8B: 1, 70B: 8)",
    )
    p.add_argument(
        "--embedding-dim",
        type=int,
        choices=(0, 1),
        default=0,
        help="how the embedding is split: 0 (Llama 3) or 1 (Llama 2)",
    )
    p.add_argument("--model", type=Path, help="model YAML/JSON, if the step directory has no model.json")

    p = sub.add_parser(
        "dcp-to-torch", help="titan DCP step directory -> one torch.save file (everything it holds)"
    )
    p.add_argument("step", type=Path, help="a complete step directory")
    p.add_argument(
        "out", type=Path, help="the .pt file to write; read it with torch.load(..., weights_only=True)"
    )

    p = sub.add_parser(
        "seed", help="a step-0 checkpoint made on one process, for runs of any layout to start from"
    )
    p.add_argument(
        "model", type=Path, help="model YAML (conf/model/*.yaml), model.json, or a run's config.yaml"
    )
    p.add_argument("out", type=Path, help="the step directory to write, e.g. <run dir>/checkpoints/step-0")
    p.add_argument(
        "--seed", type=int, default=0, help="training.seed of the runs that will use it (default 0)"
    )
    return parser


def main(argv: list[str] | None = None) -> Path:
    a = _parser().parse_args(argv)
    model = load_model_args(a.model) if getattr(a, "model", None) and a.direction != "seed" else None
    if a.direction == "dcp-to-hf":
        out = dcp_to_hf(a.step, a.out, dtype=a.dtype, args=model)
    elif a.direction == "hf-to-dcp":
        out = hf_to_dcp(a.hf, a.out)
    elif a.direction == "meta-to-dcp":
        weights, args = read_meta(
            a.meta, max_seq_len=a.max_seq_len, rope_scaling_factor=a.rope_scaling_factor
        )
        out = write_dcp_model(a.out, weights, args)
    elif a.direction == "dcp-to-meta":
        out = write_meta(
            read_dcp_model(a.step),
            model or model_args_of(a.step),
            a.out,
            shards=a.shards,
            embedding_dim=a.embedding_dim,
        )
    elif a.direction == "dcp-to-torch":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        dcp_to_torch_save(a.step, a.out)
        out = a.out
    else:
        out = seed_checkpoint(load_model_args(a.model), a.out, seed=a.seed)
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
