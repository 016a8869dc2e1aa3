"""Meta-training: one `strategy.run` loop for every tf.distribute strategy.

Sections: strategy, model and optimiser, input, update step, checkpoints,
summaries, loop. Keras 3.15's `model.fit` cannot drive
MultiWorkerMirroredStrategy (../shared/PITFALLS.md), so the loop is a
`tf.function` over `strategy.run` with a Keras model and Keras optimiser.

    trainer = Trainer(cfg, logdir="runs/gpicl")
    result = trainer.train()       # resumes from runs/gpicl/checkpoints if present
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from gpicl_tf import data as data_lib
from gpicl_tf import summaries
from gpicl_tf import evaluate as evaluation
from gpicl_tf.config import ExperimentConfig, get_preset, read_config
from gpicl_tf.files import check_dir_arg, write_atomic
from gpicl_tf.losses import masked_query_loss
from gpicl_tf.progress import progress_bar
from gpicl_tf.model import bar_distribution, build_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class WorkerFailure(RuntimeError):
    """A collective operation failed or timed out: a peer worker is gone."""


def collective_timeout() -> float:
    """Seconds a collective op waits for its peers (GPICL_COLLECTIVE_TIMEOUT, default 120)."""
    return float(os.environ.get("GPICL_COLLECTIVE_TIMEOUT", "120"))


@dataclasses.dataclass
class TrainResult:
    step: int
    final_loss: float
    eval_loss: float
    steps_per_sec: float
    logdir: str
    resumed_from: int
    complete: bool = False  # True: the run had finished before; nothing was trained


# ---------------------------------------------------------------- strategy
def cluster_spec() -> dict:
    """The cluster of TF_CONFIG ({} when unset); invalid JSON is a clear ValueError."""
    text = os.environ.get("TF_CONFIG", "") or "{}"
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}): "
                         'expected {"cluster": {"worker": ["host:port", ...]}, "task": '
                         '{"type": "worker", "index": 0}}') from None
    cluster = tf_config.get("cluster", {}) if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict):
        raise ValueError("TF_CONFIG: expected a JSON object with a 'cluster' object")
    return cluster


def select_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored for a TF_CONFIG cluster of more than one task (chief and
    workers together), Mirrored over GPUs, else the default strategy."""
    cluster = cluster_spec()
    if sum(len(cluster.get(t, [])) for t in ("chief", "worker")) > 1:
        return make_multiworker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    return tf.distribute.get_strategy()


def make_multiworker_strategy(timeout_seconds: Optional[float] = None):
    """MultiWorkerMirroredStrategy with a collective timeout (GPICL_COLLECTIVE_TIMEOUT).

    It must be created before any other TensorFlow op of the process.
    """
    timeout = timeout_seconds or collective_timeout()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def task_name(strategy) -> Optional[str]:
    """"worker_1", "chief_0" in a multi-task cluster, else None."""
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.cluster_spec().as_dict():
        return None
    return f"{resolver.task_type}_{resolver.task_id}"


def is_chief(strategy) -> bool:
    """The chief task if the cluster has one, else worker 0; any single process."""
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def check_fits(cfg: ExperimentConfig, strategy) -> None:
    """The global batch splits into whole blocks on every replica."""
    r, u = strategy.num_replicas_in_sync, cfg.task.block_size
    if cfg.train.batch_size % (r * u):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is invalid: expected a "
                         f"multiple of {r} replicas x task.block_size={u} = {r * u}")


def learning_rate_schedule(cfg: ExperimentConfig):
    """Linear warmup to the peak rate, then cosine decay to end_lr_fraction of it."""
    t = cfg.train
    warmup = min(t.warmup_steps, t.steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else t.learning_rate,
        decay_steps=max(t.steps - warmup, 1), alpha=t.end_lr_fraction,
        warmup_target=t.learning_rate if warmup else None, warmup_steps=warmup)


# Train fields that shape the trajectory: a resumed run must keep them. The
# others (intervals, checkpoints kept, XLA, steps per call) may change.
RESUME_KEEPS = ("steps", "batch_size", "learning_rate", "warmup_steps", "end_lr_fraction",
                "clip_norm", "seed", "precision", "loss", "init_from")
