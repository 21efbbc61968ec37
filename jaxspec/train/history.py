"""Scalar metrics as JSON lines, for curves and reports after (or during) a run.

TensorBoard event files are for TensorBoard; plots, reports and the
experiments command read this plain file instead. A resumed run appends: the
steps redone after the last checkpoint are logged again, and `read_history`
keeps the last value logged for each (metric, step).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    """A clu writer that appends `{"step": s, name: value, ...}` lines; ignores non-scalars."""

    def __init__(self, path: str | pathlib.Path):
        self._path = pathlib.Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path, "a")  # noqa: SIM115 -- closed by close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_texts(self, step, texts) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_history(path: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """`{metric: [(step, value), ...]}` sorted by step, last write per step winning."""
    values: dict[str, dict[int, float]] = {}
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption
            continue
        step = record.pop("step")
        for k, v in record.items():
            values.setdefault(k, {})[step] = v
    return {k: sorted(v.items()) for k, v in values.items()}
