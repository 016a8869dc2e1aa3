"""Transfer of an in-context classifier to datasets it never trained on (issue 6/7): the
paper's Table 1, offline.

    gpicl-eval --model exports/gpicl-classify --out reports/gpicl-classify \
        [--datasets iris,wine,breast_cancer,digits_test] [--data-dir ~/tensorflow_datasets]

Datasets: scikit-learn's bundled iris, wine and breast_cancer, the `test` split of the
digits (the classifier trains on the `train` split), and with --data-dir any prepared
tensorflow-datasets image dataset (mnist, fashion_mnist, kmnist, cifar10, svhn_cropped:
the paper's table). Each dataset's features are standardised over the whole dataset.

A task, as in the paper: a random projection of the features to the model's width D
(entries N(0, 1/d)) where the dataset is wider than D, a random permutation of the
labels, k context examples per class and --queries query examples drawn from the
rest (a dataset with more classes than the model knows keeps a random subset of them).
Every method sees the same tasks (paired): the model through its export's
serving_default (with --n-permutations K also `model_xK`, the estimator's ensemble of K
members: random column orders and class-id assignments, probabilities averaged), and
per-task learners fitted on the same context: `sgd` (the paper's
baseline: logistic regression trained by SGD on the context), `logreg`, `knn`,
`random_forest`, `gbt`. Accuracy and log loss at each k in --ks (examples per class;
a k whose context exceeds the model's limit is skipped, and said).

Output in --out: results.json, results.md (the paper's layout: a row per method, a
column per dataset, one table per k and metric) and transfer.png (accuracy against k,
a panel per dataset).
"""

from __future__ import annotations

import functools
import json
import os
import time
import zlib

import numpy as np

from gpicl_tf.baselines import classifier_proba, per_task, task_pool
from gpicl_tf.files import write_atomic
from gpicl_tf.progress import progress_bar
from gpicl_tf.summaries import pyplot

SKLEARN_DATASETS = ("iris", "wine", "breast_cancer")
OFFLINE = SKLEARN_DATASETS + ("digits_test",)
DEFAULT_KS = (1, 5, 10, 25)
BASELINES = ("sgd", "logreg", "knn", "random_forest", "gbt")
SEED = 20221209


def load_dataset(name: str, data_dir=None):
    """(x [M, d] float64 standardised per feature, labels [M] int) of a transfer dataset."""
    if name in SKLEARN_DATASETS:
        import sklearn.datasets

        x, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    elif name == "digits_test":
        from gpicl_tf.datasets import load_base

        x, y = load_base("digits", data_dir or "~/tensorflow_datasets", "test")
    else:
        from gpicl_tf.datasets import TFDS_IMAGE_DATASETS, load_base

        if name not in TFDS_IMAGE_DATASETS:
            raise ValueError(f"--datasets {name!r} is unknown: expected some of "
                             f"{OFFLINE + TFDS_IMAGE_DATASETS}")
        if data_dir is None:
            raise ValueError(f"--datasets {name}: expected --data-dir, a folder where the "
                             "tensorflow-datasets dataset is prepared (no download here)")
        x, y = load_base(name, data_dir, "test")
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    sd = x.std(0)
    x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    return x, np.asarray(y).astype(np.int64)


