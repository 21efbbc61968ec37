"""Evaluation over a whole source: top-1/top-2, loss, per-class accuracy (and, on request, each example's hit).

Sums are computed on device per batch (`make_eval_step`) and added up on the
host, so every example counts once however the last batch is padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxspec import sharding
from jaxspec.data import pipeline
from jaxspec.data.sources import Source
from jaxspec.train import steps
from jaxspec.train.state import ModelDef, TrainState


class Evaluator:
    """Compiles an eval step once and runs it over sources on demand."""

    def __init__(
        self,
        modeldef: ModelDef,
        *,
        mesh: jax.sharding.Mesh,
        data_cfg,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        columns: Sequence[int] | None = None,
        confusion: bool = False,
        per_example: bool = False,
    ):
        step = steps.make_eval_step(
            modeldef,
            mean=mean,
            std=std,
            num_classes=num_classes,
            columns=columns,
            confusion=confusion,
            per_example=per_example,
        )
        self._step = steps.jit_eval_step(step, mesh)
        self._mesh, self._data_cfg, self._batch_size = mesh, data_cfg, batch_size

    def __call__(self, state: TrainState, source: Source) -> dict[str, float | list[float]]:
        totals, hits = None, []
        it = pipeline.eval_iterator(source, self._data_cfg, batch_size=self._batch_size)
        for batch in it:
            out = self._step(state, sharding.put_batch(batch, self._mesh))
            if "hits" in out:  # per example: kept in order, padding dropped
                hit, mask = out.pop("hits"), out.pop("mask")
                hits.append(np.asarray(hit)[np.asarray(mask)])
            totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
        totals = jax.tree.map(np.asarray, jax.device_get(totals))
        n = float(totals["count"])
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = totals["class_top1"] / totals["class_count"]
        extra = {"confusion": totals["confusion"]} if "confusion" in totals else {}
        if hits:
            extra["hits"] = np.concatenate(hits)
        return {
            **extra,
            "count": n,
            "top1": float(totals["top1"]) / n,
            "top2": float(totals["top2"]) / n,
            "loss": float(totals["loss"]) / n,
            "per_class_top1": [float(x) for x in per_class],
        }
