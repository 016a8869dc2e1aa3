"""Evaluating a model on tasks: the one module every caller uses.

- training's periodic unseen-task loss (`unseen_batch`, `batch_metrics`);
- the sweeps' seen/unseen loss and accuracy (the same two functions);
- the transfer suites of gpicl-eval and the main job's short report
  (`evaluate`, `write_outputs`), against per-task learners;
- pictures of fits (`fits_figure`: `plot_fits` for suites,
  `prediction_figure` for TensorBoard and the main job).

Transfer evaluation of an exported model against classical baselines:

    gpicl-eval --model exports/gpicl [--version N] --out reports/gpicl [--logdir runs/eval]

The model is evaluated through its SavedModel `serving_default` signature, the
function TF Serving runs, not the Keras object. Every suite is a fixed, seeded
set of tasks the model never saw; each task gets k context points and
`--queries` query points, for every k in --ks. Baselines are fitted per task on
the same k context points. On `gp_rbf` suites the exact GP posterior mean with
the true kernel (the Bayes-optimal predictor) is added as `bayes_optimal`.

Every method runs on the same tasks (paired): --tasks tasks per suite and k.

Output in --out:
  results.json   {"suites": {suite: {"family", "overrides", "methods": {method: {k:
                   {"mse", "ci95": [lo, hi], "nmse", "nmse_ci95", "n_tasks",
                   "sec_per_task"}}}}}, ...}
  results.md     one table per suite (normalised MSE at every k, best in bold)
  mse_vs_k.png   normalised MSE against k per suite, all methods
  fits_<suite>.png  example fits: context, truth, model, best baseline

A model with the bar head (model.head="bar") is also scored as a predictive
distribution, through the export's `log_prob` and `quantiles` signatures, beside
GP regression's Gaussian predictive and, on gp_rbf suites, the exact GP posterior:
each such cell adds "nll" (negative log density per query point), "crps", "cover50"
and "cover90" (fractions of queries inside the central 50% / 90% intervals), each
with a "<metric>_ci95", and "pit_hist" (PIT counts in 10 bins); results.md adds a
table per metric and calibration.png the PIT histograms per suite.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from gpicl_tf import baselines as baselines_lib
from gpicl_tf import data as data_lib
from gpicl_tf.config import ExperimentConfig, TaskConfig, unseen_task_config
from gpicl_tf.files import write_atomic
from gpicl_tf.losses import masked_query_loss, query_accuracy
from gpicl_tf.model import (Predictive, bar_distribution, masked_inputs, model_inputs,
                            point_prediction)
from gpicl_tf.progress import progress_bar
from gpicl_tf.summaries import pyplot
from gpicl_tf.tasks import GPRBF, get_family, gp_posterior

EVAL_SEED = 20221208  # suites are fixed: this seed is never a training stream
REPORT_STREAM = data_lib.EVAL_STREAM + 7  # transfer suites: tasks no training run draws
SWEEP_STREAM = data_lib.EVAL_STREAM + 11  # seen/unseen evaluation of the sweeps
PICTURE_STREAM = data_lib.EVAL_STREAM + 1  # pictures of fits during training


# ------------------------------------------------------------ tasks and predictors
def context_batch(cfg: ExperimentConfig, k: int, n_tasks: int, n_queries: int, seed: int,
                  family=None, stream: int = REPORT_STREAM, task_points=None,
                  **task_overrides):
    """n_tasks unseen tasks, each with k context points first and n_queries queries.

    task_points: draw each task with max(task_points, k + n_queries) points and keep its
    first n_queries queries (the points are exchangeable), so a family that standardises
    y over a task's points (random MLPs, the prior) gives the tasks training draws with
    task.n_points; None: k + n_queries points.

    Returns numpy arrays x [T, k+q, dx], y [T, k+q, dy], is_query [T, k+q],
    with the context points placed first.
    """
    n = max(task_points or 0, k + n_queries)
    task = dataclasses.replace(unseen_task_config(cfg.task), n_points=n,
                               min_context=0, max_context=None,
                               family=family or cfg.task.family, mix=(), **task_overrides)
    b = data_lib.sample_batch(task, seed, n_tasks, n_context=k, stream=stream)
    x, y, q = b["x"].numpy(), b["y"].numpy(), b["is_query"].numpy()
    order = np.argsort(q, axis=1, kind="stable")  # context (0) before queries (1)
    take = lambda a: np.take_along_axis(a, order[..., None] if a.ndim == 3 else order,
                                        1)[:, :k + n_queries]
    return take(x), take(y), take(q)


def model_mse(predict_fn, x, y, k: int):
    """Per-task MSE of predict_fn(context_x, context_y, query_x) -> [T, q, dy]."""
    pred = predict_fn(x[:, :k], y[:, :k], x[:, k:])
    return np.mean((pred - y[:, k:]) ** 2, axis=(1, 2))


def keras_predict_fn(model):
    """predict_fn over a Keras model with the masked-input interface."""

    def predict(cx, cy, qx):
        pred = point_prediction(model(masked_inputs(cx, cy, qx), training=False))
        return pred.numpy()[:, cx.shape[1]:]

    return predict


# ------------------------------------------------ the training loss on task batches
def unseen_batch(cfg: ExperimentConfig, n: int, n_context=None, stream=data_lib.EVAL_STREAM,
                 task=None) -> dict:
    """A fixed batch of n tasks no training step saw (or of `task`, e.g. the pool)."""
    task = unseen_task_config(cfg.task) if task is None else task
    return data_lib.sample_batch(task, cfg.train.seed, n, n_context=n_context, stream=stream)


def batch_metrics(model, cfg: ExperimentConfig, batch: dict) -> dict:
    """The training loss on a batch (and accuracy for classification), outside a strategy."""
    pred = model(model_inputs(batch), training=False)
    out = {"loss": float(masked_query_loss(batch["y"], pred, batch["is_query"], cfg.loss,
                                           bars=bar_distribution(model)))}
    if cfg.loss == "nll":  # the mean's error too, comparable with an mse model's loss
        out["mse"] = float(masked_query_loss(batch["y"], pred, batch["is_query"], "mse"))
    if cfg.task.kind == "classification":
        out["accuracy"] = float(query_accuracy(batch["y"], pred, batch["is_query"]))
    return out
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_BASELINES = ("mean", "knn", "ridge", "poly_ridge", "gp")  # "mlp": opt-in, slow


@dataclass(frozen=True)
class Suite:
    """A family of unseen tasks with task-config overrides."""

    name: str
    family: str
    overrides: dict = field(default_factory=dict)
    kind: str = "transfer"


def fixed_width(d: int) -> dict:
    """Task overrides for inputs of exactly d features (no per-example width)."""
    return {"x_dim": d, "min_x_dim": None, "x_dim_weights": ()}


def default_suites(cfg: ExperimentConfig) -> list:
    """Unseen tasks of the training prior (when it has one), the 1-D suites (random MLPs,
    transfer families, distribution shifts) and Garg et al.'s suites at widths 2, 4, 8.

    The 1-D suites have one input feature whatever the model's width (a model of width
    D > 1 sees them padded to D), so every model is compared on the same 1-D tasks."""
    t = cfg.task
    trained = t.families
    one_d = fixed_width(1)
    mlp = {"standardize_y": t.standardize_y, **one_d}
    raw = {"standardize_y": False, **one_d}
    wide = {"x_low": 2 * t.x_low, "x_high": 2 * t.x_high}
    deeper = tuple(t.mlp_hidden) + (t.mlp_hidden[-1], t.mlp_hidden[-1])
    wider = tuple(4 * h for h in t.mlp_hidden)
    prior = ([Suite("prior", "prior", {"standardize_y": t.standardize_y}, "in-distribution")]
             if "prior" in trained else [])
    return prior + [
        Suite("random_mlp", "random_mlp", mlp,
              "in-distribution" if "random_mlp" in trained else "transfer"),
        Suite("sine", "sine", raw),
        Suite("linear", "linear", raw),
        Suite("polynomial", "polynomial", raw),
        Suite("step", "step", raw),
        Suite("gp_rbf_l0.1", "gp_rbf", {**raw, "gp_length_scale": 0.1}),
        Suite("gp_rbf_l0.5", "gp_rbf", {**raw, "gp_length_scale": 0.5}),
        Suite("shift_wide_x", "random_mlp", {**mlp, **wide}, "shift"),
        Suite("shift_noisy", "random_mlp", {**mlp, "noise_std": 0.1}, "shift"),
        Suite("shift_deeper_mlp", "random_mlp", {**mlp, "mlp_hidden": deeper}, "shift"),
        Suite("shift_wider_mlp", "random_mlp", {**mlp, "mlp_hidden": wider}, "shift"),
    ] + garg_suites(cfg)


GARG_COMPONENTS = ("linear", "sparse_linear", "relu2", "tree")
GARG_NOISE = 0.25  # noisy variants: noise std over the standardised function's std of 1


def garg_suites(cfg: ExperimentConfig) -> list:
    """Garg et al.'s function classes (linear, sparse linear, 2-layer ReLU network, decision
    tree of depth 4) at input widths d in {2, 4, 8} that the model reads (task.min_x_dim
    <= d <= task.x_dim), noise-free and noisy. The model sees each task padded to
    task.x_dim; the baselines see its d features."""
    out = []
    for d in (2, 4, 8):
        if not cfg.task.x_dim_min <= d <= cfg.task.x_dim:
            continue
        for comp in GARG_COMPONENTS:
            base = {**fixed_width(d), "prior_weights": ((comp, 1.0),),
                    "standardize_y": False, "prior_noise": (GARG_NOISE, GARG_NOISE)}
            out.append(Suite(f"garg_{comp}_d{d}", "prior", {**base, "prior_noise_free": 1.0},
                             "garg"))
            out.append(Suite(f"garg_{comp}_d{d}_noisy", "prior",
                             {**base, "prior_noise_free": 0.0}, "garg"))
    return out


def pad_features(x, width: int):
    """x [T, N, d] with zero features appended up to `width` (absent features, as trained)."""
    if x.shape[-1] == width:
        return x
    return np.concatenate([x, np.zeros(x.shape[:-1] + (width - x.shape[-1],), x.dtype)], -1)


def mean_ci95(errors) -> tuple:
    """Mean and normal-approximation 95% confidence interval of per-task errors."""
    e = np.asarray(errors, np.float64)
    m = float(e.mean())
    half = 1.96 * float(e.std(ddof=1)) / np.sqrt(len(e)) if len(e) > 1 else 0.0
    return m, [m - half, m + half]


def saved_model_predict_fn(version_dir: str):
    """predict_fn(cx, cy, qx) -> [T, Nq, dy] through the export's serving_default."""
    from gpicl_tf.export import load_signature

    sig = load_signature(version_dir)

    def predict(cx, cy, qx):
        out = sig(context_x=tf.constant(cx, tf.float32), context_y=tf.constant(cy, tf.float32),
                  query_x=tf.constant(qx, tf.float32))
        return out["mean"].numpy()

    return predict


