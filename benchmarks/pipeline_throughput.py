"""Task-stream throughput against what training consumes.

    python benchmarks/pipeline_throughput.py [--preset default] [--batches 200]

Prints tasks/s of the tf.data stream alone, tasks/s a train step of the
preset's model consumes (fed one fixed batch, so input costs nothing), and
their ratio. Target: the stream at least 10x faster than training consumes it.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from gpicl_tf import data as data_lib  # noqa: E402
from gpicl_tf.config import apply_overrides, get_preset  # noqa: E402
from gpicl_tf.train import Trainer, run_steps  # noqa: E402


def stream_tasks_per_sec(cfg, n_batches: int):
    """(tasks/s of the stream alone, CPU core-milliseconds it spends per batch).

    The second figure is what a live stream takes from the train step when both
    share the machine's cores (the main job), whatever the stream's parallelism.
    """
    it = iter(data_lib.make_dataset(cfg.task, 0, cfg.train.batch_size))
    for _ in range(10):
        next(it)
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        b = next(it)
    b["y"].numpy()
    wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
    return n_batches * cfg.train.batch_size / wall, 1e3 * cpu / n_batches


def train_tasks_per_sec(cfg, n_calls: int = 10) -> float:
    import tempfile

    batch = data_lib.make_dataset(cfg.task, 0, cfg.train.batch_size)
    fixed = next(iter(batch))
    trainer = Trainer(cfg, tempfile.mkdtemp(), strategy=tf.distribute.get_strategy(),
                      dataset_fn=lambda ctx, start: tf.data.Dataset.from_tensors(fixed).repeat())
    k = cfg.train.steps_per_call
    run_steps(trainer, 1, k)  # compile and warm up
    tic = time.perf_counter()
    run_steps(trainer, n_calls, k)
    steps = n_calls * k
    return steps * cfg.train.batch_size / (time.perf_counter() - tic)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    cfg = apply_overrides(get_preset(a.preset), a.set)
    stream, core_ms = stream_tasks_per_sec(cfg, a.batches)
    train = train_tasks_per_sec(cfg)
    print(f"preset={a.preset} batch={cfg.train.batch_size} n_points={cfg.task.n_points} "
          f"block_size={cfg.task.block_size}")
    print(f"stream alone:      {stream:10.0f} tasks/s, {core_ms:.1f} CPU core-ms per batch")
    print(f"training consumes: {train:10.0f} tasks/s")
    print(f"ratio stream/train: {stream / train:.1f}x  (target >= 10x)")
    from gpicl_tf import tasks

    if all(tasks.get_family(f).supports_pool for f in cfg.task.families):
        pool = apply_overrides(cfg, ["task.n_tasks=1024"])
        print(f"stream with n_tasks=1024 pool: {stream_tasks_per_sec(pool, a.batches // 2)[0]:.0f} "
              "tasks/s")


if __name__ == "__main__":
    main()
