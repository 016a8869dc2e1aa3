"""Does a calibrated predictive cover what it claims on each sub-family of its prior? Issue
5/7's coverage target asks so of the `random_mlp` suite, a noise-free part of `default`'s
training prior, where the model's 90% intervals cover 0.92-0.93.

It need not. A predictive calibrated on a prior covers what it claims on the prior as a
whole; on a part of it that the context cannot tell apart from the rest, even the exact
posterior covers more or less. `default`'s prior mixes noise-free tasks (the random-MLP
component, and 30% of the `prior` component) with tasks whose noise std is log-uniform in
[0.01, 0.3], and a few context points of a smooth function cannot tell noise 0 from noise
0.01-0.05: the exact posterior keeps some belief in noise there, and its intervals are
too wide for the tasks that have none.

This script measures that with the exact Bayes predictive of a model problem it can compute:
1-D GP functions (RBF kernel of a known length scale, x uniform in [-1, 1]) whose noise std
is 0 with probability --noise-free and log-uniform in --noise otherwise, as in `default`'s
prior. The predictive integrates the unknown noise (a quadrature of --grid levels), and
its central intervals' coverage is printed on all tasks (which it must meet, a check of the
computation), on the noise-free tasks and on the noisy ones.

    python benchmarks/coverage_floor.py [--length-scale 0.5] [--ks 1,2,4,8,16,32]
        [--tasks 2048] [--noise-free 0.475] [--noise 0.01,0.3]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import special  # noqa: E402

from gpicl_tf.config import get_preset  # noqa: E402
from gpicl_tf.evaluate import mean_ci95  # noqa: E402
from gpicl_tf.tasks import GPRBF, rbf_kernel  # noqa: E402

QUERIES, SEED = 16, 20221208


def default_noise_free() -> float:
    """The share of noise-free tasks in `default`'s training stream: its mix's components
    that add no noise (random_mlp with noise_std 0) plus the `prior` component's
    prior_noise_free share."""
    t = get_preset("default").task
    share = {"prior": t.prior_noise_free, "random_mlp": float(t.noise_std == 0)}
    return float(sum(w * share.get(name, 0.0) for name, w in t.mix))


def noise_levels(noise_free: float, noise_range, grid: int):
    """A noise std that is 0 with probability noise_free, else log-uniform in noise_range,
    as quadrature levels: (noise variances [grid + 1], the first 0; log prior weights),
    the log-uniform part by the midpoint rule on `grid` levels."""
    edges = np.linspace(np.log(noise_range[0]), np.log(noise_range[1]), grid + 1)
    var = np.concatenate([[0.0], np.exp(edges[:-1] + edges[1:])])
    return var, np.log(np.concatenate([[noise_free], np.full(grid, (1 - noise_free) / grid)])
                       + 1e-300)


def sample_tasks(rng, n_tasks: int, n_points: int, length_scale: float, noise_free: float,
                 noise_range):
    """x [T, n], y [T, n] (GP draws plus noise), sigma [T] (0 for a noise-free task)."""
    x = rng.uniform(-1.0, 1.0, (n_tasks, n_points))
    k = rbf_kernel(x[..., None], x[..., None], length_scale).numpy()
    chol = np.linalg.cholesky(k + GPRBF.jitter * np.eye(n_points))
    f = np.einsum("tij,tj->ti", chol, rng.normal(size=(n_tasks, n_points)))
    lo, hi = np.log(noise_range[0]), np.log(noise_range[1])
    sigma = np.where(rng.uniform(size=n_tasks) < noise_free, 0.0,
                     np.exp(rng.uniform(lo, hi, n_tasks)))
    return x, f + sigma[:, None] * rng.normal(size=f.shape), sigma


def bayes_pits(x, y, k: int, length_scale: float, noise_free: float, noise_range,
               grid: int = 48, chunk: int = 128):
    """The probability integral transforms [T, n - k] of the query points (the points from
    k on) under the exact Bayes predictive of the model problem: a mixture over the noise
    std (0 with probability noise_free, else log-uniform in noise_range by the midpoint
    rule on `grid` levels) of GP posteriors, each weighted by its marginal likelihood."""
    s2, log_prior = noise_levels(noise_free, noise_range, grid)
    out = []
    for i in range(0, len(x), chunk):
        xs, ys = x[i:i + chunk], y[i:i + chunk]
        kern = rbf_kernel(xs[..., None], xs[..., None], length_scale).numpy()  # [t, n, n]
        a = (kern[:, None, :k, :k]
             + (s2 + GPRBF.jitter)[None, :, None, None] * np.eye(k))  # [t, S, k, k]
        chol = np.linalg.cholesky(a)
        yc = np.broadcast_to(ys[:, None, :k, None], a.shape[:-1] + (1,))
        white = np.linalg.solve(chol, yc)[..., 0]  # L^-1 y: [t, S, k]
        log_ml = (-0.5 * np.sum(white ** 2, -1)
                  - np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1)), -1))
        w = np.exp(log_ml + log_prior - np.max(log_ml + log_prior, axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)  # [t, S]
        kqc = np.broadcast_to(kern[:, None, k:, :k], a.shape[:2] + (x.shape[1] - k, k))
        v = np.linalg.solve(chol, np.swapaxes(kqc, -1, -2))  # L^-1 k_cq: [t, S, k, q]
        mean = np.einsum("tskq,tsk->tsq", v, white)
        var = 1.0 + GPRBF.jitter + s2[None, :, None] - np.sum(v * v, axis=2)
        z = (ys[:, None, k:] - mean) / np.sqrt(np.maximum(var, 1e-300))
        out.append(np.sum(w[:, :, None] * special.ndtr(z), axis=1))
    return np.concatenate(out)


def coverage(pits, level: float):
    """Per-task share [T] of queries inside the central `level` interval."""
    half = (1.0 - level) / 2.0
    return np.mean((pits > half) & (pits < 1.0 - half), axis=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length-scale", type=float, default=0.5)
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--tasks", type=int, default=2048)
    p.add_argument("--noise-free", type=float, default=None,
                   help="share of noise-free tasks (default: default's training stream's, "
                        f"{default_noise_free():.3f})")
    p.add_argument("--noise", default="0.01,0.3", help="low,high of the log-uniform noise std")
    p.add_argument("--grid", type=int, default=48)
    a = p.parse_args(argv)
    try:
        ks = [int(v) for v in a.ks.split(",")]
    except ValueError:
        p.error(f"--ks {a.ks!r}: expected comma-separated integers")
    try:
        noise = tuple(float(v) for v in a.noise.split(","))
    except ValueError:
        p.error(f"--noise {a.noise!r}: expected two comma-separated numbers low,high")
    free = default_noise_free() if a.noise_free is None else a.noise_free
    if (any(k < 1 for k in ks) or a.tasks < 2 or not 0 <= free <= 1 or len(noise) != 2
            or not 0 < noise[0] <= noise[1] or a.length_scale <= 0 or a.grid < 1):
        p.error("expected --ks >= 1, --tasks >= 2, --noise-free in [0, 1], --noise "
                "0 < low <= high, --length-scale > 0, --grid >= 1")
    print(f"Exact Bayes predictive of 1-D GP draws (RBF, length scale {a.length_scale}), noise "
          f"std 0 with probability {free:.3f} else log-uniform in [{noise[0]}, {noise[1]}]; "
          f"{a.tasks} tasks of {QUERIES} queries per k (seed {SEED}); coverage of the central "
          "90% / 50% intervals, in brackets the 95% interval over tasks")
    print("| k | all 90% | all 50% | noise-free 90% | noise-free 50% | noisy 90% | noisy 50% |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        rng = np.random.default_rng([SEED, k])
        x, y, sigma = sample_tasks(rng, a.tasks, k + QUERIES, a.length_scale, free, noise)
        pits = bayes_pits(x, y, k, a.length_scale, free, noise, a.grid)
        cells = []
        for part in (np.ones(len(x), bool), sigma == 0, sigma > 0):
            for level in (0.9, 0.5):
                if part.sum() < 2:
                    cells.append("-")
                    continue
                m, (lo, hi) = mean_ci95(coverage(pits[part], level))
                cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