# Predictive distributions are scored at these quantile levels: CRPS from the 100
# midpoint levels, the 50% and 90% central intervals from the last four.
CRPS_LEVELS = (np.arange(100) + 0.5) / 100
INTERVALS = {"cover50": (0.25, 0.75), "cover90": (0.05, 0.95)}
DIST_LEVELS = np.concatenate([CRPS_LEVELS, [0.25, 0.75, 0.05, 0.95]]).astype(np.float32)
PIT_BINS = 10
DIST_METRICS = ("nll", "crps", *INTERVALS)  # the scores of a predictive distribution


def saved_model_dist_fn(version_dir: str):
    """dist_fn(cx, cy, qx, qy) -> {log_prob, cdf [T, Nq, dy], quantiles [T, Nq, dy, L] at
    DIST_LEVELS} through the export's log_prob and quantiles signatures; None when the
    export predicts a mean only."""
    from gpicl_tf.export import load_signatures

    try:
        sigs = load_signatures(version_dir, ("log_prob", "quantiles"))
    except ValueError:
        return None
    lp_sig, q_sig = sigs["log_prob"], sigs["quantiles"]

    def dist(cx, cy, qx, qy):
        f32 = lambda a: tf.constant(a, tf.float32)
        out = lp_sig(context_x=f32(cx), context_y=f32(cy), query_x=f32(qx), query_y=f32(qy))
        q = q_sig(context_x=f32(cx), context_y=f32(cy), query_x=f32(qx),
                  levels=f32(DIST_LEVELS))["quantiles"]
        return {"log_prob": out["log_prob"].numpy(), "cdf": out["cdf"].numpy(),
                "quantiles": q.numpy()}

    return dist


