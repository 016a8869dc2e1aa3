"""In-process SavedModel latency and throughput beside scikit-learn GP regression.

    python benchmarks/serving_latency.py [--logdir runs/gpicl] [--requests 200]

The run's latest checkpoint is exported twice into a temporary folder: the
plain export (what `docker run tensorflow/serving` serves as is) and the XLA
export (`gpicl-export --xla`). One request = 64 context points and 16 queries (1-D). Prints p50/p99 latency of
the export's serving_default for one request, throughput for batches of 64
requests, and the time GaussianProcessRegressor (RBF + noise kernel, maximum
likelihood hyperparameters) takes to fit and predict the same request.
Targets (issue 4/6): p50 <= 2 ms on 2 CPU cores; >= 100x faster than GP.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gpicl_tf.baselines import gp_regression  # noqa: E402
from gpicl_tf.export import export_checkpoint  # noqa: E402


def requests(n, b=1, nc=64, nq=16, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        cx = rng.uniform(-1, 1, (b, nc, 1)).astype(np.float32)
        yield cx, np.sin(4 * cx).astype(np.float32), rng.uniform(-1, 1, (b, nq, 1)).astype(
            np.float32)


def latency(vdir, n_requests):
    sig = tf.saved_model.load(vdir).signatures["serving_default"]

    def call(cx, cy, qx):
        return sig(context_x=tf.constant(cx), context_y=tf.constant(cy),
                   query_x=tf.constant(qx))["mean"].numpy()

    for r in requests(10):
        call(*r)  # warm up (tracing, thread pools, XLA compilation)
    lat = []
    for r in requests(n_requests, seed=1):
        tic = time.perf_counter()
        call(*r)
        lat.append(time.perf_counter() - tic)
    for r in requests(3, b=64):
        call(*r)
    nb = max(n_requests // 20, 5)
    tic = time.perf_counter()
    for r in requests(nb, b=64, seed=2):
        call(*r)
    thr = nb * 64 / (time.perf_counter() - tic)
    lat = np.array(lat) * 1e3
    return np.percentile(lat, 50), np.percentile(lat, 99), thr


def main():
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/gpicl", help="run directory with checkpoints")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--gp-requests", type=int, default=20)
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    plain = export_checkpoint(a.logdir, tmp, "plain")
    xla = export_checkpoint(a.logdir, tmp, "xla", jit_compile=True)
    gp = []
    for cx, cy, qx in requests(a.gp_requests, seed=3):
        tic = time.perf_counter()
        gp_regression(cx[0].astype(np.float64), cy[0].astype(np.float64), qx[0])
        gp.append(time.perf_counter() - tic)
    gp_ms = float(np.median(gp)) * 1e3
    print(f"run: {a.logdir}; one request = 64 context points, 16 queries, 1-D")
    print(f"GP regression (RBF+noise, ML hyperparameters) fit+predict: median {gp_ms:.2f} ms")
    for name, vdir in (("plain export", plain), ("XLA export", xla)):
        p50, p99, thr = latency(vdir, a.requests)
        print(f"{name:12s}: p50 {p50:.2f} ms, p99 {p99:.2f} ms (target p50 <= 2 ms); "
              f"{thr:.0f} requests/s in batches of 64; vs GP {gp_ms / p50:.0f}x per request "
              f"(target >= 100x), {gp_ms / 1e3 * thr:.0f}x batched")


if __name__ == "__main__":
    main()
