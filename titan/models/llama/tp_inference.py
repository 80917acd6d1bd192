"""Tensor parallelism for generation: tp.py's Megatron column/row plan without sequence parallelism.

A decode step has one token, so there is no sequence to shard: activations stay replicated between
blocks. Attention splits heads (wq/wk/wv column-wise, wo row-wise) and the feed-forward its hidden units
(w1/w3 column-wise, w2 row-wise), each ending in one all-reduce; the norms and the rotary table are
replicated. The embedding is row-wise over the vocabulary and the output column-wise, its logits gathered
on every rank, so every rank samples the same token. Each rank's KV cache holds its own kv heads.
"""

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from titan.models.llama.model import Transformer


def check_tp_inference(n_kv_heads: int, tp: int) -> None:
    """Each rank must hold whole kv heads (and so whole groups of query heads)."""
    if tp < 1 or n_kv_heads % tp:
        divisors = [d for d in range(1, n_kv_heads + 1) if n_kv_heads % d == 0]
        raise ValueError(
            f"--tp {tp} does not divide the model's n_kv_heads={n_kv_heads}: use one of {divisors}"
        )


def apply_tp_inference(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard `model` over `tp_mesh` for generation, in place (before or after its weights are loaded)."""
    check_tp_inference(model.args.n_kv_heads, tp_mesh.size())
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    for block in model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Replicate()),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Replicate()),
                "feed_forward.w3": ColwiseParallel(),
            },
        )
