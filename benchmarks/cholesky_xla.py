"""The kernel fits' solves with and without XLA on this CPU: why the train step keeps the
standardisation out of the XLA cluster when model.kernel_length_scales is set.

    python benchmarks/cholesky_xla.py [--batch 192] [--n 16,32,64]

Times a Cholesky factorisation and solve of `batch` symmetric positive definite n x n
matrices (the default's 64 tasks x 3 length scales of 64 points), compiled by XLA and
run by TensorFlow's own kernels, and prints their ratio.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def timed_ms(fn, args, reps: int = 20) -> float:
    fn(*args)  # compile / warm up
    tic = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    out.numpy()
    return (time.perf_counter() - tic) / reps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=192)
    p.add_argument("--n", default="16,32,64")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    for n in (int(v) for v in a.n.split(",")):
        m = rng.normal(size=(a.batch, n, n)).astype(np.float32)
        spd = tf.constant(m @ m.transpose(0, 2, 1) / n + np.eye(n, dtype=np.float32))
        rhs = tf.constant(rng.normal(size=(a.batch, n, 1)).astype(np.float32))
        ms = {}
        for jit in (True, False):
            fn = tf.function(lambda s, r: tf.linalg.cholesky_solve(tf.linalg.cholesky(s), r),
                             jit_compile=jit)
            ms[jit] = timed_ms(fn, (spd, rhs))
        print(f"n={n:3d} batch={a.batch}: XLA {ms[True]:8.2f} ms, TensorFlow {ms[False]:6.2f} ms; "
              f"XLA / TensorFlow = {ms[True] / ms[False]:.1f}x")


if __name__ == "__main__":
    main()
