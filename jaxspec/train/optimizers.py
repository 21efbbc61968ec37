"""Optimizers and learning-rate schedules, all from optax, chosen by config.

Two recipes matter: the generalist's (RMSprop, momentum 0.9, L2 1e-5,
label smoothing, linear warm-up then step decay, as torchvision trains
MobileNetV3 for the paper's ImageNet generalist) and specialization's (Adam at
a constant 1e-4). Both are plain config sections, so any mix is possible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """`cfg`: lr, schedule, warmup_steps, and for 'step' decay_every/decay_rate/noise_std.

    'step' is a staircase exponential decay. With `noise_std > 0` each decay
    interval's rate is multiplied by a fixed, seeded lognormal factor (lr noise,
    as some ImageNet recipes use to escape plateaus); it is a pure function of
    the step, so resumed runs see the same schedule.
    """
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(1, total_steps - warmup))
    elif cfg.schedule == "step":
        every = int(cfg.decay_every)
        if every <= 0:
            raise ValueError(f"decay_every must be positive for the step schedule, got {every}")
        staircase = optax.exponential_decay(cfg.lr, every, cfg.decay_rate, staircase=True)
        if cfg.noise_std > 0:
            key = jax.random.key(cfg.noise_seed)

            def main(step):
                eps = jax.random.normal(jax.random.fold_in(key, step // every))
                return staircase(step) * jnp.exp(cfg.noise_std * eps)

        else:
            main = staircase
    else:
        raise ValueError(f"Unknown schedule {cfg.schedule!r}; choose one of {list(SCHEDULES)}")
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def length_free(cfg) -> bool:
    """True when `make_schedule(cfg, n)` is the same function for every n (training can be extended)."""
    return cfg.schedule in ("constant", "step")


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns the optimizer and its schedule (logged as the learning rate)."""
    lr = make_schedule(cfg, total_steps)
    name = cfg.optimizer
    if name == "adam":
        tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif name == "adamw":
        tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif name == "rmsprop":
        # torch's RMSprop adds eps outside the square root; torchvision's recipe uses 0.0316.
        tx = optax.rmsprop(lr, decay=cfg.rms_decay, eps=cfg.eps, eps_in_sqrt=False, momentum=cfg.momentum)
    elif name == "sgd":
        tx = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    else:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    if name != "adamw" and cfg.weight_decay:
        # Coupled L2 (added to the gradient), as torch's weight_decay does for these.
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, lr
