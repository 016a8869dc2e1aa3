"""The task stream: a tf.data pipeline that generates tasks in-graph.

Examples are generated in blocks of `task.block_size` (vectorised: every
weight tensor of a block has a leading example dimension). Block `b` of the
global batch at step `s` is a pure function of (seed, s, b): its functions,
inputs, noise and query masks all come from a stateless seed folded from
those numbers. A replica takes the blocks of the global batch that belong to
it, so one step's examples are the same whatever the number of replicas or
workers, every replica gets distinct examples, and a resumed run sees exactly
the tasks an uninterrupted run would.

    ds = make_dataset(cfg.task, seed=0, global_batch=64)
    batch = next(iter(ds))   # {"x": [64, N, dx], "y": [64, N, dy], "is_query": [64, N]}
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from gpicl_tf import tasks
from gpicl_tf.config import TaskConfig

# Second seed words that keep the training stream, evaluation tasks and the
# fixed task pool in separate key spaces.
TRAIN_STREAM = 0x7A1
EVAL_STREAM = 0xE7A1
POOL = 0x9001
BIAS = 0xB1A5


def fold(seed, data):
    """A new [2] seed from a seed and an integer (stateless_fold_in)."""
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64))


class TaskSampler:
    """Draws blocks of examples as pure functions of (seed, step, block).

    Args:
      cfg: the task configuration.
      seed: the run's seed.
      stream: TRAIN_STREAM, EVAL_STREAM or any int: which key space the
        examples come from. The task pool (n_tasks=T) depends on `seed` only,
        so seen tasks can be drawn again from any stream.
    """

    def __init__(self, cfg: TaskConfig, seed: int, stream: int = TRAIN_STREAM):
        self.cfg = cfg
        self.families = [tasks.get_family(n)(cfg) for n in cfg.families]
        self.weights = [float(m[1]) for m in cfg.mix] or [1.0]
        self.logits = tasks.weight_logits(self.weights)  # (1, F)
        self.seed = seed
        self.stream_seed = tf.constant([seed, stream], tf.int64)
        self.pool_seed = tf.constant([seed, POOL], tf.int64)

    def _pick(self, seed, u):
        """Family index of each of u examples: [U]."""
        return tasks.draw_index(self.logits, seed, u)

    def _xy(self, x_seed, u, n, fn_seed, fn_seeds, x_low, x_high):
        """Inputs and targets of u examples; with a mix, each example's family is drawn."""
        kw = dict(fn_seed=fn_seed, fn_seeds=fn_seeds, x_low=x_low, x_high=x_high)
        if len(self.families) == 1:
            return self.families[0].sample_xy(x_seed, u, n, **kw)
        if fn_seeds is not None:  # a pool function keeps its family
            pick = tf.concat([self._pick(fold(s, 99), 1) for s in fn_seeds], 0)
        else:
            pick = self._pick(fold(fn_seed, 99), u)

        def seeds_of(i):
            return kw if fn_seed is None else dict(kw, fn_seed=fold(fn_seed, i))

        if any(f.own_x for f in self.families):  # inputs drawn with the labels (classes)
            outs = [f.sample_xy(x_seed, u, n, **seeds_of(i)) for i, f in enumerate(self.families)]
            x = tf.gather(tf.stack([o[0] for o in outs], 1), pick, batch_dims=1)
            return x, tf.gather(tf.stack([o[1] for o in outs], 1), pick, batch_dims=1)
        # Every regression family draws x the same way; only the families some example
        # picked compute their outputs.
        x = self.families[0].sample_x(x_seed, u, n, x_low, x_high)

        def y_of(i, f):
            if fn_seeds is not None:
                return lambda: f.sample_y_from_seeds(fn_seeds, x)
            return lambda: f.sample_y(fold(fn_seed, i), x)

        makers = [y_of(i, f) for i, f in enumerate(self.families)]
        return x, tasks.pick_outputs(pick, self.weights, makers,
                                     tf.stack([u, tf.shape(x)[1], self.cfg.y_dim]))

    def block(self, step, index, u: int, n_context=None, x_low=None, x_high=None):
        """A block of u examples: x [U, N, dx], y [U, N, dy], is_query [U, N], task_id [U].

        Args:
          step, index: position of the block in the stream.
          u: examples in the block.
          n_context: fixed number of context points; None draws it per example
            uniformly from [min_context, max_context].
          x_low, x_high: input range override (distribution-shift evaluation).
        """
        cfg = self.cfg
        n = cfg.n_points
        blk = fold(fold(self.stream_seed, step), index)
        if cfg.n_tasks is None:
            fn_seed, fn_seeds = fold(blk, 1), None
            task_id = tf.fill([u], tf.constant(-1, tf.int64))
        else:
            task_id = tf.random.stateless_uniform([u], fold(blk, 2), 0, cfg.n_tasks,
                                                  dtype=tf.int64)
            fn_seed, fn_seeds = None, [fold(self.pool_seed, task_id[i]) for i in range(u)]
        x, y = self._xy(fold(blk, 3), u, n, fn_seed, fn_seeds, x_low, x_high)
        n_fixed = int(round(cfg.biased_fraction * u))
        if n_fixed:  # the first n_fixed examples of the block share one fixed task
            fixed = [tf.constant([self.seed, BIAS], tf.int64)] * u
            xf, yf = self._xy(fold(blk, 3), u, n, None, fixed, x_low, x_high)
            m = tf.reshape(tf.range(u) < n_fixed, [u, 1, 1])
            x, y = tf.where(m, xf, x), tf.where(m, yf, y)
            task_id = tf.where(tf.range(u) < n_fixed, tf.constant(-2, tf.int64), task_id)
        if cfg.standardize_y:
            mean, var = tf.nn.moments(y, axes=[1], keepdims=True)  # (U, 1, dy)
            y = (y - mean) * tf.math.rsqrt(var + 1e-8)
        if cfg.noise_std > 0:
            y += tf.random.stateless_normal(tf.shape(y), fold(blk, 4), stddev=cfg.noise_std)
        if n_context is None:
            n_ctx = tf.random.stateless_uniform([u, 1], fold(blk, 5), cfg.min_context,
                                                cfg.context_max + 1, dtype=tf.int32)
        else:
            n_ctx = tf.fill([u, 1], tf.cast(n_context, tf.int32))
        # A random subset of n_ctx points is the context; the rest are queries.
        keys = tf.random.stateless_uniform([u, n], fold(blk, 6))
        rank = tf.argsort(tf.argsort(keys, axis=-1), axis=-1)  # (U, N) rank of each point
        is_query = tf.cast(rank >= n_ctx, tf.float32)
        return {"x": x, "y": y, "is_query": is_query, "task_id": task_id}


