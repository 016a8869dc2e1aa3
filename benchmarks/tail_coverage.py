"""Where a trained bar head's central intervals miss, by context size: inner bins or tails.

    python benchmarks/tail_coverage.py --logdir runs/gpicl [--ks 2,4,8] [--tasks 768]

Restores the run's last checkpoint (weights and recalibration maps) and, for tasks of its
training prior at each context size k (a stream of their own, seeded), prints the coverage
of the 50% and 90% central intervals of the queries (their PITs under the head's
distribution), the share of queries beyond the outer borders (in the tails) and the share
of queries whose 5% (95%) quantile lies inside the lower (upper) tail bin. The
recalibration maps (model.recalibrate) reweight the inner bins whole and, since the commit
that maps the CDF inside the outer bins, warp the tails' shapes too: before it a quantile
inside a tail bin was placed only as well as the tail's own shape did, and where most
quantiles lay there (k = 2) the intervals could not cover what they claimed.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

STREAM = 0x7C0F  # a task stream of its own: not training's, evaluation's or the maps'


def coverage_row(model, cfg, k: int, n_tasks: int) -> dict:
    """The coverage and tail shares of one context size k over n_tasks prior tasks."""
    import tensorflow as tf

    from gpicl_tf import data as data_lib
    from gpicl_tf.layers import unit_scale
    from gpicl_tf.model import Predictive, bar_distribution, model_inputs

    bars = bar_distribution(model)
    borders = model.get_layer("bar").borders.numpy()
    sampler = data_lib.TaskSampler(cfg.task, cfg.train.seed, STREAM)
    per_block = cfg.task.block_size
    pit, below, above, q05_tail, q95_tail = [], [], [], [], []
    for i in range(-(-n_tasks // per_block)):
        b = sampler.block(0, i, per_block, k)
        out = model(model_inputs(b), training=False)
        q = b["is_query"].numpy() > 0.5
        pit.append(Predictive(bars, out).cdf(b["y"]).numpy()[..., 0][q])
        z = ((b["y"] - out["y_loc"]) / unit_scale(out["y_scale"])).numpy()[..., 0][q]
        below.append(z < borders[1])
        above.append(z > borders[-2])
        p = tf.nn.softmax(out["logits"], -1).numpy()[:, :, 0, :][q]
        q05_tail.append(p[:, 0] > 0.05)
        q95_tail.append(p[:, -1] > 0.05)
    pit = np.concatenate(pit)
    share = lambda parts: float(np.mean(np.concatenate(parts)))  # noqa: E731
    return {"k": k, "queries": len(pit),
            "cover90": float(np.mean((pit > 0.05) & (pit < 0.95))),
            "cover50": float(np.mean((pit > 0.25) & (pit < 0.75))),
            "below": share(below), "above": share(above),
            "q05_in_tail": share(q05_tail), "q95_in_tail": share(q95_tail)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", required=True, help="a finished run's folder (config.json, "
                   "checkpoints/) of a bar-head model")
    p.add_argument("--ks", default="2,4,8", help="comma-separated context sizes")
    p.add_argument("--tasks", type=int, default=768, help="tasks per context size")
    a = p.parse_args(argv)
    try:
        ks = [int(v) for v in a.ks.split(",") if v.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        p.error(f"--ks {a.ks!r} is invalid: expected whole numbers >= 1, comma-separated")
    if a.tasks < 1:
        p.error(f"--tasks {a.tasks}: expected a whole number >= 1")

    from benchmarks.common import restore_bar_run

    cfg, trainer, _ = restore_bar_run(p, a.logdir)
    if max(ks) >= cfg.task.n_points:
        p.error(f"--ks reaches {max(ks)}: the run's tasks have {cfg.task.n_points} points, "
                f"so at most k = {cfg.task.n_points - 1}")
    print(f"run {a.logdir} (tail {cfg.model.bar_tail}, recalibrated: "
          f"{cfg.model.recalibrate}); {a.tasks} tasks of its training prior per k")
    print("| k | queries | cover90 | cover50 | beyond lower border | beyond upper border | "
          "5% quantile in the lower tail bin | 95% quantile in the upper tail bin |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        r = coverage_row(trainer.model, cfg, k, a.tasks)
        print(f"| {k} | {r['queries']} | {r['cover90']:.4f} | {r['cover50']:.4f} | "
              f"{r['below']:.4f} | {r['above']:.4f} | {r['q05_in_tail']:.3f} | "
              f"{r['q95_in_tail']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
