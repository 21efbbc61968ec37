"""Grouping generators and the ImageNet WordNet table (and the script that derives it)."""

import dataclasses
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from jaxspec import groupings
from jaxspec.data import make_imagenet_wordnet as mkwn
from jaxspec.data import wordnet
from jaxspec.data.datasets import get_info
from jaxspec.data.sources import DatasetInfo

SHIPPED = pathlib.Path(groupings.__file__).parent / "data" / "imagenet_wordnet.json"


def assert_partition(groups, num_classes):
    flat = [i for g in groups.values() for i in g]
    assert sorted(flat) == list(range(num_classes)), "not every class exactly once"


def as_sets(groups):
    return {frozenset(g) for g in groups.values()}


# -- lexicographic ----------------------------------------------------------------------------------------------


def test_lexicographic_imagenet_table1_split():
    groups = groupings.lexicographic(1000, 5)
    assert list(groups) == ["lex0", "lex1", "lex2", "lex3", "lex4"]
    assert [len(g) for g in groups.values()] == [200] * 5
    assert groups["lex2"] == tuple(range(400, 600))


@pytest.mark.parametrize("n, k", [(10, 3), (30, 4), (7, 7), (100, 1), (1000, 7)])
def test_lexicographic_contiguous_balanced_partition(n, k):
    groups = groupings.lexicographic(n, k)
    assert len(groups) == k
    assert_partition(groups, n)
    flat = [i for g in groups.values() for i in g]
    assert flat == list(range(n))  # contiguous and in index order
    sizes = [len(g) for g in groups.values()]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger groups come first


@pytest.mark.parametrize("k", [0, -1, 11, 2.5, None, True])
def test_lexicographic_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k \(number of lexicographic groups\)"):
        groupings.lexicographic(10, k)


# -- random -----------------------------------------------------------------------------------------------------


def test_random_groups_sizes_disjoint_sorted():
    groups = groupings.random_groups(100, (10, 45, 20), seed=3)
    assert list(groups) == ["random0", "random1", "random2"]
    assert [len(g) for g in groups.values()] == [10, 45, 20]
    flat = [i for g in groups.values() for i in g]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(100))
    assert all(list(g) == sorted(g) for g in groups.values())


def test_random_groups_deterministic_by_seed():
    a = groupings.random_groups(50, (10, 10), seed=7)
    assert a == groupings.random_groups(50, (10, 10), seed=7)
    assert a != groupings.random_groups(50, (10, 10), seed=8)


def test_random_groups_are_uniform_over_seeds():
    # Each class should land in a group of size s with probability s / n.
    n, sizes, trials = 10, (3, 5), 2000
    counts = np.zeros((2, n))
    for seed in range(trials):
        for g, members in enumerate(groupings.random_groups(n, sizes, seed).values()):
            counts[g, list(members)] += 1
    expected = np.array(sizes)[:, None] / n
    np.testing.assert_allclose(counts / trials, np.broadcast_to(expected, (2, n)), atol=0.05)


@pytest.mark.parametrize(
    "sizes, seed, match",
    [((6, 5), 0, "sum to 11 > 10"), ((3, 0), 0, r"sizes\[1\]"), ((), 0, "at least one"), ((3,), None, "seed")],
)
def test_random_groups_errors(sizes, seed, match):
    with pytest.raises(ValueError, match=match):
        groupings.random_groups(10, sizes, seed)


# -- semantic ---------------------------------------------------------------------------------------------------


def test_semantic_embedded():
    info = get_info("embedded")
    groups = groupings.semantic(info)
    assert list(groups) == ["animals", "clothing", "digits"]
    assert_partition(groups, 30)
    names = [info.class_names[i] for i in groups["animals"]]
    assert {"cat", "dog", "zebra"} <= set(names) and "sneaker" not in names