def make_dataset(cfg: TaskConfig, seed: int, global_batch: int, start_step: int = 0,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 stream: int = TRAIN_STREAM, with_task_id: bool = False) -> tf.data.Dataset:
    """An infinite dataset of per-replica batches, starting at `start_step`.

    The global batch of a step is made of blocks 0..global_batch/U - 1. This
    pipeline (input pipeline `w` of `W`, feeding `L` local replicas) yields,
    per step, the batches of its replicas w*L .. w*L+L-1 in order, which is
    how `distribute_datasets_from_function` hands batches to local replicas.
    """
    n_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    n_replicas = input_context.num_replicas_in_sync if input_context else 1
    u = cfg.block_size
    if global_batch % (n_replicas * u):
        raise ValueError(f"train.batch_size={global_batch} is invalid: expected a multiple of "
                         f"{n_replicas} replicas x task.block_size={u}")
    per_replica = global_batch // n_replicas
    blocks_per_replica = per_replica // u
    local = n_replicas // n_pipelines
    blocks_per_step = local * blocks_per_replica  # blocks this pipeline makes per step
    sampler = TaskSampler(cfg, seed, stream)

    def one(k):
        step = start_step + k // blocks_per_step
        index = pipeline_id * blocks_per_step + k % blocks_per_step
        ex = sampler.block(step, index, u)
        if not with_task_id:
            ex.pop("task_id")
        return ex

    def merge(ex):  # (blocks, U, ...) -> (blocks * U, ...)
        return {k: tf.reshape(v, tf.concat([[per_replica], tf.shape(v)[2:]], 0))
                for k, v in ex.items()}

    ds = tf.data.Dataset.counter(0, dtype=tf.int64)
    ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(blocks_per_replica, drop_remainder=True).map(merge)
    return ds.prefetch(tf.data.AUTOTUNE)


def sample_batch(cfg: TaskConfig, seed: int, n: int, n_context=None, stream: int = EVAL_STREAM,
                 step: int = 0, x_low=None, x_high=None) -> dict:
    """A fixed batch of n examples (evaluation), each with `n_context` context points."""
    sampler = TaskSampler(cfg, seed, stream)
    u = min(cfg.block_size, n)
    n_blocks = -(-n // u)
    ds = tf.data.Dataset.range(n_blocks).map(
        lambda i: sampler.block(step, i, u, n_context, x_low, x_high),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    out = next(iter(ds.unbatch().batch(n)))
    return out
