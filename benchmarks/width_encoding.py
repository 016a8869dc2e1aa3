"""How to tell the model which input features are absent: the choice of `model.absent_features`.

    python benchmarks/width_encoding.py [--preset default] [--steps 1200] \
        [--variants zero,flags,rescale,both] [--out docs/results/width_encoding.json]

Trains the preset once per variant, each for --steps on the same seeded task stream, then
scores every variant on the same unseen tasks (paired): tasks of the `prior` family at fixed
input widths d (padded to the model's width D) and k context points, normalised MSE.
Variants (gpicl_tf.layers.ContextStandardizer):
  zero     absent features are zero after standardisation, nothing more;
  flags    a presence flag per feature on every token;
  rescale  present features scaled by sqrt(D / d) (TabPFN);
  both     flags and rescaling.
Prints one row per variant and the ratio of each variant's mean to the best variant's.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gpicl_tf import evaluate  # noqa: E402
from gpicl_tf.config import ABSENT_FEATURES, apply_overrides, get_preset  # noqa: E402
from gpicl_tf.files import write_atomic  # noqa: E402
from gpicl_tf.train import Trainer  # noqa: E402


def score(model, cfg, widths, ks, n_tasks: int, seed: int) -> dict:
    """{f"d{d}_k{k}": normalised MSE} on unseen tasks of the `prior` family at width d
    (gpicl_tf.evaluate.evaluate, the model alone)."""
    suites = [evaluate.Suite(f"d{d}", "prior", evaluate.fixed_width(d)) for d in widths]
    res = evaluate.evaluate(evaluate.keras_predict_fn(model), cfg, suites, ks, baselines=(),
                            n_tasks=n_tasks, seed=seed, progress=False)["suites"]
    return {f"d{d}_k{k}": res[f"d{d}"]["methods"]["model"][str(k)]["nmse"]
            for d in widths for k in ks}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--variants", default=",".join(ABSENT_FEATURES))
    p.add_argument("--widths", default="1,2,4,8")
    p.add_argument("--ks", default="4,16,32")
    p.add_argument("--tasks", type=int, default=512)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    widths = [int(v) for v in a.widths.split(",")]
    ks = [int(v) for v in a.ks.split(",")]
    base = apply_overrides(get_preset(a.preset), a.set + [
        f"train.steps={a.steps}", f"train.eval_every={a.steps}",
        f"train.checkpoint_every={a.steps}"])
    widths = [d for d in widths if base.task.x_dim_min <= d <= base.task.x_dim]
    rows = {}
    for v in variants:
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, absent_features=v))
        tic = time.perf_counter()
        trainer = Trainer(cfg, tempfile.mkdtemp(prefix=f"width_{v}_"))
        result = trainer.train(verbose=False)
        sec = time.perf_counter() - tic
        cells = score(trainer.model, cfg, widths, ks, a.tasks, evaluate.EVAL_SEED)
        rows[v] = {"cells": cells, "mean_nmse": float(np.mean(list(cells.values()))),
                   "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                   "train_sec": sec}
        print(f"{v:8s} mean NMSE {rows[v]['mean_nmse']:.4f}  final loss {result.final_loss:.4f}"
              f"  unseen loss {result.eval_loss:.4f}  ({sec:.0f} s)", flush=True)
    best = min(r["mean_nmse"] for r in rows.values())
    cols = list(next(iter(rows.values()))["cells"])
    print("\nnormalised MSE on the same unseen tasks (" + f"{a.tasks} per cell), "
          f"{a.steps} training steps each")
    print("| variant | " + " | ".join(cols) + " | mean | mean / best |")
    print("|---|" + "---:|" * (len(cols) + 2))
    for v, r in rows.items():
        print(f"| {v} | " + " | ".join(f"{r['cells'][c]:.4f}" for c in cols)
              + f" | {r['mean_nmse']:.4f} | {r['mean_nmse'] / best:.3f} |")
    if a.out:
        write_atomic(a.out, json.dumps({"command": " ".join(sys.argv), "preset": a.preset,
                                        "steps": a.steps, "tasks": a.tasks, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
