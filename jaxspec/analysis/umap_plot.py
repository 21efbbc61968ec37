"""UMAP embeddings of penultimate features, relevant classes in colour.

Side-by-side 2-D embeddings of the generalist's and the specialist's
features on the same examples show whether specialization spreads the
relevant classes (S) apart and how it treats the classes it no longer
predicts (grey). Embeddings are deterministic by `seed` (umap-learn's
`random_state`, which also makes it single-threaded).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GREY = (0.75, 0.75, 0.75, 1.0)


def embed(x: np.ndarray, *, seed: int, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """[n, d] features -> [n, 2] UMAP embedding; the same `seed` gives the same embedding."""
    import umap  # a heavy import (numba, and TensorFlow for ParametricUMAP): only when embedding

    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"UMAP needs an [n >= 3, d] feature matrix, got shape {x.shape}")
    reducer = umap.UMAP(
        n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist, random_state=seed, n_jobs=1
    )
    return np.asarray(reducer.fit_transform(x), np.float32)


def class_colors(num: int) -> np.ndarray:
    """`num` distinguishable RGBA colours (tab10 / tab20, then a continuous map)."""
    name = "tab10" if num <= 10 else "tab20" if num <= 20 else "turbo"
    cmap = plt.get_cmap(name)
    return cmap(np.arange(num)) if num <= 20 else cmap(np.linspace(0.0, 1.0, num))


def plot_panels(
    panels: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray,
    class_names: Sequence[str],
    relevant: Sequence[int],
    path,
    *,
    title: str = "",
) -> None:
    """One scatter per (title, [n, 2] embedding); classes in `relevant` coloured, the rest grey."""
    labels = np.asarray(labels)
    colors = class_colors(len(relevant))
    is_rel = np.isin(labels, relevant)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 5.0), squeeze=False)
    for ax, (name, emb) in zip(axes[0], panels, strict=True):
        if len(emb) != len(labels):
            raise ValueError(f"Panel {name!r} has {len(emb)} points for {len(labels)} labels")
        if (~is_rel).any():
            ax.scatter(*emb[~is_rel].T, s=4, color=GREY, label="other classes", rasterized=True)
        for color, c in zip(colors, relevant, strict=True):
            pts = emb[labels == c]
            ax.scatter(*pts.T, s=6, color=color, label=class_names[c], rasterized=True)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(relevant) <= 20:
        axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def umap_figures(
    feats: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    relevant: Sequence[int],
    out_dir,
    *,
    seed: int,
) -> dict[str, dict[str, np.ndarray]]:
    """Writes umap.png (all examples, per model) and umap_relevant.png (relevant classes only).

    `feats` maps a model's name to its [n, d] features of the same n examples.
    Returns the embeddings: {"all": {model: [n, 2]}, "relevant": {model: [n_S, 2]}}.
    """
    labels = np.asarray(labels)
    unknown = sorted({int(c) for c in relevant} - set(range(len(class_names))))
    if unknown:
        raise ValueError(f"Relevant classes {unknown} are not among the {len(class_names)} classes")
    rel = np.isin(labels, relevant)
    if not rel.any():
        raise ValueError(f"None of the {len(labels)} examples belongs to the relevant classes {list(relevant)}")
    out_dir = pathlib.Path(out_dir)
    emb = {
        "all": {k: embed(v, seed=seed) for k, v in feats.items()},
        "relevant": {k: embed(np.asarray(v)[rel], seed=seed) for k, v in feats.items()},
    }
    n_rel = len(relevant)
    plot_panels(
        list(emb["all"].items()),
        labels,
        class_names,
        relevant,
        out_dir / "umap.png",
        title=f"UMAP of penultimate features: {n_rel} relevant classes in colour, others grey",
    )
    plot_panels(
        list(emb["relevant"].items()),
        labels[rel],
        class_names,
        relevant,
        out_dir / "umap_relevant.png",
        title=f"UMAP of penultimate features, relevant classes only ({n_rel})",
    )
    return emb