def gaussian_dist(mean, std, y) -> dict:
    """What dist_fn returns, for Gaussian predictive distributions (mean, std, y [..., dy])."""
    from scipy.stats import norm

    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return {"log_prob": norm.logpdf(y, mean, std), "cdf": norm.cdf(y, mean, std),
            "quantiles": mean[..., None] + std[..., None] * norm.ppf(DIST_LEVELS)}


def distribution_scores(dist: dict, y) -> dict:
    """Per-task scores of predictive distributions at targets y [T, Nq, dy]:
    nll (mean negative log density per point), crps (by the quantile decomposition
    CRPS = 2 * integral over levels of the pinball loss, at the 100 CRPS_LEVELS), the
    fraction of targets inside the 50% and 90% central intervals, and the PIT values
    (the CDF at each target; uniform when calibrated)."""
    y = np.asarray(y, np.float64)
    q = np.asarray(dist["quantiles"], np.float64)  # (T, Nq, dy, L)
    m = len(CRPS_LEVELS)
    u = y[..., None] - q[..., :m]
    pinball = np.maximum(CRPS_LEVELS * u, (CRPS_LEVELS - 1) * u)
    out = {"nll": -np.mean(np.asarray(dist["log_prob"], np.float64), axis=(1, 2)),
           "crps": np.mean(2 * pinball.mean(-1), axis=(1, 2))}
    for j, name in enumerate(INTERVALS):
        lo, hi = q[..., m + 2 * j], q[..., m + 2 * j + 1]
        out[name] = np.mean((lo <= y) & (y <= hi), axis=(1, 2))
    out["pit"] = np.asarray(dist["cdf"], np.float64).ravel()
    return out