FINAL = "final.json"  # figures of a finished run, read back when it is rerun


BORDERS_STREAM = 0xB0D5  # the tasks that place the bar head's borders (no training step)


def standardised_prior(cfg: ExperimentConfig, n_tasks: int = 2048):
    """n_tasks tasks of the training prior (the borders' stream) standardised by each
    task's context as the model does (with model.base_fit, the residuals of the base fit;
    in units of model.y_scale): (z [T, N, dy], unit [T, 1, dy] (a zero unit, a constant
    context, counted as 1), the batch)."""
    from gpicl_tf.layers import ContextStandardizer, unit_scale
    from gpicl_tf.model import standardizer_kwargs

    b = data_lib.sample_batch(cfg.task, cfg.train.seed, n_tasks, stream=BORDERS_STREAM)
    m = cfg.model
    kw = standardizer_kwargs(m)  # with base_fit the head predicts the base fit's residual
    if m.base_fit == "none":  # the fits do not move the location: skip their solves
        kw = {"y_scale": m.y_scale}
    _, loc, scale = ContextStandardizer(eps=m.std_eps, **kw)(b["x"], b["y"], b["is_query"])
    scale = unit_scale(scale)
    return ((b["y"] - loc) / scale).numpy(), scale.numpy(), b


def prior_borders(cfg: ExperimentConfig, n_tasks: int = 2048):
    """The bar head's n_bins + 1 borders: quantiles of the standardised query y of n_tasks
    tasks of the training prior (`standardised_prior`).

    A pure function of (task config, seed, n_bins): every worker and every resume
    computes the same borders (they are also in every checkpoint).
    """
    from gpicl_tf.distributions import borders_from_samples

    z, _, b = standardised_prior(cfg, n_tasks)
    return borders_from_samples(z[b["is_query"].numpy() > 0.5], cfg.model.n_bins)


def fits_outside_xla(model, jit_compile: bool) -> bool:
    """Whether the train step runs the model's standardisation outside XLA and the rest
    (model.trunk(): forward, backward, update) inside it: with XLA and kernel fits, since
    XLA's Cholesky on the CPU is ~29x slower than TensorFlow's at the fits' size (the
    standardisation has no weights)."""
    return bool(jit_compile) and bool(getattr(model, "kernel_length_scales", ()))


RECAL_STREAM = 0xCA1B  # the tasks that fit the bar head's recalibration (no training step)
RECAL_CHUNK = 128  # tasks per call of the recalibration's XLA-compiled model
# model.recalibrate_width: tasks per context-size bucket (their widths as the prior draws
# them; the `default`'s 2-feature tasks are 18% of them), and the fewest tasks of a
# width group for a map of its own (fewer keep the bucket's pooled map: maps from 64
# tasks were too noisy, 0.86 coverage for 0.90)
RECAL_WIDTH_TASKS = 2048
RECAL_WIDTH_MIN_TASKS = 192