def test_random_like_draws_a_group_of_the_same_size_from_the_same_source():
    info = get_info("embedded")
    clothing, digits = set(info.groups["clothing"]), set(info.groups["digits"])
    draws = [groupings.random_like(info, "tops", seed) for seed in range(200)]
    assert all(len(d) == 4 and set(d) <= clothing and list(d) == sorted(d) for d in draws)
    assert groupings.random_like(info, "tops", 7) == draws[7]  # the seed fixes the draw
    # every 4-of-10 draw is equally likely: each clothing class is in 40% of the draws
    counts = np.bincount(np.concatenate(draws), minlength=30)[sorted(clothing)]
    assert counts.sum() == 800 and np.all(np.abs(counts / 200 - 0.4) < 0.12)
    assert all(set(groupings.random_like(info, "curved_digits", s)) <= digits for s in range(20))
    # two groups of one size and source draw differently under the same seed
    assert any(
        groupings.random_like(info, "curved_digits", s) != groupings.random_like(info, "stroke_digits", s)
        for s in range(3)
    )
    # a group that no semantic group holds (here: one straddling two sources) draws from every class
    mixed = dataclasses.replace(info, groups={**info.groups, "mixed": (0, 10, 20)})
    spread = set().union(*(groupings.random_like(mixed, "mixed", s) for s in range(50)))
    assert spread & set(info.groups["animals"]) and spread & clothing and spread & digits
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        groupings.random_like(info, "nope", 0)


def test_semantic_cifar100_superclasses():
    info = get_info("cifar100")
    groups = groupings.semantic(info)
    assert len(groups) == 20 and all(len(g) == 5 for g in groups.values())
    assert_partition(groups, 100)
    assert "animals" not in groups  # the overlapping union group is not a superclass
    named = {g: {info.class_names[i] for i in v} for g, v in groups.items()}
    # From the CIFAR-100 documentation's superclass table.
    assert named["fruit_and_vegetables"] == {"apple", "mushroom", "orange", "pear", "sweet_pepper"}
    assert named["people"] == {"baby", "boy", "girl", "man", "woman"}
    assert named["vehicles_2"] == {"lawn_mower", "rocket", "streetcar", "tank", "tractor"}


def test_semantic_imagenet_wordnet_groups():
    info = get_info("imagenet2012")  # class names from tfds: the sorted wnids
    groups = groupings.semantic(info)
    assert {g: len(v) for g, v in groups.items()} == {"animals": 398, "artifacts": 522, "miscellaneous": 80}
    assert groups["animals"] == tuple(range(398))
    assert_partition(groups, 1000)
    by_wnid = {info.class_names[i]: g for g, v in groups.items() for i in v}
    assert by_wnid["n01440764"] == "animals"  # tench
    assert by_wnid["n02701002"] == "artifacts"  # ambulance
    assert by_wnid["n09193705"] == "miscellaneous"  # alp


def test_semantic_imagenet_fine_refines_coarse():
    info = get_info("imagenet2012")
    coarse, fine = groupings.semantic(info), groupings.semantic(info, level="fine")
    assert len(fine) == 9
    assert_partition(fine, 1000)
    assert fine["animal"] == coarse["animals"] and fine["artifact"] == coarse["artifacts"]
    rest = [g for g in fine if g not in ("animal", "artifact")]
    assert sorted(i for g in rest for i in fine[g]) == list(coarse["miscellaneous"])
    assert {"matter", "geological_formation", "fungus", "plant"} <= set(rest)
    daisy = info.class_names.index("n11939491")
    assert daisy in fine["plant"]


