"""Every shipped config builds; CIFAR-100's tfds pipeline builds under mock data."""

import importlib
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import animals, cifar100_animals, imagenet_animals
from configs.common import parse_arg
from jaxspec import validate
from jaxspec.data import datasets, pipeline
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.subsets import resolve_subset

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [animals, cifar100_animals, imagenet_animals])
def test_configs_build_and_are_consistent(module):
    config = module.get_config()
    assert config.generalist.steps > 0 and config.specialize.steps > 0
    assert config.specialize.optim.optimizer == "adam" and config.specialize.optim.lr == 1e-4


def test_parse_arg():
    assert parse_arg("tiny,seed=3", tiny=False, seed=0).to_dict() == {"tiny": True, "seed": 3}
    assert parse_arg("tiny=false", tiny=True).tiny is False
    with pytest.raises(ValueError, match="Unknown config argument 'tin'"):
        parse_arg("tin", tiny=False)


@pytest.mark.parametrize("module, shape, num_subset", [(cifar100_animals, (8, 32, 32, 3), 45)])
def test_tfds_pipelines_build_under_mock_data(module, shape, num_subset):
    """(ImageNet's runs on real JPEGs in tests/test_jpeg_data.py.)"""
    config = module.get_config()
    d = config.data
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        src = datasets.get_source(d.name, d.train_split)
        subset = resolve_subset(config.specialize.subset, src.info)
        assert len(subset) == num_subset
        assert len(src.labels) == len(src) and src.labels.dtype == np.int32
        batch = next(pipeline.train_iterator(src, d, batch_size=8, seed=0))
        assert batch["image"].shape == shape and batch["image"].dtype == np.uint8
        constrained = ConstrainedSource(src, subset)
        assert np.all(np.isin(src.labels[constrained.source_indices], subset))
        ev = next(pipeline.eval_iterator(datasets.get_source(d.name, d.test_split), d, batch_size=8))
        assert ev["image"].shape == shape


EXPERIMENTS = sorted(
    p.stem for p in (ROOT / "configs" / "experiments").glob("*.py") if p.stem not in ("__init__", "base")
)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_builds_with_its_arguments(name):
    """Default and `:tiny` build, pass the run checks, and name only their grid's axes in `exclude`."""
    module = importlib.import_module(f"configs.experiments.{name}")
    for arg in (None, "tiny"):
        config = module.get_config(arg)
        validate.check(config)
        grid = config.experiment.grid.to_dict()
        assert grid and all(isinstance(v, list) and v for v in grid.values()), (name, arg)
        for rule in config.experiment.get("exclude", ()):
            assert set(rule) <= set(grid), (name, rule)