def fit_recalibration(model, cfg: ExperimentConfig, tasks_per_bucket: Optional[int] = None,
                      sizes_per_bucket: int = 3) -> np.ndarray:
    """Fits the bar head's recalibration maps (model.recalibrate; see BarHead) and
    returns them [RECAL_BUCKETS, RECAL_KNOTS + 1].

    For each context-size bucket that training draws from, tasks_per_bucket tasks of the
    training prior (a stream of their own, spread over up to sizes_per_bucket of the
    bucket's context sizes, evenly spaced from its smallest to its largest) give the
    probability integral transforms F(y) of their query points under the head's own
    distribution; the bucket's map is their empirical CDF at RECAL_LEVELS, mixed 99:1
    with the identity so it stays strictly increasing. Buckets training never draws keep
    the identity. (Context sizes drawn as training draws them would leave the buckets of
    1-3 points a 64th of the tasks each: with 4096 tasks in all, their maps were too
    noisy and the 90% intervals covered 0.86 at k = 1.) A pure function of (weights,
    task config, seed): every worker fits the same maps.

    With model.recalibrate_width (the head's by_width) each bucket's queries are split by
    their width group (`gpicl_tf.layers.width_group`), tasks_per_bucket defaults to
    RECAL_WIDTH_TASKS, and a group of at least RECAL_WIDTH_MIN_TASKS tasks gets its own
    map; the others (widths the prior draws rarely or never) keep the bucket's pooled one.
    Returns [RECAL_BUCKETS x groups, RECAL_KNOTS + 1] (row group * RECAL_BUCKETS + bucket).
    """
    from gpicl_tf.layers import RECAL_BUCKETS, RECAL_LEVELS, context_bucket, width_group
    from gpicl_tf.model import Predictive, model_inputs

    bar = model.get_layer("bar")
    by_width = bar.by_width
    if tasks_per_bucket is None:
        tasks_per_bucket = RECAL_WIDTH_TASKS if by_width else 768
    levels = np.asarray(RECAL_LEVELS)
    table = np.tile(levels, (bar.recal_rows, 1))
    bar.recalibration.assign(table.astype(np.float32))  # the head's own distribution
    std_layer, trunk = model.get_layer("standardize"), model.trunk()

    def groups(feats, is_query):  # the points' width groups [B, N], 0 without maps per width
        return (width_group(feats, bar.x_dim) if by_width
                else tf.zeros(tf.shape(is_query), tf.int32))

    bars = bar_distribution(model)
    t = cfg.task
    ks = np.arange(t.min_context, t.context_max + 1)
    buckets = np.asarray(context_bucket(ks))

    plan = []  # (bucket, context size, tasks)
    for b in range(RECAL_BUCKETS):
        sizes = ks[buckets == b]
        if len(sizes):
            sizes = np.unique(np.round(np.linspace(sizes[0], sizes[-1],
                                                   min(sizes_per_bucket, len(sizes)))))
            plan += [(b, int(k), -(-tasks_per_bucket // len(sizes))) for k in sizes]
    # Every size's tasks come from one tf.data pipeline (traced once, sampled while the
    # model runs), as blocks of task.block_size examples, each block of one size; the model
    # runs as one graph (a pipeline and eager calls per size cost ~1 s to sample and ~0.8 s
    # to predict each batch: 46 s for the maps, 21 s now).
    per_block = t.block_size
    blocks = [-(-n // per_block) for _, _, n in plan]
    sampler = data_lib.TaskSampler(t, cfg.train.seed, RECAL_STREAM)
    ds = tf.data.Dataset.from_tensor_slices(
        (np.arange(sum(blocks), dtype=np.int64),
         np.repeat([k for _, k, _ in plan], blocks).astype(np.int32))).map(
        lambda i, k: sampler.block(0, i, per_block, k), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).prefetch(tf.data.AUTOTUNE)

    if fits_outside_xla(model, cfg.train.jit_compile):
        # As the train step runs it: the fits outside XLA, the model after them inside,
        # on chunks of one shape (one compilation): 16 s -> 14 s for the `default`'s
        # maps (benchmarks/main_job_phases.py); the maps equal the plain model's but for
        # rounding (a PIT on the other side of a level: one in ~45,000 on `default`)
        @tf.function(jit_compile=True)
        def head_cdf(feats, y_loc, y_scale, y, is_query):
            out = trunk([feats, y_loc, y_scale, is_query], training=False)
            return Predictive(bars, out).cdf(y), groups(feats, is_query)

        @tf.function
        def pit_chunk(x, y, is_query):
            return head_cdf(*std_layer(x, y, is_query), y, is_query)

        def pit(x, y, is_query):
            n = int(x.shape[0])
            full = n - n % -RECAL_CHUNK  # n rounded up: the last chunk is filled with the
            x, y, q = (tf.concat([v] * -(-full // n), 0)[:full]  # first tasks, then cut
                       for v in (x, y, is_query))
            parts = [pit_chunk(x[i:i + RECAL_CHUNK], y[i:i + RECAL_CHUNK],
                               q[i:i + RECAL_CHUNK]) for i in range(0, full, RECAL_CHUNK)]
            return tuple(tf.concat(v, 0)[:n] for v in zip(*parts))
    else:
        @tf.function(reduce_retracing=True)
        def pit(x, y, is_query):
            if not by_width:
                out = model(model_inputs({"x": x, "y": y, "is_query": is_query}),
                            training=False)
                return Predictive(bars, out).cdf(y), groups(None, is_query)
            feats, y_loc, y_scale = std_layer(x, y, is_query)  # the fits once: the groups
            out = trunk([feats, y_loc, y_scale, is_query], training=False)  # need feats
            return Predictive(bars, out).cdf(y), groups(feats, is_query)

    def fitted(u):  # the map of PITs u: their empirical CDF, 99:1 with the identity
        u = np.sort(u)
        emp = np.searchsorted(u, levels, side="right") / len(u)
        emp[0], emp[-1] = 0.0, 1.0
        return 0.99 * emp + 0.01 * levels

    it = iter(ds)
    pits = {}  # bucket: (PITs, width groups, task's width group) of its query points
    for (b, _, n), nb in zip(plan, blocks):
        got = [next(it) for _ in range(nb)]
        x, y, q = (tf.concat([g[key] for g in got], 0)[:n] for key in ("x", "y", "is_query"))
        cdf, group = (v.numpy() for v in pit(x, y, q))  # (T, N, dy), (T, N)
        mask = q.numpy() > 0.5
        if not by_width:
            pits.setdefault(b, []).append((cdf[mask].ravel(), None, None))
            continue
        # a task's group: that of most of its queries (all of them but for an x of exactly 0)
        task_group = np.array([np.bincount(g[m]).argmax() if m.any() else -1
                               for g, m in zip(group, mask)])
        pits.setdefault(b, []).append((cdf[mask].ravel(), np.repeat(group[mask], cdf.shape[-1]),
                                       task_group))
    n_groups = bar.recal_rows // RECAL_BUCKETS
    for b, parts in pits.items():
        u = np.concatenate([p[0] for p in parts])
        pooled = fitted(u)
        table[b::RECAL_BUCKETS] = pooled  # every width group's row of the bucket
        if by_width:
            groups = np.concatenate([p[1] for p in parts])
            tasks = np.concatenate([p[2] for p in parts])
            for g in range(n_groups):
                if np.sum(tasks == g) >= RECAL_WIDTH_MIN_TASKS:
                    table[g * RECAL_BUCKETS + b] = fitted(u[groups == g])
    bar.recalibration.assign(table.astype(np.float32))
    return table


def config_differences(old: ExperimentConfig, new: ExperimentConfig) -> list:
    """["model.d_model: stored 64, given 32", ...] for fields a resume must keep."""
    out = []
    for part in ("task", "model", "train"):
        a, b = dataclasses.asdict(getattr(old, part)), dataclasses.asdict(getattr(new, part))
        for k in a:
            if a[k] != b[k] and (part != "train" or k in RESUME_KEEPS):
                out.append(f"{part}.{k}: stored {a[k]!r}, given {b[k]!r}")
    return out


class Trainer:
    """Builds everything under the strategy's scope and runs the training loop.

    Args:
      cfg: the experiment configuration.
      logdir: run directory: TensorBoard events, `checkpoints/`, `config.json`.
      strategy: a tf.distribute strategy; None selects one (`select_strategy`).
      dataset_fn: optional replacement for the task stream, called as
        `dataset_fn(input_context, start_step)` and returning per-replica
        batches of {"x", "y", "is_query"} (custom data, fault injection).

    Nothing is written to `logdir` until `train()` has checked that the run
    folder holds this experiment (or nothing) and restored its checkpoint.
    """

    def __init__(self, cfg: ExperimentConfig, logdir: str, strategy=None,
                 dataset_fn: Optional[Callable] = None):
        self.cfg = cfg
        self.strategy = strategy or select_strategy()
        check_fits(cfg, self.strategy)
        self.chief = is_chief(self.strategy)
        # Non-chief workers take part in saving (it is collective) but write to a
        # scratch folder of their own; they resume from the chief's checkpoints.
        self.run_dir = logdir
        self.chief_ckpt_dir = os.path.join(logdir, "checkpoints")
        self.logdir = logdir if self.chief else os.path.join(
            logdir, "workers", task_name(self.strategy))
        self.ckpt_dir = os.path.join(self.logdir, "checkpoints")
        self.dataset_fn = dataset_fn
        if cfg.train.precision == "mixed_bfloat16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        else:
            keras.mixed_precision.set_global_policy("float32")
        keras.utils.set_random_seed(cfg.train.seed)
        with self.strategy.scope():
            self.model = build_model(cfg)
            self.optimizer = keras.optimizers.Adam(learning_rate=learning_rate_schedule(cfg))
            # Build the optimiser in scope (keras-team/keras#23085).
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # The first step whose loss or gradient was not finite (-1: none yet).
        self.bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="bad_step")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir,
                                                  max_to_keep=cfg.train.keep_checkpoints)
        self._train_call = None

    # ------------------------------------------------------------ checkpoints
    def _check_config(self) -> None:
        """Refuses a run folder that holds another experiment; writes nothing."""
        path = os.path.join(self.run_dir, "config.json")
        check_dir_arg("--logdir", self.run_dir)
        if self.chief and os.path.exists(path):
            diffs = config_differences(read_config(path), self.cfg)
            if diffs:
                raise ValueError(
                    f"{self.run_dir} holds a run with another config; resuming would mix two "
                    f"experiments. Differs: {'; '.join(diffs)}. Use another --logdir, or the "
                    "stored values (train.steps shapes the learning-rate schedule and "
                    "train.seed the tasks, so neither can change mid-run).")

    def restore(self) -> int:
        """Restores the latest checkpoint if any; returns the step it resumes from.

        A checkpoint that cannot be read, or that holds another model, is a
        ValueError naming it.
        """
        latest = tf.train.latest_checkpoint(self.chief_ckpt_dir)
        if latest:
            try:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001  OpError, IndexError (truncated), ...
                first = (getattr(e, "message", None) or str(e)).strip().splitlines()[0][:200]
                raise ValueError(
                    f"checkpoint {latest} cannot be restored into this model ({first}); it is "
                    "damaged or from another config: delete it or use another --logdir"
                    ) from None
        return int(self.step.numpy())

    def _agree_on_step(self, step: int) -> None:
        """Every worker restored the same step (an all-reduce), else a clear error."""
        if self.strategy.num_replicas_in_sync == 1:
            return

        @tf.function
        def gather():  # the restored step of every replica of every worker
            def fn():
                ctx = tf.distribute.get_replica_context()
                return ctx.all_gather(tf.reshape(self.step, [1]), axis=0)
            return self.strategy.experimental_local_results(self.strategy.run(fn))[0]

        steps = gather().numpy()
        lo, hi = int(steps.min()), int(steps.max())
        if lo != hi:
            raise WorkerFailure(
                f"workers restored different steps (from {lo} to {hi}; this one {step}): every "
                f"worker must read the chief's checkpoints in {self.chief_ckpt_dir} on a "
                "filesystem they share")

    # ------------------------------------------------------------------ input
    def _distributed_iterator(self, start_step: int):
        cfg = self.cfg

        def fn(ctx):
            if self.dataset_fn is not None:
                return self.dataset_fn(ctx, start_step)
            return data_lib.make_dataset(cfg.task, cfg.train.seed, cfg.train.batch_size,
                                         start_step=start_step, input_context=ctx)

        return iter(self.strategy.distribute_datasets_from_function(fn))

    # ------------------------------------------------------------ update step
    def build_train_call(self):
        """A tf.function `train_call(iterator, n_steps) -> mean loss` of n_steps steps.

        Each step computes the exact global-batch loss and gradient (the
        gradient is all-reduced once), clips it by its global norm and applies
        it, unless the loss or the gradient norm is not finite: then no update
        is made, `bad_step` records the step, and the remaining steps of the
        call are skipped.
        """
        cfg, model, opt, strategy = self.cfg, self.model, self.optimizer, self.strategy
        loss_name, clip = cfg.loss, cfg.train.clip_norm
        variables = model.trainable_variables
        single = strategy.num_replicas_in_sync == 1
        bars = bar_distribution(model)
        split = fits_outside_xla(model, cfg.train.jit_compile)
        trunk = model.trunk() if split else None

        def with_features(batch):
            feats, y_loc, y_scale = model.get_layer("standardize")(
                batch["x"], batch["y"], batch["is_query"])
            return {**batch, "features": feats, "y_loc": y_loc, "y_scale": y_scale}

        def loss_and_grads(batch, global_count):
            with tf.GradientTape() as tape:
                if split:
                    pred = trunk([batch["features"], batch["y_loc"], batch["y_scale"],
                                  batch["is_query"]], training=True)
                else:
                    pred = model(batch, training=True)
                loss = masked_query_loss(batch["y"], pred, batch["is_query"], loss_name,
                                         global_count, bars)
            return loss, tape.gradient(loss, variables)

        def finite_and_clipped(loss, grads):
            norm = tf.linalg.global_norm(grads)
            ok = tf.math.is_finite(loss) & tf.math.is_finite(norm)
            if clip:
                grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=norm)
            return ok, grads

        # One replica: loss, gradient and Adam in one (XLA) function.
        @tf.function(jit_compile=cfg.train.jit_compile)
        def single_step(batch):
            count = tf.maximum(tf.reduce_sum(tf.cast(batch["is_query"], tf.float32)), 1.0)
            loss, grads = loss_and_grads(batch, count)
            ok, grads = finite_and_clipped(loss, grads)

            def apply():
                opt.apply(grads, variables)
                return tf.constant(True)

            return loss, tf.cond(ok, apply, lambda: tf.constant(False))

        def step_fn(batch):
            return single_step(with_features(batch) if split else batch)

        if cfg.train.jit_compile and not single:
            loss_and_grads = tf.function(loss_and_grads, jit_compile=True)

        def replica_grads(batch):  # several replicas: the all-reduce stays outside XLA
            if split:
                batch = with_features(batch)
            ctx = tf.distribute.get_replica_context()
            count = tf.reduce_sum(tf.cast(batch["is_query"], tf.float32))
            global_count = tf.maximum(ctx.all_reduce(tf.distribute.ReduceOp.SUM, count), 1.0)
            loss, grads = loss_and_grads(batch, global_count)
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)  # the global gradient
            loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss)
            ok, grads = finite_and_clipped(loss, grads)
            return loss, ok, grads

        def mirrored_step(batch):
            loss, ok, grads = strategy.run(replica_grads, args=(batch,))
            # Every replica holds the same global loss, flag and gradient.
            loss = strategy.experimental_local_results(loss)[0]
            ok = strategy.experimental_local_results(ok)[0]

            def apply():
                # The optimiser's own apply() would all-reduce the gradient a second
                # time; update each replica's copy with its (already global) gradient.
                lr = opt.learning_rate
                for g, v in zip(grads, variables):
                    strategy.extended.update(
                        v.value, lambda var, grad: opt.update_step(grad, var, lr),
                        args=(g,), group=False)
                opt.iterations.assign_add(1)
                return tf.constant(True)

            return loss, tf.cond(ok, apply, lambda: tf.constant(False))

        @tf.function
        def train_call(iterator, n_steps):
            total, done = tf.constant(0.0), tf.constant(0.0)
            for _ in tf.range(n_steps):
                batch = next(iterator)
                if self.bad_step < 0:
                    if single:
                        loss, ok = strategy.run(step_fn, args=(batch,))
                    else:
                        loss, ok = mirrored_step(batch)
                    if ok:
                        self.step.assign_add(1)
                        total += loss
                        done += 1.0
                    else:
                        self.bad_step.assign(self.step + 1)
            return total / tf.maximum(done, 1.0)

        return train_call

    # ------------------------------------------------------------------- eval
    def eval_batch(self):
        """A fixed batch of unseen tasks (evaluation stream, fresh functions)."""
        return evaluation.unseen_batch(self.cfg, self.cfg.train.eval_tasks)

    def evaluate(self, batch) -> float:
        """Loss (the training loss) on a batch, outside the strategy."""
        return evaluation.batch_metrics(self.model, self.cfg, batch)["loss"]

    # ------------------------------------------------------------------- loop
    def train(self, verbose: bool = True) -> TrainResult:
        """Trains to cfg.train.steps, resuming from the latest checkpoint.

        A run that already reached cfg.train.steps is not trained again: its
        stored figures come back with `complete=True` and nothing is written.
        """
        t = self.cfg.train
        start = self._open_run()
        if start >= t.steps:
            return self._finished_result(start)
        if self._train_call is None:
            self._train_call = self.build_train_call()
        iterator = self._distributed_iterator(start)
        log = RunLog(self, start, verbose)
        step, loss, rate = start, float("nan"), 0.0
        while step < t.steps:
            n = self._steps_to_next_boundary(step)
            tic = time.perf_counter()
            loss = self._run_call(iterator, step, n)
            rate = n / max(time.perf_counter() - tic, 1e-9)
            step += n
            if step == t.steps and self.cfg.model.recalibrate:
                fit_recalibration(self.model, self.cfg)  # saved with the last checkpoint
            log.after_call(step, loss, rate)
            if step % t.checkpoint_every == 0 or step == t.steps:
                self.manager.save(checkpoint_number=step)
        return log.close(TrainResult(step, loss, log.eval_loss, rate, self.logdir, start))

    def _open_run(self) -> int:
        """Checks and restores the run folder, then (only then) writes config.json."""
        self._check_config()
        start = self.restore()
        self._agree_on_step(start)
        if start == 0 and self.cfg.train.init_from:  # a second phase: the first's weights
            self._initialise_from(self.cfg.train.init_from)
        elif start == 0:
            self._fresh_borders()
        if start < self.cfg.train.steps:
            os.makedirs(self.logdir, exist_ok=True)
            if self.chief:
                write_atomic(os.path.join(self.logdir, "config.json"), self.cfg.to_json())
        return start

    def _fresh_borders(self) -> None:
        """A fresh run's bar head starts from the training prior's borders (prior_borders)."""
        if self.cfg.model.head == "bar":
            self.model.get_layer("bar").borders.assign(prior_borders(self.cfg))

    def _base_run(self, preset: str) -> str:
        """The run folder of train.init_from's preset: beside this run's folder."""
        parent = os.path.dirname(os.path.abspath(self.run_dir))
        return os.path.join(parent, get_preset(preset).name)

    def _initialise_from(self, preset: str) -> None:
        """The model's weights (the bar head's borders among them) from the final checkpoint
        of preset's finished run; a ValueError naming train.init_from and the command that
        trains it if that run is missing or unfinished, or holds another model."""
        base, folder = get_preset(preset), self._base_run(preset)
        what = f"train.init_from={preset!r} wants the finished run of preset {preset!r} in " \
               f"{folder}"
        how = f"train it first: python train_keras.py --preset {preset} --logdir {folder}"
        latest = tf.train.latest_checkpoint(os.path.join(folder, "checkpoints"))
        if latest is None or not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"{what}, but there is no checkpoint there; {how}")
        diffs = config_differences(read_config(os.path.join(folder, "config.json")), base)
        if diffs:
            raise ValueError(f"{what}, but the run there is another experiment "
                             f"({'; '.join(diffs)}); {how} in a new folder")
        if base.model != self.cfg.model:
            raise ValueError(
                f"{what}, but its model is another: model {base.model} there, "
                f"{self.cfg.model} here; train.init_from needs the same model")
        done = tf.Variable(0, dtype=tf.int64, trainable=False)
        tf.train.Checkpoint(model=self.model, step=done).restore(latest) \
            .assert_existing_objects_matched().expect_partial()
        if int(done.numpy()) < base.train.steps:
            raise ValueError(f"{what}, but that run stopped at step {int(done.numpy())} of "
                             f"{base.train.steps}; {how} (it resumes)")

    def _steps_to_next_boundary(self, step: int) -> int:
        """Steps of the next call: up to steps_per_call, stopping at every interval."""
        t = self.cfg.train
        intervals = (t.log_every, t.eval_every, t.checkpoint_every, t.steps_per_call)
        return min(t.steps - step, *[b - step % b for b in intervals])

    def _run_call(self, iterator, step: int, n: int) -> float:
        """One train call of n steps; a dead peer or a non-finite step is a clear error."""
        try:
            loss = float(self._train_call(iterator, tf.constant(n)))
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError) as e:
            if self.strategy.num_replicas_in_sync == 1 and self.chief:
                raise
            raise self._worker_failure(e, step, n) from None
        bad = int(self.bad_step.numpy())
        if bad >= 0:
            raise TrainingDiverged(
                f"the loss or the gradient is not finite at step {bad}; training stopped "
                f"before applying it. The last checkpoint ({self.manager.latest_checkpoint}) "
                "holds finite weights; lower train.learning_rate or check the data.")
        return loss

    def _finished_result(self, step: int) -> TrainResult:
        path = os.path.join(self.logdir, FINAL)
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            stored = {k: stored[k] for k in ("final_loss", "eval_loss", "steps_per_sec")}
        else:  # finished before final.json existed: evaluate again, loss unknown
            stored = {"final_loss": float("nan"), "eval_loss": self.evaluate(self.eval_batch()),
                      "steps_per_sec": 0.0}
        return TrainResult(step=step, logdir=self.logdir, resumed_from=step, complete=True,
                           **stored)

    def _worker_failure(self, e, step: int, n: int) -> "WorkerFailure":
        lines = [ln.strip() for ln in (e.message or str(e)).splitlines() if ln.strip()]
        keys = ("unhealthy", "heartbeat", "timed out", "timeout", "Collective", "abort")
        first = next((ln for ln in lines if any(k in ln for k in keys)), lines[0])[:300]
        return WorkerFailure(
            f"a collective operation failed in steps {step + 1}..{step + n}: a peer worker "
            f"died or is unreachable (collective timeout {collective_timeout():g} s, set by "
            f"GPICL_COLLECTIVE_TIMEOUT). The last checkpoint is "
            f"{self.manager.latest_checkpoint}; restart every worker with the same command to "
            f"resume. TensorFlow said: {first}")