def test_semantic_errors():
    embedded = get_info("embedded")
    with pytest.raises(ValueError, match="only for imagenet2012"):
        groupings.semantic(embedded, level="fine")
    with pytest.raises(ValueError, match="'middle'"):
        groupings.semantic(embedded, level="middle")
    toy = DatasetInfo("toy", ("a", "b"), {}, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="No semantic grouping for dataset 'toy'"):
        groupings.semantic(toy)
    # Own data's groups (data.groups_file) are its semantic grouping when they partition its classes.
    assert groupings.semantic(dataclasses.replace(toy, groups={"all": (0, 1)})) == {"all": (0, 1)}
    with pytest.raises(ValueError, match="The semantic groups of 'toy' do not partition"):
        groupings.semantic(dataclasses.replace(toy, groups={"first": (0,)}))
    shuffled = DatasetInfo("imagenet2012", tuple(reversed(json.loads(SHIPPED.read_text())["classes"])), {}, (0,), (1,))
    with pytest.raises(ValueError, match="sorted wnids"):
        groupings.semantic(shuffled)
    with pytest.raises(ValueError, match="'medium'"):
        wordnet.groups("medium")


def test_shipped_wordnet_table_is_consistent():
    table = json.loads(SHIPPED.read_text())
    wnids = list(table["classes"])
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    assert [c["index"] for c in table["classes"].values()] == list(range(1000))
    coarse = wordnet.groups("coarse")
    assert [len(v) for v in coarse.values()] == [398, 522, 80]
    assert list(wordnet.groups("fine")) == table["fine_groups"]


# -- confusion --------------------------------------------------------------------------------------------------


def planted_confusion(rng, blocks, num_classes, noise=1):
    confusion = np.diag(rng.integers(80, 120, num_classes)).astype(float)
    confusion += rng.integers(0, noise + 1, (num_classes, num_classes)) * (1 - np.eye(num_classes))
    for block in blocks:
        for i in block:
            for j in block:
                if i != j:
                    confusion[i, j] += rng.integers(5, 20)
    return confusion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_groups_recover_planted_blocks(seed):
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(15).reshape(3, 5)
    groups = groupings.confusion_groups(planted_confusion(rng, blocks, 15), k=3, seed=seed)
    assert list(groups) == ["confusion0", "confusion1", "confusion2"]
    assert_partition(groups, 15)
    assert as_sets(groups) == {frozenset(b.tolist()) for b in blocks}
    assert min(groups["confusion0"]) == 0 and min(groups["confusion1"]) < min(groups["confusion2"])


def test_confusion_groups_use_rates_not_counts():
    # One class with 100x the held-out examples: its cross-block noise counts then exceed other classes'
    # within-block counts, which must not pull blocks together (affinity is built from per-row rates).
    for seed in range(10):
        rng = np.random.default_rng(seed)
        blocks = rng.permutation(15).reshape(3, 5)
        confusion = planted_confusion(rng, blocks, 15, noise=3)
        confusion[blocks[0, 0]] *= 100
        assert as_sets(groupings.confusion_groups(confusion, k=3, seed=0)) == {frozenset(b.tolist()) for b in blocks}


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # the planted blocks are anti-correlated
def test_confusion_groups_from_prediction_covariance():
    rng = np.random.default_rng(0)
    blocks = rng.permutation(12).reshape(3, 4)
    block_of = np.empty(12, int)
    block_of[blocks] = np.arange(3)[:, None]
    labels = rng.integers(0, 12, 4000)
    probs = np.zeros((len(labels), 12))
    probs[np.arange(len(labels)), labels] = 0.6
    for n, y in enumerate(labels):  # the remaining mass goes to classes of the same block
        probs[n, blocks[block_of[y]]] += 0.4 * rng.dirichlet(np.ones(4))
    groups = groupings.confusion_groups(np.cov(probs, rowvar=False), k=3, seed=0, matrix="covariance")
    predicted = np.empty(12, int)
    for g, members in enumerate(groups.values()):
        predicted[list(members)] = g
    assert adjusted_rand_score(block_of, predicted) == 1.0