def gp_suite_task(cfg: ExperimentConfig, suite) -> TaskConfig:
    """The task config of a gp_rbf suite's draws (its kernel and noise), as `bayes_optimal`
    takes it."""
    return dataclasses.replace(unseen_task_config(cfg.task), family="gp_rbf", mix=(),
                               **suite.overrides)


def bayes_optimal(suite_cfg_task, x, y, k):
    """Per-task MSE and Gaussian predictive distributions of the exact GP posterior with
    the true kernel: (errors [T], dist (see gaussian_dist), seconds per task)."""
    noise = GPRBF.jitter + suite_cfg_task.noise_std**2
    errs, means, stds = [], [], []
    tic = time.perf_counter()
    for i in range(len(x)):
        if k == 0:
            mean = np.zeros_like(y[i, k:], np.float64)
            var = np.full((len(mean), 1), 1.0 + noise)
        else:
            mean, var = (t.numpy() for t in gp_posterior(
                x[i, :k], y[i, :k], x[i, k:], suite_cfg_task.gp_length_scale, noise))
        errs.append(np.mean((mean.astype(np.float32) - y[i, k:]) ** 2))
        means.append(mean)
        stds.append(np.broadcast_to(np.sqrt(var), mean.shape))
    sec = (time.perf_counter() - tic) / len(x)
    return np.asarray(errs), gaussian_dist(np.stack(means), np.stack(stds), y[:, k:]), sec


def check_request(cfg: ExperimentConfig, suites: list, ks, baselines) -> None:
    """Fails before any work on an unknown family or baseline, or a k the model cannot take."""
    for s in suites:
        get_family(s.family)
    for b in baselines:
        baselines_lib.get_baseline(b)
    too_big = [k for k in ks if k > cfg.task.context_max or k < 0]
    if too_big:
        raise ValueError(f"--ks {too_big}: the model was trained on at most "
                         f"{cfg.task.context_max} context points; expected k in "
                         f"[0, {cfg.task.context_max}]")


def evaluate(predict_fn, cfg: ExperimentConfig, suites: list, ks=DEFAULT_KS,
             baselines=DEFAULT_BASELINES, n_tasks: int = 128, n_queries: int = 16,
             seed: int = EVAL_SEED, progress: bool = True, dist_fn=None,
             task_points=None, jobs: int = 1) -> dict:
    """Runs every suite at every k; returns the results.json dictionary.

    Every method (the model, each baseline, the Bayes-optimal predictor) is
    scored on the same n_tasks tasks with the same context and queries
    (paired), by MSE and by normalised MSE (each task's squared error over the
    variance of its y, so suites of every scale read on one scale: 1.0 is
    about the error of predicting the task's mean).

    Args:
      predict_fn: (context_x, context_y, query_x) -> mean, batched numpy.
      cfg: the model's experiment config.
      suites: Suites to run.
      ks: context sizes.
      baselines: names from gpicl_tf.baselines.BASELINES.
      n_tasks: tasks per suite and k, the same for every method.
      n_queries: query points per task.
      seed: the suites' seed.
      task_points: tasks drawn with this many points, their first n_queries queries
        scored (`context_batch`); None: k + n_queries.
      dist_fn: (context_x, context_y, query_x, query_y) -> the model's predictive
        distributions (see saved_model_dist_fn), for a model with the bar head: then
        the model, the baselines with a Gaussian predictive (GP regression) and the
        Bayes-optimal GP posterior are also scored by NLL, CRPS, interval coverage
        and a PIT histogram, on the same tasks.
      jobs: processes that fit the baselines' tasks (`task_pool`), with jobs > 1 while
        this process samples the next cell and runs the model on it; the results are the
        same for every value, each baseline's sec_per_task too (its fits' own time; the
        model's is its wall time here, longer while the workers fit).
    """
    check_request(cfg, suites, ks, baselines)
    pool = baselines_lib.task_pool(jobs, baselines)
    bar = progress_bar(len(suites) * len(ks), progress, label="suite x k")
    out = {"config": cfg.to_dict(), "n_queries": n_queries, "n_tasks": n_tasks, "seed": seed,
           "suites": {}}
    if task_points is not None:
        out["task_points"] = task_points
    # A cell's baselines are fitted in the pool's workers while this process samples the
    # next cell's tasks and runs the model on them; a cell is scored (and the progress
    # bar moves) once the next one is under way. The results do not depend on it.
    running = []
    for s in suites:
        methods = {}
        for k in ks:
            x, y, _ = context_batch(cfg, k, n_tasks, n_queries, seed, family=s.family,
                                    task_points=task_points, **s.overrides)
            var = np.maximum(y.var(axis=1).mean(-1), 1e-30)  # (T,) each task's y variance
            tasks = [(x[i, :k], y[i, :k], x[i, k:]) for i in range(len(x))]
            fits = []
            for b in baselines:
                with_dist = dist_fn is not None and b in baselines_lib.DISTRIBUTIONS
                fn = (baselines_lib.DISTRIBUTIONS[b] if with_dist else
                      baselines_lib.get_baseline(b))
                fits.append((b, with_dist, baselines_lib.submit_tasks(fn, tasks, pool)))
            tic = time.perf_counter()
            xm = pad_features(x, cfg.task.x_dim)
            pred = predict_fn(xm[:, :k], y[:, :k], xm[:, k:])
            sec = (time.perf_counter() - tic) / len(x)
            _put(methods, "model", k, np.mean((pred - y[:, k:]) ** 2, axis=(1, 2)), var, sec)
            if dist_fn is not None:
                _put_dist(methods, "model", k,
                          distribution_scores(dist_fn(xm[:, :k], y[:, :k], xm[:, k:], y[:, k:]),
                                              y[:, k:]))
            for b in baselines:  # the methods' order: model, baselines, bayes_optimal
                methods.setdefault(b, {})
            if s.family == "gp_rbf":
                errs, d, sec = bayes_optimal(gp_suite_task(cfg, s), x, y, k)
                _put(methods, "bayes_optimal", k, errs, var, sec)
                if dist_fn is not None:
                    _put_dist(methods, "bayes_optimal", k, distribution_scores(d, y[:, k:]))
            running.append((methods, k, y, var, fits))
            while len(running) > 1:
                _score_baselines(*running.pop(0), bar)
        out["suites"][s.name] = {"family": s.family, "kind": s.kind,
                                 "overrides": {a: list(v) if isinstance(v, tuple) else v
                                               for a, v in s.overrides.items()},
                                 "methods": methods}
    for cell in running:
        _score_baselines(*cell, bar)
    return out


