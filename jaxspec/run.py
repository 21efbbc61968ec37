"""The main job: generalist -> specialist(s) -> evaluation on S.

`specialize.method` picks how the specialist is made (see `jaxspec.methods`);
`specialize.subset='animals>livestock'` specializes gradually, each stage's
specialist being the next one's generalist. Each phase checkpoints into the workdir, so rerunning the same command on a
finished or interrupted workdir resumes from the latest checkpoint instead of
starting over; a finished phase is only evaluated again.
"""

from __future__ import annotations

import pathlib
import time

import jax
import ml_collections
from clu import metric_writers
from flax import nnx

from jaxspec import evaluate, methods, models, sharding, specialize, tables, validate
from jaxspec.data import datasets, pipeline
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.subsets import parse_stages
from jaxspec.train import batchnorm, checkpoint, freeze, history, loop, optimizers, steps
from jaxspec.train import workdir as wdir
from jaxspec.train.state import ModelDef, TrainState, create_state


def _model_spec(config, num_classes: int) -> dict:
    return dict(
        name=config.model.name,
        num_classes=num_classes,
        width_multiplier=config.model.width_multiplier,
        dropout_rate=config.model.dropout_rate,
    )


def _load_generalist(config, num_classes: int) -> nnx.Module:
    """The generalist named by `config.generalist.init`: exported model or torchvision weights."""
    init = config.generalist.init
    if init.endswith(validate.TORCHVISION_SUFFIXES):
        model = models.load_torchvision_file(init, config.model.name, dtype=config.model.dtype)
    else:
        model, _ = checkpoint.load_model(init, dtype=config.model.dtype)
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
        self.mesh = sharding.make_mesh(fsdp=config.sharding.fsdp)
        self.writer = metric_writers.create_default_writer(
            str(self.workdir / "tensorboard"), just_logging=jax.process_index() > 0
        )
        if jax.process_index() == 0:
            self.writer = metric_writers.MultiWriter([self.writer, history.JsonlWriter(self.workdir / "metrics.jsonl")])
        d = config.data
        self.train, self.val, self.test = (datasets.open_split(d, split)
                                           for split in (d.train_split, d.val_split, d.test_split))
        self.info = self.train.info
        self.stages = parse_stages(config.specialize.subset, self.info)
        self.subset = self.stages[0]
        self.groups = dict(self.info.groups)  # named subsets; the experiments command adds groupings
        self.groupings: dict[str, tuple[str, ...]] = {}  # grouping name -> its group names
        self._evaluators: dict = {}
        self._generalists: dict[int, methods.Trained] = {}

    def new_model(self, num_classes: int, seed: int) -> nnx.Module:
        """A freshly initialized model of the configured architecture."""
        spec = _model_spec(self.config, num_classes)
        return models.get_model(spec.pop("name"), spec.pop("num_classes"), rngs=nnx.Rngs(seed),
                                depthwise=self.config.model.depthwise, dtype=self.config.model.dtype, **spec)

    def generalist(self, seed: int | None = None) -> methods.Trained:
        """The generalist of `seed` (default `config.seed`), trained here (resuming) or loaded from
        `generalist.init` (the same for every seed); computed once per seed.

        Paired experiments train one per seed, so that seeds are independent
        replicates of the whole pipeline; `config.seed`'s is the phase `generalist`.
        """
        config, n = self.config, self.info.num_classes
        seed = config.seed if seed is None or config.generalist.init else int(seed)
        if seed not in self._generalists:
            if config.generalist.init:
                self._generalists[seed] = methods.frozen(self, _load_generalist(config, n), range(n))
            else:
                name = "generalist" if seed == config.seed else f"generalist-seed{seed}"
                d, s = self.train_phase(name, self.new_model(n, seed), self.train, self.val, config.generalist, seed)
                self._generalists[seed] = methods.Trained(d, s, tuple(range(n)))
        return self._generalists[seed]

    def export(self, name: str, trained: methods.Trained, subset) -> None:
        """Writes `trained` to workdir/models/<name> with what a user needs to read its outputs."""
        checkpoint.export_model(self.workdir / "models" / name, trained.model, {
            "subset": list(subset),
            "class_names": [self.info.class_names[c] for c in subset],
            "output_classes": list(trained.classes),
            "columns": None if trained.columns is None else list(trained.columns),
        }, preprocess=pipeline.preprocess_record(self.config.data, self.info),
            classes=checkpoint.classes_record(trained.classes, self.info.class_names))

    def evaluator(self, modeldef: ModelDef, num_classes: int, columns=None, confusion: bool = False,
                  per_example: bool = False):
        """An `Evaluator`, compiled once per model structure and column choice."""
        key = (modeldef.graphdef, num_classes, None if columns is None else tuple(columns), confusion, per_example)
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
                confusion=confusion,
                per_example=per_example,
            )
        return self._evaluators[key]

    def train_phase(self, name: str, model: nnx.Module, source, val, phase, seed: int,
                    columns=None, extra_eval=None) -> tuple[ModelDef, TrainState]:
        """Trains `model` on `source` for `phase.steps` (validating on `val`), resuming from checkpoints.

        `phase.freeze` / `phase.freeze_bn_stats` freeze parameters and BatchNorm
        statistics; `phase.reestimate_bn` recomputes the statistics for the final
        weights on `source` (`jaxspec.train.batchnorm`); `columns` suppresses every other output (see `make_train_step`).
        `extra_eval(state) -> {name: value}` adds values to each validation.
        """
        tx, schedule = optimizers.make_optimizer(phase.optim, phase.steps)
        tx = freeze.freeze(tx, nnx.state(model, nnx.Param), freeze.parse_patterns(phase.get("freeze", "")))
        modeldef, state = create_state(model, tx, seed)
        state = sharding.place_state(state, self.mesh)  # replicated, or split over 'fsdp'
        data_iter = pipeline.train_iterator(source, self.config.data, batch_size=phase.batch_size, seed=seed)
        fingerprint = wdir.phase_fingerprint(phase=phase, seed=seed, data_cfg=self.config.data, source=source,
                                                start=model, spec=models.describe(model),
                                                extendable=optimizers.length_free(phase.optim),
                                                columns=None if columns is None else list(columns))
        ckpt = checkpoint.Checkpointer(self.workdir / "checkpoints" / name, fingerprint=fingerprint,
                                       overwrite=self.config.get("overwrite", False))
        if ckpt.latest_step() is not None:
            state = ckpt.restore(checkpoint.abstract_like(state), data_iter)
            loop.announce_restore(name, int(state.step), phase.steps)
        if int(state.step) < phase.steps:
            train_step = steps.make_train_step(
                modeldef, tx, schedule, mean=self.info.mean, std=self.info.std, label_smoothing=phase.label_smoothing,
                columns=columns, freeze_bn_stats=phase.get("freeze_bn_stats", False),
            )
            num_scored = source.info.num_classes if columns is None else len(columns)
            val_eval = self.evaluator(modeldef, num_scored, columns)
            state = loop.fit(
                name,
                state,
                steps.jit_train_step(train_step, self.mesh, sharding.state_shardings(state, self.mesh)),
                data_iter,
                num_steps=phase.steps,
                batch_size=phase.batch_size,
                mesh=self.mesh,
                ckpt=ckpt,
                writer=self.writer,
                log_every=self.config.log_every,
                checkpoint_every=self.config.checkpoint_every,
                eval_every=self.config.eval.every_steps,
                eval_fn=lambda s: {"val_top1": val_eval(s, val)["top1"], **(extra_eval(s) if extra_eval else {})},
            )
        ckpt.close()
        return modeldef, self.final_bn_stats(modeldef, state, source, phase)

    def final_bn_stats(self, modeldef: ModelDef, state, source, phase):
        """`state`, with BatchNorm statistics recomputed on `source` for its final weights if
        `phase.reestimate_bn` (models trained from scratch, whose running averages lag the weights)."""
        if not phase.get("reestimate_bn", False):
            return state
        batches = pipeline.eval_iterator(source, self.config.data, batch_size=phase.batch_size)
        return batchnorm.reestimate(modeldef, state, batches, mesh=self.mesh, mean=self.info.mean, std=self.info.std)


