"""Experiment kind `forgetting`: head-only training of the *full* head on D_S (paper Appendix A, Fig. 5b).

The body and its BatchNorm statistics are frozen; all |C| outputs stay in the
softmax while only S's images are seen. Every `eval.every_steps` the run
logs the mean bias of the irrelevant and relevant classes and the mean
probability mass the model puts on irrelevant classes for S's validation
images: the irrelevant classes are driven down, which is what extraction and
suppression get for free. Cell axes: `group`, `seed`.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxspec.data import pipeline  # noqa: E402
from jaxspec.data.constrain import ConstrainedSource  # noqa: E402
from jaxspec.experiments.grid import cell_id  # noqa: E402
from jaxspec.experiments.kind import Kind  # noqa: E402
from jaxspec.methods import generalist  # noqa: E402
from jaxspec.train import driver, freeze, history  # noqa: E402
from jaxspec.train.task import Outputs  # noqa: E402

PROBE_SIZE = 256
_SERIES = ("irrelevant_bias", "relevant_bias", "irrelevant_prob")


def _probe(ctx, modeldef, subset, images):
    """A jitted `state -> {series: value}` on fixed validation images of S."""
    relevant = np.zeros(ctx.info.num_classes, bool)
    relevant[list(subset)] = True
    x = pipeline.normalize(jnp.asarray(images), ctx.info.mean, ctx.info.std)

    @jax.jit
    def stats(state):
        model = modeldef.merge(state.params, state.batch_stats)
        model.eval()
        probs = jax.nn.softmax(model(x))
        bias = state.params["head"]["bias"][...]
        return {
            "irrelevant_bias": bias[~relevant].mean(),
            "relevant_bias": bias[relevant].mean(),
            "irrelevant_prob": probs[:, ~relevant].sum(-1).mean(),
        }

    return lambda state: {k: float(v) for k, v in stats(state).items()}


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    subset, seed = ctx.groups[cell["group"]], int(cell.get("seed", 0))
    gen = generalist(ctx)
    rest = [c for c in range(ctx.info.num_classes) if c not in set(subset)]
    phase = ml_collections.ConfigDict(config.specialize.to_dict())
    phase.freeze, phase.freeze_bn_stats = ",".join(freeze.HEAD_ONLY), True
    val_s = ConstrainedSource(ctx.val, subset)
    images = next(iter(pipeline.eval_iterator(val_s, config.data, batch_size=PROBE_SIZE)))["image"]
    probe = _probe(ctx, gen.modeldef, subset, images[: min(PROBE_SIZE, len(val_s))])
    start = probe(gen.state)
    # S's labels index the first |S| of these columns; every output stays in the softmax.
    d, s = driver.train_phase(
        ctx,
        f"forget-{cell_id(cell)}",
        gen.model,
        ConstrainedSource(ctx.train, subset),
        val_s,
        phase,
        seed,
        outputs=Outputs.of(columns=(*subset, *rest)),
        extra_eval=probe,
    )
    end = probe(s)
    return {**{f"start_{k}": v for k, v in start.items()}, **{f"end_{k}": v for k, v in end.items()}}


def plots(ctx, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    hist = history.read_history(ctx.workdir / "metrics.jsonl")
    fig, axes = plt.subplots(1, len(_SERIES), figsize=(4.5 * len(_SERIES), 3.4))
    drawn = False
    for rec in results:
        name = f"forget-{cell_id(rec['cell'])}"
        for ax, series in zip(axes, _SERIES):
            points = hist.get(f"{name}/{series}")
            if points:
                start = rec["metrics"][f"start_{series}"]
                ax.plot(
                    [0] + [p for p, _ in points],
                    [start] + [v for _, v in points],
                    label=f"{rec['cell']['group']} seed {rec['cell'].get('seed', 0)}",
                )
                drawn = True
    if not drawn:
        plt.close(fig)
        return []
    for ax, series in zip(axes, _SERIES):
        ax.set(title=series.replace("_", " "), xlabel="head-only step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "forgetting.png", dpi=120)
    plt.close(fig)
    return ["forgetting.png"]


KIND = Kind(run_cell, plots=plots)
