"""Experiment kind `cka` (paper Fig. 3): how similar a specialist stays to its generalist, layer by layer.

Cell axes: `group`, `method` (default `config.specialize.method`), `seed`.
The specialist is trained exactly as the `specialize` kind trains it (same
checkpoint name), from the seed's generalist with
`experiment.generalist_per_seed`. Metrics: the minibatch linear CKA of each
layer with the same layer of the other model (`cka_<layer>`), on S's test
images, and `cka_drop` = CKA at the first layer minus CKA at the last layer
both models share in width (`pre_logits`): how much the similarity falls with
depth. `plots` draws the same-layer curve with a band over seeds.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxspec import methods, sharding
from jaxspec.analysis import cka
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.experiments.grid import cell_id
from jaxspec.experiments.kind import Kind
from jaxspec.experiments.specialize import seed_generalist

LAST_SHARED = "pre_logits"  # the logits differ in width (|S| against |C|) and mean different things


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    if cell.get("group") not in ctx.groups:
        raise ValueError(f"a `cka` cell needs a known `group`; got {cell.get('group')!r}, known: {sorted(ctx.groups)}")
    subset, seed = tuple(ctx.groups[cell["group"]]), int(cell.get("seed", 0))
    method = cell.get("method", config.specialize.method)
    gen = seed_generalist(ctx, config, seed)
    name = f"cell-{cell_id({'group': cell['group'], 'method': method, 'seed': seed})}"
    spec = methods.specialize_from(ctx, gen, subset, method, seed=seed, name=name)
    layers = [n for n in gen.model.layer_names if n != "logits"]
    batch = sharding.fill_devices(config.eval.batch_size, ctx.mesh.size)
    result = cka.minibatch_cka(
        gen.model,
        spec.model,
        ConstrainedSource(ctx.test, subset),
        layers_a=layers,
        layers_b=layers,
        mesh=ctx.mesh,
        data_cfg=config.data,
        batch_size=max(batch, cka.MIN_BATCH),
        mean=ctx.info.mean,
        std=ctx.info.std,
        seed=seed,
    )
    same = cka.same_layer(result)
    return {**{f"cka_{k}": v for k, v in same.items()}, "cka_drop": same[layers[0]] - same[LAST_SHARED]}


def plots(ctx, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    """cka.png: same-layer CKA per layer in forward order, mean and min-max band over seeds, per group."""
    from matplotlib.figure import Figure

    from jaxspec.plots import save

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for group in sorted({r["cell"]["group"] for r in results}):
        rows = [r["metrics"] for r in results if r["cell"]["group"] == group]
        layers = [k[len("cka_") :] for k in rows[0] if k.startswith("cka_") and k != "cka_drop"]
        values = np.array([[m[f"cka_{n}"] for n in layers] for m in rows])
        x = np.arange(len(layers))
        ax.plot(x, values.mean(0), marker="o", label=f"{group} (n={len(rows)})")
        ax.fill_between(x, values.min(0), values.max(0), alpha=0.2)
        ax.set_xticks(x, layers, rotation=60, fontsize=7)
    ax.set(ylabel="linear CKA, generalist vs specialist", title="same-layer CKA (band: min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [save(fig, pathlib.Path(out_dir) / "cka.png", dpi=120).name]


KIND = Kind(run_cell, plots=plots)
