"""conf/model/*.yaml: every option instantiates, and the published models have their published sizes."""

from pathlib import Path

import pytest
import torch

from tests.launch.compose import compose_config
from tests.models.test_model import DEBUG
from titan.launch.build import build_run_config
from titan.models.llama.args import ModelArgs, num_params
from titan.models.llama.model import Transformer

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "model"

# Parameter counts as Meta publishes them (model cards), and the precision they are printed at.
PUBLISHED_BILLIONS = {
    "llama3_1b": (1.24, 2),  # Llama 3.2 1B
    "llama3_3b": (3.21, 2),  # Llama 3.2 3B
    "llama3_8b": (8.03, 2),  # Llama 3.1 8B
    "llama3_70b": (70.6, 1),  # Llama 3.1 70B
    "llama3_405b": (405.9, 1),  # Llama 3.1 405B
}
# Shared by every published Llama 3.1 / 3.2 model.
COMMON = {
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "norm_eps": 1e-5,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_max_seq_len": 8192,
    "max_seq_len": 131072,
}


def load(option: str) -> ModelArgs:
    """The option as launch.py builds it: composed onto ModelArgs' defaults."""
    args = build_run_config(compose_config([f"model={option}"])).model
    assert isinstance(args, ModelArgs)
    return args


def test_every_option_is_listed():
    assert {p.stem for p in MODEL_CONFIGS.glob("*.yaml")} == {"llama3_debug", *PUBLISHED_BILLIONS}


@pytest.mark.parametrize("option", sorted(PUBLISHED_BILLIONS))
def test_published_sizes_on_the_meta_device(option):
    args = load(option)
    assert {k: getattr(args, k) for k in COMMON} == COMMON
    with torch.device("meta"):
        model = Transformer(args)
    count = sum(p.numel() for p in model.parameters())  # a tied output counts once
    billions, digits = PUBLISHED_BILLIONS[option]
    assert round(count / 1e9, digits) == billions
    assert num_params(args) == count


def test_debug_model():
    args = load("llama3_debug")
    assert args == DEBUG
    assert num_params(args) == 4_327_680
