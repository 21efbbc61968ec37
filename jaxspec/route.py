"""The dynamically configured system (paper Table 2, Fig. 1c): the generalist routes, one specialist decides.

The generalist predicts a class; the specialist whose group holds that class
makes the final decision among its own outputs. A specialist is described by
its `label_map`: for each head output, the generalist class it stands for, or
-1 for a dustbin ("not mine", Hinton et al.); when a specialist picks its
dustbin, or the generalist's class is in no group, the generalist's answer stands.

Cost is one generalist pass plus about one specialist pass per image, not K:
the K specialists (one architecture, heads of any size) are stacked along a
leading axis, heads padded to the widest with outputs that can never win.
Inside one jitted function the examples are laid out by group into a buffer of
static length in chunks of `chunk` examples, each group's segment padded to a
whole number of chunks, and a loop runs only the chunks in use, each with its
group's parameters picked by index. That is at most B + K·(chunk−1) specialist
examples, typically about B + K·chunk/2.

Sharded, routing is local: under `shard_map` each device routes its own slice
of the batch over the `data` axis, with no communication, so results equal a
single device's and the padding bound holds per device (B_local + K·(chunk−1)); the default
chunk is therefore chosen from the per-device batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxspec import sharding, specialize
from jaxspec.data import pipeline
from jaxspec.data.sources import Source
from jaxspec.train.loop import Progress
from jaxspec.train.state import ModelDef, split_model, stack

DUSTBIN = -1
NO_GROUP = -1


def default_chunk(batch: int, num_groups: int) -> int:
    """Chunk size for a (per-device) batch: worst-case padding K·(c−1) stays under ~1/4 of the batch."""
    return max(1, min(batch, batch // (4 * num_groups)))


def buffer_size(batch: int, num_groups: int, chunk: int) -> int:
    """Static buffer length: every group's segment rounded up to whole chunks always fits."""
    return (batch + num_groups * (chunk - 1)) // chunk * chunk


def _head_width(params: nnx.State, head: str) -> int:
    if head not in params:
        raise KeyError(f"No layer named {head!r} in the specialist's parameters; top-level names: {sorted(params)}")
    return params[head]["kernel"].shape[-1]


def _pad_head(params: nnx.State, width: int, head: str) -> nnx.State:
    """The head widened to `width` outputs whose logit is always `SUPPRESSED` (zero weights)."""
    extra = width - _head_width(params, head)
    out = jax.tree.map(lambda x: x, params)
    out[head]["kernel"] = jax.tree.map(
        lambda k: jnp.pad(k, [(0, 0)] * (k.ndim - 1) + [(0, extra)]), params[head]["kernel"]
    )
    if "bias" in params[head]:
        out[head]["bias"] = jax.tree.map(
            lambda b: jnp.pad(b, (0, extra), constant_values=specialize.SUPPRESSED), params[head]["bias"]
        )
    return out


def _check_same_arch(trees: Sequence, what: str) -> None:
    """Every tree must match the first one's structure and shapes (heads already padded)."""
    ref = jax.tree_util.tree_flatten_with_path(trees[0])[0]
    for k, tree in enumerate(trees[1:], 1):
        got = jax.tree_util.tree_flatten_with_path(tree)[0]
        if [p for p, _ in got] != [p for p, _ in ref]:
            names = {jax.tree_util.keystr(p) for p, _ in got} ^ {jax.tree_util.keystr(p) for p, _ in ref}
            raise ValueError(
                f"specialist {k} has a different architecture from specialist 0: {what} "
                f"differ at {sorted(names)[:5] or 'their order'}"
            )
        for (path, a), (_, b) in zip(got, ref):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"specialist {k} has a different architecture from specialist 0: {what} "
                    f"{jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
                )


