"""Own data (`jaxspec.data.custom`): image folders, .npz arrays, tfds datasets by name, groups files, and the
main job and `jaxspec.analysis` on them."""

import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import animals
from jaxspec import groupings, run, validate
from jaxspec.data import custom, datasets, pipeline
from jaxspec.data.subsets import resolve_subset
from jaxspec.train import workdir

CLASSES = ("cat", "dog", "fish")
SIZES = ((32, 32), (28, 24), (24, 30))  # (height, width): mixed, none above the tiny config's 32


def picture(c: int, i: int, size=(32, 32), channels: int = 3) -> np.ndarray:
    """Noise plus a bright band whose place tells the class: learnable, and every image distinct."""
    h, w = size
    im = np.random.default_rng((c, i)).integers(0, 60, (h, w, channels), dtype=np.uint8)
    band = w // len(CLASSES)
    im[:, c * band : (c + 1) * band] += 150
    return im


def write_folder(root: pathlib.Path, per_class: int = 10, parts=("",), gray: bool = False) -> pathlib.Path:
    """`root/[part/]class/NNN.{png,jpg}`, sizes cycling through SIZES; one image of `cat` is grayscale."""
    for p, part in enumerate(parts):
        for c, name in enumerate(CLASSES):
            directory = root / part / name
            directory.mkdir(parents=True)
            for i in range(per_class):
                im = picture(c, 1000 * p + i, SIZES[i % len(SIZES)], 1 if gray else 3)
                pil = Image.fromarray(im[..., 0]) if gray or (c, i) == (0, 1) else Image.fromarray(im)
                pil.save(directory / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def write_npz(path: pathlib.Path, per_class: int = 20, **arrays) -> pathlib.Path:
    """Grayscale 28x28 `images`, `labels` and `class_names` (override or add arrays by keyword)."""
    labels = np.arange(per_class * len(CLASSES)) % len(CLASSES)
    images = np.stack([picture(c, i, (28, 28), 1)[..., 0] for i, c in enumerate(labels)])
    content = {"images": images, "labels": labels, "class_names": np.array(CLASSES), **arrays}
    np.savez(path, **{k: v for k, v in content.items() if v is not None})
    return path


def open_all(name: str, **options) -> dict:
    return {s: datasets.get_source(name, s, **options) for s in ("train", "validation", "test")}


def test_folder_classes_labels_and_a_deterministic_stratified_split(tmp_path):
    root = write_folder(tmp_path / "pets")
    name = f"folder:{root}"
    parts = open_all(name)
    info = parts["train"].info
    assert info.class_names == CLASSES and len(info.mean) == len(info.std) == 3  # one gray image: all RGB
    assert {s: np.bincount(p.labels).tolist() for s, p in parts.items()} == {
        "train": [8, 8, 8],
        "validation": [1, 1, 1],
        "test": [1, 1, 1],
    }
    everything = sorted(str(p) for p in root.rglob("*.*"))
    assert sorted(p for source in parts.values() for p in source.paths) == everything  # disjoint, none dropped
    for source in parts.values():
        for k in range(len(source)):
            path = pathlib.Path(source.paths[k])
            assert CLASSES[source.labels[k]] == path.parent.name
        record = source[0]
        assert record["image"].dtype == np.uint8 and record["image"].shape[2] == 3
        with Image.open(source.paths[0]) as im:
            np.testing.assert_array_equal(record["image"], np.asarray(im.convert("RGB")))
    # Deterministic, and a new file moves none of the other classes' images.
    custom._load_folder.cache_clear()
    assert {s: p.paths for s, p in open_all(name).items()} == {s: p.paths for s, p in parts.items()}
    Image.fromarray(picture(1, 99)).save(root / "dog" / "new.png")
    again = open_all(name)
    for s in parts:
        others = [p for p in parts[s].paths if "/dog/" not in p]
        assert [p for p in again[s].paths if "/dog/" not in p] == others
    assert again["train"].info.digest != info.digest


def test_split_folders_are_used_and_a_missing_one_is_drawn_from_train(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=9, parts=("train", "test"), gray=True)
    parts = open_all(f"folder:{root}")
    assert all(p.parent.parent.name == "test" for p in map(pathlib.Path, parts["test"].paths))
    assert len(parts["test"]) == 27
    # val: 0.1 / (0.8 + 0.1) of each class's 9 images in train/.
    assert np.bincount(parts["validation"].labels).tolist() == [1, 1, 1] and len(parts["train"]) == 24
    assert {pathlib.Path(p).parent.parent.name for p in parts["validation"].paths} == {"train"}
    assert parts["train"][0]["image"].shape[2] == 1 and len(parts["train"].info.mean) == 1  # all gray: one channel


def test_npz_pool_split_arrays_and_default_class_names(tmp_path):
    path = write_npz(tmp_path / "a.npz")
    parts = open_all(str(path))  # a path ending in .npz needs no prefix
    assert parts["train"].info.class_names == CLASSES
    assert {s: np.bincount(p.labels).tolist() for s, p in parts.items()} == {
        "train": [16, 16, 16],
        "validation": [2, 2, 2],
        "test": [2, 2, 2],
    }
    assert parts["train"][0]["image"].shape == (28, 28, 1)
    mean = parts["train"].info.mean[0]
    assert 0.1 < mean < 0.5 and parts["train"].info == datasets.get_info(str(path))

    rng = np.random.default_rng(0)
    test_images = rng.integers(0, 255, (5, 28, 28, 3), dtype=np.uint8)
    split = write_npz(
        tmp_path / "b.npz",
        images=None,
        labels=None,
        class_names=None,
        train_images=rng.integers(0, 255, (40, 28, 28, 3), dtype=np.uint8),
        train_labels=np.arange(40) % 4,
        test_images=test_images,
        test_labels=np.array([0, 1, 2, 3, 3]),
    )
    parts = open_all(f"npz:{split}")
    assert parts["train"].info.class_names == ("0", "1", "2", "3")
    np.testing.assert_array_equal(parts["test"][4]["image"], test_images[4])
    assert parts["test"].labels.tolist() == [0, 1, 2, 3, 3]
    assert len(parts["validation"]) == 4 and len(parts["train"]) == 36


def tiny_config(name: str, **data) -> ml_collections.ConfigDict:
    config = animals.get_config("tiny")
    config.data.name = name
    config.data.update(data)
    config.specialize.subset = "0"
    config.specialize.control = False
    config.generalist.steps, config.specialize.steps, config.specialize.head_steps = 12, 6, 2
    config.sharding.devices = 1  # as tests/synthetic_embedded.on_fixture says why
    return config


def _folder(tmp_path):
    root = write_folder(tmp_path / "f", per_class=5)  # 3 / 1 / 1 per class
    return f"folder:{root}", root


def _loose_file(tmp_path):
    name, root = _folder(tmp_path)
    (root / "notes.txt").write_text("hi")
    return {"name": name}, "data.name", root / "notes.txt"


def _bad_image(tmp_path):
    name, root = _folder(tmp_path)
    (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    return {"name": name}, "data.name", root / "dog" / "broken.jpg"


def _empty_class(tmp_path):
    name, root = _folder(tmp_path)
    (root / "zebra").mkdir()
    return {"name": name}, "data.name", root / "zebra"


def _split_mismatch(tmp_path):
    root = write_folder(tmp_path / "f", per_class=5, parts=("train", "val"))
    for f in (root / "val" / "fish").iterdir():
        f.unlink()
    (root / "val" / "fish").rmdir()
    return {"name": f"folder:{root}"}, "data.name", root / "val"


def _big_image(tmp_path):
    name, root = _folder(tmp_path)
    Image.fromarray(picture(0, 50, (40, 36))).save(root / "cat" / "big.png")
    return {"name": name}, "data.transform", root / "cat" / "big.png"


def _not_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"junk")
    return {"name": str(path)}, "data.name", path


def _npz_case(**arrays):
    def case(tmp_path):
        path = write_npz(tmp_path / "bad.npz", **arrays)
        return {"name": str(path)}, "data.name", path

    return case


def _groups_case(content):
    def case(tmp_path):
        name, _ = _folder(tmp_path)
        groups = tmp_path / "groups.json"
        groups.write_text(content)
        return {"name": name, "groups_file": str(groups)}, "data.groups_file", groups

    return case


BAD = {
    "missing folder": lambda t: ({"name": f"folder:{t / 'nowhere'}"}, "data.name", t / "nowhere"),
    "empty class folder": _empty_class,
    "unreadable image": _bad_image,
    "file outside a class folder": _loose_file,
    "split folders with other classes": _split_mismatch,
    "mismatched lengths": _npz_case(labels=np.arange(59) % 3),
    "label out of range": _npz_case(labels=np.arange(60) % 4),
    "negative label": _npz_case(labels=np.arange(60) % 3 - 1),
    "float images": _npz_case(images=np.zeros((60, 28, 28), np.float32)),
    "images of one row": _npz_case(images=np.zeros((60, 28), np.uint8)),
    "unknown array": _npz_case(validation_images=np.zeros((3, 28, 28), np.uint8)),
    "not an npz": _not_npz,
    "groups file naming an unknown class": _groups_case('{"pets": ["cat", "unicorn"]}'),
    "groups file that is not JSON": _groups_case('{"pets": '),
    "image larger than image_size": _big_image,
    "unknown split": lambda t: ({"name": _folder(t)[0], "val_split": "dev"}, "data.val_split", "'dev'"),
    "fractions drawing no validation": lambda t: (
        {"name": _folder(t)[0], "split_fractions": (0.9, 0.0, 0.1)},
        "data.split_fractions",
        t / "f",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_config_error_line_naming_the_file(tmp_path, case):
    data, key, named = BAD[case](tmp_path)
    config = tiny_config(data.pop("name"), **data)
    with pytest.raises(validate.ConfigError) as e:
        validate.check(config)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{key}=") and str(named) in message, message


def test_batches_that_do_not_fit_the_training_examples_are_refused_before_training(tmp_path):
    name, _ = _folder(tmp_path)  # 3 training images per class
    config = tiny_config(name)
    with pytest.raises(validate.ConfigError, match=r"^generalist.batch_size=32 is not allowed: at most the 9 "):
        validate.check(config)
    config.generalist.batch_size, config.specialize.subset = 8, "cat,dog"
    with pytest.raises(
        validate.ConfigError,
        match=r"^specialize.batch_size=32 is not allowed: at most the 6 "
        r"training examples of S='cat,dog'",
    ):
        validate.check(config)
    config.specialize.batch_size, config.specialize.subset = 8, "cat,unicorn"
    with pytest.raises(validate.ConfigError, match=r"^specialize.subset='cat,unicorn' is not allowed: Unknown"):
        validate.check(config)


def test_an_image_that_breaks_after_opening_is_named_when_read(tmp_path):
    name, root = _folder(tmp_path)
    path = root / "cat" / "001.png"
    source = next(s for s in open_all(name).values() if str(path) in s.paths)
    path.write_bytes(path.read_bytes()[:80])  # the header survives, the pixels do not
    with pytest.raises(custom.DataError, match=f"^{path}: unreadable image"):
        source[source.paths.index(str(path))]  # noqa: B018


def test_groups_file_adds_named_groups_everywhere_groups_are_used(tmp_path):
    name, _ = _folder(tmp_path)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"mammals": ["dog", "cat"], "water": ["fish"]}))
    info = datasets.get_info(name, groups_file=str(groups))
    assert info.groups == {"mammals": (0, 1), "water": (2,)}
    assert resolve_subset("mammals", info) == (0, 1)
    assert groupings.semantic(info) == info.groups  # a partition: the semantic grouping of own data
    assert groupings.make_groups(ml_collections.ConfigDict(dict(kind="random", seed=0)), info).keys() == {
        "random0",
        "random1",
    }
    # Built-in datasets take groups files too; a name they already use is refused.
    groups.write_text(json.dumps({"pets": ["cat", "dog"]}))
    assert datasets.get_info("embedded", groups_file=str(groups)).groups["pets"] == (2, 4)
    groups.write_text(json.dumps({"animals": ["cat"]}))
    with pytest.raises(custom.DataError, match=f"^{groups}: group 'animals' is already a group of embedded"):
        datasets.get_info("embedded", groups_file=str(groups))


