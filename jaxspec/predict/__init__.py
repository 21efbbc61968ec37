"""Using a trained model: `predict(model_dir, images)` and `python -m jaxspec.predict --model=DIR IMAGE...`.

`model_dir` is one exported model (`WORKDIR/models/specialist`, `.../generalist`, a detector's) or a
routed system: a directory holding `generalist/` beside specialist model directories, as
`WORKDIR/models` is after `jaxspec.main` (routed as `jaxspec.route` does: the generalist picks a
class, the specialist whose group holds it decides). Images go through the preprocessing recorded in
the model's model.json, the very functions evaluation used (`pipeline.eval_batch` + `normalize`;
detectors: `letterbox`, and boxes come back in each image's own pixels). Batches are padded to one
size (one compile per image size) and split over every device by the batch `NamedSharding`.

  python -m jaxspec.predict --model=/tmp/animals/models/specialist cat.png dog.png --top_k=3
  python -m jaxspec.predict --model=/tmp/animals/models cat.png       # generalist + specialists
  python -m jaxspec.predict --model=/tmp/detect/models/specialist scene.png

`jaxspec.predict` is also this package's `predict` function (`jaxspec.predict(model_dir, images)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxspec import route, sharding
from jaxspec.cli import UserError
from jaxspec.data import custom, pipeline
from jaxspec.detection import augment as det_augment
from jaxspec.detection import specialize as det_specialize
from jaxspec.detection import train as det_train
from jaxspec.train import checkpoint
from jaxspec.train.state import split_model

GENERALIST = "generalist"  # a routed system's generalist directory; every other model directory is a specialist


def is_routed(directory: pathlib.Path) -> bool:
    """A routed system's directory: no model of its own, a `generalist/` one inside."""
    return not (directory / "model.json").exists() and (directory / GENERALIST / "model.json").exists()


def read_spec(directory: str | pathlib.Path) -> dict:
    """model.json of an exported model whose weights verify and that records how to feed it."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise UserError(f"model directory {directory} does not exist")
    path = directory / "model.json"
    if not path.exists():
        raise UserError(
            f"{directory} is not an exported jaxspec model (no model.json) nor a routed system "
            f"(no {GENERALIST}/model.json)"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    problem = checkpoint.export_problem(directory)
    if problem:
        raise UserError(f"{directory} is not a complete export: {problem}")
    missing = [k for k in ("preprocess", "classes") if k not in spec]
    if missing:
        raise UserError(
            f"{path} has no {missing[0]!r} record (exported by an older jaxspec); rerun the command "
            "that trained it on the same workdir to add it"
        )
    return spec


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HWC uint8 with the data's channel count: alpha dropped, RGB made gray (Pillow's luma) for
    grayscale models; gray stays 1 channel for RGB models, `normalize` repeats it."""
    if image.shape[-1] == 4:
        image = image[..., :3]
    if channels == 1 and image.shape[-1] == 3:
        return np.asarray(Image.fromarray(image).convert("L"))[..., None]
    return image


