"""Command line: `python -m jaxspec.analysis --workdir=RUN_DIR` analyses a finished `jaxspec.main` run.

Reads the run's results.json (its data config) and its exported generalist
and specialist (RUN_DIR/models/), and writes to `--out` (default
RUN_DIR/analysis): cka.json, cka_heatmap.png, cka_same_layer.png (linear CKA
between every generalist and specialist layer) and umap.png,
umap_relevant.png (UMAP of both models' penultimate features).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags

from jaxspec import files, sharding
from jaxspec.analysis import cka, features, umap_plot
from jaxspec.cli import start
from jaxspec.data import datasets
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.train.checkpoint import load_model

ESTIMATORS = ("minibatch", "full")
CKA_ON = ("relevant", "all")

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished jaxspec.main run directory.")
_OUT = flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/analysis).")
_SPLIT = flags.DEFINE_string("split", "", "Dataset split to analyse (default: the run's data.val_split).")
_PER_CLASS = flags.DEFINE_integer("per_class", 50, "UMAP: examples per class.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Batch size (default: the run's eval batch size).")
_LAYERS = flags.DEFINE_list("layers", [], "CKA: layer names (default: every layer of each model).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the CKA batch order, the UMAP examples and UMAP itself.")
_ESTIMATOR = flags.DEFINE_enum(
    "estimator",
    "minibatch",
    ESTIMATORS,
    "CKA: minibatch (unbiased HSIC, any dataset size) or full (all activations in memory).",
)
_CKA_ON = flags.DEFINE_enum(
    "cka_on", "relevant", CKA_ON, "CKA on the relevant classes' examples (the specialist's domain) or on all."
)
_SPATIAL = flags.DEFINE_enum(
    "spatial", "flatten", features.SPATIAL, "CKA: flatten spatial maps (Kornblith et al.) or average them over space."
)
_SPECIALIST = flags.DEFINE_string("specialist", "specialist", "Which model under WORKDIR/models/ is the specialist.")


def _json_safe(x):
    """Arrays to lists, non-finite numbers to null (strict JSON)."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _layers(model, wanted: Sequence[str], role: str) -> list[str]:
    if not wanted:
        return list(model.layer_names)
    unknown = [n for n in wanted if n not in model.layer_names]
    if unknown:
        raise ValueError(f"Unknown --layers {unknown} for the {role}; valid names: {list(model.layer_names)}")
    return list(wanted)


def analyse(
    workdir,
    *,
    out=None,
    split: str = "",
    per_class: int = 50,
    batch_size: int = 0,
    layers: Sequence[str] = (),
    seed: int = 0,
    estimator: str = "minibatch",
    cka_on: str = "relevant",
    spatial: str = "flatten",
    specialist: str = "specialist",
) -> dict:
    """CKA and UMAP of a finished run's generalist vs specialist; returns what cka.json holds."""
    for name, value, choices in (("estimator", estimator, ESTIMATORS), ("cka_on", cka_on, CKA_ON)):
        if value not in choices:
            raise ValueError(f"Unknown {name}={value!r}; choose one of {list(choices)}")
    workdir = pathlib.Path(workdir)
    if not (workdir / "results.json").exists():
        raise FileNotFoundError(f"{workdir} is not a finished jaxspec.main run (no results.json)")
    config = json.loads((workdir / "results.json").read_text())["config"]
    out = pathlib.Path(out) if out else workdir / "analysis"
    generalist, _ = load_model(workdir / "models" / "generalist")
    spec_model, spec_meta = load_model(workdir / "models" / specialist)
    layers_a, layers_b = _layers(generalist, layers, "generalist"), _layers(spec_model, layers, "specialist")
    subset = [int(c) for c in spec_meta["subset"]]
    data_cfg = ml_collections.ConfigDict(config["data"])
    split = split or data_cfg.val_split
    source = datasets.open_split(data_cfg, split)
    info = source.info
    if not batch_size:  # the run's eval batch, rounded up to fill every device
        batch_size = sharding.fill_devices(config["eval"]["batch_size"], jax.device_count())
    mesh = sharding.make_mesh()
    common = {"mesh": mesh, "data_cfg": data_cfg, "batch_size": batch_size, "mean": info.mean, "std": info.std}
    main = jax.process_index() == 0

    cka_source = ConstrainedSource(source, subset) if cka_on == "relevant" else source
    if main:
        print(
            f"jaxspec.analysis: {workdir}: generalist vs {specialist} on {info.name} {split} "
            f"(S = {len(subset)} classes); {estimator} CKA on {cka_on} examples ({len(cka_source)}), "
            f"{len(layers_a)}x{len(layers_b)} layers, batch {batch_size}, {jax.device_count()} "
            f"{jax.default_backend()} device(s)",
            flush=True,
        )
    kw = dict(layers_a=layers_a, layers_b=layers_b, spatial=spatial, **common)
    if estimator == "minibatch":
        result = cka.minibatch_cka(generalist, spec_model, cka_source, seed=seed, **kw)
    else:
        result = cka.full_cka(generalist, spec_model, cka_source, **kw)

    umap_source = features.per_class(source, per_class, seed=seed)
    feats = features.collect([generalist, spec_model], [["pre_logits"]] * 2, umap_source, **common)
    record = {
        "workdir": str(workdir),
        "split": split,
        "specialist": specialist,
        "cka_on": cka_on,
        "subset": subset,
        "subset_names": [info.class_names[c] for c in subset],
        "seed": seed,
        "estimator": estimator,
        "spatial": spatial,
        "batch_size": batch_size,
        "num_examples": result["num_examples"],
        "layers_generalist": layers_a,
        "layers_specialist": layers_b,
        "cka": result["cka"],
        "same_layer": cka.same_layer(result),
        "cka_generalist_layers": result["cka_aa"],
        "cka_specialist_layers": result["cka_bb"],
        "umap": {"per_class": per_class, "num_examples": len(umap_source)},
    }
    record = _json_safe(record)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        names = ("generalist", specialist)
        cka.plot_heatmap(result, out / "cka_heatmap.png", names=names)
        cka.plot_same_layer(result, out / "cka_same_layer.png", names=names)
        umap_plot.umap_figures(
            {"generalist": feats[0]["pre_logits"], specialist: feats[1]["pre_logits"]},
            umap_source.labels,
            info.class_names,
            subset,
            out,
            seed=seed,
        )
        files.write_json(out / "cka.json", record, indent=1)
        same = "  ".join(f"{k} {v:.3f}" for k, v in record["same_layer"].items() if v is not None)
        print(
            f"same-layer CKA: {same}\nwrote {out}/{{cka.json, cka_heatmap.png, cka_same_layer.png, "
            f"umap.png, umap_relevant.png}}",
            flush=True,
        )
    return record


def main(argv):
    start(argv)
    analyse(
        _WORKDIR.value,
        out=_OUT.value,
        split=_SPLIT.value,
        per_class=_PER_CLASS.value,
        batch_size=_BATCH_SIZE.value,
        layers=_LAYERS.value,
        seed=_SEED.value,
        estimator=_ESTIMATOR.value,
        cka_on=_CKA_ON.value,
        spatial=_SPATIAL.value,
        specialist=_SPECIALIST.value,
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
