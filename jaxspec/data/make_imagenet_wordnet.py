"""Derives the ImageNet wnid -> WordNet group table (`imagenet_wordnet.json`).

The paper splits ImageNet-1k by WordNet ancestry into animals (398 classes),
artifacts (522) and miscellaneous (80). This script rebuilds that table from
WordNet 3.0 itself, so the shipped file can be checked rather than trusted:

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn   # WordNet 3.0 database
    pip download timm --no-deps && unzip timm-*.whl 'timm/data/_info/imagenet_synsets.txt'
    python -m jaxspec.data.make_imagenet_wordnet --wordnet_dir=wn/usr/share/wordnet \\
        --synsets=timm/data/_info/imagenet_synsets.txt --check   # or --out=FILE to write

ImageNet wnids are WordNet 3.0 noun offsets ("n%08d"), so `data.noun` is all
that is needed; `index.noun` only supplies readable sense names
("tench.n.01"). Rules, all deterministic:

- coarse: "animals" if animal.n.01 is among the class's hypernym ancestors
  (`@` and instance `@i` pointers, every path), else "artifacts" if
  artifact.n.01 is, else "miscellaneous". No ImageNet class reaches both; a
  class that did would count as an animal.
- fine: cut the hierarchy top-down until animal.n.01 and artifact.n.01 are
  group roots: every proper ancestor of those two (entity, physical_entity,
  object, whole, living_thing, organism) is split into its children. A class
  under animal.n.01 or artifact.n.01 (on any path) belongs to it; any other
  class follows its *primary* path, always the first hypernym in data.noun (a
  fixed, reproducible choice), and belongs to the synset just below the point
  where that path enters the split set. 26 classes reach several roots; the
  rule puts fruit under matter (not natural_object), red wine and toilet
  tissue under matter (not abstraction, via substance -> part -> relation),
  and the three people (ballplayer, groom, scuba diver) under person.n.01,
  whose first-listed hypernym is organism.n.01 (not causal_agent.n.01).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence

ANIMAL = 15388  # animal.n.01
ARTIFACT = 21939  # artifact.n.01
COARSE = ("animals", "artifacts", "miscellaneous")
_HYPERNYM_POINTERS = ("@", "@i")


@dataclasses.dataclass(frozen=True)
class Synset:
    offset: int
    lemmas: tuple[str, ...]
    hypernyms: tuple[int, ...]  # in the order data.noun lists them


def wnid(offset: int) -> str:
    return f"n{offset:08d}"


def parse_data_noun(lines: Iterable[str]) -> dict[int, Synset]:
    """Parses WordNet's `data.noun` (format: wndb(5WN)) into synsets by offset.

    A line is `offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt
    (symbol offset pos source/target)* | gloss`; w_cnt is hexadecimal, p_cnt
    decimal. Lines starting with spaces are the licence header.
    """
    synsets = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(" "):
            continue
        fields = line.split(" | ", 1)[0].split()
        try:
            offset, w_cnt = int(fields[0]), int(fields[3], 16)
            lemmas = tuple(fields[4 : 4 + 2 * w_cnt : 2])
            p_at = 4 + 2 * w_cnt
            pointers = fields[p_at + 1 : p_at + 1 + 4 * int(fields[p_at])]
        except (IndexError, ValueError) as e:
            raise ValueError(f"data.noun line {number} is malformed: {line[:80]!r}") from e
        hypernyms = tuple(
            int(pointers[i + 1])
            for i in range(0, len(pointers), 4)
            if pointers[i] in _HYPERNYM_POINTERS and pointers[i + 2] == "n"
        )
        synsets[offset] = Synset(offset, lemmas, hypernyms)
    return synsets


def parse_index_noun(lines: Iterable[str]) -> dict[tuple[str, int], str]:
    """Sense names from `index.noun`: (lemma, offset) -> "lemma.n.NN".

    A line is `lemma pos synset_cnt p_cnt (symbol)* sense_cnt tagsense_cnt
    (offset)*`, offsets in sense order; this is how NLTK names synsets.
    """
    senses: dict[str, list[int]] = {}
    for line in lines:
        if not line.strip() or line.startswith(" "):
            continue
        fields = line.split()
        n_synsets, n_pointers = int(fields[2]), int(fields[3])
        senses[fields[0]] = [int(o) for o in fields[4 + n_pointers + 2 :][:n_synsets]]
    names = {}
    for lemma, offsets in senses.items():
        for sense, offset in enumerate(offsets, 1):
            names[(lemma, offset)] = f"{lemma}.n.{sense:02d}"
    return names


def _sense_name(synset: Synset, names: Mapping) -> str:
    lemma = synset.lemmas[0].lower()
    return names.get((lemma, synset.offset), f"{lemma}.n.?")


def _ancestors(synsets: Mapping[int, Synset], offset: int) -> set[int]:
    """All hypernym ancestors of `offset`, itself included, over every path."""
    seen, stack = set(), [offset]
    while stack:
        o = stack.pop()
        if o not in seen:
            seen.add(o)
            stack.extend(synsets[o].hypernyms)
    return seen


def _primary_path(synsets: Mapping[int, Synset], offset: int) -> list[int]:
    path = [offset]
    while synsets[path[-1]].hypernyms:
        path.append(synsets[path[-1]].hypernyms[0])
    return path


def build_table(synsets: Mapping[int, Synset], wnids: Sequence[str], names: Mapping | None = None) -> dict:
    """The table for `wnids` (the class order) as a JSON-ready dict."""
    names = names or {}
    missing = [w for w in wnids if not w.startswith("n") or int(w[1:]) not in synsets]
    if missing:
        raise ValueError(f"{len(missing)} wnids are not WordNet 3.0 noun synsets, e.g. {missing[:5]}")
    for root in (ANIMAL, ARTIFACT):
        if root not in synsets:
            raise ValueError(f"data.noun lacks {wnid(root)}; is this WordNet 3.0?")
    split = (_ancestors(synsets, ANIMAL) | _ancestors(synsets, ARTIFACT)) - {ANIMAL, ARTIFACT}

    classes, roots = {}, {}  # roots: fine group name -> root offset, in order of first class
    for index, w in enumerate(wnids):
        offset = int(w[1:])
        ancestry = _ancestors(synsets, offset)
        coarse = "animals" if ANIMAL in ancestry else "artifacts" if ARTIFACT in ancestry else "miscellaneous"
        primary = _primary_path(synsets, offset)
        entry = next(i for i, o in enumerate(primary) if o in split)  # entity is in split
        root = ANIMAL if ANIMAL in ancestry else ARTIFACT if ARTIFACT in ancestry else primary[entry - 1]
        fine = synsets[root].lemmas[0].lower()
        if roots.setdefault(fine, root) != root:
            raise ValueError(f"Two fine group roots are both named {fine!r}")
        classes[w] = {"index": index, "name": _sense_name(synsets[offset], names), "coarse": coarse, "fine": fine}
    return {
        "source": "WordNet 3.0 data.noun/index.noun (Debian wordnet-base 1:3.0-37 here); wnid order of "
        "timm/data/_info/imagenet_synsets.txt (the standard sorted order)",
        "method": "see jaxspec/data/make_imagenet_wordnet.py: coarse by ancestry (animal > artifact > rest); "
        "fine by cutting WordNet until animal.n.01/artifact.n.01 are roots; other classes take the "
        "root on their first-listed-hypernym path",
        "coarse_groups": list(COARSE),
        "fine_groups": list(roots),
        "fine_roots": {f: _sense_name(synsets[o], names) for f, o in roots.items()},
        "classes": classes,
    }


def dumps(table: dict) -> str:
    """JSON with one class per line: readable diffs, small file."""
    head = json.dumps({k: v for k, v in table.items() if k != "classes"}, indent=1).removesuffix("\n}")
    rows = ",\n".join(f" {json.dumps(w)}: {json.dumps(c)}" for w, c in table["classes"].items())
    return f'{head},\n "classes": {{\n{rows}\n }}\n}}\n'


def generate(wordnet_dir: str | pathlib.Path, synsets_file: str | pathlib.Path) -> dict:
    wordnet_dir = pathlib.Path(wordnet_dir)
    for f in ("data.noun", "index.noun"):
        if not (wordnet_dir / f).is_file():
            raise FileNotFoundError(f"{wordnet_dir / f} not found (from Debian's wordnet-base: usr/share/wordnet)")
    with open(wordnet_dir / "data.noun", encoding="latin-1") as f:
        synsets = parse_data_noun(f)
    with open(wordnet_dir / "index.noun", encoding="latin-1") as f:
        names = parse_index_noun(f)
    wnids = pathlib.Path(synsets_file).read_text().split()
    if wnids != sorted(wnids):
        raise ValueError(f"{synsets_file} is not in sorted wnid order, the order of ImageNet's class indices")
    return build_table(synsets, wnids, names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet_dir", required=True, help="directory holding WordNet 3.0 data.noun, index.noun")
    parser.add_argument("--synsets", required=True, help="the 1000 ImageNet wnids, one a line (timm's file)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("imagenet_wordnet.json")))
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    table = generate(args.wordnet_dir, args.synsets)
    counts = {g: sum(c["coarse"] == g for c in table["classes"].values()) for g in COARSE}
    print(f"coarse: {counts}")
    if not args.check:
        pathlib.Path(args.out).write_text(dumps(table))
        print(f"wrote {args.out}")
        return 0
    shipped = json.loads(pathlib.Path(args.out).read_text())
    if shipped == table:
        print(f"{args.out} matches the regenerated table")
        return 0
    diff = [w for w in table["classes"] if shipped.get("classes", {}).get(w) != table["classes"][w]]
    print(f"{args.out} differs from the regenerated table: {len(diff)} classes, e.g. {diff[:10]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
