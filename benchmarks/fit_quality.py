"""How good is each fit a token carries, on its own? Normalised MSE at the queries of the
ridge and RBF-kernel fits (model.ridge_penalties, model.kernel_length_scales) on the tasks
of gpicl-eval's suites, and of the base fit that each model.base_fit rule picks per task
(default: "loo_best", the fit with the least leave-one-out error on the context, and the
preset's own rule), beside the model's and the best
per-task learner's from a results file of the same tasks: whether the model's misses come
from the fits or from how it uses them.

    python benchmarks/fit_quality.py --results docs/results/default_1d_eval.json \
        docs/results/default_garg_d2_d4_eval.json docs/results/default_garg_d8_eval.json \
        [--scales 0.15,0.4,1.0] [--noise 0.01 | --noises 1e-4,1e-4,0.01] \
        [--suites sine,polynomial,...] [--base-fits loo_best,loo_evidence,loo_bma]

The tasks are gpicl-eval's (seed 20221208, 128 tasks per 1-D cell, 64 per Garg cell, 16
queries), drawn for the `default` preset's widths. Normalisation divides by the variance
of each task's y over its context and queries, close to (not exactly) gpicl-eval's.
"""

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gpicl_tf.config import BASE_FITS, get_preset  # noqa: E402
from gpicl_tf.evaluate import context_batch, default_suites, pad_features  # noqa: E402
from gpicl_tf.layers import ContextStandardizer  # noqa: E402
from gpicl_tf.model import standardizer_kwargs  # noqa: E402

SUITES = ("random_mlp,sine,polynomial,gp_rbf_l0.1,gp_rbf_l0.5,shift_noisy,"
          "garg_linear_d2_noisy,garg_linear_d4_noisy,garg_linear_d8_noisy,garg_tree_d4")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--scales", default=None, help="kernel length scales (default: the preset's)")
    p.add_argument("--noise", type=float, default=None, help="kernel noise (default: the preset's)")
    p.add_argument("--noises", default=None,
                   help="one kernel noise per length scale (model.kernel_noises), instead of "
                        "--noise")
    p.add_argument("--suites", default=SUITES)
    p.add_argument("--ks", default="16,32")
    p.add_argument("--base-fits", default=None,
                   help="comma-separated model.base_fit rules whose pick is scored in the last "
                        "columns (default: loo_best and the preset's)")
    a = p.parse_args(argv)
    cfg = get_preset("default")
    m = cfg.model
    base_fits = (a.base_fits.split(",") if a.base_fits
                 else list(dict.fromkeys(["loo_best", m.base_fit])))
    bad = [b for b in base_fits if b not in BASE_FITS or b == "none"]
    if bad:
        p.error(f"--base-fits {a.base_fits}: {bad[0]!r} is not a base fit; expected some of "
                f"{[b for b in BASE_FITS if b != 'none']}")
    scales = (tuple(float(v) for v in a.scales.split(",")) if a.scales
              else m.kernel_length_scales)
    noise = m.kernel_noise if a.noise is None else a.noise
    # the preset's noise per scale unless --scales or --noise replaced its fits
    noises = (tuple(float(v) for v in a.noises.split(",")) if a.noises
              else () if a.scales or a.noise is not None else m.kernel_noises)
    try:  # the model config checks the scales and noises (one noise per scale)
        m = dataclasses.replace(m, kernel_length_scales=scales, kernel_noise=noise,
                                kernel_noises=noises)
    except ValueError as e:
        p.error(str(e))
    fit_kw = {**standardizer_kwargs(m), "absent_features": m.absent_features}
    # the fits alone, the last features (their unit is irrelevant here: "loo" needs a base
    # fit; the kernel fits' stds would come after them)
    layer = ContextStandardizer(**{**fit_kw, "base_fit": "none", "y_scale": "std",
                                   "kernel_std": False})
    based = [ContextStandardizer(**{**fit_kw, "base_fit": b}) for b in base_fits]
    results = {}
    for path in a.results:
        with open(path) as f:
            results.update(json.load(f)["suites"])
    names = [f"ridge {v:g}" for v in m.ridge_penalties] + [
        f"rbf {v:g}" + (f" n{w:g}" if noises else "") for v, w in zip(scales, noises or scales)]
    cols = names + [f"base {b}" for b in base_fits]
    wanted = a.suites.split(",")
    print(f"kernel noise {', '.join(f'{v:g}' for v in noises) if noises else f'{noise:g}'}; "
          "normalised MSE at the queries")
    print("| suite | k | model | best per-task learner | " + " | ".join(cols) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(cols))
    for s in (s for s in default_suites(cfg) if s.name in wanted):
        methods = results[s.name]["methods"]
        for k in (int(v) for v in a.ks.split(",")):
            n_tasks = results[s.name]["methods"]["model"][str(k)]["n_tasks"]
            x, y, q = context_batch(cfg, k, n_tasks, 16, 20221208, family=s.family,
                                    **s.overrides)
            xp = pad_features(x, cfg.task.x_dim)
            feats, loc, scale = (t.numpy() for t in layer(xp, y, q))
            fits = feats[:, k:, -len(names):] * scale[:, :, :1] + loc[:, :, :1]
            bases = [v(xp, y, q)[1].numpy()[:, k:, :1] for v in based]  # loc + scale x fit
            fits = np.concatenate([fits] + bases, axis=-1)
            var = np.var(y[:, :, 0], axis=1)
            nmse = [np.mean(np.mean((fits[..., i] - y[:, k:, 0]) ** 2, axis=1) / var)
                    for i in range(len(cols))]
            best = min(v[str(k)]["nmse"] for n, v in methods.items()
                       if n not in ("model", "bayes_optimal"))
            print(f"| {s.name} | {k} | {methods['model'][str(k)]['nmse']:.3g} | {best:.3g} | "
                  + " | ".join(f"{v:.3g}" for v in nmse) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
