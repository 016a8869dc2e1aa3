"""How the regressor's linear base (`InContextRegressor(linear_base=...)`) was chosen, on data
the README's real-data table does not score (paired: every variant on the same splits).

    python benchmarks/linear_base_selection.py [--out docs/results/linear_base_selection.txt]

Cells: diabetes (442 rows, 10 features) on 20 splits other than benchmarks/real_data.py's,
and wine's 12 columns other than alcohol, each predicted from the other 12 features (6
splits each); contexts of 32, 64 and 128 rows; R^2 on the remaining rows. Variants of the
shipped regressor: the model alone ("none"), always the ridge base ("ridge"), and the
cross-validated choice ("auto"), each with the ridge penalties from 10 to 1000 and from 100
to 1000 (`gpicl_tf.estimator.BASE_ALPHAS`, on standardised data); ridge regression alone
(RidgeCV, as real_data.py's baseline) for reference. Prints every cell, then per variant
the mean R^2 gain over "none" and the cells where it loses more than 0.01.
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLOORS = {"a10": np.logspace(1, 3, 13), "a100": np.logspace(2, 3, 13)}


def cells():
    from sklearn.datasets import load_diabetes, load_wine

    X, y = load_diabetes(return_X_y=True)
    w = load_wine().data
    out = [("diabetes", X, y, range(10, 30))]
    out += [(f"wine_col{j}", np.delete(w, j, 1), w[:, j], range(6)) for j in range(1, 13)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the printed lines to this file")
    args = p.parse_args(argv)
    from gpicl_tf.cli import quiet_tensorflow

    quiet_tensorflow()
    from benchmarks.real_data import r2, reg_baseline
    from gpicl_tf import InContextRegressor, estimator

    warnings.simplefilter("ignore")
    t0 = time.time()
    lines = [f"$ python benchmarks/linear_base_selection.py {' '.join(argv or sys.argv[1:])}"]

    def say(text):
        print(text, flush=True)
        lines.append(text)

    reg = InContextRegressor()  # one loaded model for every variant (set_params keeps it)
    names = ["none", "ridge_lstsq"] + [f"{b}_{f}" for f in FLOORS for b in ("ridge", "auto")]
    gains = {n: [] for n in names}
    for name, X, y, seeds in cells():
        for n in (32, 64, 128):
            scores = {m: [] for m in names}
            for s in seeds:
                o = np.random.default_rng(7777 + 1000 * s + n).permutation(len(X))
                c, q = o[:n], o[n:]
                reg.set_params(linear_base="none", random_state=s)
                scores["none"].append(r2(reg.fit(X[c], y[c]).predict(X[q]), y[q]))
                scores["ridge_lstsq"].append(r2(reg_baseline("ridge", X[c], y[c], X[q]), y[q]))
                for f, alphas in FLOORS.items():
                    estimator.BASE_ALPHAS = alphas
                    for b in ("ridge", "auto"):
                        reg.set_params(linear_base=b)
                        scores[f"{b}_{f}"].append(r2(reg.fit(X[c], y[c]).predict(X[q]), y[q]))
            mean = {m: float(np.mean(v)) for m, v in scores.items()}
            for m in names:
                gains[m].append(mean[m] - mean["none"])
            say(f"{name} n={n}: " + " ".join(f"{m} {v:.3f}" for m, v in mean.items()))
    say("mean R^2 gain over none, and cells losing more than 0.01 (of "
        f"{len(gains['none'])}):")
    for m in names:
        g = np.array(gains[m])
        say(f"  {m:12s} {g.mean():+.4f}  {int(np.sum(g < -0.01))}")
    say(f"{time.time() - t0:.0f} s")
    if args.out:
        from gpicl_tf.files import write_atomic

        write_atomic(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
