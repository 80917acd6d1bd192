import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.launch.compose import SWEEPS, compose_config, group_options
from titan.config.errors import ConfigError
from titan.config.plain import flatten, to_plain
from titan.config.schema import RunConfig
from titan.launch.build import build_run_config, describe_config_error
from titan.launch.validate import validate

GROUPS = ["model", "parallelism", "optimizer", "data", "checkpoint", "cluster", "experiment"]
# Options whose mandatory keys (`???`) a user must give; the values here stand in for them.
REQUIRED = {
    "data=c4": ["data.tokenizer=${titan_asset:tokenizers/titan_debug.tiktoken}"],
    "data=jsonl": ["data.path=${titan_asset:c4_test/c4-train.00000-of-00001.json}"],
    "data=parquet": ["data.path=/data/shard-*.parquet"],
    "data=text": ["data.path=/data/*.txt"],
    "data=tokens": ["data.path=/data/tokens", "data.tokenizer=/models/llama3/tokenizer.model"],
    "data=mixture": [
        "data.sources=[{name:a,path:/data/a.jsonl,weight:3},{name:b,source:text,path:/data/b.txt}]"
    ],
    "experiment=llama3_8b_c4": ["data.tokenizer=${titan_asset:tokenizers/titan_debug.tiktoken}"],
}


@pytest.mark.parametrize(
    "choice", [f"{g}={o}" for g in GROUPS for o in group_options(g)], ids=lambda c: c.replace("=", "-")
)
def test_every_option_composes_and_instantiates(choice):
    group, option = choice.split("=")
    # Parallel layouts are validated at their own smallest world size, on a model they fit (tp8 needs 8 kv heads).
    extra = [
        "model=llama3_8b",
        "training.seq_len=8192",
        "training.global_batch_size=16",
        "training.micro_batch_size=1",
    ]
    cfg = build_run_config(
        compose_config([choice, *REQUIRED.get(choice, []), *(extra if group == "parallelism" else [])])
    )
    assert isinstance(cfg, RunConfig)
    if group != "experiment":  # an experiment is a delta over several groups, not a group of RunConfig
        assert dataclasses.is_dataclass(getattr(cfg, group))
    if group == "parallelism":
        p = cfg.parallelism
        world = max(1, p.dp_replicate) * max(1, p.dp_shard) * p.cp * p.tp * p.pp
        dims = validate(cfg, world=world)
        assert (dims.cp, dims.tp, dims.pp) == (p.cp, p.tp, p.pp)
    elif group == "model" or group == "experiment":
        validate(cfg.replace(training={"seq_len": 256}), world=2)
    else:
        validate(cfg, world=2)


def test_defaults_are_the_make_train_run():
    cfg = build_run_config(compose_config())
    assert cfg.model.dim == 256 and cfg.training.steps == 100
    assert cfg.optimizer.betas == (0.9, 0.95)  # lists become tuples: the config stays hashable
    hash(cfg)
    assert cfg.run.group == "llama3_debug" and cfg.run.name.startswith("default-")


def test_overrides_reach_the_dataclasses():
    cfg = build_run_config(compose_config(["optimizer.lr=1e-3", "training.steps=7", "parallelism=single"]))
    assert cfg.optimizer.lr == 1e-3 and cfg.training.steps == 7 and cfg.parallelism.dp_shard == 1


def run_name(tmp_path, *overrides: str) -> str:
    return build_run_config(compose_config([f"run.root={tmp_path}", *overrides])).run.name


def test_the_run_name_is_its_identity(tmp_path):
    """Only what the run computes names it: how it runs, is watched or is checkpointed does not."""
    plain = run_name(tmp_path)
    for how in (
        ["training.steps=500", "metrics.log_freq=1"],
        ["parallelism=tp2", "training.micro_batch_size=1"],
        ["checkpoint.load_step=5", "checkpoint.export_hf=true", "checkpoint=async"],
        ["parallelism=fsdp", "checkpoint=dcp"],  # the defaults, given explicitly
        ["training.compile=true", "training.ac=op", "training.param_dtype=float32", "data.num_workers=2"],
        ["cluster.nproc_per_node=4", "data.on_bad_record=skip", "training.max_nonfinite_steps=0"],
    ):
        assert run_name(tmp_path, *how) == plain, how
    changed = run_name(tmp_path, "optimizer.lr=1e-3")
    assert changed.startswith("optimizer.lr-1e-3-") and changed != plain
    for what in (["training.seed=1"], ["training.seq_len=128"], ["optimizer=sgd"], ["model.n_layers=2"]):
        assert run_name(tmp_path, *what) not in (plain, changed), what


