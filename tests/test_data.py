"""Subsets, domain constraining (grain and tf.data agree) and the grain pipeline."""

import numpy as np
import pytest

from configs.common import data as small_data_config
from jaxspec.data import constrain, pipeline
from jaxspec.data.sources import ArraySource, DatasetInfo, read_batch
from jaxspec.data.subsets import resolve_subset

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


class RecordSource:
    """Record-by-record access only (like a tfds source); image i is (i % 3 + 4) wide and filled with i + 1."""

    info = INFO

    def __init__(self, n=30):
        self.labels = (np.arange(n) % 6).astype(np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": np.full((6, i % 3 + 4, 1), i + 1, np.uint8), "label": self.labels[i]}


def test_batch_reads_match_record_reads():
    src = toy_source(n=50)
    indices = np.array([7, 3, 3, 49, 0])
    batch = read_batch(src, indices)
    np.testing.assert_array_equal(batch["image"], np.stack([src[i]["image"] for i in indices]))
    np.testing.assert_array_equal(batch["label"], [src[i]["label"] for i in indices])
    for base in (src, RecordSource()):
        cs = constrain.ConstrainedSource(base, (4, 1))
        picks = np.array([2, 0, len(cs) - 1])
        got = read_batch(cs, picks)
        assert got["label"].dtype == np.int32
        np.testing.assert_array_equal(got["label"], [cs[i]["label"] for i in picks])
        for image, i in zip(got["image"], picks):
            np.testing.assert_array_equal(image, cs[i]["image"])
    records = read_batch(RecordSource(), [4, 5])  # no get_batch: a list, sizes differ
    assert [im.shape for im in records["image"]] == [(6, 5, 1), (6, 6, 1)]


def test_train_iterator_pads_mixed_sizes_and_loops_over_imagenet_transform():
    src = RecordSource()
    plain = small_data_config(image_size=8, crop_padding=0, flip=False)
    batch = next(pipeline.train_iterator(src, plain, batch_size=8, seed=0))
    assert batch["image"].shape == (8, 8, 8, 1) and batch["image"].dtype == np.uint8
    for image, label in zip(batch["image"], batch["label"]):
        i = int(image.max()) - 1
        np.testing.assert_array_equal(image, pipeline.pad_to(src[i]["image"], 8))
        assert label == src.labels[i]
    rrc = small_data_config(transform="imagenet", image_size=5, randaugment_ops=1, erasing_prob=0.5)
    a, b = (next(pipeline.train_iterator(src, rrc, batch_size=8, seed=1)) for _ in range(2))
    assert a["image"].shape == (8, 5, 5, 1) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])


def test_train_iterator_epochs_run_across_batches_and_shards_split_the_data(monkeypatch):
    src = toy_source(n=36)
    cfg = small_data_config(image_size=8, crop_padding=0, flip=False)
    it = pipeline.train_iterator(src, cfg, batch_size=8, seed=0)
    stream = np.concatenate([ids(next(it)["image"]) for _ in range(9)])  # 2 epochs of 36 in batches of 8
    assert sorted(stream[:36]) == sorted(stream[36:]) == list(range(36))
    assert not np.array_equal(stream[:36], stream[36:])
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    shards = []
    for index in range(2):
        monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
        it = pipeline.train_iterator(src, cfg, batch_size=16, seed=0)
        shards.append(np.concatenate([ids(next(it)["image"]) for _ in range(9)]))  # 4 epochs of 18
    for shard in shards:
        assert all(sorted(shard[e * 18 : (e + 1) * 18]) == sorted(shard[:18]) for e in range(4))
    assert sorted(np.concatenate([shards[0][:18], shards[1][:18]])) == list(range(36))


def test_train_iterator_resumes_from_its_state():
    src = toy_source(n=36)
    cfg = small_data_config(image_size=8)
    it = pipeline.train_iterator(src, cfg, batch_size=8, seed=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.train_iterator(src, cfg, batch_size=8, seed=2)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_eval_iterator_covers_every_example_once():
    src = toy_source(n=37)
    cfg = small_data_config(image_size=8)
    batches = list(pipeline.eval_iterator(src, cfg, batch_size=8))
    assert len(batches) == 5
    seen = np.concatenate([ids(b["image"])[b["mask"]] for b in batches])
    assert list(seen) == list(range(37))
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, src.labels)


def test_eval_iterator_shards_over_processes_and_reads_records(monkeypatch):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    src, seen = toy_source(n=37), []
    for index in range(2):
        monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
        batches = list(pipeline.eval_iterator(src, small_data_config(image_size=8), batch_size=8))
        assert len(batches) == 5 and all(b["image"].shape[0] == 4 for b in batches)
        seen += [i for b in batches for i in ids(b["image"])[b["mask"]]]
    assert sorted(seen) == list(range(37))
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 1)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: 0)
    rec = RecordSource(n=5)  # record by record, sizes differ: padded to image_size
    (batch,) = pipeline.eval_iterator(rec, small_data_config(image_size=8), batch_size=8)
    assert batch["image"].shape == (8, 8, 8, 1) and list(batch["mask"]) == [True] * 5 + [False] * 3
    assert list(batch["image"].max(axis=(1, 2, 3))) == [1, 2, 3, 4, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="empty source"):
        pipeline.eval_iterator(RecordSource(n=0), small_data_config(image_size=8), batch_size=8)


def test_pad_to_and_bad_transform():
    img = np.ones((28, 28, 1), np.uint8)
    out = pipeline.pad_to(img, 32)
    assert out.shape == (32, 32, 1) and out.sum() == 28 * 28 and out[2:30, 2:30].all()
    batch = np.arange(2 * 5 * 3 * 2, dtype=np.uint8).reshape(2, 5, 3, 2)
    np.testing.assert_array_equal(pipeline.pad_to(batch, 8), np.stack([pipeline.pad_to(im, 8) for im in batch]))
    with pytest.raises(ValueError, match="HWC image or NHWC batch, got shape \\(28, 28\\)"):
        pipeline.pad_to(img[..., 0], 32)
    with pytest.raises(ValueError, match="larger than image_size=16"):
        pipeline.pad_to(img, 16)
    with pytest.raises(ValueError, match="Unknown data.transform 'fancy'"):
        pipeline.train_iterator(toy_source(), small_data_config(transform="fancy"), batch_size=8, seed=0)