def test_confusion_groups_deterministic_by_seed():
    rng = np.random.default_rng(5)
    # Weak structure, so the clustering has real choices to make.
    confusion = planted_confusion(rng, rng.permutation(20).reshape(4, 5), 20, noise=15)
    assert groupings.confusion_groups(confusion, 4, seed=11) == groupings.confusion_groups(confusion, 4, seed=11)


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # by construction
def test_confusion_groups_place_never_confused_classes():
    rng = np.random.default_rng(0)
    confusion = np.diag(np.full(12, 100.0))
    blocks = [(0, 2, 4, 6), (1, 3, 5, 7)]  # classes 8..11 are never confused with anything
    for block in blocks:
        for i in block:
            for j in block:
                confusion[i, j] += 0 if i == j else rng.integers(5, 20)
    groups = groupings.confusion_groups(confusion, k=2, seed=0)
    assert_partition(groups, 12)
    assert [len(g) for g in groups.values()] == [6, 6]  # the isolated ones fill the smallest group in turn
    for block, group in zip(blocks, groups.values()):
        assert set(block) <= set(group)


@pytest.mark.parametrize(
    "matrix, k, kind, match",
    [
        (np.ones((3, 4)), 2, "confusion", "square"),
        (-np.ones((3, 3)), 2, "confusion", "negative"),
        (np.full((3, 3), np.nan), 2, "confusion", "NaN"),
        (np.ones((3, 3)), 4, "confusion", r"k \(number of confusion groups\)"),
        (np.eye(4), 2, "confusion", "Only 0 classes"),
        (np.ones((3, 3)), 2, "counts", "'counts'"),
    ],
)
def test_confusion_groups_errors(matrix, k, kind, match):
    with pytest.raises(ValueError, match=match):
        groupings.confusion_groups(matrix, k, seed=0, matrix=kind)


# -- make_groups ------------------------------------------------------------------------------------------------


def section(**kw):
    return ml_collections.ConfigDict({"kind": "semantic", "k": 0, "sizes": (), "seed": 0, "level": None, **kw})


def test_make_groups_dispatch():
    info = get_info("embedded")
    assert groupings.make_groups(section(kind="lexicographic", k=4), info) == groupings.lexicographic(30, 4)
    assert groupings.make_groups(section(), info) == groupings.semantic(info)
    rand = groupings.make_groups(section(kind="random", sizes=(4, 6), seed=2), info)
    assert rand == groupings.random_groups(30, (4, 6), 2)
    confusion = planted_confusion(np.random.default_rng(0), np.arange(30).reshape(3, 10), 30)
    conf = groupings.make_groups(section(kind="confusion", k=3, seed=1), info, confusion=confusion)
    assert conf == groupings.confusion_groups(confusion, 3, 1)


def test_make_groups_random_defaults_to_semantic_sizes():
    info = get_info("cifar100")
    groups = groupings.make_groups(section(kind="random", seed=4), info)
    assert [len(g) for g in groups.values()] == [5] * 20
    assert_partition(groups, 100)
    assert as_sets(groups) != as_sets(groupings.semantic(info))


def test_make_groups_errors():
    info = get_info("embedded")
    with pytest.raises(ValueError, match="'wordnet'.*lexicographic.*random.*semantic.*confusion"):
        groupings.make_groups(section(kind="wordnet"), info)
    with pytest.raises(ValueError, match="needs the generalist's confusion matrix"):
        groupings.make_groups(section(kind="confusion", k=3), info)
    with pytest.raises(ValueError, match=r"shape \(10, 10\), expected \(30, 30\)"):
        groupings.make_groups(section(kind="confusion", k=3), info, confusion=np.eye(10))
    with pytest.raises(ValueError, match="got 0"):
        groupings.make_groups(section(kind="lexicographic"), info)


# -- the WordNet table generator --------------------------------------------------------------------------------


