"""Every shipped config builds; the tfds pipelines build under mock data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import animals, cifar100_animals, imagenet_animals
from configs.common import parse_arg
from jaxspec.data import datasets, pipeline
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.subsets import resolve_subset


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


@pytest.mark.parametrize(
    "module, shape, num_subset",
    [(imagenet_animals, (8, 224, 224, 3), 398), (cifar100_animals, (8, 32, 32, 3), 45)],
)
def test_tfds_pipelines_build_under_mock_data(module, shape, num_subset):
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