def test_a_default_spelled_out_finds_the_directory_of_the_plain_command(tmp_path):
    plain = run_name(tmp_path)
    spelled_out = ("optimizer.lr=3e-4", "model=llama3_debug", "optimizer=adamw")
    assert run_name(tmp_path, *spelled_out) != plain  # no directory yet: named as spelled
    (tmp_path / "llama3_debug" / plain).mkdir(parents=True)
    assert run_name(tmp_path, *spelled_out) == plain  # the same identity: the same run


def test_explicit_run_name():
    assert build_run_config(compose_config(["run.name=baseline"])).run.name == "baseline"


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"^training.stepz: no such key; valid keys of training: .*steps"):
        build_run_config(compose_config(["+training.stepz=5"]))


def test_a_target_key_builds_nothing():
    """The schema is the type: `_target_` is not a key, so a config cannot name code to run."""
    with pytest.raises(ConfigError, match=r"^training._target_: names code to run"):
        build_run_config(compose_config(["+training._target_=os.system"]))


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(ConfigError, match=r"data.tokenizer must be set"):
        build_run_config(compose_config(["data=c4"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("optimizer.lr=abc", "could not be converted to Float"),
        ("training.steps=null", "is not Optional"),
        ("training.deterministic=maybe", "'maybe' is not a valid bool"),
        ("metrics.tensorboard=on_rank0", "'on_rank0' is not a valid bool"),
    ],
)
def test_a_wrong_type_fails_at_composition_naming_the_key(override, message):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException) as e:
        compose_config([override])
    assert message in str(e.value.__cause__)
    assert describe_config_error(e.value.__cause__).startswith(f"{key}: ")


def test_yaml_booleans_are_read_as_booleans():
    cfg = build_run_config(compose_config(["metrics.tensorboard=no", "training.deterministic=yes"]))
    assert cfg.metrics.tensorboard is False and cfg.training.deterministic is True


def test_the_composed_config_holds_every_default():
    """A partial option (conf/model/llama3_8b.yaml lists 7 keys) still gives every key of the schema,
    so the run's config.yaml records them all."""
    plain = OmegaConf.to_container(compose_config(["model=llama3_8b"]), resolve=True)
    assert flatten(plain).keys() == flatten(to_plain(RunConfig())).keys()
    assert plain["model"]["rope_theta"] == 500000.0 and plain["model"]["dim"] == 4096


def test_cli_typo_fails_at_composition():
    with pytest.raises(Exception, match="stepz"):
        compose_config(["training.stepz=5"])


def test_resolved_config_round_trips_as_plain_yaml():
    cfg = compose_config()
    plain = OmegaConf.to_container(cfg, resolve=True)
    again = build_run_config(OmegaConf.create(plain))
    assert again == build_run_config(cfg)


def test_model_shape_errors_surface_as_config_errors():
    with pytest.raises(ConfigError, match="model.n_heads=8 must be a multiple of model.n_kv_heads=3"):
        build_run_config(compose_config(["model.n_kv_heads=3"]))


def test_experiment_is_a_named_delta_and_names_the_run_group():
    cfg = build_run_config(
        compose_config(
            ["experiment=llama3_8b_c4", "data.tokenizer=${titan_asset:tokenizers/titan_debug.tiktoken}"]
        )
    )
    assert cfg.model.dim == 4096 and cfg.data.path == "allenai/c4" and cfg.training.seq_len == 8192
    assert cfg.run.group == "llama3_8b_c4"
    validate(cfg, world=8)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_named_sweeps_compose(sweep):
    cfg = compose_config([f"+sweeps={sweep}"])
    validate(build_run_config(cfg), world=2)