def test_experiment_groupings_expand_over_a_groups_file(tmp_path):
    from configs.experiments import table1
    from jaxspec.experiments import grid

    name, _ = _folder(tmp_path)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"mammals": ["cat", "dog"], "water": ["fish"]}))
    config = table1.get_config("tiny")
    config.data.name, config.data.groups_file, config.specialize.subset = name, str(groups), "mammals"
    config.groupings.lex.k = 3
    r = grid.add_groupings(run.open_run(config, str(tmp_path / "work")), config)
    cells = grid.expand({"group": ["@semantic", "@lex", "water"], "seed": [0]}, r)
    assert [c["group"] for c in cells] == ["mammals", "water", "lex0", "lex1", "lex2", "water"]
    assert r.groups["mammals"] == (0, 1) and sorted(map(len, (r.groups["random0"], r.groups["random1"]))) == [1, 2]


def test_workdir_fingerprint_follows_the_files_and_older_records_still_match(tmp_path):
    name, root = _folder(tmp_path)
    config = tiny_config(name)

    def fingerprint():
        return workdir.data_fingerprint(config.data.to_dict(), datasets.open_split(config.data, "train"))

    first = fingerprint()
    assert fingerprint() == first and first["data.files"]
    # A groups file names subsets; the generalist's data do not depend on it.
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"pets": ["cat", "dog"]}))
    config.data.groups_file = str(groups)
    assert fingerprint() == first
    image = root / "fish" / "002.jpg"
    Image.fromarray(picture(2, 77, SIZES[2])).save(image)  # same name and place, new pixels
    assert fingerprint()["data.files"] != first["data.files"]
    # Keys own data added are left out at their defaults, so workdirs written before them still resume.
    config.data.groups_file = ""
    older = config.to_dict()
    for key in custom.DEFAULTS:
        del older["data"][key]
    assert workdir.determinants(older) == workdir.determinants(config.to_dict())
    config.data.split_fractions = (0.7, 0.2, 0.1)
    assert workdir.determinants(config.to_dict())["data.split_fractions"] == [0.7, 0.2, 0.1]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """The main job on an RGB folder of mixed-size PNGs and JPEGs, specializing on a groups-file group."""
    tmp = tmp_path_factory.mktemp("folder_run")
    root = write_folder(tmp / "pets", per_class=20)
    groups = tmp / "groups.json"
    groups.write_text(json.dumps({"mammals": ["cat", "dog"]}))
    config = tiny_config(f"folder:{root}", groups_file=str(groups))
    config.specialize.subset = "mammals"
    return config, tmp / "run", run.run(config, str(tmp / "run"))


