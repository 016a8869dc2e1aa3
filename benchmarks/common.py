"""Shared helpers of the benchmarks: a matmul peak, model FLOP counts, cores used."""

import resource
import time

import tensorflow as tf


def matmul_peak_gflops(n: int = 2048, dtype=tf.float32, repeats: int = 20) -> float:
    """Achieved GFLOP/s of an n x n matmul in `dtype` on the default device (the reference)."""
    a = tf.random.normal([n, n], dtype=tf.float32)
    a = tf.cast(a, dtype)

    best = float("inf")
    for jit in (False, True):  # the better of the two runtimes is the reference
        mm = tf.function(lambda x: tf.matmul(x, x), jit_compile=jit)
        mm(a).numpy()
        for _ in range(3):
            tic = time.perf_counter()
            for _ in range(repeats):
                out = mm(a)
            out.numpy()
            best = min(best, (time.perf_counter() - tic) / repeats)
    return 2 * n**3 / best / 1e9


def train_flops_per_step(cfg) -> float:
    """Model FLOPs of one train step (forward + backward = 3x forward), matmuls only."""
    m, t = cfg.model, cfg.task
    b, n, d = cfg.train.batch_size, t.n_points, m.d_model
    hk = m.n_heads * m.head_dim
    per_token_layer = 2 * (3 * d * hk + hk * d)          # q, k, v, output projections
    per_token_layer += 2 * 2 * n * hk                    # scores and weighted values
    per_token_layer += 2 * 2 * d * m.mlp_ratio * d       # MLP in and out
    per_token = m.n_layers * per_token_layer + 2 * (t.x_dim + t.y_dim + 1) * d + 2 * d * t.y_dim
    return 3.0 * per_token * b * n


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def restore_bar_run(parser, logdir: str):
    """(config, Trainer, step) of a bar-head run's last checkpoint in `logdir`; a missing
    config.json, another head or no checkpoint ends in parser.error naming --logdir."""
    import os

    config = os.path.join(logdir, "config.json")
    if not os.path.isfile(config):
        parser.error(f"--logdir {logdir!r} holds no config.json: expected a run's folder")

    from gpicl_tf.config import read_config
    from gpicl_tf.train import Trainer

    try:
        cfg = read_config(config)
        if cfg.model.head != "bar":
            raise ValueError(f"the run's model.head is {cfg.model.head!r}: expected 'bar'")
        trainer = Trainer(cfg, logdir)
        step = trainer.restore()
        if step == 0:
            raise ValueError("it has no checkpoint: train it first")
    except ValueError as e:
        parser.error(f"--logdir {logdir!r}: {e}")
    return cfg, trainer, step
