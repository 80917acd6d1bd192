"""Document masking (training.attention=block_causal): a packed window computes what each of its
documents computes alone, under one process, FSDP, TP and every pipeline schedule; dropping the mask
changes it; FlexAttention's forward equals the SDPA-mask path."""

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.multirank import spawn_ranks
from tests.utils import TINY_MODEL, check_loss_falls, read_metrics, read_model, tiny_config
from titan.config.errors import ConfigError
from titan.config.schema import ParallelismConfig
from titan.distributed.mesh import ParallelDims
from titan.distributed.pipeline import SCHEDULES
from titan.launch.local import launch_local
from titan.launch.validate import validate
from titan.models.llama.attention import block_causal, document_ids, flex_block_causal, masked, sdpa
from titan.models.llama.init import init_weights
from titan.models.llama.model import Transformer
from titan.models.llama.pipeline import build_pipeline
from titan.train.build_model import build_model
from titan.train.loss import cross_entropy_sum

BOS = 7
# Three documents (and the tail of one begun in an earlier window) in a window of 32 tokens.
LENGTHS = (5, 9, 11, 7)


def packed_window() -> tuple[torch.Tensor, list[slice]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(BOS + 1, TINY_MODEL.vocab_size, (1, sum(LENGTHS)), generator=g)
    spans, start = [], 0
    for i, length in enumerate(LENGTHS):
        if i > 0:  # every document but the first (a tail) starts with BOS
            tokens[0, start] = BOS
        spans.append(slice(start, start + length))
        start += length
    return tokens, spans


def model() -> Transformer:
    m = Transformer(TINY_MODEL)
    init_weights(m, TINY_MODEL, seed=0, device=torch.device("cpu"))
    return m


def test_document_ids_and_mask():
    tokens, spans = packed_window()
    ids = document_ids(tokens, BOS)
    assert [ids[0, s].unique().tolist() for s in spans] == [[0], [1], [2], [3]]
    mask = block_causal(ids)[0, 0]
    assert mask[6, 5] and mask[6, 6] and not mask[6, 7] and not mask[5, 4]  # 5 starts document 1


def test_a_packed_window_computes_each_document_alone():
    """fp32: RoPE's scores depend on relative positions only, so a document's logits do not depend on
    where it sits in the window; they differ by rounding only (1e-5)."""
    tokens, spans = packed_window()
    m = model()
    packed = m(tokens, document_ids(tokens, BOS))
    loss = cross_entropy_sum(packed[:, :-1], tokens[:, 1:].masked_fill(tokens[:, 1:] == BOS, -100))
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    total = 0
    for s in spans:
        alone = m(tokens[:, s])
        torch.testing.assert_close(packed[:, s], alone, rtol=1e-5, atol=1e-5)
        total = total + cross_entropy_sum(alone[:, :-1], tokens[:, s][:, 1:])
    total.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_without_the_mask_documents_see_each_other():
    tokens, spans = packed_window()
    m = model()
    with torch.no_grad():
        masked_logits, plain = m(tokens, document_ids(tokens, BOS)), m(tokens)
    assert torch.equal(masked_logits[:, spans[0]], plain[:, spans[0]])  # the first document sees no other
    assert (masked_logits[:, spans[2]] - plain[:, spans[2]]).abs().max() > 1e-3


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_forward_equals_the_sdpa_mask(compiled):
    """On CPU FlexAttention runs forward only (no backward in torch 2.13): checked under no_grad."""
    tokens, _ = packed_window()
    ids = document_ids(tokens.expand(2, -1), BOS)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, ids.shape[1], 16, generator=g)
    k, v = (torch.randn(2, 4, ids.shape[1], 16, generator=g) for _ in range(2))
    with torch.no_grad():
        reference = sdpa(q, k, v, attn_mask=block_causal(ids))
        if compiled:
            out = masked(q, k, v, flex_block_causal(ids))
        else:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=flex_block_causal(ids), enable_gqa=True)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=5e-6)


