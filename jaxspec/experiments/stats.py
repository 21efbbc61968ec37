"""Paired statistics for the reproduction: t-intervals over seeds, a paired bootstrap over test images, verdicts.

Every comparison is paired: both models of a pair come from the same seed's
generalist and are scored on the same test images. Over seeds, the unit is a
seed's difference (`t_interval`); over images, the unit is an image, resampled
with both models' outcomes on it kept together (`paired_bootstrap`).
"""

from __future__ import annotations

import base64
import dataclasses
import math

import numpy as np
from scipy import stats

RESAMPLES = 1_000  # image resamples behind a score's replicates (`replicate_interval`)


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(differences, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of per-seed differences (needs >= 2 seeds for a width)."""
    x = np.asarray(differences, np.float64)
    n, mean = len(x), float(np.mean(x))
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * np.std(x, ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def paired_bootstrap(hits_a, hits_b, *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of mean(a) - mean(b) over images resampled with replacement, pairs kept together.

    `hits_a[i]`, `hits_b[i]`: the two models' outcomes (e.g. top-1 correct) on
    image i; with several seeds, pass the seeds' images stacked (each seed's
    pair on its own images), so the pooled difference is resampled as one set.
    """
    a, b = np.asarray(hits_a, np.float64), np.asarray(hits_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need equal 1-d shapes; got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory for large test sets
        idx = rng.integers(0, len(d), size=(min(1000, resamples - start), len(d)))
        means[start : start + len(idx)] = d[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    return Interval(float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), len(d))


def seeds_to_resolve(sd: float, effect: float, confidence: float = 0.95, max_n: int = 10_000) -> int | None:
    """The fewest seeds whose t-interval half-width, at per-seed s.d. `sd`, is at most `effect` (None: > max_n)."""
    for n in range(2, max_n + 1):
        if stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n) <= effect:
            return n
    return None


def verdict(interval: Interval, direction: int = 1) -> str:
    """'reproduced' if the interval excludes 0 in the claimed direction (+1 or -1), 'contradicted' if in the
    other, else 'inconclusive'."""
    if interval.low > 0 or interval.high < 0:
        return "reproduced" if (interval.low > 0) == (direction > 0) else "contradicted"
    return "inconclusive"


def pack_hits(hits: np.ndarray) -> str:
    """Boolean outcomes -> a compact string for a cell's JSON record (`unpack_hits` reverses it)."""
    return f"{len(hits)}:" + base64.b64encode(np.packbits(np.asarray(hits, bool))).decode()


def unpack_hits(text: str) -> np.ndarray:
    n, _, data = text.partition(":")
    return np.unpackbits(np.frombuffer(base64.b64decode(data), np.uint8))[: int(n)].astype(bool)


def pack_floats(values) -> str:
    """Floats -> a compact string for a cell's JSON record (float32; `unpack_floats` reverses it)."""
    data = np.asarray(values, np.float32)
    return f"{len(data)}:" + base64.b64encode(data.tobytes()).decode()


def unpack_floats(text: str) -> np.ndarray:
    n, _, data = text.partition(":")
    out = np.frombuffer(base64.b64decode(data), np.float32).astype(np.float64)
    if len(out) != int(n):
        raise ValueError(f"a packed array says {n} values but holds {len(out)}")
    return out


def replicate_interval(
    replicates_a, replicates_b, *, observed: float, num_images: int, confidence: float = 0.95
) -> Interval:
    """Percentile interval of a - b from each seed's scores under the same image resamples ([seeds, R] each):
    per resample the seeds' differences are averaged, as the effect is. The paired bootstrap of a score
    that is not a mean over images; `observed`: the effect itself, `num_images` per seed (`Interval.n`
    counts all seeds' images, as `paired_bootstrap`'s)."""
    a, b = np.atleast_2d(replicates_a), np.atleast_2d(replicates_b)
    if a.shape != b.shape:
        raise ValueError(f"paired replicates need equal shapes; got {a.shape} and {b.shape}")
    means = (a - b).mean(axis=0)
    tail = (1 - confidence) / 2
    return Interval(observed, float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), num_images * len(a))


def by_setting(records: list[dict], axis: str = "seed") -> list[tuple[dict, list[dict]]]:
    """Cell records grouped by everything but `axis`: `[(setting, records sorted by seed)]`, settings sorted
    (numbers before names on each axis)."""
    by: dict[tuple, list[dict]] = {}
    for rec in records:
        by.setdefault(tuple((k, v) for k, v in rec["cell"].items() if k != axis), []).append(rec)
    return [
        (dict(key), sorted(recs, key=lambda r: r["cell"].get("seed", 0)))
        for key, recs in sorted(by.items(), key=lambda kv: tuple((isinstance(v, str), v) for _, v in kv[0]))
    ]


@dataclasses.dataclass(frozen=True)
class Effect:
    """A paired effect over the seeds of one setting: per-seed values, their t-interval and s.d., and the
    bootstrap over the pooled test images (None when the cells have no per-image outcomes)."""

    values: tuple[float, ...]
    t: Interval
    sd: float
    boot: Interval | None


def paired_effect(records: list[dict], metric: str, pair: tuple[str, str]) -> Effect | None:
    """`metric` (= model a - model b, per seed) over `records` of one setting; None if a record lacks it."""
    if any(metric not in rec["metrics"] for rec in records):
        return None
    values = tuple(float(rec["metrics"][metric]) for rec in records)
    hits = [rec.get("hits", {}) for rec in records]
    reps = [rec.get("replicates", {}) for rec in records]
    boot = None
    if all(f"{m}_hits" in h for h in hits for m in pair):
        a, b = (np.concatenate([unpack_hits(h[f"{m}_hits"]) for h in hits]) for m in pair)
        boot = paired_bootstrap(a, b)
    elif all(m in r for r in reps for m in pair):
        a, b = (np.stack([unpack_floats(r[m]) for r in reps]) for m in pair)
        n = int(records[0]["metrics"].get("test_images", 0))
        boot = replicate_interval(a, b, observed=float(np.mean(values)), num_images=n)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return Effect(values, t_interval(values), sd, boot)
