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

import argparse
import sys
from pathlib import Path

import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan.checkpoint.dcp_model import model_args_of, read_dcp_model, write_dcp_model
from titan.checkpoint.hf import dcp_to_hf, hf_to_dcp
from titan.checkpoint.meta import read_meta, write_meta
from titan.checkpoint.options import EXPORT_DTYPES
from titan.checkpoint.seed import seed_checkpoint
from titan.models.llama.args import ModelArgs


def load_model_args(path: Path) -> ModelArgs:
    """ModelArgs from a model YAML/JSON node (conf/model/*.yaml, model.json) or a run's config.yaml."""
    node = yaml.safe_load(Path(path).read_text())
    node = node.get("model", node)
    return ModelArgs(**{k: v for k, v in node.items() if not k.startswith("_")})


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
    p.add_argument(
        "--tokenizer",
        help="the tokenizer to write beside the weights (default: the run's data.tokenizer, read from the "
        "config.yaml of the run the step directory belongs to; 'none': no tokenizer)",
    )

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


def run_tokenizer(step: Path) -> str | None:
    """The data.tokenizer of the run a step directory belongs to (<run dir>/checkpoints/step-N), if any."""
    for config in (step.parent.parent / "config.yaml", step.parent / "config.yaml"):
        if config.is_file():
            return (yaml.safe_load(config.read_text()).get("data") or {}).get("tokenizer")
    return None


def main(argv: list[str] | None = None) -> Path:
    a = _parser().parse_args(argv)
    model = load_model_args(a.model) if getattr(a, "model", None) and a.direction != "seed" else None
    if a.direction == "dcp-to-hf":
        tokenizer = run_tokenizer(a.step) if a.tokenizer is None else a.tokenizer
        tokenizer = None if tokenizer in (None, "none") else tokenizer
        out = dcp_to_hf(a.step, a.out, dtype=a.dtype, args=model, tokenizer=tokenizer)
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
