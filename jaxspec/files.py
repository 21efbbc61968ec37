"""Writes that a crash cannot leave half done, and digests that tell a file tree was not changed."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib


def write_atomic(path: str | pathlib.Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | pathlib.Path, value, **kw) -> None:
    write_atomic(path, json.dumps(value, **kw))


def tree_digest(directory: str | pathlib.Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `directory` except the names in `skip`."""
    directory = pathlib.Path(directory)
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in skip:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(path.relative_to(directory))] = h.hexdigest()
    return out


def tree_problem(directory: str | pathlib.Path, expected: dict[str, str], *, skip: tuple[str, ...] = ()) -> str:
    """Why `directory` differs from the digest `expected` (a few words), or '' if it does not."""
    got = tree_digest(directory, skip=skip)
    missing = sorted(set(expected) - set(got))
    if missing:
        return f"file {missing[0]} is missing"
    extra = sorted(set(got) - set(expected))
    if extra:
        return f"unexpected file {extra[0]}"
    changed = sorted(k for k in expected if got[k] != expected[k])
    if changed:
        return f"file {changed[0]} does not match its checksum"
    return ""