def specialize_stage(r: Runner, parent: methods.Trained, subset, k: int) -> tuple[methods.Trained, list]:
    """One stage of (possibly gradual) specialization and its rows of the results table."""
    cfg, seed = r.config.specialize, r.config.seed + 1 + k
    name = "specialist" if k == 0 else f"specialist_{k + 1}"
    test_s = ConstrainedSource(r.test, subset)
    rows = [("generalist restricted to S", methods.restricted(r.generalist(), subset))]
    if k > 0:
        rows.append(("parent specialist restricted to S", methods.restricted(parent, subset)))
    if cfg.control:
        control = methods.specialize_from(r, parent, subset, "continued", seed=seed, name=f"{name}-control")
        rows.append((f"{'generalist' if k == 0 else 'parent'} trained further on its data (control)", control))
    if cfg.method == "extract":
        untuned = specialize.extract(parent.model, specialize.compose_subsets(parent.classes, subset))
        rows.append(("extracted specialist, untuned", methods.frozen(r, untuned, subset)))
    trained = methods.specialize_from(r, parent, subset, cfg.method, seed=seed, name=name)
    rows.append((f"specialist ({cfg.method}), tuned", trained))
    r.export(name, trained, subset)
    return trained, [(row, methods.evaluate_on(r, t, test_s)) for row, t in rows]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole job and returns (and writes) its results.

    The config is checked whole first (`jaxspec.validate`), then the workdir
    is locked and checked against it (`jaxspec.train.workdir`).
    """
    validate.check(config)
    with wdir.opened(workdir, config.to_dict(), overwrite=config.get("overwrite", False)):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    t0 = time.time()
    r = Runner(config, workdir)
    info = r.info
    if jax.process_index() == 0:
        chain = " > ".join(f"{len(s)} classes" for s in r.stages)
        print(f"jaxspec: {info.name} ({info.num_classes} classes), S = {config.specialize.subset!r} ({chain}), "
              f"method {config.specialize.method}, {jax.device_count()} {jax.default_backend()} device(s)",
              flush=True)

    generalist = r.generalist()
    r.export("generalist", generalist, range(info.num_classes))
    parent, stages, printed = generalist, [], []
    for k, subset in enumerate(r.stages):
        parent, rows = specialize_stage(r, parent, subset, k)
        metrics = dict(rows)
        stage = {
            "subset": list(subset),
            "subset_names": [info.class_names[c] for c in subset],
            "method": config.specialize.method,
            "test_on_S": metrics,
        }
        if "extracted specialist, untuned" in metrics:
            untuned = metrics["extracted specialist, untuned"]
            ref = metrics["parent specialist restricted to S"] if k > 0 else metrics["generalist restricted to S"]
            stage["extraction_exact"] = untuned["top1"] == ref["top1"] and untuned["top2"] == ref["top2"]
        stages.append(stage)
        spec = config.specialize.subset.split(">")[k]
        printed.append(tables.classification(rows, f"model (test split, S = {spec}, {len(subset)} classes)"))

    gen_eval = r.evaluator(generalist.modeldef, info.num_classes)
    gen_all = gen_eval(generalist.state, r.test)
    gen_train = gen_eval(generalist.state, r.train)  # the paper's precondition: not zero training loss
    results = {
        "config": config.to_dict(),
        "stages": stages,
        "generalist_test_all_classes": gen_all,
        "generalist_train_eval_mode": {k: gen_train[k] for k in ("top1", "loss")},
        "seconds": time.time() - t0,
    }
    if jax.process_index() == 0:
        from jaxspec import report  # matplotlib is imported only once a report is written

        report.finish(r.workdir, results, printed, f"generalist on all {info.num_classes} classes: top-1 "
                      f"{100 * gen_all['top1']:.2f}%; on its training data (eval mode): top-1 "
                      f"{100 * gen_train['top1']:.2f}%, loss {gen_train['loss']:.4f}")
    r.writer.close()
    return results
