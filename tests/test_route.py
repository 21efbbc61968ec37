"""The routed system equals a plain per-example loop, stays within its static buffer, shards, and is scored right."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from jaxspec import models, route, sharding, specialize, tables
from jaxspec.data.sources import ArraySource, DatasetInfo

pytestmark = pytest.mark.xdist_group("route")  # the tests share `parts`' routed systems: one worker (tests/conftest.py)

NUM_CLASSES = 12  # classes 10 and 11 are in no group: the generalist's answer stands
GROUPS = [(0, 1, 2, 3, 4), (5, 6), (7, 8, 9)]
DUSTBIN_GROUP = 1  # its specialist has a dustbin output
MEAN, STD = (0.4,), (0.3,)
BATCH = 48


def small_model(num_classes=NUM_CLASSES, seed=0, **kwargs):
    model = models.mobilenet_v3_small(num_classes, rngs=nnx.Rngs(seed), width_multiplier=0.25, num_blocks=4, **kwargs)
    model.eval()
    return model


def features(model, images):
    """Penultimate features of images normalized in NumPy (grayscale repeated to 3 channels)."""
    x = (images.astype(np.float32) / 255.0 - np.float32(MEAN[0])) / np.float32(STD[0])
    return np.asarray(nnx.jit(lambda m, x: m.features(x))(model, jnp.asarray(np.repeat(x, 3, axis=-1))))


def set_head(model, feats, seed):
    """A random head centred on this batch's mean feature, so every output wins on some images.

    Returns the head's logits on `feats`, computed in NumPy.
    """
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=model.head.kernel.shape).astype(np.float32)
    bias = -feats.mean(0) @ kernel
    model.head.kernel.value, model.head.bias.value = jnp.asarray(kernel), jnp.asarray(bias)
    return feats @ kernel + bias


def reference_loop(gen_logits, spec_logits, label_maps):
    """The routed system as a plain loop: generalist argmax -> its group's specialist -> label map."""
    preds, used = [], []
    for i in range(len(gen_logits)):
        pred, by_specialist = int(np.argmax(gen_logits[i])), False
        for lm, logits in zip(label_maps, spec_logits):
            if pred in lm:
                choice = lm[int(np.argmax(logits[i]))]
                if choice != -1:
                    pred, by_specialist = choice, True
                break
        preds.append(pred)
        used.append(by_specialist)
    return np.array(preds), np.array(used)


@pytest.fixture(scope="module")
def parts():
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 32, 32, 1), np.uint8)
    generalist, body = small_model(seed=0), small_model(seed=1)
    gen_logits = set_head(generalist, features(generalist, images), seed=0)
    body_feats = features(body, images)  # extraction keeps the body: every specialist shares these features
    specialists, label_maps, spec_logits = [], [], []
    for k, group in enumerate(GROUPS):
        if k == DUSTBIN_GROUP:
            spec, lm = specialize.add_dustbin(body, group), [*group, -1]
        else:
            spec, lm = specialize.extract(body, group), list(group)
        spec_logits.append(set_head(spec, body_feats, seed=10 + k))
        specialists.append(spec)
        label_maps.append(lm)
    want, want_used = reference_loop(gen_logits, spec_logits, label_maps)
    group_of = {c: k for k, g in enumerate(GROUPS) for c in g}
    want_group = np.array([group_of.get(int(c), -1) for c in gen_logits.argmax(-1)])
    # the batch must exercise every path: each group, no group, dustbin fallback, a specialist overruling
    counts = np.bincount(want_group + 1, minlength=len(GROUPS) + 1)
    assert np.all(counts > 0), counts
    dustbin_routed = want_group == DUSTBIN_GROUP
    assert (~want_used[dustbin_routed]).any() and want_used[dustbin_routed].any()
    assert (want != gen_logits.argmax(-1)).any()
    single = sharding.make_mesh(jax.devices()[:1])
    systems = {}

    def system(chunk=None, mesh=single):
        key = (chunk, mesh.size)
        if key not in systems:
            systems[key] = route.build_routed(
                generalist, specialists, label_maps, mean=MEAN, std=STD, mesh=mesh, chunk=chunk
            )
        return systems[key]

    return {
        "generalist": generalist,
        "specialists": specialists,
        "label_maps": label_maps,
        "images": images,
        "want": want,
        "want_used": want_used,
        "want_group": want_group,
        "gen_pred": gen_logits.argmax(-1),
        "system": system,
    }


