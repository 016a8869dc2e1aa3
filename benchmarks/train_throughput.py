"""Training throughput: steps/s, tasks/s, tokens/s and model FLOP utilisation.

    python benchmarks/train_throughput.py [--preset default] [--calls 10] [--set K=V ...]

Trains from the real task stream and reports achieved model GFLOP/s (matmul
FLOPs of forward + backward) as a fraction of an fp32 (or bf16 with
train.precision=mixed_bfloat16) 2048x2048 matmul peak measured in the same run.
Issue target for the `default` preset (4 layers, d=64, 4 heads, 64 tasks x 64
points) on 2 CPU cores: 18 steps/s.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from benchmarks.common import matmul_peak_gflops, train_flops_per_step  # noqa: E402
from gpicl_tf.config import apply_overrides, get_preset  # noqa: E402
from gpicl_tf.train import Trainer, run_steps  # noqa: E402


def measure(cfg, calls: int):
    trainer = Trainer(cfg, tempfile.mkdtemp())
    k = cfg.train.steps_per_call
    run_steps(trainer, 2, k)  # compile and warm up
    tic = time.perf_counter()
    run_steps(trainer, calls, k)
    secs = time.perf_counter() - tic
    steps = calls * k
    return steps / secs, trainer.strategy.num_replicas_in_sync


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    cfg = apply_overrides(get_preset(a.preset), a.set)
    bf16 = cfg.train.precision == "mixed_bfloat16"
    peak = matmul_peak_gflops(dtype=tf.bfloat16 if bf16 else tf.float32)
    rate, replicas = measure(cfg, a.calls)
    flops = train_flops_per_step(cfg)
    achieved = rate * flops / 1e9
    b, n = cfg.train.batch_size, cfg.task.n_points
    device = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    print(f"preset={a.preset} device={device} replicas={replicas} precision={cfg.train.precision}"
          f" jit={cfg.train.jit_compile} batch={b} points={n} d_model={cfg.model.d_model} "
          f"layers={cfg.model.n_layers} heads={cfg.model.n_heads}")
    print(f"steps/s:  {rate:10.2f}")
    print(f"tasks/s:  {rate * b:10.0f}")
    print(f"tokens/s: {rate * b * n:10.0f}")
    print(f"model GFLOP/step: {flops / 1e9:.3f}; achieved {achieved:.1f} GFLOP/s")
    print(f"matmul peak ({'bf16' if bf16 else 'fp32'} 2048^3): {peak:.1f} GFLOP/s; "
          f"model FLOP utilisation {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
