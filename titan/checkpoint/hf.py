"""titan step directories <-> Hugging Face `LlamaForCausalLM` folders (safetensors + config.json, and
the tokenizer when the export is given one).

An export holds about one transformer block plus one safetensors shard in memory; an import reads
one tensor at a time. External weights are read with safetensors: never unpickled.
"""

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.checkpoint.dcp_model import iter_dcp_model, model_args_of, write_dcp_model
from titan.checkpoint.format import begin, commit
from titan.checkpoint.options import EXPORT_DTYPES
from titan.data.tokenizer import build_tokenizer, save_huggingface_tokenizer
from titan.models.llama.args import ModelArgs
from titan.models.llama.hf_adapter import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict

MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size
HF_INDEX = "model.safetensors.index.json"


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
        os.rename(out / files[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.rename(out / tmp, out / final)
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
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """A Hugging Face `LlamaForCausalLM` folder (safetensors + config.json) from a titan step directory,
    committed as a step directory is (an earlier export to `out` is replaced). With `tokenizer` (any
    file `data.tokenizer` takes) the folder also holds it, and config.json its BOS and EOS ids."""
    args = args or model_args_of(step)
    tok = build_tokenizer(tokenizer) if tokenizer is not None else None  # a bad file fails before the work
    out = Path(out)
    partial = begin(out)
    cast = EXPORT_DTYPES[dtype] if dtype else None
    groups = (
        {k: (v.to(cast) if cast else v) for k, v in to_hf_state_dict(group, args).items()}
        for group in iter_dcp_model(Path(step))
    )
    stored = _write_hf_shards(partial, groups, max_shard_bytes)
    config = {**to_hf_config(args), "torch_dtype": stored}
    if tok is not None:
        config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        save_huggingface_tokenizer(tok, partial)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    replaced = commit(partial, out)
    if replaced is not None:
        shutil.rmtree(replaced)
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


def copy_whole_tensors(state: dict[str, torch.Tensor], weights: HFWeights) -> None:
    """Copy each whole tensor `weights[name]` into `state[name]` in place, in its dtype and on its device;
    a DTensor keeps its own piece (every rank read the whole tensor: no communication)."""
    with torch.no_grad():
        for name, target in state.items():
            full = weights[name].to(dtype=target.dtype, device=target.device)
            if isinstance(target, DTensor):
                mesh, placements = target.device_mesh, target.placements
                full = distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
                target = target.to_local()
            target.copy_(full)


def read_hf(folder: Path) -> tuple[HFWeights, ModelArgs]:
    args = from_hf_config(json.loads((Path(folder) / "config.json").read_text()))
    return HFWeights(folder, args), args


def hf_to_dcp(folder: Path, out: Path) -> Path:
    weights, args = read_hf(folder)
    return write_dcp_model(out, {k: weights[k] for k in weights.keys()}, args)
