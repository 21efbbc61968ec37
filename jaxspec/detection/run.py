"""The detection main job: generalist YOLOv5 on all classes -> specialist(s) on S -> F / mAP table.

The paper's section 4 in one command: a generalist detector trained on every
class, then a specialist for S made by domain constraining (train only on
images with an object of S, only S's boxes) plus output suppression or head
slicing (`specialize.method`), optionally beside a specialist trained from
scratch on the same data (`specialize.scratch`). `specialize.subset='animals>horse'`
specializes gradually, each stage's specialist the next one's parent. Every
model is scored on S's test images (`jaxspec.detection.train.Evaluator`):
F = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95. Phases checkpoint into the workdir and
resume as the classifier's do (`jaxspec.run`).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

import jax
import ml_collections
from clu import metric_writers
from flax import nnx

from jaxspec import methods, models, sharding, tables, validate
from jaxspec.data.subsets import parse_stages
from jaxspec.detection import data
from jaxspec.detection import specialize as dspec
from jaxspec.detection import train as dtrain
from jaxspec.methods import restricted
from jaxspec.specialize import compose_subsets
from jaxspec.train import checkpoint, history, loop, steps
from jaxspec.train import workdir as wdir
from jaxspec.train.state import ModelDef, TrainState, create_state

METHODS = ("suppress", "slice", "scratch")


class Runner:
    """Shared context of one detection run: mesh, data, writer, workdir (as `jaxspec.run.Runner`)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = sharding.make_mesh(fsdp=config.sharding.fsdp)
        self.writer = metric_writers.create_default_writer(
            str(self.workdir / "tensorboard"), just_logging=jax.process_index() > 0)
        if jax.process_index() == 0:
            self.writer = metric_writers.MultiWriter([self.writer, history.JsonlWriter(self.workdir / "metrics.jsonl")])
        d = config.data
        self.train, self.val, self.test = (data.get_source(d, split) for split in (d.train_split, d.val_split,
                                                                                   d.test_split))
        self.info = self.train.info
        self.stages = parse_stages(config.specialize.subset, self.info)
        self.subset = self.stages[0]
        self.groups = dict(self.info.groups)
        self.groupings: dict[str, tuple[str, ...]] = {}
        self._evaluators: dict = {}
        self._generalist: methods.Trained | None = None

    def new_model(self, num_classes: int, seed: int) -> nnx.Module:
        return models.get_model(self.config.model.name, num_classes, rngs=nnx.Rngs(seed),
                                dtype=self.config.model.dtype)

    def constrained(self, source, subset: Sequence[int] | None):
        """`source` kept to images with an object of `subset` and to its boxes; global labels (None: all)."""
        if subset is None or len(subset) == self.info.num_classes:
            return source
        return data.ConstrainedDetectionSource(source, subset, remap=False)

    def evaluator(self, modeldef: ModelDef) -> dtrain.Evaluator:
        """One compiled eval step per model structure; suppression is an argument, not a recompile."""
        key = modeldef.graphdef
        if key not in self._evaluators:
            self._evaluators[key] = dtrain.Evaluator(
                modeldef, mesh=self.mesh, data_cfg=self.config.data, batch_size=self.config.eval.batch_size,
                mean=self.info.mean, std=self.info.std, eval_cfg=self.config.eval)
        return self._evaluators[key]

    def evaluate(self, trained: methods.Trained, subset: Sequence[int] | None, source=None) -> dict:
        """F, mAP@0.5, mAP@0.5:0.95 and per-class AP of `trained` on `subset`'s test images."""
        source = self.constrained(self.test if source is None else source, subset)
        return self.evaluator(trained.modeldef)(trained.state, source, classes=trained.classes,
                                                columns=trained.columns)

    def generalist(self) -> methods.Trained:
        """The generalist on every class, trained here (resuming); computed once."""
        if self._generalist is None:
            n, seed = self.info.num_classes, self.config.seed
            classes = tuple(range(n))
            d, s = self.train_phase("generalist", self.new_model(n, seed), classes, None, None,
                                    self.config.generalist, seed)
            self._generalist = methods.Trained(d, s, classes)
        return self._generalist

    def train_phase(self, name: str, model: nnx.Module, classes: Sequence[int], columns: Sequence[int] | None,
                    subset: Sequence[int] | None, phase, seed: int) -> tuple[ModelDef, TrainState]:
        """Trains `model` (output j = global class `classes[j]`, only `columns` scored) on `subset`'s data
        for `phase.steps`, validating every `eval.every_steps`, resuming from checkpoints under `name`."""
        cfg = self.config
        train_src, val_src = self.constrained(self.train, subset), self.constrained(self.val, subset)
        phase = with_steps(phase, len(train_src))
        tx, schedule = dtrain.make_optimizer(phase, nnx.state(model, nnx.Param),
                                             steps_per_epoch=len(train_src) // phase.batch_size)
        modeldef, state = create_state(model, tx, seed)
        state = sharding.place_state(state, self.mesh)  # replicated, or split over 'fsdp'
        data_iter = data.train_iterator(train_src, cfg.data, batch_size=phase.batch_size, seed=seed)
        fingerprint = wdir.phase_fingerprint(phase=phase, seed=seed, data_cfg=cfg.data, source=train_src, start=model,
                                             spec=models.describe(model), classes=list(classes),
                                             columns=None if columns is None else list(columns),
                                             hyp=cfg.hyp.to_dict())
        ckpt = checkpoint.Checkpointer(self.workdir / "checkpoints" / name, fingerprint=fingerprint,
                                       overwrite=cfg.get("overwrite", False))
        if ckpt.latest_step() is not None:
            state = ckpt.restore(checkpoint.abstract_like(state), data_iter)
            loop.announce_restore(name, int(state.step), phase.steps)
        if int(state.step) < phase.steps:
            scored = len(classes) if columns is None else len(columns)
            step = dtrain.make_train_step(
                modeldef, tx, schedule, image_size=cfg.data.image_size,
                hyp=dtrain.phase_hyp(cfg.hyp, num_classes=scored, image_size=cfg.data.image_size),
                mean=self.info.mean, std=self.info.std, label_index=dtrain.output_index(classes, self.info.num_classes),
                class_mask=dspec.class_mask(len(classes), columns), freeze_bn_stats=phase.get("freeze_bn_stats", False))
            val_eval = self.evaluator(modeldef)

            def eval_fn(s):
                m = val_eval(s, val_src, classes=classes, columns=columns)
                return {f"val_{k}": m[k] for k in tables.DETECTION_SCORES}

            jitted = steps.jit_train_step(step, self.mesh, sharding.state_shardings(state, self.mesh))
            state = loop.fit(name, state, jitted, data_iter, num_steps=phase.steps,
                             batch_size=phase.batch_size, mesh=self.mesh, ckpt=ckpt, writer=self.writer,
                             log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                             eval_every=cfg.eval.every_steps, eval_fn=eval_fn)
        ckpt.close()
        return modeldef, state

    def export(self, name: str, trained: methods.Trained) -> None:
        """workdir/models/<name>: weights + what a user needs to read the outputs."""
        checkpoint.export_model(self.workdir / "models" / name, trained.model, {
            "output_classes": list(trained.classes),
            "class_names": [self.info.class_names[c] for c in trained.classes],
            "columns": None if trained.columns is None else list(trained.columns),
            "image_size": self.config.data.image_size,
        }, preprocess=data.preprocess_record(self.config.data, self.info),
            classes=checkpoint.classes_record(trained.classes, self.info.class_names))


def with_steps(phase, num_images: int) -> ml_collections.ConfigDict:
    """`phase` with `steps` set from `epochs` over `num_images` when `epochs` > 0 (D_S's size is known only here)."""
    epochs = phase.get("epochs", 0)
    if epochs <= 0 and phase.steps <= 0:
        raise ValueError(f"a training phase needs steps > 0 or epochs > 0; got steps={phase.steps}, epochs={epochs}")
    if epochs <= 0:
        return phase
    out = ml_collections.ConfigDict(phase.to_dict())
    out.steps = max(1, round(epochs * num_images / phase.batch_size))
    return out


def specialize_from(r: Runner, parent: methods.Trained, subset: Sequence[int], method: str, *, seed: int,
                    name: str, phase=None) -> methods.Trained:
    """The `method` specialist for `subset` (global classes) from `parent`, trained on D_S under `name`.

    suppress: the parent's head, only S's class outputs scored; slice: the
    head sliced to S's 5 + |S| channels per anchor; scratch: a new |S|-class
    detector trained with `config.scratch`.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown detection specialization method {method!r}; choose one of {list(METHODS)}")
    subset = tuple(int(c) for c in subset)
    phase = phase or r.config.specialize
    pos = compose_subsets(parent.classes, subset)
    if method == "suppress":
        d, s = r.train_phase(name, parent.model, parent.classes, pos, subset, phase, seed)
        return methods.Trained(d, s, parent.classes, tuple(pos))
    if method == "slice":
        start = dspec.slice_head(parent.model, pos)
    else:
        start, phase = r.new_model(len(subset), seed), r.config.scratch
    d, s = r.train_phase(name, start, subset, None, subset, phase, seed)
    return methods.Trained(d, s, subset)


def specialize_stage(r: Runner, parent: methods.Trained, subset, k: int) -> tuple[methods.Trained, list]:
    """One stage of (possibly gradual) specialization and its rows of the results table."""
    cfg, seed = r.config.specialize, r.config.seed + 1 + k
    suffix = "" if k == 0 else f"_{k + 1}"
    rows = [("generalist restricted to S", restricted(r.generalist(), subset))]
    if k > 0:
        rows.append(("parent specialist restricted to S", restricted(parent, subset)))
    if cfg.method == "slice":
        untuned = dspec.slice_head(parent.model, compose_subsets(parent.classes, subset))
        rows.append(("sliced specialist, untuned", methods.frozen(r, untuned, subset)))
    trained = specialize_from(r, parent, subset, cfg.method, seed=seed, name=f"specialist{suffix}")
    rows.append((f"specialist ({cfg.method}), tuned", trained))
    if cfg.scratch:
        scratch = specialize_from(r, parent, subset, "scratch", seed=seed, name=f"scratch{suffix}")
        rows.append(("scratch specialist (same data)", scratch))
    r.export(f"specialist{suffix}", trained)
    return trained, [(row, r.evaluate(t, subset)) for row, t in rows]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole detection job and returns (and writes) its results (config checked, workdir locked)."""
    validate.check(config)
    with wdir.opened(workdir, config.to_dict(), overwrite=config.get("overwrite", False)):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    t0 = time.time()
    r = Runner(config, workdir)
    info, lead = r.info, jax.process_index() == 0
    if lead:
        chain = " > ".join(f"{len(s)} classes" for s in r.stages)
        print(f"jaxspec detect: {info.name} ({info.num_classes} classes), {config.model.name} at "
              f"{config.data.image_size} px, S = {config.specialize.subset!r} ({chain}), method "
              f"{config.specialize.method}, {jax.device_count()} {jax.default_backend()} device(s)", flush=True)
    generalist = r.generalist()
    r.export("generalist", generalist)
    parent, stages, printed = generalist, [], []
    for k, subset in enumerate(r.stages):
        parent, rows = specialize_stage(r, parent, subset, k)
        metrics = dict(rows)
        stage = {"subset": list(subset), "subset_names": [info.class_names[c] for c in subset],
                 "method": config.specialize.method, "test_on_S": metrics}
        if "sliced specialist, untuned" in metrics:
            ref = metrics["parent specialist restricted to S" if k else "generalist restricted to S"]
            stage["slicing_exact"] = all(metrics["sliced specialist, untuned"][s] == ref[s] for s in tables.DETECTION_SCORES)
        stages.append(stage)
        spec = str(config.specialize.subset).split(">")[k]
        printed.append(tables.detection(rows, f"model (test split, S = {spec}, {len(subset)} classes)"))
    gen_all = r.evaluate(generalist, None)
    results = {"config": config.to_dict(), "stages": stages, "generalist_test_all_classes": gen_all,
               "seconds": time.time() - t0}
    if lead:
        from jaxspec import report  # matplotlib is imported only once a report is written

        report.finish(r.workdir, results, printed, f"generalist on all {info.num_classes} classes: F "
                      f"{100 * gen_all['fitness']:.2f}, mAP@0.5 {100 * gen_all['mAP50']:.2f}, mAP@0.5:0.95 "
                      f"{100 * gen_all['mAP50_95']:.2f}")
    r.writer.close()
    return results
