"""COCO box mAP (mAP@0.5, mAP@0.5:0.95) and YOLOv5's fitness, computed the way pycocotools' COCOeval does.

COCOeval's rules for iouType='bbox', area 'all', maxDets 100, reproduced here:
- per image and class, detections are taken in descending score order (stable), at most `max_dets`;
- each detection matches, at every IoU threshold t in 0.50:0.05:0.95, the unmatched ground-truth box
  of its class with the highest IoU >= t (ties: the later box); crowd boxes are tried only when no
  regular box qualifies, can absorb any number of detections, use IoU = intersection / detection
  area, and a detection matched to one is ignored (neither true nor false positive);
- per class, detections of all images are ranked by score; precision is made monotone from the
  right and read at 101 recall points 0:0.01:1 (0 beyond the last recall reached); AP is their mean;
- an unmatched detection whose signed area w * h lies outside area 'all' (only an inverted box can) is
  ignored rather than a false positive;
- a class without (non-crowd) ground truth has no AP (COCOeval stores -1 and leaves it out of the
  mean, even if it has detections); a class with ground truth but no detections has AP 0.

Host-side NumPy, vectorized over images and thresholds per class (the greedy matching is a loop over
the detection rank within an image, at most `max_dets` steps).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxspec.detection.augment import unletterbox

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # the same floats as COCOeval's Params
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
AREA_ALL = (0.0, 1e5**2)  # COCOeval's area range 'all'


def fitness(map50: float, map50_95: float) -> float:
    """YOLOv5's model-selection score F = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95."""
    return 0.1 * map50 + 0.9 * map50_95