def _score_baselines(methods, k, y, var, fits, bar):
    """Waits for a cell's baselines (`submit_tasks`) and adds their scores to methods."""
    for b, with_dist, result in fits:
        outs, sec = result()
        means = [_checked(b, o[0] if with_dist else o, y[i, k:]) for i, o in enumerate(outs)]
        errs = [np.mean((m - y[i, k:]) ** 2) for i, m in enumerate(means)]
        _put(methods, b, k, errs, var, sec)
        if with_dist:
            d = gaussian_dist(np.stack(means), np.stack([o[1] for o in outs]), y[:, k:])
            _put_dist(methods, b, k, distribution_scores(d, y[:, k:]))
    if bar is not None:
        bar.add(1)


def best_baseline(methods: dict, k: str, metric: str = "nmse"):
    """(name, value) of the best per-task learner of a results cell (not the model, not
    the Bayes-optimal predictor); None when the cell has no baseline."""
    base = [n for n in methods if n not in ("model", "bayes_optimal")]
    if not base:
        return None
    name = min(base, key=lambda n: methods[n][k][metric])
    return name, methods[name][k][metric]


def _checked(name: str, pred, target):
    """pred as an array of target's shape; a baseline of another shape is a bug, not a score
    (a [m] answer against [m, 1] targets would broadcast to an [m, m] error)."""
    pred = np.asarray(pred)
    if pred.shape != target.shape:
        raise RuntimeError(f"baseline {name!r} returned shape {pred.shape}; expected "
                           f"{target.shape}")
    return pred


def _put(methods, name, k, errs, var, sec):
    errs = np.asarray(errs, np.float64)
    mse, ci = mean_ci95(errs)
    nmse, nci = mean_ci95(errs / var)
    methods.setdefault(name, {})[str(k)] = {"mse": mse, "ci95": ci, "nmse": nmse,
                                            "nmse_ci95": nci, "n_tasks": len(errs),
                                            "sec_per_task": sec}


def _put_dist(methods, name, k, scores):
    """Adds a method's distribution scores to its cell: nll, crps, cover50, cover90 (with
    95% intervals over tasks) and a PIT histogram (counts in PIT_BINS equal bins)."""
    cell = methods[name][str(k)]
    for metric in DIST_METRICS:
        v = np.asarray(scores[metric], np.float64)
        cell[metric], cell[f"{metric}_ci95"] = mean_ci95(v)
    hist = np.histogram(np.clip(scores["pit"], 0.0, 1.0), PIT_BINS, (0.0, 1.0))[0]
    cell["pit_hist"] = hist.tolist()


def has_distributions(results: dict) -> bool:
    """The model of these results was scored as a predictive distribution (bar head)."""
    return any("nll" in next(iter(s["methods"]["model"].values()))
               for s in results["suites"].values())