def _as_uint8(array: np.ndarray, index: int) -> np.ndarray:
    """An HW or HWC array as uint8 HWC; floats are read as [0, 1] intensities."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise UserError(f"image {index} has shape {array.shape}; expected HW or HWC with 1, 3 or 4 channels")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1:
            raise UserError(
                f"image {index} is {array.dtype} with values in [{lo:g}, {hi:g}]; float images must "
                "lie in [0, 1] (or pass uint8)"
            )
        return np.round(array * 255).astype(np.uint8)
    raise UserError(f"image {index} has dtype {array.dtype}; expected uint8 or float in [0, 1]")


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    return custom.image_array(image, "L" if channels == 1 else "RGB")


def _read(path: str | os.PathLike, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return _from_pil(im, channels)
    except FileNotFoundError:
        raise UserError(f"image {os.fspath(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image {os.fspath(path)!r} cannot be read as an image ({e})") from None


def load_images(images, channels: int) -> list[np.ndarray]:
    """uint8 HWC arrays with `channels` (1 or 3) channels from what `predict` accepts."""
    if isinstance(images, np.ndarray):
        # NHWC; NHW (a grayscale batch) unless its last axis is a channel axis; HWC or HW: one image.
        one = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))
        images = [images] if one else list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            im = _read(im, channels)
        elif isinstance(im, Image.Image):
            im = _from_pil(im, channels)
        out.append(_to_channels(_as_uint8(im, i), channels))
    if not out:
        raise UserError("no images given")
    return out


def _load(directory: pathlib.Path):
    return checkpoint.load_model(directory)[0]


def _eval_batch(images: list[np.ndarray], preprocess: dict) -> np.ndarray:
    try:
        return pipeline.eval_batch(images, preprocess)
    except ValueError as e:  # e.g. an image larger than a zero-padding model's input
        raise UserError(str(e)) from None


def _batch_size(requested: int, n: int, devices: int) -> int:
    """The fixed batch: `requested` (fewer when fewer images are given), a multiple of the device count."""
    if requested < 1:
        raise UserError(f"batch_size={requested} must be positive")
    return sharding.fill_devices(min(requested, n), devices)


def _batched(fn, inputs: np.ndarray, batch_size: int, mesh) -> dict[str, np.ndarray]:
    """`fn` over `inputs` in batches of `batch_size` split over `mesh`, the last one padded with copies
    of its last image; outputs of the padding are dropped."""
    outs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        out = jax.device_get(fn(sharding.put_batch({"image": chunk}, mesh)["image"]))
        outs.append({k: np.asarray(v)[:real] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@dataclasses.dataclass(frozen=True)
class Classification:
    """A classifier's outputs: softmax `probabilities` [N, K] over the outputs that compete (a
    suppressed model's other outputs are left out), each output's class `names` and global `classes`
    (-1: a dustbin, "other"), and per image the `top` (name, probability) pairs, best first."""

    probabilities: np.ndarray
    names: tuple[str, ...]
    classes: tuple[int, ...]
    top: list[list[tuple[str, float]]]


@dataclasses.dataclass(frozen=True)
class RoutedClassification:
    """A routed system's answer per image: the final global class and its name, the generalist's
    class, and the specialist that decided (None: no group, or its dustbin, so the generalist's stood)."""

    classes: np.ndarray
    names: list[str]
    generalist_classes: np.ndarray
    generalist_names: list[str]
    specialists: list[str | None]


@dataclasses.dataclass(frozen=True)
class Detections:
    """One image's detections, best first: `boxes` [n, 4] x1, y1, x2, y2 in the image's own pixels,
    `scores` [n], global `classes` [n] and their `names`."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    names: list[str]


@dataclasses.dataclass(frozen=True)
class Member:
    """A loaded classifier with only its competing outputs (a suppressed model's others dropped, as
    `route.specialist_of` does): output j is global class `classes[j]` (-1: dustbin) named `names[j]`."""

    spec: dict
    model: object
    classes: list[int]
    names: list[str]


def load_classifier(directory: pathlib.Path, spec: dict | None = None) -> Member:
    spec = read_spec(directory) if spec is None else spec
    if spec["name"].startswith("yolov5"):
        raise UserError(f"{directory} is a detector ({spec['name']}), not a classifier")
    entries, columns = spec["classes"], spec.get("columns")
    model, classes = route.specialist_of(_load(directory), [e["class"] for e in entries], columns)
    names = [entries[j]["name"] for j in (range(len(entries)) if columns is None else columns)]
    return Member(spec, model, classes, names)


def routed_members(directory: pathlib.Path, specialists: Sequence[str] | None = None) -> dict[str, Member]:
    """A routed system's generalist (first) and specialists (`specialists`, default every model
    directory beside it), checked to be fed the same way."""
    found = sorted(p.name for p in directory.iterdir() if p.name != GENERALIST and (p / "model.json").exists())
    names = list(specialists) if specialists else found
    unknown = [n for n in names if n not in found]
    if unknown or not names:
        raise UserError(f"specialists={unknown or names}: {directory} holds the specialists {found}")
    members = {name: load_classifier(directory / name) for name in (GENERALIST, *names)}
    pre = members[GENERALIST].spec["preprocess"]
    for name in names:
        if members[name].spec["preprocess"] != pre:
            raise UserError(
                f"specialist {name!r} was fed differently from the generalist: "
                f"{members[name].spec['preprocess']} vs {pre}"
            )
    return members


def build_routed(directory: pathlib.Path, members: dict[str, Member], mesh=None) -> route.RoutedSystem:
    """`route.build_routed` over `routed_members`; overlapping groups are the user's to resolve."""
    pre, specs = members[GENERALIST].spec["preprocess"], [m for n, m in members.items() if n != GENERALIST]
    try:
        return route.build_routed(
            members[GENERALIST].model,
            [m.model for m in specs],
            [m.classes for m in specs],
            mean=pre["mean"],
            std=pre["std"],
            mesh=mesh,
        )
    except ValueError as e:
        raise UserError(
            f"{directory}: {e}; choose specialists whose groups do not overlap (specialists=, --specialists=)"
        ) from None


