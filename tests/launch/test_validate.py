import pytest

from titan.config.errors import ConfigError
from titan.config.schema import RunConfig
from titan.launch.validate import validate


def base() -> RunConfig:
    return RunConfig().replace(data={"path": "unused", "tokenizer": "unused"})


def test_valid_default_gives_parallel_dims():
    dims = validate(base(), world=4)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (1, 4, 4)


def test_global_batch_not_divisible_names_keys_and_fix():
    cfg = base().replace(training={"global_batch_size": 10, "micro_batch_size": 2})
    with pytest.raises(ConfigError) as e:
        validate(cfg, world=4)
    assert (
        "training.global_batch_size=10 is not divisible by dp=4 x training.micro_batch_size=2; use 8 or 16"
        in str(e.value)
    )


def test_degrees_must_multiply_to_world_size():
    cfg = base().replace(parallelism={"dp_shard": 3})
    with pytest.raises(
        ConfigError, match=r"dp_replicate=1 x dp_shard=3 x cp=1 x tp=1 x pp=1 = 3, but the world size .* is 4"
    ):
        validate(cfg, world=4)


@pytest.mark.parametrize(
    "group,key,value",
    [
        ("training", "ac", "sometimes"),
        ("training", "param_dtype", "float8"),
        ("optimizer", "schedule", "step"),
        ("optimizer", "name", "lion"),
        ("metrics", "progress", "fancy"),
        ("run", "resume", "maybe"),
        ("data", "source", "ftp"),
        ("parallelism", "reshard_after_forward", "sometimes"),
        ("training", "float8", "fp8"),
        ("training", "cross_entropy", "liger"),
    ],
)
def test_bad_choice_lists_the_choices(group, key, value):
    cfg = base().replace(**{group: {key: value}})
    with pytest.raises(ConfigError, match=rf"{group}.{key}='{value}' is not one of"):
        validate(cfg, world=2)