@pytest.mark.parametrize("chunk", [None, 1, 7, pytest.param(64, marks=pytest.mark.slow)])
def test_routed_equals_per_example_loop(parts, chunk):
    system = parts["system"](chunk)
    out = jax.tree.map(np.asarray, system.predict(parts["images"]))
    np.testing.assert_array_equal(out["pred"], parts["want"])
    np.testing.assert_array_equal(out["used_specialist"], parts["want_used"])
    np.testing.assert_array_equal(out["generalist_pred"], parts["gen_pred"])
    np.testing.assert_array_equal(out["group"], parts["want_group"])
    # cost: exactly the chunks that the groups' sizes need, never more than the static buffer
    c = system.chunk_for(BATCH)
    counts = np.bincount(parts["want_group"][parts["want_group"] >= 0], minlength=len(GROUPS))
    assert out["chunks"].tolist() == [int(np.sum(-(-counts // c)))]
    assert out["chunks"][0] * c <= system.buffer_for(BATCH) <= BATCH + len(GROUPS) * (c - 1)


def test_buffer_bound_holds_for_every_split_of_the_batch():
    """sum_k ceil(n_k / c) * c <= buffer_size for every way of splitting b examples over K groups (or none)."""
    for b, k, c in itertools.product([1, 5, 13], [1, 2, 3, 4], [1, 2, 3, 7, 16]):
        size = route.buffer_size(b, k, c)
        assert size % c == 0 and size <= b + k * (c - 1)
        worst = max(
            sum(-(-n // c) * c for n in split) for split in itertools.product(range(b + 1), repeat=k) if sum(split) <= b
        )
        assert worst <= size, (b, k, c)


def test_sharded_equals_single_device(parts):
    sharded = parts["system"](None, sharding.make_mesh())
    assert sharded.mesh.size == 8
    out = jax.tree.map(np.asarray, sharded.predict(parts["images"]))
    single = jax.tree.map(np.asarray, parts["system"]().predict(parts["images"]))
    for name in ("pred", "generalist_pred", "group", "used_specialist"):
        np.testing.assert_array_equal(out[name], single[name], err_msg=name)
    np.testing.assert_array_equal(out["pred"], parts["want"])
    assert out["chunks"].shape == (8,)  # one count per device: each routes its own 6 examples
    assert np.all(out["chunks"] * sharded.chunk_for(BATCH) <= sharded.buffer_for(BATCH))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharded.predict(parts["images"][:12])


def test_evaluate_matches_numpy(parts):
    system = parts["system"]()
    rng = np.random.default_rng(1)
    n = 100  # two full batches of 48 and a masked, padded one
    images = rng.integers(0, 256, (n, 32, 32, 1), np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    preds = np.asarray(system.predict(parts["images"])["pred"])
    labels[:BATCH] = np.where(rng.random(BATCH) < 0.5, preds, labels[:BATCH])  # some hits on the first batch
    images[:BATCH] = parts["images"]
    info = DatasetInfo("toy", tuple(f"c{i}" for i in range(NUM_CLASSES)), {}, MEAN, STD)
    result = route.evaluate(system, ArraySource(images, labels, info), common.data(), batch_size=BATCH, progress=False)

    padded = np.concatenate([images, np.repeat(images[-1:], 3 * BATCH - n, 0)])
    out = [jax.tree.map(np.asarray, system.predict(padded[i : i + BATCH])) for i in range(0, 3 * BATCH, BATCH)]
    out = {k: np.concatenate([o[k] for o in out])[:n] for k in ("pred", "generalist_pred", "group", "used_specialist")}
    group_of = np.full(NUM_CLASSES, -1)
    for k, g in enumerate(GROUPS):
        group_of[list(g)] = k
    true_group = group_of[labels]
    assert result["count"] == n
    assert result["top1"] == pytest.approx(np.mean(out["pred"] == labels))
    assert result["generalist_top1"] == pytest.approx(np.mean(out["generalist_pred"] == labels))
    assert result["routing_accuracy"] == pytest.approx(np.mean(group_of[out["generalist_pred"]] == true_group))
    fallback = (out["group"] >= 0) & ~out["used_specialist"]
    assert result["fallback_rate"] == pytest.approx(fallback.mean())
    assert [g["group"] for g in result["groups"]] == [0, 1, 2, None]
    for row in result["groups"]:
        g = -1 if row["group"] is None else row["group"]
        sel, sent = true_group == g, out["group"] == g
        assert row["count"] == sel.sum() and row["sent"] == sent.sum()
        assert row["top1"] == pytest.approx(np.mean(out["pred"][sel] == labels[sel]))
        assert row["generalist_top1"] == pytest.approx(np.mean(out["generalist_pred"][sel] == labels[sel]))
        assert row["routing_accuracy"] == pytest.approx(np.mean(out["group"][sel] == g))
        assert row["fallbacks"] == fallback[sent].sum()
    assert 1.0 <= result["specialist_examples_per_image"] * 3 * BATCH / (out["group"] >= 0).sum()
    table = tables.routed(result, ["big", "dustbin", "small"])
    assert "| dustbin | 2 |" in table and "| no specialist | - |" in table and table.count("\n") == 6
    # Per image, in the source's order and without the padding: what a paired bootstrap resamples.
    per_image = route.evaluate(
        system, ArraySource(images, labels, info), common.data(), batch_size=BATCH, progress=False, per_example=True
    )
    np.testing.assert_array_equal(per_image["hits"], out["pred"] == labels)
    np.testing.assert_array_equal(per_image["generalist_hits"], out["generalist_pred"] == labels)
    assert "hits" not in result


def test_throughput_reports_both_rates(parts):
    system = parts["system"]()
    got = route.throughput(system, parts["images"], repeats=2)
    assert got["routed_images_per_s"] > 0 and got["generalist_images_per_s"] > 0
    chunks = int(np.asarray(system.predict(parts["images"])["chunks"]).sum())
    assert got["specialist_examples_per_image"] == chunks * got["chunk"] / BATCH
    assert got["cost_vs_generalist"] == pytest.approx(got["generalist_images_per_s"] / got["routed_images_per_s"])


def test_as_specialist_reads_suppression_columns(parts):
    class Trained:  # the fields of jaxspec.methods.Trained that routing reads
        model = parts["generalist"]
        classes = tuple(range(NUM_CLASSES))
        columns = (7, 2, 9)

    model, label_map = route.as_specialist(Trained)
    assert label_map == [7, 2, 9] and model.head.kernel.shape[-1] == 3
    np.testing.assert_array_equal(model.head.bias[...], np.asarray(parts["generalist"].head.bias[...])[[7, 2, 9]])


@pytest.mark.parametrize(
    "label_maps, message",
    [
        ([[0, 1, 2, 3, 4], [4, 6, -1], [7, 8, 9]], r"groups overlap: classes \[4\]"),
        ([[0, 1, 2, 3, 12], [5, 6, -1], [7, 8, 9]], r"values \[12\] are out of range"),
        ([[0, 1, 2, 3, 4], [5, 6, -2], [7, 8, 9]], r"values \[-2\] are out of range"),
        ([[0, 1, 2, 3], [5, 6, -1], [7, 8, 9]], "label_maps.0. has 4 entries but specialist 0's head has 5"),
        ([[0, 1, 2, 3, 3], [5, 6, -1], [7, 8, 9]], "names a class twice"),
        ([[0, 1, 2, 3, 4], [-1, -1, -1], [7, 8, 9]], "no class, only dustbins"),
        ([[0, 1, 2, 3, 4], [5, 6, -1]], "one label map per specialist"),
    ],
)
def test_bad_label_maps_raise(parts, label_maps, message):
    with pytest.raises(ValueError, match=message):
        route.build_routed(parts["generalist"], parts["specialists"], label_maps, mean=MEAN, std=STD)


def test_mismatched_architectures_and_chunk_raise(parts):
    gray = specialize.extract(small_model(seed=2, in_channels=1), GROUPS[2])  # a stem for 1-channel input
    with pytest.raises(ValueError, match=r"specialist 2 has a different architecture.*stem.*\[3, 3, 1, 8\]"):
        route.build_routed(
            parts["generalist"], [*parts["specialists"][:2], gray], parts["label_maps"], mean=MEAN, std=STD
        )
    with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
        route.build_routed(parts["generalist"], parts["specialists"], parts["label_maps"], mean=MEAN, std=STD, chunk=0)
