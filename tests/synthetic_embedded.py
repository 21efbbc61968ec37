"""Writes a tiny stand-in for the embedded dataset's raw files.

The files use exactly the real framing (gzipped protocol-4 pickles that name
numpy.core.multiarray, like animal-mnist's; gzipped IDX files), so the tests
run the same readers as the real data. Each class is a bright block in its
own cell of a 6x5 grid plus noise: learnable, and every image is distinct.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np


def legacy_array_pickle(array: np.ndarray) -> bytes:
    """Pickles like NumPy 1.x did, naming numpy.core instead of numpy._core.

    The real animal-mnist pickles carry the old module name; NumPy 2 writes
    the new one, so the name is swapped and the one enclosing frame shrunk.
    """
    data = pickle.dumps(array, protocol=4)
    new, old = b"numpy._core.multiarray", b"numpy.core.multiarray"
    head = bytes([0x8C, len(new)]) + new
    if head not in data:  # NumPy 1.x already wrote the old name.
        return data
    assert data[2] == 0x95, "expected a FRAME opcode after PROTO"
    frame = int.from_bytes(data[3:11], "little") - (len(new) - len(old))
    body = data[11:].replace(head, bytes([0x8C, len(old)]) + old, 1)
    return data[:3] + frame.to_bytes(8, "little") + body


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes a uint8 or int32 array as an (uncompressed) IDX file."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _images(labels: np.ndarray, first_class: int, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(first_class + int(label), 5)
        images[i, 1 + 4 * row : 4 + 4 * row, 1 + 5 * col : 5 + 5 * col] += 180
    return images


def write_fixture(directory: str, per_class: int = 20, seed: int = 0, duplicates: int = 0) -> str:
    """Writes the six raw files and a manifest.json; returns its path.

    Animals get exactly `per_class` images per class in label-sorted blocks
    (as the real file), the last `duplicates` of each class copying the
    first ones (as the real file's repeats); the IDX sources get a few more
    per class in shuffled order (as MNIST), so the selection has work to do.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    animal_labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    animals = _images(animal_labels, 0, rng).reshape(10, per_class, 28, 28)
    if duplicates:
        animals[:, -duplicates:] = animals[:, :duplicates]
    files = {  # role: (file name, content)
        "animal_data": ("animal_data_version_3.gz", _gzip(legacy_array_pickle(animals.reshape(-1, 28, 28)))),
        "animal_labels": ("animal_label_version_3.gz", _gzip(legacy_array_pickle(animal_labels))),
    }
    for prefix, first_class in (("fashion", 10), ("mnist", 20)):
        counts = per_class + 1 + np.arange(10) % 3
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), counts))
        files[f"{prefix}_train_images"] = (
            f"{prefix}-train-images-idx3-ubyte.gz",
            _gzip(idx_bytes(_images(labels, first_class, rng))),
        )
        files[f"{prefix}_train_labels"] = (f"{prefix}-train-labels-idx1-ubyte.gz", _gzip(idx_bytes(labels)))
    manifest = {}
    for role, (name, data) in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        manifest[role] = {"path": name, "sha256": hashlib.sha256(data).hexdigest()}
    path = os.path.join(directory, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
    return path


def write_deb(path: str, members: dict[str, bytes]) -> None:
    """Writes a minimal .deb: an ar archive whose data.tar.xz holds members."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entries = {"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": tar_buffer.getvalue()}
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in entries.items():
            header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}"
            f.write(header.encode("ascii") + b"`\n" + data)
            if len(data) % 2:
                f.write(b"\n")


def on_fixture(config, manifest: str):
    """`config` as the tests run it: on the fixture behind `manifest` (its cache beside it) and one device.

    One device because a step sharded over the 8 fake devices compiles about 1.7 times slower (measured on
    the tiny main job), and compiling is most of an end-to-end test's time; the sharded paths have tests of
    their own (test_fsdp, test_multi, test_train, test_route, test_detection_train), with `devices=0`.
    """
    config.data.manifest = manifest
    config.data.data_dir = os.path.join(os.path.dirname(manifest), "cache")
    config.sharding.devices = 1
    return config


def use_fixture(config, directory: str, per_class: int = 20):
    """`on_fixture` a fixture written into `directory`."""
    return on_fixture(config, write_fixture(directory, per_class=per_class))
