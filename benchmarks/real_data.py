"""The shipped models on real data that scikit-learn ships (offline), against the
scikit-learn learners a user would pick, every method on the same splits (paired).

    python benchmarks/real_data.py --out docs/results/real_data.json --plot docs/real_data.png

Regression (R^2 on every row outside the context):
  - diabetes: 442 rows, 10 features; contexts of 32, 64, 128 and 256 rows; also at 64
    rows on random feature subsets of widths 2 and 5 (inputs narrower than D);
  - wine_alcohol: wine's alcohol content from its 12 other features (178 rows).
  Baselines: ridge (RidgeCV), GP regression (RBF + noise, by marginal likelihood; `gp`)
  and with one length scale per feature (`gp_ard`), gradient-boosted trees, random
  forest, k-NN (k by leave-one-out); inputs
  standardised on the context, as a scikit-learn pipeline would.
Classification (accuracy, log loss): iris, wine, breast_cancer, digits; contexts of
  32, 64 and 128 rows drawn stratified; a dataset wider than the model's D is reduced
  to D features by PCA fitted on the context (for every method). Baselines: logistic
  regression, k-NN, random forest, gradient-boosted trees.
The shipped regressor reads at most 127 context rows: at 256 rows each query gets its
127 nearest rows (the estimator's default, context_strategy="nearest"), and the
`subsets` strategy (a mixture over 8 random subsets) is scored beside it. `gpicl_x4` is
the estimator with n_permutations=4 (an ensemble over 4 orders of the columns);
`gpicl_nobase` the regressor with linear_base="none" (the model on the context as given;
the default, "auto", may let it read a ridge fit's residuals, chosen by cross-validation);
`gpicl_x8` the classifier with n_permutations=8 (8 members: column orders and class
ids, probabilities averaged).

Prints a markdown table per task and the target cells (diabetes at 64 and 256 rows:
the regressor's R^2 within 0.02 of the best baseline).
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REG_BASELINES = ("ridge", "gp", "gp_ard", "gbt", "random_forest", "knn")
CLS_BASELINES = ("logreg", "knn", "random_forest", "gbt")


def regression_sets():
    from sklearn.datasets import load_diabetes, load_wine

    X, y = load_diabetes(return_X_y=True)
    w = load_wine().data  # column 0 is alcohol
    return {"diabetes": (X, y), "wine_alcohol": (w[:, 1:], w[:, 0])}


def classification_sets():
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

    return {n: f(return_X_y=True) for n, f in (
        ("iris", load_iris), ("wine", load_wine), ("breast_cancer", load_breast_cancer),
        ("digits", load_digits))}


def _standardise(cx, qx):
    """Both on the context's per-column mean and std, as the estimator standardises."""
    from gpicl_tf.estimator import _loc_scale

    loc, scale = _loc_scale(cx)
    return (cx - loc) / scale, (qx - loc) / scale


def reg_baseline(name, cx, cy, qx):
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import RidgeCV

    from gpicl_tf import baselines

    cx, qx = _standardise(cx, qx)
    loc, scale = cy.mean(), cy.std() or 1.0
    cys = (cy - loc) / scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "ridge":
            pred = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(cx, cys).predict(qx)
        elif name == "gp":
            pred = baselines.gp_regression(cx, cys[:, None], qx)[:, 0]
        elif name == "gp_ard":
            pred = baselines.gp_ard(cx, cys[:, None], qx)[:, 0]
        elif name == "gbt":
            pred = GradientBoostingRegressor(random_state=0).fit(cx, cys).predict(qx)
        elif name == "random_forest":
            pred = RandomForestRegressor(100, random_state=0).fit(cx, cys).predict(qx)
        elif name == "knn":
            pred = baselines.knn(cx, cys[:, None], qx)[:, 0]
        else:
            raise ValueError(name)
    return pred * scale + loc


def r2(pred, y):
    return float(1.0 - np.mean((pred - y) ** 2) / np.var(y))