class RunLog:
    """What a run reports: TensorBoard scalars and pictures, the unseen-task loss,
    the progress bar, and the final figures (final.json) of a finished run."""

    def __init__(self, trainer: Trainer, start: int, verbose: bool):
        self.trainer, self.cfg = trainer, trainer.cfg
        self.writer = summaries.Writer(trainer.logdir if trainer.chief else None, trainer.cfg)
        if start == 0:
            self.writer.hparams()
        self.eval_batch = trainer.eval_batch()
        self.eval_loss = float("nan")
        self.bar = progress_bar(self.cfg.train.steps, verbose and trainer.chief,
                                stateful=("loss", "eval_loss", "steps/s"))

    def after_call(self, step: int, loss: float, rate: float) -> None:
        t, last = self.cfg.train, step == self.cfg.train.steps
        if step % t.log_every == 0 or last:
            lr = float(self.trainer.optimizer.learning_rate)
            self.writer.scalars(step, {"train/loss": loss, "train/learning_rate": lr,
                                       "train/steps_per_sec": rate})
        if step % t.eval_every == 0 or last:
            self.eval_loss = self.trainer.evaluate(self.eval_batch)
            self.writer.scalars(step, {"eval/loss_unseen_tasks": self.eval_loss})
            self.writer.predictions(step, self.trainer.model, self.cfg)
        if self.bar is not None:
            self.bar.update(step, [("loss", loss), ("eval_loss", self.eval_loss),
                                   ("steps/s", rate)])

    def close(self, result: TrainResult) -> TrainResult:
        self.writer.flush()
        if self.trainer.chief:
            write_atomic(os.path.join(self.trainer.logdir, FINAL),
                         json.dumps(dataclasses.asdict(result), indent=1))
        return result


def run_steps(trainer: Trainer, n_calls: int, steps_per_call: int = 1, iterator=None) -> list:
    """Runs n_calls train calls from the trainer's current step; returns their losses.

    No summaries, evaluation or checkpoints: for tests and benchmarks. `iterator`: one
    from `stream_iterator(trainer)` to go on drawing from, as training does (one
    iterator per run); by default a new one starts at the trainer's step. A trainer at
    step 0 that has not run yet starts as `train()` starts a fresh run: a bar head from
    the prior's borders (without them the benchmarks' losses read 9-800 nats).
    """
    if trainer._train_call is None:
        if int(trainer.step.numpy()) == 0 and not trainer.cfg.train.init_from:
            trainer._fresh_borders()
        trainer._train_call = trainer.build_train_call()
    it = stream_iterator(trainer) if iterator is None else iterator
    n = tf.constant(steps_per_call)
    return [float(trainer._train_call(it, n)) for _ in range(n_calls)]


def stream_iterator(trainer: Trainer):
    """The trainer's distributed task stream from its current step (for run_steps)."""
    return trainer._distributed_iterator(int(trainer.step.numpy()))


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "WorkerFailure", "select_strategy",
           "run_steps", "stream_iterator"]