def test_main_job_on_a_folder_and_its_results_reopen_the_data(folder_run):
    config, work, results = folder_run
    stage = results["stages"][0]
    assert stage["subset_names"] == ["cat", "dog"] and stage["extraction_exact"]
    assert stage["test_on_S"]["specialist (extract), tuned"]["count"] == 4  # 2 classes x 10% of 20
    saved = json.loads((work / "results.json").read_text())["config"]["data"]
    reopened = datasets.open_split(ml_collections.ConfigDict(saved), saved["test_split"])
    original = datasets.open_split(config.data, config.data.test_split)
    assert reopened.paths == original.paths and reopened.info.groups["mammals"] == (0, 1)
    # Changed files under the same config are another run's data: the rerun stops, naming it.
    image = pathlib.Path(original.paths[0])
    image.write_bytes(image.read_bytes())  # same bytes, new mtime
    os.utime(image, ns=(0, 0))
    with pytest.raises(workdir.WorkdirError, match=r"phase 'generalist' .* data\.files"):
        run.run(config, str(work))


@pytest.mark.slow  # UMAP compiles with numba: tens of seconds
def test_analysis_reopens_own_data_from_results_json(folder_run):
    from jaxspec.analysis.__main__ import analyse

    _, work, _ = folder_run
    record = analyse(work, split="test", per_class=2, batch_size=16, layers=["stem", "logits"])
    assert record["subset_names"] == ["cat", "dog"] and record["umap"]["num_examples"] == 6
    assert (work / "analysis" / "umap.png").exists()


