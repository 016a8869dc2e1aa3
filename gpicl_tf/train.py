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
import math
import os
import time
from typing import Callable, Optional

import keras
import tensorflow as tf

from gpicl_tf import data as data_lib
from gpicl_tf import summaries
from gpicl_tf.config import ExperimentConfig
from gpicl_tf.files import write_atomic
from gpicl_tf.losses import masked_query_loss
from gpicl_tf.model import build_model, model_inputs


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


# ---------------------------------------------------------------- strategy
def select_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored with a multi-worker TF_CONFIG, Mirrored over GPUs, else default."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
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


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0)


def learning_rate_schedule(cfg: ExperimentConfig):
    """Linear warmup to the peak rate, then cosine decay to end_lr_fraction of it."""
    t = cfg.train
    warmup = min(t.warmup_steps, t.steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else t.learning_rate,
        decay_steps=max(t.steps - warmup, 1), alpha=t.end_lr_fraction,
        warmup_target=t.learning_rate if warmup else None, warmup_steps=warmup)


class Trainer:
    """Builds everything under the strategy's scope and runs the training loop.

    Args:
      cfg: the experiment configuration.
      logdir: run directory: TensorBoard events, `checkpoints/`, `config.json`.
      strategy: a tf.distribute strategy; None selects one (`select_strategy`).
      dataset_fn: optional replacement for the task stream, called as
        `dataset_fn(input_context, start_step)` and returning per-replica
        batches of {"x", "y", "is_query"} (custom data, fault injection).
    """

    def __init__(self, cfg: ExperimentConfig, logdir: str, strategy=None,
                 dataset_fn: Optional[Callable] = None):
        self.cfg = cfg
        self.strategy = strategy or select_strategy()
        self.chief = is_chief(self.strategy)
        # Non-chief workers take part in saving (it is collective) but write to a
        # scratch folder of their own; they resume from the chief's checkpoints.
        self.chief_ckpt_dir = os.path.join(logdir, "checkpoints")
        self.logdir = logdir if self.chief else os.path.join(
            logdir, "workers", f"worker_{self.strategy.cluster_resolver.task_id}")
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
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir,
                                                  max_to_keep=cfg.train.keep_checkpoints)
        self._train_call = None

    # ------------------------------------------------------------ checkpoints
    def _check_config(self):
        if not self.chief:
            os.makedirs(self.logdir, exist_ok=True)
            return
        path = os.path.join(self.logdir, "config.json")
        if os.path.exists(path):
            with open(path) as f:
                old = ExperimentConfig.from_json(f.read())
            for part in ("task", "model"):
                if getattr(old, part) != getattr(self.cfg, part):
                    raise ValueError(
                        f"{path} holds a run with a different {part} config; resuming would "
                        f"mix two experiments. Expected {getattr(old, part)}, got "
                        f"{getattr(self.cfg, part)}. Use another --logdir.")
        os.makedirs(self.logdir, exist_ok=True)
        write_atomic(path, self.cfg.to_json())

    def restore(self) -> int:
        """Restores the latest checkpoint if any; returns the step it resumes from."""
        latest = tf.train.latest_checkpoint(self.chief_ckpt_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return int(self.step.numpy())

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
    def _build_train_call(self):
        cfg, model, opt, strategy = self.cfg, self.model, self.optimizer, self.strategy
        loss_name = cfg.loss
        clip = cfg.train.clip_norm

        single = strategy.num_replicas_in_sync == 1
        # On one replica the whole step (loss, gradients, Adam) is one XLA
        # cluster; with several, the all-reduces stay outside the compiled part.
        jit_grads = cfg.train.jit_compile and not single

        def loss_and_grads(batch, global_count):
            with tf.GradientTape() as tape:
                pred = model(batch, training=True)
                loss = masked_query_loss(batch["y"], pred, batch["is_query"], loss_name,
                                         global_count)
            return loss, tape.gradient(loss, model.trainable_variables)

        if jit_grads:
            loss_and_grads = tf.function(loss_and_grads, jit_compile=True)

        def update(grads, n_replicas):
            if clip:
                grads, _ = tf.clip_by_global_norm(grads, clip)
            # The Keras optimiser sums gradients over replicas again; hand it
            # 1/R of the global gradient from each so the sum is exact.
            opt.apply([g * (1.0 / n_replicas) for g in grads], model.trainable_variables)

        @tf.function(jit_compile=True)
        def fused_step(batch):  # one replica: everything in one XLA cluster
            count = tf.reduce_sum(tf.cast(batch["is_query"], tf.float32))
            loss, grads = loss_and_grads(batch, tf.maximum(count, 1.0))
            update(grads, 1)
            return loss

        def replica_step(batch):
            if single and cfg.train.jit_compile:
                return fused_step(batch)
            ctx = tf.distribute.get_replica_context()
            count = tf.reduce_sum(tf.cast(batch["is_query"], tf.float32))
            global_count = tf.maximum(ctx.all_reduce(tf.distribute.ReduceOp.SUM, count), 1.0)
            loss, grads = loss_and_grads(batch, global_count)
            # The exact global gradient on every replica, clipped by its global norm.
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            update(grads, ctx.num_replicas_in_sync)
            return loss

        @tf.function
        def train_call(iterator, n_steps):
            total = tf.constant(0.0)
            for _ in tf.range(n_steps):
                per_replica = strategy.run(replica_step, args=(next(iterator),))
                total += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            self.step.assign_add(tf.cast(n_steps, tf.int64))
            return total / tf.cast(n_steps, tf.float32)

        return train_call

    # ------------------------------------------------------------------- eval
    def eval_batch(self):
        """A fixed batch of unseen tasks (evaluation stream, fresh functions)."""
        task = dataclasses.replace(self.cfg.task, n_tasks=None)
        return data_lib.sample_batch(task, self.cfg.train.seed, self.cfg.train.eval_tasks,
                                     stream=data_lib.EVAL_STREAM)

    def evaluate(self, batch) -> float:
        """Loss (the training loss) on a batch, outside the strategy."""
        pred = self.model(model_inputs(batch), training=False)
        return float(masked_query_loss(batch["y"], pred, batch["is_query"], self.cfg.loss))

    # ------------------------------------------------------------------- loop
    def train(self, verbose: bool = True) -> TrainResult:
        """Trains to cfg.train.steps, resuming from the latest checkpoint."""
        cfg, t = self.cfg, self.cfg.train
        self._check_config()
        start = self.restore()
        if self._train_call is None:
            self._train_call = self._build_train_call()
        eval_b = self.eval_batch()
        writer = summaries.Writer(self.logdir if self.chief else None, cfg)
        if start == 0:
            writer.hparams()
        iterator = self._distributed_iterator(start)
        bar = keras.utils.Progbar(t.steps, stateful_metrics=["loss", "eval_loss", "steps/s"],
                                  verbose=1 if verbose and self.chief else 0)
        step, loss, eval_loss, rate = start, float("nan"), float("nan"), 0.0
        bar.update(step)
        boundaries = sorted({t.log_every, t.eval_every, t.checkpoint_every, t.steps_per_call})
        while step < t.steps:
            n = min(t.steps_per_call, t.steps - step,
                    *[b - step % b for b in boundaries])
            tic = time.perf_counter()
            try:
                loss = float(self._train_call(iterator, tf.constant(n)))
            except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                    tf.errors.AbortedError) as e:
                if self.strategy.num_replicas_in_sync == 1 and self.chief:
                    raise
                lines = [ln.strip() for ln in (e.message or str(e)).splitlines() if ln.strip()]
                keys = ("unhealthy", "heartbeat", "timed out", "timeout", "Collective", "abort")
                first = next((ln for ln in lines if any(k in ln for k in keys)), lines[0])[:300]
                raise WorkerFailure(
                    f"a collective operation failed in steps {step + 1}..{step + n}: a peer "
                    f"worker died or is unreachable (collective timeout "
                    f"{collective_timeout():g} s, set by GPICL_COLLECTIVE_TIMEOUT). The last "
                    f"checkpoint is {self.manager.latest_checkpoint}; restart every worker "
                    f"with the same command to resume. TensorFlow said: {first}") from None
            rate = n / max(time.perf_counter() - tic, 1e-9)
            step += n
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at step {step} (steps {step - n + 1}..{step}); training "
                    f"stopped. The last good checkpoint ({self.manager.latest_checkpoint}) "
                    "is kept; lower train.learning_rate or check the data.")
            if step % t.log_every == 0 or step == t.steps:
                lr = float(self.optimizer.learning_rate)
                writer.scalars(step, {"train/loss": loss, "train/learning_rate": lr,
                                      "train/steps_per_sec": rate})
            if step % t.eval_every == 0 or step == t.steps:
                eval_loss = self.evaluate(eval_b)
                writer.scalars(step, {"eval/loss_unseen_tasks": eval_loss})
                writer.predictions(step, self.model, self.cfg)
            if step % t.checkpoint_every == 0 or step == t.steps:
                self.manager.save(checkpoint_number=step)
            bar.update(step, [("loss", loss), ("eval_loss", eval_loss), ("steps/s", rate)])
        writer.flush()
        return TrainResult(step, loss, eval_loss, rate, self.logdir, start)


def run_steps(trainer: Trainer, n_calls: int, steps_per_call: int = 1) -> list:
    """Runs n_calls train calls from the trainer's current step; returns their losses.

    No summaries, evaluation or checkpoints: for tests and benchmarks.
    """
    if trainer._train_call is None:
        trainer._train_call = trainer._build_train_call()
    it = trainer._distributed_iterator(int(trainer.step.numpy()))
    n = tf.constant(steps_per_call)
    return [float(trainer._train_call(it, n)) for _ in range(n_calls)]


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "select_strategy"]