def noun_line(offset, lemmas, hypernyms=(), instance_of=(), others=()):
    """One data.noun line; `others` adds non-hypernym pointers that must be ignored."""
    pointers = [f"@ {h:08d} n 0000" for h in hypernyms] + [f"@i {h:08d} n 0000" for h in instance_of]
    pointers += list(others)
    words = " ".join(f"{w} 0" for w in lemmas)
    return f"{offset:08d} 03 n {len(lemmas):02x} {words} {len(pointers):03d} {' '.join(pointers)} | a gloss  \n"


ANIMAL, ARTIFACT = mkwn.ANIMAL, mkwn.ARTIFACT
ENTITY, PHYSICAL, ABSTRACTION, OBJECT, WHOLE, LIVING, ORGANISM = 1740, 1930, 2137, 2684, 3553, 4258, 4475
CAUSAL, MATTER, PERSON, RELATION, PART, SUBSTANCE = 7347, 20827, 7846, 31921, 13809207, 19613
GEO, MOUNTAIN, CANINE, VEHICLE = 9287968, 9359803, 2083346, 3791235
CLASSES = {  # wnid -> (lemmas, hypernyms, instance hypernyms)
    "n02084071": (["dog", "domestic_dog"], [CANINE], []),
    "n02958343": (["car", *(f"syn{i}" for i in range(9))], [VEHICLE], []),  # 10 lemmas: w_cnt is hex "0a"
    "n07891726": (["wine"], [SUBSTANCE], []),  # substance -> matter first, part -> abstraction second
    "n09000003": (["Everest"], [], [MOUNTAIN]),  # an instance
    "n10565667": (["scuba_diver"], [PERSON], []),
    "n99000001": (["robot_dog"], [ARTIFACT, 2084071], []),  # artifact listed first
    "n99000002": (["ratio"], [PART, SUBSTANCE], []),  # part listed first
}
EXPECTED = {  # wnid -> (coarse, fine)
    "n02084071": ("animals", "animal"),
    "n02958343": ("artifacts", "artifact"),
    "n07891726": ("miscellaneous", "matter"),
    "n09000003": ("miscellaneous", "geological_formation"),
    "n10565667": ("miscellaneous", "person"),
    "n99000001": ("animals", "animal"),  # animal wins over artifact
    "n99000002": ("miscellaneous", "abstraction"),
}


@pytest.fixture
def tiny_wordnet(tmp_path):
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by  \n"]
    tree = [  # (offset, lemmas, hypernyms), a small cut of WordNet 3.0's top levels
        (ENTITY, ["entity"], []),
        (PHYSICAL, ["physical_entity"], [ENTITY]),
        (ABSTRACTION, ["abstraction"], [ENTITY]),
        (OBJECT, ["object"], [PHYSICAL]),
        (WHOLE, ["whole"], [OBJECT]),
        (LIVING, ["living_thing"], [WHOLE]),
        (ORGANISM, ["organism"], [LIVING]),
        (CAUSAL, ["causal_agent"], [PHYSICAL]),
        (MATTER, ["matter"], [PHYSICAL]),
        (ANIMAL, ["animal", "beast"], [ORGANISM]),
        (ARTIFACT, ["artifact"], [WHOLE]),
        (PERSON, ["person"], [ORGANISM, CAUSAL]),
        (RELATION, ["relation"], [ABSTRACTION]),
        (PART, ["part"], [RELATION]),
        (SUBSTANCE, ["substance"], [MATTER, PART]),
        (GEO, ["geological_formation"], [OBJECT]),
        (MOUNTAIN, ["mountain"], [GEO]),
        (CANINE, ["canine"], [ANIMAL]),
        (VEHICLE, ["motor_vehicle"], [ARTIFACT]),
    ]
    for offset, lemmas, hyper in tree:
        lines.append(noun_line(offset, lemmas, hyper, others=[f"~ {ENTITY:08d} n 0000", "+ 00692347 v 0101"]))
    for w, (lemmas, hyper, inst) in CLASSES.items():
        lines.append(noun_line(int(w[1:]), lemmas, hyper, inst))
    (tmp_path / "data.noun").write_text("".join(sorted(lines)))
    index = ["  1 This software and database is being provided\n", "dog n 2 1 @ 2 1 99999999 02084071  \n"]
    index += ["car n 1 2 @ ~ 1 0 02958343  \n", "wine n 1 1 @ 1 0 07891726  \n"]
    (tmp_path / "index.noun").write_text("".join(index))
    (tmp_path / "synsets.txt").write_text("\n".join(CLASSES) + "\n")
    return tmp_path


