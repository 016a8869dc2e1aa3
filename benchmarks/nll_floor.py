"""How close to the exact GP posterior can an affine-equivariant learner get? The NLL floor
of issue 5/7's gp_rbf target.

gpicl_tf's models are equivariant to y -> c y + d (c > 0): the context is standardised, so a
model cannot know that a gp_rbf task's mean is 0 and its amplitude 1, which the exact
posterior with the true kernel (`bayes_optimal` in gpicl-eval) does know. Among predictive
distributions equivariant to that group, the one with the least expected log loss at every
(mean, amplitude) is the Bayes predictive under the group's right Haar prior, p(m, s) ~ 1/s
(Liang & Barron 2004): with the true kernel K, a Student-t with n - 1 degrees of freedom
around the kriging mean with the mean estimated by generalised least squares,
m = 1'K^-1 y / 1'K^-1 1, and squared scale s2 (k** - k'K^-1 k + (1 - k'K^-1 1)^2 / 1'K^-1 1),
s2 = (y - m)'K^-1 (y - m) / (n - 1).

This script prints, on gpicl-eval's gp_rbf tasks (seed 20221208, 128 tasks per cell, 16
queries), that floor beside the exact posterior and, with --results, a model's NLL: the gap
that no model of this design can close, and what is left to learn. Our models standardise
x as well (they do not know the kernel's length scale in raw units either), so their true
floor is higher still.

    python benchmarks/nll_floor.py [--results docs/results/default_recal_1d_eval.json ...]
        [--ks 8,16,32] [--tasks 128]
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import special, stats  # noqa: E402

from benchmarks.coverage_floor import default_noise_free, noise_levels  # noqa: E402
from gpicl_tf.config import get_preset  # noqa: E402
from gpicl_tf.evaluate import (bayes_optimal, context_batch, default_suites,  # noqa: E402
                               gp_suite_task)
from gpicl_tf.tasks import GPRBF, rbf_kernel  # noqa: E402

SEED, QUERIES = 20221208, 16  # gpicl-eval's


def _gls_fit(xc, yc, length_scale, noise_var):
    """The context's GLS fit under K = RBF(length_scale) + noise_var I (xc [n, dx], yc [n]):
    (Cholesky factor of K, K^-1 1, the GLS mean m = 1'K^-1 y / 1'K^-1 1, the residual
    y - m and K^-1 (y - m))."""
    xc, yc = np.asarray(xc, np.float64), np.asarray(yc, np.float64)
    k = rbf_kernel(xc, xc, length_scale).numpy() + noise_var * np.eye(len(yc))
    chol = np.linalg.cholesky(k)
    solve = lambda b: np.linalg.solve(chol.T, np.linalg.solve(chol, b))
    k_one = solve(np.ones(len(yc)))
    m = k_one @ yc / np.sum(k_one)
    resid = yc - m
    return chol, k_one, m, resid, solve(resid)


def invariant_predictive(xc, yc, xq, length_scale, noise_var):
    """The right-Haar (p(m, s) ~ 1/s) Bayes predictive of y at xq for y = m + s f,
    f ~ GP(0, RBF(length_scale) + noise_var I), from the context (xc [n, dx], yc [n]):
    Student-t (degrees of freedom n - 1, location [q], scale [q]). Needs n >= 2."""
    n = len(yc)
    chol, k_one, m, resid, k_res = _gls_fit(xc, yc, length_scale, noise_var)
    ks = rbf_kernel(np.asarray(xq, np.float64), np.asarray(xc, np.float64),
                    length_scale).numpy()  # (q, n)
    s2 = resid @ k_res / (n - 1)
    v = np.linalg.solve(chol, ks.T)  # (n, q)
    var = 1.0 + noise_var - np.sum(v * v, axis=0) + np.square(1.0 - ks @ k_one) / np.sum(k_one)
    return n - 1, m + ks @ k_res, np.sqrt(s2 * var)


def invariant_log_evidence(xc, yc, length_scale, noise_var):
    """log p(yc | noise_var) under the right-Haar prior p(m, s) ~ 1/s, up to a constant
    that depends on n only: -1/2 log|K| - 1/2 log 1'K^-1 1 - (n - 1)/2 log Q, with
    Q = (y - m)'K^-1 (y - m) at the GLS mean m (the integral over m and s in closed form).
    Invariant to y -> c y + d, so it weighs noise levels by what the context's shape says."""
    chol, k_one, _, resid, k_res = _gls_fit(xc, yc, length_scale, noise_var)
    return (-np.sum(np.log(np.diag(chol))) - 0.5 * np.log(np.sum(k_one))
            - 0.5 * (len(resid) - 1) * np.log(resid @ k_res))


def default_noise_prior(grid: int = 24):
    """`default`'s training stream's noise as (noise variances [G + 1], log prior weights):
    noise-free with the stream's share (at the gp_rbf draws' jitter), else its prior's
    noise std, log-uniform (midpoint rule on `grid` levels)."""
    var, log_prior = noise_levels(default_noise_free(), get_preset("default").task.prior_noise,
                                  grid)
    return var + GPRBF.jitter, log_prior