class Classifier:
    """One exported classifier, loaded and compiled once, replicated over `mesh`."""

    def __init__(self, directory: pathlib.Path, spec: dict, *, batch_size: int, mesh):
        member = load_classifier(directory, spec)
        self.names, self.classes = tuple(member.names), tuple(member.classes)
        self.preprocess, self.batch_size, self.mesh = spec["preprocess"], batch_size, mesh
        modeldef, *weights = split_model(member.model)
        self._weights = sharding.replicate(weights, mesh)
        mean, std = self.preprocess["mean"], self.preprocess["std"]

        @jax.jit
        def forward(weights, images):
            logits = modeldef.merge(*weights)(pipeline.normalize(images, mean, std))
            return {"probabilities": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}

        self._forward = forward

    def __call__(self, images, *, top_k: int = 5) -> Classification:
        ims = load_images(images, self.preprocess["channels"])
        batch = _batch_size(self.batch_size, len(ims), self.mesh.size)
        probs = _batched(
            lambda im: self._forward(self._weights, im), _eval_batch(ims, self.preprocess), batch, self.mesh
        )["probabilities"]
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        top = [[(self.names[j], float(p[j])) for j in row] for p, row in zip(probs, order)]
        return Classification(probs, self.names, self.classes, top)


class RoutedClassifier:
    """A generalist and its specialists as one `jaxspec.route.RoutedSystem` (its routing, not a copy)."""

    def __init__(self, directory: pathlib.Path, specialists: Sequence[str] | None, *, batch_size: int, mesh):
        members = routed_members(directory, specialists)
        self.system = build_routed(directory, members, mesh)
        self.class_names = members[GENERALIST].names
        self.specialist_names = [n for n in members if n != GENERALIST]
        self.preprocess, self.batch_size, self.mesh = members[GENERALIST].spec["preprocess"], batch_size, mesh

    def __call__(self, images) -> RoutedClassification:
        ims = load_images(images, self.preprocess["channels"])
        batch = _batch_size(self.batch_size, len(ims), self.mesh.size)
        out = _batched(
            lambda im: {k: v for k, v in self.system.predict(im).items() if k != "chunks"},
            _eval_batch(ims, self.preprocess),
            batch,
            self.mesh,
        )
        deciders = [self.specialist_names[g] if used else None for g, used in zip(out["group"], out["used_specialist"])]
        names = [self.class_names[c] for c in out["pred"]]
        return RoutedClassification(
            out["pred"], names, out["generalist_pred"], [self.class_names[c] for c in out["generalist_pred"]], deciders
        )