def test_every_problem_is_reported_at_once():
    cfg = base().replace(
        training={"steps": 0, "seq_len": 4096}, optimizer={"lr": -1.0}, model={"max_seq_len": 2048}
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg, world=2)
    message = str(e.value)
    assert "training.steps=0" in message and "model.max_seq_len" in message and "optimizer.lr=-1.0" in message


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("control_every", 0, "training.control_every=0 must be >= 1"),
        ("collective_timeout_s", 0.0, "training.collective_timeout_s=0.0 must be >= 1"),
        ("flight_recorder_entries", -1, "training.flight_recorder_entries=-1 must be >= 0"),
    ],
)
def test_control_and_timeout_keys(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate(base().replace(training={key: value}), world=2)


def test_workers_must_divide_streams_per_rank():
    cfg = base().replace(data={"num_workers": 3})
    with pytest.raises(ConfigError, match=r"data.num_workers=3 does not divide the 4 sequences"):
        validate(cfg, world=2)


def test_warmup_longer_than_training_is_cut_with_a_warning(caplog):
    """The default warmup (10 steps) must fit a smoke run of 10 steps or fewer: cut, and said so."""
    cfg = base().replace(training={"steps": 10}, optimizer={"warmup_steps": 10})
    validate(cfg, world=2)
    assert (
        "optimizer.warmup_steps=10 is not less than training.steps=10: warming up for 9 steps" in caplog.text
    )
    with pytest.raises(ConfigError, match="optimizer.warmup_steps=-1 must be >= 0"):
        validate(base().replace(optimizer={"warmup_steps": -1}), world=2)


def test_tp_must_divide_heads():
    cfg = base().replace(
        model={"n_kv_heads": 2, "n_heads": 4, "dim": 64}, parallelism={"tp": 4, "dp_shard": 1}
    )
    with pytest.raises(ConfigError, match="model.n_kv_heads=2 is not divisible by parallelism.tp=4"):
        validate(cfg, world=4)


def test_cp_needs_load_balanced_sequence_chunks():
    cfg = base().replace(training={"seq_len": 102}, parallelism={"cp": 2, "dp_shard": 1})
    with pytest.raises(ConfigError, match=r"training.seq_len=102 is not divisible by 2 x cp x tp .* = 4"):
        validate(cfg, world=2)


def test_async_tp_needs_cuda_and_compile():
    cfg = base().replace(parallelism={"tp": 2, "dp_shard": 1, "async_tp": True})
    with pytest.raises(ConfigError, match="parallelism.async_tp=true needs"):
        validate(cfg, world=2)


def test_async_tp_wiring_turns_on_inductor_micro_pipelining(monkeypatch):
    """The CUDA-only path cannot run here; its wiring can: the inductor flag and the symmetric-memory
    registration of the TP group."""
    import torch
    import torch.distributed._symmetric_memory as symm

    from titan.distributed.tp import enable_async_tp

    registered = []
    monkeypatch.setattr(symm, "enable_symm_mem_for_group", registered.append)

    class FakeMesh:
        def get_group(self):
            class Group:
                group_name = "tp-group"

            return Group()

    # inductor's own patcher, not monkeypatch: undoing a monkeypatch deletes the key from inductor's
    # config module (its __delattr__ hides the key), and every later compile in the process fails.
    with torch._inductor.config.patch(_micro_pipeline_tp=False):
        enable_async_tp(FakeMesh())
        assert torch._inductor.config._micro_pipeline_tp is True and registered == ["tp-group"]
    assert torch._inductor.config._micro_pipeline_tp is False


def test_ddp_fills_dp_replicate():
    dims = validate(base().replace(parallelism={"dp_replicate": -1, "dp_shard": 1}), world=4)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (4, 1, 4)


def test_only_one_degree_may_be_the_rest():
    with pytest.raises(ConfigError, match="only one of dp_shard or dp_replicate may be -1"):
        validate(base().replace(parallelism={"dp_replicate": -1, "dp_shard": -1}), world=4)


def pp_base(**parallelism):
    return base().replace(
        parallelism={"dp_shard": 1, "pp": 2, **parallelism},
        model={"n_layers": 4},
        training={"micro_batch_size": 1},
    )


def test_pipeline_zero_bubble_with_resharding_fsdp_is_refused():
    cfg = pp_base(dp_shard=2, pp_schedule="ZBVZeroBubble", reshard_after_forward="always")
    with pytest.raises(
        ConfigError, match="ZBVZeroBubble with parallelism.reshard_after_forward=always loses gradients"
    ):
        validate(cfg, world=4)


def test_pipeline_zero_bubble_with_compile_is_refused():
    cfg = pp_base(pp_schedule="InterleavedZeroBubble").replace(training={"compile": True})
    with pytest.raises(ConfigError, match="InterleavedZeroBubble runs backward in two passes"):
        validate(cfg, world=2)


def test_pipeline_with_ddp_is_refused():
    cfg = pp_base(dp_replicate=2)
    with pytest.raises(ConfigError, match=r"DDP .* with parallelism.pp > 1 gives wrong gradients"):
        validate(cfg, world=4)


def test_pipeline_with_tied_embeddings_is_refused():
    cfg = pp_base().replace(model={"tie_embeddings": True})
    with pytest.raises(ConfigError, match="model.tie_embeddings=true with parallelism.pp=2"):
        validate(cfg, world=2)


def test_more_stages_than_layers_is_refused():
    cfg = pp_base(pp_schedule="Interleaved1F1B").replace(model={"n_layers": 2})
    with pytest.raises(ConfigError, match="leave a stage without a transformer block"):
        validate(cfg, world=2)


def test_microbatches_must_split_the_local_batch():
    cfg = pp_base(pp_microbatches=3)
    with pytest.raises(ConfigError, match=r"does not split into parallelism.pp_microbatches=3"):
        validate(cfg, world=2)


def test_1f1b_needs_a_microbatch_per_stage():
    cfg = pp_base(pp=4, pp_microbatches=2)
    with pytest.raises(ConfigError, match="1F1B needs at least one microbatch per stage"):
        validate(cfg, world=4)


@pytest.mark.parametrize(
    "parallelism,world",
    [({"dp_shard": 1}, 1), ({"dp_shard": 1, "tp": 2}, 2), ({"dp_replicate": 2, "dp_shard": 1}, 2)],
)
def test_cpu_offload_without_fsdp_is_refused(parallelism, world):
    cfg = base().replace(parallelism={**parallelism, "cpu_offload": True})
    with pytest.raises(
        ConfigError,
        match=r"parallelism\.cpu_offload=true .* does not shard .*set parallelism\.cpu_offload=false",
    ):
        validate(cfg, world=world)


def test_cpu_offload_with_fsdp_is_valid():
    validate(base().replace(parallelism={"cpu_offload": True}), world=2)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_with_tp_is_valid(recipe):
    """Float8 under TP uses the plain TP styles: no layout is refused for it."""
    validate(base().replace(training={"float8": recipe}, parallelism={"tp": 2}), world=4)


def test_float8_needs_a_dim_multiple_of_16():
    cfg = base().replace(training={"float8": "tensorwise"}, model={"dim": 200, "n_heads": 4, "n_kv_heads": 2})
    with pytest.raises(
        ConfigError,
        match=r"training\.float8=tensorwise converts no layer: model\.dim=200 .*training\.float8=none",
    ):
        validate(cfg, world=2)
