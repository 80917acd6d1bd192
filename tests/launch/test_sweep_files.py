"""Every point of every named sweep in sweeps/ composes and validates (locally and as a Slurm job)."""

import itertools
import os

import pytest
import yaml

from tests.launch.compose import REPO, SWEEPS, compose_config
from titan.launch.build import build_run_config
from titan.launch.validate import validate, validate_data, world_size


def points(name: str) -> list[list[str]]:
    params = yaml.safe_load(open(os.path.join(REPO, "sweeps", f"{name}.yaml")))["hydra"]["sweeper"]["params"]
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(p) for p in itertools.product(*axes)]


def test_the_named_sweeps():
    assert {"lr_scan", "batch_scan", "layouts", "model_ladder"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("cluster", ["cluster=local", "cluster=slurm"])
def test_every_point_validates(name, cluster):
    assert len(points(name)) >= 2
    for point in points(name):
        cfg = build_run_config(compose_config([f"+sweeps={name}", cluster, *point]))
        validate(cfg, world_size(cfg, gpus_on_machine=0))
        validate_data(cfg)
        for override in point:  # the swept value reached the run
            key, value = override.split("=")
            if "." not in key:  # a group choice: the run is named after it or its values differ
                continue
            group, field = key.split(".")
            assert str(getattr(getattr(cfg, group), field)) in (value, str(float(value)))
