"""In-process SavedModel latency and throughput beside scikit-learn GP regression.

    python benchmarks/serving_latency.py [--logdir runs/gpicl-regressor] [--requests 200]

The run's latest checkpoint is exported three times into a temporary folder: the
plain export (what `docker run tensorflow/serving` serves as is), the XLA export
(`gpicl-export --xla`) and, for reference, the plain export built from the Keras
layers' graph (before gpicl_tf.lean). One request = 64 context points and 16
queries (1-D). Prints p50/p99 latency of the export's serving_default for one
request and throughput for batches of 64 requests (medians of --rounds interleaved
rounds), each with TensorFlow's default
thread pools and with one intra-op thread (TF Serving's
--tensorflow_intra_op_parallelism=1), each setting in its own process; the fp32
matmul peak and the time GaussianProcessRegressor (RBF + noise kernel, maximum
likelihood hyperparameters) takes to fit and predict the same request, in the same run.
Target (issue 7/7): the plain export's p50 <= 2 ms on 2 CPU cores.
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
from benchmarks.common import matmul_peak_gflops  # noqa: E402
from gpicl_tf.export import export_checkpoint  # noqa: E402


def requests(n, b=1, nc=64, nq=16, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        cx = rng.uniform(-1, 1, (b, nc, 1)).astype(np.float32)
        yield cx, np.sin(4 * cx).astype(np.float32), rng.uniform(-1, 1, (b, nq, 1)).astype(
            np.float32)


def latency(sig, n_requests, seed=1):
    """p50, p99 (ms) of one request and requests/s in batches of 64, of a loaded signature."""
    def call(cx, cy, qx):
        return sig(context_x=tf.constant(cx), context_y=tf.constant(cy),
                   query_x=tf.constant(qx))["mean"].numpy()

    for r in requests(10):
        call(*r)  # warm up (tracing, thread pools, XLA compilation)
    lat = []
    for r in requests(n_requests, seed=seed):
        tic = time.perf_counter()
        call(*r)
        lat.append(time.perf_counter() - tic)
    for r in requests(3, b=64):
        call(*r)
    nb = max(n_requests // 20, 5)
    tic = time.perf_counter()
    for r in requests(nb, b=64, seed=seed + 1):
        call(*r)
    thr = nb * 64 / (time.perf_counter() - tic)
    lat = np.array(lat) * 1e3
    return np.percentile(lat, 50), np.percentile(lat, 99), thr


def measure(a) -> None:
    """One process: export the run three ways, time each; JSON lines on stdout."""
    import json
    import tempfile

    from gpicl_tf import lean

    if a.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(a.intra_op)
    tmp = tempfile.mkdtemp()
    plain = export_checkpoint(a.logdir, tmp, "plain")
    xla = export_checkpoint(a.logdir, tmp, "xla", jit_compile=True)
    supported = lean.supported
    lean.supported = lambda model: False  # the Keras layers' graph, as before gpicl_tf.lean
    try:
        keras_graph = export_checkpoint(a.logdir, tmp, "keras")
    finally:
        lean.supported = supported
    exports = {name: tf.saved_model.load(vdir).signatures["serving_default"]
               for name, vdir in (("plain export", plain), ("XLA export", xla),
                                  ("plain, Keras graph", keras_graph))}
    rounds = {name: [] for name in exports}
    for r in range(a.rounds):  # interleaved, so a slow spell of the machine hits all alike
        for name, sig in exports.items():
            rounds[name].append(latency(sig, a.requests, seed=1 + 2 * r))
    for name, rs in rounds.items():
        p50, p99, thr = np.median(np.asarray(rs), axis=0)
        print(json.dumps({"export": name, "p50": p50, "p99": p99, "throughput": thr,
                          "p50_rounds": [round(x[0], 3) for x in rs]}), flush=True)


def main():
    import json
    import subprocess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/gpicl", help="run directory with checkpoints")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--gp-requests", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    p.add_argument("--intra-op", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.intra_op is not None:
        return measure(a)
    peak = matmul_peak_gflops()
    gp = []
    for cx, cy, qx in requests(a.gp_requests, seed=3):
        tic = time.perf_counter()
        gp_regression(cx[0].astype(np.float64), cy[0].astype(np.float64), qx[0])
        gp.append(time.perf_counter() - tic)
    gp_ms = float(np.median(gp)) * 1e3
    print(f"run: {a.logdir}; one request = 64 context points, 16 queries, 1-D; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"GP regression (RBF+noise, ML hyperparameters) fit+predict: median {gp_ms:.2f} ms")
    # Each thread setting in its own process (TensorFlow fixes its pools at start-up):
    # the default (one intra-op thread per core) and one intra-op thread, TF Serving's
    # --tensorflow_intra_op_parallelism=1.
    rows = {}
    for intra in (0, 1):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--logdir", a.logdir,
                              "--requests", str(a.requests), "--rounds", str(a.rounds),
                              "--intra-op", str(intra)],
                             capture_output=True, text=True, check=True)
        label = "intra-op threads: default" if intra == 0 else "intra-op threads: 1"
        print(f"\n{label}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[(intra, r["export"])] = r
                print(f"  {r['export']:19s}: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms "
                      f"(target p50 <= 2 ms); {r['throughput']:.0f} requests/s in batches of "
                      f"64; vs GP {gp_ms / r['p50']:.0f}x per request; p50 of each round "
                      f"{r['p50_rounds']}")
    for intra in (0, 1):
        plain, xla = rows[(intra, "plain export")], rows[(intra, "XLA export")]
        ref = rows[(intra, "plain, Keras graph")]
        print(f"ratios, intra-op {'default' if intra == 0 else 1}: plain / XLA p50 "
              f"{plain['p50'] / xla['p50']:.2f}x; plain / Keras-graph plain "
              f"{plain['p50'] / ref['p50']:.2f}x")


if __name__ == "__main__":
    main()