def test_generator_on_a_hand_written_wordnet(tiny_wordnet):
    table = mkwn.generate(tiny_wordnet, tiny_wordnet / "synsets.txt")
    assert {w: (c["coarse"], c["fine"]) for w, c in table["classes"].items()} == EXPECTED
    assert [c["index"] for c in table["classes"].values()] == list(range(len(CLASSES)))
    assert table["fine_groups"] == ["animal", "artifact", "matter", "geological_formation", "person", "abstraction"]
    names = {w: c["name"] for w, c in table["classes"].items()}
    assert names["n02084071"] == "dog.n.02" and names["n02958343"] == "car.n.01"  # sense order from index.noun
    assert json.loads(mkwn.dumps(table)) == table


def test_generator_cli_writes_and_checks(tiny_wordnet, capsys):
    out = tiny_wordnet / "table.json"
    args = [f"--wordnet_dir={tiny_wordnet}", f"--synsets={tiny_wordnet / 'synsets.txt'}", f"--out={out}"]
    assert mkwn.main(args) == 0
    assert mkwn.main([*args, "--check"]) == 0
    table = json.loads(out.read_text())
    table["classes"]["n07891726"]["fine"] = "abstraction"
    out.write_text(json.dumps(table))
    assert mkwn.main([*args, "--check"]) == 1
    assert "n07891726" in capsys.readouterr().err


def test_generator_errors(tiny_wordnet):
    (tiny_wordnet / "unsorted.txt").write_text("n02958343\nn02084071\n")
    with pytest.raises(ValueError, match="sorted wnid order"):
        mkwn.generate(tiny_wordnet, tiny_wordnet / "unsorted.txt")
    (tiny_wordnet / "unknown.txt").write_text("n00000042\n")
    with pytest.raises(ValueError, match="n00000042"):
        mkwn.generate(tiny_wordnet, tiny_wordnet / "unknown.txt")
    with pytest.raises(ValueError, match="line 2 is malformed"):
        mkwn.parse_data_noun(["00001740 03 n 01 entity 0 000 | root\n", "00001930 03 n zz physical_entity\n"])
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        mkwn.generate(tiny_wordnet / "nowhere", tiny_wordnet / "synsets.txt")


# -- the shipped table from the real WordNet 3.0 (opt-in) -------------------------------------------------------

_CACHE = pathlib.Path(os.environ.get("JAXSPEC_WORDNET_CACHE", "~/.cache/jaxspec/wordnet")).expanduser()
WORDNET_DIR = _CACHE / "usr/share/wordnet"
TIMM_SYNSETS = _CACHE / "timm/data/_info/imagenet_synsets.txt"


@pytest.mark.realdata
@pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file() or not TIMM_SYNSETS.is_file(),
    reason=f"needs WordNet 3.0 in {WORDNET_DIR} (apt-get download wordnet-base; dpkg -x *.deb {_CACHE}) and "
    f"{TIMM_SYNSETS} (pip download timm --no-deps; unzip the wheel's timm/data/_info/imagenet_synsets.txt into "
    f"{_CACHE}); set JAXSPEC_WORDNET_CACHE to use another directory",
)
def test_shipped_table_regenerates_from_wordnet():
    assert mkwn.main([f"--wordnet_dir={WORDNET_DIR}", f"--synsets={TIMM_SYNSETS}", f"--out={SHIPPED}", "--check"]) == 0
