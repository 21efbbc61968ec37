"""What keeps a workdir truthful: one run at a time, and phases that belong to the config asking for them.

A rerun on a workdir resumes whatever it finds there, so the workdir must
refuse to be reused for something else. Three records do that:

- `lock`: held (with `fcntl.flock`) by the process that runs; it names the pid
  and host. The kernel drops the lock when that process dies, so a lock file
  left by a dead run is taken over with a warning.
- `run.json`: the config of the run, less the settings that cannot change a
  result (`IGNORED`). A rerun with another config stops before any work.
- `checkpoints/<phase>/fingerprint.json`: everything that determines that
  phase (its config section, data, seed, model, starting weights). It catches
  what `run.json` cannot see: another manifest's data, another parent, the
  cells of an experiment grid.

On a mismatch the run stops with one line naming the differing keys;
`--config.overwrite=True` moves the old records aside (`<name>.replaced-<time>`),
never deletes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import socket
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxspec import files
from jaxspec.data import custom

# Settings that change how a run is carried out or reported, never its numbers.
IGNORED = frozenset(
    {
        "overwrite",
        "smoke",
        "log_every",
        "checkpoint_every",
        "eval.batch_size",
        "eval.every_steps",
        "data.data_dir",
        "data.num_threads",
        "data.num_workers",
        "data.prefetch",
        "sharding.fsdp",
        "sharding.devices",
        "experiment.grid",
    }
)
# Keys added after workdirs were written, at the values that change nothing: left out of the records
# there, so a workdir written before they existed still resumes.
ADDED_DEFAULTS = {f"data.{k}": v for k, v in custom.DEFAULTS.items()} | {"specialize.control": False}
# fields of every training phase section
ADDED_PHASE_DEFAULTS = {"reestimate_bn": False, "ema_decay": 0.0, "ema_tau": 2000.0}
# Sections that are off while their switch is 0 (added later, too): then none of their keys changes anything.
SWITCHED_SECTIONS = {"backbone": "epochs"}


def _added(key: str, value) -> bool:
    """`key` (flat, e.g. `generalist.reestimate_bn`) was added to the configs later and is at its no-op value."""
    leaf = key.rsplit(".", 1)[-1]
    if key in ADDED_DEFAULTS:
        return value == _jsonable(ADDED_DEFAULTS[key])
    return leaf in ADDED_PHASE_DEFAULTS and value == ADDED_PHASE_DEFAULTS[leaf]


class WorkdirError(ValueError):
    """The workdir holds something this run must not reuse, or is used by another run."""


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxspec: warning: {message}", file=sys.stderr, flush=True)


def _flat(tree, prefix: str = "") -> dict:
    """Nested dicts -> `{'a.b': value}` (lists and tuples are values)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def determinants(config_dict: dict) -> dict:
    """The flat config without `IGNORED` keys (nor keys under them) and `ADDED_DEFAULTS`, JSON-normalized."""
    flat = _flat(_jsonable(config_dict))
    off = [s for s, switch in SWITCHED_SECTIONS.items() if not flat.get(f"{s}.{switch}", 0)]
    ignored = (*IGNORED, *off)
    return {
        k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignored) and not _added(k, v)
    }


