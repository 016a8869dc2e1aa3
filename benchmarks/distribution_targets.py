"""Issue 5/7's predictive-distribution targets, read from gpicl-eval results files.

    python benchmarks/distribution_targets.py docs/results/default_noridge_1d_eval.json \
        --mse docs/results/default_mse_1d_eval.json

The first file is gpicl-eval's results for a model with the bar head (its model, GP
regression and, on gp_rbf suites, the exact GP posterior with the true kernel scored by
NLL, CRPS and interval coverage); --mse the results of the same model trained with the
mse head on the same suites, seed, --tasks and --queries (so on the same tasks: paired).
Prints every target cell, met or not:
  - gp_rbf suites at k = 8, 16, 32: model NLL minus the exact posterior's (target <= 0.05 nats);
  - suites drawn from the training prior (kind in-distribution), every k: coverage of the
    90% and 50% central intervals (targets 0.88-0.92 and 0.48-0.52), with its 95%
    interval over tasks; with 128 tasks of 16 queries that interval is about +-0.04 wide,
    twice the target band, so --coverage reads these cells from a gpicl-eval run of the
    model alone on many more tasks (e.g. --suites prior,random_mlp --tasks 2048
    --baselines mean: +-0.01);
  - every suite and k: the bar model's mean-prediction MSE over the mse model's (target:
    at most 1.05; also the geometric mean over all cells);
  - random_mlp at k >= 8: model CRPS against GP regression's (target: below).

--baselines-from takes GP regression and the exact posterior from other results files of
the same tasks (as benchmarks/transfer_targets.py does), so that a model evaluated with
`--baselines mean` pairs with an earlier run's baselines; without it a first file that
lacks them is refused, naming the suite and method.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.transfer_targets import pair_baselines  # noqa: E402


def _load(path):
    """A results file's JSON; an unreadable one ends the script with one line naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"distribution_targets.py: error: {path}: cannot read a gpicl-eval "
                         f"results.json ({e.strerror if isinstance(e, OSError) else e})")


