"""The main job: generalist -> extracted specialist -> evaluation on S.

Each phase checkpoints into the workdir, so rerunning the same command on a
finished or interrupted workdir resumes from the latest checkpoint instead of
starting over; a finished phase is only evaluated again.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

import jax
import ml_collections
import optax
from clu import metric_writers
from flax import nnx

from jaxspec import evaluate, models, sharding, specialize
from jaxspec.data import pipeline, sources
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.subsets import resolve_subset
from jaxspec.train import checkpoint, loop, optimizers, steps
from jaxspec.train.state import ModelDef, TrainState, create_state, to_model

TORCHVISION_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


def _model_spec(config, num_classes: int) -> dict:
    return dict(
        name=config.model.name,
        num_classes=num_classes,
        width_multiplier=config.model.width_multiplier,
        dropout_rate=config.model.dropout_rate,
    )


def _new_model(config, num_classes: int, seed: int) -> nnx.Module:
    spec = _model_spec(config, num_classes)
    return models.get_model(
        spec.pop("name"), spec.pop("num_classes"), rngs=nnx.Rngs(seed), depthwise=config.model.depthwise, **spec
    )


def _load_generalist(config, num_classes: int) -> nnx.Module:
    """The generalist named by `config.generalist.init`: exported model or torchvision weights."""
    init = config.generalist.init
    if init.endswith(TORCHVISION_SUFFIXES):
        model = models.load_torchvision_file(init, config.model.name)
    else:
        model, _ = checkpoint.load_model(init)
    got = model.head.out_features
    if got != num_classes:
        raise ValueError(
            f"generalist.init={init!r} has {got} classes but dataset {config.data.name!r} has {num_classes}"
        )
    return model


class Runner:
    """Shared context of one run: mesh, data, writer, workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = sharding.make_mesh()
        self.writer = metric_writers.create_default_writer(
            str(self.workdir / "tensorboard"), just_logging=jax.process_index() > 0
        )
        d = config.data
        kw = dict(data_dir=d.data_dir, manifest=d.manifest)
        self.train = sources.get_source(d.name, d.train_split, **kw)
        self.val = sources.get_source(d.name, d.val_split, **kw)
        self.test = sources.get_source(d.name, d.test_split, **kw)
        self.info = self.train.info
        self.subset = resolve_subset(config.specialize.subset, self.info)
        self._evaluators: dict = {}

    def evaluator(self, modeldef: ModelDef, num_classes: int, columns=None):
        """An `Evaluator`, compiled once per model structure and column choice."""
        key = (modeldef.graphdef, num_classes, None if columns is None else tuple(columns))
        if key not in self._evaluators:
            self._evaluators[key] = evaluate.Evaluator(
                modeldef,
                mesh=self.mesh,
                data_cfg=self.config.data,
                batch_size=self.config.eval.batch_size,
                mean=self.info.mean,
                std=self.info.std,
                num_classes=num_classes,
                columns=columns,
            )
        return self._evaluators[key]

    def train_phase(self, name: str, model: nnx.Module, source, val, phase, seed: int) -> tuple[ModelDef, TrainState]:
        """Trains `model` on `source` for `phase.steps` (validating on `val`), resuming from checkpoints."""
        tx, schedule = optimizers.make_optimizer(phase.optim, phase.steps)
        modeldef, state = create_state(model, tx, seed)
        state = sharding.replicate(state, self.mesh)
        data_iter = pipeline.train_iterator(source, self.config.data, batch_size=phase.batch_size, seed=seed)
        ckpt = checkpoint.Checkpointer(self.workdir / "checkpoints" / name)
        if ckpt.latest_step() is not None:
            state = ckpt.restore(checkpoint.abstract_like(state), data_iter)
            logging.info("%s: resumed from step %d", name, int(state.step))
        if int(state.step) < phase.steps:
            train_step = steps.make_train_step(
                modeldef, tx, schedule, mean=self.info.mean, std=self.info.std, label_smoothing=phase.label_smoothing
            )
            val_eval = self.evaluator(modeldef, source.info.num_classes)
            state = loop.fit(
                name,
                state,
                steps.jit_train_step(train_step, self.mesh),
                data_iter,
                num_steps=phase.steps,
                batch_size=phase.batch_size,
                mesh=self.mesh,
                ckpt=ckpt,
                writer=self.writer,
                log_every=self.config.log_every,
                checkpoint_every=self.config.checkpoint_every,
                eval_every=self.config.eval.every_steps,
                eval_fn=lambda s: {"val_top1": val_eval(s, val)["top1"]},
            )
        ckpt.close()
        return modeldef, state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole job and returns (and writes) its results."""
    t0 = time.time()
    r = Runner(config, workdir)
    info, subset = r.info, r.subset
    if jax.process_index() == 0:
        print(f"jaxspec: {info.name} ({info.num_classes} classes), S = {config.specialize.subset!r} "
              f"({len(subset)} classes), {jax.device_count()} {jax.default_backend()} device(s)", flush=True)

    # Phase 1: the generalist, trained here or loaded.
    if config.generalist.init:
        generalist = _load_generalist(config, info.num_classes)
        gen_def, gen_state = create_state(generalist, optax.identity(), config.seed)
        gen_state = sharding.replicate(gen_state, r.mesh)
    else:
        generalist = _new_model(config, info.num_classes, config.seed)
        gen_def, gen_state = r.train_phase("generalist", generalist, r.train, r.val, config.generalist, config.seed)
    generalist = to_model(gen_def, gen_state)
    checkpoint.export_model(r.workdir / "models" / "generalist", generalist,
                            {**_model_spec(config, info.num_classes), "class_names": list(info.class_names)})

    # Phase 2: extract the specialist and fine-tune it on D_S.
    train_s, test_s = ConstrainedSource(r.train, subset), ConstrainedSource(r.test, subset)
    extracted = specialize.extract(generalist, subset)
    ext_def, ext_state = create_state(extracted, optax.identity(), 0)
    ext_state = sharding.replicate(ext_state, r.mesh)
    val_s = ConstrainedSource(r.val, subset)
    spec_def, spec_state = r.train_phase("specialist", extracted, train_s, val_s, config.specialize, config.seed + 1)
    specialist = to_model(spec_def, spec_state)
    checkpoint.export_model(r.workdir / "models" / "specialist", specialist,
                            {**_model_spec(config, len(subset)), "subset": list(subset),
                             "class_names": list(train_s.info.class_names)})

    # Evaluation on S (test split), plus the generalist's own numbers for context.
    restricted = r.evaluator(gen_def, len(subset), columns=subset)(gen_state, test_s)
    untuned = r.evaluator(ext_def, len(subset))(ext_state, test_s)
    tuned = r.evaluator(spec_def, len(subset))(spec_state, test_s)
    gen_eval = r.evaluator(gen_def, info.num_classes)
    gen_all = gen_eval(gen_state, r.test)
    gen_train = gen_eval(gen_state, r.train)  # the paper's precondition: not zero training loss

    rows = [
        ("generalist restricted to S", restricted),
        ("extracted specialist, untuned", untuned),
        ("specialist, tuned", tuned),
    ]
    table = evaluate.results_table(rows, f"model (test split, S = {config.specialize.subset}, {len(subset)} classes)")
    results = {
        "config": config.to_dict(),
        "subset": list(subset),
        "subset_names": list(train_s.info.class_names),
        "test_on_S": {name: m for name, m in rows},
        "extraction_exact": restricted["top1"] == untuned["top1"] and restricted["top2"] == untuned["top2"],
        "generalist_test_all_classes": gen_all,
        "generalist_train_eval_mode": {k: gen_train[k] for k in ("top1", "loss")},
        "seconds": time.time() - t0,
    }
    if jax.process_index() == 0:
        tmp = r.workdir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, r.workdir / "results.json")
        print("\n" + table)
        print(f"\ngeneralist on all {info.num_classes} classes: top-1 {100 * gen_all['top1']:.2f}%; "
              f"on its training data (eval mode): top-1 {100 * gen_train['top1']:.2f}%, loss {gen_train['loss']:.4f}")
        print(f"results: {r.workdir / 'results.json'}  ({results['seconds']:.0f}s)", flush=True)
    r.writer.close()
    return results