def regression(model, splits: int, out: dict) -> None:
    from gpicl_tf import InContextRegressor

    nearest = InContextRegressor(model)
    nobase = InContextRegressor(model, linear_base="none")
    ensemble = InContextRegressor(model, n_permutations=4)
    subsets = InContextRegressor(model, context_strategy="subsets")
    cfg = nearest._backend().cfg
    D, limit = cfg.task.x_dim, cfg.task.context_max
    cells = [("diabetes", n, None) for n in (32, 64, 128, 256)]
    cells += [("diabetes", 64, w) for w in (2, 5)]
    cells += [("wine_alcohol", n, None) for n in (32, 64, 128)]
    data = regression_sets()
    for name, n, width in cells:
        X, y = data[name]
        if width is None and X.shape[1] > D:
            raise SystemExit(f"{name} has {X.shape[1]} features: the model reads {D}")
        key = f"{name} n={n}" + (f" width={width}" if width else "")
        scores = {}
        for s in range(splits):
            rng = np.random.default_rng(1000 * s + n)
            order = rng.permutation(len(X))
            cols = np.sort(rng.choice(X.shape[1], width, replace=False)) if width else \
                np.arange(X.shape[1])
            c, q = order[:n], order[n:]
            cx, cy, qx, qy = X[c][:, cols], y[c], X[q][:, cols], y[q]
            preds = {"gpicl": nearest.fit(cx, cy).predict(qx),
                     "gpicl_x4": ensemble.fit(cx, cy).predict(qx),
                     "gpicl_nobase": nobase.fit(cx, cy).predict(qx)}
            if n > limit:
                preds["gpicl_subsets"] = subsets.fit(cx, cy).predict(qx)
            for b in REG_BASELINES:
                preds[b] = reg_baseline(b, cx, cy, qx)
            for m, p in preds.items():
                scores.setdefault(m, []).append(r2(p, qy))
        out[key] = summarise(scores)
        print(table(key, out[key], "R^2"), flush=True)


def cls_baseline(name, cx, cy, qx, n_classes):
    from gpicl_tf.evaluate_classification import baseline_proba

    cx, qx = _standardise(cx, qx)
    return baseline_proba(name, cx, cy, qx, n_classes)


def stratified(rng, y, n):
    """n row indices covering every class (at least one row each), then at random."""
    classes = np.unique(y)
    first = [rng.choice(np.flatnonzero(y == c)) for c in classes]
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), first))[:n - len(first)]
    return np.concatenate([first, rest])


def classification(model, splits: int, out: dict) -> None:
    from sklearn.decomposition import PCA

    from gpicl_tf import InContextClassifier
    from gpicl_tf.evaluate_classification import scores as cls_scores

    clf = InContextClassifier(model)
    ens = InContextClassifier(model, n_permutations=8)
    D = clf._backend().cfg.task.x_dim
    for name, (X, y) in classification_sets().items():
        n_classes = len(np.unique(y))
        for n in (32, 64, 128):
            key = f"{name} n={n}"
            acc, ll = {}, {}
            for s in range(splits):
                rng = np.random.default_rng(1000 * s + n)
                c = stratified(rng, y, n)
                q = np.setdiff1d(np.arange(len(y)), c)
                cx, cy, qx, qy = X[c], y[c], X[q], y[q]
                if X.shape[1] > D:  # reduced on the context, for every method alike
                    pca = PCA(D, random_state=0).fit(cx)
                    cx, qx = pca.transform(cx), pca.transform(qx)
                probas = {"gpicl": clf.fit(cx, cy).predict_proba(qx),
                          "gpicl_x8": ens.fit(cx, cy).predict_proba(qx)}
                for b in CLS_BASELINES:
                    probas[b] = cls_baseline(b, cx, cy, qx, n_classes)
                for m, p in probas.items():
                    if m.startswith("gpicl"):  # columns of the classes seen: all of them
                        full = np.zeros((len(qx), n_classes))
                        full[:, clf.classes_] = p
                        p = full
                    sc = cls_scores(p, qy)
                    acc.setdefault(m, []).append(sc["accuracy"])
                    ll.setdefault(m, []).append(sc["log_loss"])
            out[key] = {"accuracy": summarise(acc), "log_loss": summarise(ll)}
            print(table(key, out[key]["accuracy"], "accuracy"), flush=True)


def summarise(scores: dict) -> dict:
    return {m: {"mean": float(np.mean(v)), "se": float(np.std(v) / np.sqrt(len(v))),
                "per_split": [round(x, 5) for x in v]} for m, v in scores.items()}


def table(key, cell, metric) -> str:
    rows = sorted(cell.items(), key=lambda kv: -kv[1]["mean"])
    return "\n".join([f"\n{key} ({metric}, mean ± s.e. over splits)"]
                     + [f"  {m:15s} {v['mean']:.4f} ± {v['se']:.4f}" for m, v in rows])


