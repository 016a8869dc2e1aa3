"""Two models on the same tasks: gpicl-eval results files compared cell by cell.

    python benchmarks/compare_models.py \
        --before docs/results/default_recal_1d_eval.json docs/results/default_recal_garg_d8_eval.json \
        --after docs/results/default_seed1_recal_1d_eval.json \
                docs/results/default_seed1_recal_garg_d8_eval.json [--ks 16,32]

For each group of suites (the training prior's, the 1-D suites, Garg's suites by width d),
over every (suite, k)
cell of the model in both: the geometric mean of the after model's normalised MSE over the
before model's and the cells in which it is lower; the median of the cells' NLL
differences (after minus before; a median, since one task's tail can put a cell's NLL in the
thousands) and the cells in which it is lower, over cells where both are finite; the same
for CRPS. A pair of files is compared only if every cell holds the same `mean` baseline in both
(the same tasks: gpicl-eval seeds each suite and k); otherwise the comparison is refused,
naming the suite and k.

With `--cells METRIC` (nmse, nll, crps, cover50 or cover90) it lists every cell's METRIC
instead, before and after, suite by suite (e.g. `--cells nll --ks 1,2` for the cells a
model's tails rule).
"""

import argparse
import json
import math
import statistics


def load_suites(paths) -> dict:
    """The suites of gpicl-eval results files, merged (a later file's suite wins)."""
    suites = {}
    for path in paths:
        with open(path) as f:
            suites.update(json.load(f)["suites"])
    return suites


def check_same_tasks(name: str, methods: dict, theirs: dict) -> None:
    """ValueError naming the suite and k unless every k of methods' model holds the same
    `mean` baseline in theirs (the same tasks, since gpicl-eval seeds each suite and k)."""
    for k in methods["model"]:
        mine = methods.get("mean", {}).get(k, {}).get("nmse")
        ref = theirs.get("mean", {}).get(k, {}).get("nmse")
        if mine is None or ref is None or abs(mine - ref) > 1e-5 * max(abs(ref), 1e-12):
            raise ValueError(f"suite {name!r} at k={k}: mean baseline {mine} here, {ref} "
                             "in the other file: not the same tasks")


def group_of(name: str, suite: dict) -> str:
    """'prior' for the training prior's own suite (the model's widths), 'Garg d=<width>' for
    Garg's suites, else '1-D' or 'd=<width>'."""
    width = suite["overrides"].get("x_dim", 1)
    if suite["kind"] == "garg":
        return f"Garg d={width}"
    if suite["family"] == "prior":
        return "prior"
    return "1-D" if width == 1 else f"d={width}"


def paired_cells(before: dict, after: dict, ks=None):
    """Yields (suite name, its suite in `after`, k, before's model cell, after's) for every
    model cell of `after` (at ks, if given); ValueError if a suite or k of `after` is
    missing or on other tasks in `before`."""
    for name, s in after.items():
        if name not in before:
            raise ValueError(f"suite {name!r} is not in the before files")
        check_same_tasks(name, s["methods"], before[name]["methods"])
        mine, theirs = s["methods"]["model"], before[name]["methods"]["model"]
        for k in mine:
            if ks is not None and k not in ks:
                continue
            if k not in theirs:
                raise ValueError(f"suite {name!r} at k={k}: no model cell in the before files")
            yield name, s, k, theirs[k], mine[k]


def compare(before: dict, after: dict, ks=None) -> dict:
    """{group: {metric: (summary, better, cells)}}: the paired comparison of two suites dicts
    (load_suites); ValueError as `paired_cells`."""
    cells = {}
    for name, s, _, theirs, mine in paired_cells(before, after, ks):
        cells.setdefault(group_of(name, s), []).append((theirs, mine))
    out = {}
    for group, pairs in cells.items():
        row = {}
        logs = [math.log(a["nmse"] / b["nmse"]) for b, a in pairs
                if b["nmse"] > 0 and a["nmse"] > 0]
        row["nmse"] = (math.exp(sum(logs) / len(logs)) if logs else float("nan"),
                       sum(lg < 0 for lg in logs), len(logs))
        for metric in ("nll", "crps"):
            diffs = [a[metric] - b[metric] for b, a in pairs
                     if metric in a and metric in b
                     and math.isfinite(a[metric]) and math.isfinite(b[metric])]
            if diffs:
                row[metric] = (statistics.median(diffs), sum(d < 0 for d in diffs), len(diffs))
        out[group] = row
    return out


CELL_METRICS = ("nmse", "nll", "crps", "cover50", "cover90")


def cell_rows(before: dict, after: dict, metric: str, ks=None) -> list:
    """[(suite, k, before's value, after's)] of every model cell of `after` holding
    `metric`, checked as `paired_cells` (same tasks, the cell present before)."""
    rows = []
    for name, _, k, theirs, mine in paired_cells(before, after, ks):
        if metric in mine:
            if metric not in theirs:
                raise ValueError(f"suite {name!r} at k={k}: no model {metric} in the before "
                                 "files")
            rows.append((name, k, theirs[metric], mine[metric]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", nargs="+", required=True, metavar="RESULTS",
                   help="gpicl-eval results.json files of the first model")
    p.add_argument("--after", nargs="+", required=True, metavar="RESULTS",
                   help="results files of the second model on the same tasks")
    p.add_argument("--ks", help="comma-separated context sizes to compare (default: all)")
    p.add_argument("--cells", choices=CELL_METRICS,
                   help="list every cell's value of this metric, before and after")
    a = p.parse_args(argv)
    ks = None if a.ks is None else [k.strip() for k in a.ks.split(",") if k.strip()]
    try:
        before, after = load_suites(a.before), load_suites(a.after)
        if a.cells:
            cells = cell_rows(before, after, a.cells, ks)
        else:
            rows = compare(before, after, ks)
    except (OSError, ValueError, KeyError) as e:
        p.error(f"cannot compare: {e}")
    if a.cells:
        print(f"| suite | k | {a.cells} before | {a.cells} after |")
        print("|---|---:|---:|---:|")
        for name, k, b, v in cells:
            print(f"| {name} | {k} | {b:.4g} | {v:.4g} |")
        return 0
    print("| suites | normalised MSE after/before (geometric mean) | lower after | "
          "NLL after - before (median) | lower after | CRPS after - before (median) | lower after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for group in sorted(rows, key=lambda g: (g != "prior", g != "1-D", len(g), g)):
        row = rows[group]
        ratio, better, n = row["nmse"]
        cols = [f"{ratio:.3f}x", f"{better}/{n}"]
        for metric in ("nll", "crps"):
            if metric in row:
                median, better, n = row[metric]
                cols += [f"{median:+.4f}", f"{better}/{n}"]
            else:
                cols += ["-", "-"]
        print(f"| {group} | " + " | ".join(cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