def floor_nll_noise_unknown(task, x, y, k, noise_prior):
    """Per-task mean NLL per query of the right-Haar Bayes predictive that does not know the
    noise either: a mixture over noise_prior's levels of `invariant_predictive`'s
    Student-t's, each weighted by its prior weight times `invariant_log_evidence`."""
    levels, log_prior = noise_prior
    out = []
    for i in range(len(x)):
        xc, yc, xq, yq = x[i, :k], y[i, :k, 0], x[i, k:], y[i, k:, 0]
        logw, logp = [], []
        for var, lp in zip(levels, log_prior):
            df, loc, scale = invariant_predictive(xc, yc, xq, task.gp_length_scale, var)
            logw.append(lp + invariant_log_evidence(xc, yc, task.gp_length_scale, var))
            logp.append(stats.t.logpdf(yq, df, loc=loc, scale=scale))
        logw = np.asarray(logw) - special.logsumexp(logw)
        out.append(-np.mean(special.logsumexp(logw[:, None] + np.asarray(logp), axis=0)))
    return np.asarray(out)


def floor_nll(task, x, y, k):
    """Per-task mean NLL per query point of `invariant_predictive` (true kernel)."""
    noise = GPRBF.jitter + task.noise_std ** 2
    out = []
    for i in range(len(x)):
        df, loc, scale = invariant_predictive(x[i, :k], y[i, :k, 0], x[i, k:],
                                              task.gp_length_scale, noise)
        out.append(-np.mean(stats.t.logpdf(y[i, k:, 0], df, loc=loc, scale=scale)))
    return np.asarray(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", default=(),
                   help="gpicl-eval results.json files of the same tasks: their models' NLL "
                        "column (a suite from the first file that has it)")
    p.add_argument("--ks", default="8,16,32")
    p.add_argument("--tasks", type=int, default=128)
    p.add_argument("--noise-unknown", action="store_true",
                   help="also the floor of a model that does not know the task is noise-free: "
                        "the noise integrated out under default's training noise (noise-free "
                        "with its share, else log-uniform std in its prior's range)")
    a = p.parse_args(argv)
    try:
        ks = [int(v) for v in a.ks.split(",")]
    except ValueError:
        p.error(f"--ks {a.ks!r}: expected comma-separated integers")
    if any(k < 2 for k in ks) or a.tasks < 1:
        p.error("--ks: every k must be >= 2 (the floor needs two context points); "
                "--tasks: expected >= 1")
    results = {}
    for path in a.results:
        try:
            with open(path) as f:
                suites = json.load(f)["suites"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--results {path}: not a gpicl-eval results.json ({e})")
        results = {**suites, **results}
    cfg = get_preset("default")
    print("NLL per query point (nats); floor = the best any model equivariant to y -> c y + d "
          "can reach with the true kernel")
    noise_prior = default_noise_prior() if a.noise_unknown else None
    if noise_prior is not None:
        print(f"noise unknown: the same, not knowing either that the task is noise-free "
              f"(noise-free with probability {np.exp(noise_prior[1][0]):.3f}, else std "
              "log-uniform in default's prior_noise range, integrated out by its evidence): "
              "what a learner of default's training noise does at best on average over it; "
              "last column: what the model has left beyond it")
    extra = (" | floor, noise unknown | its gap | model - it", "|---:|---:|---:") if a.noise_unknown \
        else ("", "")
    print("| suite | k | exact posterior | equivariant floor | floor gap | model | model gap "
          f"| model - floor{extra[0]} |")
    print(f"|---|---:|---:|---:|---:|---:|---:|---:{extra[1]}|")
    for s in (s for s in default_suites(cfg) if s.family == "gp_rbf"):
        task = gp_suite_task(cfg, s)
        for k in ks:
            x, y, _ = context_batch(cfg, k, a.tasks, QUERIES, SEED, family=s.family,
                                    **s.overrides)
            _, dist, _ = bayes_optimal(task, x, y, k)
            exact = float(-np.mean(dist["log_prob"]))
            floor = float(np.mean(floor_nll(task, x, y, k)))
            cells = [f"{exact:.3f}", f"{floor:.3f}", f"{floor - exact:.3f}"]
            methods = results.get(s.name, {}).get("methods", {})
            cell = methods.get("model", {}).get(str(k))
            theirs = methods.get("bayes_optimal", {}).get(str(k), {}).get("nll")
            if cell and "nll" in cell:
                if theirs is None or abs(theirs - exact) > 1e-6:
                    p.error(f"--results: suite {s.name!r} at k={k}: the exact posterior's NLL "
                            f"is {theirs} there, {exact} on these tasks: not the same tasks "
                            f"(--tasks {a.tasks} here; gpicl-eval's default is 128)")
                cells += [f"{cell['nll']:.3f}", f"{cell['nll'] - exact:.3f}",
                          f"{cell['nll'] - floor:.3f}"]
            else:
                cells += ["-"] * 3
            if noise_prior is not None:
                unknown = float(np.mean(floor_nll_noise_unknown(task, x, y, k, noise_prior)))
                cells += [f"{unknown:.3f}", f"{unknown - exact:.3f}",
                          f"{cell['nll'] - unknown:.3f}" if cell and "nll" in cell else "-"]
            print(f"| {s.name} | {k} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