def make_tasks(x, labels, width: int, n_classes_max: int, k: int, n_queries: int,
               n_tasks: int, seed: int):
    """n_tasks tasks: lists of (cx [k c, d'], cy [k c], qx [q, d'], qy [q]) with labels
    0..c-1 randomly assigned, d' = min(d, width) (a random projection when d > width)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    out = []
    for _ in range(n_tasks):
        chosen = rng.permutation(classes)[:min(len(classes), n_classes_max)]
        ctx, qry = [], []
        for j, c in enumerate(chosen):
            idx = rng.permutation(by_class[c])
            ctx += [(i, j) for i in idx[:k]]
            qry += [(i, j) for i in idx[k:]]
        qry = [qry[i] for i in rng.choice(len(qry), min(n_queries, len(qry)), replace=False)]
        ctx = [ctx[i] for i in rng.permutation(len(ctx))]
        xt = x
        if x.shape[1] > width:
            proj = rng.normal(0.0, x.shape[1] ** -0.5, (x.shape[1], width))
            xt = x @ proj
        ci, cj = np.array(ctx).T
        qi, qj = np.array(qry).T
        out.append((xt[ci], cj, xt[qi], qj))
    return out


def scores(proba, qy) -> dict:
    """Accuracy and log loss (probabilities clipped at 1e-7) of one task."""
    p = np.clip(proba[np.arange(len(qy)), qy], 1e-7, 1.0)
    return {"accuracy": float(np.mean(np.argmax(proba, 1) == qy)),
            "log_loss": float(-np.mean(np.log(p)))}


def saved_model_classify_fn(version_dir: str):
    """classify(cx [B, n, d'], cy [B, n], qx [B, q, d']) -> probabilities [B, q, C] through
    the export's serving_default (inputs padded to the model's width by the graph)."""
    import tensorflow as tf

    from gpicl_tf.export import load_signature

    sig = load_signature(version_dir)

    def classify(cx, cy, qx):
        out = sig(context_x=tf.constant(cx, tf.float32), context_y=tf.constant(cy, tf.int64),
                  query_x=tf.constant(qx, tf.float32))
        return out["probabilities"].numpy().astype(np.float64)

    return classify


def keras_classify_fn(model, cfg):
    """classify(cx [B, n, d'], cy [B, n], qx [B, q, d']) -> probabilities [B, q, C] through
    the Keras model (inputs padded)."""
    import tensorflow as tf

    from gpicl_tf.evaluate import pad_features
    from gpicl_tf.export import class_probabilities
    from gpicl_tf.model import masked_inputs

    def classify(cx, cy, qx):
        onehot = tf.one_hot(cy, cfg.task.y_dim)
        logits = model(masked_inputs(pad_features(cx, cfg.task.x_dim), onehot,
                                     pad_features(qx, cfg.task.x_dim)), training=False)
        p = class_probabilities(logits[:, cx.shape[1]:], onehot)
        return p.numpy().astype(np.float64)

    return classify


def short_report(classify, cfg, out: str, jobs: int = 1) -> dict:
    """The main job's report for a classifier: the offline datasets at 1, 5 and 10 examples
    per class against the paper's SGD, logistic regression and k-NN (16 tasks each; the
    baselines fitted by `jobs` worker processes)."""
    results = evaluate(classify, cfg, OFFLINE, (1, 5, 10), ("sgd", "logreg", "knn"), 16, 64,
                       jobs=jobs)
    print(write_outputs(results, out))
    print(f"report: {out}/results.md, {out}/transfer.png")
    return results


def write_outputs(results: dict, out: str) -> str:
    """results.json, results.md and transfer.png in out; returns the Markdown."""
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    md = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    plot(results, os.path.join(out, "transfer.png"))
    return md


def evaluate(classify, cfg, datasets, ks=DEFAULT_KS, baselines=BASELINES, n_tasks: int = 32,
             n_queries: int = 64, seed: int = SEED, data_dir=None, progress: bool = True,
             n_permutations: int = 1, jobs: int = 1) -> dict:
    """Every dataset at every k: the model (and with n_permutations > 1 its ensemble,
    `model_x<n>`) and each baseline on the same tasks (the baselines' tasks fitted by
    `jobs` worker processes: gpicl_tf.baselines.task_pool)."""
    from gpicl_tf.estimator import ensemble_members, ensemble_proba

    width, c_max, limit = cfg.task.x_dim, cfg.task.y_dim, cfg.task.context_max
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"--baselines {b!r} is unknown: expected some of {BASELINES}")
    if not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"--n-permutations {n_permutations!r}: expected an integer >= 1")
    models = {"model": 1, **({f"model_x{n_permutations}": n_permutations}
                             if n_permutations > 1 else {})}
    data = {name: load_dataset(name, data_dir) for name in datasets}
    pool = task_pool(jobs, baselines)
    out = {"config": cfg.to_dict(), "n_tasks": n_tasks, "n_queries": n_queries, "seed": seed,
           "ks": list(ks), "datasets": {}}
    bar = progress_bar(len(datasets) * len(ks), progress, label="dataset x k")
    for name, (x, labels) in data.items():
        c = min(len(np.unique(labels)), c_max)
        entry = out["datasets"][name] = {"n_examples": len(x), "n_features": x.shape[1],
                                         "n_classes": c, "skipped": {}, "methods": {}}
        for k in ks:
            if bar is not None:
                bar.add(1)
            if k * c > limit:
                entry["skipped"][str(k)] = (f"{k} x {c} classes = {k * c} context points, "
                                            f"above the model's {limit}")
                continue
            task_seed = seed + 1000 * k + zlib.crc32(name.encode()) % 1000
            tasks = make_tasks(x, labels, width, c_max, k, n_queries, n_tasks, task_seed)
            for method in (*models, *baselines):
                if method in models:
                    tic = time.perf_counter()
                    rng = np.random.default_rng([task_seed, 1])  # the ensemble's members
                    probs = [ensemble_proba(classify, cx, cy, qx, ensemble_members(
                        rng, cx.shape[1], c_max, models[method]))[:, :c]
                        for cx, cy, qx, _ in tasks]
                    sec = (time.perf_counter() - tic) / len(tasks)
                else:
                    probs, sec = per_task(functools.partial(classifier_proba, method),
                                          [(cx, cy, qx, c) for cx, cy, qx, _ in tasks], pool)
                rows = [scores(p / p.sum(1, keepdims=True), qy)
                        for p, (_, _, _, qy) in zip(probs, tasks)]
                cell = {m: float(np.mean([r[m] for r in rows])) for m in ("accuracy", "log_loss")}
                acc = np.array([r["accuracy"] for r in rows])
                half = 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
                cell.update(accuracy_ci95=[cell["accuracy"] - half, cell["accuracy"] + half],
                            n_tasks=len(tasks), sec_per_task=sec)
                entry["methods"].setdefault(method, {})[str(k)] = cell
    return out


def markdown(results: dict) -> str:
    """The paper's Table 1 layout: a row per method, a column per dataset; a table per k
    and metric (accuracy in %, best in bold; log loss)."""
    names = list(results["datasets"])
    lines = [f"Transfer to unseen datasets: {results['n_tasks']} tasks per dataset and k, "
             f"{results['n_queries']} queries each, the same tasks for every method", ""]
    for metric, scale, better in (("accuracy", 100.0, max), ("log_loss", 1.0, min)):
        for k in results["ks"]:
            k = str(k)
            cols = [n for n in names if k in results["datasets"][n]["methods"].get("model", {})]
            if not cols:
                continue
            lines += [f"### {metric.replace('_', ' ')}, k = {k} per class", "",
                      "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            methods = results["datasets"][cols[0]]["methods"]
            best = {n: better(m[k][metric] for m in results["datasets"][n]["methods"].values())
                    for n in cols}
            for meth in methods:
                cells = []
                for n in cols:
                    v = results["datasets"][n]["methods"][meth][k][metric]
                    txt = f"{v * scale:.2f}" if scale != 1.0 else f"{v:.3f}"
                    cells.append(f"**{txt}**" if v == best[n] else txt)
                lines.append(f"| {meth} | " + " | ".join(cells) + " |")
            lines.append("")
    skipped = [f"{n} k={k}: {why}" for n in names
               for k, why in results["datasets"][n]["skipped"].items()]
    if skipped:
        lines += ["Skipped: " + "; ".join(skipped), ""]
    return "\n".join(lines)


STYLES = {"model": {"lw": 2.5, "color": "C3"}, "model_x": {"lw": 2.5, "color": "C3", "ls": ":"},
          "sgd": {"lw": 1.5, "color": "k", "ls": "--"},
          "logreg": {"lw": 1, "color": "C0"}, "knn": {"lw": 1, "color": "C2"},
          "random_forest": {"lw": 1, "color": "C4"}, "gbt": {"lw": 1, "color": "C1"}}


def plot(results: dict, path: str) -> None:
    """Accuracy against examples per class, a panel per dataset, every method."""
    plt = pyplot()
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    for ax, n in zip(axes[0], names):
        for meth, cells in results["datasets"][n]["methods"].items():
            ks = sorted(cells, key=int)
            ax.plot([int(k) for k in ks], [100 * cells[k]["accuracy"] for k in ks], marker="o",
                    ms=3, label=meth, **STYLES.get(meth.rstrip("0123456789"), {"lw": 1}))
        ax.set_xscale("log")
        ax.set_title(f"{n} ({results['datasets'][n]['n_classes']} classes)", fontsize=9)
        ax.set_xlabel("context examples per class", fontsize=8)
    axes[0][0].set_ylabel("accuracy (%)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_cli(a, ks) -> int:
    """gpicl-eval on a classification export (gpicl_tf.cli.eval_main)."""
    from gpicl_tf.export import load_config, resolve_version

    version_dir = resolve_version(a.model, a.version)
    cfg = load_config(version_dir)
    datasets = [d for d in (a.datasets or ",".join(OFFLINE)).split(",") if d]
    baselines = ([b for b in a.baselines.split(",") if b] if a.baselines is not None
                 else list(BASELINES))
    results = evaluate(saved_model_classify_fn(version_dir), cfg, datasets, ks or DEFAULT_KS,
                       baselines, a.tasks or 32, a.queries or 64, data_dir=a.data_dir,
                       n_permutations=a.n_permutations, jobs=a.jobs)
    results["model"] = os.path.abspath(version_dir)
    print(write_outputs(results, a.out))
    print(f"wrote {a.out}/results.json, results.md, transfer.png")
    return 0
