"""YOLOv5 train and eval steps, pure and jitted like the classifier's (`jaxspec.train.steps`).

`train_step(state, batch) -> (state, metrics)` runs YOLOv5's loss on a batch
of `jaxspec.detection.data` (uint8 images, padded boxes + mask); `eval_step`
decodes, suppresses and runs NMS on the device, and `Evaluator` turns its
detections into COCO mAP on the host (`jaxspec.detection.metrics`).

Labels in the data are always global class ids; a model's outputs are
described by `classes` (the global class of each output channel, as
`jaxspec.methods.Trained` does), and `constrain.label_map` maps one to the other,
so the same data serve a full head, a sliced head and a scratch specialist.
`class_mask` is output suppression: the classes outside it get no loss and
are never predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspec import sharding
from jaxspec.data.constrain import label_map
from jaxspec.data.pipeline import normalize
from jaxspec.detection import data, metrics, nms, specialize
from jaxspec.detection.boxes import xywh_to_xyxy
from jaxspec.detection.loss import assign_targets, scale_hyp, yolo_loss
from jaxspec.models.yolov5 import ANCHORS, STRIDES, decode
from jaxspec.train import freeze, optimizers, steps
from jaxspec.train.state import ModelDef, TrainState

Batch = dict[str, jax.Array]


def _matched_accuracy(outputs, targets, mask, class_mask, anchor_t) -> jax.Array:
    """Class top-1 (within `class_mask`) at the predictions the class loss trains (YOLOv5's matches)."""
    hits = total = 0.0
    for out, anchors, stride in zip(outputs, ANCHORS, STRIDES, strict=True):
        asg = assign_targets(out.shape[1:3], targets, mask, jnp.asarray(anchors, jnp.float32) / stride, anchor_t)
        logits = out[asg.image, asg.row, asg.col, asg.anchor, 5:]
        pred = jnp.argmax(jnp.where(class_mask, logits, -jnp.inf), axis=-1)
        hits += jnp.sum((pred == asg.cls) & asg.valid)
        total += jnp.sum(asg.valid)
    return hits / jnp.maximum(total, 1)


def auto_sharded(fn: Callable, like: jax.Array) -> Callable:
    """`fn` with the mesh's axes in Auto mode when `like` is split over an Explicit mesh; outputs replicated.

    Sharding in types cannot resolve gathers whose indices select examples of a
    batch-split array (YOLOv5's target assignment, NMS); XLA's propagation can.
    """
    mesh = jax.typeof(like).sharding.mesh
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return fn
    return jax.sharding.auto_axes(fn, axes=mesh.axis_names, out_sharding=NamedSharding(mesh, P()))


def make_train_step(
    modeldef: ModelDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    image_size: int,
    hyp: dict,
    mean: Sequence[float],
    std: Sequence[float],
    label_index: np.ndarray,
    class_mask: np.ndarray,
    freeze_bn_stats: bool = False,
):
    """One phase's step. `hyp` is already scaled (`phase_hyp`); `label_index` maps global labels to outputs.

    The gradient is that of YOLOv5's loss, (box + obj + cls) * batch size, so
    SGD sees YOLOv5's scale; `loss` is logged per image (box + obj + cls), and
    `accuracy` is the class top-1 at the predictions matched to a box.
    """
    label_index, keep = np.asarray(label_index, np.int32), np.asarray(class_mask, bool)

    def loss_and_accuracy(outputs, batch):
        mask = batch["mask"]
        labels = jnp.take(jnp.asarray(label_index), batch["labels"])
        targets = data.to_targets(batch["boxes"], labels, mask, image_size)
        total, parts = yolo_loss(outputs, targets, mask, hyp=hyp, class_mask=jnp.asarray(keep))
        accuracy = _matched_accuracy(
            jax.lax.stop_gradient(outputs), targets, mask, jnp.asarray(keep), hyp.get("anchor_t", 4.0)
        )
        return total, (parts, accuracy)

    def train_step(state: TrainState, batch: Batch):
        x = normalize(batch["image"], mean, std)
        targets = {k: batch[k] for k in ("boxes", "labels", "mask")}

        def loss_fn(params):
            model = modeldef.merge(params, state.batch_stats)
            model.train()
            if freeze_bn_stats:
                model.set_attributes(use_running_average=True, raise_if_not_found=False)
            outputs = model(x)
            total, aux = auto_sharded(loss_and_accuracy, x)(outputs, targets)
            return total, (aux, nnx.state(model, nnx.BatchStat))

        (_, ((parts, accuracy), batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return steps.apply_gradients(
            state,
            tx,
            schedule,
            grads,
            batch_stats,
            loss=parts["box"] + parts["obj"] + parts["cls"],
            **parts,
            accuracy=accuracy,
        )

    return train_step


def yolov5_sgd(cfg, params, *, batch_size: int, steps_per_epoch: int, total_steps: int):
    """YOLOv5's optimizer recipe (train.py, `hyp.scratch-low.yaml`), as one optax transform.

    Nesterov SGD over three groups: kernels with weight decay, BatchNorm scales
    without, biases without. Gradients of `round(nbs / batch_size)` batches are
    summed before each update (YOLOv5's nominal batch `nbs`, weight decay scaled
    to it). The learning rate decays linearly per epoch from lr to lr * lrf; in
    the first max(warmup_epochs, 100 batches) it ramps up from 0 (biases: down
    from warmup_bias_lr) and momentum from warmup_momentum. YOLOv5 also grows the
    accumulation during warm-up; here it is constant. Returns (tx, schedule of the
    kernels' learning rate per batch).
    """
    accumulate = max(round(cfg.nbs / batch_size), 1)
    weight_decay = cfg.weight_decay * batch_size * accumulate / cfg.nbs
    epochs = max(total_steps / steps_per_epoch, 1)
    warmup = max(round(cfg.warmup_epochs * steps_per_epoch), 100)

    def target_lr(batch):
        epoch = jnp.floor(batch / steps_per_epoch)
        return cfg.lr * ((1 - epoch / epochs) * (1 - cfg.lrf) + cfg.lrf)

    def ramp(start, end):
        def f(count):  # count: updates so far; YOLOv5 sets the update's values at the window's last batch
            batch = count * accumulate + accumulate - 1
            return jnp.where(
                batch <= warmup,
                jnp.interp(
                    batch,
                    jnp.array([0.0, warmup]),
                    jnp.stack([jnp.asarray(start, jnp.float32), jnp.asarray(end(batch), jnp.float32)]),
                ),
                end(batch),
            )

        return f

    momentum = ramp(cfg.warmup_momentum, lambda _: cfg.momentum)
    sgd = optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))

    def group(start_lr):
        return sgd(learning_rate=ramp(start_lr, target_lr), momentum=momentum, nesterov=True)

    def label(path, _):
        p = freeze.path_str(path)
        return "bias" if p.endswith("/bias") else ("no_decay" if p.endswith("bn/scale") else "decay")

    labels = jax.tree_util.tree_map_with_path(label, params)
    tx = optax.multi_transform(
        {
            "bias": group(cfg.warmup_bias_lr),
            "no_decay": group(0.0),
            "decay": optax.chain(optax.add_decayed_weights(weight_decay), group(0.0)),
        },
        labels,
    )
    if accumulate > 1:
        tx = optax.MultiSteps(tx, accumulate, use_grad_mean=False).gradient_transformation()
    weights_lr = ramp(0.0, target_lr)
    return tx, lambda step: weights_lr(step // accumulate)


def make_optimizer(phase, params, *, steps_per_epoch: int):
    """`phase.optim` as (tx, schedule): `yolov5_sgd`, or any optimizer of `jaxspec.train.optimizers`;
    then `phase.freeze` (YOLOv5 layer ranges such as `layers:10-12`, or regexes on parameter paths)."""
    if phase.optim.optimizer == "yolov5_sgd":
        tx, schedule = yolov5_sgd(
            phase.optim,
            params,
            batch_size=phase.batch_size,
            steps_per_epoch=max(steps_per_epoch, 1),
            total_steps=phase.steps,
        )
    else:
        tx, schedule = optimizers.make_optimizer(phase.optim, phase.steps)
    return freeze.freeze(tx, params, freeze.parse_patterns(phase.get("freeze", ""))), schedule


def phase_hyp(hyp, *, num_classes: int, image_size: int) -> dict:
    """The config's `hyp` section scaled as YOLOv5's train.py does for this head and image size."""
    return scale_hyp(dict(hyp), num_classes=num_classes, image_size=image_size)


_META = ("boxes", "labels", "mask", "crowd", "valid", "index", "scale", "pad", "size")


def make_eval_step(
    modeldef: ModelDef,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    conf_thres: float,
    iou_thres: float,
    max_det: int,
    max_nms: int,
):
    """`eval_step(state, batch, class_mask) -> (Detections, batch meta)`: decode, suppress, NMS.

    Boxes stay in the letterboxed frame; the batch's ground truth and letterbox
    geometry ride along, so with replicated outputs every process sees the
    whole batch (multi-host evaluation needs no extra gather).
    """

    def eval_step(state: TrainState, batch: Batch, class_mask: jax.Array):
        model = modeldef.merge(state.params, state.batch_stats)
        model.eval()
        dets = detect(
            model,
            batch["image"],
            class_mask,
            mean=mean,
            std=std,
            conf_thres=conf_thres,
            iou_thres=iou_thres,
            max_det=max_det,
            max_nms=max_nms,
        )
        return dets, {k: batch[k] for k in _META}

    return eval_step


def detect(
    model,
    images: jax.Array,
    class_mask: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    conf_thres: float,
    iou_thres: float,
    max_det: int,
    max_nms: int,
    multi_label: bool = True,
) -> nms.Detections:
    """uint8 letterboxed images -> NMS'd detections in that frame (eval mode `model`; jit with the
    keyword arguments static). Evaluation and `jaxspec.predict` both detect through here."""
    x = normalize(images, mean, std)

    def suppress(outputs, keep):
        boxes, objectness, class_probs = decode(outputs)
        return nms.non_max_suppression(
            xywh_to_xyxy(boxes),
            objectness,
            class_probs,
            conf_thres=conf_thres,
            iou_thres=iou_thres,
            max_det=max_det,
            max_nms=max_nms,
            multi_label=multi_label,
            class_mask=keep,
        )

    return auto_sharded(suppress, x)(model(x), class_mask)


class Evaluator:
    """COCO mAP of a detector over a whole source; the step is compiled once per model structure."""

    def __init__(self, modeldef: ModelDef, *, mesh, data_cfg, batch_size: int, mean, std, eval_cfg):
        step = make_eval_step(
            modeldef,
            mean=mean,
            std=std,
            conf_thres=eval_cfg.conf_thres,
            iou_thres=eval_cfg.iou_thres,
            max_det=eval_cfg.max_det,
            max_nms=eval_cfg.max_nms,
        )
        rep = sharding.replicated(mesh)
        self._step = jax.jit(step, in_shardings=(None, sharding.batch_sharding(mesh), rep), out_shardings=rep)
        self._mesh, self._data_cfg, self._batch_size = mesh, data_cfg, batch_size
        self._max_dets = eval_cfg.coco_max_dets

    def collect(self, state: TrainState, source, *, classes: Sequence[int], columns=None) -> metrics.Evaluator:
        """Detections and ground truth of every image of `source` (global labels, each one of the model's
        outputs `classes`), in original image coordinates with labels as output positions."""
        index = label_map(source.info.num_classes, classes)
        keep = specialize.class_mask(len(classes), columns)
        found = metrics.Evaluator(len(classes), max_dets=self._max_dets)
        for batch in data.eval_iterator(source, self._data_cfg, batch_size=self._batch_size):
            batch = {k: v for k, v in batch.items() if k in ("image", *_META)}
            det, meta = jax.device_get(self._step(state, sharding.put_batch(batch, self._mesh), keep))
            meta["labels"] = np.where(meta["mask"], index[meta["labels"]], 0)
            if (meta["labels"] < 0).any():
                raise ValueError(f"the ground truth has classes outside the model's outputs {list(classes)}")
            found.add(det, meta)
        return found

    def __call__(self, state: TrainState, source, *, classes: Sequence[int], columns=None) -> dict:
        """mAP50, mAP50_95, fitness and per-class AP of a model whose output j is global class `classes[j]`,
        on `source`; `columns` suppresses the other outputs."""
        return self.score(self.collect(state, source, classes=classes, columns=columns), source, classes)

    @staticmethod
    def score(found: metrics.Evaluator, source, classes: Sequence[int]) -> dict:
        """The scores of `collect`'s detections, so one pass over `source` can be both scored and drawn."""
        m = found.result()
        per_class = {
            source.info.class_names[c]: float(m["AP50_95_per_class"][j])
            for j, c in enumerate(classes)
            if m["num_gt_per_class"][j] > 0
        }
        return {
            "mAP50": m["mAP50"],
            "mAP50_95": m["mAP50_95"],
            "fitness": m["fitness"],
            "images": len(source),
            "boxes": int(m["num_gt_per_class"].sum()),
            "AP50_95_per_class": per_class,
        }
