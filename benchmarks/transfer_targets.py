"""Issue 4/7's transfer targets, read from gpicl-eval results files.

    python benchmarks/transfer_targets.py docs/results/default_1d_eval.json \
        docs/results/default_garg_d2_d4_eval.json docs/results/default_garg_d8_eval.json \
        [--specialist 0.0155] [--plot docs/garg_by_width_default.png] \
        [--baselines-from OTHER_RESULTS.json ...]

Prints, with every method scored on the same tasks (paired) by normalised MSE:
  - every 1-D suite at k = 16 and 32: the model, the best per-task learner, the excess
    (target: at most 0.01);
  - every Garg cell (suite, d, k in {16, 32}): the model over the best per-task learner
    (target: first, or within 1.2x, in at least 80% of the cells);
  - random_mlp at k = 16 against the 1-D specialist's figure (target: at most 1.2x).

--baselines-from takes the per-task learners from other results files of the same tasks
(gpicl-eval seeds each suite and k, so a model evaluated with `--baselines mean` pairs with
an earlier run's fitted baselines): every cell of the model's files must hold the `mean`
baseline, equal to the other file's, or the pairing is refused.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.compare_models import check_same_tasks, load_suites  # noqa: E402
from gpicl_tf.evaluate import best_baseline, plot_garg_by_width  # noqa: E402

KS = ("16", "32")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="gpicl-eval results.json files")
    p.add_argument("--specialist", type=float, default=0.0155,
                   help="the 1-D random-MLP specialist's k=16 figure the target refers to")
    p.add_argument("--max-excess", type=float, default=0.01)
    p.add_argument("--max-ratio", type=float, default=1.2)
    p.add_argument("--plot", help="also write the Garg suites' error-against-k plot of all the "
                                  "files (gpicl_tf.evaluate.plot_garg_by_width) here")
    p.add_argument("--baselines-from", nargs="+", default=[], metavar="RESULTS",
                   help="take the per-task learners from these results files of the same "
                        "tasks (checked by their `mean` baseline)")
    a = p.parse_args(argv)
    suites = load_suites(a.results)
    if a.baselines_from:
        try:
            pair_baselines(suites, a.baselines_from)
        except ValueError as e:
            p.error(f"--baselines-from: {e}")
    one_d = {n: s for n, s in suites.items()
             if s["kind"] != "garg" and s["overrides"].get("x_dim", 1) == 1 and n != "prior"}
    garg = {n: s for n, s in suites.items() if s["kind"] == "garg"}

    print("1-D suites: normalised MSE, model against the best per-task learner "
          f"(target: excess <= {a.max_excess})")
    print("| suite | k | model | best per-task learner | excess | met |")
    print("|---|---:|---:|---|---:|---|")
    met_1d = total_1d = 0
    for name, s in one_d.items():
        for k in KS:
            if k not in s["methods"]["model"]:
                continue
            model = s["methods"]["model"][k]["nmse"]
            bname, best = best_baseline(s["methods"], k)
            ok = model - best <= a.max_excess
            met_1d += ok
            total_1d += 1
            print(f"| {name} | {k} | {model:.4g} | {bname} {best:.4g} | {model - best:+.4g} | "
                  f"{'yes' if ok else 'no'} |")
    print(f"\n1-D cells met: {met_1d}/{total_1d}\n")

    print(f"Garg suites: model / best per-task learner (target: first or <= {a.max_ratio}x in "
          ">= 80% of the cells)")
    print("| suite | k | model | best per-task learner | ratio | met |")
    print("|---|---:|---:|---|---:|---|")
    met_g = total_g = 0
    for name, s in sorted(garg.items()):
        for k in KS:
            if k not in s["methods"]["model"]:
                continue
            model = s["methods"]["model"][k]["nmse"]
            bname, best = best_baseline(s["methods"], k)
            ratio = model / max(best, 1e-30)
            ok = ratio <= a.max_ratio
            met_g += ok
            total_g += 1
            print(f"| {name} | {k} | {model:.4g} | {bname} {best:.4g} | {ratio:.3g}x | "
                  f"{'yes' if ok else 'no'} |")
    if total_g:
        print(f"\nGarg cells first or within {a.max_ratio}x: {met_g}/{total_g} "
              f"({100 * met_g / total_g:.0f}%; target 80%)")
    if a.plot:
        plot_garg_by_width({"suites": suites}, a.plot)
        print(f"\nwrote {a.plot}")
    if "random_mlp" in suites and "16" in suites["random_mlp"]["methods"]["model"]:
        v = suites["random_mlp"]["methods"]["model"]["16"]["nmse"]
        print(f"\nrandom_mlp k=16: {v:.4g} against the specialist's {a.specialist} "
              f"({v / a.specialist:.2f}x; target <= 1.2x)")
    return 0


def pair_baselines(suites: dict, paths) -> None:
    """Replaces each suite's baselines (and exact posterior, the same on the same tasks) by
    those of the same suite in `paths` (in place),
    after checking that every k of the model's has the same `mean` baseline there (the
    same tasks): ValueError names the first suite and k that differ or are missing."""
    other = load_suites(paths)
    for name, s in suites.items():
        if name not in other:
            raise ValueError(f"suite {name!r} is in no baselines file")
        theirs = other[name]["methods"]
        check_same_tasks(name, s["methods"], theirs)
        s["methods"] = {**{n: v for n, v in theirs.items() if n != "model"},
                        "model": s["methods"]["model"]}


if __name__ == "__main__":
    raise SystemExit(main())
