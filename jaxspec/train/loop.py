"""The training loop: steps, progress, metrics, checkpoints, NaN guard.

The loop only orchestrates: the math is in the jitted step. Metrics are
fetched one log interval late so the host never stalls the device queue,
except before a checkpoint, whose state must be known finite first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxspec import sharding
from jaxspec.train.checkpoint import Checkpointer
from jaxspec.train.state import TrainState, unstack


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def announce_restore(name: str, step: int, total: int) -> None:
    """The line a rerun prints for a phase it restores instead of starting (process 0, stderr)."""
    if jax.process_index() == 0:
        what = "finished: restored, not retrained" if step >= total else "resuming"
        print(f"[{name}] {what} (checkpoint step {step}/{total})", file=sys.stderr, flush=True)


class Progress:
    """One status line (rewritten in place on a terminal): step, loss, rate, ETA."""

    def __init__(self, name: str, total: int, start: int, batch_size: int, stream=None):
        self.name, self.total, self.batch_size = name, total, batch_size
        self._stream = stream or sys.stderr  # looked up now, so a redirected stderr (pytest's capsys) is used
        self._tty = self._stream.isatty()
        self._t0, self._s0 = time.perf_counter(), start

    def rate(self, step: int, t: float) -> float:
        """Images per second between the previous update and (`step`, time `t`)."""
        dt = t - self._t0
        return (step - self._s0) * self.batch_size / dt if dt > 0 and step > self._s0 else 0.0

    def update(self, step: int, t: float, metrics: dict[str, float]) -> None:
        """Reports `metrics` of `step`, whose work was handed to the device at time `t`."""
        rate = self.rate(step, t)
        self._t0, self._s0 = t, step
        if jax.process_index():
            return
        eta = (self.total - step) * self.batch_size / rate if rate else float("nan")
        extra = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = (
            f"[{self.name}] step {step}/{self.total}  {extra}  {rate:,.0f} img/s  ETA {_fmt_time(eta) if rate else '?'}"
        )
        self._stream.write(("\r" + line + "\033[K") if self._tty else line + "\n")
        self._stream.flush()

    def note(self, step: int, values: dict[str, float]) -> None:
        """A line of its own, e.g. validation results, that stays on screen."""
        if jax.process_index():
            return
        text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        self._stream.write(
            ("\r" if self._tty else "") + f"[{self.name}] step {step}  {text}" + ("\033[K\n" if self._tty else "\n")
        )
        self._stream.flush()

    def close(self) -> None:
        if self._tty and not jax.process_index():
            self._stream.write("\n")


def last_good(ckpts: list[Checkpointer]) -> str:
    """Where a stopped run resumes: each phase's newest step that verifies now (in-flight saves finished first)."""
    out = []
    for c in ckpts:
        step = c.last_good_step()
        out.append(
            f"{c.directory.name}: no checkpoint verifies, a rerun starts the phase over"
            if step is None
            else f"{c.directory.name}: step {step} verified, a rerun resumes there"
        )
    return "; ".join(out)


def _check_finite(step: int, metrics: dict, names: Sequence[str], ckpts: Sequence[Checkpointer]) -> None:
    bad = {k: v.tolist() for k, v in metrics.items() if k in ("loss", "grad_norm") and not np.all(np.isfinite(v))}
    if bad:
        who = (
            ""
            if len(names) == 1
            else " for specialists "
            + str([n for i, n in enumerate(names) if not all(np.isfinite(v[i]) for v in bad.values())])
        )
        raise FloatingPointError(f"Non-finite {bad}{who} at step {step}; stopping ({last_good(ckpts)}).")


def fit(
    name: str,
    state: TrainState,
    train_step: Callable,
    data_iter,
    *,
    num_steps: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    ckpt: Checkpointer | Sequence[Checkpointer],
    writer,
    log_every: int = 50,
    checkpoint_every: int = 500,
    eval_every: int = 0,
    eval_fn: Callable[[TrainState], dict[str, float] | list[dict[str, float]]] | None = None,
    members: Sequence[str] | None = None,
) -> TrainState:
    """Runs `train_step` until `state.step == num_steps`, from wherever it is.

    One model: `data_iter` and `ckpt` are its own. K specialists trained in one
    vmapped step (`members`: their names): `state` is their stacked state on a
    `sharding.spec_mesh`, `data_iter` and `ckpt` are lists (one per member),
    metrics come back with a leading K axis and are written per member, and
    `eval_fn` returns one dict per member. The progress line shows the mean
    loss and accuracy and the images/s of all K together.
    """
    stacked = members is not None
    names = list(members) if stacked else [name]
    iters = list(data_iter) if stacked else [data_iter]
    ckpts = list(ckpt) if stacked else [ckpt]
    step = int(np.ravel(jax.device_get(state.step))[0])
    progress = Progress(name, num_steps, step, batch_size * len(names))
    pending: tuple[int, dict, float] | None = None  # (step, metrics on device, dispatch time)

    def per_member(values: dict, i: int) -> dict:
        return {k: float(v[i]) if stacked else float(v) for k, v in values.items()}

    def flush():
        nonlocal pending
        if pending is None:
            return
        at, metrics, t = pending
        metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        pending = None
        _check_finite(at, metrics, names, ckpts)
        for i, member in enumerate(names):
            writer.write_scalars(at, {f"{member}/train_{k}": v for k, v in per_member(metrics, i).items()})
        writer.write_scalars(at, {f"{name}/images_per_sec": progress.rate(at, t)})
        progress.update(at, t, {"loss": metrics["loss"].mean(), "acc": metrics["accuracy"].mean()})

    def save(force: bool):
        for i, (c, it) in enumerate(zip(ckpts, iters)):
            c.save(unstack(state, i) if stacked else state, it, force=force)

    while step < num_steps:
        if stacked:
            batch = sharding.put_batches([next(it) for it in iters], mesh)
        else:
            batch = sharding.put_batch(next(data_iter), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        due = step % checkpoint_every == 0 or step == num_steps
        if due or step % log_every == 0:
            flush()
            pending = (step, metrics, time.perf_counter())
        if due:
            flush()  # synchronous: never checkpoint a state not known to be finite
            save(force=step == num_steps)
            writer.flush()  # the curve up to a checkpoint survives a kill as the checkpoint does
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == num_steps):
            values = eval_fn(state)
            values = values if stacked else [values]
            for member, v in zip(names, values):
                writer.write_scalars(step, {f"{member}/{k}": x for k, x in v.items()})
            progress.note(
                step, values[0] if not stacked else {f"{m}/{k}": x for m, v in zip(names, values) for k, x in v.items()}
            )
    flush()
    progress.close()
    writer.flush()
    return state