class Detector:
    """One exported YOLOv5 detector: letterbox, detect + NMS (YOLOv5 detect.py's single-label
    defaults), boxes mapped back to each image (`augment.unletterbox`)."""

    def __init__(
        self,
        directory: pathlib.Path,
        spec: dict,
        *,
        batch_size: int,
        mesh,
        conf_thres: float,
        iou_thres: float,
        max_det: int,
    ):
        entries = spec["classes"]
        self.classes = np.asarray([e["class"] for e in entries])
        self.names = [e["name"] for e in entries]
        self.preprocess, self.batch_size, self.mesh = spec["preprocess"], batch_size, mesh
        modeldef, *weights = split_model(_load(directory))
        self._weights = sharding.replicate(weights, mesh)
        keep = jnp.asarray(det_specialize.class_mask(len(entries), spec.get("columns")))
        pre = self.preprocess

        @jax.jit
        def forward(weights, images):
            found = det_train.detect(
                modeldef.merge(*weights),
                images,
                keep,
                mean=pre["mean"],
                std=pre["std"],
                conf_thres=conf_thres,
                iou_thres=iou_thres,
                max_det=max_det,
                max_nms=30000,
                multi_label=False,
            )
            return found._asdict()

        self._forward = forward

    def __call__(self, images) -> list[Detections]:
        ims = load_images(images, self.preprocess["channels"])
        size, fill = self.preprocess["image_size"], self.preprocess["fill"]
        boxed = [det_augment.letterbox(im, np.zeros((0, 4), np.float32), size, fill=fill) for im in ims]
        batch = _batch_size(self.batch_size, len(ims), self.mesh.size)
        found = _batched(lambda im: self._forward(self._weights, im), np.stack([b[0] for b in boxed]), batch, self.mesh)
        out = []
        for i, (im, (_, _, scale, pad)) in enumerate(zip(ims, boxed)):
            valid = found["valid"][i]
            outputs = found["classes"][i][valid]
            out.append(
                Detections(
                    det_augment.unletterbox(found["boxes"][i][valid], scale, pad, im.shape[:2]),
                    found["scores"][i][valid],
                    self.classes[outputs],
                    [self.names[j] for j in outputs],
                )
            )
        return out


def load(
    model_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    specialists: Sequence[str] | None = None,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 300,
    mesh=None,
):
    """The predictor for `model_dir` (see the module docstring), compiled on first use; reuse it to
    predict many times. `specialists` picks a routed system's specialists (default: all of them)."""
    directory = pathlib.Path(model_dir).absolute()
    mesh = sharding.make_mesh() if mesh is None else mesh
    if is_routed(directory):
        return RoutedClassifier(directory, specialists, batch_size=batch_size, mesh=mesh)
    spec = read_spec(directory)
    if spec["name"].startswith("yolov5"):
        return Detector(
            directory,
            spec,
            batch_size=batch_size,
            mesh=mesh,
            conf_thres=conf_thres,
            iou_thres=iou_thres,
            max_det=max_det,
        )
    return Classifier(directory, spec, batch_size=batch_size, mesh=mesh)


def predict(
    model_dir: str | os.PathLike,
    images,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    specialists: Sequence[str] | None = None,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
):
    """Applies the model (or routed system) in `model_dir` to `images`.

    `images`: a path, a PIL image or a NumPy array (HW / HWC one image, NHW / NHWC a batch), or a list of
    them (any sizes); uint8, or float in [0, 1]. Returns a `Classification` (top `top_k` per image), a
    `RoutedClassification`, or one `Detections` per image (boxes above `conf_thres` after NMS at
    `iou_thres`).
    """
    predictor = load(
        model_dir, batch_size=batch_size, specialists=specialists, conf_thres=conf_thres, iou_thres=iou_thres
    )
    return predictor(images, top_k=top_k) if isinstance(predictor, Classifier) else predictor(images)


def format_result(labels: Sequence[str], result) -> str:
    """The terminal table of `predict`'s result for images named `labels`."""
    lines = []
    if isinstance(result, Classification):
        for label, top in zip(labels, result.top):
            lines.append(label)
            lines += [f"  {rank}. {name:<24} {p:7.2%}" for rank, (name, p) in enumerate(top, 1)]
    elif isinstance(result, RoutedClassification):
        for label, name, gen, who in zip(labels, result.names, result.generalist_names, result.specialists):
            by = f"specialist {who!r}; the generalist said {gen}" if who else "generalist"
            lines.append(f"{label}: {name} (decided by the {by})")
    else:
        for label, det in zip(labels, result):
            lines.append(f"{label}: {len(det.scores)} detection(s)")
            lines += [
                f"  {name:<24} {score:6.3f}  [{', '.join(f'{v:.1f}' for v in box)}]"
                for name, score, box in zip(det.names, det.scores, det.boxes)
            ]
    return "\n".join(lines)
