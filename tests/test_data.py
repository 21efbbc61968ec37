"""Subsets, domain constraining (grain and tf.data agree) and the grain pipeline."""

import numpy as np
import pytest

from jaxspec.data import constrain, pipeline
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.data.subsets import resolve_subset
from configs.common import data as small_data_config

INFO = DatasetInfo(
    name="toy",
    class_names=("cat", "dog", "shirt", "shoe", "one", "two"),
    groups={"animals": (0, 1), "clothing": (2, 3), "digits": (4, 5)},
    mean=(0.5,),
    std=(0.5,),
)


def toy_source(n=60, size=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, n).astype(np.int32)
    # each image encodes its own index, so examples can be identified after transforms
    images = np.zeros((n, size, size), np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return ArraySource(images, labels, INFO)


def ids(images):
    return images[..., 0, 0, 0].astype(int) + 256 * images[..., 0, 1, 0].astype(int)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("animals", (0, 1)),
        ("dog,cat", (1, 0)),
        ("digits,shirt", (4, 5, 2)),
        ([3, "one"], (3, 4)),
        ("2, 0", (2, 0)),
        (5, (5,)),
    ],
)
def test_resolve_subset(spec, expected):
    assert resolve_subset(spec, INFO) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("horse", "Unknown class or group 'horse'.*groups: \\['animals', 'clothing', 'digits'\\].*cat, dog"),
        ("7", "Class index 7 is out of range.*0..5"),
        ([-1], "Class index -1 is out of range"),
        ("", "empty"),
        ([], "empty"),
        ("cat,animals", "more than once: 0 \\(cat\\)"),
    ],
)
def test_resolve_subset_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_subset(spec, INFO)


def test_constrained_source_keeps_only_subset_and_remaps():
    src = toy_source()
    subset = (4, 1)
    cs = constrain.ConstrainedSource(src, subset)
    expected = [i for i in range(len(src)) if src.labels[i] in subset]
    assert list(cs.source_indices) == expected
    for j, i in enumerate(expected):
        rec = cs[j]
        assert rec["label"] == subset.index(src.labels[i])
        assert ids(rec["image"][None])[0] == i
    assert cs.info.class_names == ("one", "dog")
    assert dict(cs.info.groups) == {}  # no group lies wholly inside {one, dog}
    assert constrain.ConstrainedSource(src, (0, 1, 4)).info.groups == {"animals": (0, 1)}


def test_grain_and_tf_data_constraining_agree():
    tf = pytest.importorskip("tensorflow")
    src = toy_source(n=100)
    subset = (5, 2, 3)
    cs = constrain.ConstrainedSource(src, subset)
    grain_examples = [(ids(cs[i]["image"][None])[0], int(cs[i]["label"])) for i in range(len(cs))]
    ds = tf.data.Dataset.from_tensor_slices({"image": src._images, "label": src.labels})
    tf_ds = constrain.constrain_tf(ds, subset, INFO.num_classes)
    tf_examples = [(ids(ex["image"][None])[0], int(ex["label"])) for ex in tf_ds.as_numpy_iterator()]
    assert grain_examples == tf_examples
    assert len(grain_examples) == int(np.isin(src.labels, subset).sum()) > 0


def test_train_iterator_deterministic_and_reshuffled_per_epoch():
    src = toy_source(n=40)
    cfg = small_data_config(image_size=8, crop_padding=0, flip=False)
    take = lambda it, k: [ids(next(it)["image"]) for _ in range(k)]
    a = take(pipeline.train_iterator(src, cfg, batch_size=8, seed=3), 10)
    b = take(pipeline.train_iterator(src, cfg, batch_size=8, seed=3), 10)
    c = take(pipeline.train_iterator(src, cfg, batch_size=8, seed=4), 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    epoch1, epoch2 = np.concatenate(a[:5]), np.concatenate(a[5:])
    assert sorted(epoch1) == sorted(epoch2) == list(range(40))  # each epoch is a permutation
    assert not np.array_equal(epoch1, epoch2)


def test_eval_iterator_covers_every_example_once():
    src = toy_source(n=37)
    cfg = small_data_config(image_size=8)
    batches = list(pipeline.eval_iterator(src, cfg, batch_size=8))
    assert len(batches) == 5
    seen = np.concatenate([ids(b["image"])[b["mask"]] for b in batches])
    assert list(seen) == list(range(37))
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, src.labels)


def test_pad_to_and_bad_transform():
    img = np.ones((28, 28, 1), np.uint8)
    out = pipeline.pad_to(img, 32)
    assert out.shape == (32, 32, 1) and out.sum() == 28 * 28 and out[2:30, 2:30].all()
    with pytest.raises(ValueError, match="larger than image_size=16"):
        pipeline.pad_to(img, 16)
    with pytest.raises(ValueError, match="Unknown data.transform 'fancy'"):
        pipeline.train_iterator(toy_source(), small_data_config(transform="fancy"), batch_size=8, seed=0)