def _pairwise_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """dt [n, 4], gt [n, G, 4] xyxy, crowd [n, G] -> [n, G]; crowd boxes divide by the detection area."""
    lt = np.maximum(dt[:, None, :2], gt[..., :2])
    rb = np.minimum(dt[:, None, 2:], gt[..., 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)
    union = np.where(crowd, area(dt)[:, None], area(dt)[:, None] + area(gt) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _pad(groups: np.ndarray, values: np.ndarray, num_groups: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by `groups` -> [num_groups, max count, ...] plus a validity mask."""
    counts = np.bincount(groups, minlength=num_groups)
    width = max(int(counts.max(initial=0)), 1)
    rank = np.arange(len(groups)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.full((num_groups, width, *values.shape[1:]), fill, values.dtype)
    out[groups, rank] = values
    valid = np.zeros((num_groups, width), bool)
    valid[groups, rank] = True
    return out, valid


def _match_class(dt_img, dt_box, gt_img, gt_box, gt_crowd, thresholds):
    """Greedy COCO matching of one class; inputs sorted by (image, rank). Returns (tp, ignored) [T, D].

    Only detections with IoU >= the lowest threshold to some box of their image can match, and the
    others cannot change what the rest match, so only those enter the rank loop.
    """
    num_t = len(thresholds)
    tp, ignored = np.zeros((num_t, len(dt_img)), bool), np.zeros((num_t, len(dt_img)), bool)
    images, gi = np.unique(gt_img, return_inverse=True)
    slot = np.minimum(np.searchsorted(images, dt_img), max(len(images) - 1, 0))
    rows = np.flatnonzero(images[slot] == dt_img) if len(images) else np.zeros(0, int)
    gts, gvalid = _pad(gi, gt_box, len(images), 0.0)
    crowd, _ = _pad(gi, gt_crowd, len(images), False)
    # Reversed per image, so argmax's first maximum is COCOeval's last one.
    gts, gvalid, crowd = gts[:, ::-1], gvalid[:, ::-1], crowd[:, ::-1]
    di = slot[rows]
    iou = np.where(gvalid[di], _pairwise_iou(dt_box[rows], gts[di], crowd[di]), -1.0)
    thr = np.minimum(thresholds, 1 - 1e-10)
    relevant = iou.max(axis=-1, initial=-1.0) >= thr.min()
    rows, di, iou = rows[relevant], di[relevant], iou[relevant]
    if not len(rows):
        return tp, ignored
    used, ii = np.unique(di, return_inverse=True)
    ious, dvalid = _pad(ii, iou, len(used), -1.0)  # [I, D', G]; padding never matches
    crowd = crowd[used]
    num_i, num_g = len(used), ious.shape[-1]
    bonus = np.where(crowd, 0.0, 2.0)  # a regular box always beats a crowd box
    t_idx, i_idx = np.arange(num_t)[:, None], np.arange(num_i)[None, :]
    taken = np.zeros((num_t, num_i, num_g), bool)
    tp_p, ig_p = np.zeros((num_t, *dvalid.shape), bool), np.zeros((num_t, *dvalid.shape), bool)
    for d in range(ious.shape[1]):
        iou_d = ious[None, :, d, :]
        ok = (iou_d >= thr[:, None, None]) & (~taken | crowd)
        m = np.where(ok, iou_d + bonus, -1.0).argmax(axis=-1)  # [T, I]
        matched = ok[t_idx, i_idx, m]
        is_crowd = crowd[i_idx, m]
        tp_p[:, :, d], ig_p[:, :, d] = matched & ~is_crowd, matched & is_crowd
        taken[t_idx, i_idx, m] |= matched
    tp[:, rows], ignored[:, rows] = tp_p[:, dvalid], ig_p[:, dvalid]
    return tp, ignored


def _precision_at_recalls(tp: np.ndarray, fp: np.ndarray, num_gt) -> np.ndarray:
    """tp, fp [..., D] whole-number counts in score order, num_gt [...] > 0 -> interpolated precision
    [..., R] at RECALL_POINTS, with COCOeval's float comparisons, for every leading index at once."""
    tp_sum, fp_sum = np.cumsum(tp, axis=-1, dtype=float), np.cumsum(fp, axis=-1, dtype=float)
    shape, d = tp_sum.shape[:-1], tp_sum.shape[-1]
    if d == 0:
        return np.zeros((*shape, len(RECALL_POINTS)))
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    precision = np.flip(np.maximum.accumulate(np.flip(precision, -1), axis=-1), -1)  # monotone from the right
    # COCOeval takes, per recall point q, the first detection whose recall tp_sum / num_gt (a float division)
    # is >= q. As tp_sum counts whole detections, that is the first with tp_sum >= `need`, the fewest true
    # positives whose recall reaches q; whole numbers can then be searched exactly for all rows at once.
    n = np.broadcast_to(np.asarray(num_gt, float), shape)[..., None]
    need = np.ceil(RECALL_POINTS * n)
    need -= (need >= 1) & ((need - 1) / n >= RECALL_POINTS)
    need += need / n < RECALL_POINTS
    rows = int(np.prod(shape))
    span = max(float(need.max()), float(tp_sum.max())) + 1  # each row's counts stay below the next row's
    offset = span * np.arange(rows)[:, None]
    flat = (tp_sum.reshape(rows, d) + offset).ravel()
    idx = np.searchsorted(flat, (need.reshape(rows, -1) + offset).ravel(), side="left").reshape(rows, -1)
    idx -= d * np.arange(rows)[:, None]
    out = np.take_along_axis(precision.reshape(rows, d), np.minimum(idx, d - 1), axis=1)
    return np.where(idx < d, out, 0.0).reshape(*shape, len(RECALL_POINTS))


def _check(name: str, arrays: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f"{name} lacks {missing}; expected keys {required} (optional {optional})")
    out = {k: np.asarray(arrays[k]) for k in required + optional if k in arrays}
    n = len(out["image_id"])
    for k, v in out.items():
        if len(v) != n:
            raise ValueError(f"{name}[{k!r}] has {len(v)} rows but {name}['image_id'] has {n}")
    if out["boxes"].shape[1:] != (4,):
        raise ValueError(f"{name}['boxes'] must be [n, 4] xyxy, got shape {out['boxes'].shape}")
    for k in ("image_id", "labels"):
        if (out[k] != np.round(out[k])).any():
            raise ValueError(f"{name}[{k!r}] must hold integers, got {out[k][out[k] != np.round(out[k])][0]}")
        out[k] = out[k].astype(np.int64)
    return out


@dataclasses.dataclass(frozen=True)
class Matches:
    """What COCOeval's per-image matching leaves for accumulation: per class with ground truth, its counted
    detections in COCOeval's ranking (score, descending, stable) as (image row, true positive [T, D], false
    positive [T, D]); and each image's count of regular ground-truth boxes per class [I, K].

    Matching never looks across images, so a resample of the images (the bootstrap) only repeats these
    rows: `accumulate` with per-image weights scores it without matching again.
    """

    num_classes: int
    image_ids: np.ndarray  # [I] the evaluated images, sorted
    gt_counts: np.ndarray  # [I, K]
    ranked: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]


def match(detections: dict, ground_truth: dict, num_classes: int, *, max_dets: int = 100, image_ids=None) -> Matches:
    """COCO bbox matching of flat arrays (see `coco_map`); `image_ids`: every evaluated image, also those
    with neither boxes nor detections (default: the images that have either)."""
    dt = _check("detections", detections, ("image_id", "boxes", "scores", "labels"))
    gt = _check("ground_truth", ground_truth, ("image_id", "boxes", "labels"), ("crowd",))
    crowd = gt["crowd"].astype(bool) if "crowd" in gt else np.zeros(len(gt["labels"]), bool)
    for name, labels in (("detections", dt["labels"]), ("ground_truth", gt["labels"])):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(f"{name} has label {bad[0]} outside 0..{num_classes - 1}")
    inverted = np.flatnonzero((gt["boxes"][:, 2] < gt["boxes"][:, 0]) | (gt["boxes"][:, 3] < gt["boxes"][:, 1]))
    if inverted.size:
        raise ValueError(
            f"ground_truth box {gt['boxes'][inverted[0]].tolist()} (row {inverted[0]}) has x2 < x1 or y2 < y1"
        )
    seen = np.union1d(dt["image_id"], gt["image_id"])
    images = seen if image_ids is None else np.unique(np.asarray(image_ids, np.int64))
    if not np.isin(seen, images).all():
        raise ValueError(f"image {seen[~np.isin(seen, images)][0]} has boxes or detections but is not in image_ids")
    counts = np.zeros((len(images), num_classes), np.int64)
    np.add.at(counts, (np.searchsorted(images, gt["image_id"][~crowd]), gt["labels"][~crowd]), 1)
    # One sort for all classes: by class, image, then score (stable); crowd boxes last within an image.
    d_all = np.lexsort((-dt["scores"], dt["image_id"], dt["labels"]))
    d_bounds = np.searchsorted(dt["labels"][d_all], np.arange(num_classes + 1))
    g_all = np.lexsort((crowd, gt["image_id"], gt["labels"]))
    g_bounds = np.searchsorted(gt["labels"][g_all], np.arange(num_classes + 1))
    ranked = {}
    for k in np.flatnonzero(counts.sum(axis=0)):
        d = d_all[d_bounds[k] : d_bounds[k + 1]]
        img = dt["image_id"][d]
        d = d[np.arange(len(d)) - np.searchsorted(img, img, side="left") < max_dets]
        g = g_all[g_bounds[k] : g_bounds[k + 1]]
        tp, ignored = _match_class(
            dt["image_id"][d],
            dt["boxes"][d].astype(float),
            gt["image_id"][g],
            gt["boxes"][g].astype(float),
            crowd[g],
            IOU_THRESHOLDS,
        )
        # COCOeval ignores unmatched detections outside area range 'all'; only inverted boxes can be.
        wh = dt["boxes"][d, 2:].astype(float) - dt["boxes"][d, :2]
        ignored |= ~tp & ~((wh[:, 0] * wh[:, 1] >= AREA_ALL[0]) & (wh[:, 0] * wh[:, 1] <= AREA_ALL[1]))
        order = np.argsort(-dt["scores"][d], kind="mergesort")  # COCOeval's ranking over all images
        tp, ignored = tp[:, order], ignored[:, order]
        ranked[int(k)] = (np.searchsorted(images, dt["image_id"][d][order]), tp & ~ignored, ~tp & ~ignored)
    return Matches(num_classes, images, counts, ranked)


def _weights(weights, num_images: int) -> np.ndarray:
    w = np.ones(num_images) if weights is None else np.asarray(weights, np.float64)
    if w.shape[-1:] != (num_images,) or (w < 0).any() or (w != np.round(w)).any():
        raise ValueError(f"image weights must be whole counts >= 0 for each of the {num_images} images")
    return w


def accumulate(matches: Matches, weights=None) -> dict:
    """`coco_map`'s scores from `match`'s rows; `weights` [I]: how often each image counts (a bootstrap
    resample; None: once each). Equal to matching the resampled images again (`tests/test_det_metrics.py`)."""
    w = _weights(weights, len(matches.image_ids))
    num_gt = w @ matches.gt_counts
    precision = np.full((len(IOU_THRESHOLDS), len(RECALL_POINTS), matches.num_classes), -1.0)
    for k, (rows, tp, fp) in matches.ranked.items():
        if num_gt[k] > 0:
            precision[:, :, k] = _precision_at_recalls(tp * w[rows], fp * w[rows], num_gt[k])
    has_gt = num_gt > 0
    ap = np.where(has_gt, precision.mean(axis=1), -1.0)  # [T, K]
    map50 = float(ap[0, has_gt].mean()) if has_gt.any() else -1.0  # IOU_THRESHOLDS[0] == 0.5
    map50_95 = float(ap[:, has_gt].mean()) if has_gt.any() else -1.0
    return {
        "mAP50": map50,
        "mAP50_95": map50_95,
        "fitness": fitness(map50, map50_95),
        "AP50_per_class": ap[0],
        "AP50_95_per_class": np.where(has_gt, ap.mean(axis=0), -1.0),
        "num_gt_per_class": num_gt.astype(np.int64) if weights is None else num_gt,
        "precision": precision,
    }


def coco_map(detections: dict, ground_truth: dict, num_classes: int, *, max_dets: int = 100) -> dict:
    """COCO bbox evaluation of flat arrays.

    detections: image_id [D], boxes [D, 4] xyxy, scores [D], labels [D].
    ground_truth: image_id [G], boxes [G, 4] xyxy, labels [G], optional crowd [G] bool.
    Labels are 0..num_classes-1; coordinates in any common frame (IoU is all that matters).

    Returns mAP50, mAP50_95, fitness, per-class AP50 / AP50_95 [num_classes] (-1 where a class has
    no ground truth, as COCOeval), per-class ground-truth counts and precision [T, R, num_classes].
    """
    return accumulate(match(detections, ground_truth, num_classes, max_dets=max_dets))


def resample_weights(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, num_images] multiplicities of images drawn with replacement. They depend only on the
    arguments, so every model scored on the same test images gets the same resamples: a paired bootstrap,
    also across the cells and seeds of a grid."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples)


def bootstrap_scores(matches: Matches, weights: np.ndarray, *, chunk: int = 1 << 22) -> dict[str, np.ndarray]:
    """mAP50, mAP50_95 and fitness [R] of `matches` under each row of `weights` (`resample_weights`): what
    `accumulate` gives row by row, computed for many resamples at once (`chunk` elements per array)."""
    w = _weights(weights, len(matches.image_ids))
    num_gt = w @ matches.gt_counts  # [R, K]
    has_gt = num_gt > 0
    ap = np.zeros((len(w), len(IOU_THRESHOLDS), matches.num_classes))  # [R, T, K]; 0 where no ground truth
    for k, (rows, tp, fp) in matches.ranked.items():
        step = max(1, chunk // max(1, tp.size))
        for s in range(0, len(w), step):
            wk = w[s : s + step, rows][:, None, :]  # [r, 1, D]
            n = np.where(has_gt[s : s + step, k], num_gt[s : s + step, k], 1.0)[:, None]
            ap[s : s + step, :, k] = _precision_at_recalls(tp * wk, fp * wk, n).mean(axis=-1)
    classes = np.maximum(has_gt.sum(axis=1), 1)
    map50 = np.where(has_gt.any(axis=1), (ap[:, 0] * has_gt).sum(axis=1) / classes, -1.0)
    map50_95 = np.where(has_gt.any(axis=1), (ap.mean(axis=1) * has_gt).sum(axis=1) / classes, -1.0)
    return {"mAP50": map50, "mAP50_95": map50_95, "fitness": fitness(map50, map50_95)}


class Evaluator:
    """Collects NMS outputs with their eval batches (`jaxspec.detection.data.eval_iterator`) and scores
    them with `coco_map` in each image's original coordinates, as YOLOv5's val.py does after scale_boxes.

    Images are identified by the batch's `index`; padding images (`valid` False) are skipped. Each
    process sees only its shard: gather the arrays of `detections()`/`ground_truth()` before `result`
    on multi-host runs.
    """

    def __init__(self, num_classes: int, *, max_dets: int = 100):
        self.num_classes, self.max_dets = num_classes, max_dets
        self._dt: list[dict] = []
        self._gt: list[dict] = []
        self._images: list[int] = []

    def add(self, detections, batch: dict) -> None:
        """detections: boxes [B, K, 4] xyxy in the letterboxed frame, scores, classes, valid [B, K]."""
        det = {k: np.asarray(getattr(detections, k)) for k in ("boxes", "scores", "classes", "valid")}
        batch = {
            k: np.asarray(batch[k]) for k in ("valid", "index", "boxes", "labels", "mask", "scale", "pad", "size")
        } | {"crowd": np.asarray(batch["crowd"]) if "crowd" in batch else np.zeros_like(batch["mask"])}
        for b in np.flatnonzero(batch["valid"]):
            self._images.append(int(batch["index"][b]))
            frame = batch["scale"][b], batch["pad"][b], batch["size"][b]
            keep, real = det["valid"][b], batch["mask"][b]
            self._dt.append(
                {
                    "image_id": np.full(keep.sum(), batch["index"][b]),
                    "scores": det["scores"][b][keep],
                    "boxes": unletterbox(det["boxes"][b][keep], *frame),
                    "labels": det["classes"][b][keep],
                }
            )
            self._gt.append(
                {
                    "image_id": np.full(real.sum(), batch["index"][b]),
                    "labels": batch["labels"][b][real],
                    "boxes": unletterbox(batch["boxes"][b][real], *frame),
                    "crowd": batch["crowd"][b][real],
                }
            )

    @staticmethod
    def _concat(parts: list[dict], keys: tuple[str, ...]) -> dict:
        empty = {
            "image_id": np.zeros(0, int),
            "boxes": np.zeros((0, 4)),
            "scores": np.zeros(0),
            "labels": np.zeros(0, int),
            "crowd": np.zeros(0, bool),
        }
        return {k: np.concatenate([p[k] for p in parts]) if parts else empty[k] for k in keys}

    def detections(self) -> dict:
        return self._concat(self._dt, ("image_id", "boxes", "scores", "labels"))

    def ground_truth(self) -> dict:
        return self._concat(self._gt, ("image_id", "boxes", "labels", "crowd"))

    def matches(self) -> Matches:
        """`match` over every image added, those without boxes or detections included (the bootstrap
        resamples them too)."""
        return match(
            self.detections(), self.ground_truth(), self.num_classes, max_dets=self.max_dets, image_ids=self._images
        )

    def result(self) -> dict:
        return accumulate(self.matches())