def best_baseline(cell: dict, names) -> tuple:
    b = max(names, key=lambda m: cell[m]["mean"])
    return b, cell[b]["mean"]


def markdown(results: dict) -> str:
    lines = ["| task | context rows | shipped model | 4 column orders | no linear base | "
             + " | ".join(REG_BASELINES) + " |",
             "|---|---|---|---|---|" + "---|" * len(REG_BASELINES)]
    for key, cell in results["regression"].items():
        name, rest = key.split(" ", 1)
        model = cell["gpicl"]["mean"]
        alt = f" (subsets {cell['gpicl_subsets']['mean']:.3f})" if "gpicl_subsets" in cell \
            else ""
        lines.append(f"| {name} (R^2) | {rest.replace('n=', '')} | {model:.3f}{alt} | "
                     f"{cell['gpicl_x4']['mean']:.3f} | {cell['gpicl_nobase']['mean']:.3f} | "
                     + " | ".join(f"{cell[b]['mean']:.3f}" for b in REG_BASELINES) + " |")
    lines += ["", "| task | context rows | shipped model | 8 members | "
              + " | ".join(CLS_BASELINES) + " |", "|---|---|---|---|" + "---|" * len(CLS_BASELINES)]
    for key, cell in results["classification"].items():
        name, rest = key.split(" ", 1)
        acc = cell["accuracy"]
        lines.append(f"| {name} (accuracy) | {rest.replace('n=', '')} | "
                     f"{acc['gpicl']['mean']:.3f} | "
                     + " | ".join(f"{acc[b]['mean']:.3f}" for b in ("gpicl_x8", *CLS_BASELINES))
                     + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("diabetes", "regression", None, "R^2"), ("wine_alcohol", "regression", None,
                                                       "R^2")]
    panels += [(n, "classification", "accuracy", "accuracy")
               for n in ("iris", "wine", "breast_cancer", "digits")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (name, kind, metric, label) in zip(axes.ravel(), panels):
        cells = {int(k.split("n=")[1]): (v[metric] if metric else v)
                 for k, v in results[kind].items()
                 if k.startswith(name + " ") and "width" not in k}
        ns = sorted(cells)
        for m in cells[ns[0]]:
            have = [n for n in ns if m in cells[n]]
            ys = [cells[n][m]["mean"] for n in have]
            es = [cells[n][m]["se"] for n in have]
            style = dict(lw=2.5, color="k") if m.startswith("gpicl") else dict(lw=1.2)
            ls = {"gpicl_subsets": "--", "gpicl_x4": ":", "gpicl_x8": ":",
                  "gpicl_nobase": "-."}.get(m, "-")
            ax.errorbar(have, ys, es, marker="o", label=m, capsize=2, ls=ls, **style)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("context rows")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Shipped models on real data (scikit-learn's datasets), paired splits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regressor", default=None,
                   help="regression export (default: the shipped regressor)")
    p.add_argument("--classifier", default=None,
                   help="classification export (default: the shipped classifier)")
    p.add_argument("--splits", type=int, default=20, help="random splits per cell")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--plot", default=None, help="figure (PNG)")
    p.add_argument("--skip", choices=["regression", "classification"], default=None)
    args = p.parse_args(argv)
    from gpicl_tf.cli import quiet_tensorflow

    quiet_tensorflow()
    t0 = time.time()
    results = {"command": "python benchmarks/real_data.py " + " ".join(argv or sys.argv[1:]),
               "splits": args.splits, "regression": {}, "classification": {}}
    if args.skip != "regression":
        regression(args.regressor, args.splits, results["regression"])
    if args.skip != "classification":
        classification(args.classifier, args.splits, results["classification"])
    results["seconds"] = round(time.time() - t0, 1)
    print("\n" + markdown(results))
    for n in (64, 256):
        cell = results["regression"].get(f"diabetes n={n}")
        if cell:
            b, v = best_baseline(cell, REG_BASELINES)
            for m in ("gpicl", "gpicl_x4", "gpicl_nobase"):
                gap = cell[m]["mean"] - v
                print(f"target: diabetes n={n}: {m} R^2 {cell[m]['mean']:.4f}, best baseline "
                      f"{b} {v:.4f}, gap {gap:+.4f} (target >= -0.02: "
                      f"{'met' if gap >= -0.02 else 'missed'})")
    if args.out:
        from gpicl_tf.files import write_atomic

        write_atomic(args.out, json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    print(f"\n{results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