def _ci(cell, key) -> str:
    lo, hi = cell[f"{key}_ci95"]
    return f"[{lo:.3f}, {hi:.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="gpicl-eval results.json of the bar-head model")
    p.add_argument("--mse", required=True, help="gpicl-eval results.json of the mse-head model")
    p.add_argument("--coverage", metavar="RESULTS",
                   help="gpicl-eval results.json to read the coverage cells from (the same "
                        "model on more tasks); default: the first file")
    p.add_argument("--baselines-from", nargs="+", default=[], metavar="RESULTS",
                   help="take GP regression and the exact posterior from these results files "
                        "of the same tasks (checked by their `mean` baseline)")
    p.add_argument("--max-nll-gap", type=float, default=0.05)
    p.add_argument("--max-mse-ratio", type=float, default=1.05)
    a = p.parse_args(argv)
    bar, mse = _load(a.results), _load(a.mse)
    cov = _load(a.coverage) if a.coverage else bar  # every file read before any output
    for key in ("seed", "n_tasks", "n_queries"):
        if bar.get(key) != mse.get(key):
            raise SystemExit(f"{key}: {bar.get(key)} against {mse.get(key)}; the two files "
                             "must score the same tasks")
    suites = bar["suites"]
    try:
        if a.baselines_from:
            pair_baselines(suites, a.baselines_from)
        for name, method in _needed(suites):
            if method not in suites[name]["methods"]:
                raise ValueError(f"suite {name!r} has no {method!r} results in {a.results}: "
                                 "score it with gpicl-eval --baselines including gp, or pair "
                                 "an earlier run's with --baselines-from")
    except (ValueError, OSError) as e:
        p.error(str(e))
    counts = {}

    def tally(name, ok):
        met, total = counts.get(name, (0, 0))
        counts[name] = (met + bool(ok), total + 1)
        return "yes" if ok else "no"

    print(f"NLL against the exact GP posterior (target: gap <= {a.max_nll_gap} nats per point)")
    print("| suite | k | model NLL | exact posterior NLL | gap | GP regression NLL | met |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, s in suites.items():
        if not name.startswith("gp_rbf"):
            continue
        for k in ("8", "16", "32"):
            m = s["methods"]
            gap = m["model"][k]["nll"] - m["bayes_optimal"][k]["nll"]
            print(f"| {name} | {k} | {m['model'][k]['nll']:.4f} | "
                  f"{m['bayes_optimal'][k]['nll']:.4f} | {gap:+.4f} | {m['gp'][k]['nll']:.4f} | "
                  f"{tally('nll', gap <= a.max_nll_gap)} |")

    drawn = (f"each drawn with {cov['task_points']} points and scored on its first queries"
             if cov.get("task_points") else "each of k + queries points")
    print(f"\nCoverage on suites drawn from the training prior, {cov['n_tasks']} tasks of "
          f"{cov['n_queries']} queries per cell, {drawn} (targets: 90% interval 0.88-0.92, 50% "
          "interval 0.48-0.52; in brackets the 95% interval over tasks)")
    print("| suite | k | cover90 | met | cover50 | met |")
    print("|---|---:|---:|---|---:|---|")
    for name, s in cov["suites"].items():
        if s["kind"] != "in-distribution":
            continue
        for k, cell in s["methods"]["model"].items():
            c90, c50 = cell["cover90"], cell["cover50"]
            print(f"| {name} | {k} | {c90:.3f} {_ci(cell, 'cover90')} | "
                  f"{tally('cover90', 0.88 <= c90 <= 0.92)} | {c50:.3f} {_ci(cell, 'cover50')} | "
                  f"{tally('cover50', 0.48 <= c50 <= 0.52)} |")

    print(f"\nMean prediction: MSE of the bar model over the mse model's, same tasks (target: "
          f"<= {a.max_mse_ratio})")
    print("| suite | " + " | ".join(f"k={k}" for k in next(iter(suites.values()))["methods"]
                                     ["model"]) + " |")
    print("|---|" + "---:|" * len(next(iter(suites.values()))["methods"]["model"]))
    logs = []
    for name, s in suites.items():
        if name not in mse["suites"]:
            continue
        cells = []
        for k, cell in s["methods"]["model"].items():
            ref = mse["suites"][name]["methods"]["model"][k]["mse"]
            r = cell["mse"] / ref
            logs.append(math.log(r))
            tally("mse_cells", r <= a.max_mse_ratio)
            cells.append(f"{r:.3f}" + ("" if r <= a.max_mse_ratio else " (no)"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    geo = math.exp(sum(logs) / len(logs))
    print(f"geometric mean over {len(logs)} cells: {geo:.3f} "
          f"({'met' if geo <= a.max_mse_ratio else 'missed'})")

    print("\nCRPS on random-MLP tasks, k >= 8 (target: model below GP regression)")
    print("| suite | k | model CRPS | GP CRPS | met |")
    print("|---|---:|---:|---:|---|")
    m = suites["random_mlp"]["methods"]
    for k in m["model"]:
        if int(k) < 8:
            continue
        print(f"| random_mlp | {k} | {m['model'][k]['crps']:.4f} | {m['gp'][k]['crps']:.4f} | "
              f"{tally('crps', m['model'][k]['crps'] < m['gp'][k]['crps'])} |")

    print("\nSummary (cells met / cells):")
    for name, (met, total) in counts.items():
        print(f"  {name}: {met}/{total}")
    print(f"  mse geometric mean: {geo:.3f}")
    return 0


def _needed(suites):
    """(suite, method) pairs the tables read beside the model."""
    for name in suites:
        if name.startswith("gp_rbf"):
            yield name, "bayes_optimal"
            yield name, "gp"
    if "random_mlp" in suites:
        yield "random_mlp", "gp"


if __name__ == "__main__":
    raise SystemExit(main())