@pytest.mark.slow  # the main job as on a folder (test_main_job_on_a_folder...), on the .npz reader's source
def test_main_job_on_an_npz(tmp_path):
    path = write_npz(tmp_path / "digits.npz")
    config = tiny_config(f"npz:{path}")
    config.specialize.subset = "cat,fish"
    results = run.run(config, str(tmp_path / "run"))
    stage = results["stages"][0]
    assert stage["subset"] == [0, 2] and stage["extraction_exact"]
    assert results["generalist_test_all_classes"]["count"] == 6


def test_a_tfds_dataset_by_name_with_its_own_feature_keys():
    import tensorflow_datasets as tfds

    config = tiny_config(
        "tfds:smallnorb",
        image_key="image2",
        label_key="label_category",
        transform="imagenet",
        train_split="train",
        val_split="test[:50%]",
        test_split="test[50%:]",
    )
    config.generalist.batch_size = config.specialize.batch_size = 8  # each phase's batch fits its examples
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        validate.check(config)
        source = datasets.open_split(config.data, "train")
        names = tfds.builder("smallnorb").info.features["label_category"].names
        assert source.info.class_names == tuple(names) and len(source.info.mean) == 1
        assert source[0]["image"].shape == (96, 96, 1) and source.labels.max() < len(names)
        batch = next(pipeline.train_iterator(source, config.data, batch_size=8, seed=0))
        assert batch["image"].shape == (8, 32, 32, 1)
        config.data.label_key = "image"
        with pytest.raises(validate.ConfigError, match=r"^data.label_key='image' is not allowed: .* not a class"):
            validate.check(config)
        config.data.label_key, config.data.image_key = "label_category", "picture"
        with pytest.raises(validate.ConfigError, match=r"^data.image_key='picture' is not allowed: .* no feature"):
            validate.check(config)