def differing(old: dict, new: dict) -> list[str]:
    """Keys whose values differ, with both values when they are short."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if a != b:
            shown = f"{a!r} -> {b!r}"
            out.append(f"{k} ({shown})" if len(shown) <= 60 else k)
    return out


def _ways_out(workdir: pathlib.Path) -> str:
    return f"use a new --workdir, or --config.overwrite=True to move the old records in {workdir} aside"


def set_aside(path: pathlib.Path) -> pathlib.Path:
    """Renames `path` to `<path>.replaced-<UTC time>` (nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.replaced-{stamp}-{n}"), n + 1
    path.rename(target)
    return target


def check_run(workdir: str | pathlib.Path, config_dict: dict, *, overwrite: bool) -> None:
    """Records the run's config in `workdir/run.json`, or stops if the recorded one differs."""
    workdir = pathlib.Path(workdir)
    record, want = workdir / "run.json", determinants(config_dict)
    if record.exists():
        try:
            had = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            had = {"<run.json>": "unreadable"}
        diff = differing(had, want)
        if diff and not overwrite:
            raise WorkdirError(f"{workdir} holds a run with another config: {', '.join(diff)}; {_ways_out(workdir)}")
        if diff:
            warn(
                f"--config.overwrite: the config differs ({', '.join(diff)}); phases made with other settings "
                "will be moved aside as they are reached"
            )
    if jax.process_index() == 0:
        files.write_json(record, want, indent=1)


def weights_digest(model_or_tree) -> str:
    """sha256 over the parameters and BatchNorm statistics (names, dtypes, shapes, bytes)."""
    if isinstance(model_or_tree, nnx.Module):
        _, params, stats, _ = nnx.split(model_or_tree, nnx.Param, nnx.BatchStat, ...)
        model_or_tree = (params, stats)
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(model_or_tree):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def data_fingerprint(data_cfg: dict, source) -> dict:
    """The data a phase reads: its config (manifest by content), size, labels, class names and, for own
    data, its files' digest.

    A groups file only names subsets, so it is left out: a phase on a subset records the classes it
    resolved to (labels, class names), and the generalist does not depend on it.
    """
    out = determinants({"data": data_cfg})
    out.pop("data.groups_file", None)
    manifest = out.get("data.manifest")
    if manifest and os.path.isfile(manifest):
        out["data.manifest"] = hashlib.sha256(pathlib.Path(manifest).read_bytes()).hexdigest()
    if source.info.digest:
        out["data.files"] = source.info.digest
    out["data.examples"] = len(source)
    labels = getattr(source, "labels", None)
    if labels is None and hasattr(source, "box_labels"):  # detection: each image's box labels
        per_image = source.box_labels
        labels = np.concatenate([[len(b) for b in per_image], *per_image]) if len(per_image) else np.zeros(0)
    if labels is not None:
        out["data.labels"] = hashlib.sha256(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes()).hexdigest()
    out["data.class_names"] = list(source.info.class_names)
    return out


def phase_fingerprint(
    *, phase, seed: int, data_cfg, source, start, spec: dict, extendable: bool = False, **extra
) -> dict:
    """Everything that determines a training phase, as a flat JSON dict.

    `phase` is its config section, `start` the model (or weights pytree) it
    starts from: its digest stands for the parent phase or the init file;
    `extra` holds what else the kind of phase depends on (columns, teacher).
    `extendable`: no step depends on the phase's length (e.g. a constant
    schedule), so a rerun with more steps continues the same phase.
    """
    section = phase.to_dict() if hasattr(phase, "to_dict") else dict(phase)
    out = {
        f"phase.{k}": v
        for k, v in _flat(_jsonable(section)).items()
        if not (extendable and k == "steps") and not _added(f"phase.{k}", v)
    }
    out["seed"] = int(seed)
    out.update(data_fingerprint(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg, source))
    out.update({f"model.{k}": v for k, v in _jsonable(spec).items()})
    out["start_weights"] = weights_digest(start)
    out.update({k: v for k, v in _jsonable(extra).items()})
    return out


def claim_phase(directory: pathlib.Path, fingerprint: dict, *, overwrite: bool) -> None:
    """Makes `directory` the checkpoints of the phase `fingerprint` describes, or stops.

    A directory with other contents than this phase's (another fingerprint,
    or none) is refused, or moved aside under `overwrite`.
    """
    record = directory / "fingerprint.json"
    if directory.exists() and any(directory.iterdir()):
        try:
            had = json.loads(record.read_text())
        except FileNotFoundError:
            had = {"<fingerprint.json>": "missing"}
        except (OSError, json.JSONDecodeError):
            had = {"<fingerprint.json>": "unreadable"}
        diff = differing(had, fingerprint)
        if not diff:
            return
        if not overwrite:
            raise WorkdirError(
                f"phase {directory.name!r} in {directory.parent} was made by another setup: "
                f"{', '.join(diff)}; {_ways_out(directory.parent.parent)}"
            )
        moved = set_aside(directory)
        warn(f"--config.overwrite: moved phase {directory.name!r} aside to {moved.name} ({', '.join(diff)})")
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        files.write_json(record, fingerprint, indent=1)


class Lock:
    """Exclusive use of a workdir by one run (held by process 0 of a multi-process run)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if jax.process_index() != 0:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirError(
                f"{self.path.parent} is in use by {_describe(holder)} (lock file {self.path}); "
                "wait for that run to end, or use another --workdir"
            ) from None
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale:
            warn(f"taking over the lock of {_describe(stale)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            ).encode(),
            0,
        )
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file: the last run ended cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on host {h['host']} (since {h.get('since', '?')})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return holder


@contextlib.contextmanager
def opened(workdir: str | pathlib.Path, config_dict: dict, *, overwrite: bool):
    """The workdir, created, locked and checked against the run's config for the duration of the run."""
    workdir = pathlib.Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir={workdir} is a file; it must be a directory (or not exist yet)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} is not writable: {e.strerror}") from None
    with Lock(workdir):
        check_run(workdir, config_dict, overwrite=overwrite)
        yield workdir
