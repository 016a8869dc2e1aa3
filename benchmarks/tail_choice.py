"""The bar head's tails on a trained run: its unseen-task loss under each.

    python benchmarks/tail_choice.py --logdir runs/gpicl [--indices 2.2,2.5,3,4,6,10]

Restores the run's last checkpoint (weights and recalibration maps), runs the model once on
the run's fixed batch of unseen tasks (the batch of the main job's "unseen-task loss"), and
prints, for half-normal tails (model.bar_tail=normal) and for Pareto tails of each index
(model.bar_tail=pareto, model.bar_tail_index): the loss (the queries' mean NLL in the head's
units, the training loss), its worst task's NLL per query, and the loss without that task.
No gradient depends on the tail (gpicl_tf.layers.BarHead), so the same weights serve every
row; the maps are the checkpoint's, fitted under the run's own tail. The batch is drawn
from the training prior, so choosing an index by it leaves the evaluation suites unseen.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def per_task_nll(y, out, is_query, bars):
    """Each task's summed query NLL and its query count [B], [B] (losses.query_nll_and_count
    per task)."""
    from gpicl_tf.losses import query_nll_and_count

    sums, counts = [], []
    for i in range(int(y.shape[0])):
        s, c = query_nll_and_count(y[i:i + 1], {k: v[i:i + 1] for k, v in out.items()},
                                   is_query[i:i + 1], bars)
        sums.append(float(s))
        counts.append(float(c))
    return np.array(sums), np.array(counts)


def tail_rows(model, batch, indices) -> list:
    """[(tail, index, loss, worst task, its NLL per query, loss without it)] for the
    half-normal tails and Pareto tails of each index, on one run of the model on batch."""
    from gpicl_tf import evaluate
    from gpicl_tf.distributions import BarDistribution

    out = model(evaluate.model_inputs(batch), training=False)
    borders = model.get_layer("bar").borders
    rows = []
    for tail, index in [("normal", 3.0)] + [("pareto", float(a)) for a in indices]:
        bars = BarDistribution(borders, tail=tail, tail_index=index)
        s, c = per_task_nll(batch["y"], out, batch["is_query"], bars)
        worst = int(np.argmax(s / np.maximum(c, 1)))
        keep = np.arange(len(s)) != worst
        rows.append((tail, index if tail == "pareto" else None, s.sum() / c.sum(), worst,
                     s[worst] / max(c[worst], 1), s[keep].sum() / c[keep].sum()))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", required=True, help="a finished run's folder (config.json, "
                   "checkpoints/) of a bar-head model")
    p.add_argument("--indices", default="2.2,2.5,3,4,6,10",
                   help="comma-separated Pareto tail indices, each above 2")
    a = p.parse_args(argv)
    try:
        indices = [float(v) for v in a.indices.split(",") if v.strip()]
    except ValueError:
        indices = []
    if not indices or min(indices) <= 2:
        p.error(f"--indices {a.indices!r} is invalid: expected numbers above 2, comma-separated")

    from benchmarks.common import restore_bar_run

    cfg, trainer, step = restore_bar_run(p, a.logdir)
    rows = tail_rows(trainer.model, trainer.eval_batch(), indices)
    print(f"run {a.logdir} at step {step} (its own tail: {cfg.model.bar_tail}"
          + (f", index {cfg.model.bar_tail_index:g}" if cfg.model.bar_tail == "pareto" else "")
          + f"); unseen-task batch of {cfg.train.eval_tasks} tasks")
    print("| tails | unseen-task loss | worst task | its NLL per query | loss without it |")
    print("|---|---:|---:|---:|---:|")
    for tail, index, loss, worst, nll, rest in rows:
        name = "half-normal" if tail == "normal" else f"Pareto, index {index:g}"
        print(f"| {name} | {loss:.4f} | {worst} | {nll:.1f} | {rest:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