def plot_calibration(results: dict, path: str) -> bool:
    """PIT histograms, one panel per suite (all k pooled), one line per method with a
    predictive distribution; a calibrated method is flat at 1. False if none."""
    if not has_distributions(results):
        return False
    plt = pyplot()
    names = list(results["suites"])
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    edges = np.linspace(0, 1, PIT_BINS + 1)
    for ax, name in zip(axes.ravel(), names):
        for meth, cells in results["suites"][name]["methods"].items():
            hists = [c["pit_hist"] for c in cells.values() if "pit_hist" in c]
            if not hists:
                continue
            h = np.sum(hists, 0).astype(np.float64)
            density = h / max(h.sum(), 1) * PIT_BINS
            ax.stairs(density, edges, label=meth, **STYLES.get(meth, {"lw": 1}))
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("PIT (predictive CDF at the truth)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("density (1 = calibrated)", fontsize=7)
    handles = {}
    for ax in axes.ravel():
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=7,
               ncol=len(handles))
    fig.suptitle("Calibration: PIT histograms on the same tasks, every k pooled (a hump: "
                 "too wide; a U: too narrow)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown(results: dict, metric: str = "nmse") -> str:
    """One Markdown table per suite: methods x k of `metric`, the best in bold.

    Every row of a table was measured on the same tasks (paired).
    """
    what = {"nmse": " (normalised: squared error / the task's y variance)",
            "nll": " (negative log density per query point, nats; lower is better)",
            "crps": " (continuous ranked probability score, raw scale; lower is better)",
            "cover50": " (fraction of queries inside the 50% central interval; 0.5 is right)",
            "cover90": " (fraction of queries inside the 90% central interval; 0.9 is right)"}
    nominal = {"cover50": 0.5, "cover90": 0.9}.get(metric)
    lines = [f"{metric.upper()} on {results.get('n_tasks', '?')} tasks per suite and k, the "
             "same tasks for every method" + what.get(metric, ""), ""]
    for name, suite in results["suites"].items():
        methods = {n: m for n, m in suite["methods"].items()
                   if metric in next(iter(m.values()))}
        if "model" not in methods:
            continue
        ks = list(methods["model"].keys())
        lines += [f"### {name} ({suite['kind']})", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---:|" * len(ks)]
        badness = (lambda v: abs(v - nominal)) if nominal is not None else (lambda v: v)
        best = {k: min(badness(m[k][metric]) for n, m in methods.items()
                       if n != "bayes_optimal") for k in ks}
        for meth, row in methods.items():
            cells = []
            for k in ks:
                v = row[k][metric]
                cells.append(f"**{v:.4g}**" if badness(v) == best[k] else f"{v:.4g}")
            lines.append(f"| {meth} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


STYLES = {  # one color per method across every plot
    "model": {"lw": 2.5, "color": "C3"}, "mean": {"lw": 1, "color": "C7"},
    "knn": {"lw": 1, "color": "C2"}, "ridge": {"lw": 1, "color": "C8"},
    "poly_ridge": {"lw": 1, "color": "C5"}, "gp": {"lw": 1, "color": "C0"},
    "mlp": {"lw": 1, "color": "C4"}, "bayes_optimal": {"lw": 1.5, "color": "k", "ls": "--"},
}


def plot_mse_vs_k(results: dict, path: str) -> None:
    plt = pyplot()
    suites = results["suites"]
    cols = 4
    rows = -(-len(suites) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.ravel(), suites.items()):
        for meth, row in s["methods"].items():
            ks = [int(k) for k in row]
            ax.plot(ks, [row[str(k)]["nmse"] for k in ks], marker="o", ms=3, label=meth,
                    **STYLES.get(meth, {"lw": 1}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("context points k")
    for ax in axes.ravel()[len(suites):]:
        ax.axis("off")
    axes[0][0].set_ylabel("normalised MSE")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_garg_by_width(results: dict, path: str) -> bool:
    """Garg et al.'s suites: one panel per input width d (columns) and noise (rows), the
    model's normalised MSE against k for each function class (solid) beside the best
    per-task learner of that class and k (dashed). False when no Garg suite ran."""
    garg = {n: s for n, s in results["suites"].items() if s["kind"] == "garg"}
    if not garg:
        return False
    plt = pyplot()
    widths = sorted({s["overrides"]["x_dim"] for s in garg.values()})
    fig, axes = plt.subplots(2, len(widths), figsize=(4.2 * len(widths), 6.4), squeeze=False)
    for col, d in enumerate(widths):
        for row, noisy in enumerate(("", "_noisy")):
            ax = axes[row][col]
            for i, comp in enumerate(GARG_COMPONENTS):
                s = garg.get(f"garg_{comp}_d{d}{noisy}")
                if s is None:
                    continue
                m = s["methods"]
                ks = sorted(int(k) for k in m["model"])
                color = f"C{i}"
                ax.plot(ks, [m["model"][str(k)]["nmse"] for k in ks], color=color, marker="o",
                        ms=3, label=f"{comp}: model")
                if best_baseline(m, str(ks[0])):
                    best = [best_baseline(m, str(k))[1] for k in ks]
                    ax.plot(ks, best, color=color, ls="--", lw=1, label=f"{comp}: best baseline")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"d = {d}, {'noisy' if noisy else 'noise-free'}", fontsize=9)
            ax.set_xlabel("context points k")
    axes[0][0].set_ylabel("normalised MSE")
    axes[1][0].set_ylabel("normalised MSE")
    labelled = [ax for ax in axes.ravel() if ax.get_legend_handles_labels()[0]]
    labelled[0].legend(fontsize=6)  # the first panel with curves (a suite may run alone)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def fits_figure(x, y, context, predictions: dict, titles, band=None):
    """Context, truth and each prediction on 1-D tasks, one panel per task.

    Args:
      x, y: [T, N, 1] tasks.
      context: [T, N] bool, True for context points.
      predictions: {label: [T, Nq, 1]} predictions at the query points (the
        points where context is False, in their order); the first is the model.
      titles: a panel title per task.
      band: (lo, hi), each [T, Nq, 1]: the model's 90% central interval, shaded.
    """
    plt = pyplot()
    n = len(x)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    styles = [dict(color="C1", lw=1.5), dict(color="C2", lw=1, ls="--")]
    for i, ax in enumerate(axes[0]):
        ctx = context[i]
        qx, qy = x[i, ~ctx, 0], y[i, ~ctx, 0]
        order = np.argsort(qx)
        ax.plot(qx[order], qy[order], color="0.4", lw=1.5, label="truth")
        if band is not None:
            ax.fill_between(qx[order], np.asarray(band[0])[i, order, 0],
                            np.asarray(band[1])[i, order, 0], color="C1", alpha=0.2, lw=0,
                            label="model 90% interval")
        for (label, pred), style in zip(predictions.items(), styles):
            ax.plot(qx[order], np.asarray(pred)[i, order, 0], label=label, **style)
        ax.scatter(x[i, ctx, 0], y[i, ctx, 0], color="C0", zorder=3, s=18, label="context")
        ax.set_title(titles[i], fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_fits(predict_fn, cfg, suite: Suite, results: dict, path: str, k: int = 8,
              n: int = 3, seed: int = EVAL_SEED, dist_fn=None) -> None:
    """Context points, truth, model and best baseline on n tasks of a 1-D suite (with
    dist_fn, the model's 90% interval shaded)."""
    methods = results["suites"][suite.name]["methods"]
    kk = str(k) if str(k) in methods["model"] else list(methods["model"])[-1]
    k = int(kk)
    base = best_baseline(methods, kk)[0]
    x, y, _ = context_batch(cfg, k, n, 200, seed + 1, family=suite.family, **suite.overrides)
    fn = baselines_lib.get_baseline(base)
    bpred = np.stack([np.asarray(fn(x[i, :k], y[i, :k], x[i, k:])) for i in range(n)])
    context = np.arange(x.shape[1])[None, :].repeat(n, 0) < k  # context first
    xm = pad_features(x, cfg.task.x_dim)
    band = None
    if dist_fn is not None:
        q = dist_fn(xm[:, :k], y[:, :k], xm[:, k:], y[:, k:])["quantiles"]
        band = (q[..., -2], q[..., -1])  # DIST_LEVELS ends with 0.05, 0.95
    fig = fits_figure(x, y, context, {"model": predict_fn(xm[:, :k], y[:, :k], xm[:, k:]),
                                      f"{base} (best baseline)": bpred},
                      [f"{suite.name}, k={k}"] * n, band=band)
    fig.savefig(path, dpi=90)
    pyplot().close(fig)


@functools.lru_cache(maxsize=8)
def picture_tasks(task: TaskConfig, seed: int, n_tasks: int, n_context: int) -> dict:
    """prediction_figure's tasks: drawn once per (task config, seed, n_tasks, n_context)
    and kept, since training draws the same picture at every evaluation (sampling them
    anew took about 1 s of the picture's 1.5, mostly tracing the task stream)."""
    return data_lib.sample_batch(task, seed, n_tasks, n_context=n_context,
                                 stream=PICTURE_STREAM)


def prediction_figure(model, cfg: ExperimentConfig, n_tasks: int = 3, n_context: int = 8,
                      seed=None):
    """In-context predictions of a Keras model on unseen 1-D tasks of its training
    distribution (TensorBoard, main job); a model of width D > 1 reads them padded to D.
    A bar-head model's 90% central interval is shaded."""
    task = dataclasses.replace(unseen_task_config(cfg.task), n_points=n_context + 200,
                               max_context=None, min_context=0, **fixed_width(1))
    b = picture_tasks(task, cfg.train.seed if seed is None else seed, n_tasks, n_context)
    inputs = dict(model_inputs(b), x=tf.constant(pad_features(b["x"].numpy(), cfg.task.x_dim)))
    out = model(inputs, training=False)
    pred = point_prediction(out).numpy()
    ctx = b["is_query"].numpy() < 0.5  # (T, N): every task has n_context of them
    at_queries = lambda v: np.stack([v[i, ~ctx[i]] for i in range(n_tasks)])  # (T, Nq, .)
    bars, band = bar_distribution(model), None
    if bars is not None:
        q = Predictive(bars, out).quantiles([0.05, 0.95]).numpy()  # (T, N, dy, 2)
        band = (at_queries(q[..., 0]), at_queries(q[..., 1]))
    return fits_figure(b["x"].numpy(), b["y"].numpy(), ctx, {"model": at_queries(pred)},
                       [f"unseen task {i}, {n_context} context points" for i in range(n_tasks)],
                       band=band)


def write_outputs(results: dict, out: str, predict_fn, cfg, suites, logdir=None,
                  dist_fn=None) -> None:
    """results.json, results.md, PNG plots and (with logdir) TensorBoard summaries."""
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))
        for metric in DIST_METRICS if has_distributions(results) else ():
            f.write("\n\n" + markdown(results, metric))
    plot_mse_vs_k(results, os.path.join(out, "mse_vs_k.png"))
    pictures = []
    if plot_calibration(results, os.path.join(out, "calibration.png")):
        pictures.append(os.path.join(out, "calibration.png"))
    if plot_garg_by_width(results, os.path.join(out, "garg_by_width.png")):
        pictures.append(os.path.join(out, "garg_by_width.png"))
    if cfg.task.x_dim_min == 1:  # pictures of the 1-D suites
        for s in suites:
            if s.name in ("sine", "linear", "gp_rbf_l0.5", "random_mlp"):
                p = os.path.join(out, f"fits_{s.name}.png")
                plot_fits(predict_fn, cfg, s, results, p, dist_fn=dist_fn)
                pictures.append(p)
    if logdir:
        _to_tensorboard(results, [os.path.join(out, "mse_vs_k.png")] + pictures, logdir)


def _to_tensorboard(results, pictures, logdir):
    w = tf.summary.create_file_writer(logdir)
    with w.as_default():
        for name, s in results["suites"].items():
            for meth, row in s["methods"].items():
                for k, v in row.items():
                    tf.summary.scalar(f"eval/{name}/{meth}", v["mse"], step=int(k))
        for p in pictures:
            img = tf.image.decode_png(tf.io.read_file(p), channels=4)[None]
            tf.summary.image(os.path.basename(p)[:-4], img, step=0)
    w.flush()


def run_cli(a, ks) -> int:
    """gpicl-eval after its flags are parsed (gpicl_tf.cli.eval_parser)."""
    from gpicl_tf.export import load_config, resolve_version

    version_dir = resolve_version(a.model, a.version)
    cfg = load_config(version_dir)
    suites = default_suites(cfg)
    if a.suites != "all":
        known = {s.name: s for s in suites}
        names = [n for n in a.suites.split(",") if n]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"--suites {unknown or a.suites!r}: unknown; expected some of "
                             f"{sorted(known)}")
        suites = [known[n] for n in names]
    ks = ks or [k for k in DEFAULT_KS if k <= cfg.task.context_max]
    baselines = ([b for b in a.baselines.split(",") if b] if a.baselines is not None
                 else list(DEFAULT_BASELINES))
    check_request(cfg, suites, ks, baselines)
    predict_fn = saved_model_predict_fn(version_dir)
    dist_fn = saved_model_dist_fn(version_dir)
    results = evaluate(predict_fn, cfg, suites, ks, baselines, a.tasks, a.queries,
                       dist_fn=dist_fn, task_points=a.task_points, jobs=a.jobs)
    results["model"] = os.path.abspath(version_dir)
    write_outputs(results, a.out, predict_fn, cfg, suites, a.logdir, dist_fn)
    print(markdown(results))
    extra = ""
    if has_distributions(results):
        print("\n\n".join(markdown(results, m) for m in DIST_METRICS))
        extra = ", calibration.png"
    print(f"wrote {a.out}/results.json, results.md, mse_vs_k.png{extra}")
    return 0


def main(argv=None) -> int:
    """gpicl-eval (see gpicl_tf.cli)."""
    from gpicl_tf.cli import eval_main

    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