def _check_label_maps(label_maps, widths: Sequence[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Label maps padded with -1 into one [K, width] table, and the class -> group table."""
    table = np.full((len(label_maps), max(widths)), DUSTBIN, np.int32)
    class_to_group = np.full(num_classes, NO_GROUP, np.int32)
    for k, (lm, width) in enumerate(zip(label_maps, widths)):
        lm = np.asarray(lm)
        if lm.ndim != 1 or not np.issubdtype(lm.dtype, np.integer):
            raise ValueError(f"label_maps[{k}] must be a 1-D list of integers, got {lm!r}")
        if lm.size != width:
            raise ValueError(f"label_maps[{k}] has {lm.size} entries but specialist {k}'s head has {width} outputs")
        bad = lm[(lm < DUSTBIN) | (lm >= num_classes)]
        if bad.size:
            raise ValueError(
                f"label_maps[{k}] values {bad.tolist()} are out of range: use 0..{num_classes - 1} "
                f"(the generalist's classes) or {DUSTBIN} for a dustbin"
            )
        classes = lm[lm >= 0]
        if classes.size == 0:
            raise ValueError(f"label_maps[{k}] has no class, only dustbins: {lm.tolist()}")
        if np.unique(classes).size != classes.size:
            raise ValueError(f"label_maps[{k}] names a class twice: {lm.tolist()}")
        taken = classes[class_to_group[classes] != NO_GROUP]
        if taken.size:
            raise ValueError(
                f"groups overlap: classes {taken.tolist()} are in both specialist "
                f"{class_to_group[taken[0]]} and specialist {k}; each class needs one specialist"
            )
        class_to_group[classes] = k
        table[k, : lm.size] = lm
    return table, class_to_group


def _generalist_pred(gen_def: ModelDef, params, x: jax.Array) -> jax.Array:
    model = gen_def.merge(*params)
    model.eval()
    return jnp.argmax(model(x), -1).astype(jnp.int32)


def _route_local(
    gen_def: ModelDef, spec_def: ModelDef, chunk: int | None, mean, std, params, tables, images
) -> dict[str, jax.Array]:
    """Routing of one device's batch; see the module docstring for the layout."""
    x = pipeline.normalize(images, mean, std)
    gen_pred = _generalist_pred(gen_def, params["generalist"], x)
    group = tables["class_to_group"][gen_pred]
    k, b = tables["label_maps"].shape[0], x.shape[0]
    c = min(chunk, b) if chunk else default_chunk(b, k)
    size = buffer_size(b, k, c)

    member = (group[:, None] == jnp.arange(k)).astype(jnp.int32)  # [b, K]; unrouted rows are all zero
    segment = -(-member.sum(0) // c) * c  # each group's segment: its examples rounded up to whole chunks
    ends = jnp.cumsum(segment)
    starts = ends - segment
    rank = jnp.sum((jnp.cumsum(member, 0) - 1) * member, 1)  # position within its group, in batch order
    slot = jnp.where(group >= 0, starts[jnp.maximum(group, 0)] + rank, size)  # `size` = not routed: dropped
    buf = jnp.zeros((size, *x.shape[1:]), x.dtype).at[slot].set(x, mode="drop")
    num_chunks = ends[-1] // c

    def run_chunk(j, out):
        g = jnp.sum(ends <= j * c)  # the segment this chunk lies in
        model = spec_def.merge(*jax.tree.map(lambda p: p[g], params["specialists"]))
        model.eval()
        logits = model(jax.lax.dynamic_slice_in_dim(buf, j * c, c))
        cls = tables["label_maps"][g][jnp.argmax(logits, -1)]
        return jax.lax.dynamic_update_slice_in_dim(out, cls, j * c, 0)

    init = jax.lax.pcast(jnp.full((size,), DUSTBIN, jnp.int32), ("data",), to="varying")  # per device, as the loop's
    out = jax.lax.fori_loop(0, num_chunks, run_chunk, init)
    spec_pred = out.at[slot].get(mode="fill", fill_value=DUSTBIN)
    used = spec_pred >= 0
    return {
        "pred": jnp.where(used, spec_pred, gen_pred),
        "generalist_pred": gen_pred,
        "group": group,
        "used_specialist": used,
        "chunks": num_chunks[None].astype(jnp.int32),
    }


@dataclasses.dataclass(frozen=True)
class RoutedSystem:
    """A generalist and K stacked specialists, placed on `mesh`; see `build_routed`."""

    generalist_def: ModelDef
    specialist_def: ModelDef
    params: dict  # {'generalist': (params, stats), 'specialists': (stacked params, stacked stats)}, replicated
    tables: dict  # {'label_maps': [K, width] int32, -1 = dustbin/padding; 'class_to_group': [C] int32, -1 = none}
    groups: tuple[tuple[int, ...], ...]
    mesh: jax.sharding.Mesh
    chunk: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _predict: Callable = dataclasses.field(repr=False)
    _generalist: Callable = dataclasses.field(repr=False)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_classes(self) -> int:
        return int(self.tables["class_to_group"].shape[0])

    def chunk_for(self, batch: int) -> int:
        """The chunk size used for a global batch of `batch` images."""
        local = batch // self.mesh.size
        return min(self.chunk, local) if self.chunk else default_chunk(local, self.num_groups)

    def buffer_for(self, batch: int) -> int:
        """Specialist examples each device can run at most for a global batch of `batch` images."""
        return buffer_size(batch // self.mesh.size, self.num_groups, self.chunk_for(batch))

    def put(self, images) -> jax.Array:
        """This process's host batch as a global array split over `data` (placed arrays pass through)."""
        placed = isinstance(images, jax.Array)
        devices = self.mesh.size if placed else len(self.mesh.local_devices)
        if images.shape[0] % devices:
            raise ValueError(f"batch of {images.shape[0]} images is not divisible by the {devices} devices")
        if placed:
            return images
        return sharding.put_batch({"image": images}, self.mesh)["image"]

    def predict(self, images) -> dict[str, jax.Array]:
        """uint8 NHWC images -> per-image `pred` (final class), `generalist_pred`, `group` (-1: no
        specialist), `used_specialist` (False: no group, or the specialist chose its dustbin); and
        `chunks`, the specialist chunks each device ran (cost: `chunks * chunk_for(B)` examples)."""
        return self._predict(self.params, self.tables, self.put(images))

    def generalist_predict(self, images) -> jax.Array:
        """The generalist's argmax alone, the baseline the routed system is measured against."""
        return self._generalist(self.params["generalist"], self.put(images))


def build_routed(
    generalist: nnx.Module,
    specialists: Sequence[nnx.Module],
    label_maps: Sequence[Sequence[int]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: jax.sharding.Mesh | None = None,
    chunk: int | None = None,
    head: str = "head",
) -> RoutedSystem:
    """Stacks `specialists` behind `generalist` and compiles the routed prediction.

    `label_maps[k][j]` is the generalist class (0..C−1) of specialist k's
    output j, or -1 for a dustbin; specialist k's group is the classes its map
    names, and groups may not overlap. A `suppress` specialist enters as
    `specialize.extract(model, columns)`, see `as_specialist`. `chunk` is the
    chunk size (default: `default_chunk` of the per-device batch).
    """
    if not specialists or len(specialists) != len(label_maps):
        raise ValueError(
            f"need one label map per specialist and at least one: got {len(specialists)} "
            f"specialists and {len(label_maps)} label maps"
        )
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    mesh = sharding.make_mesh() if mesh is None else mesh
    gen_def, gen_params, gen_stats = split_model(generalist)
    num_classes = _head_width(gen_params, head)
    splits = [split_model(s) for s in specialists]
    widths = [_head_width(p, head) for _, p, _ in splits]
    table, class_to_group = _check_label_maps(label_maps, widths, num_classes)
    params = [_pad_head(p, max(widths), head) for _, p, _ in splits]
    stats = [s for _, _, s in splits]
    _check_same_arch(params, "parameters")
    _check_same_arch(stats, "BatchNorm statistics")
    placed = sharding.replicate(
        {"generalist": (gen_params, gen_stats), "specialists": (stack(params), stack(stats))}, mesh
    )
    tables = sharding.replicate({"label_maps": table, "class_to_group": class_to_group}, mesh)
    mean, std = tuple(mean), tuple(std)
    # Padding the head does not change the graph apart from a static width attribute, unused by the forward pass.
    route = functools.partial(_route_local, gen_def, splits[0][0], chunk, mean, std)
    predict = jax.jit(jax.shard_map(route, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P("data")))
    gen_only = jax.jit(
        jax.shard_map(
            lambda p, im: _generalist_pred(gen_def, p, pipeline.normalize(im, mean, std)),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
        )
    )
    groups = tuple(tuple(int(c) for c in row if c >= 0) for row in table)
    return RoutedSystem(gen_def, splits[0][0], placed, tables, groups, mesh, chunk, mean, std, predict, gen_only)


def as_specialist(trained) -> tuple[nnx.Module, list[int]]:
    """(model, label_map) of a `jaxspec.methods.Trained`: a suppressed model keeps only its scored columns."""
    return specialist_of(trained.model, trained.classes, trained.columns)


def specialist_of(
    model: nnx.Module, classes: Sequence[int], columns: Sequence[int] | None
) -> tuple[nnx.Module, list[int]]:
    """(model, label_map) of a model whose output j is global class `classes[j]` (-1: dustbin), only
    `columns` competing when given (suppression): then the model keeps only those outputs."""
    if columns is None:
        return model, list(classes)
    cols = list(columns)
    return specialize.extract(model, cols), [classes[j] for j in cols]


def _batch_sums(
    num_groups: int, out: dict, labels: jax.Array, mask: jax.Array, class_to_group: jax.Array
) -> dict[str, jax.Array]:
    """Masked sums over one device's examples for `evaluate`, added up over `data`.

    Per-group arrays have K+1 entries, the last for classes in no group.
    """
    m = mask.astype(jnp.float32)
    true_group = class_to_group[labels]
    by_true = jax.nn.one_hot(jnp.where(true_group < 0, num_groups, true_group), num_groups + 1) * m[:, None]
    by_sent = jax.nn.one_hot(jnp.where(out["group"] < 0, num_groups, out["group"]), num_groups + 1) * m[:, None]
    hits = {
        "top1": out["pred"] == labels,
        "generalist_top1": out["generalist_pred"] == labels,
        "routing": out["group"] == true_group,
    }
    fallback = (out["group"] >= 0) & ~out["used_specialist"]
    sums = {
        "count": m.sum(),
        "chunks": out["chunks"].sum(),
        "fallbacks": (fallback * m).sum(),
        "group_count": by_true.sum(0),
        "group_sent": by_sent.sum(0),
        "group_fallbacks": (by_sent * fallback[:, None]).sum(0),
    }
    for name, hit in hits.items():
        sums[name] = (hit * m).sum()
        sums[f"group_{name}"] = (by_true * hit[:, None]).sum(0)
    return jax.lax.psum(sums, "data")


def evaluate(
    system: RoutedSystem, source: Source, data_cfg, *, batch_size: int, progress: bool = True, per_example: bool = False
) -> dict:
    """Routed system vs. generalist over every example of `source` (labels in the generalist's classes).

    `routing_accuracy`: how often the generalist's predicted class lies in the
    true class's group (for a class in no group: the prediction is in no group
    either). Per group (by true class; a last entry `None` for classes in no
    group, if any): test images, top-1 of both, routing accuracy, images the
    generalist sent there and dustbin fallbacks among those. `per_example` adds `hits` and `generalist_hits`,
    each image's top-1 outcome in `source`'s order, for a paired bootstrap over images.
    """
    k = system.num_groups
    sums_fn = jax.jit(
        jax.shard_map(
            functools.partial(_batch_sums, k),
            mesh=system.mesh,
            in_specs=(P("data"), P("data"), P("data"), P()),
            out_specs=P(),
        )
    )
    num_batches = math.ceil(len(source) / batch_size)
    bar = Progress("routed eval", num_batches, 0, batch_size) if progress else None
    totals, hits = None, {"hits": [], "generalist_hits": []}
    for i, batch in enumerate(pipeline.eval_iterator(source, data_cfg, batch_size=batch_size), 1):
        batch = sharding.put_batch(batch, system.mesh)
        out = system.predict(batch["image"])
        sums = sums_fn(out, batch["label"], batch["mask"], system.tables["class_to_group"])
        if per_example:
            keep, labels = np.asarray(batch["mask"]), np.asarray(batch["label"])
            for name, key in (("hits", "pred"), ("generalist_hits", "generalist_pred")):
                hits[name].append((np.asarray(out[key]) == labels)[keep])
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if bar and (i % 50 == 0 or i == num_batches):
            bar.update(i, time.perf_counter(), {})
    if bar:
        bar.close()
    t = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(totals))

    def group_row(g: int) -> dict:
        n = t["group_count"][g]

        def frac(key: str) -> float:
            return float(t[f"group_{key}"][g] / n) if n else float("nan")

        return {
            "group": g if g < k else None,
            "classes": len(system.groups[g]) if g < k else None,
            "count": int(n),
            "top1": frac("top1"),
            "generalist_top1": frac("generalist_top1"),
            "routing_accuracy": frac("routing"),
            "sent": int(t["group_sent"][g]),
            "fallbacks": int(t["group_fallbacks"][g]),
        }

    no_group = t["group_count"][k] or t["group_sent"][k]
    n = float(t["count"])
    return {
        "count": n,
        "top1": float(t["top1"]) / n,
        "generalist_top1": float(t["generalist_top1"]) / n,
        "routing_accuracy": float(t["routing"]) / n,
        "fallback_rate": float(t["fallbacks"]) / n,
        # padded eval batches included: the specialist work actually done per image
        "specialist_examples_per_image": float(t["chunks"]) * system.chunk_for(batch_size) / (num_batches * batch_size),
        "groups": [group_row(g) for g in range(k + 1 if no_group else k)],
    } | ({name: np.concatenate(h) for name, h in hits.items()} if per_example else {})


def throughput(system: RoutedSystem, images, *, repeats: int = 10) -> dict:
    """Images/s of the routed system and of the generalist alone on one batch (compiled first).

    Calls alternate between the two and each rate is from the median call, so
    load that drifts during the measurement hits both alike.
    """
    x = system.put(images)
    fns = {"routed": system.predict, "generalist": system.generalist_predict}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(x))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[name].append(time.perf_counter() - t0)
    b = x.shape[0]
    rate = {name: b / float(np.median(ts)) for name, ts in times.items()}
    chunks = int(np.asarray(system.predict(x)["chunks"]).sum())
    return {
        "batch_size": b,
        "num_groups": system.num_groups,
        "chunk": system.chunk_for(b),
        "buffer_per_device": system.buffer_for(b),
        "specialist_examples_per_image": chunks * system.chunk_for(b) / b,
        "routed_images_per_s": rate["routed"],
        "generalist_images_per_s": rate["generalist"],
        "cost_vs_generalist": rate["generalist"] / rate["routed"],
    }
