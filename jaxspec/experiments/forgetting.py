"""Experiment kind `forgetting`: head-only training of the *full* head on D_S (paper Appendix A, Fig. 5b).

The body and its BatchNorm statistics are frozen; all |C| outputs stay in the
softmax while only S's images are seen. Every `eval.every_steps` the run
logs the mean bias of the irrelevant and relevant classes and the mean
probability mass the model puts on irrelevant classes for S's validation
images: the irrelevant classes are driven down, which is what extraction and
suppression get for free. Cell axes: `group`, `seed`, `train` (`head`, the
default, or `full`: the same phase with the whole network trainable, the
reference for how far the irrelevant mass can fall in as many steps), and any
field of `config.specialize` (e.g. `label_smoothing`, whose target keeps
ε(|C|-|S|)/|C| of the mass on the irrelevant classes). The `end_test_*`
metrics are the same statistics on S's test images (up to `TEST_PROBE`).
`experiment.generalist_per_seed` gives each seed its own generalist.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxspec import sharding  # noqa: E402
from jaxspec.data import pipeline  # noqa: E402
from jaxspec.data.constrain import ConstrainedSource  # noqa: E402
from jaxspec.experiments.grid import cell_id  # noqa: E402
from jaxspec.experiments.kind import Kind  # noqa: E402
from jaxspec.experiments.specialize import phase_for, seed_generalist  # noqa: E402
from jaxspec.train import driver, freeze, history  # noqa: E402
from jaxspec.train.task import Outputs  # noqa: E402

PROBE_SIZE = 256
TEST_PROBE = 2048  # all of S's test images on the embedded data (200 a class), in one forward pass
TRAINS = ("head", "full")
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


def _images(source, data_cfg, n: int):
    """The first `n` images of `source` (all of them if fewer), as one array."""
    n = min(n, len(source))
    batch = sharding.fill_devices(n, jax.device_count())  # the eval iterator pads it; the padding is cut
    return next(iter(pipeline.eval_iterator(source, data_cfg, batch_size=batch)))["image"][:n]


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    train = cell.get("train", "head")
    if train not in TRAINS:
        raise ValueError(f"grid axis 'train': {train!r} is not one of {list(TRAINS)}")
    subset, seed = ctx.groups[cell["group"]], int(cell.get("seed", 0))
    gen = seed_generalist(ctx, config, seed)
    rest = [c for c in range(ctx.info.num_classes) if c not in set(subset)]
    phase = phase_for(config, {k: v for k, v in cell.items() if k != "train"})
    if train == "head":
        phase.freeze, phase.freeze_bn_stats = ",".join(freeze.HEAD_ONLY), True
    val_s = ConstrainedSource(ctx.val, subset)
    probe = _probe(ctx, gen.modeldef, subset, _images(val_s, config.data, PROBE_SIZE))
    test_s = ConstrainedSource(ctx.test, subset)
    test_probe = _probe(ctx, gen.modeldef, subset, _images(test_s, config.data, TEST_PROBE))
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
    return {
        **{f"start_{k}": v for k, v in start.items()},
        **{f"end_{k}": v for k, v in end.items()},
        **{f"start_test_{k}": v for k, v in test_probe(gen.state).items()},
        **{f"end_test_{k}": v for k, v in test_probe(s).items()},
    }


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
                    label=", ".join(f"{k} {v}" for k, v in rec["cell"].items()),
                )
                drawn = True
    if not drawn:
        plt.close(fig)
        return []
    for ax, series in zip(axes, _SERIES):
        ax.set(title=series.replace("_", " "), xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "forgetting.png", dpi=120)
    plt.close(fig)
    return ["forgetting.png"]


KIND = Kind(run_cell, plots=plots)