def _layout_equals_one_process(rank, world, parallelism, training=None):
    cfg = tiny_config("/unused", parallelism=parallelism, training=training or {})
    dims = ParallelDims.resolve(cfg.parallelism, world)
    (sharded,), _ = build_model(cfg, dims, dims.build_meshes("cpu"), torch.device("cpu"), cross_entropy_sum)
    reference = model()
    tokens, _ = packed_window()
    ids = document_ids(tokens, BOS)
    out = sharded(tokens, ids)
    out = out.full_tensor() if isinstance(out, DTensor) else out
    expected = reference(tokens, ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    # TP adds the heads' and hidden units' partial products in another order: gradients of size ~0.1
    # then differ in the 5th digit, here and there.
    for (name, p), (_, q) in zip(sharded.named_parameters(), reference.named_parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(
            grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("parallelism", [{"dp_shard": 2}, {"dp_shard": 1, "tp": 2}], ids=["fsdp", "tp2"])
def test_layouts_equal_one_process(parallelism):
    spawn_ranks(_layout_equals_one_process, 2, parallelism)


@pytest.mark.parametrize(
    "training",
    [{"ac": "full"}, {"ac": "op"}, {"compile": True, "compile_backend": "aot_eager", "ac": "op"}],
    ids=["ac-full", "ac-op", "compiled-ac-op"],
)
def test_activation_checkpointing_and_compile_keep_the_mask(training):
    """The mask reaches recomputed and compiled blocks: the logits and gradients of the plain model."""
    spawn_ranks(_layout_equals_one_process, 1, {"dp_shard": 1}, training)


def test_training_with_document_masking_lowers_the_loss(tmp_path):
    check_loss_falls(tmp_path, training={"attention": "block_causal"})


# ---- pipeline parallelism: every stage gets the documents of its microbatch ----

# One packed window of 32 input tokens per row, each row cut differently, so that a stage given
# another microbatch's documents, or none, attends across documents somewhere. The first document of
# a row is the tail of one begun earlier (no BOS); (32,) is a window without a document start.
ROW_LENGTHS = ((5, 9, 11, 7), (16, 16), (3, 20, 9), (32,))


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, list[list[slice]]]:
    """inputs and labels [rows, 32], the labels of each document's last token (the next one's BOS)
    ignored (-100); and the spans of every row's documents."""
    g = torch.Generator().manual_seed(1)
    window = torch.randint(BOS + 1, TINY_MODEL.vocab_size, (len(ROW_LENGTHS), 33), generator=g)
    spans = []
    for row, lengths in enumerate(ROW_LENGTHS):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        window[row, starts[1:]] = BOS
        spans.append([slice(start, start + n) for start, n in zip(starts, lengths)])
    labels = window[:, 1:].masked_fill(window[:, 1:] == BOS, -100)
    return window[:, :-1], labels, spans


def each_document_alone() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One process, every document of the batch on its own: logits [rows, 32, vocab] put back in
    place, the loss summed over all tokens, and the gradients of that sum."""
    inputs, labels, spans = packed_batch()
    m = model()
    logits = torch.empty(*inputs.shape, TINY_MODEL.vocab_size)
    total = 0
    for row, row_spans in enumerate(spans):
        for s in row_spans:
            alone = m(inputs[row : row + 1, s])
            logits[row : row + 1, s] = alone.detach()
            total = total + cross_entropy_sum(alone, labels[row : row + 1, s])
    total.backward()
    return logits, total.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def _pipeline_worker(rank, world, out_dir, schedule):
    inputs, labels, _ = packed_batch()
    cfg = ParallelismConfig(pp=world, pp_schedule=schedule)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    pipeline = build_pipeline(TINY_MODEL, cfg, mesh, local_batch=inputs.shape[0])
    state = model().state_dict()
    for part in pipeline.model_parts:
        part.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in part.named_parameters():
                p.copy_(state[name])
        part.init_rope()
    seen = []  # the last stage's (logits, labels) of every microbatch, in the order they ran

    def loss_fn(logits, labels):
        seen.append((logits.detach(), labels))
        return cross_entropy_sum(logits, labels)

    pipeline.build_schedule(torch.device("cpu"), loss_fn)
    loss = pipeline.step(inputs, labels, grad_scale=1.0, documents=document_ids(inputs, BOS))
    n = pipeline.plan.n_microbatches
    logits = None
    if pipeline.has_last_stage:  # torch's first step runs microbatch 0 once more, first: keep the last n
        assert torch.equal(torch.cat([lab for _, lab in seen[-n:]]), labels), "microbatches out of order"
        logits = torch.cat([out for out, _ in seen[-n:]])
    grads = {name: p.grad for part in pipeline.model_parts for name, p in part.named_parameters()}
    torch.save({"loss": loss, "logits": logits, "grads": grads}, Path(out_dir) / f"{rank}.pt")


# 1F1B runs in the fast suite; the other schedules are slow (each spawns two ranks).
PIPELINE_SCHEDULES = [s if s == "1F1B" else pytest.param(s, marks=pytest.mark.slow) for s in SCHEDULES]


@pytest.mark.parametrize("schedule", PIPELINE_SCHEDULES)
def test_pipeline_computes_each_document_alone(tmp_path, schedule):
    """pp=2: the logits and gradients of packed windows, cut into microbatches and stages, equal those
    of each document run alone in one process, within the one-process tolerance above (fp32; logits
    1e-5, gradients 1e-4 relative + 1e-6). A stage run without the mask, or with another microbatch's,
    lets tokens see other documents: differences of 1e-2 and more."""
    spawn_ranks(_pipeline_worker, 2, str(tmp_path), schedule)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    logits, loss, grads = each_document_alone()
    (last,) = [r for r in ranks if r["logits"] is not None]
    torch.testing.assert_close(last["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last["loss"], loss, rtol=1e-5, atol=0)
    got = {}
    for r in ranks:
        assert not got.keys() & r["grads"].keys(), "a parameter lives on two pipeline ranks"
        got.update(r["grads"])
    assert got.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---- the trainer under pipeline parallelism (two ranks, 1F1B) ----

PP2 = {"dp_shard": 1, "pp": 2}


def test_launch_takes_pipeline_parallelism_and_refuses_context_parallelism(tmp_path):
    block_causal = {"attention": "block_causal"}
    assert validate(tiny_config(tmp_path, parallelism=PP2, training=block_causal), 2).pp == 2
    with pytest.raises(ConfigError, match="block_causal with parallelism.cp=2"):
        validate(tiny_config(tmp_path, parallelism={"dp_shard": 1, "cp": 2}, training=block_causal), 2)


@pytest.mark.slow
def test_pipeline_training_with_document_masking_lowers_the_loss(tmp_path):
    """check_loss_falls' run (30 AdamW steps, tiny model, C4 sample) on two pipeline stages."""
    cfg = tiny_config(
        tmp_path,
        steps=30,
        parallelism=PP2,
        training={"attention": "block_causal"},
        optimizer={"name": "adamw", "lr": 3e-3},
        checkpoint={"enable": False},
    )
    launch_local(cfg, nproc=2)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert abs(losses[0] - 7.74) < 0.3, losses[0]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8, losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, parallelism, nproc",
    [("pp2", PP2, 2), ("pp2_tp2", {**PP2, "tp": 2}, 4), ("pp2_fsdp2", {"dp_shard": 2, "pp": 2}, 4)],
)
def test_pipeline_with_document_masking_matches_single_process(tmp_path, layout, parallelism, nproc):
    """test_parity's setting (3 SGD steps, fp32) and tolerance: losses and grad norms within 1e-5
    relative, weights within 1e-5 absolute. The loader's windows hold document starts, so a stage
    attending across documents moves the losses by more. With TP each stage's mask meets sharded heads;
    with FSDP each dp rank's stages get their own batch's documents."""
    metrics, weights = [], []
    for name, layout_parallelism, ranks in (("single", {"dp_shard": 1}, 1), (layout, parallelism, nproc)):
        run_dir = tmp_path / name
        cfg = tiny_config(run_dir, parallelism=layout_parallelism, training={"attention": "block_causal"})
        launch_local(cfg, nproc=ranks)
        metrics.append(read_metrics(run_dir))
        weights.append(read_model(run_dir, cfg.training.steps))
    (want, got), (ref_model, model) = metrics, weights
    assert [m["step"] for m in got] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
    assert got[-1]["loss"] < got[0]["loss"]
    assert model.keys() == ref_model.keys()
    for name, tensor in model.items():
        torch.testing.assert_close(tensor, ref_model[name], rtol=0, atol=1e-5, msg=name)
